//! Starting and signalling one run of a plugin: a child process of this same binary, or a
//! runtime thread inside the node. Both speak the same messages; only control differs.

use crate::host::child::{CHANNEL_ENV, CHANNEL_FD};
use crate::host::protocol::{self, HostMsg, Init, PluginMsg};
use futures::{SinkExt, StreamExt};
use myelin_sdk::CancellationToken;
use rustix::process::{kill_process, Pid, Signal};
use std::cell::RefCell;
use std::io::BufRead;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::{mpsc, oneshot};

pub enum WorkerEvent {
    Msg(PluginMsg),
    /// The process exited or the thread returned; the text says how.
    Exited(String),
}

pub struct Worker {
    to_plugin: mpsc::UnboundedSender<HostMsg>,
    /// Frames already encoded (mesh views), for a process; `None` for a thread.
    frames: Option<mpsc::UnboundedSender<bytes::Bytes>>,
    pub events: mpsc::UnboundedReceiver<WorkerEvent>,
    control: Control,
}

enum Control {
    Process { pid: i32, exited: Arc<Mutex<bool>> },
    Thread { cancel: CancellationToken },
}

/// capset(2)'s header and data, version 3 (two 32-bit words per set); only the kernel reads
/// the fields.
#[repr(C)]
#[allow(dead_code)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[allow(dead_code)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// A Unix user the plugin children run as.
#[derive(Clone, Copy, Debug)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl Worker {
    pub fn send(&self, msg: HostMsg) {
        let _ = self.to_plugin.send(msg);
    }

    /// A mesh view: a process gets the frame encoded once for all; a thread the view itself.
    pub fn send_mesh(&self, mesh: &super::mesh_feed::MeshFrame) {
        match &self.frames {
            Some(frames) => {
                let _ = frames.send(mesh.frame());
            }
            None => self.send(HostMsg::Mesh(mesh.view.clone())),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        match &self.control {
            Control::Process { pid, .. } => u32::try_from(*pid).ok(),
            Control::Thread { .. } => None,
        }
    }

    pub fn is_thread(&self) -> bool {
        matches!(self.control, Control::Thread { .. })
    }

    /// Asks a process to terminate (SIGTERM) or cancels a thread's token.
    pub fn terminate(&self) {
        match &self.control {
            Control::Process { pid, exited } => signal(*pid, exited, Signal::TERM),
            Control::Thread { cancel } => cancel.cancel(),
        }
    }

    /// SIGKILL; a thread cannot be killed, so this returns false for one.
    pub fn kill(&self) -> bool {
        match &self.control {
            Control::Process { pid, exited } => {
                signal(*pid, exited, Signal::KILL);
                true
            }
            Control::Thread { .. } => false,
        }
    }
}

/// Signals `pid` unless it was already seen to exit. The waiter only reaps the process after
/// setting `exited` under this lock, so the pid cannot have been reused.
fn signal(pid: i32, exited: &Mutex<bool>, sig: Signal) {
    if let Ok(exited) = exited.lock() {
        if !*exited {
            if let Some(pid) = Pid::from_raw(pid) {
                // ESRCH cannot happen (not reaped) and EPERM would mean the child is not ours.
                let _ = kill_process(pid, sig);
            }
        }
    }
}

type SpawnRequest = (
    std::process::Command,
    std::sync::mpsc::Sender<std::io::Result<std::process::Child>>,
);

/// PR_SET_PDEATHSIG fires when the *thread* that forked exits, so every child is forked from
/// one thread that lives as long as the process.
fn spawner() -> &'static Mutex<std::sync::mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<std::sync::mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnRequest>();
        let spawned = std::thread::Builder::new()
            .name("plugin-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the plugin spawner thread: {e}");
        }
        Mutex::new(tx)
    })
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    if let Some(sig) = status.signal() {
        let name = match Signal::from_named_raw(sig) {
            Some(Signal::ABORT) => " (SIGABRT, abort)",
            Some(Signal::SEGV) => " (SIGSEGV, segfault)",
            Some(Signal::KILL) => " (SIGKILL)",
            Some(Signal::TERM) => " (SIGTERM)",
            Some(Signal::BUS) => " (SIGBUS)",
            _ => "",
        };
        format!("killed by signal {sig}{name}")
    } else {
        match status.code() {
            Some(101) => "exited with status 101 (panic)".into(),
            Some(c) => format!("exited with status {c}"),
            None => "exited".into(),
        }
    }
}

/// Starts `myelin plugin-run <instance>` as a child with the channel on fd 3.
pub async fn spawn_process(init: Init, run_as: Option<RunAs>) -> std::io::Result<Worker> {
    let (host_end, child_end) = std::os::unix::net::UnixStream::pair()?;
    let child_fd = child_end.as_raw_fd();
    let parent = rustix::process::getpid().as_raw_nonzero().get();
    let drop_caps = run_as.map_or_else(|| rustix::process::geteuid().as_raw(), |u| u.uid) != 0;
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg0("myelin")
        .arg("plugin-run")
        .arg(&init.instance)
        .env(CHANNEL_ENV, CHANNEL_FD.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: the closure only makes async-signal-safe system calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let check = |r: libc::c_int| {
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            if child_fd == CHANNEL_FD {
                check(libc::fcntl(CHANNEL_FD, libc::F_SETFD, 0))?;
            } else {
                check(libc::dup2(child_fd, CHANNEL_FD))?;
            }
            // Own process group: a terminal's Ctrl-C reaches the node, which stops plugins in order.
            check(libc::setpgid(0, 0))?;
            if let Some(user) = run_as {
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setgid(user.gid))?;
                check(libc::setuid(user.uid))?;
            }
            if drop_caps {
                // setuid from root to another user already emptied the permitted and effective
                // sets; this also empties the inheritable and ambient ones, and the sets of a
                // node that is not root but was given capabilities (ambient or file ones).
                let mut header = CapHeader {
                    version: LINUX_CAPABILITY_VERSION_3,
                    pid: 0,
                };
                let data = [CapData::default(); 2];
                check(libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) as libc::c_int)?;
            }
            // Nothing the child executes (this binary with file capabilities, a setuid helper
            // a plugin runs) can give it privileges back.
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            // After setuid, which clears the parent-death signal.
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = std::sync::mpsc::channel();
    spawner()
        .lock()
        .map_err(|_| std::io::Error::other("plugin spawner lock poisoned"))?
        .send((cmd, reply_tx))
        .map_err(|_| std::io::Error::other("plugin spawner thread is gone"))?;
    let mut child = tokio::task::spawn_blocking(move || reply_rx.recv())
        .await
        .map_err(std::io::Error::other)?
        .map_err(|_| std::io::Error::other("plugin spawner thread is gone"))??;
    drop(child_end);
    let pid = child.id() as i32;
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let instance = init.instance.clone();
    for (stream, name) in [
        (
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            "stderr",
        ),
        (
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            "stdout",
        ),
    ] {
        let Some(stream) = stream else { continue };
        let instance = instance.clone();
        let _ = std::thread::Builder::new()
            .name(format!("plugin-{name}"))
            .spawn(move || {
                for line in std::io::BufReader::new(stream)
                    .lines()
                    .map_while(Result::ok)
                {
                    tracing::info!(target: "myelin::plugin", plugin = %instance, "{line}");
                }
            });
    }
    let exited = Arc::new(Mutex::new(false));
    let (exit_tx, mut exit_rx) = oneshot::channel::<String>();
    {
        let exited = exited.clone();
        std::thread::Builder::new()
            .name("plugin-waiter".into())
            .spawn(move || {
                // SAFETY: waitid with WNOWAIT on our own child only observes it; reaping
                // happens below, after `exited` is set.
                unsafe {
                    let mut info: libc::siginfo_t = std::mem::zeroed();
                    libc::waitid(
                        libc::P_PID,
                        pid as libc::id_t,
                        &mut info,
                        libc::WEXITED | libc::WNOWAIT,
                    );
                }
                if let Ok(mut e) = exited.lock() {
                    *e = true;
                }
                let how = match child.wait() {
                    Ok(status) => describe_exit(status),
                    Err(e) => format!("could not be waited for: {e}"),
                };
                let _ = exit_tx.send(how);
            })?;
    }
    host_end.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(host_end)?;
    let (mut sink, mut source) = protocol::framed(stream).split();
    let (to_plugin, mut from_host) = mpsc::unbounded_channel::<HostMsg>();
    let (frames, mut encoded) = mpsc::unbounded_channel::<bytes::Bytes>();
    to_plugin
        .send(HostMsg::Init(Box::new(init)))
        .map_err(|_| std::io::Error::other("channel closed"))?;
    tokio::spawn(async move {
        loop {
            // Messages first: Init, queued above, always precedes any mesh frame.
            let frame = tokio::select! {
                biased;
                msg = from_host.recv() => match msg {
                    Some(msg) => match protocol::encode(&msg) {
                        Ok(frame) => frame,
                        Err(_) => continue,
                    },
                    None => break,
                },
                Some(frame) = encoded.recv() => frame,
            };
            if frame.is_empty() {
                continue;
            }
            if sink.send(frame).await.is_err() {
                break;
            }
        }
    });
    // Messages first, then the exit: a plugin's last words (why it failed) must not be
    // overtaken by the news of its death.
    tokio::spawn(async move {
        let forward = |frame: bytes::BytesMut| match protocol::decode::<PluginMsg>(&frame) {
            Ok(msg) => events_tx.send(WorkerEvent::Msg(msg)).is_ok(),
            Err(e) => {
                tracing::warn!(plugin = %instance, "malformed message from plugin: {e}");
                true
            }
        };
        let how = loop {
            tokio::select! {
                biased;
                frame = source.next() => match frame {
                    Some(Ok(frame)) => { if !forward(frame) { return } }
                    _ => break (&mut exit_rx).await.unwrap_or_else(|_| "exited".into()),
                },
                how = &mut exit_rx => {
                    let how = how.unwrap_or_else(|_| "exited".into());
                    let drain = tokio::time::sleep(std::time::Duration::from_millis(100));
                    tokio::pin!(drain);
                    loop {
                        tokio::select! {
                            _ = &mut drain => break,
                            frame = source.next() => match frame {
                                Some(Ok(frame)) => { if !forward(frame) { return } }
                                _ => break,
                            },
                        }
                    }
                    break how;
                }
            }
        };
        let _ = events_tx.send(WorkerEvent::Exited(how));
    });
    Ok(Worker {
        to_plugin,
        frames: Some(frames),
        events: events_rx,
        control: Control::Process { pid, exited },
    })
}

thread_local! {
    static PANIC_REPORTER: RefCell<Option<mpsc::UnboundedSender<PluginMsg>>> = const { RefCell::new(None) };
}

/// Makes a panic on a plugin thread a reported failure of that plugin, not a silent task death.
fn install_panic_reporter() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            let payload = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let location = info
                .location()
                .map(|l| format!(" at {l}"))
                .unwrap_or_default();
            PANIC_REPORTER.with(|r| {
                if let Some(tx) = r.borrow().as_ref() {
                    let _ = tx.send(PluginMsg::Failed {
                        reason: format!("panicked: {payload}{location}"),
                    });
                }
            });
        }));
    });
}

/// Runs the plugin on its own runtime thread inside the node.
pub fn spawn_thread(init: Init) -> std::io::Result<Worker> {
    install_panic_reporter();
    let (to_plugin, from_host) = mpsc::unbounded_channel();
    let (plugin_tx, mut plugin_rx) = mpsc::unbounded_channel();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let (ready_tx, ready_rx) = oneshot::channel::<()>();
    let thread_cancel = cancel.clone();
    let (exit_tx, mut exit_rx) = oneshot::channel::<String>();
    let name = format!("plugin-{}", init.instance);
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let reporter = plugin_tx.clone();
            PANIC_REPORTER.with(|r| *r.borrow_mut() = Some(reporter.clone()));
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(init.worker_threads)
                .thread_name(name)
                .on_thread_start(move || {
                    PANIC_REPORTER.with(|r| *r.borrow_mut() = Some(reporter.clone()))
                })
                .enable_all()
                .build();
            let _ = ready_tx.send(());
            let how = match runtime {
                Err(e) => format!("cannot start its runtime: {e}"),
                Ok(runtime) => {
                    // On a worker, not this thread, so a plugin that blocks its runtime blocks
                    // its health answers too.
                    let run = runtime.block_on(runtime.spawn(crate::host::runner::run_plugin(
                        init,
                        from_host,
                        plugin_tx,
                        thread_cancel,
                    )));
                    // A blocked worker would make a waiting shutdown hang the thread forever.
                    runtime.shutdown_background();
                    match run {
                        Ok(_) => "thread returned".to_string(),
                        Err(e) if e.is_panic() => "thread panicked".to_string(),
                        Err(e) => format!("thread ended: {e}"),
                    }
                }
            };
            let _ = exit_tx.send(how);
        })?;
    tokio::spawn(async move {
        let _ = ready_rx.await;
        let how = loop {
            tokio::select! {
                biased;
                msg = plugin_rx.recv() => match msg {
                    Some(msg) => { if events_tx.send(WorkerEvent::Msg(msg)).is_err() { return } }
                    None => break (&mut exit_rx).await.unwrap_or_else(|_| "thread ended".into()),
                },
                how = &mut exit_rx => {
                    while let Ok(msg) = plugin_rx.try_recv() {
                        let _ = events_tx.send(WorkerEvent::Msg(msg));
                    }
                    break how.unwrap_or_else(|_| "thread ended".into());
                }
            }
        };
        let _ = events_tx.send(WorkerEvent::Exited(how));
    });
    Ok(Worker {
        to_plugin,
        frames: None,
        events: events_rx,
        control: Control::Thread { cancel },
    })
}
