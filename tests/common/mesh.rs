//! Fleets that form their mesh from certificates and a lighthouse, with no static peers: the
//! fleet's CA (made with the CLI, as a user would), `[mesh]` config sections, and
//! `mesh_formed_fleet`, the certificate-based counterpart of `meshed_fleet`.

use super::netns::Fleet;
use super::{Node, Spec, BIN};

/// The fleet's CA, made with the CLI as a user would, and certificates signed by it. Its
/// directory (CA key, certificates) lives as long as this value.
pub struct Fleetca {
    pub dir: tempfile::TempDir,
}

impl Fleetca {
    pub fn new(name: &str) -> Fleetca {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let out = std::process::Command::new(BIN)
            .args([
                "ca",
                "init",
                "--name",
                name,
                "--dir",
                dir.path().to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Fleetca { dir }
    }

    /// The CA certificate's path.
    pub fn ca(&self) -> String {
        format!("{}/ca.crt", self.dir.path().display())
    }

    /// Signs `spec`'s key and addresses with `groups`; returns the certificate's path.
    pub fn sign(&self, spec: &Spec, groups: &str) -> String {
        let out_path = format!("{}/{}.crt", self.dir.path().display(), spec.name);
        let out = std::process::Command::new(BIN)
            .args([
                "ca",
                "sign",
                "--ca-dir",
                self.dir.path().to_str().unwrap(),
                "--name",
                &spec.name,
                "--pubkey",
                &spec.public,
                "--address",
                &spec.addresses[0],
                "--groups",
                groups,
                "--out",
                &out_path,
                "--force",
            ])
            .args(
                spec.addresses
                    .iter()
                    .skip(1)
                    .flat_map(|a| ["--address", a.as_str()]),
            )
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out_path
    }
}

/// A `[mesh]` section: CA `ca`, own certificate `cert`, the lighthouse (its spec and underlay
/// endpoint) if any, `talk_to` as TOML list items (`"\"robots\", \"operators\""`), and a 2 s
/// refresh so membership changes play out quickly.
pub fn mesh_section(
    ca: &str,
    cert: &str,
    lighthouse: Option<(&Spec, &str)>,
    talk_to: &str,
) -> String {
    let lighthouses = match lighthouse {
        Some((l, endpoint)) => format!(
            "lighthouses = [{{ endpoint = \"{endpoint}\", public_key = \"{}\", overlay = \"{}\" }}]\n",
            l.public,
            l.addresses[0].split('/').next().unwrap()
        ),
        None => String::new(),
    };
    format!("[mesh]\nca = \"{ca}\"\ncert = \"{cert}\"\ntalk_to = [{talk_to}]\nrefresh_s = 2\n{lighthouses}")
}

/// A fleet whose nodes find each other through a lighthouse, by certificate. The lighthouse
/// runs for as long as this value; the nodes of `specs` are started by the test.
pub struct MeshFleet {
    /// The lighthouse node (no plugins), in the last namespace of `fleet`. Declared first, so
    /// it stops before its namespace goes.
    pub lighthouse: Node,
    /// `fleet.nodes[i]` and `fleet.underlay[i]` are `specs[i]`'s; the lighthouse's namespace
    /// comes after them.
    pub fleet: Fleet,
    /// The nodes, in the order of the names given, each with a `[mesh]` section in `rest`.
    pub specs: Vec<Spec>,
    pub lighthouse_spec: Spec,
    /// The fleet's CA; its directory holds the certificates the configs name.
    pub ca: Fleetca,
}

/// The group a node's certificate carries: `robots` for names starting with "robot", else
/// `operators`.
pub fn group_of(name: &str) -> &'static str {
    if name.starts_with("robot") {
        "robots"
    } else {
        "operators"
    }
}

/// `meshed_fleet` formed by the mesh instead of static peers: nodes `names` on one lab fabric,
/// node `i` with overlay `<overlay>.<i + 1>/16` and a certificate for it (group per
/// `group_of`), all talking to robots and operators (a full mesh), and no `[[peers]]`. A
/// lighthouse (`<overlay>.250/16`, group `lighthouses`) in a namespace of its own, after the
/// others, is started here; each node knows only the lighthouse.
pub fn mesh_formed_fleet(tag: &str, names: &[&str], overlay: &str) -> MeshFleet {
    mesh_formed_fleet_with(tag, names, overlay, None)
}

/// `mesh_formed_fleet` with IPv6 overlay addresses too: node `i` also has
/// `<overlay6>::<i + 1>/64` in its certificate (the lighthouse `<overlay6>::250/64`).
pub fn mesh_formed_fleet_with(
    tag: &str,
    names: &[&str],
    overlay: &str,
    overlay6: Option<&str>,
) -> MeshFleet {
    let addresses = |host: usize| -> Vec<String> {
        let mut a = vec![format!("{overlay}.{host}/16")];
        if let Some(v6) = overlay6 {
            a.push(format!("{v6}::{host}/64"));
        }
        a
    };
    let mut all: Vec<&str> = names.to_vec();
    all.push("lighthouse");
    let fleet = Fleet::new(tag, &all);
    let lh = names.len();
    let ca = Fleetca::new(&format!("{tag}-fleet"));
    let lighthouse_addresses = addresses(250);
    let lighthouse_refs: Vec<&str> = lighthouse_addresses.iter().map(String::as_str).collect();
    let mut lighthouse_spec = Spec::new("lighthouse", &lighthouse_refs);
    lighthouse_spec.rest = format!(
        "{}[lighthouse]\nenabled = true\n",
        mesh_section(
            &ca.ca(),
            &ca.sign(&lighthouse_spec, "lighthouses"),
            None,
            ""
        )
    );
    let endpoint = format!("{}:51820", fleet.underlay[lh]);
    let specs: Vec<Spec> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let own = addresses(i + 1);
            let refs: Vec<&str> = own.iter().map(String::as_str).collect();
            let mut spec = Spec::new(n, &refs);
            spec.rest = mesh_section(
                &ca.ca(),
                &ca.sign(&spec, group_of(n)),
                Some((&lighthouse_spec, &endpoint)),
                "\"robots\", \"operators\"",
            );
            spec
        })
        .collect();
    let lighthouse = Node::start_spec(fleet.nodes[lh].clone(), &lighthouse_spec, "");
    MeshFleet {
        lighthouse,
        fleet,
        specs,
        lighthouse_spec,
        ca,
    }
}

impl MeshFleet {
    /// Starts every node of `specs` in its namespace, node `i` with `plugins[i]` (none past
    /// the end of `plugins`).
    pub fn start_nodes(&self, plugins: &[&str]) -> Vec<Node> {
        self.specs
            .iter()
            .zip(&self.fleet.nodes)
            .enumerate()
            .map(|(i, (spec, ns))| {
                Node::start_spec(ns.clone(), spec, plugins.get(i).copied().unwrap_or(""))
            })
            .collect()
    }
}
