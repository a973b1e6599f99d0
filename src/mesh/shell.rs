//! The I/O shell of the mesh state machine: feeds it the control messages the data plane
//! intercepts and its timers, applies the peer changes it asks for, and publishes the members
//! it knows. Also expires restricted peers that never showed a certificate.

use super::cert::{self, Certificate};
use super::control::{LighthouseConfig, MemberView, Mesh, MeshConfig, Output};
use super::paths::NatMapping;
use super::revoke::RevocationList;
use crate::config::Config;
use crate::tunnel::{MeshReceivers, PeerControl};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long a restricted peer (handshake done, no certificate shown) may stay.
const RESTRICTED_FOR: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum MeshSetupError {
    #[error("{path}: {error}")]
    File { path: String, error: String },
    #[error("{setting} {error}")]
    Setting {
        setting: &'static str,
        error: String,
    },
    #[error("[mesh].cert {path} is not valid for this node: {error}\n  fix: {hint}")]
    OwnCert {
        path: String,
        error: String,
        hint: String,
    },
}

fn read_chain(path: &Path) -> Result<Vec<Certificate>, MeshSetupError> {
    let file = |error: String| MeshSetupError::File {
        path: path.display().to_string(),
        error,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file(e.to_string()))?;
    Certificate::parse_pem(&text).map_err(|e| file(e.to_string()))
}

/// Reads `[mesh].revocations` (absent file: none yet).
fn read_revocations(path: &Path) -> Result<Option<RevocationList>, MeshSetupError> {
    match std::fs::read_to_string(path) {
        Ok(text) => RevocationList::parse_pem(&text)
            .map(Some)
            .map_err(|e| MeshSetupError::File {
                path: path.display().to_string(),
                error: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(MeshSetupError::File {
            path: path.display().to_string(),
            error: e.to_string(),
        }),
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads and checks this node's mesh identity: the CA, and its own chain, which must verify
/// now, name this node's WireGuard key and only addresses this node has.
pub fn mesh_config(
    config: &Config,
    public_key: [u8; 32],
) -> Result<Option<MeshConfig>, MeshSetupError> {
    let Some(section) = &config.mesh else {
        return Ok(None);
    };
    let ca = read_chain(&section.ca)?
        .into_iter()
        .next()
        .ok_or_else(|| MeshSetupError::File {
            path: section.ca.display().to_string(),
            error: "holds no certificate".into(),
        })?;
    let chain = read_chain(&section.cert)?;
    let own = |error: String, hint: &str| MeshSetupError::OwnCert {
        path: section.cert.display().to_string(),
        error,
        hint: hint.into(),
    };
    let node = cert::verify(&chain, &ca, unix_now()).map_err(|e| {
        own(
            e.to_string(),
            "get a current certificate from the fleet's CA (`myelin ca sign`, or `myelin join`)",
        )
    })?;
    if node.public_key != public_key {
        return Err(own(
            "it names another WireGuard key than [node].private_key_file's".into(),
            "sign this node's own public key (`myelin pubkey < private.key`)",
        ));
    }
    for a in &node.addresses {
        if !config
            .node
            .address
            .iter()
            .any(|mine| mine.addr() == a.addr())
        {
            return Err(own(
                format!("it grants {a}, which is not in [node].address"),
                &format!("add \"{a}\" to [node].address"),
            ));
        }
    }
    let lighthouses: Vec<LighthouseConfig> = section
        .lighthouses
        .iter()
        .map(|l| LighthouseConfig {
            name: l.name.to_string(),
            public_key: l.public_key.0,
            overlay: l.overlay,
            endpoint: l.endpoint,
        })
        .collect();
    let overlay: Vec<std::net::IpAddr> = config.node.address.iter().map(|a| a.addr()).collect();
    let candidates = local_candidates(&lighthouses, config.node.listen_port, &overlay);
    Ok(Some(MeshConfig {
        ca,
        chain,
        lighthouses,
        talk_to: section.talk_to.clone(),
        multicast: config
            .multicast
            .as_ref()
            .map(|m| m.groups.clone())
            .unwrap_or_default(),
        candidates,
        listen_port: config.node.listen_port,
        lighthouse: config.lighthouse.enabled,
        relay: config.relay.enabled(config),
        refresh: Duration::from_secs(section.refresh_s),
        revocations: match &section.revocations {
            Some(path) => read_revocations(path)?,
            None => None,
        },
        issuer: issuer(config)?,
    }))
}

/// This node's own addresses: its source address toward each lighthouse (the kernel's choice;
/// a connected UDP socket sends nothing), then its global IPv6 addresses (a peer with IPv6
/// reaches them without a NAT), each with the WireGuard port; `overlay` addresses never. A
/// lighthouse that sees one of them sees this node without a NAT in between.
pub fn local_candidates(
    lighthouses: &[LighthouseConfig],
    port: u16,
    overlay: &[std::net::IpAddr],
) -> Vec<std::net::SocketAddr> {
    let mut out = Vec::new();
    for l in lighthouses {
        let any: std::net::SocketAddr = if l.endpoint.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let local = std::net::UdpSocket::bind(any)
            .and_then(|s| s.connect(l.endpoint).map(|()| s))
            .and_then(|s| s.local_addr());
        if let Ok(a) = local {
            let c = std::net::SocketAddr::new(a.ip(), port);
            if !out.contains(&c) && !overlay.contains(&c.ip()) {
                out.push(c);
            }
        }
    }
    if let Ok(interfaces) = getifaddrs::getifaddrs() {
        for interface in interfaces {
            let getifaddrs::Address::V6(a) = interface.address else {
                continue;
            };
            let ip = std::net::IpAddr::V6(a.address);
            let c = std::net::SocketAddr::new(ip, port);
            if global_ipv6(&a.address) && !overlay.contains(&ip) && !out.contains(&c) {
                out.push(c);
            }
        }
    }
    out
}

/// A global unicast IPv6 address (2000::/3): not loopback, link-local, unique-local or
/// multicast, which no peer elsewhere could reach.
pub fn global_ipv6(a: &std::net::Ipv6Addr) -> bool {
    a.segments()[0] & 0xe000 == 0x2000
}

/// The lighthouse's certificate issuer, when `[lighthouse]` has a signer: it renews members'
/// certificates, and enrolls new ones if `enroll_listen` is set too.
pub fn issuer(config: &Config) -> Result<Option<super::enroll::Issuer>, MeshSetupError> {
    let (Some(mesh), true, Some(key_path), Some(cert_path)) = (
        &config.mesh,
        config.lighthouse.enabled,
        &config.lighthouse.signer_key,
        &config.lighthouse.signer_cert,
    ) else {
        return Ok(None);
    };
    let file = |path: &Path, error: String| MeshSetupError::File {
        path: path.display().to_string(),
        error,
    };
    let ca = read_chain(&mesh.ca)?
        .into_iter()
        .next()
        .ok_or_else(|| file(&mesh.ca, "holds no certificate".into()))?;
    let cert = read_chain(cert_path)?
        .into_iter()
        .next()
        .ok_or_else(|| file(cert_path, "holds no certificate".into()))?;
    let text = crate::keys::read_secret(key_path).map_err(|e| file(key_path, e.to_string()))?;
    let key = cert::signing_key_from_pem(&text).map_err(|e| file(key_path, e.to_string()))?;
    if cert.body().public_key != key.verifying_key().to_bytes() {
        return Err(file(
            key_path,
            format!("is not the key of {}", cert_path.display()),
        ));
    }
    let lifetime = match &config.lighthouse.cert_lifetime {
        None => super::enroll::DEFAULT_LIFETIME,
        Some(text) => cert::parse_lifetime(text).map_err(|e| MeshSetupError::Setting {
            setting: "[lighthouse].cert_lifetime",
            error: format!("{text:?}: {e}"),
        })?,
    };
    Ok(Some(super::enroll::Issuer {
        ca,
        cert,
        key,
        lifetime,
    }))
}

/// The lighthouse's enrollment desk, when `[lighthouse].enroll_listen` is set.
pub fn enroller(config: &Config) -> Result<Option<super::enroll::Enroller>, MeshSetupError> {
    let (Some(mesh), Some(_)) = (&config.mesh, config.lighthouse.enroll_listen) else {
        return Ok(None);
    };
    let Some(issuer) = issuer(config)? else {
        return Ok(None);
    };
    let state = super::enroll::load_state(&config.lighthouse.state_file).map_err(|e| {
        MeshSetupError::File {
            path: config.lighthouse.state_file.display().to_string(),
            error: e,
        }
    })?;
    Ok(Some(super::enroll::Enroller {
        issuer,
        // Its own addresses and every lighthouse's: no member may be given one.
        reserved: config
            .node
            .address
            .iter()
            .map(|a| a.addr())
            .chain(mesh.lighthouses.iter().map(|l| l.overlay))
            .collect(),
        state,
    }))
}

/// The files the running mesh keeps up to date or watches.
pub struct MeshFiles {
    /// `[mesh].cert`: a renewed certificate replaces it.
    pub cert: std::path::PathBuf,
    /// `[mesh].revocations`: re-read when it changes.
    pub revocations: Option<std::path::PathBuf>,
    /// This node's overlay addresses (never offered as candidates).
    pub overlay: Vec<std::net::IpAddr>,
    /// `[mesh].many_ports`: many-port tries while relayed.
    pub many_ports: bool,
}

/// Replaces the certificate file in one step, keeping its permissions.
fn store_chain(path: &Path, chain: &[Certificate]) -> std::io::Result<()> {
    let text: String = chain.iter().map(Certificate::to_pem).collect();
    crate::config::write_atomically(path, text.as_bytes())
}

/// Runs the mesh until `cancel`.
pub async fn run(
    files: MeshFiles,
    config: MeshConfig,
    peers: PeerControl,
    receivers: MeshReceivers,
    members: watch::Sender<Vec<MemberView>>,
    connectivity: watch::Sender<Option<super::control::Connectivity>>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let MeshReceivers {
        mut control,
        mut misses,
    } = receivers;
    let revocations_file = files.revocations;
    let lighthouse_list = config.lighthouses.clone();
    let listen_port = config.listen_port;
    let overlay = files.overlay.clone();
    let mut mesh = Mesh::new(config, Instant::now());
    let mut next_sweep = Instant::now() + RESTRICTED_FOR;
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut revocations_seen = revocations_file.as_deref().and_then(modified);
    let mut published = u64::MAX;
    let mut roams = peers.roams();
    let mut reach_published = u64::MAX;
    loop {
        while let Some(output) = mesh.poll_output() {
            apply(&peers, &files.cert, output);
        }
        // Rebuilt only when something changed: a lighthouse hears a registration per member
        // and refresh, and most change nothing.
        if mesh.version() != published {
            published = mesh.version();
            let view = mesh.members();
            members.send_if_modified(|current| {
                let changed = *current != view;
                if changed {
                    *current = view;
                }
                changed
            });
        }
        if mesh.reach_version() != reach_published {
            reach_published = mesh.reach_version();
            connectivity.send_replace(Some(mesh.connectivity()));
            peers.set_relays(mesh.relay_keys());
            // The hard side of a pair opens many ports, the easy side sprays them.
            use crate::tunnel::manyports::Role;
            peers.set_many_ports(match mesh.nat_mapping(true) {
                _ if !files.many_ports => Role::Off,
                NatMapping::EndpointDependent => Role::Open,
                NatMapping::EndpointIndependent | NatMapping::None => Role::Spray,
                NatMapping::Unknown => Role::Off,
            });
        }
        let wake = mesh.poll_timeout().min(next_sweep);
        tokio::select! {
            _ = cancel.cancelled() => {
                mesh.leave();
                while let Some(output) = mesh.poll_output() {
                    if let Output::Send { .. } = output {
                        apply(&peers, &files.cert, output);
                    }
                }
                return;
            }
            received = control.recv() => {
                let Some(d) = received else { return };
                mesh.handle(d.from, d.endpoint, &d.payload, Instant::now(), unix_now());
            }
            Some(address) = misses.recv() => mesh.lookup(address, Instant::now()),
            Ok(()) = roams.changed() => {
                mesh.set_candidates(local_candidates(&lighthouse_list, listen_port, &overlay));
                mesh.roamed(Instant::now());
            }
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {
                let now = Instant::now();
                mesh.handle_timeout(now, unix_now());
                // A new revocation list in [mesh].revocations takes effect within a second.
                if let Some(path) = &revocations_file {
                    let stamp = modified(path);
                    if stamp != revocations_seen {
                        revocations_seen = stamp;
                        match read_revocations(path) {
                            Ok(Some(list)) => mesh.set_revocations(list, now),
                            Ok(None) => {}
                            Err(e) => tracing::warn!("{e}"),
                        }
                    }
                }
                if now >= next_sweep {
                    next_sweep = now + RESTRICTED_FOR / 3;
                    sweep_restricted(&peers, &mesh);
                }
            }
        }
    }
}

fn apply(peers: &PeerControl, cert_file: &Path, output: Output) {
    match output {
        Output::Renewed(chain) => {
            if let Err(e) = store_chain(cert_file, &chain) {
                tracing::error!(
                    "the renewed certificate could not be written to {} ({e}); it is used until this node restarts",
                    cert_file.display()
                );
            }
        }
        Output::Send { to, message } => {
            peers.send_control(&to, &message.encode());
        }
        Output::Rehandshake(key) => {
            peers.rehandshake(&key);
        }
        Output::Upsert(spec) => {
            let name = spec.name.clone();
            match peers.upsert(spec) {
                Ok(true) => tracing::info!(peer = %name, "mesh peer added or updated"),
                Ok(false) => {}
                Err(e) => tracing::warn!("mesh peer `{name}` not added: {e}"),
            }
        }
        Output::Remove { name, key } => {
            // Only the peer the mesh added: never a static peer that happens to share a name.
            let ours = peers
                .table()
                .by_key(&key)
                .is_some_and(|(_, p)| p.name == name);
            if ours {
                match peers.remove(&name) {
                    Ok(()) => tracing::info!(peer = %name, "mesh peer removed"),
                    Err(e) => tracing::warn!("mesh peer `{name}` not removed: {e}"),
                }
            }
        }
    }
}

/// Removes restricted peers older than `RESTRICTED_FOR` that the mesh never admitted.
fn sweep_restricted(peers: &PeerControl, mesh: &Mesh) {
    let table = peers.table();
    for (_, p) in table.iter() {
        if p.allowed_ips.is_empty()
            && p.created.elapsed() >= RESTRICTED_FOR
            && !mesh.admitted(&p.public_key_bytes)
        {
            let _ = peers.remove(&p.name);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_global_ipv6_addresses_are_candidates() {
        for (a, global) in [
            ("2001:db8::7", true),
            ("2a01:4f8::1", true),
            ("fe80::1", false),
            ("fd00::1", false),
            ("::1", false),
            ("ff05::1", false),
            ("64:ff9b::1", false),
        ] {
            assert_eq!(super::global_ipv6(&a.parse().unwrap()), global, "{a}");
        }
    }
}
