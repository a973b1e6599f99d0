//! The mesh control state machine, sans-IO: a member registers with its lighthouses, presents
//! its certificate to every peer, and turns the rosters lighthouses push into peers; a
//! lighthouse keeps the registrations and pushes each member the part of the roster it may
//! see. Messages and `now` go in; messages to send and peer changes come out.

use super::cert::{self, Certificate, VerifiedNode};
use super::revoke::RevocationList;
use super::wire::{revocation_pages, roster_pages, Message, RosterEntry};
use ipnet::IpNet;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How often a lighthouse that has not answered with a roster yet is asked again (the first
/// exchange can be lost, or the lighthouse may be starting).
const REGISTER_RETRY: Duration = Duration::from_secs(2);
/// Keepalive for mesh peers: keeps NAT mappings and sessions warm.
pub const MESH_KEEPALIVE: u16 = 25;
/// How often a node probes peers whose RTT guards nothing: lighthouses, and members of its
/// own groups (robot to robot). Robots probe operators, and operators robots, at the full
/// `[probe]` rate, which is what the safety interlock and the fleet view judge.
pub const SLOW_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A lighthouse pushes one member at most one roster this often on churn: the first change goes
/// out at once, later ones are coalesced, so a burst of joins costs each watcher a few rosters
/// instead of one per join.
pub const ROSTER_MIN_GAP: Duration = Duration::from_millis(500);
/// A member added at its LAN address that sends nothing for this long is reached at its
/// public address instead (the shared public address was a carrier-grade NAT, not a site).
pub const LAN_TRIAL: Duration = Duration::from_secs(5);
/// Senders remembered in `heard` beyond the known members (restricted peers that never
/// introduce themselves must not grow it without bound).
const MAX_HEARD: usize = 4096;
/// How often the same overlay address is looked up at the lighthouses.
const LOOKUP_GAP: Duration = Duration::from_secs(1);
/// A lighthouse answers a registration at once (with a roster); silence this long means its
/// side of the session is gone.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
/// Lookups a lighthouse answers one member per second (a member scanning the overlay learns
/// it slowly; an honest one looks up a few addresses).
const LOOKUPS_PER_SECOND: u32 = 10;
/// Lookups remembered at once; more are refused until old ones age out.
const MAX_LOOKUPS: usize = 1024;

/// A lighthouse this node registers with, pinned by configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LighthouseConfig {
    pub name: String,
    pub public_key: [u8; 32],
    pub overlay: std::net::IpAddr,
    pub endpoint: SocketAddr,
}

#[derive(Clone, Debug)]
pub struct MeshConfig {
    pub ca: Certificate,
    /// This node's certificate, then its signer's.
    pub chain: Vec<Certificate>,
    pub lighthouses: Vec<LighthouseConfig>,
    /// Groups whose members this node learns from the lighthouses.
    pub talk_to: Vec<String>,
    /// The multicast groups this node takes part in, announced with its registration.
    pub multicast: Vec<std::net::IpAddr>,
    /// This node's own addresses (interfaces and listen port), offered to peers.
    pub candidates: Vec<SocketAddr>,
    /// The WireGuard listen port, for candidates found after a roam.
    pub listen_port: u16,
    /// Serve registrations and rosters.
    pub lighthouse: bool,
    /// Relay WireGuard datagrams between members (`[relay]`); said in `Observed`.
    pub relay: bool,
    /// How often a member registers again; a lighthouse forgets a member after three.
    pub refresh: Duration,
    /// The CA's revocation list, if this node has one (lighthouses push theirs to members).
    pub revocations: Option<RevocationList>,
    /// A lighthouse with a signer renews members' certificates.
    pub issuer: Option<super::enroll::Issuer>,
}

/// A peer change for the data plane. A peer's allowed IPs are its certificate's addresses as
/// host routes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Send {
        to: [u8; 32],
        message: Message,
    },
    Upsert(crate::tunnel::PeerSpec),
    Remove {
        name: String,
        key: [u8; 32],
    },
    /// This node's certificate was renewed: the shell writes the chain to `[mesh].cert`.
    Renewed(Vec<Certificate>),
    /// A lighthouse did not answer a registration: start a fresh handshake with it (it may
    /// have restarted, and WireGuard alone would wait 15 s to notice).
    Rehandshake([u8; 32]),
}

/// How this node knows a member.
#[derive(Clone, Debug, serde::Serialize, PartialEq, Eq)]
pub struct MemberView {
    pub name: String,
    pub public_key: String,
    pub addresses: Vec<IpNet>,
    pub groups: Vec<String>,
    pub fingerprint: String,
    pub not_after: String,
    /// Where its datagrams were last seen from (a lighthouse's observation).
    pub endpoint: Option<SocketAddr>,
    /// `roster` (pushed by a lighthouse), `hello` (it introduced itself), `registered` (it
    /// registered here, on a lighthouse).
    pub source: &'static str,
    /// Its talk_to, as registered (lighthouses only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub talk_to: Vec<String>,
    /// The multicast groups it takes part in, as it registered them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub multicast: Vec<std::net::IpAddr>,
    /// Its own interface addresses (as it registered them, or as the roster carried them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<SocketAddr>,
}

struct Known {
    node: VerifiedNode,
    /// Its certificate's not-before: revocation by name covers certificates up to a moment.
    not_before: u64,
    chain: Vec<Vec<u8>>,
    endpoint: Option<SocketAddr>,
    /// Its multicast groups: from its registration (lighthouses) or the roster (members).
    multicast: Vec<std::net::IpAddr>,
    /// Its own interface addresses, as the roster (or a lookup) carried them.
    candidates: Vec<SocketAddr>,
    source: &'static str,
}

/// A member registered at this lighthouse.
struct Registration {
    talk_to: Vec<String>,
    /// The member's own interface addresses, passed on in rosters.
    candidates: Vec<SocketAddr>,
    last_seen: Instant,
    /// Three of the member's own refresh intervals.
    expires_after: Duration,
    /// When it was last sent a roster, and whether a change since then is still unsent.
    last_pushed: Option<Instant>,
    dirty: bool,
}

/// A revocation list arriving in pages: its issue time and the pages so far.
type PagedList = (u64, Vec<Option<Vec<u8>>>);

/// One lighthouse's latest complete roster, as this member received it.
struct RosterCopy {
    generation: u64,
    pages: Vec<Option<Vec<RosterEntry>>>,
    /// Members of the latest complete generation, and when it completed.
    complete: Option<(HashSet<[u8; 32]>, Instant)>,
}

/// When a member said Leave, and each lighthouse's roster generation then.
type Departure = (Instant, HashMap<[u8; 32], u64>);

pub struct Mesh {
    config: MeshConfig,
    own_key: [u8; 32],
    chain_bytes: Vec<Vec<u8>>,
    /// Verified members, by WireGuard key.
    known: HashMap<[u8; 32], Known>,
    /// Lighthouses that acknowledged our Hello.
    welcomed: HashSet<[u8; 32]>,
    rosters: HashMap<[u8; 32], RosterCopy>,
    revocations: Option<RevocationList>,
    /// Roster members no fresh roster lists, since when: dropped after a refresh interval, so
    /// a member missing from one roster (a late registration) keeps its session.
    unlisted_since: HashMap<[u8; 32], Instant>,
    /// Members that said Leave, since when: rosters that still list them are not believed
    /// for three refreshes (until their registrations would have expired), unless they say
    /// Hello again.
    left: HashMap<[u8; 32], Departure>,
    /// Pages of a revocation list being received, per lighthouse.
    revocation_pages: HashMap<[u8; 32], PagedList>,
    registrations: HashMap<[u8; 32], Registration>,
    generation: u64,
    started: Instant,
    next_register: Instant,
    /// Lighthouses that have not sent a complete roster yet are asked again this often.
    next_retry: Instant,
    next_check: Instant,
    /// When the earliest coalesced roster push is due.
    next_flush: Option<Instant>,
    /// Counts changes to what `members()` shows, so the shell rebuilds that view only then.
    version: u64,
    /// Overlay addresses asked of the lighthouses, and when.
    lookups: HashMap<std::net::IpAddr, Instant>,
    /// When this node next asks for its certificate to be renewed (once it is due).
    next_renew: Instant,
    /// Lighthouses sent a registration that has not been answered yet: since when, and the
    /// gap before the next fresh handshake (doubling to the refresh interval while silent).
    awaiting: HashMap<[u8; 32], (Instant, Duration)>,
    /// On a lighthouse: the last renewal answer per member, and when.
    renewals: HashMap<[u8; 32], (Instant, Message)>,
    /// On a lighthouse: lookups per member in the current second.
    lookup_budget: HashMap<[u8; 32], (Instant, u32)>,
    /// Looked-up members: when a lighthouse last found them.
    found: HashMap<[u8; 32], Instant>,
    /// This node's reflexive address as each lighthouse sees it (its `Observed` answers).
    observed: HashMap<[u8; 32], SocketAddr>,
    /// Counts changes to what `connectivity()` shows (observed addresses, candidates, relays).
    reach_version: u64,
    /// Lighthouses that said they relay (`Observed`): where this node's datagrams go when a
    /// member cannot be reached directly.
    relays: std::collections::BTreeSet<[u8; 32]>,
    /// Members added at a LAN address (`on_our_site`) not heard from yet: since when, and the
    /// public address to fall back to if they stay silent.
    lan_trials: HashMap<[u8; 32], (Instant, Option<SocketAddr>)>,
    /// Members whose LAN address did not answer: reached at their public address from then on
    /// (until this node roams).
    lan_failed: HashSet<[u8; 32]>,
    /// Members a control message came from: a session with them works on some path.
    heard: HashSet<[u8; 32]>,
    out: VecDeque<Output>,
}

/// What this node knows of its own reachability: its candidates, the address each lighthouse
/// sees, and the NAT mapping that implies.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Connectivity {
    pub nat: &'static str,
    pub candidates: Vec<SocketAddr>,
    pub observed: Vec<ObservedBy>,
    /// The lighthouses that relay for this node (by name).
    pub relays: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ObservedBy {
    pub lighthouse: String,
    pub endpoint: SocketAddr,
}

fn chain_bytes(chain: &[Certificate]) -> Vec<Vec<u8>> {
    chain.iter().map(|c| c.to_bytes().to_vec()).collect()
}

fn host_routes(addresses: &[IpNet]) -> Vec<IpNet> {
    addresses.iter().map(|a| IpNet::from(a.addr())).collect()
}

impl Mesh {
    pub fn new(config: MeshConfig, now: Instant) -> Self {
        let own_key = config
            .chain
            .first()
            .map(|c| c.body().public_key)
            .unwrap_or_default();
        let chain_bytes = chain_bytes(&config.chain);
        // Generations count from a random point, so a restarted lighthouse's rosters are
        // never mistaken for pages of its previous life.
        let generation = getrandom::u64().unwrap_or(0) >> 16;
        let mut mesh = Self {
            config,
            own_key,
            chain_bytes,
            known: HashMap::new(),
            welcomed: HashSet::new(),
            rosters: HashMap::new(),
            revocations: None,
            unlisted_since: HashMap::new(),
            left: HashMap::new(),
            revocation_pages: HashMap::new(),
            registrations: HashMap::new(),
            generation,
            started: now,
            next_register: now,
            next_retry: now + REGISTER_RETRY,
            next_check: now,
            next_flush: None,
            version: 0,
            lookups: HashMap::new(),
            next_renew: now,
            awaiting: HashMap::new(),
            renewals: HashMap::new(),
            lookup_budget: HashMap::new(),
            found: HashMap::new(),
            observed: HashMap::new(),
            reach_version: 0,
            relays: std::collections::BTreeSet::new(),
            lan_trials: HashMap::new(),
            lan_failed: HashSet::new(),
            heard: HashSet::new(),
            out: VecDeque::new(),
        };
        if let Some(list) = mesh.config.revocations.take() {
            mesh.set_revocations(list, now);
        }
        for l in mesh.config.lighthouses.clone() {
            if l.public_key == mesh.own_key {
                continue;
            }
            mesh.out.push_back(Output::Upsert(crate::tunnel::PeerSpec {
                name: l.name.clone(),
                public_key: l.public_key,
                allowed_ips: vec![IpNet::from(l.overlay)],
                endpoint: Some(l.endpoint),
                persistent_keepalive: Some(MESH_KEEPALIVE),
                probe_interval: Some(SLOW_PROBE_INTERVAL),
                idles: false,
                groups: Vec::new(),
                multicast: Vec::new(),
                // Reached directly, never relayed to or through another relay.
                certified: false,
                behind_nat: false,
                candidates: Vec::new(),
            }));
        }
        mesh
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    pub fn poll_timeout(&self) -> Instant {
        let t = self.next_register.min(self.next_check).min(self.next_retry);
        let t = self
            .awaiting
            .values()
            .map(|(since, gap)| *since + (*gap).max(ANSWER_TIMEOUT))
            .fold(t, Instant::min);
        let t = self
            .lan_trials
            .values()
            .map(|(since, _)| *since + LAN_TRIAL)
            .fold(t, Instant::min);
        self.next_flush.map_or(t, |f| t.min(f))
    }

    fn shares_a_group(&self, groups: &[String]) -> bool {
        self.config
            .chain
            .first()
            .is_some_and(|c| c.body().groups.iter().any(|g| groups.contains(g)))
    }

    fn is_lighthouse_key(&self, key: &[u8; 32]) -> bool {
        self.config.lighthouses.iter().any(|l| &l.public_key == key)
    }

    fn send(&mut self, to: [u8; 32], message: Message) {
        self.out.push_back(Output::Send { to, message });
    }

    /// Verifies a chain someone presented for `key` at `unix` (seconds): signed by the CA,
    /// valid now, naming `key`, and not revoked. Returns the member and its not-before.
    fn verify(&self, key: &[u8; 32], chain: &[Vec<u8>], unix: u64) -> Option<(VerifiedNode, u64)> {
        let certs: Vec<Certificate> = chain
            .iter()
            .map(|c| Certificate::decode(c))
            .collect::<Result<_, _>>()
            .ok()?;
        let not_before = certs.first()?.body().not_before;
        match cert::verify(&certs, &self.config.ca, unix) {
            Ok(node)
                if self
                    .revocations
                    .as_ref()
                    .is_some_and(|r| r.revokes(&node, not_before)) =>
            {
                tracing::info!(name = %node.name, "refused a revoked certificate");
                None
            }
            Ok(node) if &node.public_key == key => Some((node, not_before)),
            Ok(node) => {
                tracing::debug!(name = %node.name, "a certificate presented by another key is ignored");
                None
            }
            Err(e) => {
                tracing::info!("refused a member's certificate: {e}");
                None
            }
        }
    }

    /// The peer a known member is, as the data plane holds it.
    fn spec_of(&self, key: &[u8; 32]) -> Option<crate::tunnel::PeerSpec> {
        let k = self.known.get(key)?;
        Some(self.member_spec(&k.node, k.endpoint, k.multicast.clone(), &k.candidates))
    }

    fn member_spec(
        &self,
        node: &VerifiedNode,
        endpoint: Option<SocketAddr>,
        multicast: Vec<std::net::IpAddr>,
        candidates: &[SocketAddr],
    ) -> crate::tunnel::PeerSpec {
        // What its direct tries and IPv6 offers may go to besides the endpoint: addresses a
        // probe may reach (never this node's own). None for a lighthouse: it must keep seeing
        // each member at the address its registrations come from, which is what it reports
        // back (an offer followed would turn a member's reflexive IPv4 address into IPv6).
        let behind_nat = endpoint.is_some_and(|e| !candidates.iter().any(|c| c.ip() == e.ip()));
        let candidates = candidates
            .iter()
            .filter(|c| {
                !self.config.lighthouse
                    && super::paths::routable(c)
                    && Some(**c) != endpoint
                    && !self.config.candidates.contains(c)
            })
            .copied()
            .collect();
        crate::tunnel::PeerSpec {
            name: node.name.clone(),
            public_key: node.public_key,
            allowed_ips: host_routes(&node.addresses),
            endpoint,
            persistent_keepalive: Some(MESH_KEEPALIVE),
            probe_interval: (self.config.lighthouse || self.shares_a_group(&node.groups))
                .then_some(SLOW_PROBE_INTERVAL),
            // Robots of one group probe each other only while they talk; a lighthouse keeps
            // probing every member (its probes are how a member's relay is judged alive).
            idles: !self.config.lighthouse && self.shares_a_group(&node.groups),
            groups: node.groups.clone(),
            multicast,
            certified: true,
            behind_nat,
            candidates,
        }
    }

    /// Makes a verified member a peer (replacing a restricted, not-yet-introduced one).
    fn admit(
        &mut self,
        (node, not_before): (VerifiedNode, u64),
        chain: Vec<Vec<u8>>,
        (endpoint, multicast, candidates): (
            Option<SocketAddr>,
            Vec<std::net::IpAddr>,
            Option<Vec<SocketAddr>>,
        ),
        source: &'static str,
    ) {
        if node.public_key == self.own_key || self.is_lighthouse_key(&node.public_key) {
            return;
        }
        self.version += 1;
        // A Hello carries none: what the roster said stays.
        let candidates = candidates.unwrap_or_else(|| {
            self.known
                .get(&node.public_key)
                .map(|k| k.candidates.clone())
                .unwrap_or_default()
        });
        let spec = self.member_spec(&node, endpoint, multicast.clone(), &candidates);
        let offered = candidates.clone();
        let previous = self.known.insert(
            node.public_key,
            Known {
                node,
                not_before,
                chain,
                endpoint,
                multicast,
                candidates,
                source,
            },
        );
        if previous.is_none_or(|p| {
            p.endpoint != endpoint
                || host_routes(&p.node.addresses) != spec.allowed_ips
                || p.multicast != spec.multicast
                || p.candidates != offered
        }) {
            self.out.push_back(Output::Upsert(spec));
        }
    }

    fn forget(&mut self, key: &[u8; 32]) {
        self.heard.remove(key);
        self.lan_trials.remove(key);
        self.lan_failed.remove(key);
        self.welcomed.remove(key);
        self.renewals.remove(key);
        self.lookup_budget.remove(key);
        self.found.remove(key);
        if let Some(k) = self.known.remove(key) {
            self.version += 1;
            self.out.push_back(Output::Remove {
                name: k.node.name,
                key: *key,
            });
        }
    }

    /// A control message from the peer with WireGuard key `from`, whose datagrams come from
    /// `endpoint`. `unix` is wall-clock seconds, for certificate validity.
    pub fn handle(
        &mut self,
        from: [u8; 32],
        endpoint: Option<SocketAddr>,
        bytes: &[u8],
        now: Instant,
        unix: u64,
    ) {
        let Ok(message) = Message::decode(bytes) else {
            tracing::debug!("dropped a malformed mesh message");
            return;
        };
        self.awaiting.remove(&from);
        self.lan_trials.remove(&from);
        if self.known.contains_key(&from) || self.heard.len() < MAX_HEARD {
            self.heard.insert(from);
        }
        match message {
            Message::Hello { chain } => {
                let Some(node) = self.verify(&from, &chain, unix) else {
                    return;
                };
                self.left.remove(&from);
                let known_endpoint = self.known.get(&from).and_then(|k| k.endpoint).or(endpoint);
                let source = self.known.get(&from).map_or("hello", |k| k.source);
                let multicast = self
                    .known
                    .get(&from)
                    .map(|k| k.multicast.clone())
                    .unwrap_or_default();
                self.admit(node, chain, (known_endpoint, multicast, None), source);
                self.send(from, Message::Welcome);
            }
            Message::Welcome => {
                if self.admitted(&from) {
                    self.welcomed.insert(from);
                }
            }
            Message::Observed { endpoint, relay } => {
                if self.is_lighthouse_key(&from) {
                    if self.observed.insert(from, endpoint) != Some(endpoint) {
                        self.reach_version += 1;
                    }
                    let changed = if relay {
                        self.relays.insert(from)
                    } else {
                        self.relays.remove(&from)
                    };
                    if changed {
                        self.reach_version += 1;
                    }
                }
            }
            Message::Register {
                talk_to,
                refresh_s,
                multicast,
                candidates,
            } => {
                if !self.config.lighthouse {
                    return;
                }
                // Only a member that introduced itself (and whose certificate holds) registers.
                let Some(groups) = self.known.get(&from).map(|k| k.node.groups.clone()) else {
                    self.send(from, self.hello());
                    return;
                };
                // The member learns its reflexive address (two lighthouses that see different
                // ports mean its NAT maps every destination anew).
                if let Some(seen) = endpoint {
                    self.send(
                        from,
                        Message::Observed {
                            endpoint: seen,
                            relay: self.config.relay,
                        },
                    );
                }
                let mut multicast_changed = false;
                if let Some(k) = self.known.get_mut(&from) {
                    let seen = endpoint.or(k.endpoint);
                    if k.endpoint != seen || k.source != "registered" {
                        k.endpoint = seen;
                        k.source = "registered";
                        self.version += 1;
                    }
                    if k.multicast != multicast {
                        k.multicast = multicast;
                        multicast_changed = true;
                        self.version += 1;
                    }
                }
                if multicast_changed {
                    // This node's own data plane replicates to it too.
                    if let Some(spec) = self.spec_of(&from) {
                        self.out.push_back(Output::Upsert(spec));
                    }
                }
                let expires_after = Duration::from_secs(u64::from(refresh_s.clamp(1, 3600)) * 3);
                let changed = match self.registrations.get_mut(&from) {
                    Some(reg) => {
                        let changed = reg.talk_to != talk_to
                            || multicast_changed
                            || reg.candidates != candidates;
                        reg.talk_to = talk_to;
                        reg.candidates = candidates.clone();
                        reg.last_seen = now;
                        reg.expires_after = expires_after;
                        changed
                    }
                    None => {
                        self.registrations.insert(
                            from,
                            Registration {
                                talk_to,
                                candidates: candidates.clone(),
                                last_seen: now,
                                expires_after,
                                last_pushed: None,
                                dirty: false,
                            },
                        );
                        true
                    }
                };
                if changed {
                    self.version += 1;
                    self.generation += 1;
                    self.push_to_affected(&groups, Some(from), now);
                }
                self.push_roster(from, now);
                self.push_revocations(from);
            }
            Message::Revocations {
                issued_at,
                page,
                pages,
                bytes,
            } => {
                if !self.is_lighthouse_key(&from) {
                    return;
                }
                let entry = self
                    .revocation_pages
                    .entry(from)
                    .or_insert_with(|| (issued_at, Vec::new()));
                if entry.0 != issued_at || entry.1.len() != pages as usize {
                    *entry = (issued_at, vec![None; pages as usize]);
                }
                if let Some(slot) = entry.1.get_mut(page as usize) {
                    *slot = Some(bytes);
                }
                if entry.1.iter().all(Option::is_some) {
                    let bytes: Vec<u8> = entry
                        .1
                        .iter_mut()
                        .flat_map(|p| p.take().unwrap_or_default())
                        .collect();
                    self.revocation_pages.remove(&from);
                    match RevocationList::decode(&bytes) {
                        Ok(list) => self.set_revocations(list, now),
                        Err(e) => {
                            tracing::info!("a lighthouse sent a malformed revocation list: {e}")
                        }
                    }
                }
            }
            Message::Lookup { address } => {
                if !self.config.lighthouse || !self.known.contains_key(&from) {
                    return;
                }
                let budget = self.lookup_budget.entry(from).or_insert((now, 0));
                if now.saturating_duration_since(budget.0) >= Duration::from_secs(1) {
                    *budget = (now, 0);
                }
                budget.1 += 1;
                if budget.1 > LOOKUPS_PER_SECOND {
                    return;
                }
                let holder = self
                    .registrations
                    .keys()
                    .filter(|k| **k != from)
                    .find(|k| {
                        self.known
                            .get(*k)
                            .is_some_and(|k| k.node.addresses.iter().any(|a| a.addr() == address))
                    })
                    .copied();
                let member = holder.and_then(|k| self.entry_of(&k));
                // The holder hears of the asker at the same moment the asker hears of it, so
                // their first handshakes cross and each opens its own NAT for the other's
                // (without it a holder behind NAT drops the asker's handshake, and refuses a
                // stranger's through a relay too).
                if let (Some(holder), Some(asker)) = (holder, self.entry_of(&from)) {
                    self.send(holder, Message::Introduce { member: asker });
                }
                self.send(from, Message::Found { address, member });
            }
            Message::Found { address, member } => {
                if self.is_lighthouse_key(&from) {
                    self.take_found(address, member, now, unix);
                }
            }
            Message::Introduce { member } => {
                if self.is_lighthouse_key(&from) && !self.config.lighthouse {
                    self.take_introduced(member, now, unix);
                }
            }
            Message::Renew => {
                if !self.config.lighthouse {
                    return;
                }
                // One answer per member and refresh interval: asking again gets the same
                // answer, without another signature or log line.
                if let Some((at, answer)) = self.renewals.get(&from) {
                    if now.saturating_duration_since(*at) < self.config.refresh {
                        let answer = answer.clone();
                        self.send(from, answer);
                        return;
                    }
                }
                let Some(leaf) = self
                    .known
                    .get(&from)
                    .and_then(|k| k.chain.first())
                    .and_then(|c| Certificate::decode(c).ok())
                else {
                    self.send(from, self.hello());
                    return;
                };
                let answer = match self.config.issuer.as_ref().map(|i| i.renew(&leaf, unix)) {
                    Some(Ok(chain)) => {
                        tracing::info!(member = %leaf.name(), "renewed a member's certificate");
                        Message::Renewed {
                            chain: chain_bytes(&chain),
                        }
                    }
                    Some(Err(refusal)) => {
                        tracing::debug!(member = %leaf.name(), "renewal refused: {}", refusal.reason);
                        Message::RenewRefused {
                            reason: refusal.reason,
                            opens_at: refusal.opens_at,
                        }
                    }
                    None => Message::RenewRefused {
                        reason: "this lighthouse has no signer ([lighthouse].signer_key)".into(),
                        opens_at: 0,
                    },
                };
                self.renewals.insert(from, (now, answer.clone()));
                self.send(from, answer);
            }
            Message::Renewed { chain } => {
                if self.is_lighthouse_key(&from) {
                    self.take_renewed(chain, unix);
                }
            }
            Message::RenewRefused { reason, opens_at } => {
                if self.is_lighthouse_key(&from) {
                    self.renewal_refused(&reason, opens_at, now, unix);
                }
            }
            Message::Leave => {
                // Lighthouses do not leave: their restarts are routine and members keep them.
                if self.is_lighthouse_key(&from) {
                    return;
                }
                let Some(k) = self.known.get(&from) else {
                    return;
                };
                tracing::info!(member = %k.node.name, "dropped: it left the mesh");
                let groups = k.node.groups.clone();
                let was_registered = self.registrations.remove(&from).is_some();
                self.forget(&from);
                self.unlisted_since.remove(&from);
                // A lighthouse's later roster generation that lists it again means it registered
                // again (the lighthouse dropped it on this Leave too).
                let generations = self
                    .rosters
                    .iter()
                    .map(|(lh, copy)| (*lh, copy.generation))
                    .collect();
                self.left.insert(from, (now, generations));
                if was_registered {
                    self.generation += 1;
                    self.push_to_affected(&groups, None, now);
                }
            }
            Message::Roster {
                generation,
                page,
                pages,
                members,
            } => {
                if !self.is_lighthouse_key(&from) {
                    return;
                }
                let copy = self.rosters.entry(from).or_insert_with(|| RosterCopy {
                    generation,
                    pages: Vec::new(),
                    complete: None,
                });
                if copy.generation != generation || copy.pages.len() != pages as usize {
                    copy.generation = generation;
                    copy.pages = vec![None; pages as usize];
                }
                if let Some(slot) = copy.pages.get_mut(page as usize) {
                    *slot = Some(members);
                }
                if copy.pages.iter().all(Option::is_some) {
                    let entries: Vec<RosterEntry> = copy
                        .pages
                        .iter_mut()
                        .flat_map(|p| p.take().unwrap_or_default())
                        .collect();
                    copy.pages.clear();
                    self.take_roster(from, entries, now, unix);
                }
            }
        }
    }

    /// The data plane has a packet for `address` and no peer for it: ask the lighthouses who
    /// holds it (at most once a `LOOKUP_GAP` per address).
    pub fn lookup(&mut self, address: std::net::IpAddr, now: Instant) {
        let in_overlay = self.config.chain.first().is_some_and(|c| {
            c.body()
                .networks
                .iter()
                .any(|n| n.contains(&address) && n.broadcast() != address)
        });
        if self
            .lookups
            .get(&address)
            .is_some_and(|at| now.saturating_duration_since(*at) < LOOKUP_GAP)
        {
            return;
        }
        if !in_overlay
            || self.config.lighthouse
            || self
                .known
                .values()
                .any(|k| k.node.addresses.iter().any(|a| a.addr() == address))
        {
            return;
        }
        if self.lookups.len() >= MAX_LOOKUPS {
            self.lookups
                .retain(|_, at| now.saturating_duration_since(*at) < LOOKUP_GAP);
            if self.lookups.len() >= MAX_LOOKUPS {
                return;
            }
        }
        self.lookups.insert(address, now);
        for key in self.lighthouse_keys() {
            self.send(key, Message::Lookup { address });
        }
    }

    /// A lighthouse's answer to a lookup: admit the member (and introduce ourselves), or drop
    /// a looked-up member that no longer holds the address.
    fn take_found(
        &mut self,
        address: std::net::IpAddr,
        member: Option<RosterEntry>,
        now: Instant,
        unix: u64,
    ) {
        let Some(entry) = member else {
            // Dropped only when no lighthouse has found it for two refreshes: one lighthouse
            // that lacks its registration (just restarted) does not decide alone.
            let stale_after = self.config.refresh * 2;
            let gone: Vec<[u8; 32]> = self
                .known
                .iter()
                .filter(|(key, k)| {
                    k.source == "lookup"
                        && k.node.addresses.iter().any(|a| a.addr() == address)
                        && self
                            .found
                            .get(*key)
                            .is_none_or(|at| now.saturating_duration_since(*at) >= stale_after)
                })
                .map(|(key, _)| *key)
                .collect();
            for key in gone {
                self.forget(&key);
            }
            return;
        };
        let Some((key, node)) = self.verified_entry(&entry, unix) else {
            return;
        };
        if !node.0.addresses.iter().any(|a| a.addr() == address) {
            return;
        }
        self.meet(key, node, entry, now, "found on demand");
    }

    /// The key and verified certificate of a member a lighthouse sent (`Found`, `Introduce`).
    fn verified_entry(
        &self,
        entry: &RosterEntry,
        unix: u64,
    ) -> Option<([u8; 32], (VerifiedNode, u64))> {
        let leaf = Certificate::decode(entry.chain.first()?).ok()?;
        let key = leaf.body().public_key;
        Some((key, self.verify(&key, &entry.chain, unix)?))
    }

    /// A lighthouse introduced a member that looked this node up: it is sending its first
    /// handshake now, so this node sends its own at once (each opens its NAT for the other's).
    fn take_introduced(&mut self, entry: RosterEntry, now: Instant, unix: u64) {
        let Some((key, node)) = self.verified_entry(&entry, unix) else {
            return;
        };
        self.meet(
            key,
            node,
            entry,
            now,
            "introduced by a lighthouse: it looked this node up",
        );
    }

    /// Admits a verified member learnt outside the roster (kept while a lighthouse still
    /// finds it) and introduces this node to it, which starts the handshake.
    fn meet(
        &mut self,
        key: [u8; 32],
        node: (VerifiedNode, u64),
        entry: RosterEntry,
        now: Instant,
        how: &'static str,
    ) {
        if self.known.contains_key(&key) {
            if self.known.get(&key).is_some_and(|k| k.source == "lookup") {
                self.found.insert(key, now);
            }
            return;
        }
        self.found.insert(key, now);
        tracing::info!(member = %node.0.name, "{how}");
        let lan = self.on_our_site(&key, entry.endpoint, &entry.candidates);
        if lan.is_some() {
            self.try_lan(key, entry.endpoint, now);
        }
        let endpoint = lan.or(entry.endpoint);
        self.admit(
            node,
            entry.chain,
            (endpoint, entry.multicast, Some(entry.candidates)),
            "lookup",
        );
        if self.known.contains_key(&key) {
            self.send(key, self.hello());
        }
    }

    /// A renewal was refused: ask again when it opens (if it will), else after a refresh; say
    /// why only when it will not open and the certificate is running out.
    fn renewal_refused(&mut self, reason: &str, opens_at: u64, now: Instant, unix: u64) {
        if opens_at > unix {
            let wait = Duration::from_secs(opens_at - unix);
            self.next_renew = self.next_renew.max(now + wait);
            tracing::debug!("renewal opens in {wait:?}: {reason}");
        } else {
            tracing::warn!("a lighthouse refused to renew this node's certificate: {reason}");
        }
    }

    /// Whether this node's certificate is in the last third of its life. A renewed lineage
    /// keeps its first not-before, so its life is bounded by what the signer grants at most.
    fn renewal_due(&self, unix: u64) -> bool {
        self.config.chain.first().is_some_and(|c| {
            let b = c.body();
            let mut span = b.not_after.saturating_sub(b.not_before);
            if let Some(days) = self.config.chain.get(1).map(|s| s.body().max_days) {
                if days > 0 {
                    span = span.min(u64::from(days) * 86_400);
                }
            }
            unix >= b.not_after.saturating_sub(span / 3)
        })
    }

    /// Takes a renewed chain if it is this node's identity again, valid longer than the
    /// current one: every peer hears the new certificate, and the shell stores it.
    fn take_renewed(&mut self, chain: Vec<Vec<u8>>, unix: u64) {
        let Ok(certs) = chain
            .iter()
            .map(|c| Certificate::decode(c))
            .collect::<Result<Vec<_>, _>>()
        else {
            return;
        };
        let (Some(new), Some(old)) = (certs.first(), self.config.chain.first()) else {
            return;
        };
        let (n, o) = (new.body(), old.body());
        let same = n.public_key == o.public_key
            && n.name == o.name
            && n.networks == o.networks
            && n.groups == o.groups;
        if same && n.not_after <= o.not_after {
            tracing::debug!(
                "a renewed certificate that lasts no longer than the current one (renewed already)"
            );
            return;
        }
        if let Err(e) = cert::verify(&certs, &self.config.ca, unix) {
            tracing::warn!("a lighthouse sent a renewed certificate that does not verify: {e}");
            return;
        }
        if !same {
            tracing::warn!("a lighthouse sent a renewed certificate that is not this node's");
            return;
        }
        tracing::info!(until = %cert::utc(new.body().not_after), "certificate renewed");
        self.config.chain = certs.clone();
        self.chain_bytes = chain;
        // Every peer and lighthouse hears the new certificate until it confirms.
        self.welcomed.clear();
        let everyone: Vec<[u8; 32]> = self
            .known
            .keys()
            .copied()
            .chain(self.lighthouse_keys())
            .collect();
        for key in everyone {
            self.send(key, self.hello());
        }
        self.out.push_back(Output::Renewed(certs));
    }

    /// A complete roster from lighthouse `from`.
    fn take_roster(&mut self, from: [u8; 32], entries: Vec<RosterEntry>, now: Instant, unix: u64) {
        let mut listed = HashSet::new();
        let generation = self.rosters.get(&from).map(|c| c.generation);
        for e in entries {
            let Some(leaf) = e.chain.first().and_then(|c| Certificate::decode(c).ok()) else {
                continue;
            };
            let key = leaf.body().public_key;
            if self.still_gone(&key, &from, generation, now) {
                continue;
            }
            let Some(node) = self.verify(&key, &e.chain, unix) else {
                continue;
            };
            listed.insert(key);
            let endpoint = match self.on_our_site(&key, e.endpoint, &e.candidates) {
                Some(lan) => {
                    self.try_lan(key, e.endpoint, now);
                    Some(lan)
                }
                None => self.known.get(&key).and_then(|k| k.endpoint).or(e.endpoint),
            };
            let new = !self.known.contains_key(&key);
            self.admit(
                node,
                e.chain,
                (endpoint, e.multicast, Some(e.candidates)),
                "roster",
            );
            // Introduce ourselves: the member may not have us in its roster.
            if new && self.known.contains_key(&key) {
                self.send(key, self.hello());
            }
        }
        if let Some(copy) = self.rosters.get_mut(&from) {
            copy.complete = Some((listed, now));
        }
        self.drop_unlisted(now);
    }

    /// Removes roster members that no fresh roster lists any more. Without any fresh roster
    /// (every lighthouse silent) nobody is removed: existing sessions outlive the lighthouses.
    fn drop_unlisted(&mut self, now: Instant) {
        let fresh_for = self.config.refresh * 3;
        let fresh: Vec<&HashSet<[u8; 32]>> = self
            .rosters
            .values()
            .filter_map(|r| r.complete.as_ref())
            .filter(|(_, at)| now.saturating_duration_since(*at) <= fresh_for)
            .map(|(set, _)| set)
            .collect();
        if fresh.is_empty() || self.config.lighthouse {
            return;
        }
        let unlisted: HashSet<[u8; 32]> = self
            .known
            .iter()
            .filter(|(key, k)| k.source == "roster" && !fresh.iter().any(|s| s.contains(*key)))
            .map(|(key, _)| *key)
            .collect();
        self.unlisted_since.retain(|k, _| unlisted.contains(k));
        // Two refreshes: after a lighthouse restarts, every member registers again within one,
        // and its roster push may wait out ROSTER_MIN_GAP on top.
        let grace = self.config.refresh * 2;
        let mut gone = Vec::new();
        for key in unlisted {
            let since = *self.unlisted_since.entry(key).or_insert(now);
            if now.saturating_duration_since(since) >= grace {
                gone.push(key);
            }
        }
        for key in gone {
            if let Some(k) = self.known.get(&key) {
                tracing::info!(member = %k.node.name, "dropped: no lighthouse lists it any more");
            }
            self.unlisted_since.remove(&key);
            self.forget(&key);
        }
    }

    /// The roster member `to` may see: registered members in the groups it talks to.
    fn roster_for(&self, to: &[u8; 32]) -> Vec<RosterEntry> {
        let Some(reg) = self.registrations.get(to) else {
            return Vec::new();
        };
        let mut entries: Vec<(&String, RosterEntry)> = self
            .registrations
            .keys()
            .filter(|k| *k != to)
            .filter_map(|k| Some((self.known.get(k)?, self.entry_of(k)?)))
            .filter(|(k, _)| k.node.groups.iter().any(|g| reg.talk_to.contains(g)))
            .map(|(k, e)| (&k.node.name, e))
            .collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        entries.into_iter().map(|(_, e)| e).collect()
    }

    /// A registered member as a lighthouse lists it: its chain, where its datagrams come
    /// from, and what it registered.
    fn entry_of(&self, key: &[u8; 32]) -> Option<RosterEntry> {
        let (k, reg) = (self.known.get(key)?, self.registrations.get(key)?);
        Some(RosterEntry {
            chain: k.chain.clone(),
            endpoint: k.endpoint,
            multicast: k.multicast.clone(),
            candidates: reg.candidates.clone(),
        })
    }

    fn push_roster(&mut self, to: [u8; 32], now: Instant) {
        if let Some(reg) = self.registrations.get_mut(&to) {
            reg.last_pushed = Some(now);
            reg.dirty = false;
        }
        let roster = self.roster_for(&to);
        for page in roster_pages(self.generation, &roster) {
            self.send(to, page);
        }
    }

    /// Pushes fresh rosters to every member that talks to one of `groups` (except `also`,
    /// which is answered directly): at once to a member not pushed to within
    /// `ROSTER_MIN_GAP`, otherwise when that gap has passed.
    fn push_to_affected(&mut self, groups: &[String], also: Option<[u8; 32]>, now: Instant) {
        let mut due = Vec::new();
        for (k, r) in &mut self.registrations {
            if Some(*k) == also || !r.talk_to.iter().any(|g| groups.contains(g)) {
                continue;
            }
            match r.last_pushed {
                Some(at) if now.saturating_duration_since(at) < ROSTER_MIN_GAP => {
                    r.dirty = true;
                    let when = at + ROSTER_MIN_GAP;
                    self.next_flush = Some(self.next_flush.map_or(when, |f| f.min(when)));
                }
                _ => due.push(*k),
            }
        }
        for k in due {
            self.push_roster(k, now);
        }
    }

    /// Sends the coalesced roster pushes whose gap has passed.
    fn flush_rosters(&mut self, now: Instant) {
        if self.next_flush.is_none_or(|f| now < f) {
            return;
        }
        self.next_flush = None;
        let mut due = Vec::new();
        for (k, r) in &self.registrations {
            if !r.dirty {
                continue;
            }
            let when = r.last_pushed.map_or(now, |at| at + ROSTER_MIN_GAP);
            if when <= now {
                due.push(*k);
            } else {
                self.next_flush = Some(self.next_flush.map_or(when, |f| f.min(when)));
            }
        }
        for k in due {
            self.push_roster(k, now);
        }
    }

    fn push_revocations(&mut self, to: [u8; 32]) {
        if let Some(list) = &self.revocations {
            for page in revocation_pages(list.issued_at, &list.encode()) {
                self.out.push_back(Output::Send { to, message: page });
            }
        }
    }

    /// Takes a revocation list signed by the CA (from a file, or pushed by a lighthouse) if it
    /// is newer than the one held, drops every member it revokes, and, on a lighthouse,
    /// passes it on to every registered member.
    pub fn set_revocations(&mut self, list: RevocationList, now: Instant) {
        if let Err(e) = list.verify(&self.config.ca.body().public_key) {
            tracing::warn!("ignored a revocation list: {e}");
            return;
        }
        if self
            .revocations
            .as_ref()
            .is_some_and(|r| r.issued_at >= list.issued_at)
        {
            return;
        }
        tracing::info!(entries = list.entries.len(), issued = %cert::utc(list.issued_at), "revocation list in force");
        let revoked: Vec<[u8; 32]> = self
            .known
            .iter()
            .filter(|(_, k)| list.revokes(&k.node, k.not_before))
            .map(|(key, _)| *key)
            .collect();
        self.revocations = Some(list);
        for key in revoked {
            if let Some(k) = self.known.get(&key) {
                tracing::info!(member = %k.node.name, "dropped: its certificate is revoked");
            }
            let groups = self
                .known
                .get(&key)
                .map(|k| k.node.groups.clone())
                .unwrap_or_default();
            let was_registered = self.registrations.remove(&key).is_some();
            self.forget(&key);
            if was_registered {
                self.generation += 1;
                self.push_to_affected(&groups, None, now);
            }
        }
        if self.config.lighthouse {
            let members: Vec<[u8; 32]> = self.registrations.keys().copied().collect();
            for m in members {
                self.push_revocations(m);
            }
        }
    }

    /// The configured lighthouses other than this node.
    fn lighthouse_keys(&self) -> Vec<[u8; 32]> {
        self.config
            .lighthouses
            .iter()
            .map(|l| l.public_key)
            .filter(|k| *k != self.own_key)
            .collect()
    }

    fn hello(&self) -> Message {
        Message::Hello {
            chain: self.chain_bytes.clone(),
        }
    }

    /// Sends a registration to a lighthouse and starts waiting for its answer.
    fn register_with(&mut self, key: [u8; 32], now: Instant) {
        self.awaiting.entry(key).or_insert((now, ANSWER_TIMEOUT));
        self.send(key, self.register_message());
    }

    /// A member the lighthouses see at the same public address as this node probably sits
    /// behind the same NAT, which rarely forwards a datagram back inside (hairpinning): it is
    /// tried at its own address on the shared network instead. A carrier-grade NAT also gives
    /// many customers one address, and there the LAN address leads nowhere: a member that
    /// stays silent there for `LAN_TRIAL` is reached at its public address from then on.
    fn on_our_site(
        &self,
        key: &[u8; 32],
        seen: Option<SocketAddr>,
        candidates: &[SocketAddr],
    ) -> Option<SocketAddr> {
        let seen = seen?;
        if self.lan_failed.contains(key) || !self.observed.values().any(|o| o.ip() == seen.ip()) {
            return None;
        }
        candidates
            .iter()
            .find(|c| {
                c.is_ipv4() == seen.is_ipv4()
                    && super::paths::routable(c)
                    && !self.config.candidates.contains(c)
                    && **c != seen
            })
            .copied()
    }

    /// Starts (or keeps) the trial of `key` at its LAN address, unless a session with it
    /// already works.
    fn try_lan(&mut self, key: [u8; 32], public: Option<SocketAddr>, now: Instant) {
        if !self.heard.contains(&key) {
            self.lan_trials.entry(key).or_insert((now, public));
        }
    }

    /// Members silent at their LAN address for `LAN_TRIAL` go back to their public one.
    fn end_lan_trials(&mut self, now: Instant) {
        let over: Vec<([u8; 32], Option<SocketAddr>)> = self
            .lan_trials
            .iter()
            .filter(|(_, (since, _))| now.saturating_duration_since(*since) >= LAN_TRIAL)
            .map(|(k, (_, public))| (*k, *public))
            .collect();
        for (key, public) in over {
            self.lan_trials.remove(&key);
            self.lan_failed.insert(key);
            if let Some(k) = self.known.get_mut(&key) {
                tracing::info!(member = %k.node.name, "no answer at its LAN address; trying the address the lighthouse sees");
                k.endpoint = public;
                self.version += 1;
            }
            if let Some(spec) = self.spec_of(&key) {
                self.out.push_back(Output::Upsert(spec));
            }
        }
    }

    /// This node's own addresses, as offered to lighthouses (they change on a roam).
    pub fn set_candidates(&mut self, candidates: Vec<SocketAddr>) {
        self.config.candidates = candidates;
        self.reach_version += 1;
    }

    /// This node's addresses changed: register with every lighthouse now, so the rosters
    /// they push carry the new endpoint without waiting for the next refresh.
    pub fn roamed(&mut self, now: Instant) {
        self.observed.clear();
        self.reach_version += 1;
        self.lan_failed.clear();
        for key in self.lighthouse_keys() {
            self.register_with(key, now);
        }
    }

    /// Changes whenever `connectivity()` may show something new.
    pub fn reach_version(&self) -> u64 {
        self.reach_version
    }

    /// This node's candidates, the reflexive address each lighthouse reported, and the NAT
    /// mapping they imply.
    pub fn connectivity(&self) -> Connectivity {
        let mut observed: Vec<ObservedBy> = self
            .config
            .lighthouses
            .iter()
            .filter_map(|l| {
                Some(ObservedBy {
                    lighthouse: l.name.clone(),
                    endpoint: *self.observed.get(&l.public_key)?,
                })
            })
            .collect();
        observed.sort_by(|a, b| a.lighthouse.cmp(&b.lighthouse));
        Connectivity {
            nat: self.nat_mapping(false).as_str(),
            candidates: self.config.candidates.clone(),
            observed,
            relays: self
                .config
                .lighthouses
                .iter()
                .filter(|l| self.relays.contains(&l.public_key))
                .map(|l| l.name.clone())
                .collect(),
        }
    }

    /// How this node's NAT maps it, from what its lighthouses observe (`ipv4_only`: from
    /// what lighthouses reached over IPv4 observe, the family NATs map).
    pub fn nat_mapping(&self, ipv4_only: bool) -> super::paths::NatMapping {
        let local: Vec<std::net::IpAddr> = self
            .config
            .candidates
            .iter()
            .map(|c| c.ip())
            .filter(|ip| !ipv4_only || ip.is_ipv4())
            .collect();
        let seen: Vec<SocketAddr> = self
            .config
            .lighthouses
            .iter()
            .filter_map(|l| self.observed.get(&l.public_key).copied())
            .filter(|o| !ipv4_only || o.is_ipv4())
            .collect();
        super::paths::classify(&local, &seen)
    }

    /// The keys of the lighthouses that relay for this node, in configuration order.
    pub fn relay_keys(&self) -> Vec<[u8; 32]> {
        self.config
            .lighthouses
            .iter()
            .map(|l| l.public_key)
            .filter(|k| self.relays.contains(k))
            .collect()
    }

    fn register_message(&self) -> Message {
        Message::Register {
            talk_to: self.config.talk_to.clone(),
            candidates: self.config.candidates.clone(),
            refresh_s: self.config.refresh.as_secs().clamp(1, 3600) as u16,
            multicast: self.config.multicast.clone(),
        }
    }

    /// Timers: registration refresh, expiry of certificates and registrations.
    pub fn handle_timeout(&mut self, now: Instant, unix: u64) {
        self.flush_rosters(now);
        self.end_lan_trials(now);
        self.chase_silent_lighthouses(now);
        if now >= self.next_retry {
            self.next_retry = now + self.config.refresh.min(REGISTER_RETRY);
            for key in self.lighthouse_keys() {
                if self.rosters.get(&key).is_none_or(|r| r.complete.is_none()) {
                    self.send(key, self.hello());
                    self.register_with(key, now);
                }
            }
        }
        if now >= self.next_register {
            self.next_register = now + self.config.refresh;
            let young = now.saturating_duration_since(self.started) < self.config.refresh * 2;
            for key in self.lighthouse_keys() {
                if young || !self.welcomed.contains(&key) {
                    self.send(key, self.hello());
                }
                self.register_with(key, now);
            }
            // Looked-up members stay while a lighthouse still finds them.
            let looked_up: Vec<std::net::IpAddr> = self
                .known
                .values()
                .filter(|k| k.source == "lookup")
                .filter_map(|k| k.node.addresses.first().map(|a| a.addr()))
                .collect();
            for address in looked_up {
                for key in self.lighthouse_keys() {
                    self.send(key, Message::Lookup { address });
                }
            }
            // Members that have not confirmed our Hello hear it again.
            let unconfirmed: Vec<[u8; 32]> = self
                .known
                .keys()
                .filter(|k| !self.welcomed.contains(*k))
                .copied()
                .collect();
            for key in unconfirmed {
                self.send(key, self.hello());
            }
        }
        if now >= self.next_check {
            self.next_check = now + Duration::from_secs(1);
            if now >= self.next_renew && self.renewal_due(unix) {
                self.next_renew = now + self.config.refresh.min(REGISTER_RETRY * 5);
                self.renew_own(now, unix);
            }
            let expired: Vec<[u8; 32]> = self
                .known
                .iter()
                .filter(|(_, k)| k.node.not_after < unix)
                .map(|(key, _)| *key)
                .collect();
            let stale: Vec<[u8; 32]> = self
                .registrations
                .iter()
                .filter(|(_, r)| now.saturating_duration_since(r.last_seen) > r.expires_after)
                .map(|(k, _)| *k)
                .collect();
            for key in expired.iter().chain(&stale) {
                if let Some(k) = self.known.get(key) {
                    tracing::info!(member = %k.node.name, "dropped: {}", if expired.contains(key) { "its certificate expired" } else { "it stopped registering" });
                }
                let groups = self
                    .known
                    .get(key)
                    .map(|k| k.node.groups.clone())
                    .unwrap_or_default();
                let was_registered = self.registrations.remove(key).is_some();
                self.forget(key);
                if was_registered {
                    self.generation += 1;
                    self.push_to_affected(&groups, None, now);
                }
            }
            self.drop_unlisted(now);
            let left_for = self.left_for();
            self.left
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < left_for);
        }
    }

    /// How long a member that said Leave stays gone unless it comes back: until its
    /// registrations would have expired.
    fn left_for(&self) -> Duration {
        self.config.refresh * 3
    }

    /// Whether `key`, listed in a roster of generation `generation` from lighthouse `from`,
    /// left recently and that roster is no newer than the one `from` had sent when it left.
    fn still_gone(
        &self,
        key: &[u8; 32],
        from: &[u8; 32],
        generation: Option<u64>,
        now: Instant,
    ) -> bool {
        let Some((at, seen)) = self.left.get(key) else {
            return false;
        };
        now.saturating_duration_since(*at) < self.left_for()
            && seen
                .get(from)
                .is_none_or(|g| generation.is_none_or(|newest| newest <= *g))
    }

    /// This node stops: tells every member it knows (lighthouses included) to forget it now.
    /// A lighthouse stays listed: members keep it across its restarts.
    pub fn leave(&mut self) {
        if self.config.lighthouse {
            return;
        }
        let mut keys: Vec<[u8; 32]> = self.known.keys().copied().collect();
        for l in &self.config.lighthouses {
            if !keys.contains(&l.public_key) {
                keys.push(l.public_key);
            }
        }
        for key in keys {
            self.send(key, Message::Leave);
        }
    }

    /// A lighthouse silent since a registration gets a fresh handshake and the registration
    /// again; while it stays silent the gap doubles, up to the refresh interval.
    fn chase_silent_lighthouses(&mut self, now: Instant) {
        let refresh = self.config.refresh;
        let silent: Vec<([u8; 32], Duration)> = self
            .awaiting
            .iter()
            .filter(|(_, (since, gap))| now >= *since + (*gap).max(ANSWER_TIMEOUT))
            .map(|(key, (_, gap))| (*key, *gap))
            .collect();
        for (key, gap) in silent {
            tracing::debug!("a lighthouse did not answer a registration; handshaking again");
            self.out.push_back(Output::Rehandshake(key));
            self.send(key, self.hello());
            self.send(key, self.register_message());
            self.awaiting
                .insert(key, (now, (gap * 2).min(refresh.max(ANSWER_TIMEOUT))));
        }
    }

    /// Asks the lighthouses for a fresh certificate; a lighthouse with a signer signs its own.
    fn renew_own(&mut self, now: Instant, unix: u64) {
        let own = self.config.chain.first().cloned();
        if let (Some(issuer), Some(own)) = (self.config.issuer.clone(), own) {
            match issuer.renew(&own, unix) {
                Ok(chain) => {
                    self.take_renewed(chain_bytes(&chain), unix);
                    return;
                }
                Err(r) if r.opens_at > unix => {
                    self.renewal_refused(&r.reason, r.opens_at, now, unix);
                    return;
                }
                Err(r) => tracing::debug!("cannot renew its own certificate: {}", r.reason),
            }
        }
        for key in self.lighthouse_keys() {
            self.send(key, Message::Renew);
        }
    }

    /// Whether a peer with this key has presented a valid certificate (or is a lighthouse).
    pub fn admitted(&self, key: &[u8; 32]) -> bool {
        self.known.contains_key(key) || self.is_lighthouse_key(key)
    }

    /// Changes whenever `members()` may show something new.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Members as this node knows them, by name.
    pub fn members(&self) -> Vec<MemberView> {
        let mut v: Vec<MemberView> = self
            .known
            .values()
            .map(|k| MemberView {
                name: k.node.name.clone(),
                public_key: crate::keys::PublicKey(k.node.public_key).to_string(),
                addresses: k.node.addresses.clone(),
                groups: k.node.groups.clone(),
                fingerprint: k.node.fingerprint.clone(),
                not_after: cert::utc(k.node.not_after),
                endpoint: k.endpoint,
                source: k.source,
                talk_to: self
                    .registrations
                    .get(&k.node.public_key)
                    .map(|r| r.talk_to.clone())
                    .unwrap_or_default(),
                multicast: k.multicast.clone(),
                candidates: match self.registrations.get(&k.node.public_key) {
                    Some(r) => r.candidates.clone(),
                    None => k.candidates.clone(),
                },
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::cert::{CertBody, Role};
    use ed25519_dalek::SigningKey;

    const UNIX: u64 = 1_800_000_000;
    const REFRESH: Duration = Duration::from_secs(10);

    fn ca_key() -> SigningKey {
        SigningKey::from_bytes(&[1; 32])
    }

    fn ca(k: &SigningKey) -> Certificate {
        Certificate::sign(
            CertBody {
                role: Role::Ca,
                name: "fleet".into(),
                public_key: k.verifying_key().to_bytes(),
                networks: vec![],
                groups: vec![],
                not_before: UNIX - 10,
                not_after: UNIX + 1_000_000,
                max_days: 0,
                issuer: [0; 32],
            },
            k,
        )
        .unwrap()
    }

    fn node_cert(
        by: &SigningKey,
        name: &str,
        key: u8,
        addr: &str,
        groups: &[&str],
        not_after: u64,
    ) -> Certificate {
        Certificate::sign(
            CertBody {
                role: Role::Node,
                name: name.into(),
                public_key: [key; 32],
                networks: vec![addr.parse().unwrap()],
                groups: groups.iter().map(|g| g.to_string()).collect(),
                not_before: UNIX - 10,
                not_after,
                max_days: 0,
                issuer: [0; 32],
            },
            by,
        )
        .unwrap()
    }

    fn lighthouse_ref() -> LighthouseConfig {
        LighthouseConfig {
            name: "lighthouse".into(),
            public_key: [10; 32],
            overlay: "10.77.0.1".parse().unwrap(),
            endpoint: "192.0.2.1:51820".parse().unwrap(),
        }
    }

    /// The test lighthouse (key 10, 10.77.0.1), its certificate valid until `not_after`.
    fn lighthouse(k: &SigningKey, not_after: u64, now: Instant) -> Mesh {
        let cert = node_cert(
            k,
            "lighthouse",
            10,
            "10.77.0.1/16",
            &["lighthouses"],
            not_after,
        );
        mesh(cert, &[], true, now)
    }

    /// robot1 (group robots, talking to operators), signed by `k`.
    fn robot1(k: &SigningKey, now: Instant) -> Mesh {
        let cert = node_cert(k, "robot1", 11, "10.77.0.11/16", &["robots"], UNIX + 1000);
        mesh(cert, &["operators"], false, now)
    }

    /// The operator (group operators, talking to robots), signed by `k`.
    fn operator(k: &SigningKey, now: Instant) -> Mesh {
        let cert = node_cert(
            k,
            "operator",
            12,
            "10.77.0.12/16",
            &["operators"],
            UNIX + 1000,
        );
        mesh(cert, &["robots"], false, now)
    }

    /// The newest spec node `at` gave its data plane for peer `name`.
    fn last_upsert<'a>(
        changes: &'a [(u8, Output)],
        at: u8,
        name: &str,
    ) -> Option<&'a crate::tunnel::PeerSpec> {
        changes.iter().rev().find_map(|(n, o)| match o {
            Output::Upsert(s) if *n == at && s.name == name => Some(s),
            _ => None,
        })
    }

    fn mesh(cert: Certificate, talk_to: &[&str], lighthouse: bool, now: Instant) -> Mesh {
        let k = ca_key();
        Mesh::new(
            MeshConfig {
                ca: ca(&k),
                chain: vec![cert],
                lighthouses: vec![lighthouse_ref()],
                talk_to: talk_to.iter().map(|g| g.to_string()).collect(),
                multicast: vec![],
                candidates: vec![],
                listen_port: 51820,
                lighthouse,
                relay: lighthouse,
                refresh: REFRESH,
                revocations: None,
                issuer: None,
            },
            now,
        )
    }

    /// Nodes by key; delivers every Send until nothing moves; returns the peer changes seen.
    fn settle(nodes: &mut [(u8, &mut Mesh)], now: Instant) -> Vec<(u8, Output)> {
        settle_at(nodes, now, UNIX)
    }

    fn settle_at(nodes: &mut [(u8, &mut Mesh)], now: Instant, unix: u64) -> Vec<(u8, Output)> {
        settle_via(
            nodes,
            (now, unix),
            |from| format!("192.0.2.{from}:51820").parse().unwrap(),
            |_, _| true,
        )
    }

    fn upserted(changes: &[(u8, Output)], at: u8, name: &str) -> bool {
        changes
            .iter()
            .any(|(n, o)| *n == at && matches!(o, Output::Upsert(s) if s.name == name))
    }

    #[test]
    fn multicast_subscriptions_travel_with_the_registration_and_the_roster() {
        let t0 = Instant::now();
        let k = ca_key();
        let group: std::net::IpAddr = "239.255.0.1".parse().unwrap();
        let mut lh = lighthouse(&k, UNIX + 1000, t0);
        let mut robot = robot1(&k, t0);
        robot.config.multicast = vec![group];
        let mut op = operator(&k, t0);
        robot.handle_timeout(t0, UNIX);
        op.handle_timeout(t0, UNIX);
        let changes = settle(&mut [(10, &mut lh), (11, &mut robot), (12, &mut op)], t0);
        let last_spec = |changes: &[(u8, Output)], at: u8, name: &str| {
            last_upsert(changes, at, name).map(|s| s.multicast.clone())
        };
        assert_eq!(last_spec(&changes, 12, "robot1"), Some(vec![group]));
        assert_eq!(last_spec(&changes, 11, "operator"), Some(vec![]));
        // The robot leaves the group: its next registration tells the operator.
        robot.config.multicast = vec![];
        let later = t0 + REFRESH;
        robot.handle_timeout(later, UNIX);
        let changes = settle(&mut [(10, &mut lh), (11, &mut robot), (12, &mut op)], later);
        let later = later + ROSTER_MIN_GAP;
        lh.handle_timeout(later, UNIX);
        let more = settle(&mut [(10, &mut lh), (11, &mut robot), (12, &mut op)], later);
        let all: Vec<(u8, Output)> = changes.into_iter().chain(more).collect();
        assert_eq!(last_spec(&all, 12, "robot1"), Some(vec![]), "{all:?}");
    }

    #[test]
    fn members_find_the_groups_they_talk_to_through_the_lighthouse() {
        let t0 = Instant::now();
        let k = ca_key();
        let mut lh = lighthouse(&k, UNIX + 1000, t0);
        let mut robot = robot1(&k, t0);
        let mut op = mesh(
            node_cert(
                &k,
                "operator",
                12,
                "10.77.0.12/16",
                &["operators"],
                UNIX + 1000,
            ),
            &["robots", "operators"],
            false,
            t0,
        );
        let mut other_robot = mesh(
            node_cert(&k, "robot2", 13, "10.77.0.13/16", &["robots"], UNIX + 1000),
            &["operators"],
            false,
            t0,
        );
        for m in [&mut robot, &mut op, &mut other_robot] {
            m.handle_timeout(t0, UNIX);
        }
        let changes = settle(
            &mut [
                (10, &mut lh),
                (11, &mut robot),
                (12, &mut op),
                (13, &mut other_robot),
            ],
            t0,
        );
        assert!(
            upserted(&changes, 11, "lighthouse"),
            "the lighthouse is a peer from the config"
        );
        assert!(upserted(&changes, 11, "operator"));
        assert!(upserted(&changes, 12, "robot1") && upserted(&changes, 12, "robot2"));
        assert!(
            !upserted(&changes, 11, "robot2"),
            "robots do not talk to robots"
        );
        let spec = changes
            .iter()
            .find_map(|(n, o)| match o {
                Output::Upsert(s) if *n == 12 && s.name == "robot1" => Some(s.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            spec.allowed_ips,
            vec!["10.77.0.11/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            spec.endpoint,
            Some("192.0.2.11:51820".parse().unwrap()),
            "as the lighthouse saw it"
        );
        assert_eq!(lh.members().len(), 3);
        assert_eq!(
            op.members()
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>(),
            ["robot1", "robot2"]
        );

        // robot2 stops registering: the lighthouse drops it and the operator follows.
        let later = t0 + REFRESH * 4;
        robot.handle_timeout(later, UNIX);
        op.handle_timeout(later, UNIX);
        let mut changes = settle(&mut [(10, &mut lh), (11, &mut robot), (12, &mut op)], later);
        lh.handle_timeout(later, UNIX);
        changes.extend(settle(
            &mut [(10, &mut lh), (11, &mut robot), (12, &mut op)],
            later,
        ));
        // The operator was just sent a roster (its own registration): the change waits out
        // the gap, then goes out by itself.
        assert!(lh.poll_timeout() <= later + ROSTER_MIN_GAP);
        lh.handle_timeout(later + ROSTER_MIN_GAP, UNIX);
        changes.extend(settle(
            &mut [(10, &mut lh), (11, &mut robot), (12, &mut op)],
            later + ROSTER_MIN_GAP,
        ));
        // The operator waits two refresh intervals before it lets go of an unlisted member.
        assert!(changes
            .iter()
            .all(|(n, o)| !(*n == 12 && matches!(o, Output::Remove { .. }))));
        op.handle_timeout(later + ROSTER_MIN_GAP + REFRESH * 2, UNIX);
        changes.extend(std::iter::from_fn(|| op.poll_output()).map(|o| (12, o)));
        assert!(
            changes
                .iter()
                .any(|(n, o)| *n == 12
                    && matches!(o, Output::Remove { name, .. } if name == "robot2")),
            "{changes:?}"
        );
        assert!(changes
            .iter()
            .all(|(_, o)| !matches!(o, Output::Remove { name, .. } if name == "robot1")));
    }

    #[test]
    fn foreign_expired_and_borrowed_certificates_are_never_admitted() {
        let t0 = Instant::now();
        let k = ca_key();
        let mut lh = lighthouse(&k, UNIX + 1000, t0);
        let other_ca = SigningKey::from_bytes(&[2; 32]);
        let mut foreign = mesh(
            node_cert(
                &other_ca,
                "intruder",
                20,
                "10.77.0.20/16",
                &["robots"],
                UNIX + 1000,
            ),
            &["robots"],
            false,
            t0,
        );
        foreign.handle_timeout(t0, UNIX);
        settle(&mut [(10, &mut lh), (20, &mut foreign)], t0);
        assert!(!lh.admitted(&[20; 32]), "signed by another CA");
        // A valid certificate presented by a key that is not the one it names.
        let stolen = node_cert(&k, "robot1", 11, "10.77.0.11/16", &["robots"], UNIX + 1000);
        lh.handle(
            [21; 32],
            None,
            &Message::Hello {
                chain: vec![stolen.to_bytes().to_vec()],
            }
            .encode(),
            t0,
            UNIX,
        );
        assert!(!lh.admitted(&[21; 32]) && !lh.admitted(&[11; 32]));
        // Expiry: admitted while valid, dropped once expired.
        let short = node_cert(&k, "robot3", 13, "10.77.0.13/16", &["robots"], UNIX + 5);
        lh.handle(
            [13; 32],
            None,
            &Message::Hello {
                chain: vec![short.to_bytes().to_vec()],
            }
            .encode(),
            t0,
            UNIX,
        );
        assert!(lh.admitted(&[13; 32]));
        lh.handle_timeout(t0 + Duration::from_secs(2), UNIX + 6);
        assert!(!lh.admitted(&[13; 32]));
        assert!(std::iter::from_fn(|| lh.poll_output())
            .any(|o| matches!(o, Output::Remove { name, .. } if name == "robot3")));
    }

    #[test]
    fn silent_lighthouses_remove_nobody() {
        let t0 = Instant::now();
        let k = ca_key();
        let mut lh = lighthouse(&k, UNIX + 1000, t0);
        let mut a = robot1(&k, t0);
        let mut b = operator(&k, t0);
        a.handle_timeout(t0, UNIX);
        b.handle_timeout(t0, UNIX);
        settle(&mut [(10, &mut lh), (11, &mut a), (12, &mut b)], t0);
        assert!(a.admitted(&[12; 32]));
        // The lighthouse is gone: a keeps its peer however long it waits.
        let much_later = t0 + REFRESH * 30;
        a.handle_timeout(much_later, UNIX);
        assert!(a.admitted(&[12; 32]));
        assert!(std::iter::from_fn(|| a.poll_output()).all(|o| !matches!(o, Output::Remove { .. })));
    }

    /// Rosters the operator (key 12) was sent: one per complete roster generation.
    fn rosters_to(lh: &mut Mesh, to: [u8; 32]) -> usize {
        std::iter::from_fn(|| lh.poll_output())
            .filter(|o| matches!(o, Output::Send { to: t, message: Message::Roster { page: 0, .. } } if *t == to))
            .count()
    }

    #[test]
    fn a_burst_of_joins_costs_a_watcher_two_rosters() {
        let t0 = Instant::now();
        let k = ca_key();
        let mut lh = lighthouse(&k, UNIX + 1000, t0);
        let op = node_cert(
            &k,
            "operator",
            12,
            "10.77.0.12/16",
            &["operators"],
            UNIX + 1000,
        );
        let hello = |c: &Certificate| {
            Message::Hello {
                chain: vec![c.to_bytes().to_vec()],
            }
            .encode()
        };
        let register = |talk_to: &[&str]| {
            Message::Register {
                talk_to: talk_to.iter().map(|g| g.to_string()).collect(),
                candidates: vec![],
                refresh_s: 10,
                multicast: vec![],
            }
            .encode()
        };
        lh.handle([12; 32], None, &hello(&op), t0, UNIX);
        lh.handle([12; 32], None, &register(&["robots"]), t0, UNIX);
        assert_eq!(
            rosters_to(&mut lh, [12; 32]),
            1,
            "its own registration is answered"
        );
        let later = t0 + ROSTER_MIN_GAP * 2;
        for i in 0..40u8 {
            let robot = node_cert(
                &k,
                &format!("robot{i}"),
                100 + i,
                &format!("10.77.1.{i}/16"),
                &["robots"],
                UNIX + 1000,
            );
            lh.handle([100 + i; 32], None, &hello(&robot), later, UNIX);
            lh.handle([100 + i; 32], None, &register(&["operators"]), later, UNIX);
        }
        assert_eq!(
            rosters_to(&mut lh, [12; 32]),
            1,
            "the first join goes out at once"
        );
        assert!(lh.poll_timeout() <= later + ROSTER_MIN_GAP);
        lh.handle_timeout(later + ROSTER_MIN_GAP, UNIX);
        let mut last = None;
        let mut sent = 0;
        while let Some(o) = lh.poll_output() {
            if let Output::Send {
                to: [12, ..],
                message:
                    Message::Roster {
                        page,
                        pages,
                        members,
                        ..
                    },
            } = o
            {
                sent += usize::from(page == 0);
                last = Some((pages, members.len()));
            }
        }
        assert_eq!(sent, 1, "the other 39 joins are one more roster");
        assert!(
            last.is_some_and(|(pages, _)| pages > 1),
            "forty robots take several pages"
        );
        assert_eq!(lh.members().len(), 41);
    }

    #[test]
    fn a_member_the_lighthouse_sees_at_none_of_its_own_addresses_is_behind_a_nat() {
        let t0 = Instant::now();
        let k = ca_key();
        let mut lh = lighthouse(&k, UNIX + 1000, t0);
        let mut robot = robot1(&k, t0);
        let mut op = operator(&k, t0);
        // settle's lighthouse sees node n at 192.0.2.n:51820: the operator's own address, a
        // LAN address of the robot's behind its NAT.
        op.config.candidates = vec!["192.0.2.12:51820".parse().unwrap()];
        robot.config.candidates = vec!["10.1.0.2:51820".parse().unwrap()];
        robot.handle_timeout(t0, UNIX);
        op.handle_timeout(t0, UNIX);
        let mut changes = settle(&mut [(10, &mut lh), (11, &mut robot), (12, &mut op)], t0);
        // The candidates travel with the next registrations and rosters.
        let later = t0 + REFRESH;
        robot.handle_timeout(later, UNIX);
        op.handle_timeout(later, UNIX);
        changes.extend(settle(
            &mut [(10, &mut lh), (11, &mut robot), (12, &mut op)],
            later,
        ));
        let later = later + ROSTER_MIN_GAP;
        lh.handle_timeout(later, UNIX);
        changes.extend(settle(
            &mut [(10, &mut lh), (11, &mut robot), (12, &mut op)],
            later,
        ));
        let robot_seen = last_upsert(&changes, 12, "robot1").map(|s| s.behind_nat);
        let op_seen = last_upsert(&changes, 11, "operator").map(|s| s.behind_nat);
        assert_eq!(robot_seen, Some(true), "the robot is behind a NAT");
        assert_eq!(
            op_seen,
            Some(false),
            "the operator is public: {:?}",
            last_upsert(&changes, 11, "operator")
        );
    }

    #[test]
    fn a_lighthouse_introduces_the_asker_to_the_member_it_finds_so_both_handshake_at_once() {
        let t0 = Instant::now();
        let k = ca_key();
        let mut lh = lighthouse(&k, UNIX + 1000, t0);
        let mut robot1 = robot1(&k, t0);
        let robot = |name: &str, host: u8| {
            mesh(
                node_cert(
                    &k,
                    name,
                    host,
                    &format!("10.77.0.{host}/16"),
                    &["robots"],
                    UNIX + 1000,
                ),
                &["operators"],
                false,
                t0,
            )
        };
        let mut robot2 = robot("robot2", 13);
        robot1.handle_timeout(t0, UNIX);
        robot2.handle_timeout(t0, UNIX);
        settle(
            &mut [(10, &mut lh), (11, &mut robot1), (13, &mut robot2)],
            t0,
        );
        let seen: SocketAddr = "192.0.2.11:51820".parse().unwrap();
        robot1.lookup("10.77.0.13".parse().unwrap(), t0);
        while let Some(o) = robot1.poll_output() {
            if let Output::Send { to, message } = o {
                assert_eq!(to, [10; 32], "{message:?}");
                lh.handle([11; 32], Some(seen), &message.encode(), t0, UNIX);
            }
        }
        let sends: Vec<([u8; 32], Message)> = std::iter::from_fn(|| lh.poll_output())
            .filter_map(|o| match o {
                Output::Send { to, message } => Some((to, message)),
                _ => None,
            })
            .collect();
        // robot2 hears of robot1 as robot1 hears of robot2, not after robot1's Hello.
        let introduce = match &sends[..] {
            [(a, i @ Message::Introduce { member }), (
                b,
                Message::Found {
                    member: Some(_), ..
                },
            )] if *a == [13; 32] && *b == [11; 32] && member.endpoint == Some(seen) => i.clone(),
            _ => panic!("an introduction to robot2, then the answer to robot1: {sends:?}"),
        };
        robot2.handle([10; 32], None, &introduce.encode(), t0, UNIX);
        let out: Vec<Output> = std::iter::from_fn(|| robot2.poll_output()).collect();
        assert!(
            out.iter().any(
                |o| matches!(o, Output::Upsert(s) if s.name == "robot1" && s.endpoint == Some(seen))
            ),
            "robot2 adds robot1 where the lighthouse sees it: {out:?}"
        );
        assert!(
            out.iter().any(
                |o| matches!(o, Output::Send { to, message: Message::Hello { .. } } if *to == [11; 32])
            ),
            "robot2 greets robot1 at once, which starts its handshake: {out:?}"
        );
        // Only a lighthouse introduces: the same message from a member changes nothing.
        let mut robot3 = robot("robot3", 14);
        while robot3.poll_output().is_some() {}
        robot3.handle([11; 32], None, &introduce.encode(), t0, UNIX);
        assert!(
            std::iter::from_fn(|| robot3.poll_output()).all(|o| !matches!(o, Output::Upsert(_))),
            "a member's introduction is ignored"
        );
    }

    #[test]
    fn a_member_outside_the_roster_is_found_on_demand() {
        let t0 = Instant::now();
        let k = ca_key();
        let mut lh = lighthouse(&k, UNIX + 1000, t0);
        let mut robot1 = robot1(&k, t0);
        let mut robot2 = mesh(
            node_cert(&k, "robot2", 13, "10.77.0.13/16", &["robots"], UNIX + 1000),
            &["operators"],
            false,
            t0,
        );
        robot1.handle_timeout(t0, UNIX);
        robot2.handle_timeout(t0, UNIX);
        let changes = settle(
            &mut [(10, &mut lh), (11, &mut robot1), (13, &mut robot2)],
            t0,
        );
        assert!(
            !upserted(&changes, 11, "robot2"),
            "robots do not list robots"
        );
        // robot1 sends a packet to robot2's address: the lighthouse tells it who that is.
        robot1.lookup("10.77.0.13".parse().unwrap(), t0);
        robot1.lookup("10.77.0.13".parse().unwrap(), t0);
        let asked = std::iter::from_fn(|| robot1.poll_output()).collect::<Vec<_>>();
        assert_eq!(
            asked.len(),
            1,
            "one lookup per address and second: {asked:?}"
        );
        for o in asked {
            robot1.out.push_back(o);
        }
        let changes = settle(
            &mut [(10, &mut lh), (11, &mut robot1), (13, &mut robot2)],
            t0,
        );
        assert!(upserted(&changes, 11, "robot2"), "{changes:?}");
        assert!(
            upserted(&changes, 13, "robot1"),
            "robot2 admits robot1's Hello"
        );
        assert_eq!(
            robot1
                .members()
                .iter()
                .find(|m| m.name == "robot2")
                .map(|m| m.source),
            Some("lookup")
        );
        // Outside the overlay, a broadcast, or nobody's: nothing found, nothing admitted.
        robot1.lookup("192.0.2.7".parse().unwrap(), t0);
        robot1.lookup("10.77.255.255".parse().unwrap(), t0);
        assert!(robot1.poll_output().is_none());
        robot1.lookup("10.77.0.99".parse().unwrap(), t0);
        let changes = settle(
            &mut [(10, &mut lh), (11, &mut robot1), (13, &mut robot2)],
            t0,
        );
        assert!(
            changes.iter().all(|(_, o)| !matches!(o, Output::Upsert(_))),
            "{changes:?}"
        );
        // robot2 leaves: at the next refresh the lighthouse no longer finds it, robot1 drops it.
        let later = t0 + REFRESH * 4;
        robot1.handle_timeout(later, UNIX);
        settle(&mut [(10, &mut lh), (11, &mut robot1)], later);
        lh.handle_timeout(later, UNIX);
        settle(&mut [(10, &mut lh), (11, &mut robot1)], later);
        // One refresh later the lighthouse says nobody, but robot1 was found a refresh ago:
        // one answer does not decide alone. Two refreshes without a finding do.
        robot1.handle_timeout(later + REFRESH, UNIX);
        let changes = settle(&mut [(10, &mut lh), (11, &mut robot1)], later + REFRESH);
        assert!(
            changes
                .iter()
                .all(|(_, o)| !matches!(o, Output::Remove { .. })),
            "{changes:?}"
        );
        robot1.handle_timeout(later + REFRESH * 2, UNIX);
        let changes = settle(&mut [(10, &mut lh), (11, &mut robot1)], later + REFRESH * 2);
        assert!(
            changes
                .iter()
                .any(|(n, o)| *n == 11
                    && matches!(o, Output::Remove { name, .. } if name == "robot2")),
            "{changes:?}"
        );
    }

    #[test]
    fn a_member_that_leaves_is_dropped_at_once_and_welcome_back_with_a_hello() {
        let t0 = Instant::now();
        let k = ca_key();
        let mut lh = lighthouse(&k, UNIX + 1000, t0);
        let op_cert = node_cert(
            &k,
            "operator",
            12,
            "10.77.0.12/16",
            &["operators"],
            UNIX + 1000,
        );
        let mut op = mesh(op_cert, &["robots"], false, t0);
        let robot_cert = node_cert(&k, "robot1", 11, "10.77.0.11/16", &["robots"], UNIX + 1000);
        let mut robot = mesh(robot_cert.clone(), &["operators"], false, t0);
        op.handle_timeout(t0, UNIX);
        robot.handle_timeout(t0, UNIX);
        let changes = settle(&mut [(10, &mut lh), (11, &mut robot), (12, &mut op)], t0);
        assert!(upserted(&changes, 12, "robot1"), "{changes:?}");

        robot.leave();
        let changes = settle(&mut [(10, &mut lh), (11, &mut robot), (12, &mut op)], t0);
        let removed = |at: u8| {
            changes.iter().any(|(n, o)| {
                *n == at && matches!(o, Output::Remove { name, .. } if name == "robot1")
            })
        };
        assert!(removed(12) && removed(10), "{changes:?}");
        assert!(!op.members().iter().any(|m| m.name == "robot1"));
        // A roster that still lists it (a late push of a generation from before the Leave) is
        // not believed.
        let seen = op.rosters.get(&[10; 32]).map(|c| c.generation).unwrap();
        let stale = Message::Roster {
            generation: seen,
            page: 0,
            pages: 1,
            members: vec![RosterEntry {
                chain: vec![robot_cert.to_bytes().to_vec()],
                endpoint: None,
                multicast: vec![],
                candidates: vec![],
            }],
        };
        op.handle([10; 32], None, &stale.encode(), t0, UNIX);
        assert!(!op.members().iter().any(|m| m.name == "robot1"));
        // A Leave from a lighthouse, or from a stranger, changes nothing.
        op.handle([10; 32], None, &Message::Leave.encode(), t0, UNIX);
        op.handle([77; 32], None, &Message::Leave.encode(), t0, UNIX);
        assert!(op.poll_output().is_none());
        // It starts again: its Hello (after registering) brings it back at once.
        let mut robot = mesh(robot_cert, &["operators"], false, t0);
        robot.handle_timeout(t0, UNIX);
        let changes = settle(&mut [(10, &mut lh), (11, &mut robot), (12, &mut op)], t0);
        assert!(upserted(&changes, 12, "robot1"), "{changes:?}");
    }

    fn issuer(k: &SigningKey, lifetime: u64) -> super::super::enroll::Issuer {
        super::super::enroll::Issuer {
            ca: ca(k),
            cert: ca(k),
            key: k.clone(),
            lifetime,
        }
    }

    #[test]
    fn certificates_are_renewed_in_the_last_third_of_their_life() {
        let t0 = Instant::now();
        let k = ca_key();
        // Valid from UNIX - 10 to UNIX + 290: renewal opens at UNIX + 190 (the last 100 s).
        let mut lh = lighthouse(&k, UNIX + 290, t0);
        lh.config.issuer = Some(issuer(&k, 3600));
        let mut robot = mesh(
            node_cert(&k, "robot1", 11, "10.77.0.11/16", &["robots"], UNIX + 290),
            &["operators"],
            false,
            t0,
        );
        let mut op = operator(&k, t0);
        robot.handle_timeout(t0, UNIX);
        op.handle_timeout(t0, UNIX);
        settle(&mut [(10, &mut lh), (11, &mut robot), (12, &mut op)], t0);
        // Too early: the member does not ask; a lighthouse asked anyway refuses.
        let t1 = t0 + Duration::from_secs(100);
        robot.handle_timeout(t1, UNIX + 100);
        assert!(
            std::iter::from_fn(|| robot.poll_output()).all(|o| !matches!(
                o,
                Output::Send {
                    message: Message::Renew,
                    ..
                }
            ))
        );
        lh.handle([11; 32], None, &Message::Renew.encode(), t1, UNIX + 100);
        assert!(std::iter::from_fn(|| lh.poll_output()).any(|o| matches!(o, Output::Send { message: Message::RenewRefused { ref reason, .. }, .. } if reason.contains("too early"))));
        // Due: the member asks, the lighthouse signs, the member takes it and re-introduces
        // itself; the operator then keeps it past the old certificate's end.
        let t2 = t0 + Duration::from_secs(200);
        let unix2 = UNIX + 200;
        robot.handle_timeout(t2, unix2);
        let renewed_at = |changes: &[(u8, Output)], at: u8| {
            changes.iter().any(|(n, o)| {
                *n == at && matches!(o, Output::Renewed(c) if c[0].body().not_after > UNIX + 290)
            })
        };
        let changes = settle_at(
            &mut [(10, &mut lh), (11, &mut robot), (12, &mut op)],
            t2,
            unix2,
        );
        assert!(renewed_at(&changes, 11), "{changes:?}");
        lh.handle_timeout(t2, unix2);
        let changes = settle_at(
            &mut [(10, &mut lh), (11, &mut robot), (12, &mut op)],
            t2,
            unix2,
        );
        assert!(renewed_at(&changes, 10), "{changes:?}");
        let renewed = robot.config.chain[0].body().not_after;
        assert_eq!(renewed, unix2 + 3600, "the issuer's lifetime from now");
        assert!(
            lh.config.chain[0].body().not_after > UNIX + 290,
            "the lighthouse renewed itself"
        );
        // Past the old end: neither the operator nor the lighthouse drops the robot.
        let t3 = t0 + Duration::from_secs(400);
        op.handle_timeout(t3, UNIX + 400);
        assert!(std::iter::from_fn(|| op.poll_output())
            .all(|o| !matches!(o, Output::Remove { ref name, .. } if name == "robot1")));
        assert!(op.admitted(&[11; 32]));
        // A renewed chain for another identity is ignored.
        let before = robot.config.chain.clone();
        let stranger = node_cert(&k, "robot9", 11, "10.77.0.19/16", &["robots"], UNIX + 5000);
        robot.handle(
            [10; 32],
            None,
            &Message::Renewed {
                chain: vec![stranger.to_bytes().to_vec()],
            }
            .encode(),
            t3,
            UNIX + 400,
        );
        assert_eq!(robot.config.chain[0].body().name, before[0].body().name);
        assert_eq!(robot.config.chain[0].body().not_after, renewed);
    }

    #[test]
    fn a_lighthouse_that_stops_answering_gets_a_fresh_handshake() {
        let t0 = Instant::now();
        let k = ca_key();
        let mut robot = robot1(&k, t0);
        robot.handle_timeout(t0, UNIX);
        std::iter::from_fn(|| robot.poll_output()).for_each(drop);
        assert!(robot.poll_timeout() <= t0 + ANSWER_TIMEOUT);
        let rehandshakes = |m: &mut Mesh, at: Instant| {
            m.handle_timeout(at, UNIX);
            std::iter::from_fn(|| m.poll_output())
                .filter(|o| matches!(o, Output::Rehandshake(key) if *key == [10; 32]))
                .count()
        };
        assert_eq!(
            rehandshakes(&mut robot, t0 + ANSWER_TIMEOUT / 2),
            0,
            "not yet"
        );
        assert_eq!(rehandshakes(&mut robot, t0 + ANSWER_TIMEOUT), 1);
        // Still silent: the next attempt waits twice as long.
        assert_eq!(rehandshakes(&mut robot, t0 + ANSWER_TIMEOUT * 2), 0);
        assert_eq!(rehandshakes(&mut robot, t0 + ANSWER_TIMEOUT * 3), 1);
        // Any answer ends it.
        robot.handle(
            [10; 32],
            None,
            &Message::Welcome.encode(),
            t0 + ANSWER_TIMEOUT * 3,
            UNIX,
        );
        assert_eq!(rehandshakes(&mut robot, t0 + Duration::from_secs(5)), 0);
    }

    #[test]
    fn the_lighthouse_says_where_it_sees_a_member_and_a_roam_registers_again_at_once() {
        let t0 = Instant::now();
        let k = ca_key();
        let mut lh = lighthouse(&k, UNIX + 1000, t0);
        let mut robot = robot1(&k, t0);
        robot.set_candidates(vec!["10.1.0.2:51820".parse().unwrap()]);
        robot.handle_timeout(t0, UNIX);
        settle(&mut [(10, &mut lh), (11, &mut robot)], t0);
        let c = robot.connectivity();
        assert_eq!(
            c.observed,
            vec![ObservedBy {
                lighthouse: "lighthouse".into(),
                endpoint: "192.0.2.11:51820".parse().unwrap(),
            }]
        );
        // One lighthouse that sees another address than our own cannot tell the NAT's kind.
        assert_eq!(c.nat, "unknown");
        // The roam: the registration goes out now, long before the refresh is due.
        let t1 = t0 + Duration::from_millis(10);
        robot.roamed(t1);
        assert!(robot.connectivity().observed.is_empty());
        let registrations = std::iter::from_fn(|| robot.poll_output())
            .filter(|o| {
                matches!(o, Output::Send { to, message: Message::Register { .. } } if *to == [10; 32])
            })
            .count();
        assert_eq!(registrations, 1);
        // A lighthouse that sees one of our own addresses: no NAT.
        robot.set_candidates(vec!["192.0.2.11:51820".parse().unwrap()]);
        robot.roamed(t1);
        settle(&mut [(10, &mut lh), (11, &mut robot)], t1);
        assert_eq!(robot.connectivity().nat, "none (public address)");
    }

    #[test]
    fn members_get_each_others_candidates_and_a_lighthouse_keeps_none() {
        let t0 = Instant::now();
        let k = ca_key();
        let mut lh = lighthouse(&k, UNIX + 1000, t0);
        let mut robot = robot1(&k, t0);
        let v6: SocketAddr = "[2001:db8:5::11]:51820".parse().unwrap();
        robot.set_candidates(vec![v6]);
        let mut op = operator(&k, t0);
        robot.handle_timeout(t0, UNIX);
        op.handle_timeout(t0, UNIX);
        let changes = settle(&mut [(10, &mut lh), (11, &mut robot), (12, &mut op)], t0);
        let spec = |at: u8| last_upsert(&changes, at, "robot1").map(|s| s.candidates.clone());
        // The operator may try (and offer IPv6 to) the robot's own addresses; the lighthouse
        // keeps seeing it where its registrations come from. (A lighthouse admits members
        // from their registrations, whose candidates go only into the roster; `member_spec`
        // also drops them on a lighthouse, for any other way a member may come to it.)
        assert_eq!(spec(12), Some(vec![v6]), "{changes:?}");
        assert_eq!(spec(10), Some(vec![]), "{changes:?}");
    }

    /// Delivers every message until none is left: node `k` is seen at `seen(k)`, and a message
    /// from `a` to `b` arrives only if `passes(a, b)`. Returns the other outputs.
    fn settle_via(
        nodes: &mut [(u8, &mut Mesh)],
        (now, unix): (Instant, u64),
        seen: impl Fn(u8) -> SocketAddr,
        passes: impl Fn(u8, u8) -> bool,
    ) -> Vec<(u8, Output)> {
        let mut changes = Vec::new();
        loop {
            let mut moved = false;
            for i in 0..nodes.len() {
                let from = nodes[i].0;
                while let Some(o) = nodes[i].1.poll_output() {
                    match o {
                        Output::Send { to, message } => {
                            moved = true;
                            if let Some((k, m)) = nodes.iter_mut().find(|(k, _)| [*k; 32] == to) {
                                if passes(from, *k) {
                                    m.handle(
                                        [from; 32],
                                        Some(seen(from)),
                                        &message.encode(),
                                        now,
                                        unix,
                                    );
                                }
                            }
                        }
                        other => changes.push((from, other)),
                    }
                }
            }
            if !moved {
                return changes;
            }
        }
    }

    fn endpoint_set(changes: &[(u8, Output)], at: u8, name: &str) -> Option<Option<SocketAddr>> {
        changes.iter().rev().find_map(|(n, o)| match o {
            Output::Upsert(spec) if *n == at && spec.name == name => Some(spec.endpoint),
            _ => None,
        })
    }

    #[test]
    fn members_behind_one_nat_meet_on_their_lan_and_fall_back_when_it_leads_nowhere() {
        for lan_works in [true, false] {
            let t0 = Instant::now();
            let k = ca_key();
            let mut lh = lighthouse(&k, UNIX + 1000, t0);
            let mut r1 = mesh(
                node_cert(&k, "robot1", 11, "10.77.0.11/16", &["robots"], UNIX + 1000),
                &["robots"],
                false,
                t0,
            );
            let mut r2 = mesh(
                node_cert(&k, "robot2", 13, "10.77.0.13/16", &["robots"], UNIX + 1000),
                &["robots"],
                false,
                t0,
            );
            r1.set_candidates(vec!["10.1.0.2:51820".parse().unwrap()]);
            r2.set_candidates(vec!["10.1.0.3:51820".parse().unwrap()]);
            // Both behind one public address, 203.0.113.21, with their own ports.
            let seen = |k: u8| -> SocketAddr {
                match k {
                    10 => "192.0.2.1:51820".parse().unwrap(),
                    k => format!("203.0.113.21:{}", 40000 + u16::from(k))
                        .parse()
                        .unwrap(),
                }
            };
            let passes = move |a: u8, b: u8| lan_works || a == 10 || b == 10;
            for m in [&mut r1, &mut r2] {
                m.handle_timeout(t0, UNIX);
            }
            let changes = settle_via(
                &mut [(10, &mut lh), (11, &mut r1), (13, &mut r2)],
                (t0, UNIX),
                seen,
                passes,
            );
            // Rosters reach each robot again at its next registration; the last one counts.
            let t1 = t0 + Duration::from_secs(1);
            let mut all = changes;
            for m in [&mut r1, &mut r2] {
                m.roamed(t1);
            }
            all.extend(settle_via(
                &mut [(10, &mut lh), (11, &mut r1), (13, &mut r2)],
                (t1, UNIX),
                seen,
                passes,
            ));
            assert_eq!(
                endpoint_set(&all, 11, "robot2"),
                Some(Some("10.1.0.3:51820".parse().unwrap())),
                "robot1 tries robot2 on the LAN first"
            );
            // After the trial: a member that answered stays on the LAN, a silent one goes
            // back to the address the lighthouse sees.
            let t2 = t1 + LAN_TRIAL + Duration::from_millis(1);
            assert!(r1.poll_timeout() <= t2);
            r1.handle_timeout(t2, UNIX);
            let after: Vec<(u8, Output)> = std::iter::from_fn(|| r1.poll_output())
                .filter(|o| matches!(o, Output::Upsert(_)))
                .map(|o| (11, o))
                .collect();
            if lan_works {
                assert_eq!(endpoint_set(&after, 11, "robot2"), None, "{after:?}");
            } else {
                assert_eq!(
                    endpoint_set(&after, 11, "robot2"),
                    Some(Some("203.0.113.21:40013".parse().unwrap()))
                );
            }
        }
    }
}
