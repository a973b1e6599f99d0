//! The peer table the data plane serves: each peer's `Tunn`, endpoint and counters, and the
//! allowed-IPs routes. The table is replaced whole on every change (readers load a snapshot
//! and never wait), so adding or removing a peer never stops traffic to the others.

use super::routes::RouteTable;
use boringtun::noise::Tunn;
use boringtun::x25519;
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Slots are the upper 24 bits of boringtun's receiver index; far more than any fleet.
pub const MAX_PEERS: usize = 1 << 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerChangeError {
    #[error("peer `{name}`: allowed IP {net} already routes to peer `{other}`\n  fix: give each peer its own addresses, or remove `{other}` first")]
    Overlap {
        name: String,
        net: IpNet,
        other: String,
    },
    #[error("peer name `{name}` is taken by another key ({other_key})\n  fix: choose another name, or remove that peer first")]
    NameTaken { name: String, other_key: String },
    #[error("no peer named `{0}`")]
    Unknown(String),
    #[error("the peer table is full ({MAX_PEERS} peers)")]
    Full,
}

/// What a peer is: from the config, the roster, or the control API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    pub name: String,
    pub public_key: [u8; 32],
    pub allowed_ips: Vec<IpNet>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    /// Probe this peer less often than `[probe].interval_ms` (a lighthouse: its RTT guards
    /// nothing, and every probe costs both ends a wake-up).
    pub probe_interval: Option<std::time::Duration>,
    /// Probed at that cadence only while it carries traffic, and rarely otherwise (a member
    /// of this node's own group: their RTT guards nothing until they talk).
    pub idles: bool,
    /// The groups its certificate grants (mesh members); the firewall matches them. Static
    /// peers have none.
    pub groups: Vec<String>,
    /// Multicast groups it takes part in: from the roster (mesh members) or `[[peers]]`.
    pub multicast: Vec<std::net::IpAddr>,
    /// Its own addresses besides `endpoint` (a member's candidates from the roster: LAN,
    /// global IPv6), tried directly while it is relayed.
    pub candidates: Vec<SocketAddr>,
    /// A mesh member whose certificate was verified: only these may send through this node's
    /// relay, only these are relayed to, and only these are ever reached through a relay
    /// (a lighthouse is always reached directly).
    pub certified: bool,
    /// `endpoint` is where the lighthouses see the member and none of its own addresses: it
    /// sits behind a NAT, whose ports many-port probing may search (`manyports`).
    pub behind_nat: bool,
}

/// One peer and its live state.
pub struct Peer {
    pub spec: PeerSpec,
    pub name: String,
    pub public_key: String,
    pub public_key_bytes: [u8; 32],
    pub allowed_ips: Vec<IpNet>,
    /// Shared with the peer's next version when an update leaves key and keepalive alone, so
    /// the session survives it.
    pub tunn: Arc<Mutex<Tunn>>,
    /// When this peer (this version) was created: restricted peers expire by it.
    pub created: std::time::Instant,
    pub endpoint: Mutex<Option<SocketAddr>>,
    pub endpoint_changes: AtomicU64,
    /// The endpoint was set by an authenticated packet (not only by configuration or a roster).
    endpoint_proven: std::sync::atomic::AtomicBool,
    /// Packets between the TUN and this peer, counted by the data plane.
    pub rx_packets: AtomicU64,
    pub tx_packets: AtomicU64,
    /// The peer's own overlay address (its first host-length allowed IP), for probes.
    pub probe_addr: Option<IpAddr>,
    /// Direct or through a relay; shared with the peer's next version, like its session.
    pub path: Arc<super::path::PathLink>,
}

impl Peer {
    /// A WireGuard state machine for `spec` in table slot `slot`, with no session yet.
    pub fn fresh_tunn(static_private: &x25519::StaticSecret, spec: &PeerSpec, slot: usize) -> Tunn {
        Tunn::new(
            static_private.clone(),
            x25519::PublicKey::from(spec.public_key),
            None,
            spec.persistent_keepalive.filter(|k| *k > 0),
            // boringtun shifts this left by 8 for its session counter; `receiver_idx >> 8`
            // gives the slot back.
            slot as u32,
            // Its own limiter too (10 handshakes a second for this peer), behind the
            // node-wide one that checks every datagram first.
            None,
        )
    }

    pub fn new(static_private: &x25519::StaticSecret, spec: PeerSpec, slot: usize) -> Self {
        let tunn = Self::fresh_tunn(static_private, &spec, slot);
        let probe_addr = spec.allowed_ips.iter().find_map(|n| match n {
            IpNet::V4(v) if v.prefix_len() == 32 => Some(IpAddr::V4(v.addr())),
            IpNet::V6(v) if v.prefix_len() == 128 => Some(IpAddr::V6(v.addr())),
            _ => None,
        });
        Self {
            name: spec.name.clone(),
            public_key: crate::keys::PublicKey(spec.public_key).to_string(),
            public_key_bytes: spec.public_key,
            allowed_ips: spec.allowed_ips.clone(),
            tunn: Arc::new(Mutex::new(tunn)),
            created: std::time::Instant::now(),
            endpoint: Mutex::new(spec.endpoint),
            endpoint_changes: AtomicU64::new(0),
            endpoint_proven: std::sync::atomic::AtomicBool::new(false),
            rx_packets: AtomicU64::new(0),
            tx_packets: AtomicU64::new(0),
            probe_addr,
            path: Arc::default(),
            spec,
        }
    }

    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint.lock().ok().and_then(|e| *e)
    }

    /// Whether an authenticated datagram from the peer has set its endpoint yet.
    pub(super) fn endpoint_proven(&self) -> bool {
        self.endpoint_proven.load(Ordering::Relaxed)
    }

    /// Roaming: an authenticated packet came from `from` at `now_ms` (the data plane's
    /// clock). Returns whether the peer moved from IPv4 to IPv6: the caller answers over IPv6
    /// at once, so the other side moves too.
    pub(super) fn saw(&self, from: SocketAddr, now_ms: u64) -> bool {
        if !self.endpoint_proven.load(Ordering::Relaxed) {
            self.endpoint_proven.store(true, Ordering::Relaxed);
        }
        let Ok(mut e) = self.endpoint.lock() else {
            return false;
        };
        let current = *e;
        if current == Some(from) {
            return false;
        }
        // Just after a move to IPv6, datagrams the other side sent over IPv4 before it moved
        // too are still arriving; following them would undo the move on both sides.
        let since = self.path.ipv6_since.load(Ordering::Relaxed);
        if current.is_some_and(|c| c.is_ipv6())
            && from.is_ipv4()
            && since != 0
            && now_ms.saturating_sub(since) < super::path::IPV6_HOLD_MS
        {
            return false;
        }
        let upgrade = current.is_some_and(|c| c.is_ipv4()) && from.is_ipv6();
        if upgrade {
            self.path.ipv6_since.store(now_ms.max(1), Ordering::Relaxed);
        }
        if current.is_some() {
            tracing::info!(peer = %self.name, "endpoint moved to {from}");
        }
        *e = Some(from);
        self.endpoint_changes.fetch_add(1, Ordering::Relaxed);
        upgrade
    }
}

/// A snapshot of every peer, by slot.
#[derive(Default)]
pub struct PeerTable {
    /// A removed peer leaves its slot empty until a new peer takes it; a stale message for
    /// the old peer then fails authentication with the new one.
    slots: Vec<Option<Arc<Peer>>>,
    routes: RouteTable,
    /// Slot by public key: relayed datagrams are looked up by key, per datagram.
    keys: std::collections::HashMap<[u8; 32], usize>,
}

impl PeerTable {
    pub fn get(&self, slot: usize) -> Option<&Arc<Peer>> {
        self.slots.get(slot)?.as_ref()
    }

    /// Every peer with its slot.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &Arc<Peer>)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (i, p)))
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The slot past the last one in use.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// The slot whose allowed IPs hold `addr` (longest prefix).
    pub fn route(&self, addr: IpAddr) -> Option<usize> {
        self.routes.lookup(addr)
    }

    pub fn by_key(&self, key: &[u8; 32]) -> Option<(usize, &Arc<Peer>)> {
        let slot = *self.keys.get(key)?;
        self.get(slot).map(|p| (slot, p))
    }

    fn with_slots(slots: Vec<Option<Arc<Peer>>>) -> Self {
        let routes = RouteTable::new(slots.iter().enumerate().flat_map(|(i, p)| {
            p.iter()
                .flat_map(move |p| p.allowed_ips.iter().map(move |n| (n, i)))
        }));
        let keys = slots
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (p.public_key_bytes, i)))
            .collect();
        Self {
            slots,
            routes,
            keys,
        }
    }

    /// The table with `spec` added, or updated in place when its key is already a peer. An
    /// updated peer keeps its session (its `Tunn`) unless its keepalive changed; its endpoint
    /// and counters carry over.
    pub fn upsert(
        &self,
        static_private: &x25519::StaticSecret,
        spec: PeerSpec,
    ) -> Result<Option<Self>, PeerChangeError> {
        let existing = self
            .by_key(&spec.public_key)
            .map(|(slot, p)| (slot, p.clone()));
        if let Some((_, p)) = &existing {
            if p.spec == spec {
                return Ok(None);
            }
        }
        for (_, other) in self.iter() {
            if other.public_key_bytes == spec.public_key {
                continue;
            }
            if other.name == spec.name {
                return Err(PeerChangeError::NameTaken {
                    name: spec.name,
                    other_key: other.public_key.clone(),
                });
            }
            for net in &spec.allowed_ips {
                if other
                    .allowed_ips
                    .iter()
                    .any(|o| o.contains(net) || net.contains(o))
                {
                    return Err(PeerChangeError::Overlap {
                        name: spec.name.clone(),
                        net: *net,
                        other: other.name.clone(),
                    });
                }
            }
        }
        let mut slots = self.slots.clone();
        let slot = match &existing {
            Some((slot, _)) => *slot,
            None => match slots.iter().position(Option::is_none) {
                Some(free) => free,
                None if slots.len() < MAX_PEERS => {
                    slots.push(None);
                    slots.len() - 1
                }
                None => return Err(PeerChangeError::Full),
            },
        };
        let learned = existing.as_ref().and_then(|(_, p)| p.endpoint());
        let keepalive_same = existing
            .as_ref()
            .is_some_and(|(_, p)| p.spec.persistent_keepalive == spec.persistent_keepalive);
        let mut peer = Peer::new(static_private, spec, slot);
        if let (Some((_, old)), true) = (&existing, keepalive_same) {
            peer.tunn = old.tunn.clone();
            peer.created = old.created;
        }
        if let Some((_, old)) = &existing {
            peer.path = old.path.clone();
        }
        if let (Some(old), Ok(mut e)) = (&existing, peer.endpoint.lock()) {
            // A roster or API update never moves an endpoint an authenticated packet set; one
            // that only configuration set follows the update (a roster may know better, e.g.
            // the peer's address on a LAN this node shares).
            let proven = old.1.endpoint_proven.load(Ordering::Relaxed);
            *e = if proven {
                learned.or(*e)
            } else {
                e.or(learned)
            };
            peer.endpoint_proven.store(proven, Ordering::Relaxed);
            peer.rx_packets
                .store(old.1.rx_packets.load(Ordering::Relaxed), Ordering::Relaxed);
            peer.tx_packets
                .store(old.1.tx_packets.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        if let Some(s) = slots.get_mut(slot) {
            *s = Some(Arc::new(peer));
        }
        Ok(Some(Self::with_slots(slots)))
    }

    /// The table without the peer called `name`.
    pub fn remove(&self, name: &str) -> Result<Self, PeerChangeError> {
        let (slot, _) = self
            .iter()
            .find(|(_, p)| p.name == name)
            .ok_or_else(|| PeerChangeError::Unknown(name.to_string()))?;
        let mut slots = self.slots.clone();
        if let Some(s) = slots.get_mut(slot) {
            *s = None;
        }
        while slots.last().is_some_and(Option::is_none) {
            slots.pop();
        }
        Ok(Self::with_slots(slots))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, key: u8, ip: &str) -> PeerSpec {
        PeerSpec {
            name: name.into(),
            public_key: [key; 32],
            allowed_ips: vec![ip.parse().unwrap()],
            endpoint: None,
            persistent_keepalive: None,
            probe_interval: None,
            idles: false,
            groups: Vec::new(),
            multicast: Vec::new(),
            certified: false,
            behind_nat: false,
            candidates: Vec::new(),
        }
    }

    fn secret() -> x25519::StaticSecret {
        x25519::StaticSecret::from([9; 32])
    }

    #[test]
    fn peers_are_added_routed_updated_and_removed() {
        let k = secret();
        let t = PeerTable::default();
        let t = t.upsert(&k, spec("a", 1, "10.0.0.1/32")).unwrap().unwrap();
        let t = t.upsert(&k, spec("b", 2, "10.0.0.2/32")).unwrap().unwrap();
        assert_eq!(t.route("10.0.0.2".parse().unwrap()), Some(1));
        assert!(
            t.upsert(&k, spec("a", 1, "10.0.0.1/32")).unwrap().is_none(),
            "no change"
        );
        let a = t.get(0).unwrap().clone();
        // A changed peer keeps its slot; the other peer is the very same object.
        let t2 = t.upsert(&k, spec("a", 1, "10.0.0.9/32")).unwrap().unwrap();
        assert_eq!(t2.route("10.0.0.9".parse().unwrap()), Some(0));
        assert!(!Arc::ptr_eq(t2.get(0).unwrap(), &a));
        assert!(
            Arc::ptr_eq(&t2.get(0).unwrap().tunn, &a.tunn),
            "the session survives"
        );
        assert!(Arc::ptr_eq(t2.get(1).unwrap(), t.get(1).unwrap()));
        let t3 = t2.remove("a").unwrap();
        assert_eq!(t3.len(), 1);
        assert_eq!(t3.route("10.0.0.9".parse().unwrap()), None);
        assert!(t3.get(0).is_none() && t3.get(1).is_some());
        // The free slot is taken by the next peer.
        let t4 = t3.upsert(&k, spec("c", 3, "10.0.0.3/32")).unwrap().unwrap();
        assert_eq!(t4.by_key(&[3; 32]).map(|(s, _)| s), Some(0));
        assert_eq!(
            t4.remove("zz").err(),
            Some(PeerChangeError::Unknown("zz".into()))
        );
    }

    #[test]
    fn overlaps_and_taken_names_are_refused() {
        let k = secret();
        let t = PeerTable::default()
            .upsert(&k, spec("a", 1, "10.0.0.0/24"))
            .unwrap()
            .unwrap();
        assert!(matches!(
            t.upsert(&k, spec("b", 2, "10.0.0.7/32")),
            Err(PeerChangeError::Overlap { .. })
        ));
        assert!(matches!(
            t.upsert(&k, spec("a", 2, "10.1.0.7/32")),
            Err(PeerChangeError::NameTaken { .. })
        ));
    }

    #[test]
    fn a_move_to_ipv6_is_not_undone_by_ipv4_datagrams_still_in_flight() {
        let k = secret();
        let t = PeerTable::default()
            .upsert(&k, spec("a", 1, "10.0.0.1/32"))
            .unwrap()
            .unwrap();
        let p = t.get(0).unwrap();
        let v4: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::7]:4000".parse().unwrap();
        assert!(!p.saw(v4, 1_000), "a first endpoint is no move to IPv6");
        assert!(p.saw(v6, 2_000), "IPv4 to IPv6: answered over IPv6 at once");
        assert!(!p.saw(v4, 2_100));
        assert_eq!(p.endpoint(), Some(v6), "held within IPV6_HOLD_MS");
        assert!(!p.saw(v4, 2_000 + super::super::path::IPV6_HOLD_MS));
        assert_eq!(p.endpoint(), Some(v4), "followed after it (IPv6 went away)");
        assert!(p.saw(v6, 9_000));
        assert_eq!(p.endpoint(), Some(v6));
    }

    #[test]
    fn an_update_keeps_the_learned_endpoint() {
        let k = secret();
        let t = PeerTable::default()
            .upsert(&k, spec("a", 1, "10.0.0.1/32"))
            .unwrap()
            .unwrap();
        let learned: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        t.get(0).unwrap().saw(learned, 1);
        let mut s = spec("a", 1, "10.0.0.1/32");
        s.endpoint = Some("198.51.100.1:51820".parse().unwrap());
        let t2 = t.upsert(&k, s).unwrap().unwrap();
        assert_eq!(t2.get(0).unwrap().endpoint(), Some(learned));
        // And it stays proven through further updates.
        let mut s = spec("a", 1, "10.0.0.1/32");
        s.endpoint = Some("198.51.100.2:51820".parse().unwrap());
        let t3 = t2.upsert(&k, s).unwrap().unwrap();
        assert_eq!(t3.get(0).unwrap().endpoint(), Some(learned));
    }

    #[test]
    fn an_update_moves_an_endpoint_no_packet_proved() {
        let k = secret();
        let mut s = spec("a", 1, "10.0.0.1/32");
        s.endpoint = Some("203.0.113.21:38283".parse().unwrap());
        let t = PeerTable::default().upsert(&k, s).unwrap().unwrap();
        let lan: SocketAddr = "10.1.0.3:51820".parse().unwrap();
        let mut s = spec("a", 1, "10.0.0.1/32");
        s.endpoint = Some(lan);
        let t2 = t.upsert(&k, s).unwrap().unwrap();
        assert_eq!(t2.get(0).unwrap().endpoint(), Some(lan));
        // An update without an endpoint keeps the one there is.
        let t3 = t2.upsert(&k, spec("a", 1, "10.0.0.1/32")).unwrap().unwrap();
        assert_eq!(t3.get(0).unwrap().endpoint(), Some(lan));
    }
}
