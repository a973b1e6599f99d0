//! `init`: a new node's key and config, with a section for every plugin compiled in.

use super::InitArgs;
use crate::keys::PrivateKey;
use anyhow::{bail, Context};

/// A section for every product plugin compiled in (each plugin says what it writes; test
/// plugins write nothing), so a new node runs what its binary offers.
fn plugin_sections() -> String {
    myelin_sdk::registrations()
        .filter_map(|r| {
            r.init_section
                .map(|section| format!("\n# {}\n{}", r.about, section()))
        })
        .collect()
}

/// Checks `--control` and makes `dir`, for a new node's key and config; returns it absolute.
pub(super) fn node_dir(dir: &std::path::Path, control: &str) -> anyhow::Result<std::path::PathBuf> {
    control.parse::<std::net::SocketAddr>().map_err(|e| {
        anyhow::anyhow!("--control {control}: {e}; use ip:port, e.g. 127.0.0.1:7800")
    })?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(std::fs::canonicalize(dir)?)
}

/// What a new node's config says; `mesh` is a complete `[mesh]` section or none.
pub(super) struct NodeText<'a> {
    pub origin: &'a str,
    pub name: &'a str,
    pub key_path: &'a std::path::Path,
    pub listen_port: u16,
    pub addresses: &'a [String],
    pub control: &'a str,
    pub mesh: Option<String>,
}

/// A new node's config: the node, its control API, static peers (commented) or its mesh
/// section, and a section for every plugin compiled in.
pub(super) fn node_config_text(t: &NodeText) -> String {
    let addresses: Vec<String> = t.addresses.iter().map(|a| format!("{a:?}")).collect();
    let peers = match &t.mesh {
        Some(mesh) => mesh.clone(),
        None => "# Add one [[peers]] table per peer:\n# [[peers]]\n# name = \"operator\"\n# public_key = \"<its `myelin pubkey`>\"\n# endpoint = \"192.0.2.2:51820\"\n# allowed_ips = [\"10.77.0.2/32\"]\n".to_string(),
    };
    format!(
        r#"# Created by `{origin}`. config.example.toml documents every key.
[node]
name = "{name}"
private_key_file = "{key}"
listen_port = {port}
address = [{addresses}]

[control]
listen = "{control}"

{peers}
# Process plugins run as the unprivileged system user `myelin`; [plugins].user changes that
# (config.example.toml).
{plugins}"#,
        origin = t.origin,
        name = t.name,
        key = t.key_path.display(),
        port = t.listen_port,
        plugins = plugin_sections(),
        addresses = addresses.join(", "),
        control = t.control,
    )
}

pub fn init(args: &InitArgs) -> anyhow::Result<()> {
    let name =
        crate::config::sanitize_name(&args.name).map_err(|e| anyhow::anyhow!("--name: {e}"))?;
    if args.address.is_empty() {
        bail!("--address is required, e.g. --address 10.77.0.1/16 (repeat it for an IPv6 address)");
    }
    for a in &args.address {
        a.parse::<ipnet::IpNet>().map_err(|e| {
            anyhow::anyhow!("--address {a}: {e}; use an address with prefix, e.g. 10.77.0.1/16")
        })?;
    }
    let dir = node_dir(&args.dir, &args.control)?;
    let key_path = dir.join("private.key");
    let config_path = dir.join("myelin.toml");
    super::ca::refuse_overwrite(&[&key_path, &config_path], args.force)?;
    let key = PrivateKey::generate()?;
    crate::keys::write_private(&key_path, &key.to_base64())
        .with_context(|| format!("creating {}", key_path.display()))?;
    let config = node_config_text(&NodeText {
        origin: "myelin init",
        name: &name,
        key_path: &key_path,
        listen_port: args.listen_port,
        addresses: &args.address,
        control: &args.control,
        mesh: None,
    });
    crate::config::write_atomically(&config_path, config.as_bytes())
        .with_context(|| format!("writing {}", config_path.display()))?;
    crate::config::Config::load(&config_path)?;
    println!("node:       {name}");
    println!("public key: {}", key.public_key());
    println!("config:     {}", config_path.display());
    println!("key:        {} (mode 0600)", key_path.display());
    println!("plugins:    run as {}", plugin_user());
    Ok(())
}

/// Creates the plugins' system user when run as root, so the first start needs no /etc write
/// (the systemd unit keeps /etc read-only).
pub(super) fn plugin_user() -> String {
    use crate::host::user::{ensure_system_user, DEFAULT_USER};
    if !rustix::process::geteuid().is_root() {
        return format!("user `{DEFAULT_USER}` (run `myelin init` as root to create it, or the node creates it when it starts as root)");
    }
    match ensure_system_user(DEFAULT_USER) {
        Ok((user, true)) => format!("user `{DEFAULT_USER}` (uid {}, created)", user.uid),
        Ok((user, false)) => format!("user `{DEFAULT_USER}` (uid {})", user.uid),
        Err(e) => {
            eprintln!("warning: {e}");
            format!("an unnamed uid until user `{DEFAULT_USER}` exists")
        }
    }
}
