//! Fleet identity: an Ed25519 CA, signers it constrains, and node certificates that bind a
//! name, a WireGuard key, overlay addresses and groups. The encoding is compact, versioned and
//! canonical (one byte string per certificate); `verify` is one pure function of the chain,
//! the trusted CA and `now`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use std::net::IpAddr;

/// The first bytes of every certificate: format and version in one.
const MAGIC: &[u8; 4] = b"MYC1";
/// Signatures cover this prefix too, so a certificate signature can never be replayed as
/// a signature over any other Myelin message.
const SIGNING_CONTEXT: &[u8] = b"myelin certificate v1\0";
const PEM_LABEL: &str = "MYELIN CERTIFICATE";
const KEY_LABEL: &str = "MYELIN ED25519 PRIVATE KEY";
pub const MAX_NAME: usize = 63;
pub const MAX_GROUPS: usize = 32;
pub const MAX_NETWORKS: usize = 8;
const DAY: u64 = 86_400;
/// How far before its signing a certificate starts to be valid: robots' clocks drift and
/// a member that verifies a certificate signed a moment ago on another machine must not
/// see it as "not yet valid".
pub const CLOCK_SKEW: u64 = 300;

/// The not-before for a certificate signed at `now`.
pub fn backdated(now: u64) -> u64 {
    now.saturating_sub(CLOCK_SKEW)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertError {
    #[error("not a Myelin certificate: {0}\n  fix: use a file written by `myelin ca init`, `myelin ca sign` or `myelin join`")]
    Malformed(String),
    #[error("certificate `{name}`: the signature does not match its contents (tampered, or signed by another key)")]
    BadSignature { name: String },
    #[error("certificate `{name}` was issued by key {issuer}, not by this fleet's CA or its signer {expected}\n  fix: sign it with this fleet's CA (`myelin ca sign`), or point [mesh].ca at the CA that issued it")]
    WrongIssuer {
        name: String,
        issuer: String,
        expected: String,
    },
    #[error("certificate `{name}` expired at {} (now {})\n  fix: renew it (`myelin ca sign`, or `myelin join` with a new token)", utc(*not_after), utc(*now))]
    Expired {
        name: String,
        not_after: u64,
        now: u64,
    },
    #[error("certificate `{name}` is not valid before {} (now {})\n  fix: check this machine's clock", utc(*not_before), utc(*now))]
    NotYetValid {
        name: String,
        not_before: u64,
        now: u64,
    },
    #[error("certificate `{name}`: {what} {value} is outside what its issuer `{issuer}` may sign ({allowed})")]
    OutsideIssuer {
        name: String,
        issuer: String,
        what: &'static str,
        value: String,
        allowed: String,
    },
    #[error("certificate `{name}` is a {found}, but a {expected} is needed here")]
    WrongRole {
        name: String,
        found: Role,
        expected: &'static str,
    },
    #[error("a chain holds a node certificate and at most one signer, found {0} certificates")]
    ChainLength(usize),
    #[error("invalid {what} `{value}`: {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: &'static str,
    },
}

/// What a certificate's key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The fleet's root: self-signed, signs signers and nodes.
    Ca,
    /// An intermediate (a lighthouse's), constrained by its CA; signs nodes only.
    Signer,
    /// A member: its key is the node's WireGuard public key.
    Node,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Ca => "CA certificate",
            Role::Signer => "signer certificate",
            Role::Node => "node certificate",
        })
    }
}

/// The signed contents of a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertBody {
    pub role: Role,
    pub name: String,
    /// A node's WireGuard (X25519) public key; a CA's or signer's Ed25519 verifying key.
    pub public_key: [u8; 32],
    /// A node's overlay addresses with their prefix; for a CA or signer, the ranges it may
    /// sign (empty: any).
    pub networks: Vec<IpNet>,
    /// A node's groups; for a CA or signer, the groups it may grant (empty: any). Sorted.
    pub groups: Vec<String>,
    /// Validity, unix seconds, inclusive.
    pub not_before: u64,
    pub not_after: u64,
    /// For a CA or signer: how long a certificate it signs may still run, in days (0: no
    /// limit).
    pub max_days: u32,
    /// The issuer's Ed25519 key (a CA's own).
    pub issuer: [u8; 32],
}

/// A certificate as encoded and signed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Certificate {
    body: CertBody,
    signature: [u8; 64],
    encoded: Vec<u8>,
}

/// What a verified chain says about a member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedNode {
    pub name: String,
    pub public_key: [u8; 32],
    pub addresses: Vec<IpNet>,
    pub groups: Vec<String>,
    pub not_after: u64,
    pub fingerprint: String,
    /// The name of the certificate that signed it (the CA's or a signer's).
    pub issuer: String,
}

fn invalid(what: &'static str, value: &str, why: &'static str) -> CertError {
    CertError::Invalid {
        what,
        value: value.to_string(),
        why,
    }
}

/// A member's name is a DNS label, so it can become a host name later; a CA's name is free
/// text within the same character set plus upper case, dot and underscore.
pub fn check_name(role: Role, name: &str) -> Result<(), CertError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(invalid("name", name, "it must be 1 to 63 characters"));
    }
    let label = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    match role {
        Role::Node | Role::Signer if !label => Err(invalid(
            "name",
            name,
            "use lower-case letters, digits and inner hyphens (a DNS label), e.g. robot7",
        )),
        Role::Ca
            if !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) =>
        {
            Err(invalid(
                "name",
                name,
                "use letters, digits, '-', '_' and '.', e.g. acme-fleet",
            ))
        }
        _ => Ok(()),
    }
}

pub fn check_group(group: &str) -> Result<(), CertError> {
    let ok = !group.is_empty()
        && group.len() <= MAX_NAME
        && group
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "group",
            group,
            "use 1 to 63 lower-case letters, digits, '-' and '_', e.g. robots",
        ))
    }
}

impl CertBody {
    /// Puts the body in canonical form (groups sorted, deduplicated) and checks its fields.
    fn canonicalize(mut self) -> Result<Self, CertError> {
        self.groups.sort();
        self.groups.dedup();
        check_name(self.role, &self.name)?;
        for g in &self.groups {
            check_group(g)?;
        }
        if self.groups.len() > MAX_GROUPS {
            return Err(invalid(
                "groups",
                &self.groups.join(","),
                "at most 32 groups",
            ));
        }
        if self.networks.len() > MAX_NETWORKS {
            return Err(invalid("addresses", "", "at most 8 addresses or ranges"));
        }
        for (i, n) in self.networks.iter().enumerate() {
            if self.networks[..i].contains(n) {
                return Err(invalid("address", &n.to_string(), "listed twice"));
            }
            if self.role != Role::Node && n.trunc() != *n {
                return Err(invalid(
                    "range",
                    &n.to_string(),
                    "a range has no host bits set, e.g. 10.77.0.0/16",
                ));
            }
        }
        if self.role == Role::Node && self.max_days != 0 {
            return Err(invalid(
                "max_days",
                "",
                "only a CA or a signer limits lifetimes",
            ));
        }
        if self.not_after < self.not_before {
            return Err(invalid(
                "validity",
                &format!("{}..{}", self.not_before, self.not_after),
                "not_after is before not_before",
            ));
        }
        Ok(self)
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(MAGIC);
        out.push(match self.role {
            Role::Ca => 0,
            Role::Signer => 1,
            Role::Node => 2,
        });
        put_str(&mut out, &self.name);
        out.extend_from_slice(&self.public_key);
        out.push(self.networks.len() as u8);
        for n in &self.networks {
            match n.addr() {
                IpAddr::V4(a) => {
                    out.push(4);
                    out.extend_from_slice(&a.octets());
                }
                IpAddr::V6(a) => {
                    out.push(6);
                    out.extend_from_slice(&a.octets());
                }
            }
            out.push(n.prefix_len());
        }
        out.push(self.groups.len() as u8);
        for g in &self.groups {
            put_str(&mut out, g);
        }
        out.extend_from_slice(&self.not_before.to_be_bytes());
        out.extend_from_slice(&self.not_after.to_be_bytes());
        out.extend_from_slice(&self.max_days.to_be_bytes());
        out.extend_from_slice(&self.issuer);
        out
    }

    /// Whether `now` lies within the validity window.
    fn check_time(&self, now: u64) -> Result<(), CertError> {
        if now < self.not_before {
            return Err(CertError::NotYetValid {
                name: self.name.clone(),
                not_before: self.not_before,
                now,
            });
        }
        if now > self.not_after {
            return Err(CertError::Expired {
                name: self.name.clone(),
                not_after: self.not_after,
                now,
            });
        }
        Ok(())
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Names and groups are checked to be at most 63 bytes before they are encoded.
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// A cursor over untrusted bytes; every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CertError> {
        if self.bytes.len() < n {
            return Err(CertError::Malformed("truncated".into()));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, CertError> {
        Ok(self.take(1)?[0])
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], CertError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u64(&mut self) -> Result<u64, CertError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, CertError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn str(&mut self) -> Result<String, CertError> {
        let n = self.u8()? as usize;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| CertError::Malformed("a name is not UTF-8".into()))
    }
}

impl Certificate {
    /// Signs `body` with `key`; `body.issuer` is set from the key.
    pub fn sign(mut body: CertBody, key: &SigningKey) -> Result<Self, CertError> {
        body.issuer = key.verifying_key().to_bytes();
        let body = body.canonicalize()?;
        let mut encoded = body.encode();
        let signature = key.sign(&signed_message(&encoded)).to_bytes();
        encoded.extend_from_slice(&signature);
        Ok(Self {
            body,
            signature,
            encoded,
        })
    }

    /// Decodes one certificate. Anything but the canonical encoding is refused, so two byte
    /// strings never name the same certificate. The signature is checked by `verify`.
    pub fn decode(bytes: &[u8]) -> Result<Self, CertError> {
        let mut r = Reader { bytes };
        if r.take(4)? != MAGIC {
            return Err(CertError::Malformed(
                "unknown format or version (expected MYC1)".into(),
            ));
        }
        let role = match r.u8()? {
            0 => Role::Ca,
            1 => Role::Signer,
            2 => Role::Node,
            other => return Err(CertError::Malformed(format!("unknown role {other}"))),
        };
        let name = r.str()?;
        let public_key = r.array()?;
        let count = r.u8()? as usize;
        let mut networks = Vec::with_capacity(count.min(MAX_NETWORKS));
        for _ in 0..count {
            let addr: IpAddr = match r.u8()? {
                4 => IpAddr::from(r.array::<4>()?),
                6 => IpAddr::from(r.array::<16>()?),
                other => {
                    return Err(CertError::Malformed(format!(
                        "unknown address family {other}"
                    )))
                }
            };
            let prefix = r.u8()?;
            networks.push(
                IpNet::new(addr, prefix)
                    .map_err(|_| CertError::Malformed(format!("prefix /{prefix} too long")))?,
            );
        }
        let count = r.u8()? as usize;
        let mut groups = Vec::with_capacity(count.min(MAX_GROUPS));
        for _ in 0..count {
            groups.push(r.str()?);
        }
        let body = CertBody {
            role,
            name,
            public_key,
            networks,
            groups,
            not_before: r.u64()?,
            not_after: r.u64()?,
            max_days: r.u32()?,
            issuer: r.array()?,
        };
        let signature = r.array::<64>()?;
        if !r.bytes.is_empty() {
            return Err(CertError::Malformed("trailing bytes".into()));
        }
        let body = body.canonicalize()?;
        let mut encoded = body.encode();
        encoded.extend_from_slice(&signature);
        if encoded != bytes {
            return Err(CertError::Malformed("not in canonical form".into()));
        }
        Ok(Self {
            body,
            signature,
            encoded,
        })
    }

    pub fn body(&self) -> &CertBody {
        &self.body
    }

    pub fn name(&self) -> &str {
        &self.body.name
    }

    pub fn to_bytes(&self) -> &[u8] {
        &self.encoded
    }

    /// SHA-256 of the encoded certificate, in hex: what tokens pin and revocations name.
    pub fn fingerprint(&self) -> String {
        hex(&Sha256::digest(&self.encoded))
    }

    pub fn to_pem(&self) -> String {
        armour(PEM_LABEL, &self.encoded)
    }

    /// Every certificate in a text file (a node's certificate, then its signer's).
    pub fn parse_pem(text: &str) -> Result<Vec<Self>, CertError> {
        let blocks = dearmour(PEM_LABEL, text)?;
        if blocks.is_empty() {
            return Err(CertError::Malformed(format!(
                "no -----BEGIN {PEM_LABEL}----- block"
            )));
        }
        blocks.iter().map(|b| Self::decode(b)).collect()
    }

    /// Checks this certificate's own signature against `key`.
    fn signed_by(&self, key: &[u8; 32]) -> Result<(), CertError> {
        let bad = || CertError::BadSignature {
            name: self.body.name.clone(),
        };
        let key = VerifyingKey::from_bytes(key).map_err(|_| bad())?;
        let body_len = self.encoded.len() - 64;
        key.verify_strict(
            &signed_message(&self.encoded[..body_len]),
            &Signature::from_bytes(&self.signature),
        )
        .map_err(|_| bad())
    }

    /// Checks that `self` is a valid, self-signed CA certificate at `now`.
    pub fn verify_ca(&self, now: u64) -> Result<(), CertError> {
        if self.body.role != Role::Ca {
            return Err(CertError::WrongRole {
                name: self.body.name.clone(),
                found: self.body.role,
                expected: "CA certificate",
            });
        }
        if self.body.issuer != self.body.public_key {
            return Err(CertError::WrongIssuer {
                name: self.body.name.clone(),
                issuer: key_id(&self.body.issuer),
                expected: key_id(&self.body.public_key),
            });
        }
        self.signed_by(&self.body.public_key)?;
        self.body.check_time(now)
    }

    /// Checks that `issuer` signed `self` and that `self` keeps within what `issuer` may sign.
    fn verify_issued_by(&self, issuer: &Certificate, now: u64) -> Result<(), CertError> {
        let (c, i) = (&self.body, &issuer.body);
        if c.issuer != i.public_key {
            return Err(CertError::WrongIssuer {
                name: c.name.clone(),
                issuer: key_id(&c.issuer),
                expected: key_id(&i.public_key),
            });
        }
        self.signed_by(&i.public_key)?;
        c.check_time(now)?;
        let outside = |what: &'static str, value: String, allowed: String| {
            Err(CertError::OutsideIssuer {
                name: c.name.clone(),
                issuer: i.name.clone(),
                what,
                value,
                allowed,
            })
        };
        if c.not_before < i.not_before || c.not_after > i.not_after {
            return outside(
                "validity",
                format!("{} to {}", utc(c.not_before), utc(c.not_after)),
                format!("{} to {}", utc(i.not_before), utc(i.not_after)),
            );
        }
        // A renewal keeps its lineage's not-before, so what a signer's `max_days` bounds is
        // how long a certificate still runs, not its whole span.
        let left = c.not_after.saturating_sub(now.max(c.not_before));
        if i.max_days != 0 && left > u64::from(i.max_days) * DAY + CLOCK_SKEW {
            return outside(
                "lifetime",
                format!("{} days left", left.div_ceil(DAY)),
                format!("at most {} days", i.max_days),
            );
        }
        if !i.networks.is_empty() {
            for n in &c.networks {
                let inside = i.networks.iter().any(|r| match c.role {
                    Role::Node => r.contains(&n.addr()),
                    _ => r.contains(n),
                });
                if !inside {
                    return outside("address", n.to_string(), list(&i.networks));
                }
            }
        }
        if !i.groups.is_empty() {
            for g in &c.groups {
                if !i.groups.contains(g) {
                    return outside("group", g.clone(), i.groups.join(", "));
                }
            }
        }
        Ok(())
    }
}

fn list(networks: &[IpNet]) -> String {
    networks
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_CONTEXT.len() + body.len());
    m.extend_from_slice(SIGNING_CONTEXT);
    m.extend_from_slice(body);
    m
}

/// Verifies a member's chain (its node certificate, optionally followed by the signer that
/// issued it) against the fleet's CA at `now` (unix seconds). Pure: no clock, no I/O.
pub fn verify(
    chain: &[Certificate],
    ca: &Certificate,
    now: u64,
) -> Result<VerifiedNode, CertError> {
    let (node, signer) = match chain {
        [node] => (node, None),
        [node, signer] => (node, Some(signer)),
        _ => return Err(CertError::ChainLength(chain.len())),
    };
    ca.verify_ca(now)?;
    if node.body.role != Role::Node {
        return Err(CertError::WrongRole {
            name: node.body.name.clone(),
            found: node.body.role,
            expected: "node certificate",
        });
    }
    let issuer = match signer {
        None => ca,
        Some(signer) => {
            if signer.body.role != Role::Signer {
                return Err(CertError::WrongRole {
                    name: signer.body.name.clone(),
                    found: signer.body.role,
                    expected: "signer certificate",
                });
            }
            signer.verify_issued_by(ca, now)?;
            signer
        }
    };
    node.verify_issued_by(issuer, now)?;
    Ok(VerifiedNode {
        name: node.body.name.clone(),
        public_key: node.body.public_key,
        addresses: node.body.networks.clone(),
        groups: node.body.groups.clone(),
        not_after: node.body.not_after,
        fingerprint: node.fingerprint(),
        issuer: issuer.body.name.clone(),
    })
}

/// A short, stable name for an Ed25519 key in messages: its first 8 bytes in hex.
pub fn key_id(key: &[u8; 32]) -> String {
    hex(&key[..8])
}

/// Unix seconds as an RFC 3339 UTC time, for people (days-from-civil, inverted).
pub fn utc(secs: u64) -> String {
    let days = (secs / DAY) as i64;
    let rem = secs % DAY;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn armour(label: &str, bytes: &[u8]) -> String {
    let b64 = STANDARD.encode(bytes);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The contents of every `label` block in `text`, in order.
pub(super) fn dearmour(label: &str, text: &str) -> Result<Vec<Vec<u8>>, CertError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if line == begin {
            if current.is_some() {
                return Err(CertError::Malformed(format!("{begin} inside a block")));
            }
            current = Some(String::new());
        } else if line == end {
            let b64 = current
                .take()
                .ok_or_else(|| CertError::Malformed(format!("{end} without a BEGIN")))?;
            blocks.push(
                STANDARD
                    .decode(b64)
                    .map_err(|e| CertError::Malformed(format!("bad base64: {e}")))?,
            );
        } else if let Some(b64) = current.as_mut() {
            b64.push_str(line);
        }
    }
    if current.is_some() {
        return Err(CertError::Malformed(format!("missing {end}")));
    }
    Ok(blocks)
}

/// A fresh Ed25519 key for a CA or signer.
pub fn generate_signing_key() -> Result<SigningKey, CertError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| CertError::Malformed(format!("random: {e}")))?;
    Ok(SigningKey::from_bytes(&seed))
}

pub fn signing_key_to_pem(key: &SigningKey) -> String {
    armour(KEY_LABEL, &key.to_bytes())
}

pub fn signing_key_from_pem(text: &str) -> Result<SigningKey, CertError> {
    let blocks = dearmour(KEY_LABEL, text)?;
    let [seed] = blocks.as_slice() else {
        return Err(CertError::Malformed(format!(
            "expected one -----BEGIN {KEY_LABEL}----- block, found {}",
            blocks.len()
        )));
    };
    let seed = <[u8; 32]>::try_from(seed.as_slice())
        .map_err(|_| CertError::Malformed("an Ed25519 key is 32 bytes".into()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// A lifetime as people write it: "90s", "30m", "1h", "7d", or plain seconds.
pub fn parse_lifetime(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| "use a number with s, m, h or d, e.g. 1h".to_string())?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err("the unit is s, m, h or d, e.g. 1h".into()),
    };
    match n.checked_mul(scale) {
        Some(s) if s > 0 && s <= 100 * 365 * 86_400 => Ok(s),
        _ => Err("use a positive time of at most 100 years".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_800_000_000;
    const YEAR: u64 = 365 * DAY;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn body(
        role: Role,
        name: &str,
        public_key: [u8; 32],
        networks: &[&str],
        groups: &[&str],
    ) -> CertBody {
        CertBody {
            role,
            name: name.into(),
            public_key,
            networks: networks.iter().map(|n| n.parse().unwrap()).collect(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            not_before: NOW - DAY,
            not_after: NOW + YEAR,
            max_days: 0,
            issuer: [0; 32],
        }
    }

    fn ca(k: &SigningKey) -> Certificate {
        let mut b = body(
            Role::Ca,
            "acme-fleet",
            k.verifying_key().to_bytes(),
            &[],
            &[],
        );
        b.not_after = NOW + 10 * YEAR;
        Certificate::sign(b, k).unwrap()
    }

    fn signer(ca_key: &SigningKey, k: &SigningKey) -> Certificate {
        let mut b = body(
            Role::Signer,
            "lighthouse1",
            k.verifying_key().to_bytes(),
            &["10.77.0.0/16"],
            &["robots"],
        );
        b.max_days = 30;
        b.not_after = NOW + 2 * YEAR;
        Certificate::sign(b, ca_key).unwrap()
    }

    fn node(issuer: &SigningKey, addr: &str, groups: &[&str], days: u64) -> Certificate {
        let mut b = body(Role::Node, "robot7", [7; 32], &[addr], groups);
        b.not_after = b.not_before + days * DAY;
        Certificate::sign(b, issuer).unwrap()
    }

    #[test]
    fn a_node_signed_by_the_ca_verifies_and_roundtrips_through_pem() {
        let ca_key = key(1);
        let ca = ca(&ca_key);
        let n = node(&ca_key, "10.77.0.7/16", &["robots", "cameras"], 365);
        let text = n.to_pem() + &ca.to_pem();
        let parsed = Certificate::parse_pem(&text).unwrap();
        assert_eq!(parsed, vec![n.clone(), ca.clone()]);
        let v = verify(&parsed[..1], &ca, NOW).unwrap();
        assert_eq!(v.name, "robot7");
        assert_eq!(v.public_key, [7; 32]);
        assert_eq!(v.groups, vec!["cameras", "robots"], "groups are sorted");
        assert_eq!(v.addresses[0].to_string(), "10.77.0.7/16");
        assert_eq!(v.issuer, "acme-fleet");
        assert_eq!(v.fingerprint.len(), 64);
    }

    #[test]
    fn a_node_signed_by_a_constrained_signer_verifies_within_its_limits() {
        let (ca_key, lh_key) = (key(1), key(2));
        let (ca, lh) = (ca(&ca_key), signer(&ca_key, &lh_key));
        let n = node(&lh_key, "10.77.3.4/16", &["robots"], 30);
        verify(&[n, lh.clone()], &ca, NOW).unwrap();
        // Outside its range, its groups, its lifetime.
        let err = verify(
            &[node(&lh_key, "10.78.0.1/16", &["robots"], 30), lh.clone()],
            &ca,
            NOW,
        );
        assert!(
            matches!(
                err,
                Err(CertError::OutsideIssuer {
                    what: "address",
                    ..
                })
            ),
            "{err:?}"
        );
        let err = verify(
            &[
                node(&lh_key, "10.77.0.1/16", &["operators"], 30),
                lh.clone(),
            ],
            &ca,
            NOW,
        );
        assert!(
            matches!(err, Err(CertError::OutsideIssuer { what: "group", .. })),
            "{err:?}"
        );
        // It bounds how long a certificate still runs: 31 days from its start is too long,
        // but a day later (a renewed lineage, say) 30 are left and it is fine.
        let long = node(&lh_key, "10.77.0.1/16", &["robots"], 31);
        verify(&[long.clone(), lh.clone()], &ca, NOW).unwrap();
        let err = verify(&[long, lh.clone()], &ca, NOW - DAY);
        assert!(
            matches!(
                err,
                Err(CertError::OutsideIssuer {
                    what: "lifetime",
                    ..
                })
            ),
            "{err:?}"
        );
        // Without the signer in the chain, the node's issuer is unknown to the CA.
        let err = verify(&[node(&lh_key, "10.77.0.1/16", &["robots"], 30)], &ca, NOW);
        assert!(matches!(err, Err(CertError::WrongIssuer { .. })), "{err:?}");
    }

    #[test]
    fn a_signer_cannot_sign_a_signer_and_a_node_cannot_sign_at_all() {
        let (ca_key, lh_key) = (key(1), key(2));
        let ca = ca(&ca_key);
        let lh = signer(&ca_key, &lh_key);
        let second = signer(&lh_key, &key(3));
        let n = node(&key(3), "10.77.0.1/16", &["robots"], 30);
        assert!(matches!(
            verify(&[n.clone(), second], &ca, NOW),
            Err(CertError::WrongIssuer { .. })
        ));
        assert!(matches!(
            verify(std::slice::from_ref(&lh), &ca, NOW),
            Err(CertError::WrongRole { .. })
        ));
        let n_by_ca = node(&ca_key, "10.77.0.1/16", &[], 30);
        assert!(matches!(
            verify(&[n, n_by_ca], &ca, NOW),
            Err(CertError::WrongRole { .. })
        ));
        assert!(matches!(
            verify(&[], &ca, NOW),
            Err(CertError::ChainLength(0))
        ));
    }

    #[test]
    fn time_wrong_issuer_and_tampering_are_refused() {
        let ca_key = key(1);
        let ca = ca(&ca_key);
        let n = node(&ca_key, "10.77.0.7/16", &["robots"], 10);
        assert!(matches!(
            verify(std::slice::from_ref(&n), &ca, NOW + 11 * DAY),
            Err(CertError::Expired { .. })
        ));
        assert!(matches!(
            verify(std::slice::from_ref(&n), &ca, NOW - 2 * DAY),
            Err(CertError::NotYetValid { .. })
        ));
        // Another fleet's CA with the same name.
        let other = ca_with_name(&key(9), "acme-fleet");
        assert!(matches!(
            verify(std::slice::from_ref(&n), &other, NOW),
            Err(CertError::WrongIssuer { .. })
        ));
        // A forged CA certificate: right key, wrong signature.
        let mut bytes = ca.to_bytes().to_vec();
        if let Some(b) = bytes.last_mut() {
            *b ^= 1;
        }
        let forged = Certificate::decode(&bytes).unwrap();
        assert!(matches!(
            verify(&[n], &forged, NOW),
            Err(CertError::BadSignature { .. })
        ));
    }

    fn ca_with_name(k: &SigningKey, name: &str) -> Certificate {
        let b = body(Role::Ca, name, k.verifying_key().to_bytes(), &[], &[]);
        Certificate::sign(b, k).unwrap()
    }

    #[test]
    fn names_groups_and_ranges_are_checked_when_signing() {
        let k = key(1);
        for bad in ["", "Robot7", "-robot", "robot_7", &"a".repeat(64)] {
            let b = body(Role::Node, bad, [1; 32], &["10.0.0.1/8"], &[]);
            assert!(
                matches!(Certificate::sign(b, &k), Err(CertError::Invalid { .. })),
                "{bad:?}"
            );
        }
        let b = body(Role::Node, "r", [1; 32], &[], &["Robots"]);
        assert!(Certificate::sign(b, &k).is_err());
        let b = body(Role::Signer, "lh", [1; 32], &["10.77.0.1/16"], &[]);
        assert!(Certificate::sign(b, &k).is_err(), "a range with host bits");
        let b = body(Role::Node, "r", [1; 32], &["10.0.0.1/8", "10.0.0.1/8"], &[]);
        assert!(Certificate::sign(b, &k).is_err(), "an address twice");
    }

    #[test]
    fn decode_refuses_garbage_trailing_bytes_and_non_canonical_forms() {
        let n = node(&key(1), "10.77.0.7/16", &["a", "b"], 10);
        let mut long = n.to_bytes().to_vec();
        long.push(0);
        assert!(Certificate::decode(&long).is_err());
        assert!(Certificate::decode(&n.to_bytes()[..50]).is_err());
        assert!(Certificate::decode(b"MYC2").is_err());
        // Groups out of order: same set, different bytes.
        let canonical = n.body().encode();
        let unordered = {
            let mut e = canonical.clone();
            let at = e.windows(3).position(|w| w == [1, b'a', 1]).unwrap();
            e[at + 1] = b'b';
            e[at + 3] = b'a';
            e
        };
        assert_ne!(canonical, unordered);
        let mut bytes = unordered;
        bytes.extend_from_slice(&n.signature);
        assert_eq!(
            Certificate::decode(&bytes),
            Err(CertError::Malformed("not in canonical form".into()))
        );
    }

    #[test]
    fn times_print_as_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_800_000_000), "2027-01-15T08:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn keys_roundtrip_through_pem() {
        let k = key(5);
        let back = signing_key_from_pem(&signing_key_to_pem(&k)).unwrap();
        assert_eq!(back.to_bytes(), k.to_bytes());
        assert!(signing_key_from_pem("nothing").is_err());
    }

    proptest! {
        /// Any single changed byte of a signed certificate makes it fail to decode or to verify.
        #[test]
        fn any_tampered_byte_is_refused(at in 0usize..400, flip in 1u8..=255) {
            let ca_key = key(1);
            let ca = ca(&ca_key);
            let n = node(&ca_key, "10.77.0.7/16", &["cameras", "robots"], 10);
            let mut bytes = n.to_bytes().to_vec();
            let at = at % bytes.len();
            bytes[at] ^= flip;
            if let Ok(t) = Certificate::decode(&bytes) {
                prop_assert!(verify(&[t], &ca, NOW).is_err());
            }
        }

        /// Decoding arbitrary bytes never panics, and what decodes re-encodes to itself.
        #[test]
        fn decode_is_total_and_canonical(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(c) = Certificate::decode(&bytes) {
                prop_assert_eq!(c.to_bytes(), &bytes[..]);
            }
        }

        /// A signer's constraints hold for every address and validity window.
        #[test]
        fn signer_constraints_hold(a in any::<[u8; 4]>(), days in 0u64..60, start in 0u64..(3 * YEAR)) {
            let (ca_key, lh_key) = (key(1), key(2));
            let (ca, lh) = (ca(&ca_key), signer(&ca_key, &lh_key));
            let mut b = body(Role::Node, "robot7", [7; 32], &[&format!("{}/16", std::net::Ipv4Addr::from(a))], &["robots"]);
            b.not_before = NOW - DAY + start;
            b.not_after = b.not_before + days * DAY;
            let n = Certificate::sign(b.clone(), &lh_key).unwrap();
            let ok = verify(&[n, lh.clone()], &ca, b.not_before).is_ok();
            let inside = a[0] == 10 && a[1] == 77 && days <= 30 && b.not_after <= lh.body().not_after;
            prop_assert_eq!(ok, inside && b.not_before <= lh.body().not_after);
        }
    }
}
