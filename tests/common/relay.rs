//! A userspace UDP impairment relay between two nodes' WireGuard endpoints (this kernel has no
//! netem): each node's endpoint for the other is the relay, which forwards, delays or drops.

use super::netns::Netns;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

const DROP: u64 = u64::MAX;

pub struct Relay {
    /// Where node A must send (its peer endpoint for B).
    pub for_a: SocketAddr,
    /// Where node B must send (its peer endpoint for A).
    pub for_b: SocketAddr,
    /// The nodes' own endpoints, where the relay delivers.
    a: SocketAddr,
    b: SocketAddr,
    delay_ms: Arc<AtomicU64>,
}

fn forward(from: UdpSocket, to: UdpSocket, dest: SocketAddr, delay_ms: Arc<AtomicU64>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, _)) = from.recv_from(&mut buf) {
            let d = delay_ms.load(Ordering::Relaxed);
            if d == DROP {
                continue;
            }
            let release = Instant::now() + Duration::from_millis(d);
            if tx.send((release, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    });
    std::thread::spawn(move || {
        while let Ok((release, packet)) = rx.recv() {
            // The impairment itself: hold the packet until its release time.
            let wait = release.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            let _ = to.send_to(&packet, dest);
        }
    });
}

impl Relay {
    /// Listens on `ip` inside `ns`; forwards A's packets to `b` and B's to `a`.
    pub fn start(ns: &Netns, ip: &str, a: SocketAddr, b: SocketAddr) -> Relay {
        let ip = ip.to_string();
        let (sock_a, sock_b) = ns.enter(move || {
            (
                UdpSocket::bind(format!("{ip}:0")).expect("relay socket for A"),
                UdpSocket::bind(format!("{ip}:0")).expect("relay socket for B"),
            )
        });
        let for_a = sock_a.local_addr().expect("addr");
        let for_b = sock_b.local_addr().expect("addr");
        let delay_ms = Arc::new(AtomicU64::new(0));
        // A → relay(for_a) → out of sock_b → B; B → relay(for_b) → out of sock_a → A.
        forward(
            sock_a.try_clone().expect("clone"),
            sock_b.try_clone().expect("clone"),
            b,
            delay_ms.clone(),
        );
        forward(sock_b, sock_a, a, delay_ms.clone());
        Relay {
            for_a,
            for_b,
            a,
            b,
            delay_ms,
        }
    }

    /// For nodes that learn each other's real endpoints (from a mesh lighthouse) instead of
    /// being configured with the relay's: destination NAT in A's namespace `a_ns` sends what A
    /// sends to B's endpoint to the relay instead, and likewise in B's. Replies are translated
    /// back by conntrack, and an endpoint a node learns by roaming is a relay address, so
    /// every datagram between the two passes the relay. Other destinations (a lighthouse) are
    /// not touched. Call it before the nodes start (a flow conntrack already knows is not
    /// redirected); the rules go with the namespaces.
    pub fn steer(&self, a_ns: &Netns, b_ns: &Netns) {
        for (ns, to, via) in [(a_ns, self.b, self.for_a), (b_ns, self.a, self.for_b)] {
            let rules = format!(
                "table ip myelin_relay {{\n  chain output {{\n    type nat hook output priority -100;\n    ip daddr {} udp dport {} dnat to {via}\n  }}\n}}\n",
                to.ip(),
                to.port()
            );
            let mut nft = ns
                .command("nft")
                .args(["-f", "-"])
                .stdin(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("nft (install nftables)");
            std::io::Write::write_all(&mut nft.stdin.take().unwrap(), rules.as_bytes()).unwrap();
            let out = nft.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "nft in {}: {}\n{rules}",
                ns.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn set(&self, v: u64) -> SystemTime {
        self.delay_ms.store(v, Ordering::Relaxed);
        SystemTime::now()
    }

    /// Forward at once. Returns when the change took effect.
    pub fn pass(&self) -> SystemTime {
        self.set(0)
    }

    /// Delay every packet, both directions, by `ms`.
    pub fn delay(&self, ms: u64) -> SystemTime {
        self.set(ms)
    }

    /// Drop everything.
    pub fn blackhole(&self) -> SystemTime {
        self.set(DROP)
    }
}
