//! The tunnel: the TUN device, the WireGuard UDP socket, one boringtun `Tunn` per peer, and
//! the probe socket. The packet path's decisions (which peer, allowed IPs, endpoints, paths,
//! relays, timers) are the sans-IO packet engine (`engine`), driven by the data-plane
//! thread (`dataplane`) in a node and by an in-memory network in tests (`sim`). Protocol
//! logic beyond the packet path lives in boringtun and in `crate::mesh`.

pub mod batch;
mod dataplane;
mod engine;
pub mod guard;
pub mod lanes;
pub mod manyports;
pub mod mroute;
pub mod multicast;
pub mod netwatch;
pub mod path;
pub mod peers;
pub mod relay;
pub mod routes;
#[cfg(test)]
mod sim;

use crate::config::Config;
use crate::keys::PrivateKey;
use arc_swap::ArcSwap;
use ipnet::IpNet;
pub use peers::{Peer, PeerChangeError, PeerSpec, PeerTable};
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// UDP port of the probe responder on every node's overlay address.
pub const PROBE_PORT: u16 = 51821;
/// A session older than this is expired in WireGuard (REJECT_AFTER_TIME).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(180);

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Peer(#[from] PeerChangeError),
    #[error(transparent)]
    Guard(#[from] guard::GuardError),
    #[error(transparent)]
    MulticastRoute(#[from] mroute::RouteError),
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
    #[error("[firewall]: {0}")]
    Firewall(crate::policy::firewall::RuleError),
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

/// State shared by the data-plane tasks: the packet engine, and the I/O it runs on.
pub(crate) struct DataPlaneShared {
    pub engine: engine::Engine,
    /// Non-blocking; the data-plane thread waits for it in epoll.
    pub udp: std::net::UdpSocket,
    pub udp_state: quinn_udp::UdpSocketState,
    /// Non-blocking, like `udp`.
    pub tun: tun_rs::SyncDevice,
    pub offload: bool,
    pub mtu: usize,
    /// Set by `Tunnel::stop`; the data-plane thread ends at its next wake-up.
    pub stop: AtomicBool,
    /// Counts changes of this node's own addresses and routes (roams) it told its peers of.
    pub roams: tokio::sync::watch::Sender<u64>,
    /// Destinations reached from a socket a many-port try found, not the WireGuard socket
    /// (`aux_any`: the list is not empty; read per datagram sent).
    pub aux_routes: ArcSwap<Vec<(SocketAddr, Arc<dataplane::AuxIo>)>>,
    pub aux_any: AtomicBool,
}

impl std::ops::Deref for DataPlaneShared {
    type Target = engine::Engine;

    fn deref(&self) -> &engine::Engine {
        &self.engine
    }
}

/// Where the data plane hands mesh control messages, and whether a handshake from a key it
/// does not know makes a restricted peer (one that may send control messages only).
pub struct MeshHook {
    pub tx: tokio::sync::mpsc::Sender<ControlDatagram>,
    /// Destinations of packets from the TUN that no peer routes (full: dropped, it is a hint).
    pub misses: tokio::sync::mpsc::Sender<std::net::IpAddr>,
    pub accept_unknown: bool,
}

/// What the mesh controller receives from the data plane.
pub struct MeshReceivers {
    pub control: tokio::sync::mpsc::Receiver<ControlDatagram>,
    pub misses: tokio::sync::mpsc::Receiver<std::net::IpAddr>,
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

    /// Waits until the peer table changes (a peer added, updated or removed).
    pub async fn changed(&self) {
        self.0.table_changed.notified().await
    }

    /// The peers as they are now.
    pub fn table(&self) -> Arc<PeerTable> {
        self.0.table.load_full()
    }

    /// Routes mesh control messages, and the overlay addresses packets found no peer for, to
    /// the returned receivers from now on (once per tunnel).
    pub fn attach_mesh(&self, accept_unknown: bool) -> Option<MeshReceivers> {
        let (tx, control) = tokio::sync::mpsc::channel(1024);
        let (misses_tx, misses) = tokio::sync::mpsc::channel(64);
        self.0
            .mesh
            .set(MeshHook {
                tx,
                misses: misses_tx,
                accept_unknown,
            })
            .ok()
            .map(|()| MeshReceivers { control, misses })
    }

    /// The firewall's rules, tracked flows and drops by cause; `None` without `[firewall]`.
    pub fn firewall_status(&self) -> Option<serde_json::Value> {
        let state = self.0.firewall.as_ref()?.lock().ok()?;
        Some(serde_json::json!({
            "rules": **state.firewall.rules(),
            "flows": state.firewall.flows(),
            "drops": state.drops,
        }))
    }

    /// Replaces the firewall's rules; established flows stay. False without `[firewall]` at
    /// start (turning it on needs a restart: the data plane was built without it).
    pub fn set_firewall_rules(&self, rules: crate::policy::firewall::RuleSet) -> bool {
        match self.0.firewall.as_ref().map(|f| f.lock()) {
            Some(Ok(mut state)) => {
                state.firewall.set_rules(Arc::new(rules), self.0.instant());
                true
            }
            _ => false,
        }
    }

    /// Starts a fresh handshake with the peer with key `to` (its side lost the session).
    pub fn rehandshake(&self, to: &[u8; 32]) -> bool {
        let table = self.0.table.load();
        match table.by_key(to) {
            Some((slot, peer)) => engine::rehandshake(&*self.0, slot, peer),
            None => false,
        }
    }

    /// Tells every peer where this node is now: an authenticated keepalive from the current
    /// address (a handshake where there is no session) moves the peer's endpoint at once.
    /// Returns how many peers were told.
    pub fn announce_all(&self) -> usize {
        let table = self.0.table.load();
        table
            .iter()
            .filter(|(_, peer)| engine::announce(&*self.0, peer))
            .count()
    }

    /// A receiver that changes whenever this node roamed (its addresses or routes changed).
    pub fn roams(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.roams.subscribe()
    }

    /// What this node does in many-port tries from now on (it follows its NAT's kind).
    pub fn set_many_ports(&self, role: manyports::Role) {
        self.0
            .many_ports
            .store(role.as_u8(), std::sync::atomic::Ordering::Relaxed);
    }

    /// The relays this node may use from now on, in order of preference.
    pub fn set_relays(&self, relays: Vec<[u8; 32]>) {
        if **self.0.relays.load() != relays {
            self.0.relays.store(Arc::new(relays));
        }
    }

    /// Sends a mesh control message to the peer with key `to`, inside its tunnel (a handshake
    /// first, if there is no session). False when there is no such peer or no path.
    pub fn send_control(&self, to: &[u8; 32], payload: &[u8]) -> bool {
        let table = self.0.table.load();
        match table.by_key(to) {
            Some((_, peer)) => engine::send_control(&*self.0, peer, payload),
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
    /// The overlay probe socket, bound to the TUN device, for the mesh view to take.
    pub probe_socket: Option<tokio::net::UdpSocket>,
    shared: Arc<DataPlaneShared>,
    dataplane: DataPlaneThread,
    guard: Option<guard::OverlayGuard>,
    multicast_routes: Option<mroute::MulticastRoutes>,
    /// Stops the address watch (`netwatch`).
    watch_cancel: tokio_util::sync::CancellationToken,
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
    without_link_local(&config.node.interface);
    Ok(dev)
}

/// Takes the kernel's IPv6 link-local address off the TUN, and keeps it off, as a WireGuard
/// interface has none: every IPv6 packet the node sends then has an overlay source, the only
/// kind a peer's allowed IPs accept (link-scope multicast, ff02::, included). Without IPv6 in
/// the kernel there is nothing to take.
fn without_link_local(interface: &str) {
    let mode = format!("/proc/sys/net/ipv6/conf/{interface}/addr_gen_mode");
    if std::fs::write(&mode, "1").is_err() {
        return;
    }
    match std::process::Command::new("ip")
        .args(["-6", "addr", "flush", "dev", interface, "scope", "link"])
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => tracing::debug!(
            "removing {interface}'s link-local address: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => tracing::debug!("removing {interface}'s link-local address: {e}"),
    }
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

/// Lets the kernel fragment datagrams larger than the path MTU instead of refusing them: a
/// relayed datagram is a full-size WireGuard datagram inside a second tunnel, 80 bytes over a
/// 1 500-byte underlay. quinn-udp sets "don't fragment, ever"; "want" keeps the flag on
/// everything that fits (which goes out exactly as before) and fragments the rest.
fn may_fragment(udp: &std::net::UdpSocket, is_v6: bool) {
    use std::os::fd::AsRawFd;
    let mode = libc::IP_PMTUDISC_WANT;
    let set = |level, name| {
        // SAFETY: setsockopt on a socket this function borrows, with a c_int that lives
        // across the call and its exact size.
        unsafe {
            libc::setsockopt(
                udp.as_raw_fd(),
                level,
                name,
                (&mode as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    let mut failed = set(libc::IPPROTO_IP, libc::IP_MTU_DISCOVER) != 0;
    if is_v6 {
        failed |= set(libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER) != 0;
    }
    if failed {
        tracing::warn!(
            "cannot allow fragmentation on the WireGuard socket ({}): relayed full-size packets will be dropped",
            std::io::Error::last_os_error()
        );
    }
}

impl Tunnel {
    /// Creates the TUN device and sockets and starts the data plane.
    pub async fn start(config: &Config, key: &PrivateKey) -> Result<Tunnel, TunnelError> {
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
        may_fragment(&udp, udp_is_v6);
        let static_private = key.secret().clone();
        let mut table = PeerTable::default();
        for p in &config.peers {
            let spec = PeerSpec {
                name: p.name.to_string(),
                public_key: p.public_key.0,
                allowed_ips: p.allowed_ips.clone(),
                endpoint: p.endpoint,
                persistent_keepalive: p.persistent_keepalive,
                probe_interval: None,
                idles: false,
                groups: Vec::new(),
                multicast: p.multicast.clone(),
                certified: false,
                behind_nat: false,
                candidates: Vec::new(),
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
        let firewall = match &config.firewall {
            None => None,
            Some(section) => {
                let rules = section.rule_set().map_err(TunnelError::Firewall)?;
                tracing::info!(
                    inbound = rules.inbound.len(),
                    outbound = rules.outbound.len(),
                    default_inbound = if rules.default_inbound_allow {
                        "allow"
                    } else {
                        "deny"
                    },
                    "firewall on"
                );
                Some(Mutex::new(engine::FirewallState::new(rules)))
            }
        };
        let mut engine = engine::Engine::new(
            static_private,
            table,
            udp_is_v6,
            config.node.address.iter().find_map(|a| match a {
                IpNet::V4(v) => Some(v.addr()),
                IpNet::V6(_) => None,
            }),
            std::time::Duration::from_millis(config.probe.interval_ms),
        );
        engine.firewall = firewall;
        engine.multicast = config.multicast.as_ref().map(|m| {
            Mutex::new(multicast::Replicator::new(
                m.policy(),
                std::time::Instant::now(),
            ))
        });
        engine.relay = config
            .relay
            .enabled(config)
            .then(|| Mutex::new(relay::Relay::new(config.relay.member_kbit_per_s)));
        let shared = Arc::new(DataPlaneShared {
            engine,
            udp,
            udp_state,
            tun,
            offload,
            mtu: usize::from(config.node.mtu),
            stop: AtomicBool::new(false),
            roams: tokio::sync::watch::Sender::new(0),
            aux_routes: ArcSwap::from_pointee(Vec::new()),
            aux_any: AtomicBool::new(false),
        });
        let dataplane = spawn_dataplane(&shared).map_err(|cause| TunnelError::Thread { cause })?;
        let multicast_routes = match &config.multicast {
            None => None,
            Some(m) => match mroute::MulticastRoutes::install(&name, &m.groups) {
                Ok(r) => Some(r),
                Err(e) => {
                    stop_dataplane(&shared, dataplane);
                    if let Some(g) = guard {
                        g.remove();
                    }
                    return Err(e.into());
                }
            },
        };
        let watch_cancel = tokio_util::sync::CancellationToken::new();
        let control = PeerControl(shared.clone());
        let announce = move || {
            let told = control.announce_all();
            control.0.roams.send_modify(|n| *n += 1);
            metrics::counter!("myelin_roams_total").increment(1);
            tracing::info!(
                peers = told,
                "this node's addresses or routes changed: peers told at once"
            );
        };
        match netwatch::interface_index(&name)
            .ok_or_else(|| {
                netwatch::WatchError::Socket(std::io::Error::other(format!(
                    "the TUN device {name} has no interface index"
                )))
            })
            .and_then(|tun| netwatch::spawn(tun, announce, watch_cancel.clone()))
        {
            Ok(_) => {}
            Err(e) => tracing::warn!("{e}"),
        }
        tracing::info!(
            interface = %name,
            port = config.node.listen_port,
            offload,
            "tunnel up"
        );
        Ok(Tunnel {
            probe_socket,
            shared,
            dataplane,
            guard,
            multicast_routes,
            watch_cancel,
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
        self.watch_cancel.cancel();
        let (shared, dataplane) = (self.shared, self.dataplane);
        let _ = tokio::task::spawn_blocking(move || stop_dataplane(&shared, dataplane)).await;
        if let Some(guard) = self.guard {
            let _ = tokio::task::spawn_blocking(move || guard.remove()).await;
        }
        if let Some(routes) = self.multicast_routes {
            let _ = tokio::task::spawn_blocking(move || routes.remove()).await;
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
