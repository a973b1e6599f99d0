//! The data plane I/O shell: the TUN device, the WireGuard UDP socket, one boringtun `Tunn` per
//! peer, allowed-IPs routing, timers, and the probe socket. Protocol logic lives in boringtun
//! and in `crate::mesh`; this module only moves bytes and publishes the `MeshView`.

mod dataplane;
pub mod guard;
pub mod peers;
pub mod routes;

use crate::config::Config;
use crate::keys::PrivateKey;
use crate::mesh::probe::{ProbeStats, Prober, PROBE_LEN};
use arc_swap::ArcSwap;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519;
use ipnet::IpNet;
use myelin_sdk::{CancellationToken, MeshView, PeerView};
pub use peers::{Peer, PeerChangeError, PeerSpec, PeerTable};
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
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
    Peer(#[from] PeerChangeError),
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

/// State shared by the data-plane tasks.
pub(crate) struct DataPlaneShared {
    /// Loaded per packet batch; replaced whole on every change.
    pub table: ArcSwap<PeerTable>,
    /// Serialises changes to `table`, so two changes never race and lose one.
    table_writer: Mutex<()>,
    /// Wakes the control task when the peers change.
    pub table_changed: tokio::sync::Notify,
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
    /// This node's first IPv4 overlay address: the source of its mesh control messages.
    pub overlay_v4: Option<std::net::Ipv4Addr>,
    /// Set once a mesh controller runs.
    pub mesh: std::sync::OnceLock<MeshHook>,
}

/// Where the data plane hands mesh control messages, and whether a handshake from a key it
/// does not know makes a restricted peer (one that may send control messages only).
pub struct MeshHook {
    pub tx: tokio::sync::mpsc::Sender<ControlDatagram>,
    pub accept_unknown: bool,
}

/// A mesh control message as it came out of the tunnel: who sent it (a key WireGuard has
/// authenticated) and from where.
#[derive(Debug)]
pub struct ControlDatagram {
    pub from: [u8; 32],
    pub endpoint: Option<SocketAddr>,
    pub payload: Vec<u8>,
}

/// Restricted peers (handshake done, certificate not yet shown) a node keeps at most.
pub const MAX_RESTRICTED: usize = 256;

impl DataPlaneShared {
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn change(
        &self,
        f: impl FnOnce(&PeerTable) -> Result<Option<PeerTable>, PeerChangeError>,
    ) -> Result<bool, PeerChangeError> {
        let _writer = self.table_writer.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.table.load_full();
        match f(&current)? {
            Some(next) => {
                self.table.store(Arc::new(next));
                self.table_changed.notify_one();
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// Changes a running tunnel's peers (the control API, the mesh roster).
#[derive(Clone)]
pub struct PeerControl(Arc<DataPlaneShared>);

impl PeerControl {
    /// Adds a peer, or updates the peer with the same key, while traffic flows. Returns
    /// whether anything changed.
    pub fn upsert(&self, spec: PeerSpec) -> Result<bool, PeerChangeError> {
        let key = &self.0.static_private;
        self.0.change(|t| t.upsert(key, spec))
    }

    /// Removes a peer while traffic to the others flows.
    pub fn remove(&self, name: &str) -> Result<(), PeerChangeError> {
        self.0.change(|t| t.remove(name).map(Some)).map(|_| ())
    }

    /// The peers as they are now.
    pub fn table(&self) -> Arc<PeerTable> {
        self.0.table.load_full()
    }

    /// Routes mesh control messages to the returned receiver from now on (once per tunnel).
    pub fn attach_mesh(
        &self,
        accept_unknown: bool,
    ) -> Option<tokio::sync::mpsc::Receiver<ControlDatagram>> {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        self.0
            .mesh
            .set(MeshHook { tx, accept_unknown })
            .ok()
            .map(|()| rx)
    }

    /// Sends a mesh control message to the peer with key `to`, inside its tunnel (a handshake
    /// first, if there is no session). False when there is no such peer or no path.
    pub fn send_control(&self, to: &[u8; 32], payload: &[u8]) -> bool {
        let table = self.0.table.load();
        match table.by_key(to) {
            Some((_, peer)) => dataplane::send_control(&self.0, peer, payload),
            None => false,
        }
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
        let mut table = PeerTable::default();
        for p in &config.peers {
            let spec = PeerSpec {
                name: p.name.to_string(),
                public_key: p.public_key.0,
                allowed_ips: p.allowed_ips.clone(),
                endpoint: p.endpoint,
                persistent_keepalive: p.persistent_keepalive,
                probe_interval: None,
            };
            if let Some(next) = table.upsert(&static_private, spec)? {
                table = next;
            }
        }
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
            table: ArcSwap::from_pointee(table),
            table_writer: Mutex::new(()),
            table_changed: tokio::sync::Notify::new(),
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
            overlay_v4: config.node.address.iter().find_map(|a| match a {
                IpNet::V4(v) => Some(v.addr()),
                IpNet::V6(_) => None,
            }),
            mesh: std::sync::OnceLock::new(),
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

    /// A handle that changes this tunnel's peers while it runs.
    pub fn peer_control(&self) -> PeerControl {
        PeerControl(self.shared.clone())
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

/// What the control task keeps per slot, following the peer table.
#[derive(Default)]
struct ControlSlots {
    /// The peer each slot held when last looked at, to tell a new peer from the same one.
    peers: Vec<Option<Arc<Peer>>>,
    answered: Vec<u64>,
    /// Looked up once per peer: a registry lookup per answer was most of the loop's idle cost.
    rtt_histograms: Vec<Option<metrics::Histogram>>,
}

impl ControlSlots {
    /// Loads the current table and starts or stops probing the slots that changed.
    fn follow(
        &mut self,
        table: &mut Arc<PeerTable>,
        shared: &DataPlaneShared,
        prober: &mut Prober,
    ) {
        *table = shared.table.load_full();
        let n = table.slot_count().max(self.peers.len());
        self.peers.resize(n, None);
        self.answered.resize(n, 0);
        self.rtt_histograms.resize(n, None);
        let now = Instant::now();
        for slot in 0..n {
            let current = table.get(slot);
            let same = match (current, self.peers.get(slot).and_then(Option::as_ref)) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if same {
                continue;
            }
            self.answered[slot] = 0;
            match current {
                Some(p) => {
                    prober.track(slot, now, p.spec.probe_interval);
                    self.rtt_histograms[slot] = Some(
                        metrics::histogram!("myelin_peer_rtt_seconds", "peer" => p.name.clone()),
                    );
                }
                None => {
                    prober.untrack(slot);
                    self.rtt_histograms[slot] = None;
                }
            }
            self.peers[slot] = current.cloned();
        }
    }

    /// Whether `count` answers for `slot` is more than last seen (and remembers it).
    fn newly_answered(&mut self, slot: usize, count: u64) -> bool {
        match self.answered.get_mut(slot) {
            Some(seen) if count > *seen => {
                *seen = count;
                true
            }
            _ => false,
        }
    }

    fn rtt_histogram(&self, slot: usize) -> Option<&metrics::Histogram> {
        self.rtt_histograms.get(slot)?.as_ref()
    }
}

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
    let mut prober = Prober::new(0, interval, Instant::now(), session);
    // Without answers (no peers up, plain WireGuard peers) the view is still refreshed, so
    // ages move on and a silent peer shows.
    let refresh = interval.max(Duration::from_millis(100));
    let mut buf = [0u8; 64];
    let mut table: Arc<PeerTable> = Arc::new(PeerTable::default());
    let mut slots = ControlSlots::default();
    slots.follow(&mut table, &shared, &mut prober);
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
            _ = shared.table_changed.notified() => {
                slots.follow(&mut table, &shared, &mut prober);
                true
            }
            _ = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                while let Some((idx, ping)) = prober.poll_transmit(now) {
                    let (Some(sock), Some(to)) = (&probe_socket, table.get(idx).and_then(|p| p.probe_addr)) else { continue };
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
                let Some(idx) = table.route(from.ip()) else { continue };
                let now = Instant::now();
                if let Some(pong) = prober.handle_input(idx, &buf[..n.min(PROBE_LEN + 1)], now) {
                    if let Some(sock) = &probe_socket {
                        let _ = sock.try_send_to(&pong, from);
                    }
                }
                let (count, rtt) = prober.answered(idx);
                if slots.newly_answered(idx, count) {
                    if let (Some(rtt), Some(histogram)) = (rtt, slots.rtt_histogram(idx)) {
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
                // Restricted peers (certificate not yet shown) are nobody's business yet.
                peers: table
                    .iter()
                    .filter(|(_, p)| !p.allowed_ips.is_empty())
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
