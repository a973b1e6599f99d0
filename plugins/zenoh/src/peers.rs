//! Which zenoh routers to connect to, derived from the VPN's mesh (sans-IO: the mesh and the
//! set of connected routers in, connection targets out).
//!
//! Every node's zenoh id is derived from its WireGuard public key, so a node knows the id of
//! each peer's router before connecting and zenoh refuses anything else on that address.

use crate::config::locator;
use myelin_sdk::{MeshView, PeerView};
use std::collections::HashSet;
use std::net::IpAddr;

/// The zenoh id (lower-case hex, no leading zero) of the node with this public key.
pub fn zid_for(public_key: &str) -> String {
    // FNV-1a over the key text, twice with different offsets: stable across versions and
    // platforms, and the key itself is already uniformly random.
    let fnv = |offset: u64| {
        public_key.bytes().fold(offset, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let mut hex = format!(
        "{:016x}{:016x}",
        fnv(0xcbf2_9ce4_8422_2325),
        fnv(0x6c62_272e_07bb_0142)
    );
    // uhlc ids may not start with 0.
    if hex.starts_with('0') {
        hex.replace_range(0..1, "1");
    }
    hex
}

/// The peer's own overlay address: its first host route (/32, then /128) among its allowed IPs.
pub fn overlay_address(peer: &PeerView) -> Option<IpAddr> {
    let hosts = peer
        .overlay_ips
        .iter()
        .filter(|n| n.prefix_len() == n.max_prefix_len());
    hosts
        .clone()
        .find(|n| n.addr().is_ipv4())
        .or_else(|| hosts.clone().next())
        .map(|n| n.addr())
}

/// One router this node should be connected to.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub peer: String,
    pub zid: String,
    pub locator: String,
}

/// The routers of every peer whose tunnel is up, with whether each is connected now.
pub fn targets(mesh: &MeshView, port: u16) -> Vec<Target> {
    mesh.peers
        .iter()
        .filter(|p| p.up)
        .filter_map(|p| {
            Some(Target {
                peer: p.name.clone(),
                zid: zid_for(&p.public_key),
                locator: locator(overlay_address(p)?, port),
            })
        })
        .collect()
}

/// The targets to dial now: up, not connected, and not being dialled already.
pub fn to_dial(
    mesh: &MeshView,
    port: u16,
    connected: &HashSet<String>,
    dialling: &HashSet<String>,
) -> Vec<Target> {
    targets(mesh, port)
        .into_iter()
        .filter(|t| !connected.contains(&t.zid) && !dialling.contains(&t.zid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, key: &str, ips: &[&str], up: bool) -> PeerView {
        PeerView {
            name: name.into(),
            public_key: key.into(),
            overlay_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            up,
            ..PeerView::default()
        }
    }

    #[test]
    fn zids_are_stable_distinct_and_valid() {
        let a = zid_for("YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY=");
        let b = zid_for("YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTc=");
        assert_eq!(a, zid_for("YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY="));
        assert_ne!(a, b);
        for z in [&a, &b] {
            assert_eq!(z.len(), 32);
            assert!(!z.starts_with('0'));
            // Parsed and printed back unchanged: connected ids compare by their text.
            let parsed: zenoh::config::ZenohId = z.parse().unwrap();
            assert_eq!(&parsed.to_string(), z);
        }
    }

    #[test]
    fn the_overlay_address_is_a_host_route() {
        let p = peer(
            "gw",
            "k",
            &["10.9.0.0/24", "fd77::5/128", "10.77.0.5/32"],
            true,
        );
        assert_eq!(overlay_address(&p), Some("10.77.0.5".parse().unwrap()));
        let v6 = peer("v6", "k", &["fd77::5/128"], true);
        assert_eq!(overlay_address(&v6), Some("fd77::5".parse().unwrap()));
        assert_eq!(
            overlay_address(&peer("net", "k", &["10.9.0.0/24"], true)),
            None
        );
    }

    #[test]
    fn dials_up_peers_that_are_neither_connected_nor_dialling() {
        let mesh = MeshView {
            peers: vec![
                peer("robot1", "k1", &["10.77.0.2/32"], true),
                peer("robot2", "k2", &["10.77.0.3/32"], false),
                peer("robot3", "k3", &["10.77.0.4/32"], true),
                peer("robot4", "k4", &["10.77.0.5/32"], true),
            ],
        };
        let connected = HashSet::from([zid_for("k3")]);
        let dialling = HashSet::from([zid_for("k4")]);
        let dial = to_dial(&mesh, 7447, &connected, &dialling);
        assert_eq!(
            dial,
            vec![Target {
                peer: "robot1".into(),
                zid: zid_for("k1"),
                locator: "tcp/10.77.0.2:7447".into()
            }]
        );
        // Once robot2's tunnel comes up it is dialled too, without any restart.
        let mut later = mesh.clone();
        later.peers[1].up = true;
        let dial = to_dial(&later, 7447, &connected, &dialling);
        assert_eq!(dial.len(), 2);
        assert_eq!(dial[1].locator, "tcp/10.77.0.3:7447");
    }
}
