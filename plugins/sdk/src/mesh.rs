//! The node's identity and its view of the mesh, as handed to plugins.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Who this node is.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeIdentity {
    /// Sanitised node name (`[A-Za-z0-9_]`, no leading digit).
    pub name: String,
    /// WireGuard public key, base64.
    pub public_key: String,
    /// Overlay addresses of this node with their prefix lengths.
    pub overlay_addresses: Vec<IpNet>,
    /// The node's local control API (loopback, no token): `/metrics`, `/api/v1/...`.
    #[serde(default)]
    pub control_api: Option<SocketAddr>,
}

/// The peers as the tunnel sees them; plugins get updates through a `watch` channel.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MeshView {
    pub peers: Vec<PeerView>,
}

/// One peer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerView {
    pub name: String,
    pub public_key: String,
    /// The peer's allowed IPs; its overlay addresses are among them.
    pub overlay_ips: Vec<IpNet>,
    /// Where its packets come from now (roaming updates this); while relayed, the direct
    /// address last known (tried again every few seconds).
    pub endpoint: Option<SocketAddr>,
    /// The relay its datagrams go through (a lighthouse's name); `None`: direct.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// How often its path changed (direct to relay and back).
    #[serde(default)]
    pub path_changes: u64,
    /// Milliseconds since the last completed handshake.
    pub last_handshake_age_ms: Option<u64>,
    /// Probe round-trip time; `None` for peers that do not answer probes (plain WireGuard).
    pub rtt_ms: Option<f64>,
    pub jitter_ms: Option<f64>,
    /// Fraction of recent probes lost, 0.0..=1.0.
    pub loss: Option<f64>,
    /// Milliseconds since the last probe answer.
    pub last_seen_ms: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    #[serde(default)]
    pub rx_packets: u64,
    #[serde(default)]
    pub tx_packets: u64,
    /// A handshake is current.
    pub up: bool,
    /// The latest probes, oldest first, as they stood when this view was published: exact
    /// per-probe data for plugins that judge the link probe by probe (safety).
    #[serde(default)]
    pub recent_probes: Vec<ProbeSample>,
}

/// One probe to a peer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeSample {
    /// Increases by one per probe sent to this peer.
    pub seq: u64,
    /// Milliseconds since it was sent, when the view was published.
    pub age_ms: f64,
    /// Its round trip, once answered.
    pub rtt_ms: Option<f64>,
}

impl MeshView {
    /// The peer called `name`.
    pub fn peer(&self, name: &str) -> Option<&PeerView> {
        self.peers.iter().find(|p| p.name == name)
    }
}
