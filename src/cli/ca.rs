//! `ca`: the fleet's certificate authority on the command line: create the root, sign nodes
//! and constrained signers, show and verify certificate files.

use super::{
    CaArgs, CaCommand, CaInitArgs, CaRevokeArgs, CaShowArgs, CaSignArgs, CaTokenArgs, CaVerifyArgs,
};
use crate::keys::{read_secret, write_private, PublicKey};
use crate::mesh::cert::{self, CertBody, Certificate, Role};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

const DAY: u64 = 86_400;

pub fn ca(args: &CaArgs) -> anyhow::Result<()> {
    match &args.command {
        CaCommand::Init(a) => init(a),
        CaCommand::Sign(a) => sign(a),
        CaCommand::Show(a) => show(a),
        CaCommand::Verify(a) => verify(a),
        CaCommand::Token(a) => token(a),
        CaCommand::Revoke(a) => revoke(a),
    }
}

pub(crate) fn unix_now() -> anyhow::Result<u64> {
    Ok(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the system clock is before 1970")?
        .as_secs())
}

/// Refuses to replace any of `paths` unless `--force` was given.
pub(super) fn refuse_overwrite(paths: &[&Path], force: bool) -> anyhow::Result<()> {
    if force {
        return Ok(());
    }
    for p in paths {
        if p.exists() {
            bail!(
                "{} already exists; pass --force to overwrite it, or choose another --dir (or --out)",
                p.display()
            );
        }
    }
    Ok(())
}

fn write_public(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn init(a: &CaInitArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let (key_path, cert_path) = (a.dir.join("ca.key"), a.dir.join("ca.crt"));
    refuse_overwrite(&[&key_path, &cert_path], a.force)?;
    if a.days == 0 {
        bail!("--days 0: a CA must be valid for at least one day");
    }
    let now = unix_now()?;
    let key = cert::generate_signing_key()?;
    let ca = Certificate::sign(
        CertBody {
            role: Role::Ca,
            name: a.name.clone(),
            public_key: key.verifying_key().to_bytes(),
            networks: parse_networks(&a.range, "--range")?,
            groups: split_groups(a.groups.as_deref()),
            not_before: cert::backdated(now),
            not_after: now + u64::from(a.days) * DAY,
            max_days: 0,
            issuer: [0; 32],
        },
        &key,
    )
    .context("--name")?;
    write_private(&key_path, &cert::signing_key_to_pem(&key))
        .with_context(|| format!("writing {}", key_path.display()))?;
    write_public(&cert_path, &ca.to_pem())?;
    println!(
        "CA `{}` created\n  key:         {} (mode 0600; keep it offline)\n  certificate: {}\n  fingerprint: {}",
        ca.name(),
        key_path.display(),
        cert_path.display(),
        ca.fingerprint()
    );
    Ok(())
}

/// The issuing key and certificate: the CA's, or a signer's (whose certificate then travels
/// in the node's chain).
fn load_issuer(
    key: &Path,
    cert_file: &Path,
) -> anyhow::Result<(ed25519_dalek::SigningKey, Certificate)> {
    let key_text = read_secret(key)?;
    let signing = cert::signing_key_from_pem(&key_text)
        .with_context(|| format!("reading {}", key.display()))?;
    let issuer = read_certs(cert_file)?
        .into_iter()
        .next()
        .with_context(|| format!("{} holds no certificate", cert_file.display()))?;
    if issuer.body().public_key != signing.verifying_key().to_bytes() {
        bail!(
            "{} is not the key of {} (`{}`)\n  fix: pass the matching --ca-key and --ca-cert",
            key.display(),
            cert_file.display(),
            issuer.name()
        );
    }
    if issuer.body().role == Role::Node {
        bail!(
            "{} is a node certificate; only a CA or a signer signs",
            cert_file.display()
        );
    }
    Ok((signing, issuer))
}

pub(crate) fn read_certs(path: &Path) -> anyhow::Result<Vec<Certificate>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Certificate::parse_pem(&text).with_context(|| format!("reading {}", path.display()))
}

fn parse_networks(list: &[String], flag: &str) -> anyhow::Result<Vec<ipnet::IpNet>> {
    list.iter()
        .map(|a| {
            a.parse::<ipnet::IpNet>().map_err(|e| {
                anyhow::anyhow!("{flag} {a}: {e}; use an address with prefix, e.g. 10.77.0.7/16")
            })
        })
        .collect()
}

fn split_groups(groups: Option<&str>) -> Vec<String> {
    groups
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(String::from)
        .collect()
}

fn sign(a: &CaSignArgs) -> anyhow::Result<()> {
    let ca_key = a.ca_key.clone().unwrap_or_else(|| a.ca_dir.join("ca.key"));
    let ca_cert = a.ca_cert.clone().unwrap_or_else(|| a.ca_dir.join("ca.crt"));
    let (signing, issuer) = load_issuer(&ca_key, &ca_cert)?;
    let now = unix_now()?;
    if a.days == 0 {
        bail!("--days 0: a certificate must be valid for at least one day");
    }
    let not_after = now + u64::from(a.days) * DAY;
    let groups = split_groups(a.groups.as_deref());
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.crt", a.name)));
    let (body, new_key) = if a.signer {
        if issuer.body().role != Role::Ca {
            bail!("--signer: a signer is signed by the CA itself (pass the CA's key), not by another signer");
        }
        if a.range.is_empty() {
            bail!("--signer needs --range, e.g. --range 10.77.0.0/16: the addresses it may sign");
        }
        if !a.address.is_empty() || a.pubkey.is_some() {
            bail!("--signer takes --range, --groups and --max-days; --address and --pubkey are for node certificates");
        }
        let key = cert::generate_signing_key()?;
        let body = CertBody {
            role: Role::Signer,
            name: a.name.clone(),
            public_key: key.verifying_key().to_bytes(),
            networks: parse_networks(&a.range, "--range")?,
            groups,
            not_before: cert::backdated(now),
            not_after,
            max_days: a.max_days,
            issuer: [0; 32],
        };
        (body, Some(key))
    } else {
        let Some(pubkey) = &a.pubkey else {
            bail!("--pubkey is required: the node's WireGuard public key (`myelin pubkey < private.key`)");
        };
        let pubkey =
            PublicKey::try_from(pubkey.clone()).map_err(|e| anyhow::anyhow!("--pubkey: {e}"))?;
        if a.address.is_empty() {
            bail!("--address is required, e.g. --address 10.77.0.7/16 (repeat it for IPv6)");
        }
        if !a.range.is_empty() {
            bail!("--range is for --signer; a node gets --address");
        }
        let body = CertBody {
            role: Role::Node,
            name: a.name.clone(),
            public_key: pubkey.0,
            networks: parse_networks(&a.address, "--address")?,
            groups,
            not_before: cert::backdated(now),
            not_after,
            max_days: 0,
            issuer: [0; 32],
        };
        (body, None)
    };
    let signed = Certificate::sign(body, &signing)?;
    // A chain is checked against what the issuer may sign before anything is written.
    let mut chain = vec![signed.clone()];
    if issuer.body().role == Role::Signer {
        chain.push(issuer.clone());
    }
    if !a.signer {
        let ca = if issuer.body().role == Role::Ca {
            issuer.clone()
        } else {
            let ca_path = a.ca_dir.join("ca.crt");
            read_certs(&ca_path)
                .with_context(|| "a signer's certificates are checked against the CA's: pass --ca-dir with ca.crt")?
                .into_iter()
                .next()
                .context("no CA certificate")?
        };
        cert::verify(&chain, &ca, now)?;
    }
    let text: String = chain.iter().map(Certificate::to_pem).collect();
    if let Some(key) = new_key {
        let key_path = out.with_extension("key");
        refuse_overwrite(&[&out, &key_path], a.force)?;
        write_private(&key_path, &cert::signing_key_to_pem(&key))
            .with_context(|| format!("writing {}", key_path.display()))?;
        write_public(&out, &text)?;
        println!(
            "signer `{}` created\n  key:         {} (mode 0600)\n  certificate: {}\n  may sign:    {} / groups {} / at most {} days",
            signed.name(),
            key_path.display(),
            out.display(),
            a.range.join(", "),
            if signed.body().groups.is_empty() { "any".into() } else { signed.body().groups.join(",") },
            if a.max_days == 0 { "any".into() } else { a.max_days.to_string() },
        );
    } else {
        refuse_overwrite(&[&out], a.force)?;
        write_public(&out, &text)?;
        println!(
            "certificate for `{}` written to {}\n  fingerprint: {}",
            signed.name(),
            out.display(),
            signed.fingerprint()
        );
    }
    Ok(())
}

fn describe(c: &Certificate) -> serde_json::Value {
    let b = c.body();
    let key = match b.role {
        Role::Node => PublicKey(b.public_key).to_string(),
        _ => cert::hex(&b.public_key),
    };
    let (networks, groups) = if b.role == Role::Node {
        ("addresses", "groups")
    } else {
        ("may_sign_ranges", "may_sign_groups")
    };
    let mut m = serde_json::Map::new();
    m.insert("role".into(), serde_json::json!(b.role));
    m.insert("name".into(), serde_json::json!(b.name));
    m.insert("public_key".into(), serde_json::json!(key));
    m.insert(
        networks.into(),
        serde_json::json!(b
            .networks
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()),
    );
    m.insert(groups.into(), serde_json::json!(b.groups));
    m.insert(
        "not_before".into(),
        serde_json::json!(cert::utc(b.not_before)),
    );
    m.insert(
        "not_after".into(),
        serde_json::json!(cert::utc(b.not_after)),
    );
    m.insert("max_days".into(), serde_json::json!(b.max_days));
    m.insert(
        "issuer_key".into(),
        serde_json::json!(cert::key_id(&b.issuer)),
    );
    m.insert("fingerprint".into(), serde_json::json!(c.fingerprint()));
    serde_json::Value::Object(m)
}

fn show(a: &CaShowArgs) -> anyhow::Result<()> {
    let certs = read_certs(&a.file)?;
    if a.json {
        let all: Vec<_> = certs.iter().map(describe).collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    for c in &certs {
        let b = c.body();
        println!("{} `{}`", b.role, b.name);
        if let Some(fields) = describe(c).as_object() {
            for (k, v) in fields {
                if k == "role" || k == "name" {
                    continue;
                }
                let v = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Array(a) if a.is_empty() => "any".into(),
                    serde_json::Value::Array(a) => a
                        .iter()
                        .map(|x| x.as_str().unwrap_or_default().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    other => other.to_string(),
                };
                println!("  {k:<16} {v}");
            }
        }
    }
    Ok(())
}

fn verify(a: &CaVerifyArgs) -> anyhow::Result<()> {
    let chain = read_certs(&a.file)?;
    let ca = read_certs(&a.ca)?
        .into_iter()
        .next()
        .with_context(|| format!("{} holds no certificate", a.ca.display()))?;
    let v = cert::verify(&chain, &ca, unix_now()?)?;
    println!(
        "valid: `{}` ({}) groups [{}], signed by `{}`, until {}",
        v.name,
        v.addresses
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        v.groups.join(", "),
        v.issuer,
        cert::utc(v.not_after)
    );
    Ok(())
}

fn parse_ttl(text: &str) -> anyhow::Result<u64> {
    cert::parse_lifetime(text).map_err(|e| anyhow::anyhow!("--ttl {text}: {e}"))
}

fn token(a: &CaTokenArgs) -> anyhow::Result<()> {
    use crate::mesh::token::LighthouseRef;
    let groups = split_groups(a.groups.as_deref());
    let talk_to = split_groups(a.talk_to.as_deref());
    let ttl = parse_ttl(&a.ttl)?;
    let config = crate::config::Config::load(&a.config)?;
    let hint = "run it on the lighthouse, with its config: [lighthouse] enroll_listen, signer_key and signer_cert, and [mesh] ca";
    let Some(enroller) = crate::mesh::shell::enroller(&config)? else {
        bail!(
            "{} is not an enrolling lighthouse's config; {hint}",
            a.config.display()
        );
    };
    let enroll_port = config
        .lighthouse
        .enroll_listen
        .map_or(crate::mesh::enroll::ENROLL_PORT, |l| l.port());
    let endpoint: std::net::SocketAddr = match a.endpoint.parse::<std::net::SocketAddr>() {
        Ok(e) => e,
        Err(_) => std::net::SocketAddr::new(
            a.endpoint.parse().map_err(|e| {
                anyhow::anyhow!("--endpoint {}: {e}; give the lighthouse's IP address as members reach it, e.g. 203.0.113.7", a.endpoint)
            })?,
            config.node.listen_port,
        ),
    };
    let key = crate::keys::PrivateKey::load(&config.node.private_key_file)?;
    let Some(overlay) = config.node.address.first().map(|a| a.addr()) else {
        bail!("the lighthouse has no [node].address");
    };
    let mut lighthouses = vec![LighthouseRef {
        endpoint,
        public_key: key.public_key().0,
        overlay,
        enroll: std::net::SocketAddr::new(endpoint.ip(), enroll_port),
    }];
    if let Some(mesh) = &config.mesh {
        for l in &mesh.lighthouses {
            lighthouses.push(LighthouseRef {
                endpoint: l.endpoint,
                public_key: l.public_key.0,
                overlay: l.overlay,
                enroll: std::net::SocketAddr::new(
                    l.endpoint.ip(),
                    crate::mesh::enroll::ENROLL_PORT,
                ),
            });
        }
    }
    let addresses = a
        .address
        .iter()
        .filter(|t| t.as_str() != "auto")
        .map(|text| {
            text.parse::<ipnet::IpNet>().map_err(|e| {
                anyhow::anyhow!(
                    "--address {text}: {e}; use auto or an address with prefix, e.g. 10.77.0.7/16"
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let token = enroller.issue(
        lighthouses,
        &a.name,
        groups,
        talk_to,
        addresses,
        unix_now()? + ttl,
    )?;
    println!("{}", token.to_text());
    eprintln!(
        "single use, valid until {}; on the new machine: myelin join <token>",
        cert::utc(unix_now()? + ttl)
    );
    Ok(())
}

fn revoke(a: &CaRevokeArgs) -> anyhow::Result<()> {
    use crate::mesh::revoke::{describe, RevocationList, Revoked};
    let (key, ca) = load_issuer(&a.ca_dir.join("ca.key"), &a.ca_dir.join("ca.crt"))?;
    if ca.body().role != Role::Ca {
        bail!(
            "{} is not a CA certificate: only the CA revokes",
            a.ca_dir.join("ca.crt").display()
        );
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| a.ca_dir.join("revoked.crl"));
    let (mut entries, previous) = match std::fs::read_to_string(&out) {
        Ok(text) => {
            let list = RevocationList::parse_pem(&text)
                .with_context(|| format!("reading {}", out.display()))?;
            list.verify(&ca.body().public_key)
                .with_context(|| format!("{} was not signed by this CA", out.display()))?;
            (list.entries, Some(list.issued_at))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", out.display())),
    };
    let now = unix_now()?;
    let entry = match crate::mesh::token::fingerprint_bytes(&a.what.to_ascii_lowercase()) {
        Some(f) => Revoked::Fingerprint(f),
        None => {
            cert::check_name(Role::Node, &a.what).map_err(|e| {
                anyhow::anyhow!(
                    "{e}\n  (give a member's name, or a certificate's 64-digit fingerprint)"
                )
            })?;
            Revoked::Name {
                name: a.what.clone(),
                before: now,
            }
        }
    };
    let what = describe(&entry);
    entries.push(entry);
    // Issued strictly after any list it replaces, so members take it.
    let issued_at = previous.map_or(now, |p| now.max(p + 1));
    let list = RevocationList::sign(entries, issued_at, &key);
    write_public(&out, &list.to_pem())?;
    println!(
        "revoked {what}\n  list: {} ({} entries); copy it to every lighthouse's [mesh].revocations: members drop the revoked within seconds",
        out.display(),
        list.entries.len()
    );
    Ok(())
}
