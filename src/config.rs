//! The node's typed configuration: parsing, validation, and errors that name the file, line,
//! key and fix. Also the atomic write-back of a plugin's `enabled` flag.

use ipnet::IpNet;
use serde::Deserialize;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {cause}\n  fix: check the path, or create one with `myelin init --name <name> --address <cidr>`")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}{line}: key `{key}`: {message}\n  fix: {hint}", line = line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        line: Option<usize>,
        key: String,
        message: String,
        hint: String,
    },
    #[error("cannot save {path}: {cause}\n  fix: make the file and its directory writable by the node, or edit it by hand")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// The whole file, as parsed.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    #[serde(default)]
    pub control: ControlConfig,
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    #[serde(default)]
    pub probe: ProbeConfig,
    /// Membership in a certificate-based mesh (lighthouses, roster).
    #[serde(default)]
    pub mesh: Option<MeshSection>,
    #[serde(default)]
    pub lighthouse: LighthouseSection,
    /// Who may reach what over the tunnel; none: everything (today's behaviour).
    #[serde(default)]
    pub firewall: Option<FirewallSection>,
    /// The fleet's names (`<member>.<domain>`), served on the overlay addresses.
    #[serde(default)]
    pub dns: DnsSection,
    /// Multicast groups carried over the overlay (docs/robotics.md); none: not carried.
    #[serde(default)]
    pub multicast: Option<MulticastSection>,
    /// Relaying WireGuard datagrams between members that cannot reach each other directly.
    #[serde(default)]
    pub relay: RelaySection,
    #[serde(default, rename = "plugins")]
    plugins_raw: toml::Table,
    #[serde(skip)]
    pub plugins: PluginsConfig,
    #[serde(skip)]
    pub path: PathBuf,
    #[serde(skip)]
    text: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSection {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Every member is `<name>.<domain>` (`.internal` is reserved for private use).
    #[serde(default = "default_dns_domain")]
    pub domain: String,
    #[serde(default = "default_dns_port")]
    pub port: u16,
    /// Tell systemd-resolved (when it runs) to send the domain's lookups here.
    #[serde(default = "default_true")]
    pub register: bool,
}

impl Default for DnsSection {
    fn default() -> Self {
        Self {
            enabled: true,
            domain: default_dns_domain(),
            port: default_dns_port(),
            register: true,
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_dns_domain() -> String {
    "myelin.internal".into()
}

fn default_dns_port() -> u16 {
    53
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: NodeName,
    pub private_key_file: PathBuf,
    #[serde(default = "default_listen_port")]
    pub listen_port: u16,
    #[serde(default)]
    pub address: Vec<IpNet>,
    #[serde(default = "default_interface")]
    pub interface: String,
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// Drop packets for the overlay addresses that do not arrive through the TUN device (an
    /// nftables table the node installs and removes), so overlay-bound services cannot be
    /// reached from the physical network. `false` only where nftables is unavailable.
    #[serde(default = "default_overlay_guard")]
    pub overlay_guard: bool,
}

fn default_overlay_guard() -> bool {
    true
}
fn default_listen_port() -> u16 {
    51820
}
fn default_interface() -> String {
    "myelin0".into()
}
fn default_mtu() -> u16 {
    1420
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    #[serde(default = "default_control_listen")]
    pub listen: SocketAddr,
    /// Listeners for remote access (one address or a list, e.g. the underlay and the overlay
    /// addresses). A request on one needs `Authorization: Bearer <token>` from `token_file`,
    /// or must come through the tunnel from a member in one of `allow_groups`.
    #[serde(default, deserialize_with = "one_or_many")]
    pub remote_listen: Vec<SocketAddr>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Certificate groups whose members may use the remote API through the tunnel without a
    /// token (their identity is the certificate of the peer the request came from).
    #[serde(default)]
    pub allow_groups: Vec<String>,
    /// The port of the other members' APIs on their overlay addresses, which the fleet view
    /// (`/api/v1/fleet`, `myelin fleet`) asks for their cards.
    #[serde(default = "default_fleet_port")]
    pub fleet_port: u16,
}

fn default_fleet_port() -> u16 {
    7800
}

/// `"addr"` or `["addr", ...]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(SocketAddr),
        Many(Vec<SocketAddr>),
    }
    Ok(
        match OneOrMany::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected an address like \"10.77.0.1:7800\" or a list of them",
            )
        })? {
            OneOrMany::One(a) => vec![a],
            OneOrMany::Many(v) => v,
        },
    )
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            listen: default_control_listen(),
            remote_listen: Vec::new(),
            token_file: None,
            allow_groups: Vec::new(),
            fleet_port: default_fleet_port(),
        }
    }
}

fn default_control_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7800))
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshSection {
    /// The fleet's CA certificate.
    pub ca: PathBuf,
    /// This node's certificate (followed by its signer's, when a signer issued it).
    pub cert: PathBuf,
    #[serde(default)]
    pub lighthouses: Vec<LighthouseRefConfig>,
    /// Groups whose members this node learns about.
    #[serde(default)]
    pub talk_to: Vec<String>,
    #[serde(default = "default_refresh_s")]
    pub refresh_s: u64,
    /// The CA's revocation list (`myelin ca revoke`), re-read when it changes.
    #[serde(default)]
    pub revocations: Option<PathBuf>,
    /// While relayed to a member because one NAT maps every destination anew, look for a
    /// direct path by probing many ports (docs/mesh.md); false: stay on the relay.
    #[serde(default = "default_true")]
    pub many_ports: bool,
}

fn default_refresh_s() -> u64 {
    30
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LighthouseRefConfig {
    #[serde(default = "default_lighthouse_name")]
    pub name: NodeName,
    pub endpoint: SocketAddr,
    pub public_key: crate::keys::PublicKey,
    /// The lighthouse's overlay address.
    pub overlay: IpAddr,
}

fn default_lighthouse_name() -> NodeName {
    NodeName("lighthouse".into())
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LighthouseSection {
    #[serde(default)]
    pub enabled: bool,
    /// TCP address for enrollments with tokens (`myelin join`); none: no enrollment here.
    #[serde(default)]
    pub enroll_listen: Option<SocketAddr>,
    /// The key and certificate that sign enrolled members (a signer's, or the CA's).
    #[serde(default)]
    pub signer_key: Option<PathBuf>,
    #[serde(default)]
    pub signer_cert: Option<PathBuf>,
    /// Spent tokens and allocated addresses.
    #[serde(default = "default_lighthouse_state")]
    pub state_file: PathBuf,
    /// Lifetime of the certificates this lighthouse signs ("30d", "12h"); members renew
    /// theirs here in the last third of it.
    #[serde(default)]
    pub cert_lifetime: Option<String>,
}

/// `[relay]`: a mesh node that forwards members' WireGuard datagrams (ciphertext it holds no
/// key for) between members that cannot reach each other directly.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySection {
    /// Relay for members; unset: lighthouses relay, other nodes do not.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Per member, what it may send through this relay (its peers' answers count against
    /// them); bursts of one second of it are allowed.
    #[serde(default = "default_relay_kbit")]
    pub member_kbit_per_s: u32,
}

fn default_relay_kbit() -> u32 {
    20_000
}

impl Default for RelaySection {
    fn default() -> Self {
        RelaySection {
            enabled: None,
            member_kbit_per_s: default_relay_kbit(),
        }
    }
}

impl RelaySection {
    /// Whether this node relays: as configured, else when it is a lighthouse; never outside
    /// a mesh (only certified members may use a relay).
    pub fn enabled(&self, config: &Config) -> bool {
        config.mesh.is_some() && self.enabled.unwrap_or(config.lighthouse.enabled)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MulticastSection {
    /// Groups this node sends to and receives from, e.g. `["239.255.0.1"]` (DDS discovery).
    pub groups: Vec<IpAddr>,
    /// Members that get this node's packets: groups of their certificates, or their names.
    pub to: Vec<String>,
    /// Per group and direction; bursts of one second of each are allowed.
    #[serde(default = "default_multicast_packets")]
    pub max_packets_per_s: u32,
    #[serde(default = "default_multicast_bytes")]
    pub max_bytes_per_s: u32,
}

fn default_multicast_packets() -> u32 {
    crate::tunnel::multicast::DEFAULT_PACKETS_PER_S
}

fn default_multicast_bytes() -> u32 {
    crate::tunnel::multicast::DEFAULT_BYTES_PER_S
}

impl MulticastSection {
    /// The section as the data plane applies it.
    pub fn policy(&self) -> crate::tunnel::multicast::Policy {
        crate::tunnel::multicast::Policy {
            groups: self.groups.clone(),
            to: self.to.clone(),
            max_packets_per_s: self.max_packets_per_s,
            max_bytes_per_s: self.max_bytes_per_s,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallSection {
    /// "allow" or "deny"; default "deny" once any inbound rule exists, else "allow".
    #[serde(default)]
    pub default_inbound: Option<String>,
    /// "allow" (default) or "deny".
    #[serde(default)]
    pub default_outbound: Option<String>,
    #[serde(default)]
    pub inbound: Vec<FirewallRule>,
    #[serde(default)]
    pub outbound: Vec<FirewallRule>,
    /// How long a flow lives idle: "12m" (TCP), "3m" (UDP), "10m" (other) unless set.
    #[serde(default)]
    pub tcp_timeout: Option<String>,
    #[serde(default)]
    pub udp_timeout: Option<String>,
    #[serde(default)]
    pub other_timeout: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallRule {
    /// Shown in drops and `myelin firewall`; default `inbound[N]` / `outbound[N]`.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub cidr: Option<IpNet>,
    #[serde(default = "any")]
    pub proto: String,
    #[serde(default = "any")]
    pub port: String,
}

fn any() -> String {
    "any".into()
}

impl FirewallSection {
    /// The rules as the data plane applies them; errors name the rule and the fix.
    pub fn rule_set(
        &self,
    ) -> Result<crate::policy::firewall::RuleSet, crate::policy::firewall::RuleError> {
        use crate::policy::firewall as fw;
        let rules = |list: &[FirewallRule], side: &str| -> Result<Vec<fw::Rule>, fw::RuleError> {
            list.iter()
                .enumerate()
                .map(|(i, r)| {
                    let name = r.name.clone().unwrap_or_else(|| format!("{side}[{i}]"));
                    let proto = fw::parse_proto(&name, &r.proto)?;
                    let ports = fw::parse_ports(&name, &r.port)?;
                    if matches!(proto, fw::Proto::Any | fw::Proto::Icmp) && ports != (0, u16::MAX) {
                        return Err(fw::RuleError::PortWithoutProto { rule: name });
                    }
                    Ok(fw::Rule {
                        name,
                        peers: fw::Peers {
                            groups: r.groups.clone(),
                            hosts: r.hosts.clone(),
                            cidr: r.cidr,
                        },
                        proto,
                        ports,
                    })
                })
                .collect()
        };
        let timeout = |key: &'static str, text: Option<&str>, default| match text {
            None => Ok(default),
            Some(t) => crate::mesh::cert::parse_lifetime(t)
                .map(std::time::Duration::from_secs)
                .and_then(|d| {
                    if d <= fw::MAX_TIMEOUT {
                        Ok(d)
                    } else {
                        Err(
                            "at most 1 day (\"24h\"): a flow kept longer only fills the table"
                                .into(),
                        )
                    }
                })
                .map_err(|why| fw::RuleError::Timeout {
                    key,
                    value: t.to_string(),
                    why,
                }),
        };
        let inbound = rules(&self.inbound, "inbound")?;
        let outbound = rules(&self.outbound, "outbound")?;
        Ok(fw::RuleSet {
            default_inbound_allow: match &self.default_inbound {
                Some(t) => fw::parse_default("default_inbound", t)?,
                None => inbound.is_empty(),
            },
            default_outbound_allow: match &self.default_outbound {
                Some(t) => fw::parse_default("default_outbound", t)?,
                None => true,
            },
            inbound,
            outbound,
            timeouts: fw::Timeouts {
                tcp: timeout("tcp_timeout", self.tcp_timeout.as_deref(), fw::TCP_TIMEOUT)?,
                udp: timeout("udp_timeout", self.udp_timeout.as_deref(), fw::UDP_TIMEOUT)?,
                other: timeout(
                    "other_timeout",
                    self.other_timeout.as_deref(),
                    fw::OTHER_TIMEOUT,
                )?,
            },
        })
    }
}

fn default_lighthouse_state() -> PathBuf {
    PathBuf::from("/var/lib/myelin/lighthouse.json")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub name: NodeName,
    pub public_key: crate::keys::PublicKey,
    #[serde(default)]
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    #[serde(default)]
    pub persistent_keepalive: Option<u16>,
    /// Multicast groups the peer takes part in (`[multicast]` on both ends); mesh members
    /// announce theirs through the roster instead.
    #[serde(default)]
    pub multicast: Vec<IpAddr>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    #[serde(default = "default_probe_interval")]
    pub interval_ms: u64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            interval_ms: default_probe_interval(),
        }
    }
}

fn default_probe_interval() -> u64 {
    100
}

/// A node or peer name, sanitised to `[A-Za-z0-9_]` with no leading digit.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct NodeName(String);

impl NodeName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for NodeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for NodeName {
    type Error = String;
    fn try_from(raw: String) -> Result<Self, String> {
        sanitize_name(&raw).map(NodeName)
    }
}

/// `robot-1.local` → `robot_1_local`. Names that cannot become a ROS token are refused.
pub fn sanitize_name(raw: &str) -> Result<String, String> {
    let clean: String = raw
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    match clean.chars().next() {
        None => Err("name is empty; use letters, digits and `_`, e.g. \"robot1\"".into()),
        Some(c) if c.is_ascii_digit() => Err(format!(
            "name {raw:?} starts with a digit, which ROS names forbid; e.g. \"robot_{clean}\""
        )),
        Some(_) if clean.chars().all(|c| c == '_') => Err(format!(
            "name {raw:?} has no letter or digit; e.g. \"robot1\""
        )),
        Some(_) => Ok(clean),
    }
}

/// How a plugin instance is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    Process,
    Thread,
}

/// The plugin host's own settings (plain keys of `[plugins]`).
#[derive(Clone, Debug, PartialEq)]
pub struct HostSettings {
    /// Who process plugins run as. Unset: the system user `myelin` (created when absent) if
    /// the node is root, else the node's own user; root only when named (`user = "root"`).
    pub user: Option<String>,
    pub runtime_dir: PathBuf,
    /// Persistent state, one directory per instance (survives reboots, unlike runtime_dir).
    pub state_dir: PathBuf,
    pub health_interval_ms: u64,
    pub health_timeout_ms: u64,
    pub start_timeout_ms: u64,
    pub stop_grace_ms: u64,
    pub restart_backoff_ms: u64,
    pub restart_backoff_max_ms: u64,
    pub failure_threshold: u32,
    pub failure_window_s: u64,
}

impl Default for HostSettings {
    fn default() -> Self {
        Self {
            user: None,
            runtime_dir: PathBuf::from("/run/myelin"),
            state_dir: PathBuf::from("/var/lib/myelin/plugins"),
            health_interval_ms: 1000,
            health_timeout_ms: 3000,
            start_timeout_ms: 30_000,
            stop_grace_ms: 3000,
            restart_backoff_ms: 1000,
            restart_backoff_max_ms: 60_000,
            failure_threshold: 5,
            failure_window_s: 300,
        }
    }
}

/// One `[plugins.<name>]` section.
#[derive(Clone, Debug, PartialEq)]
pub struct PluginInstanceConfig {
    /// The section name: instance name, API name and HTTP prefix.
    pub name: String,
    /// The registration to run (`plugin = "..."`, default: the section name).
    pub kind: String,
    pub enabled: bool,
    pub isolation: Isolation,
    pub worker_threads: usize,
    /// The rest of the section, handed to the plugin.
    pub section: toml::Table,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PluginsConfig {
    pub host: HostSettings,
    pub instances: Vec<PluginInstanceConfig>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        Config::parse(&text, path)
    }

    /// Parses `text`; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            let key = line
                .map(|l| key_at_line(text, l))
                .unwrap_or_else(|| "<file>".into());
            ConfigError::Invalid {
                path: path.to_path_buf(),
                line,
                key,
                message: e.message().trim().to_string(),
                hint: "see config.example.toml for every key and its allowed values".into(),
            }
        })?;
        config.path = path.to_path_buf();
        config.text = text.to_string();
        let invalid = |keys: &[&str], message: String, hint: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: locate(text, keys),
            key: keys.join("."),
            message,
            hint: hint.to_string(),
        };
        if config.node.mtu < 576 || config.node.mtu > 9000 {
            return Err(invalid(
                &["node", "mtu"],
                format!("mtu {} is outside 576..=9000", config.node.mtu),
                "use 1420 unless the underlay path needs less",
            ));
        }
        if config.node.interface.is_empty() || config.node.interface.len() > 15 {
            return Err(invalid(
                &["node", "interface"],
                format!(
                    "interface name {:?} must be 1 to 15 characters",
                    config.node.interface
                ),
                "e.g. interface = \"myelin0\"",
            ));
        }
        if !config.control.listen.ip().is_loopback() {
            return Err(invalid(
                &["control", "listen"],
                format!(
                    "control.listen {} is not a loopback address: the API there needs no token",
                    config.control.listen
                ),
                "keep listen = \"127.0.0.1:7800\" and use remote_listen (with a token_file) for access from elsewhere",
            ));
        }
        if config.dns.enabled {
            if let Err(e) = crate::dns::zone::check_domain(&config.dns.domain) {
                return Err(invalid(
                    &["dns", "domain"],
                    e,
                    "e.g. domain = \"myelin.internal\"",
                ));
            }
            if config.dns.port == 0 {
                return Err(invalid(
                    &["dns", "port"],
                    "port 0 is no port".into(),
                    "the default is 53",
                ));
            }
        }
        let control = &config.control;
        if !control.remote_listen.is_empty()
            && control.token_file.is_none()
            && control.allow_groups.is_empty()
        {
            return Err(invalid(
                &["control", "remote_listen"],
                "remote_listen needs a token_file or allow_groups: every remote request must be authorised".into(),
                "add token_file = \"/etc/myelin/api.token\" (mode 0600, one line of random text), or allow_groups = [\"operators\"] for members through the tunnel, or remove remote_listen",
            ));
        }
        if !control.allow_groups.is_empty() {
            if control.remote_listen.is_empty() {
                return Err(invalid(
                    &["control", "allow_groups"],
                    "allow_groups grants the remote API, but there is no remote_listen".into(),
                    "add remote_listen = \"<this node's overlay address>:7800\"",
                ));
            }
            if !config.node.overlay_guard {
                return Err(invalid(
                    &["control", "allow_groups"],
                    "allow_groups trusts a request's overlay source address, which only the overlay guard makes sure came through the tunnel".into(),
                    "keep [node].overlay_guard = true (the default), or use a token_file instead of allow_groups",
                ));
            }
        }
        if config.probe.interval_ms == 0 {
            return Err(invalid(
                &["probe", "interval_ms"],
                "interval_ms must be at least 1".into(),
                "the default is 100",
            ));
        }
        if config.relay.enabled == Some(true) && config.mesh.is_none() {
            return Err(invalid(
                &["relay", "enabled"],
                "a relay serves mesh members (it checks their certificates), and this node has no [mesh]".into(),
                "add a [mesh] section, or remove [relay]",
            ));
        }
        if config.relay.member_kbit_per_s == 0 {
            return Err(invalid(
                &["relay", "member_kbit_per_s"],
                "member_kbit_per_s must be at least 1".into(),
                "the default is 20000 (20 Mbit/s per member); set [relay] enabled = false to relay nothing",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for peer in &config.peers {
            if !seen.insert(peer.name.as_str().to_string()) || peer.name == config.node.name {
                return Err(invalid(
                    &["peers", "name"],
                    format!("peer name `{}` is used twice", peer.name),
                    "give every peer, and this node, its own name",
                ));
            }
        }
        if let Some(mesh) = &config.mesh {
            if mesh.refresh_s == 0 || mesh.refresh_s > 3600 {
                return Err(invalid(
                    &["mesh", "refresh_s"],
                    format!("refresh_s {} is outside 1..=3600", mesh.refresh_s),
                    "the default is 30",
                ));
            }
            for g in &mesh.talk_to {
                if let Err(e) = crate::mesh::cert::check_group(g) {
                    return Err(invalid(
                        &["mesh", "talk_to"],
                        e.to_string(),
                        "e.g. talk_to = [\"operators\"]",
                    ));
                }
            }
            if mesh.lighthouses.is_empty() && !config.lighthouse.enabled {
                return Err(invalid(
                    &["mesh", "lighthouses"],
                    "a mesh member needs at least one lighthouse".into(),
                    "lighthouses = [{ endpoint = \"192.0.2.1:51820\", public_key = \"...\", overlay = \"10.77.0.1\" }], or [lighthouse] enabled = true on the lighthouse itself",
                ));
            }
            if config.lighthouse.enroll_listen.is_some()
                && (config.lighthouse.signer_key.is_none()
                    || config.lighthouse.signer_cert.is_none())
            {
                return Err(invalid(
                    &["lighthouse", "enroll_listen"],
                    "enrollment needs signer_key and signer_cert: the key that signs new members".into(),
                    "signer_key = \"/etc/myelin/signer.key\" and signer_cert = \"/etc/myelin/signer.crt\" (from `myelin ca sign --signer`)",
                ));
            }
        } else if config.lighthouse.enabled {
            return Err(invalid(
                &["lighthouse", "enabled"],
                "a lighthouse needs a [mesh] section with the fleet's ca and its own cert".into(),
                "add [mesh] ca = \"/etc/myelin/ca.crt\" and cert = \"/etc/myelin/node.crt\"",
            ));
        }
        if let Some(mc) = &config.multicast {
            if mc.groups.is_empty() || mc.groups.len() > crate::tunnel::multicast::MAX_GROUPS {
                return Err(invalid(
                    &["multicast", "groups"],
                    format!(
                        "{} groups; one node takes part in 1 to {}",
                        mc.groups.len(),
                        crate::tunnel::multicast::MAX_GROUPS
                    ),
                    "e.g. groups = [\"239.255.0.1\"] (DDS discovery), or remove [multicast]",
                ));
            }
            for (i, g) in mc.groups.iter().enumerate() {
                if !g.is_multicast() {
                    return Err(invalid(
                        &["multicast", "groups"],
                        format!("{g} is not a multicast address"),
                        "IPv4 groups are in 224.0.0.0/4, IPv6 groups in ff00::/8",
                    ));
                }
                if mc.groups[..i].contains(g) {
                    return Err(invalid(
                        &["multicast", "groups"],
                        format!("{g} is listed twice"),
                        "list each group once",
                    ));
                }
            }
            if mc.to.is_empty() {
                return Err(invalid(
                    &["multicast", "to"],
                    "no member would get this node's packets".into(),
                    "e.g. to = [\"robots\", \"operators\"] (groups of members, or names)",
                ));
            }
            if mc.max_packets_per_s == 0 || mc.max_bytes_per_s < u32::from(config.node.mtu) {
                return Err(invalid(
                    &["multicast", "max_packets_per_s"],
                    format!(
                        "caps of {} packets and {} bytes a second pass nothing",
                        mc.max_packets_per_s, mc.max_bytes_per_s
                    ),
                    "the defaults are 200 packets and 131072 bytes a second per group; the byte cap must hold one packet of [node].mtu",
                ));
            }
        }
        for peer in &config.peers {
            if peer.multicast.len() > crate::tunnel::multicast::MAX_GROUPS
                || peer.multicast.iter().any(|g| !g.is_multicast())
            {
                return Err(invalid(
                    &["peers", "multicast"],
                    format!(
                        "peer `{}`: up to {} multicast addresses (IPv4 224.0.0.0/4, IPv6 ff00::/8)",
                        peer.name,
                        crate::tunnel::multicast::MAX_GROUPS
                    ),
                    "e.g. multicast = [\"239.255.0.1\"]",
                ));
            }
        }
        if let Some(fw) = &config.firewall {
            if let Err(e) = fw.rule_set() {
                return Err(invalid(
                    &["firewall"],
                    e.to_string(),
                    "see docs/policy.md for the rule format",
                ));
            }
        }
        config.plugins = parse_plugins(&config.plugins_raw).map_err(|(keys, message, hint)| {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            invalid(&keys, message, &hint)
        })?;
        Ok(config)
    }
}

impl Config {
    /// An error about `keys` (a dotted path), located in this config's file.
    pub fn error_at(&self, keys: &[&str], message: String, hint: &str) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            line: locate(&self.text, keys),
            key: keys.join("."),
            message,
            hint: hint.to_string(),
        }
    }
}

type PathError = (Vec<String>, String, String);

fn parse_plugins(raw: &toml::Table) -> Result<PluginsConfig, PathError> {
    let mut host = HostSettings::default();
    let mut instances = Vec::new();
    let err = |keys: &[&str], message: String, hint: &str| -> PathError {
        (
            keys.iter().map(|k| k.to_string()).collect(),
            message,
            hint.to_string(),
        )
    };
    for (key, value) in raw {
        let number = |v: &toml::Value| -> Result<u64, PathError> {
            v.as_integer()
                .and_then(|i| u64::try_from(i).ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    err(
                        &["plugins", key],
                        format!("expected a positive integer, found {v}"),
                        "see config.example.toml",
                    )
                })
        };
        match (key.as_str(), value) {
            ("user", toml::Value::String(u)) => host.user = Some(u.clone()),
            ("runtime_dir", toml::Value::String(d)) => host.runtime_dir = PathBuf::from(d),
            ("state_dir", toml::Value::String(d)) => host.state_dir = PathBuf::from(d),
            ("health_interval_ms", v) => host.health_interval_ms = number(v)?,
            ("health_timeout_ms", v) => host.health_timeout_ms = number(v)?,
            ("start_timeout_ms", v) => host.start_timeout_ms = number(v)?,
            ("stop_grace_ms", v) => host.stop_grace_ms = number(v)?,
            ("restart_backoff_ms", v) => host.restart_backoff_ms = number(v)?,
            ("restart_backoff_max_ms", v) => host.restart_backoff_max_ms = number(v)?,
            ("failure_threshold", v) => {
                host.failure_threshold = u32::try_from(number(v)?).unwrap_or(u32::MAX)
            }
            ("failure_window_s", v) => host.failure_window_s = number(v)?,
            (name, toml::Value::Table(section)) => {
                instances.push(parse_instance(name, section)?);
            }
            (name, _) => {
                return Err(err(
                    &["plugins", name],
                    format!("unknown key `plugins.{name}` (plugin sections are tables: [plugins.{name}])"),
                    "host keys are user, runtime_dir, state_dir, health_interval_ms, health_timeout_ms, start_timeout_ms, stop_grace_ms, restart_backoff_ms, restart_backoff_max_ms, failure_threshold, failure_window_s",
                ))
            }
        }
    }
    if host.restart_backoff_max_ms < host.restart_backoff_ms {
        return Err(err(
            &["plugins", "restart_backoff_max_ms"],
            "restart_backoff_max_ms is below restart_backoff_ms".into(),
            "make the maximum at least the initial backoff",
        ));
    }
    Ok(PluginsConfig { host, instances })
}

fn parse_instance(name: &str, section: &toml::Table) -> Result<PluginInstanceConfig, PathError> {
    let path = |k: &str| vec!["plugins".to_string(), name.to_string(), k.to_string()];
    if sanitize_name(name).as_deref() != Ok(name) {
        return Err((
            vec!["plugins".into(), name.into()],
            format!("plugin instance name `{name}` must be [A-Za-z0-9_] with no leading digit"),
            "rename the section, e.g. [plugins.camera_front]".into(),
        ));
    }
    let mut rest = section.clone();
    let enabled = match rest.remove("enabled") {
        None => true,
        Some(toml::Value::Boolean(b)) => b,
        Some(v) => {
            return Err((
                path("enabled"),
                format!("expected true or false, found {v}"),
                "enabled = true".into(),
            ))
        }
    };
    let isolation = match rest.remove("isolation") {
        None => Isolation::Process,
        Some(toml::Value::String(s)) if s == "process" => Isolation::Process,
        Some(toml::Value::String(s)) if s == "thread" => Isolation::Thread,
        Some(v) => {
            return Err((
                path("isolation"),
                format!("expected \"process\" or \"thread\", found {v}"),
                "isolation = \"process\" (the default) survives crashes of the plugin".into(),
            ))
        }
    };
    let kind = match rest.remove("plugin") {
        None => name.to_string(),
        Some(toml::Value::String(s)) => s,
        Some(v) => {
            return Err((
                path("plugin"),
                format!("expected a plugin name, found {v}"),
                "plugin = \"chaos\" (see `myelin version` for the compiled-in plugins)".into(),
            ))
        }
    };
    let worker_threads = match rest.remove("worker_threads") {
        None => 2,
        Some(toml::Value::Integer(n)) if (1..=64).contains(&n) => n as usize,
        Some(v) => {
            return Err((
                path("worker_threads"),
                format!("expected 1..=64, found {v}"),
                "worker_threads = 2".into(),
            ))
        }
    };
    Ok(PluginInstanceConfig {
        name: name.to_string(),
        kind,
        enabled,
        isolation,
        worker_threads,
        section: rest,
    })
}

/// 1-based line of byte offset `at`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// `section.key` for the key assigned on `line`, from the nearest `[header]` above it.
fn key_at_line(text: &str, line: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let Some(current) = lines.get(line.saturating_sub(1)) else {
        return "<file>".into();
    };
    let key = current.split('=').next().unwrap_or("").trim();
    let header = lines[..line.saturating_sub(1)]
        .iter()
        .rev()
        .find_map(|l| header_of(l));
    match (header, key.starts_with('[')) {
        (_, true) => key.trim_matches(['[', ']']).to_string(),
        (Some(h), false) => format!("{h}.{key}"),
        (None, false) => key.to_string(),
    }
}

fn header_of(line: &str) -> Option<String> {
    let t = line.trim();
    let inner = t
        .strip_prefix('[')?
        .split(']')
        .next()?
        .trim_start_matches('[');
    Some(inner.replace(['"', ' '], ""))
}

/// The line of `keys` (a dotted path) in `text`, found by its section header and key.
fn locate(text: &str, keys: &[&str]) -> Option<usize> {
    let (key, table) = keys.split_last()?;
    let table = table.join(".");
    let mut in_table = table.is_empty();
    let mut table_line = None;
    for (i, line) in text.lines().enumerate() {
        if let Some(h) = header_of(line) {
            in_table = h == table;
            if in_table && table_line.is_none() {
                table_line = Some(i + 1);
            }
            if h == format!("{table}.{key}") || (table.is_empty() && h == *key) {
                return Some(i + 1);
            }
            continue;
        }
        if in_table && line.split('=').next().map(str::trim) == Some(key) {
            return Some(i + 1);
        }
    }
    table_line
}

/// Sets `plugins.<instance>.enabled` in the file, keeping comments; temp file, fsync, rename.
pub fn persist_plugin_enabled(
    path: &Path,
    instance: &str,
    enabled: bool,
) -> Result<(), ConfigError> {
    let write_err = |cause| ConfigError::Write {
        path: path.to_path_buf(),
        cause,
    };
    let text = std::fs::read_to_string(path).map_err(write_err)?;
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| {
        write_err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            e.to_string(),
        ))
    })?;
    let plugins = doc
        .entry("plugins")
        .or_insert_with(|| toml_edit::Item::Table(toml_edit::Table::new()));
    let Some(plugins) = plugins.as_table_mut() else {
        return Err(write_err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "`plugins` is not a table",
        )));
    };
    let section = plugins
        .entry(instance)
        .or_insert_with(|| toml_edit::Item::Table(toml_edit::Table::new()));
    let Some(section) = section.as_table_like_mut() else {
        return Err(write_err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("`plugins.{instance}` is not a table"),
        )));
    };
    section.insert("enabled", toml_edit::value(enabled));
    write_atomically(path, doc.to_string().as_bytes()).map_err(write_err)
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        if let Ok(meta) = std::fs::metadata(path) {
            f.set_permissions(meta.permissions())?;
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn minimal(extra: &str) -> String {
        format!("[node]\nname = \"robot1\"\nprivate_key_file = \"/tmp/k\"\n{extra}")
    }

    fn err(text: &str) -> String {
        match Config::parse(text, Path::new("t.toml")) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn example_config_parses_with_every_section() {
        let text = include_str!("../config.example.toml");
        let config = Config::parse(text, Path::new("config.example.toml")).unwrap();
        assert_eq!(config.node.name.as_str(), "robot1");
        assert!(!config.peers.is_empty());
        assert!(!config.plugins.instances.is_empty());
        #[cfg(feature = "telemetry")]
        assert!(myelin_sdk::registration("telemetry").is_some());
        // Every plugin section is one its plugin accepts (no typos rot in the example).
        for inst in &config.plugins.instances {
            if let Some(reg) = myelin_sdk::registration(&inst.kind) {
                assert!(
                    (reg.build)(&inst.section).is_ok(),
                    "[plugins.{}] in the example",
                    inst.name
                );
            }
        }
        assert_eq!(config.node.address.len(), 2);
        assert!(config.multicast.is_some_and(|m| m.groups.len() == 2));
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = err(&minimal("mtuu = 1400\n"));
        assert!(e.contains("line 4"), "{e}");
        assert!(e.contains("node.mtuu"), "{e}");
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn bad_value_names_line_and_key() {
        let e = err(&minimal("[control]\nlisten = \"localhost\"\n"));
        assert!(e.contains("line 5") && e.contains("control.listen"), "{e}");
        let e = err(&minimal("address = [\"10.0.0.1/40\"]\n"));
        assert!(e.contains("line 4") && e.contains("node.address"), "{e}");
        let e = err(&minimal(&format!(
            "[[peers]]\nname = \"op\"\npublic_key = \"{}\"\nallowed_ips = []\n",
            &KEY[..20]
        )));
        assert!(
            e.contains("line 6") && e.contains("peers.public_key"),
            "{e}"
        );
    }

    #[test]
    fn the_token_free_api_listens_only_on_loopback() {
        let e = err(&minimal("[control]\nlisten = \"0.0.0.0:7800\"\n"));
        assert!(
            e.contains("control.listen") && e.contains("loopback"),
            "{e}"
        );
        assert!(e.contains("remote_listen"), "{e}");
        let ok = Config::parse(
            &minimal("[control]\nlisten = \"[::1]:7800\"\n"),
            Path::new("t.toml"),
        );
        assert!(ok.is_ok(), "{:?}", ok.err());
    }

    #[test]
    fn multicast_groups_and_members_are_checked() {
        let section = |body: &str| minimal(&format!("[multicast]\n{body}"));
        let ok = Config::parse(
            &section("groups = [\"239.255.0.1\", \"ff05::1:3\"]\nto = [\"operators\"]\n"),
            Path::new("t.toml"),
        )
        .unwrap();
        let mc = ok.multicast.unwrap();
        assert_eq!(mc.max_packets_per_s, 200);
        assert_eq!(mc.policy().groups.len(), 2);
        let e = err(&section("groups = [\"10.0.0.1\"]\nto = [\"robots\"]\n"));
        assert!(
            e.contains("10.0.0.1 is not a multicast address") && e.contains("224.0.0.0/4"),
            "{e}"
        );
        let e = err(&section(
            "groups = [\"239.255.0.1\", \"239.255.0.1\"]\nto = [\"robots\"]\n",
        ));
        assert!(e.contains("listed twice"), "{e}");
        let e = err(&section("groups = [\"239.255.0.1\"]\nto = []\n"));
        assert!(e.contains("multicast.to") && e.contains("no member"), "{e}");
        let e = err(&section("groups = []\nto = [\"robots\"]\n"));
        assert!(e.contains("multicast.groups"), "{e}");
        let e = err(&section(
            "groups = [\"239.255.0.1\"]\nto = [\"robots\"]\nmax_packets_per_s = 0\n",
        ));
        assert!(e.contains("pass nothing"), "{e}");
        let e = err(&minimal(&format!(
            "[[peers]]\nname = \"op\"\npublic_key = \"{KEY}\"\nallowed_ips = [\"10.77.0.2/32\"]\nmulticast = [\"10.0.0.1\"]\n"
        )));
        assert!(e.contains("peers.multicast") && e.contains("`op`"), "{e}");
    }

    #[test]
    fn firewall_timeouts_are_checked() {
        let fw = |t: &str| {
            Config::parse(
                &minimal(&format!("[firewall]\nudp_timeout = \"{t}\"\n")),
                Path::new("t.toml"),
            )
            .map_err(|e| e.to_string())
            .and_then(|c| c.firewall.unwrap().rule_set().map_err(|e| e.to_string()))
        };
        assert_eq!(
            fw("90s").unwrap().timeouts.udp,
            std::time::Duration::from_secs(90)
        );
        let e = fw("2d").unwrap_err();
        assert!(
            e.contains("udp_timeout") && e.contains("at most 1 day"),
            "{e}"
        );
        assert!(fw("soon").unwrap_err().contains("udp_timeout"));
    }

    #[test]
    fn remote_access_needs_a_token_or_groups_and_groups_need_the_guard() {
        let e = err(&minimal("[control]\nremote_listen = \"10.77.0.1:7800\"\n"));
        assert!(e.contains("token_file or allow_groups"), "{e}");
        let e = err(&minimal("[control]\nallow_groups = [\"operators\"]\n"));
        assert!(e.contains("no remote_listen"), "{e}");
        let e = err(&minimal("[control]\nremote_listen = 7800\n"));
        assert!(e.contains("a list of them"), "{e}");
        let c = Config::parse(
            &minimal("[control]\nremote_listen = [\"10.77.0.1:7800\", \"[fd77::1]:7800\"]\nallow_groups = [\"operators\"]\n"),
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.control.remote_listen.len(), 2);
        let unguarded = minimal(
            "[control]\nremote_listen = \"10.77.0.1:7800\"\nallow_groups = [\"operators\"]\n",
        )
        .replace("[node]\n", "[node]\noverlay_guard = false\n");
        let e = err(&unguarded);
        assert!(e.contains("overlay_guard"), "{e}");
    }

    #[test]
    fn names_are_sanitised_or_refused() {
        let c = Config::parse(
            "[node]\nname = \"robot-1.lab\"\nprivate_key_file = \"k\"\n",
            Path::new("t"),
        )
        .unwrap();
        assert_eq!(c.node.name.as_str(), "robot_1_lab");
        let e = err("[node]\nname = \"9lives\"\nprivate_key_file = \"k\"\n");
        assert!(e.contains("line 2") && e.contains("digit"), "{e}");
    }

    #[test]
    fn plugin_sections_split_host_keys() {
        let c = Config::parse(
            &minimal("[plugins]\nhealth_interval_ms = 50\n[plugins.steady]\nplugin = \"chaos\"\nisolation = \"thread\"\nmode = \"none\"\n"),
            Path::new("t"),
        )
        .unwrap();
        assert_eq!(c.plugins.host.health_interval_ms, 50);
        let i = &c.plugins.instances[0];
        assert_eq!((i.name.as_str(), i.kind.as_str()), ("steady", "chaos"));
        assert_eq!(i.isolation, Isolation::Thread);
        assert!(i.enabled);
        assert_eq!(i.section.len(), 1);
        let e = err(&minimal("[plugins.x]\nisolation = \"fork\"\n"));
        assert!(
            e.contains("line 5") && e.contains("plugins.x.isolation"),
            "{e}"
        );
        let e = err(&minimal("[plugins]\nhealth_interval_ms = -3\n"));
        assert!(
            e.contains("line 5") && e.contains("plugins.health_interval_ms"),
            "{e}"
        );
    }

    #[test]
    fn persist_keeps_comments_and_flips_enabled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.toml");
        std::fs::write(
            &path,
            minimal("# keep me\n[plugins.chaos]\nmode = \"none\"\n"),
        )
        .unwrap();
        persist_plugin_enabled(&path, "chaos", false).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("# keep me"));
        let c = Config::parse(&text, &path).unwrap();
        assert!(!c.plugins.instances[0].enabled);
        persist_plugin_enabled(&path, "chaos", true).unwrap();
        let c = Config::load(&path).unwrap();
        assert!(c.plugins.instances[0].enabled);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}
