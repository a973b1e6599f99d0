//! Multicast over the overlay, sans-IO: which packets read from the TUN are replicated (a
//! configured group, a scope wider than this host), to which members (named in `to`, and
//! subscribed to the group through the roster), and the per-group storm caps on both
//! directions. The data plane asks; this module never sees a socket or a clock of its own.
//!
//! The overlay is one link: a packet crosses it unchanged, as it would cross a switch, so a
//! TTL (hop limit) of 1 reaches every member. TTL 0 and interface-local IPv6 scope never leave
//! the host. Receivers write packets to their TUN and never replicate them again, so a packet
//! crosses the mesh once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// Groups one node may take part in: each costs a route and two rate buckets.
pub const MAX_GROUPS: usize = 16;

/// Why a multicast packet was not replicated (or not accepted); the metric's `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// Not a group in `[multicast].groups`.
    NotConfigured,
    /// TTL/hop limit 0, or interface-local scope: it must not leave this host.
    Scope,
    /// Over the group's packet or byte rate.
    RateLimited,
    /// IGMP or MLD: membership is learned through the roster, never across the mesh.
    Membership,
    /// Not an IP packet with a multicast destination.
    Malformed,
}

impl Drop {
    pub fn label(self) -> &'static str {
        match self {
            Drop::NotConfigured => "not_configured",
            Drop::Scope => "scope",
            Drop::RateLimited => "rate_limited",
            Drop::Membership => "membership",
            Drop::Malformed => "malformed",
        }
    }
}

/// `[multicast]` as the data plane applies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Groups this node sends to and receives from (and announces as subscriptions).
    pub groups: Vec<IpAddr>,
    /// Members that get this node's packets: group names of their certificates, or names.
    pub to: Vec<String>,
    /// Per group and direction: packets and bytes a second, with a burst of one second.
    pub max_packets_per_s: u32,
    pub max_bytes_per_s: u32,
}

/// A packet's multicast destination and TTL (hop limit), if it has one.
pub fn destination(packet: &[u8]) -> Option<(IpAddr, u8)> {
    match packet.first()? >> 4 {
        4 => {
            let dst: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            let ip = IpAddr::from(dst);
            ip.is_multicast().then_some((ip, *packet.get(8)?))
        }
        6 => {
            let dst: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            let ip = IpAddr::from(dst);
            ip.is_multicast().then_some((ip, *packet.get(7)?))
        }
        _ => None,
    }
}

/// IGMP (IPv4 protocol 2), or MLD: ICMPv6 types 130-132 and 143, which the kernel sends behind
/// a hop-by-hop header (router alert); nothing else multicast uses that header.
fn is_membership_report(packet: &[u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => packet.get(9) == Some(&2),
        Some(6) => match packet.get(6) {
            Some(0) => true,
            Some(58) => packet.get(40).is_some_and(|t| matches!(t, 130..=132 | 143)),
            _ => false,
        },
        _ => false,
    }
}

/// Whether a packet to `group` with `ttl` may leave the host at all.
fn leaves_host(group: IpAddr, ttl: u8) -> bool {
    if ttl == 0 {
        return false;
    }
    match group {
        // ffx1::/16: interface-local scope.
        IpAddr::V6(g) => g.octets()[1] & 0x0f != 1,
        IpAddr::V4(_) => true,
    }
}

/// A token bucket: `rate` a second, holding at most one second's worth.
#[derive(Clone, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(rate),
            at: now,
        }
    }

    fn refill(&mut self, rate: u32, now: Instant) {
        // Only forward: an earlier `now` must not move `at` back and credit a span twice.
        if now > self.at {
            let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
            self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(rate));
            self.at = now;
        }
    }
}

/// One group's caps in one direction: packets and bytes.
#[derive(Clone, Debug)]
struct Caps {
    packets: Bucket,
    bytes: Bucket,
}

impl Caps {
    fn new(policy: &Policy, now: Instant) -> Caps {
        Caps {
            packets: Bucket::new(policy.max_packets_per_s, now),
            bytes: Bucket::new(policy.max_bytes_per_s, now),
        }
    }

    /// Takes one packet of `len` bytes, or refuses it (and takes nothing).
    fn take(&mut self, policy: &Policy, len: usize, now: Instant) -> bool {
        self.packets.refill(policy.max_packets_per_s, now);
        self.bytes.refill(policy.max_bytes_per_s, now);
        let len = len as f64;
        if self.packets.tokens < 1.0 || self.bytes.tokens < len {
            return false;
        }
        self.packets.tokens -= 1.0;
        self.bytes.tokens -= len;
        true
    }
}

/// The replication decisions of one node, with their rate state.
#[derive(Debug)]
pub struct Replicator {
    policy: Policy,
    out: HashMap<IpAddr, Caps>,
    inbound: HashMap<IpAddr, Caps>,
}

impl Replicator {
    pub fn new(policy: Policy, now: Instant) -> Replicator {
        let caps = |p: &Policy| p.groups.iter().map(|g| (*g, Caps::new(p, now))).collect();
        Replicator {
            out: caps(&policy),
            inbound: caps(&policy),
            policy,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// A packet read from the TUN: the group to replicate it to, or why not.
    pub fn outbound(&mut self, packet: &[u8], now: Instant) -> Result<IpAddr, Drop> {
        judge(&mut self.out, &self.policy, packet, now)
    }

    /// Whether a member (its name, certificate groups and subscribed groups) gets this
    /// node's packets for `group`.
    pub fn wants(
        &self,
        group: IpAddr,
        name: &str,
        groups: &[String],
        subscribed: &[IpAddr],
    ) -> bool {
        subscribed.contains(&group)
            && self
                .policy
                .to
                .iter()
                .any(|t| t == name || groups.iter().any(|g| g == t))
    }

    /// A multicast packet that arrived from a member: accepted for the TUN, or why not. A
    /// member may send only groups this node subscribes to, and within their caps.
    pub fn inbound(&mut self, packet: &[u8], now: Instant) -> Result<IpAddr, Drop> {
        judge(&mut self.inbound, &self.policy, packet, now)
    }
}

/// One direction's verdict: a multicast packet of a configured group, not a membership
/// report, with a scope beyond the host, within the group's caps in `caps`.
fn judge(
    caps: &mut HashMap<IpAddr, Caps>,
    policy: &Policy,
    packet: &[u8],
    now: Instant,
) -> Result<IpAddr, Drop> {
    let (group, ttl) = destination(packet).ok_or(Drop::Malformed)?;
    if is_membership_report(packet) {
        return Err(Drop::Membership);
    }
    if !leaves_host(group, ttl) {
        return Err(Drop::Scope);
    }
    let caps = caps.get_mut(&group).ok_or(Drop::NotConfigured)?;
    if !caps.take(policy, packet.len(), now) {
        return Err(Drop::RateLimited);
    }
    Ok(group)
}

/// The default caps: 128 KiB/s per group, far above DDS discovery (a few packets a second per
/// participant). The outbound cap counts a packet once, before its copies: the uplink carries
/// one copy per member it goes to.
pub const DEFAULT_PACKETS_PER_S: u32 = 200;
pub const DEFAULT_BYTES_PER_S: u32 = 128 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn v4(dst: [u8; 4], ttl: u8, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len.max(28)];
        p[0] = 0x45;
        p[8] = ttl;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&dst);
        p
    }

    fn v6(dst: std::net::Ipv6Addr, hops: u8) -> Vec<u8> {
        let mut p = vec![0u8; 48];
        p[0] = 0x60;
        p[6] = 17;
        p[7] = hops;
        p[24..40].copy_from_slice(&dst.octets());
        p
    }

    fn policy(groups: &[&str]) -> Policy {
        Policy {
            groups: groups.iter().map(|g| g.parse().unwrap()).collect(),
            to: vec!["robots".into(), "operator".into()],
            max_packets_per_s: 10,
            max_bytes_per_s: 10_000,
        }
    }

    #[test]
    fn only_configured_groups_with_a_scope_beyond_the_host_leave() {
        let now = Instant::now();
        let mut r = Replicator::new(policy(&["239.255.0.1", "ff05::1:3", "ff01::5"]), now);
        assert_eq!(
            r.outbound(&v4([239, 255, 0, 1], 1, 100), now),
            Ok("239.255.0.1".parse().unwrap())
        );
        assert_eq!(
            r.outbound(&v4([239, 255, 0, 2], 1, 100), now),
            Err(Drop::NotConfigured)
        );
        assert_eq!(
            r.outbound(&v4([239, 255, 0, 1], 0, 100), now),
            Err(Drop::Scope)
        );
        assert_eq!(
            r.outbound(&v4([10, 0, 0, 2], 64, 100), now),
            Err(Drop::Malformed)
        );
        assert_eq!(
            r.outbound(&v6("ff05::1:3".parse().unwrap(), 1), now),
            Ok("ff05::1:3".parse().unwrap())
        );
        assert_eq!(
            r.outbound(&v6("ff01::5".parse().unwrap(), 1), now),
            Err(Drop::Scope)
        );
        assert_eq!(
            r.inbound(&v4([239, 255, 0, 2], 1, 100), now),
            Err(Drop::NotConfigured)
        );
        // Membership reports to a configured group stay on this host.
        let mut igmp = v4([239, 255, 0, 1], 1, 100);
        igmp[9] = 2;
        assert_eq!(r.outbound(&igmp, now), Err(Drop::Membership));
        let mut mld = v6("ff05::1:3".parse().unwrap(), 1);
        mld[6] = 0;
        assert_eq!(r.outbound(&mld, now), Err(Drop::Membership));
        let mut mld = v6("ff05::1:3".parse().unwrap(), 1);
        mld[6] = 58;
        mld[40] = 131;
        assert_eq!(r.inbound(&mld, now), Err(Drop::Membership));
        assert!(r.inbound(&v4([239, 255, 0, 1], 1, 100), now).is_ok());
    }

    #[test]
    fn members_get_a_group_only_when_named_in_to_and_subscribed() {
        let r = Replicator::new(policy(&["239.255.0.1"]), Instant::now());
        let g: IpAddr = "239.255.0.1".parse().unwrap();
        let other: IpAddr = "239.255.0.2".parse().unwrap();
        assert!(r.wants(g, "robot2", &["robots".into()], &[g]));
        assert!(r.wants(g, "operator", &[], &[other, g]));
        assert!(!r.wants(g, "robot2", &["robots".into()], &[other]));
        assert!(!r.wants(g, "camera", &["sensors".into()], &[g]));
    }

    #[test]
    fn a_flood_is_cut_to_the_cap_and_the_cap_refills() {
        let t0 = Instant::now();
        let mut r = Replicator::new(policy(&["239.255.0.1"]), t0);
        let p = v4([239, 255, 0, 1], 1, 100);
        let passed = (0..1000).filter(|_| r.outbound(&p, t0).is_ok()).count();
        assert_eq!(passed, 10, "the packet cap (a burst of one second)");
        assert_eq!(r.outbound(&p, t0), Err(Drop::RateLimited));
        let later = t0 + Duration::from_millis(500);
        let passed = (0..1000).filter(|_| r.outbound(&p, later).is_ok()).count();
        assert_eq!(passed, 5, "half a second refills half the cap");
        // The byte cap: 10 000 bytes a second, 1 500-byte packets.
        let mut r = Replicator::new(policy(&["239.255.0.1"]), t0);
        let big = v4([239, 255, 0, 1], 1, 1500);
        let passed = (0..1000).filter(|_| r.outbound(&big, t0).is_ok()).count();
        assert_eq!(passed, 6);
        // Directions and groups have caps of their own.
        assert!(r.inbound(&big, t0).is_ok());
    }

    proptest! {
        #[test]
        fn never_panics_and_never_passes_more_than_the_caps(
            packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 0..200),
            steps_ms in proptest::collection::vec(0u64..50, 0..200),
        ) {
            let t0 = Instant::now();
            let mut r = Replicator::new(policy(&["239.255.0.1", "ff05::1:3"]), t0);
            let mut now = t0;
            let mut passed = 0u64;
            for (i, mut p) in packets.into_iter().enumerate() {
                now += Duration::from_millis(*steps_ms.get(i).unwrap_or(&0));
                if i % 2 == 0 && p.len() >= 20 {
                    // Some of them multicast to a configured group.
                    p[0] = 0x45;
                    p[16..20].copy_from_slice(&[239, 255, 0, 1]);
                }
                if r.outbound(&p, now).is_ok() {
                    passed += 1;
                }
                let _ = r.inbound(&p, now);
            }
            let secs = now.saturating_duration_since(t0).as_secs_f64();
            // Two groups, each a burst of 10 plus 10 a second.
            prop_assert!(passed as f64 <= 2.0 * (10.0 + 10.0 * secs) + 1e-6);
        }
    }
}
