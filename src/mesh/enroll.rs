//! Enrollment at a lighthouse: the decision (sans-IO: a request and `now` in, an answer and the
//! state to persist out) and its thin TCP shell. A token is spent, and an address allocated,
//! in the state file before the certificate goes out, so a crash never lets a token work twice.

use super::cert::{self, CertBody, Certificate, Role};
use super::token::{EnrollAnswer, EnrollRequest, TokenError};
use ed25519_dalek::SigningKey;
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default TCP port of a lighthouse's enrollment listener.
pub const ENROLL_PORT: u16 = 51823;
/// Lifetime of a member's certificate unless `[lighthouse].cert_lifetime` says otherwise.
pub const DEFAULT_LIFETIME: u64 = 30 * DAY;
const DAY: u64 = 86_400;
/// A request is one length-prefixed message; anything longer is refused unread.
const MAX_REQUEST: usize = 4096;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 16;

/// What survives a restart: spent tokens (until they expire) and allocated addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EnrollState {
    /// Token id (hex) → its expiry (unix seconds).
    pub used: BTreeMap<String, u64>,
    /// Address → member name.
    pub allocated: BTreeMap<IpAddr, String>,
}

/// Signs member certificates, at enrollment and again before they expire: the fleet's CA
/// (to check what it signs), the issuing certificate (the CA's own, or a signer's) and its key.
#[derive(Clone)]
pub struct Issuer {
    pub ca: Certificate,
    pub cert: Certificate,
    pub key: SigningKey,
    /// Lifetime of a member's certificate in seconds (capped by the issuer's own limits).
    pub lifetime: u64,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("cert", &self.cert.name())
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// This issuer's lifetime for a member's certificate: the configured one, within the
    /// issuing certificate's `max_days`.
    fn member_lifetime(&self) -> u64 {
        match self.cert.body().max_days {
            0 => self.lifetime,
            d => self.lifetime.min(u64::from(d) * DAY),
        }
    }

    /// Signs `body` (a member's) and checks the chain as a peer would.
    fn sign_checked(&self, body: CertBody, now: u64) -> Result<Vec<Certificate>, cert::CertError> {
        let mut chain = vec![Certificate::sign(body, &self.key)?];
        if self.cert.body().role == Role::Signer {
            chain.push(self.cert.clone());
        }
        cert::verify(&chain, &self.ca, now)?;
        Ok(chain)
    }

    /// Signs a new member's certificate, valid from `now`.
    pub fn sign_node(
        &self,
        name: &str,
        public_key: [u8; 32],
        networks: Vec<IpNet>,
        groups: Vec<String>,
        now: u64,
    ) -> Result<Vec<Certificate>, cert::CertError> {
        let body = CertBody {
            role: Role::Node,
            name: name.to_string(),
            public_key,
            networks,
            groups,
            not_before: cert::backdated(now).max(self.cert.body().not_before),
            not_after: now
                .saturating_add(self.member_lifetime())
                .min(self.cert.body().not_after),
            max_days: 0,
            issuer: [0; 32],
        };
        self.sign_checked(body, now)
    }

    /// A longer-lived certificate for a member that holds `current` (already verified by the
    /// mesh), signed by this issuer: same name, key, addresses and groups, and the same
    /// not-before, so a revocation by name that covers the first certificate covers every
    /// renewal of it. Refused, with the moment it opens, before the last half of this
    /// issuer's lifetime, so a member cannot keep a signer busy.
    pub fn renew(&self, current: &Certificate, now: u64) -> Result<Vec<Certificate>, Refusal> {
        let b = current.body();
        if b.issuer != self.key.verifying_key().to_bytes() {
            return Err(Refusal::not_here(
                "it was signed by another issuer; renew it where it was signed (`myelin ca sign`)",
            ));
        }
        let lifetime = self.member_lifetime();
        let span = b.not_after.saturating_sub(b.not_before).min(lifetime);
        let opens_at = b.not_after.saturating_sub(span / 2);
        if now < opens_at {
            return Err(Refusal {
                reason: format!("too early: renewal opens at {}", cert::utc(opens_at)),
                opens_at,
            });
        }
        let not_after = now.saturating_add(lifetime).min(self.cert.body().not_after);
        if not_after <= b.not_after {
            return Err(Refusal::not_here(
                "the signer's own certificate ends first; renew the signer (`myelin ca sign --signer`)",
            ));
        }
        let body = CertBody {
            not_after,
            max_days: 0,
            issuer: [0; 32],
            ..b.clone()
        };
        self.sign_checked(body, now).map_err(|e| Refusal {
            reason: format!("this lighthouse may not sign it: {e}"),
            opens_at: 0,
        })
    }
}

/// Why a renewal was refused, and from when it would be granted (unix seconds; 0: never
/// here).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: String,
    pub opens_at: u64,
}

impl Refusal {
    fn not_here(reason: &str) -> Refusal {
        Refusal {
            reason: reason.to_string(),
            opens_at: 0,
        }
    }
}

/// Everything a lighthouse needs to enroll members.
pub struct Enroller {
    pub issuer: Issuer,
    /// Addresses no member may be given (the lighthouse's own).
    pub reserved: Vec<IpAddr>,
    pub state: EnrollState,
}

impl Enroller {
    fn enroll_key(&self) -> [u8; 32] {
        super::token::enroll_key(&self.issuer.key.to_bytes())
    }

    pub fn ca_fingerprint(&self) -> [u8; 32] {
        super::token::fingerprint_bytes(&self.issuer.ca.fingerprint()).unwrap_or_default()
    }

    /// A single-use token for a new member, valid until `expires` (unix seconds).
    pub fn issue(
        &self,
        lighthouses: Vec<super::token::LighthouseRef>,
        name: &str,
        groups: Vec<String>,
        talk_to: Vec<String>,
        addresses: Vec<IpNet>,
        expires: u64,
    ) -> Result<super::token::Token, cert::CertError> {
        cert::check_name(Role::Node, name)?;
        for g in groups.iter().chain(&talk_to) {
            cert::check_group(g)?;
        }
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| cert::CertError::Malformed(format!("random: {e}")))?;
        let grant = super::token::Grant {
            id,
            ca_fingerprint: self.ca_fingerprint(),
            lighthouses,
            name: name.to_string(),
            groups,
            talk_to,
            addresses,
            expires,
        };
        Ok(super::token::Token::issue(grant, &self.enroll_key()))
    }

    /// Picks the first free host address in the issuer's ranges: not reserved, not allocated
    /// before, not held by a member the mesh knows (`in_use`).
    fn allocate(&self, in_use: &[IpAddr]) -> Option<IpNet> {
        for range in &self.issuer.cert.body().networks {
            let IpNet::V4(v4) = range else { continue };
            for host in v4.hosts() {
                let ip = IpAddr::V4(host);
                if !self.reserved.contains(&ip)
                    && !in_use.contains(&ip)
                    && !self.state.allocated.contains_key(&ip)
                {
                    return IpNet::new(ip, range.prefix_len()).ok();
                }
            }
        }
        None
    }

    /// Decides one request. Returns the encoded answer and whether `state` changed (then it
    /// must be persisted before the answer is sent).
    pub fn handle(&mut self, request: &[u8], now: u64, in_use: &[IpAddr]) -> (Vec<u8>, bool) {
        let req = match EnrollRequest::decode(request) {
            Ok(r) => r,
            Err(e) => {
                return (
                    EnrollAnswer::Refused(e.to_string()).encode(None, &[0; 16]),
                    false,
                )
            }
        };
        self.state.used.retain(|_, expires| *expires >= now);
        let id = cert::hex(&req.grant.id);
        let secret = match req.check(&self.enroll_key(), &self.ca_fingerprint(), now, |_| {
            self.state.used.contains_key(&id)
        }) {
            Ok(s) => s,
            Err(e) => {
                // A wrong-fleet request cannot be answered with its secret; the others can.
                let secret = match e {
                    TokenError::WrongFleet => None,
                    _ => Some(req.grant.secret(&self.enroll_key())),
                };
                tracing::info!(name = %req.grant.name, "enrollment refused: {e}");
                return (
                    EnrollAnswer::Refused(e.to_string()).encode(secret.as_ref(), &req.nonce),
                    false,
                );
            }
        };
        let refuse = |why: String| {
            (
                EnrollAnswer::Refused(why).encode(Some(&secret), &req.nonce),
                false,
            )
        };
        let addresses = if req.grant.addresses.is_empty() {
            match self.allocate(in_use) {
                Some(a) => vec![a],
                None => return refuse("no free address left in the signer's range".into()),
            }
        } else {
            req.grant.addresses.clone()
        };
        for address in &addresses {
            if in_use.contains(&address.addr())
                && !self.state.allocated.contains_key(&address.addr())
            {
                return refuse(format!(
                    "address {} is held by a member of the mesh",
                    address.addr()
                ));
            }
            if let Some(holder) = self.state.allocated.get(&address.addr()) {
                if holder != &req.grant.name {
                    return refuse(format!(
                        "address {} is already given to `{holder}`",
                        address.addr()
                    ));
                }
            }
        }
        let chain = match self.issuer.sign_node(
            &req.grant.name,
            req.public_key,
            addresses.clone(),
            req.grant.groups.clone(),
            now,
        ) {
            Ok(c) => c,
            Err(e) => return refuse(e.to_string()),
        };
        let Some(signed) = chain.first() else {
            return refuse("no certificate was signed".into());
        };
        self.state.used.insert(id, req.grant.expires);
        for address in &addresses {
            self.state
                .allocated
                .insert(address.addr(), req.grant.name.clone());
        }
        tracing::info!(name = %signed.name(), addresses = ?addresses, "enrolled a member");
        let answer = EnrollAnswer::Enrolled {
            chain_pem: chain.iter().map(Certificate::to_pem).collect(),
            ca_pem: self.issuer.ca.to_pem(),
        };
        (answer.encode(Some(&secret), &req.nonce), true)
    }
}

pub fn load_state(path: &Path) -> Result<EnrollState, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(EnrollState::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Writes the state durably: a temporary file, synced, then renamed over the old one.
pub fn save_state(path: &Path, state: &EnrollState) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(state).map_err(std::io::Error::other)?;
    let tmp: PathBuf = path.with_extension("tmp");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::keys::write_private(&tmp, &text)?;
    std::fs::rename(&tmp, path)
}

/// Serves enrollments on `listener` until `cancel`: one length-prefixed request, one answer.
pub async fn serve(
    listener: tokio::net::TcpListener,
    enroller: Enroller,
    state_path: PathBuf,
    members: tokio::sync::watch::Receiver<Vec<super::control::MemberView>>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let enroller = std::sync::Arc::new(tokio::sync::Mutex::new(enroller));
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((mut stream, from)) = accepted else {
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let enroller = enroller.clone();
        let state_path = state_path.clone();
        let in_use: Vec<IpAddr> = members
            .borrow()
            .iter()
            .flat_map(|m| m.addresses.iter().map(|a| a.addr()))
            .collect();
        tokio::spawn(async move {
            let _permit = permit;
            let result = tokio::time::timeout(IO_TIMEOUT, async {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let len = stream.read_u32().await? as usize;
                if len > MAX_REQUEST {
                    return Err(std::io::Error::other("request too long"));
                }
                let mut request = vec![0u8; len];
                stream.read_exact(&mut request).await?;
                let answer = {
                    let mut e = enroller.lock().await;
                    let now = super::shell::unix_now();
                    let (answer, changed) = e.handle(&request, now, &in_use);
                    if changed {
                        let state = e.state.clone();
                        let path = state_path.clone();
                        match tokio::task::spawn_blocking(move || save_state(&path, &state)).await {
                            Ok(Ok(())) => answer,
                            _ => {
                                tracing::error!(
                                    "cannot record an enrollment in {}; refusing it",
                                    state_path.display()
                                );
                                // Not recorded: not given out.
                                e.state = load_state(&state_path).unwrap_or_default();
                                EnrollAnswer::Refused(
                                    "the lighthouse cannot record enrollments (disk?)".into(),
                                )
                                .encode(None, &[0; 16])
                            }
                        }
                    } else {
                        answer
                    }
                };
                stream.write_u32(answer.len() as u32).await?;
                stream.write_all(&answer).await?;
                stream.shutdown().await
            })
            .await;
            if let Ok(Err(e)) | Err(e) = result.map_err(std::io::Error::other) {
                tracing::debug!("enrollment connection from {from}: {e}");
            }
        });
    }
}

/// The joining side: sends `request` to `addr` and returns the raw answer.
pub async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::time::timeout(IO_TIMEOUT * 2, async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_u32(request.len() as u32).await?;
        stream.write_all(request).await?;
        let len = stream.read_u32().await? as usize;
        if len > super::token::MAX_MESSAGE {
            return Err(std::io::Error::other("answer too long"));
        }
        let mut answer = vec![0u8; len];
        stream.read_exact(&mut answer).await?;
        Ok(answer)
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 10 s"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::token::{Grant, LighthouseRef, Token};

    const NOW: u64 = 1_800_000_000;

    fn enroller() -> Enroller {
        let ca_key = SigningKey::from_bytes(&[1; 32]);
        let ca = Certificate::sign(
            CertBody {
                role: Role::Ca,
                name: "fleet".into(),
                public_key: ca_key.verifying_key().to_bytes(),
                networks: vec![],
                groups: vec![],
                not_before: NOW - 10,
                not_after: NOW + 1000 * DAY,
                max_days: 0,
                issuer: [0; 32],
            },
            &ca_key,
        )
        .unwrap();
        let key = SigningKey::from_bytes(&[2; 32]);
        let issuer = Certificate::sign(
            CertBody {
                role: Role::Signer,
                name: "lighthouse".into(),
                public_key: key.verifying_key().to_bytes(),
                networks: vec!["10.77.0.0/30".parse().unwrap()],
                groups: vec!["robots".into()],
                not_before: NOW - 10,
                not_after: NOW + 100 * DAY,
                max_days: 30,
                issuer: [0; 32],
            },
            &ca_key,
        )
        .unwrap();
        Enroller {
            issuer: Issuer {
                ca,
                cert: issuer,
                key,
                lifetime: DEFAULT_LIFETIME,
            },
            reserved: vec!["10.77.0.1".parse().unwrap()],
            state: EnrollState::default(),
        }
    }

    fn token(e: &Enroller, id: u8, name: &str, groups: &[&str]) -> Token {
        Token::issue(
            Grant {
                id: [id; 16],
                ca_fingerprint: e.ca_fingerprint(),
                lighthouses: vec![LighthouseRef {
                    endpoint: "192.0.2.1:51820".parse().unwrap(),
                    public_key: [4; 32],
                    overlay: "10.77.0.1".parse().unwrap(),
                    enroll: "192.0.2.1:51823".parse().unwrap(),
                }],
                name: name.into(),
                groups: groups.iter().map(|g| g.to_string()).collect(),
                talk_to: vec![],
                addresses: vec![],
                expires: NOW + 3600,
            },
            &e.enroll_key(),
        )
    }

    fn enroll(e: &mut Enroller, t: &Token, key: u8, now: u64) -> Result<EnrollAnswer, TokenError> {
        let req = EnrollRequest::new(t, [key; 32], [key; 16]);
        let (answer, _) = e.handle(&req.encode(), now, &[]);
        EnrollAnswer::decode(&answer, t, &[key; 16])
    }

    #[test]
    fn a_token_enrolls_once_with_a_free_address_and_a_verifiable_chain() {
        let mut e = enroller();
        let t = token(&e, 1, "robot7", &["robots"]);
        let Ok(EnrollAnswer::Enrolled { chain_pem, ca_pem }) = enroll(&mut e, &t, 9, NOW) else {
            panic!("not enrolled");
        };
        let chain = Certificate::parse_pem(&chain_pem).unwrap();
        let ca = Certificate::parse_pem(&ca_pem).unwrap().remove(0);
        let v = cert::verify(&chain, &ca, NOW).unwrap();
        assert_eq!(v.public_key, [9; 32]);
        assert_eq!(
            v.addresses[0].to_string(),
            "10.77.0.2/30",
            "the lighthouse's own .1 is skipped"
        );
        assert_eq!(v.not_after, NOW + 30 * DAY);
        // Once only, even for the same key.
        let again = enroll(&mut e, &t, 9, NOW);
        assert!(
            matches!(again, Err(TokenError::Refused(ref w)) if w.contains("already used")),
            "{again:?}"
        );
        // The /30 holds two hosts: the lighthouse's and robot7's; the next token finds none.
        assert_eq!(e.state.allocated.len(), 1);
        let t3 = token(&e, 3, "robot9", &["robots"]);
        let full = enroll(&mut e, &t3, 11, NOW);
        assert!(
            matches!(full, Err(TokenError::Refused(ref w)) if w.contains("no free address")),
            "{full:?}"
        );
    }

    #[test]
    fn expired_foreign_and_out_of_bounds_tokens_are_refused_with_their_cause() {
        let mut e = enroller();
        let t = token(&e, 1, "robot7", &["robots"]);
        let late = enroll(&mut e, &t, 9, NOW + 3601);
        assert!(
            matches!(late, Err(TokenError::Refused(ref w)) if w.contains("expired")),
            "{late:?}"
        );
        let mut other = enroller();
        other.issuer.key = SigningKey::from_bytes(&[3; 32]);
        let foreign = token(&other, 1, "robot7", &["robots"]);
        let wrong = enroll(&mut e, &foreign, 9, NOW);
        assert!(
            matches!(wrong, Err(TokenError::Refused(ref w)) if w.contains("not issued by this lighthouse's fleet")),
            "{wrong:?}"
        );
        let operators = token(&e, 4, "op", &["operators"]);
        let outside = enroll(&mut e, &operators, 9, NOW);
        assert!(
            matches!(outside, Err(TokenError::Refused(ref w)) if w.contains("group operators is outside")),
            "{outside:?}"
        );
        assert!(e.state.used.is_empty(), "a refused request spends nothing");
    }

    #[test]
    fn renewal_keeps_the_identity_and_opens_at_half_life() {
        let mut e = enroller();
        e.issuer.lifetime = 1000;
        let t = token(&e, 1, "robot7", &["robots"]);
        let Ok(EnrollAnswer::Enrolled { chain_pem, .. }) = enroll(&mut e, &t, 9, NOW) else {
            panic!("not enrolled");
        };
        let leaf = Certificate::parse_pem(&chain_pem).unwrap().remove(0);
        assert_eq!(leaf.body().not_after, NOW + 1000, "the configured lifetime");
        let early = e.issuer.renew(&leaf, NOW + 400);
        assert_eq!(
            early.map(|_| ()).map_err(|r| r.opens_at),
            Err(NOW + 500),
            "refused until half-life, saying when"
        );
        let chain = e.issuer.renew(&leaf, NOW + 700).unwrap();
        let v = cert::verify(&chain, &e.issuer.ca, NOW + 700).unwrap();
        let b = chain[0].body();
        assert_eq!(
            (v.name.as_str(), v.public_key, &v.addresses, &v.groups),
            (
                "robot7",
                [9; 32],
                &leaf.body().networks,
                &leaf.body().groups
            )
        );
        assert_eq!(
            (b.not_before, b.not_after),
            (NOW - 10, NOW + 1700),
            "the lineage's not-before, a fresh lifetime"
        );
        // The renewal renews too, from the last half of the issuer's lifetime.
        let again = e.issuer.renew(&chain[0], NOW + 1100);
        assert_eq!(again.map(|_| ()).map_err(|r| r.opens_at), Err(NOW + 1200));
        assert!(e.issuer.renew(&chain[0], NOW + 1200).is_ok());
        // With the default lifetime, as long as the signer's 30 days: a lineage outlives them.
        e.issuer.lifetime = DEFAULT_LIFETIME;
        let first = e.issuer.renew(&chain[0], NOW + 20 * DAY).unwrap();
        let second = e.issuer.renew(&first[0], NOW + 40 * DAY).unwrap();
        cert::verify(&second, &e.issuer.ca, NOW + 40 * DAY).unwrap();
        assert_eq!(second[0].body().not_before, NOW - 10);
        assert_eq!(second[0].body().not_after, NOW + 70 * DAY);
        // Another issuer's certificate (the CA's, for a contractor's hour) is not renewed here.
        let ca_key = SigningKey::from_bytes(&[1; 32]);
        let foreign = Certificate::sign(leaf.body().clone(), &ca_key).unwrap();
        let refused = e.issuer.renew(&foreign, NOW + 700);
        assert!(
            matches!(refused, Err(ref r) if r.reason.contains("another issuer") && r.opens_at == 0),
            "{refused:?}"
        );
    }
}
