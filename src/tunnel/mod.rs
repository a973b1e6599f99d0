//! The data plane I/O shell: the TUN device, the WireGuard UDP socket, one boringtun `Tunn` per
//! peer, allowed-IPs routing, timers, and the probe socket. Protocol logic lives in boringtun
//! and in `crate::mesh`; this module only moves bytes and publishes the `MeshView`.

mod dataplane;
pub mod guard;
pub mod routes;

use crate::config::Config;
use crate::keys::PrivateKey;
use crate::mesh::probe::{ProbeStats, Prober, PROBE_LEN};
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::Tunn;
use boringtun::x25519;
use ipnet::IpNet;
use myelin_sdk::{CancellationToken, MeshView, PeerView};
use routes::RouteTable;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// UDP port of the probe responder on every node's overlay address.
pub const PROBE_PORT: u16 = 51821;
/// A session older than this is expired in WireGuard (REJECT_AFTER_TIME).
const SESSION_LIFETIME: Duration = Duration::from_secs(180);
/// Handshake messages per second the node takes before it asks senders for a cookie (what
/// boringtun's own device uses).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Guard(#[from] guard::GuardError),
    #[error("cannot create TUN device `{name}`: {cause}\n  fix: {hint}")]
    Tun {
        name: String,
        cause: std::io::Error,
        hint: String,
    },
    #[error("cannot open the WireGuard UDP socket on port {port}: {cause}\n  fix: {hint}")]
    Udp {
        port: u16,
        cause: std::io::Error,
        hint: String,
    },
    #[error("cannot start the data-plane thread: {cause}\n  fix: the system is out of threads or file descriptors; raise the limits (ulimit -u / -n)")]
    Thread { cause: std::io::Error },
    #[error("cannot open the probe socket on {addr}: {cause}\n  fix: another program holds the probe port {PROBE_PORT} on the overlay address")]
    Probe {
        addr: SocketAddr,
        cause: std::io::Error,
    },
}

fn tun_hint(e: &std::io::Error, name: &str) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "creating a TUN device needs CAP_NET_ADMIN: run `myelin up` as root (or give the binary `setcap cap_net_admin+ep`)".into()
        }
        Some(libc::ENOENT) | Some(libc::ENODEV) => {
            "/dev/net/tun is missing: load the module (`modprobe tun`) or, in a container, pass --device /dev/net/tun".into()
        }
        Some(libc::EBUSY) | Some(libc::EEXIST) => {
            format!("an interface called `{name}` exists already: stop the other node or set [node].interface")
        }
        _ => "check that this kernel supports TUN devices and that [node].interface and [node].address are valid".into(),
    }
}

/// One configured peer and its live state.
pub struct Peer {
    pub name: String,
    pub public_key: String,
    pub public_key_bytes: [u8; 32],
    pub allowed_ips: Vec<IpNet>,
    pub tunn: Mutex<Tunn>,
    pub endpoint: Mutex<Option<SocketAddr>>,
    pub endpoint_changes: AtomicU64,
    /// Packets between the TUN and this peer, counted by the data plane.
    pub rx_packets: AtomicU64,
    pub tx_packets: AtomicU64,
    /// The peer's own overlay address (its first host-length allowed IP), for probes.
    pub probe_addr: Option<IpAddr>,
}

impl Peer {
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint.lock().ok().and_then(|e| *e)
    }

    /// Roaming: an authenticated packet came from `from`.
    fn saw(&self, from: SocketAddr) {
        if let Ok(mut e) = self.endpoint.lock() {
            if *e != Some(from) {
                if e.is_some() {
                    tracing::info!(peer = %self.name, "endpoint moved to {from}");
                }
                *e = Some(from);
                self.endpoint_changes.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// State shared by the data-plane tasks.
pub(crate) struct DataPlaneShared {
    pub peers: Vec<Peer>,
    pub routes: RouteTable,
    pub static_private: x25519::StaticSecret,
    pub static_public: x25519::PublicKey,
    /// Non-blocking; the data-plane thread waits for it in epoll.
    pub udp: std::net::UdpSocket,
    pub udp_state: quinn_udp::UdpSocketState,
    pub udp_is_v6: bool,
    /// Non-blocking, like `udp`.
    pub tun: tun_rs::SyncDevice,
    pub offload: bool,
    pub mtu: usize,
    /// Set by `Tunnel::stop`; the data-plane thread ends at its next wake-up.
    pub stop: AtomicBool,
    /// Checks mac1 of every handshake message and, past its rate, asks for a cookie (mac2),
    /// before any Diffie-Hellman work is spent on the datagram.
    pub handshakes: Arc<RateLimiter>,
}

impl DataPlaneShared {
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// The data-plane thread and the eventfd that gets it out of its epoll wait.
struct DataPlaneThread {
    stop: std::os::fd::OwnedFd,
    thread: std::thread::JoinHandle<()>,
}

/// A running tunnel; dropping it does not stop it, `stop` does.
pub struct Tunnel {
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    shared: Arc<DataPlaneShared>,
    dataplane: DataPlaneThread,
    guard: Option<guard::OverlayGuard>,
    pub interface: String,
    pub offload: bool,
}

fn build_tun(config: &Config, offload: bool) -> std::io::Result<tun_rs::SyncDevice> {
    let mut builder = tun_rs::DeviceBuilder::new()
        .name(config.node.interface.clone())
        .mtu(config.node.mtu)
        .offload(offload);
    let mut v4 = config.node.address.iter().filter_map(|a| match a {
        IpNet::V4(n) => Some(*n),
        IpNet::V6(_) => None,
    });
    if let Some(first) = v4.next() {
        builder = builder.ipv4(first.addr(), first.prefix_len(), None);
    }
    for a in &config.node.address {
        if let IpNet::V6(n) = a {
            builder = builder.ipv6(n.addr(), n.prefix_len());
        }
    }
    let dev = builder.build_sync()?;
    for extra in v4 {
        dev.add_address_v4(extra.addr(), extra.prefix_len())?;
    }
    dev.set_nonblocking(true)?;
    Ok(dev)
}

fn bind_udp(port: u16) -> Result<(std::net::UdpSocket, bool), TunnelError> {
    let err = |cause: std::io::Error| {
        let hint = match cause.raw_os_error() {
            Some(libc::EADDRINUSE) => format!(
                "port {port} is in use (another node or WireGuard?): stop it or set [node].listen_port"
            ),
            Some(libc::EACCES) => "binding this port needs privileges: use a port above 1023".into(),
            _ => "check [node].listen_port".into(),
        };
        TunnelError::Udp { port, cause, hint }
    };
    let v6 = (|| {
        let s = socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        s.set_only_v6(false)?;
        s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
        Ok::<_, std::io::Error>(s)
    })();
    let (socket, is_v6) = match v6 {
        Ok(s) => (s, true),
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => return Err(err(e)),
        Err(_) => {
            // No IPv6 in this kernel or namespace: IPv4 only.
            let s = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::DGRAM,
                Some(socket2::Protocol::UDP),
            )
            .map_err(err)?;
            s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
                .map_err(err)?;
            (s, false)
        }
    };
    for size in [8 << 20, 4 << 20, 1 << 20] {
        if socket.set_send_buffer_size(size).is_ok() && socket.set_recv_buffer_size(size).is_ok() {
            break;
        }
    }
    socket.set_nonblocking(true).map_err(err)?;
    Ok((socket.into(), is_v6))
}

impl Tunnel {
    /// Creates the TUN device and sockets and starts the data plane.
    pub async fn start(
        config: &Config,
        key: &PrivateKey,
        mesh_tx: watch::Sender<MeshView>,
    ) -> Result<Tunnel, TunnelError> {
        let name = config.node.interface.clone();
        let (tun, offload) = match build_tun(config, true) {
            Ok(dev) => (dev, true),
            Err(first) => {
                tracing::debug!("TUN offload unavailable ({first}); trying without");
                match build_tun(config, false) {
                    Ok(dev) => {
                        tracing::warn!("TUN offload (virtio-net header) unavailable here: {first}; running without it, slower");
                        (dev, false)
                    }
                    Err(cause) => {
                        let hint = tun_hint(&cause, &name);
                        return Err(TunnelError::Tun { name, cause, hint });
                    }
                }
            }
        };
        let (udp, udp_is_v6) = bind_udp(config.node.listen_port)?;
        let udp_state =
            quinn_udp::UdpSocketState::new((&udp).into()).map_err(|cause| TunnelError::Udp {
                port: config.node.listen_port,
                cause,
                hint: "the UDP socket could not be set up for batched I/O".into(),
            })?;
        let static_private = key.secret().clone();
        let static_public = x25519::PublicKey::from(&static_private);
        let handshakes = Arc::new(RateLimiter::new(&static_public, HANDSHAKE_RATE_LIMIT));
        let mut peers = Vec::new();
        for (i, p) in config.peers.iter().enumerate() {
            let tunn = Tunn::new(
                static_private.clone(),
                x25519::PublicKey::from(p.public_key.0),
                None,
                p.persistent_keepalive.filter(|k| *k > 0),
                // boringtun shifts this left by 8 for its session counter; `receiver_idx >> 8`
                // gives the peer's position back.
                i as u32,
                // Its own limiter too (10 handshakes a second for this peer), behind the
                // node-wide one that checks every datagram first.
                None,
            );
            let probe_addr = p.allowed_ips.iter().find_map(|n| match n {
                IpNet::V4(v) if v.prefix_len() == 32 => Some(IpAddr::V4(v.addr())),
                IpNet::V6(v) if v.prefix_len() == 128 => Some(IpAddr::V6(v.addr())),
                _ => None,
            });
            peers.push(Peer {
                name: p.name.to_string(),
                public_key: p.public_key.to_string(),
                public_key_bytes: p.public_key.0,
                allowed_ips: p.allowed_ips.clone(),
                tunn: Mutex::new(tunn),
                endpoint: Mutex::new(p.endpoint),
                endpoint_changes: AtomicU64::new(0),
                rx_packets: AtomicU64::new(0),
                tx_packets: AtomicU64::new(0),
                probe_addr,
            });
        }
        let routes = RouteTable::new(
            peers
                .iter()
                .enumerate()
                .flat_map(|(i, p)| p.allowed_ips.iter().map(move |n| (n, i))),
        );
        let probe_socket = match config
            .node
            .address
            .iter()
            .find(|a| a.addr().is_ipv4())
            .or(config.node.address.first())
        {
            None => None,
            Some(a) => {
                let addr = SocketAddr::new(a.addr(), PROBE_PORT);
                let socket = tokio::net::UdpSocket::bind(addr)
                    .await
                    .map_err(|cause| TunnelError::Probe { addr, cause })?;
                // Only what came through the tunnel: a datagram for the overlay address that
                // arrives on another interface (a spoofed pong from the LAN) is not delivered.
                socket
                    .bind_device(Some(name.as_bytes()))
                    .map_err(|cause| TunnelError::Probe { addr, cause })?;
                Some(socket)
            }
        };
        let guard = if !config.node.overlay_guard {
            tracing::warn!("[node].overlay_guard = false: services bound to the overlay address are reachable from the physical network");
            None
        } else if config.node.address.is_empty() {
            None
        } else {
            Some(guard::OverlayGuard::install(&name, &config.node.address)?)
        };
        let shared = Arc::new(DataPlaneShared {
            peers,
            routes,
            static_private,
            static_public,
            udp,
            udp_state,
            udp_is_v6,
            tun,
            offload,
            mtu: usize::from(config.node.mtu),
            stop: AtomicBool::new(false),
            handshakes,
        });
        let dataplane = spawn_dataplane(&shared).map_err(|cause| TunnelError::Thread { cause })?;
        let cancel = CancellationToken::new();
        let interval = Duration::from_millis(config.probe.interval_ms);
        let tasks = vec![spawn_until(
            cancel.clone(),
            control(shared.clone(), probe_socket, interval, mesh_tx),
        )];
        tracing::info!(
            interface = %name,
            port = config.node.listen_port,
            offload,
            "tunnel up"
        );
        Ok(Tunnel {
            cancel,
            tasks,
            shared,
            dataplane,
            guard,
            interface: name,
            offload,
        })
    }

    /// Stops the data plane; the TUN device goes away with the last task.
    pub async fn stop(self) {
        self.cancel.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        let (shared, dataplane) = (self.shared, self.dataplane);
        let _ = tokio::task::spawn_blocking(move || stop_dataplane(&shared, dataplane)).await;
        if let Some(guard) = self.guard {
            let _ = tokio::task::spawn_blocking(move || guard.remove()).await;
        }
    }
}

/// Starts the data-plane thread, sleeping in its own epoll on the TUN and the UDP socket.
fn spawn_dataplane(shared: &Arc<DataPlaneShared>) -> std::io::Result<DataPlaneThread> {
    let poller = dataplane::Poller::new(shared)?;
    let stop = poller.stopper()?;
    let shared = shared.clone();
    let thread = std::thread::Builder::new()
        .name("myelin-dataplane".into())
        .spawn(move || dataplane::run(shared, poller))?;
    Ok(DataPlaneThread { stop, thread })
}

fn stop_dataplane(shared: &DataPlaneShared, dataplane: DataPlaneThread) {
    shared.stop.store(true, Ordering::Relaxed);
    if let Err(e) = dataplane::wake(&dataplane.stop) {
        tracing::warn!("cannot wake the data-plane thread to stop it: {e}");
    }
    let _ = dataplane.thread.join();
}

fn spawn_until(
    cancel: CancellationToken,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = task => {}
        }
    })
}

fn peer_view(
    peer: &Peer,
    probe: ProbeStats,
    recent_probes: Vec<myelin_sdk::ProbeSample>,
) -> PeerView {
    let (handshake, tx, rx, _, _) = peer
        .tunn
        .lock()
        .map(|t| t.stats())
        .unwrap_or((None, 0, 0, 0.0, None));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    PeerView {
        name: peer.name.clone(),
        public_key: peer.public_key.clone(),
        overlay_ips: peer.allowed_ips.clone(),
        endpoint: peer.endpoint(),
        last_handshake_age_ms: handshake.map(|d| d.as_millis() as u64),
        rtt_ms: probe.rtt.map(ms),
        jitter_ms: probe.jitter.map(ms),
        loss: probe.loss,
        last_seen_ms: probe.last_seen.map(|d| d.as_millis() as u64),
        rx_bytes: rx as u64,
        tx_bytes: tx as u64,
        rx_packets: peer.rx_packets.load(Ordering::Relaxed),
        tx_packets: peer.tx_packets.load(Ordering::Relaxed),
        up: handshake.is_some_and(|d| d < SESSION_LIFETIME),
        recent_probes,
    }
}

fn record_metrics(view: &PeerView, endpoint_changes: u64) {
    let peer = view.name.clone();
    metrics::counter!("myelin_peer_rx_bytes_total", "peer" => peer.clone()).absolute(view.rx_bytes);
    metrics::counter!("myelin_peer_tx_bytes_total", "peer" => peer.clone()).absolute(view.tx_bytes);
    metrics::counter!("myelin_peer_rx_packets_total", "peer" => peer.clone())
        .absolute(view.rx_packets);
    metrics::counter!("myelin_peer_tx_packets_total", "peer" => peer.clone())
        .absolute(view.tx_packets);
    metrics::counter!("myelin_peer_endpoint_changes_total", "peer" => peer.clone())
        .absolute(endpoint_changes);
    metrics::gauge!("myelin_peer_up", "peer" => peer.clone()).set(if view.up { 1.0 } else { 0.0 });
    if let Some(age) = view.last_handshake_age_ms {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        metrics::gauge!("myelin_peer_last_handshake_timestamp_seconds", "peer" => peer.clone())
            .set(now - age as f64 / 1000.0);
    }
    if let Some(loss) = view.loss {
        metrics::gauge!("myelin_peer_loss_ratio", "peer" => peer).set(loss);
    }
}

/// Probes per peer listed in the `MeshView` (a second's worth at the default interval).
const RECENT_PROBES: usize = 10;
/// The shortest time between two `MeshView`s published because probe answers arrived.
const ANSWER_PUBLISH_GAP: Duration = Duration::from_millis(5);
/// How long a probe answer waits for the answers of the other peers probed at the same moment,
/// so one view carries them all (far below any latency limit a plugin judges).
const ANSWER_BATCH: Duration = Duration::from_millis(2);
/// The shortest time between two updates of the per-peer gauges.
const METRICS_GAP: Duration = Duration::from_millis(250);

/// Probes every peer each interval, answers their probes, and publishes the `MeshView`.
async fn control(
    shared: Arc<DataPlaneShared>,
    probe_socket: Option<tokio::net::UdpSocket>,
    interval: Duration,
    mesh_tx: watch::Sender<MeshView>,
) {
    let session = getrandom::u64().unwrap_or_else(|e| {
        tracing::warn!("no OS randomness for the probe nonce ({e}); using the clock");
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id())
    });
    let mut prober = Prober::new(shared.peers.len(), interval, Instant::now(), session);
    // Without answers (no peers up, plain WireGuard peers) the view is still refreshed, so
    // ages move on and a silent peer shows.
    let refresh = interval.max(Duration::from_millis(100));
    let mut buf = [0u8; 64];
    let mut answered = vec![0u64; shared.peers.len()];
    // Looked up once: a registry lookup per answer was most of the loop's idle cost.
    let rtt_histograms: Vec<metrics::Histogram> = shared
        .peers
        .iter()
        .map(|p| metrics::histogram!("myelin_peer_rtt_seconds", "peer" => p.name.clone()))
        .collect();
    // A probe answer is published at once (at most every ANSWER_PUBLISH_GAP), so plugins that
    // judge the link probe by probe (safety) never act on a view that misses an answer.
    let mut publish_soon: Option<tokio::time::Instant> = None;
    let mut last_publish = tokio::time::Instant::now();
    let mut last_metrics = last_publish
        .checked_sub(METRICS_GAP)
        .unwrap_or(last_publish);
    loop {
        let wake = prober
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + interval);
        let soon = publish_soon.unwrap_or_else(|| tokio::time::Instant::now() + interval * 10);
        let publish_now = tokio::select! {
            _ = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                while let Some((idx, ping)) = prober.poll_transmit(now) {
                    let (Some(sock), Some(to)) = (&probe_socket, shared.peers[idx].probe_addr) else { continue };
                    let _ = sock.try_send_to(&ping, SocketAddr::new(to, PROBE_PORT));
                }
                false
            }
            received = async {
                match &probe_socket {
                    Some(s) => s.recv_from(&mut buf).await,
                    None => std::future::pending().await,
                }
            } => {
                let Ok((n, from)) = received else { continue };
                let Some(idx) = shared.routes.lookup(from.ip()) else { continue };
                let now = Instant::now();
                if let Some(pong) = prober.handle_input(idx, &buf[..n.min(PROBE_LEN + 1)], now) {
                    if let Some(sock) = &probe_socket {
                        let _ = sock.try_send_to(&pong, from);
                    }
                }
                let (count, rtt) = prober.answered(idx);
                if count > answered[idx] {
                    answered[idx] = count;
                    if let (Some(rtt), Some(histogram)) = (rtt, rtt_histograms.get(idx)) {
                        histogram.record(rtt.as_secs_f64());
                    }
                    if publish_soon.is_none() {
                        publish_soon = Some((last_publish + ANSWER_PUBLISH_GAP).max(tokio::time::Instant::now() + ANSWER_BATCH));
                    }
                }
                false
            }
            _ = tokio::time::sleep_until(soon), if publish_soon.is_some() => true,
            _ = tokio::time::sleep_until(last_publish + refresh), if publish_soon.is_none() => true,
        };
        if publish_now {
            publish_soon = None;
            last_publish = tokio::time::Instant::now();
            // The gauges follow at most four times a second; scrapes are seconds apart.
            let record = last_metrics.elapsed() >= METRICS_GAP;
            if record {
                last_metrics = last_publish;
            }
            let now = Instant::now();
            let view = MeshView {
                peers: shared
                    .peers
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let v = peer_view(
                            p,
                            prober.stats(i, now),
                            prober.recent(i, now, RECENT_PROBES),
                        );
                        if record {
                            record_metrics(&v, p.endpoint_changes.load(Ordering::Relaxed));
                        }
                        v
                    })
                    .collect(),
            };
            // An unchanged view (no peers, nothing probed) wakes nobody.
            mesh_tx.send_if_modified(|current| {
                let changed = *current != view;
                if changed {
                    *current = view;
                }
                changed
            });
        }
    }
}
