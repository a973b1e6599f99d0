//! The command line (argh): one function per subcommand.

mod ca;
mod init;
mod join;
mod keygen;
mod lab_command;
mod remote;
mod safety;

use argh::FromArgs;
use std::path::PathBuf;

#[derive(FromArgs)]
/// Myelin: a peer-to-peer VPN for robot fleets and embodied AI.
pub struct Args {
    /// log level when RUST_LOG is unset: error, warn, info, debug, trace (default info)
    #[argh(option, default = "String::from(\"info\")")]
    pub log_level: String,
    /// log JSON lines instead of text
    #[argh(switch)]
    pub log_json: bool,
    #[argh(subcommand)]
    pub command: Command,
}

#[derive(FromArgs)]
#[argh(subcommand)]
pub enum Command {
    Keygen(KeygenArgs),
    Pubkey(PubkeyArgs),
    Init(InitArgs),
    Up(UpArgs),
    Status(StatusArgs),
    Peers(PeersArgs),
    Members(MembersArgs),
    Fleet(FleetArgs),
    Firewall(FirewallArgs),
    Whois(WhoisArgs),
    Plugins(PluginsArgs),
    Safety(SafetyArgs),
    Version(VersionArgs),
    Lab(LabArgs),
    Ca(CaArgs),
    Join(JoinArgs),
    PluginRun(PluginRunArgs),
}

#[derive(FromArgs)]
/// A whole fleet on this machine, in network namespaces (needs root).
#[argh(subcommand, name = "lab")]
pub struct LabArgs {
    #[argh(subcommand)]
    pub command: LabCommand,
}

#[derive(FromArgs)]
#[argh(subcommand)]
pub enum LabCommand {
    Up(LabUpArgs),
    Status(LabStatusArgs),
    Exec(LabExecArgs),
    Down(LabDownArgs),
}

fn default_lab_dir() -> PathBuf {
    PathBuf::from("/run/myelin-lab")
}

#[derive(FromArgs)]
/// Start a lab: one namespace per node (operator, robot1, ...), keys, configs, a full mesh.
#[argh(subcommand, name = "up")]
pub struct LabUpArgs {
    /// number of nodes, 2 to 50 (default 3)
    #[argh(option, default = "3")]
    pub nodes: usize,
    /// state directory: configs, keys, logs (default /run/myelin-lab)
    #[argh(option, default = "default_lab_dir()")]
    pub dir: PathBuf,
    /// robots that get a lab camera (a test pattern with a clock, ffmpeg into their `front`
    /// video stream; default 4, 0 for none)
    #[argh(option, default = "4")]
    pub cameras: usize,
    /// leave the lab running and return once it is up (stop it with `myelin lab down`)
    #[argh(switch)]
    pub detach: bool,
    /// start the nodes without plugins: the bare mesh (e.g. a 50-node scale run)
    #[argh(switch)]
    pub no_plugins: bool,
    /// only these plugins, comma-separated (e.g. `safety,telemetry`; default: every plugin)
    #[argh(option)]
    pub plugins: Option<String>,
}

#[derive(FromArgs)]
/// Show the lab's nodes, their addresses and sessions.
#[argh(subcommand, name = "status")]
pub struct LabStatusArgs {
    /// state directory (default /run/myelin-lab)
    #[argh(option, default = "default_lab_dir()")]
    pub dir: PathBuf,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs)]
/// Run a command inside a lab node's namespace: myelin lab exec robot1 -- ping 10.77.0.1
#[argh(subcommand, name = "exec")]
pub struct LabExecArgs {
    /// state directory (default /run/myelin-lab)
    #[argh(option, default = "default_lab_dir()")]
    pub dir: PathBuf,
    /// node name
    #[argh(positional)]
    pub node: String,
    /// the command and its arguments
    #[argh(positional, greedy)]
    pub command: Vec<String>,
}

#[derive(FromArgs)]
/// Stop every lab node and remove everything the lab made (safe to repeat).
#[argh(subcommand, name = "down")]
pub struct LabDownArgs {
    /// state directory (default /run/myelin-lab)
    #[argh(option, default = "default_lab_dir()")]
    pub dir: PathBuf,
}

#[derive(FromArgs)]
/// The fleet's certificate authority: create it, sign nodes and signers, show and verify.
#[argh(subcommand, name = "ca")]
pub struct CaArgs {
    #[argh(subcommand)]
    pub command: CaCommand,
}

#[derive(FromArgs)]
#[argh(subcommand)]
pub enum CaCommand {
    Init(CaInitArgs),
    Sign(CaSignArgs),
    Show(CaShowArgs),
    Verify(CaVerifyArgs),
    Token(CaTokenArgs),
    Revoke(CaRevokeArgs),
}

#[derive(FromArgs)]
/// Revoke a certificate (by fingerprint) or a name (every certificate for it issued until now);
/// writes the CA's signed revocation list, for [mesh].revocations on the lighthouses.
#[argh(subcommand, name = "revoke")]
pub struct CaRevokeArgs {
    /// a member's name, or a certificate's fingerprint (64 hex digits, `myelin ca show`)
    #[argh(positional)]
    pub what: String,
    /// directory with ca.key and ca.crt (default: the current directory)
    #[argh(option, default = "PathBuf::from(\".\")")]
    pub ca_dir: PathBuf,
    /// the revocation list to extend (default CA_DIR/revoked.crl)
    #[argh(option)]
    pub out: Option<PathBuf>,
}

#[derive(FromArgs)]
/// Print a single-use enrollment token for a new member (run on the lighthouse).
#[argh(subcommand, name = "token")]
pub struct CaTokenArgs {
    /// the new member's name, a DNS label, e.g. robot7
    #[argh(option)]
    pub name: String,
    /// its groups, comma-separated, e.g. robots
    #[argh(option)]
    pub groups: Option<String>,
    /// the groups it will learn about, comma-separated (its [mesh].talk_to), e.g. operators
    #[argh(option)]
    pub talk_to: Option<String>,
    /// its overlay address with prefix (repeat for IPv6), or `auto` for the next free IPv4
    /// address (the default)
    #[argh(option)]
    pub address: Vec<String>,
    /// how long the token works: 90s, 30m, 1h, 7d (default 1h)
    #[argh(option, default = "String::from(\"1h\")")]
    pub ttl: String,
    /// the lighthouse's config (default /etc/myelin/myelin.toml)
    #[argh(option, default = "PathBuf::from(\"/etc/myelin/myelin.toml\")")]
    pub config: PathBuf,
    /// the lighthouse's address as new members reach it, e.g. 203.0.113.7 (port: its listen_port)
    #[argh(option)]
    pub endpoint: String,
}

#[derive(FromArgs)]
/// Create the fleet's root: ca.key (mode 0600, keep it offline) and ca.crt.
#[argh(subcommand, name = "init")]
pub struct CaInitArgs {
    /// the fleet's name, e.g. acme-fleet
    #[argh(option)]
    pub name: String,
    /// directory for ca.key and ca.crt (default: the current directory)
    #[argh(option, default = "PathBuf::from(\".\")")]
    pub dir: PathBuf,
    /// validity in days (default 3650)
    #[argh(option, default = "3650")]
    pub days: u32,
    /// limit every certificate of the fleet to this range, e.g. 10.77.0.0/16 (repeatable)
    #[argh(option)]
    pub range: Vec<String>,
    /// limit every certificate of the fleet to these groups, comma-separated
    #[argh(option)]
    pub groups: Option<String>,
    /// overwrite an existing ca.key and ca.crt
    #[argh(switch)]
    pub force: bool,
}

#[derive(FromArgs)]
/// Sign a node's certificate, or with --signer a constrained signer for a lighthouse.
#[argh(subcommand, name = "sign")]
pub struct CaSignArgs {
    /// the node's (or signer's) name, a DNS label, e.g. robot7
    #[argh(option)]
    pub name: String,
    /// the node's WireGuard public key (`myelin pubkey < private.key`)
    #[argh(option)]
    pub pubkey: Option<String>,
    /// the node's overlay address with prefix, e.g. 10.77.0.7/16 (repeat for IPv6)
    #[argh(option)]
    pub address: Vec<String>,
    /// groups, comma-separated, e.g. robots,cameras (for --signer: the groups it may grant)
    #[argh(option)]
    pub groups: Option<String>,
    /// validity in days (default 365)
    #[argh(option, default = "365")]
    pub days: u32,
    /// make a signer: a key and certificate that may sign nodes within --range and --groups
    #[argh(switch)]
    pub signer: bool,
    /// with --signer: the addresses it may sign, e.g. 10.77.0.0/16 (repeatable)
    #[argh(option)]
    pub range: Vec<String>,
    /// with --signer: the longest lifetime it may sign, in days (default 30; 0 = no limit)
    #[argh(option, default = "30")]
    pub max_days: u32,
    /// directory with ca.key and ca.crt (default: the current directory)
    #[argh(option, default = "PathBuf::from(\".\")")]
    pub ca_dir: PathBuf,
    /// the issuing key instead of CA_DIR/ca.key (a signer's key signs nodes too)
    #[argh(option)]
    pub ca_key: Option<PathBuf>,
    /// the issuing certificate instead of CA_DIR/ca.crt
    #[argh(option)]
    pub ca_cert: Option<PathBuf>,
    /// where to write the certificate (default NAME.crt; a signer's key goes beside it as .key)
    #[argh(option)]
    pub out: Option<PathBuf>,
    /// overwrite existing files
    #[argh(switch)]
    pub force: bool,
}

#[derive(FromArgs)]
/// Print the certificates in a file.
#[argh(subcommand, name = "show")]
pub struct CaShowArgs {
    /// a certificate file
    #[argh(positional)]
    pub file: PathBuf,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs)]
/// Check a node's certificate file (with its signer, if any) against the fleet's CA now.
#[argh(subcommand, name = "verify")]
pub struct CaVerifyArgs {
    /// the node's certificate file
    #[argh(positional)]
    pub file: PathBuf,
    /// the CA certificate (default ./ca.crt)
    #[argh(option, default = "PathBuf::from(\"ca.crt\")")]
    pub ca: PathBuf,
}

#[derive(FromArgs)]
/// Join a fleet with a token: make this node's key, enroll with the lighthouse, write its config.
#[argh(subcommand, name = "join")]
pub struct JoinArgs {
    /// the token from `myelin ca token`
    #[argh(positional)]
    pub token: String,
    /// directory for private.key, the certificates and myelin.toml (default /etc/myelin)
    #[argh(option, default = "PathBuf::from(\"/etc/myelin\")")]
    pub dir: PathBuf,
    /// wireGuard UDP port (default 51820)
    #[argh(option, default = "51820")]
    pub listen_port: u16,
    /// control API address (default 127.0.0.1:7800)
    #[argh(option, default = "String::from(\"127.0.0.1:7800\")")]
    pub control: String,
    /// overwrite an existing config, key and certificates
    #[argh(switch)]
    pub force: bool,
}

#[derive(FromArgs)]
/// Print a new private key (base64, like `wg genkey`).
#[argh(subcommand, name = "keygen")]
pub struct KeygenArgs {}

#[derive(FromArgs)]
/// Read a private key on stdin, print its public key (like `wg pubkey`).
#[argh(subcommand, name = "pubkey")]
pub struct PubkeyArgs {}

#[derive(FromArgs)]
/// Create a private key (mode 0600) and a config for a new node.
#[argh(subcommand, name = "init")]
pub struct InitArgs {
    /// node name, e.g. robot1
    #[argh(option)]
    pub name: String,
    /// overlay address with prefix, e.g. 10.77.0.1/16 (repeat for IPv6)
    #[argh(option)]
    pub address: Vec<String>,
    /// directory for private.key and myelin.toml (default /etc/myelin)
    #[argh(option, default = "PathBuf::from(\"/etc/myelin\")")]
    pub dir: PathBuf,
    /// wireGuard UDP port (default 51820)
    #[argh(option, default = "51820")]
    pub listen_port: u16,
    /// control API address (default 127.0.0.1:7800)
    #[argh(option, default = "String::from(\"127.0.0.1:7800\")")]
    pub control: String,
    /// overwrite an existing config and key
    #[argh(switch)]
    pub force: bool,
}

#[derive(FromArgs)]
/// Run the node in the foreground until SIGINT or SIGTERM.
#[argh(subcommand, name = "up")]
pub struct UpArgs {
    /// config file (default /etc/myelin/myelin.toml)
    #[argh(option, default = "PathBuf::from(\"/etc/myelin/myelin.toml\")")]
    pub config: PathBuf,
}

#[derive(FromArgs)]
/// Show the running node: identity, peers, plugins.
#[argh(subcommand, name = "status")]
pub struct StatusArgs {
    #[argh(option)]
    /// control API address (default: $MYELIN_API, the config's [control].listen, or 127.0.0.1:7800)
    pub api: Option<String>,
    #[argh(option)]
    /// read the control API address from this config file
    pub config: Option<PathBuf>,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs)]
/// Who holds an overlay address: the peer, its groups and its certificate.
#[argh(subcommand, name = "whois")]
pub struct WhoisArgs {
    /// the overlay address, e.g. 10.77.0.2
    #[argh(positional)]
    pub address: String,
    #[argh(option)]
    /// control API address (default: $MYELIN_API, the config's [control].listen, or 127.0.0.1:7800)
    pub api: Option<String>,
    #[argh(option)]
    /// read the control API address from this config file
    pub config: Option<PathBuf>,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs)]
/// Show the firewall: its rules, the flows it tracks, and what it dropped and why.
#[argh(subcommand, name = "firewall")]
pub struct FirewallArgs {
    /// read the config again and apply its [firewall] rules first (as SIGHUP does)
    #[argh(switch)]
    pub reload: bool,
    #[argh(option)]
    /// control API address (default: $MYELIN_API, the config's [control].listen, or 127.0.0.1:7800)
    pub api: Option<String>,
    #[argh(option)]
    /// read the control API address from this config file
    pub config: Option<PathBuf>,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs)]
/// List the mesh members this node knows: name, addresses, groups, where it learned them.
#[argh(subcommand, name = "members")]
pub struct MembersArgs {
    #[argh(option)]
    /// control API address (default: $MYELIN_API, the config's [control].listen, or 127.0.0.1:7800)
    pub api: Option<String>,
    #[argh(option)]
    /// read the control API address from this config file
    pub config: Option<PathBuf>,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs)]
/// Every fleet member from this node: online, RTT, interlock, plugins and health, each asked
/// over the overlay (an unreachable one says why).
#[argh(subcommand, name = "fleet")]
pub struct FleetArgs {
    #[argh(option)]
    /// control API address (default: $MYELIN_API, the config's [control].listen, or 127.0.0.1:7800)
    pub api: Option<String>,
    #[argh(option)]
    /// read the control API address from this config file
    pub config: Option<PathBuf>,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs)]
/// List the peers with endpoint, handshake, traffic and RTT.
#[argh(subcommand, name = "peers")]
pub struct PeersArgs {
    #[argh(option)]
    /// control API address (default: $MYELIN_API, the config's [control].listen, or 127.0.0.1:7800)
    pub api: Option<String>,
    #[argh(option)]
    /// read the control API address from this config file
    pub config: Option<PathBuf>,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs)]
/// List plugins, or enable, disable or restart one: plugins [list|enable|disable|restart] [NAME].
#[argh(subcommand, name = "plugins")]
pub struct PluginsArgs {
    /// action (list, the default, enable, disable or restart), then the plugin instance name
    #[argh(positional)]
    pub words: Vec<String>,
    #[argh(option)]
    /// control API address (default: $MYELIN_API, the config's [control].listen, or 127.0.0.1:7800)
    pub api: Option<String>,
    #[argh(option)]
    /// read the control API address from this config file
    pub config: Option<PathBuf>,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs)]
/// The safety interlock: safety [status|rearm]. Re-arming permits motion; it never commands it.
#[argh(subcommand, name = "safety")]
pub struct SafetyArgs {
    /// status (the default) or rearm
    #[argh(positional, default = "String::from(\"status\")")]
    pub action: String,
    /// the safety plugin's instance name (default safety)
    #[argh(option, default = "String::from(\"safety\")")]
    pub instance: String,
    #[argh(option)]
    /// control API address (default: $MYELIN_API, the config's [control].listen, or 127.0.0.1:7800)
    pub api: Option<String>,
    #[argh(option)]
    /// read the control API address from this config file
    pub config: Option<PathBuf>,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs)]
/// Print the version, build facts and compiled-in plugins.
#[argh(subcommand, name = "version")]
pub struct VersionArgs {
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs)]
/// (internal) Run one plugin as a child of the plugin host.
#[argh(subcommand, name = "plugin-run")]
pub struct PluginRunArgs {
    /// plugin instance name
    #[argh(positional)]
    pub instance: String,
}

pub use ca::ca;
pub use init::init;
pub use join::join;
pub use keygen::{keygen, pubkey};
pub use lab_command::lab;
pub use remote::{firewall, fleet, members, peers, plugins, status, whois};
pub use safety::safety;

pub fn version(args: &VersionArgs) -> anyhow::Result<()> {
    let info = crate::build_info::build_info();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    println!("myelin {} ({})", info.version, info.git);
    println!("target:   {} ({})", info.target, info.profile);
    println!("rustc:    {}", info.rustc);
    println!(
        "features: {}",
        if info.features.is_empty() {
            "none".into()
        } else {
            info.features.join(", ")
        }
    );
    println!("plugins:");
    if info.plugins.is_empty() {
        println!("  (none compiled in)");
    }
    for p in info.plugins {
        println!("  {:<12} {}", p.name, p.about);
    }
    Ok(())
}
