//! The `[plugins.zenoh]` section: parsing, validation, the ROS namespace rules, and the zenoh and
//! ros2dds configurations built from it.

use myelin_sdk::{config_error, PluginError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::IpAddr;

/// ROS 2 distributions with 16-byte GIDs (Iron and later), which the bridge handles natively.
const DISTROS: [&str; 5] = ["humble", "iron", "jazzy", "kilted", "rolling"];

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A robot: its ROS names are published under `/<node name>`.
    #[default]
    Robot,
    /// An operator station or server: no namespace, so it sees `/robot1/...`.
    Operator,
}

/// Which ROS interfaces the bridge routes (regular expressions on ROS names).
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Interfaces {
    #[serde(skip_serializing_if = "Option::is_none")]
    publishers: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subscribers: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_servers: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_clients: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    action_servers: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    action_clients: Option<String>,
}

impl Interfaces {
    fn fields(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("publishers", &self.publishers),
            ("subscribers", &self.subscribers),
            ("service_servers", &self.service_servers),
            ("service_clients", &self.service_clients),
            ("action_servers", &self.action_servers),
            ("action_clients", &self.action_clients),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZenohConfig {
    /// The zenoh router's TCP port on the overlay addresses and loopback; the same on every node.
    #[serde(default = "default_port")]
    pub listen_port: u16,
    #[serde(default)]
    pub role: Role,
    /// Overrides the role's namespace (`/<node name>` for robots, `/` for operators).
    pub namespace: Option<String>,
    /// ROS_DOMAIN_ID of the local ROS 2 nodes.
    #[serde(default)]
    pub domain: u32,
    /// ROS_DISTRO of the local ROS 2 nodes.
    #[serde(default = "default_distro")]
    pub ros_distro: String,
    pub allow: Option<Interfaces>,
    pub deny: Option<Interfaces>,
    /// `"<regex>=<Hz>"`: the most often a matching topic is routed.
    #[serde(default)]
    pub pub_max_frequencies: Vec<String>,
    /// `"<regex>=<priority 1..7>[:express]"`.
    #[serde(default)]
    pub pub_priorities: Vec<String>,
    /// The bridge's `queries_timeout` table, passed through.
    pub queries_timeout: Option<myelin_sdk::toml::Value>,
    pub transient_local_cache_multiplier: Option<usize>,
    /// Extra zenoh settings applied last: `"<zenoh config path>" = <value>`.
    #[serde(default)]
    pub zenoh_config: myelin_sdk::toml::Table,
}

fn default_port() -> u16 {
    7447
}

fn default_distro() -> String {
    "jazzy".into()
}

/// Checks a ROS namespace: `/`, or `/`-separated tokens of `[A-Za-z0-9_]` not starting with a
/// digit.
pub fn check_namespace(ns: &str) -> Result<(), String> {
    if ns == "/" {
        return Ok(());
    }
    let Some(rest) = ns.strip_prefix('/') else {
        return Err(format!("namespace `{ns}` must start with `/`"));
    };
    for token in rest.split('/') {
        let mut chars = token.chars();
        match chars.next() {
            None => {
                return Err(format!(
                    "namespace `{ns}` has an empty part (`//` or a trailing `/`)"
                ))
            }
            Some(c) if c.is_ascii_digit() => {
                return Err(format!(
                    "namespace `{ns}`: part `{token}` starts with a digit"
                ))
            }
            _ => {}
        }
        if let Some(bad) = token
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
        {
            return Err(format!(
                "namespace `{ns}`: `{bad}` is not allowed (only letters, digits and `_`)"
            ));
        }
    }
    Ok(())
}

/// A node name turned into one ROS token: other characters become `_`, and a leading digit
/// gets a `n` in front.
pub fn ros_token(name: &str) -> String {
    let mut token: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if token.is_empty() || token.starts_with(|c: char| c.is_ascii_digit()) {
        token.insert(0, 'n');
    }
    token
}

fn json_of(value: &myelin_sdk::toml::Value) -> Value {
    use myelin_sdk::toml::Value as T;
    match value {
        T::String(s) => Value::String(s.clone()),
        T::Integer(i) => json!(i),
        T::Float(f) => json!(f),
        T::Boolean(b) => Value::Bool(*b),
        T::Datetime(d) => Value::String(d.to_string()),
        T::Array(a) => Value::Array(a.iter().map(json_of).collect()),
        T::Table(t) => Value::Object(t.iter().map(|(k, v)| (k.clone(), json_of(v))).collect()),
    }
}

impl ZenohConfig {
    /// Parses and validates a section, checking the bridge's options with the bridge's own
    /// parser and the extra zenoh settings with zenoh's.
    pub fn parse(section: &myelin_sdk::toml::Table) -> Result<Self, PluginError> {
        let config: ZenohConfig = myelin_sdk::parse_section(section)?;
        if config.listen_port == 0 {
            return Err(config_error(
                "listen_port = 0: peers need a fixed port to connect to; use 7447 (the default)",
            ));
        }
        if let Some(ns) = &config.namespace {
            check_namespace(ns).map_err(|e| {
                config_error(format!(
                    "{e}; fix the namespace key, e.g. \"/robot1\" or \"/\""
                ))
            })?;
        }
        if !DISTROS.contains(&config.ros_distro.as_str()) {
            return Err(config_error(format!(
                "ros_distro = \"{}\" is not a ROS 2 distribution this bridge supports; use one of {}",
                config.ros_distro,
                DISTROS.join(", ")
            )));
        }
        if config.allow.is_some() && config.deny.is_some() {
            return Err(config_error(
                "allow and deny are both set; the bridge takes one of them: keep allow (routes only what matches) or deny (routes all but what matches)",
            ));
        }
        // The bridge parses allow/deny in a flattened Option, which turns a bad expression into
        // "no filter" silently; check them here so a typo never routes everything.
        for (key, set) in [("allow", &config.allow), ("deny", &config.deny)] {
            for (field, expr) in set.iter().flat_map(Interfaces::fields) {
                regex::Regex::new(expr).map_err(|e| {
                    config_error(format!(
                        "{key}.{field} = \"{expr}\" is not a regular expression: {e}"
                    ))
                })?;
            }
        }
        let ros2dds = config.ros2dds("/");
        zenoh_plugin_ros2dds::config::Config::deserialize(ros2dds).map_err(|e| {
            config_error(format!(
                "the ROS 2 bridge rejects these settings: {e}; check allow/deny, pub_max_frequencies (\"<regex>=<Hz>\"), pub_priorities (\"<regex>=<1..7>[:express]\") and queries_timeout"
            ))
        })?;
        let mut probe = base_config();
        config.apply_extra(&mut probe)?;
        Ok(config)
    }

    /// The ROS namespace this node's bridge uses.
    pub fn namespace(&self, node_name: &str) -> String {
        match (&self.namespace, self.role) {
            (Some(ns), _) => ns.clone(),
            (None, Role::Operator) => "/".into(),
            (None, Role::Robot) => format!("/{}", ros_token(node_name)),
        }
    }

    /// The bridge's own configuration (`plugins/ros2dds`). DDS stays on this host: the
    /// LOCALHOST discovery range (no multicast, localhost as the only peer), so DDS never
    /// reaches the TUN interface.
    pub fn ros2dds(&self, namespace: &str) -> Value {
        let mut c = json!({
            "namespace": namespace,
            "domain": self.domain,
            "ros_automatic_discovery_range": "LOCALHOST",
            "ros_localhost_only": false,
        });
        let obj = c.as_object_mut();
        if let Some(obj) = obj {
            if let Some(a) = &self.allow {
                obj.insert("allow".into(), json!(a));
            }
            if let Some(d) = &self.deny {
                obj.insert("deny".into(), json!(d));
            }
            if !self.pub_max_frequencies.is_empty() {
                obj.insert(
                    "pub_max_frequencies".into(),
                    json!(self.pub_max_frequencies),
                );
            }
            if !self.pub_priorities.is_empty() {
                obj.insert("pub_priorities".into(), json!(self.pub_priorities));
            }
            if let Some(q) = &self.queries_timeout {
                obj.insert("queries_timeout".into(), json_of(q));
            }
            if let Some(m) = self.transient_local_cache_multiplier {
                obj.insert("transient_local_cache_multiplier".into(), json!(m));
            }
        }
        c
    }

    /// The embedded router's configuration for a node with these overlay addresses.
    pub fn zenoh(
        &self,
        zid: &str,
        node_name: &str,
        overlay: &[IpAddr],
    ) -> Result<zenoh::Config, PluginError> {
        let mut listen: Vec<String> = overlay
            .iter()
            .map(|ip| locator(*ip, self.listen_port))
            .collect();
        listen.push(locator(IpAddr::from([127, 0, 0, 1]), self.listen_port));
        let mut c = base_config();
        let set = |c: &mut zenoh::Config, key: &str, value: Value| {
            c.insert_json5(key, &value.to_string())
                .map_err(|e| config_error(format!("zenoh setting {key}: {e}")))
        };
        set(&mut c, "id", json!(zid))?;
        set(&mut c, "mode", json!("router"))?;
        set(&mut c, "listen/endpoints", json!(listen))?;
        set(&mut c, "connect/endpoints", json!([]))?;
        set(
            &mut c,
            "plugins/ros2dds",
            self.ros2dds(&self.namespace(node_name)),
        )?;
        self.apply_extra(&mut c)?;
        Ok(c)
    }

    fn apply_extra(&self, c: &mut zenoh::Config) -> Result<(), PluginError> {
        for (key, value) in &self.zenoh_config {
            c.insert_json5(key, &json_of(value).to_string())
                .map_err(|e| {
                    config_error(format!(
                        "zenoh_config.\"{key}\": {e}; keys are zenoh config paths such as \"transport/unicast/max_links\""
                    ))
                })?;
        }
        Ok(())
    }
}

/// The settings every Myelin router has: no multicast scouting and no gossip (the VPN's peer
/// list is the discovery), timestamps for the bridge, the admin space for its routes.
fn base_config() -> zenoh::Config {
    let mut c = zenoh::Config::default();
    for (key, value) in [
        ("scouting/multicast/enabled", "false"),
        ("scouting/gossip/enabled", "false"),
        ("timestamping/enabled", "true"),
        ("adminspace/enabled", "true"),
        ("plugins_loading/enabled", "true"),
        ("transport/unicast/open_timeout", "3000"),
    ] {
        if let Err(e) = c.insert_json5(key, value) {
            // Keys of zenoh's own schema: a failure here means zenoh's schema changed.
            eprintln!("zenoh plugin: cannot set {key}: {e}");
        }
    }
    c
}

/// `tcp/<ip>:<port>`, with brackets for IPv6.
pub fn locator(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("tcp/{v4}:{port}"),
        IpAddr::V6(v6) => format!("tcp/[{v6}]:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ZenohConfig, PluginError> {
        ZenohConfig::parse(&myelin_sdk::toml::from_str(text).unwrap())
    }

    fn message(r: Result<ZenohConfig, PluginError>) -> String {
        match r {
            Err(PluginError::Config { message }) => message,
            Err(e) => panic!("not a config error: {e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn roles_give_the_fleet_namespaces() {
        let robot = parse("").unwrap();
        assert_eq!(robot.namespace("robot1"), "/robot1");
        assert_eq!(robot.namespace("3dprinter-a"), "/n3dprinter_a");
        let op = parse("role = \"operator\"").unwrap();
        assert_eq!(op.namespace("operator"), "/");
        let explicit = parse("namespace = \"/fleet_a/r1\"").unwrap();
        assert_eq!(explicit.namespace("robot1"), "/fleet_a/r1");
    }

    #[test]
    fn namespaces_follow_ros_token_rules() {
        for bad in ["robot1", "/robot-1", "/1robot", "/a//b", "/a/"] {
            let m = message(parse(&format!("namespace = \"{bad}\"")));
            assert!(m.contains("namespace"), "{bad}: {m}");
        }
        assert!(check_namespace("/").is_ok());
        assert!(check_namespace("/robot_1/arm").is_ok());
    }

    #[test]
    fn bridge_options_are_checked_by_the_bridge() {
        let ok = parse(
            r#"
            domain = 7
            ros_distro = "humble"
            pub_max_frequencies = [".*/camera/.*=5"]
            pub_priorities = ["/cmd_vel=2:express"]
            transient_local_cache_multiplier = 4
            [allow]
            publishers = "/chatter|/tf"
            [queries_timeout]
            default = 3.0
            "#,
        )
        .unwrap();
        let v = ok.ros2dds("/robot1");
        assert_eq!(v["domain"], 7);
        assert_eq!(v["allow"]["publishers"], "/chatter|/tf");
        assert_eq!(v["ros_automatic_discovery_range"], "LOCALHOST");
        assert!(message(parse("pub_max_frequencies = [\"(=5\"]")).contains("bridge"));
        assert!(message(parse("pub_priorities = [\"/x=9\"]")).contains("bridge"));
        assert!(message(parse("[allow]\npublishers = \"(\"")).contains("allow.publishers"));
        assert!(message(parse(
            "[allow]\npublishers = \"a\"\n[deny]\npublishers = \"b\""
        ))
        .contains("both"));
        assert!(message(parse("ros_distro = \"foxy\"")).contains("jazzy"));
        assert!(message(parse("listen_prot = 1")).contains("listen_prot"));
        assert!(message(parse("listen_port = 0")).contains("7447"));
    }

    #[test]
    fn zenoh_settings_listen_on_overlay_and_loopback() {
        let c = parse("listen_port = 7500\n[zenoh_config]\n\"transport/unicast/max_links\" = 2")
            .unwrap();
        let z = c
            .zenoh(
                "1234abcd",
                "robot1",
                &["10.77.0.2".parse().unwrap(), "fd77::2".parse().unwrap()],
            )
            .unwrap();
        let listen = z.get_json("listen/endpoints").unwrap();
        assert!(listen.contains("tcp/10.77.0.2:7500"), "{listen}");
        assert!(listen.contains("tcp/[fd77::2]:7500"), "{listen}");
        assert!(listen.contains("tcp/127.0.0.1:7500"), "{listen}");
        assert_eq!(z.get_json("scouting/multicast/enabled").unwrap(), "false");
        assert_eq!(z.get_json("transport/unicast/max_links").unwrap(), "2");
        assert!(z
            .get_json("plugins/ros2dds/namespace")
            .unwrap()
            .contains("/robot1"));
        assert!(message(parse("[zenoh_config]\n\"no/such/key\" = 1")).contains("no/such/key"));
    }
}
