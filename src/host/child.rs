//! The child-process side of process isolation: `myelin plugin-run <instance>`, started by the
//! host with the plugin channel on an inherited file descriptor.

use crate::host::metrics_bridge::ForwardingRecorder;
use crate::host::protocol::{self, HostMsg, Init, PluginMsg};
use futures::{SinkExt, StreamExt};
use std::io::Read;
use std::os::fd::FromRawFd;
use std::time::Duration;
use tokio::sync::mpsc;

/// The descriptor number the host puts the plugin channel on.
pub const CHANNEL_FD: i32 = 3;
/// Set by the host so a person running `plugin-run` by hand gets a clear error.
pub const CHANNEL_ENV: &str = "MYELIN_PLUGIN_CHANNEL_FD";

#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("`myelin plugin-run` is started by the plugin host, not by hand (no {CHANNEL_ENV})")]
    NotStartedByHost,
    #[error("reading the init message from the host: {0}")]
    Init(#[from] protocol::FrameError),
    #[error("the host sent {0} first, expected init")]
    NoInit(&'static str),
    #[error("the host asked for instance `{asked}` but this process is `{instance}`")]
    WrongInstance { asked: String, instance: String },
    #[error("cannot start the plugin runtime: {0}")]
    Runtime(std::io::Error),
}

fn read_init(stream: &mut std::os::unix::net::UnixStream) -> Result<Init, ChildError> {
    let mut len = [0u8; 4];
    stream
        .read_exact(&mut len)
        .map_err(protocol::FrameError::from)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > protocol::MAX_FRAME {
        return Err(ChildError::NoInit("an oversized frame"));
    }
    let mut buf = vec![0u8; len];
    stream
        .read_exact(&mut buf)
        .map_err(protocol::FrameError::from)?;
    match protocol::decode::<HostMsg>(&buf)? {
        HostMsg::Init(init) => Ok(*init),
        HostMsg::Mesh(_) => Err(ChildError::NoInit("a mesh update")),
        HostMsg::Ping { .. } => Err(ChildError::NoInit("a ping")),
        HostMsg::Stop => Err(ChildError::NoInit("stop")),
    }
}

/// Runs the plugin child to completion. Any panic ends the process with status 101, so the
/// host sees it as the crash it is.
pub fn plugin_run(instance: &str) -> Result<(), ChildError> {
    if std::env::var_os(CHANNEL_ENV).is_none() {
        return Err(ChildError::NotStartedByHost);
    }
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        // SAFETY: _exit only ends the process; no Rust state is touched afterwards.
        unsafe { libc::_exit(101) };
    }));
    // SAFETY: the host placed our end of a socketpair on CHANNEL_FD before exec, and nothing
    // else in this process owns that descriptor.
    let mut stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(CHANNEL_FD) };
    // Programs the plugin starts must not hold the channel open after this process dies.
    if let Err(e) = rustix::io::fcntl_setfd(&stream, rustix::io::FdFlags::CLOEXEC) {
        tracing::warn!("cannot mark the host channel close-on-exec: {e}");
    }
    let init = read_init(&mut stream)?;
    if init.instance != instance {
        return Err(ChildError::WrongInstance {
            asked: init.instance,
            instance: instance.to_string(),
        });
    }
    let recorder = ForwardingRecorder::default();
    if metrics::set_global_recorder(recorder.clone()).is_err() {
        tracing::warn!("a metrics recorder was already installed; plugin metrics stay local");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(init.worker_threads)
        .thread_name(format!("plugin-{instance}"))
        .enable_all()
        .build()
        .map_err(ChildError::Runtime)?;
    stream.set_nonblocking(true).map_err(ChildError::Runtime)?;
    runtime.block_on(async move {
        let stream = tokio::net::UnixStream::from_std(stream).map_err(ChildError::Runtime)?;
        let (mut sink, mut source) = protocol::framed(stream).split();
        let (host_tx, host_rx) = mpsc::unbounded_channel();
        let (plugin_tx, mut plugin_rx) = mpsc::unbounded_channel();
        let reader_tx = host_tx.clone();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = source.next().await {
                match protocol::decode::<HostMsg>(&frame) {
                    Ok(msg) => {
                        if reader_tx.send(msg).is_err() {
                            break;
                        }
                    }
                    Err(e) => tracing::warn!("dropping a malformed host message: {e}"),
                }
            }
            // The host is gone or closed the channel: stop.
            let _ = reader_tx.send(HostMsg::Stop);
        });
        let writer = tokio::spawn(async move {
            while let Some(msg) = plugin_rx.recv().await {
                let last = matches!(msg, PluginMsg::Stopped | PluginMsg::Failed { .. });
                let Ok(frame) = protocol::encode(&msg) else {
                    continue;
                };
                if sink.send(frame).await.is_err() || last {
                    break;
                }
            }
        });
        let metrics_tx = plugin_tx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let snapshot = recorder.snapshot();
                if !snapshot.is_empty() && metrics_tx.send(PluginMsg::Metrics(snapshot)).is_err() {
                    break;
                }
            }
        });
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            let stop_tx = host_tx.clone();
            tokio::spawn(async move {
                term.recv().await;
                let _ = stop_tx.send(HostMsg::Stop);
            });
        }
        drop(host_tx);
        // On a worker, so a plugin that blocks its runtime blocks its health answers too.
        let stopped = tokio::spawn(crate::host::runner::run_plugin(
            init,
            host_rx,
            plugin_tx,
            myelin_sdk::CancellationToken::new(),
        ))
        .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
        // Never drop a stopped plugin here: zenoh 1.10.2 aborts the process when its runtime is
        // dropped, and the host would count that as a crash. The process ends below instead.
        std::mem::forget(stopped);
        Ok::<(), ChildError>(())
    })?;
    // Skips destructors (the runtime's included): the plugin has stopped and reported it.
    let _ = std::io::Write::flush(&mut std::io::stderr());
    // SAFETY: _exit only ends the process.
    unsafe { libc::_exit(0) }
}
