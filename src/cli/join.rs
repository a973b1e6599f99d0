//! `join`: a new machine enters the fleet with a token. Its key is made here and never leaves;
//! the lighthouse is trusted only if it proves it knows the token's secret, and the CA it
//! returns must be the one the token pins.

use super::init::{node_config_text, plugin_user, NodeText};
use super::JoinArgs;
use crate::keys::{write_private, PrivateKey};
use crate::mesh::cert::{self, Certificate};
use crate::mesh::token::{EnrollAnswer, EnrollRequest, Token, TokenError};
use anyhow::{bail, Context};

pub async fn join(args: &JoinArgs) -> anyhow::Result<()> {
    let token = Token::parse(&args.token)?;
    let now = super::ca::unix_now()?;
    if now > token.grant.expires {
        bail!(TokenError::Expired {
            expires: token.grant.expires,
            now
        });
    }
    let dir = super::init::node_dir(&args.dir, &args.control)?;
    let (key_path, config_path) = (dir.join("private.key"), dir.join("myelin.toml"));
    let (ca_path, cert_path) = (dir.join("ca.crt"), dir.join("node.crt"));
    super::ca::refuse_overwrite(&[&key_path, &config_path, &cert_path], args.force)?;
    let key = PrivateKey::generate()?;
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("random nonce: {e}"))?;
    let request = EnrollRequest::new(&token, key.public_key().0, nonce).encode();
    let mut unreachable = Vec::new();
    let mut answer = None;
    for l in &token.grant.lighthouses {
        match crate::mesh::enroll::exchange(l.enroll, &request).await {
            Ok(bytes) => {
                answer = Some(bytes);
                break;
            }
            Err(e) => unreachable.push(format!("{}: {e}", l.enroll)),
        }
    }
    let Some(answer) = answer else {
        bail!(
            "lighthouse unreachable ({})\n  fix: check that this machine reaches the lighthouse's address and TCP port, and that [lighthouse].enroll_listen is set there",
            unreachable.join("; ")
        );
    };
    let (chain_pem, ca_pem) = match EnrollAnswer::decode(&answer, &token, &nonce)? {
        EnrollAnswer::Enrolled { chain_pem, ca_pem } => (chain_pem, ca_pem),
        EnrollAnswer::Refused(why) => bail!("the lighthouse refused: {why}"),
    };
    let ca = Certificate::parse_pem(&ca_pem)?
        .into_iter()
        .next()
        .context("the lighthouse sent no CA certificate")?;
    if crate::mesh::token::fingerprint_bytes(&ca.fingerprint()) != Some(token.grant.ca_fingerprint)
    {
        bail!(TokenError::WrongFleet);
    }
    let chain = Certificate::parse_pem(&chain_pem)?;
    // The certificate was signed after `now` was read, on the lighthouse's clock.
    let node = cert::verify(&chain, &ca, super::ca::unix_now()?)?;
    if node.public_key != key.public_key().0 {
        bail!("the lighthouse certified another key than this node's; refusing it");
    }
    write_private(&key_path, &key.to_base64())
        .with_context(|| format!("writing {}", key_path.display()))?;
    std::fs::write(&ca_path, &ca_pem).with_context(|| format!("writing {}", ca_path.display()))?;
    std::fs::write(&cert_path, &chain_pem)
        .with_context(|| format!("writing {}", cert_path.display()))?;
    let name = crate::config::sanitize_name(&node.name).map_err(|e| anyhow::anyhow!(e))?;
    let lighthouses: Vec<String> =
        token
            .grant
            .lighthouses
            .iter()
            .enumerate()
            .map(|(i, l)| {
                format!(
                "  {{ name = \"{}\", endpoint = \"{}\", public_key = \"{}\", overlay = \"{}\" }},",
                if i == 0 { "lighthouse".to_string() } else { format!("lighthouse{}", i + 1) },
                l.endpoint,
                crate::keys::PublicKey(l.public_key),
                l.overlay
            )
            })
            .collect();
    let talk_to: Vec<String> = token
        .grant
        .talk_to
        .iter()
        .map(|g| format!("{g:?}"))
        .collect();
    let mesh = format!(
        "# This node's fleet membership (`myelin join`): its certificate, the CA it trusts, the\n# lighthouses it registers with and the groups whose members it learns about.\n[mesh]\nca = \"{}\"\ncert = \"{}\"\ntalk_to = [{}]\nlighthouses = [\n{}\n]\n",
        ca_path.display(),
        cert_path.display(),
        talk_to.join(", "),
        lighthouses.join("\n")
    );
    let addresses: Vec<String> = node.addresses.iter().map(ToString::to_string).collect();
    let config = node_config_text(&NodeText {
        origin: "myelin join",
        name: &name,
        key_path: &key_path,
        listen_port: args.listen_port,
        addresses: &addresses,
        control: &args.control,
        mesh: Some(mesh),
    });
    crate::config::write_atomically(&config_path, config.as_bytes())
        .with_context(|| format!("writing {}", config_path.display()))?;
    crate::config::Config::load(&config_path)?;
    println!(
        "joined fleet `{}` as `{}` ({})",
        ca.name(),
        node.name,
        addresses.join(", ")
    );
    println!("  groups:      {}", node.groups.join(", "));
    println!(
        "  certificate: {} (until {})",
        cert_path.display(),
        cert::utc(node.not_after)
    );
    println!("  config:      {}", config_path.display());
    println!(
        "  key:         {} (mode 0600; it never left this machine)",
        key_path.display()
    );
    println!("  plugins:     run as {}", plugin_user());
    println!(
        "start it with: myelin up --config {}",
        config_path.display()
    );
    Ok(())
}
