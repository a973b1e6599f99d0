//! Network namespaces for end-to-end tests: created with a unique name, removed on drop (also
//! when the test fails), with every process left inside killed first.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub struct Netns {
    pub name: String,
}

pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (install iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        remove_stale();
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "end-to-end tests create network namespaces: run them as root"
        );
        let name = format!(
            "my-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// A command that runs inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `cmd` inside the namespace and returns its output; panics with stderr on failure.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.command(program).args(args).output().expect("spawn");
        assert!(
            out.status.success(),
            "{program} {} in {}: {}{}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread that has entered this namespace (sockets it opens live there).
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on this thread only, with a valid namespace descriptor.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread panicked")
    }
}

/// Namespaces and bridges left by a test run that was killed (its pid is in the name) are
/// removed.
fn remove_stale() {
    if let Ok(links) = std::fs::read_dir("/sys/class/net") {
        for link in links.flatten() {
            let name = link.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("mb")
                .or_else(|| name.strip_prefix("mf"))
                .and_then(|r| r.split('p').nth(1))
            else {
                continue;
            };
            if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = Command::new("ip").args(["link", "del", &name]).status();
            }
        }
    }
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name.strip_prefix("my-").and_then(|r| r.split('-').nth(1)) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            drop(Netns {
                name: name.to_string(),
            });
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: killing processes left in our own test namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if std::path::Path::new(&format!("/run/netns/{}", self.name)).exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }
}

/// Two namespaces on a lab fabric (the same code `myelin lab` uses): a host bridge with a veth
/// to each, underlay addresses `<subnet>.1` and `<subnet>.2`, each on the namespace's `eth0`.
pub struct Link {
    pub a: std::sync::Arc<Netns>,
    pub b: std::sync::Arc<Netns>,
    pub a_addr: String,
    pub b_addr: String,
    pub a_if: String,
    pub b_if: String,
    _fleet: Fleet,
}

impl Link {
    pub fn new(tag: &str) -> Link {
        let fleet = Fleet::new(tag, &["a", "b"]);
        Link {
            a: fleet.nodes[0].clone(),
            b: fleet.nodes[1].clone(),
            a_addr: fleet.underlay[0].clone(),
            b_addr: fleet.underlay[1].clone(),
            a_if: "eth0".into(),
            b_if: "eth0".into(),
            _fleet: fleet,
        }
    }
}

/// Several namespaces on one lab fabric: node `i` (from 1) has underlay `<subnet>.<i>` on its
/// `eth0`. Everything is removed on drop.
pub struct Fleet {
    pub nodes: Vec<std::sync::Arc<Netns>>,
    pub underlay: Vec<String>,
    fabric: myelin::lab::Fabric,
}

impl Fleet {
    pub fn new(tag: &str, names: &[&str]) -> Fleet {
        remove_stale();
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let fabric = myelin::lab::Fabric {
            prefix: format!("my-{tag}-{pid}-{n}-"),
            bridge: format!("mf{}p{pid}", n % 100),
            subnet: format!("10.201.{}", n % 250 + 1),
        };
        fabric.create().expect("lab fabric bridge");
        let mut fleet = Fleet {
            nodes: Vec::new(),
            underlay: Vec::new(),
            fabric,
        };
        for (i, name) in names.iter().enumerate() {
            let a = fleet.fabric.attach(i + 1, name).expect("attach");
            fleet
                .nodes
                .push(std::sync::Arc::new(Netns { name: a.namespace }));
            fleet.underlay.push(a.underlay);
        }
        fleet
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        let _ = self.fabric.destroy(&names);
    }
}
