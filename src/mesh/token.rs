//! Enrollment tokens and the enrollment exchange, sans-IO. A token is one printable string
//! that carries where to enroll (lighthouses), whom to trust (the CA's fingerprint), what the
//! new member becomes (name, groups, address) and a single-use secret. The lighthouse that
//! made it recomputes the secret from its signer key, so it keeps no list of open tokens,
//! only of used ones. Requests and answers are authenticated with the secret (HMAC-SHA256):
//! the robot trusts only the lighthouse that knows it, and the secret never crosses the wire.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use std::net::{IpAddr, SocketAddr};

type HmacSha256 = Hmac<Sha256>;

/// Tokens are recognisable by their prefix, which also carries the format version.
pub const TOKEN_PREFIX: &str = "myelin1-";
const TOKEN_MAGIC: &[u8; 4] = b"MYT1";
const REQUEST_MAGIC: &[u8; 4] = b"MYE1";
const ANSWER_MAGIC: &[u8; 4] = b"MYA1";
/// The most an enrollment message may be: a chain of two certificates plus the CA's.
pub const MAX_MESSAGE: usize = 16 * 1024;
const MAX_LIGHTHOUSES: usize = 8;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("not an enrollment token: {0}\n  fix: copy the whole string printed by `myelin ca token` (it starts with {TOKEN_PREFIX})")]
    Malformed(String),
    #[error("this token expired at {expires} (unix seconds; now {now})\n  fix: ask for a new one (`myelin ca token`)")]
    Expired { expires: u64, now: u64 },
    #[error("this token was already used\n  fix: a token enrolls one machine once; ask for a new one (`myelin ca token`)")]
    AlreadyUsed,
    #[error("this token was not issued by this lighthouse's fleet (wrong fleet, or altered)\n  fix: use a token made with this fleet's signer (`myelin ca token`)")]
    WrongFleet,
    #[error("the lighthouse's answer is not authenticated by the token (not the lighthouse that issued it)")]
    Unauthenticated,
    #[error("the lighthouse refused: {0}")]
    Refused(String),
}

/// Where a new member enrolls and later registers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LighthouseRef {
    /// The lighthouse's WireGuard endpoint.
    pub endpoint: SocketAddr,
    /// The lighthouse's WireGuard public key.
    pub public_key: [u8; 32],
    /// The lighthouse's overlay address (control messages ride the tunnel to it).
    pub overlay: IpAddr,
    /// Where it accepts enrollments (TCP).
    pub enroll: SocketAddr,
}

/// What a token grants, without its secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub id: [u8; 16],
    pub ca_fingerprint: [u8; 32],
    pub lighthouses: Vec<LighthouseRef>,
    pub name: String,
    pub groups: Vec<String>,
    /// The groups the new member will learn about (its `[mesh].talk_to`).
    pub talk_to: Vec<String>,
    /// Empty: the lighthouse picks a free IPv4 address from its signer's range.
    pub addresses: Vec<IpNet>,
    pub expires: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub grant: Grant,
    pub secret: [u8; 32],
}

fn put_addr(out: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(a) => {
            out.push(4);
            out.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.push(6);
            out.extend_from_slice(&a.octets());
        }
    }
}

fn put_sock(out: &mut Vec<u8>, a: SocketAddr) {
    put_addr(out, a.ip());
    out.extend_from_slice(&a.port().to_be_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(255)];
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    let b = &b[..b.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

/// A bounds-checked cursor over untrusted bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TokenError> {
        if self.0.len() < n {
            return Err(TokenError::Malformed("truncated".into()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, TokenError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, TokenError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, TokenError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], TokenError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn addr(&mut self) -> Result<IpAddr, TokenError> {
        match self.u8()? {
            4 => Ok(IpAddr::from(self.array::<4>()?)),
            6 => Ok(IpAddr::from(self.array::<16>()?)),
            f => Err(TokenError::Malformed(format!("unknown address family {f}"))),
        }
    }
    fn sock(&mut self) -> Result<SocketAddr, TokenError> {
        let ip = self.addr()?;
        Ok(SocketAddr::new(ip, self.u16()?))
    }
    fn str(&mut self) -> Result<String, TokenError> {
        let n = self.u8()? as usize;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| TokenError::Malformed("text is not UTF-8".into()))
    }
    fn bytes(&mut self) -> Result<&'a [u8], TokenError> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    fn end(&self) -> Result<(), TokenError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(TokenError::Malformed("trailing bytes".into()))
        }
    }
}

impl Grant {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(TOKEN_MAGIC);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.ca_fingerprint);
        out.push(self.lighthouses.len().min(MAX_LIGHTHOUSES) as u8);
        for l in self.lighthouses.iter().take(MAX_LIGHTHOUSES) {
            put_sock(&mut out, l.endpoint);
            out.extend_from_slice(&l.public_key);
            put_addr(&mut out, l.overlay);
            put_sock(&mut out, l.enroll);
        }
        put_str(&mut out, &self.name);
        for list in [&self.groups, &self.talk_to] {
            out.push(list.len().min(255) as u8);
            for g in list.iter().take(255) {
                put_str(&mut out, g);
            }
        }
        out.push(self.addresses.len().min(8) as u8);
        for a in self.addresses.iter().take(8) {
            put_addr(&mut out, a.addr());
            out.push(a.prefix_len());
        }
        out.extend_from_slice(&self.expires.to_be_bytes());
        out
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, TokenError> {
        if r.take(4)? != TOKEN_MAGIC {
            return Err(TokenError::Malformed("unknown token version".into()));
        }
        let id = r.array()?;
        let ca_fingerprint = r.array()?;
        let count = r.u8()? as usize;
        if count == 0 || count > MAX_LIGHTHOUSES {
            return Err(TokenError::Malformed(format!("{count} lighthouses")));
        }
        let mut lighthouses = Vec::with_capacity(count);
        for _ in 0..count {
            lighthouses.push(LighthouseRef {
                endpoint: r.sock()?,
                public_key: r.array()?,
                overlay: r.addr()?,
                enroll: r.sock()?,
            });
        }
        let name = r.str()?;
        let mut list = || -> Result<Vec<String>, TokenError> {
            let count = r.u8()? as usize;
            (0..count).map(|_| r.str()).collect()
        };
        let groups = list()?;
        let talk_to = list()?;
        let count = r.u8()? as usize;
        if count > 8 {
            return Err(TokenError::Malformed("too many addresses".into()));
        }
        let mut addresses = Vec::with_capacity(count);
        for _ in 0..count {
            let addr = r.addr()?;
            let prefix = r.u8()?;
            addresses.push(
                IpNet::new(addr, prefix)
                    .map_err(|_| TokenError::Malformed("address prefix too long".into()))?,
            );
        }
        Ok(Self {
            id,
            ca_fingerprint,
            lighthouses,
            name,
            groups,
            talk_to,
            addresses,
            expires: r.u64()?,
        })
    }

    /// The secret a lighthouse derives for this grant from its enrollment key.
    pub fn secret(&self, enroll_key: &[u8; 32]) -> [u8; 32] {
        mac(enroll_key, &[b"myelin token secret v1", &self.encode()])
    }
}

/// HMAC-SHA256 over length-prefixed parts (so part boundaries cannot shift).
fn mac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC pads a short key with zeros to its 64-byte block; doing it here makes the key a
    // fixed-size array, so constructing the MAC cannot fail.
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(key);
    let mut m = <HmacSha256 as hmac::digest::KeyInit>::new(&block.into());
    for p in parts {
        m.update(&(p.len() as u32).to_be_bytes());
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn mac_ok(key: &[u8; 32], parts: &[&[u8]], tag: &[u8; 32]) -> bool {
    crate::keys::constant_time_eq(&mac(key, parts), tag)
}

/// The lighthouse's enrollment key, derived from its signing key so that no second secret
/// has to be stored next to it.
pub fn enroll_key(signing_seed: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"myelin enrollment key v1");
    h.update(signing_seed);
    h.finalize().into()
}

impl Token {
    pub fn issue(grant: Grant, enroll_key: &[u8; 32]) -> Self {
        let secret = grant.secret(enroll_key);
        Self { grant, secret }
    }

    pub fn to_text(&self) -> String {
        let mut bytes = self.grant.encode();
        bytes.extend_from_slice(&self.secret);
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let body = text.trim().strip_prefix(TOKEN_PREFIX).ok_or_else(|| {
            TokenError::Malformed(format!("it does not start with {TOKEN_PREFIX}"))
        })?;
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| TokenError::Malformed(format!("bad base64: {e}")))?;
        let mut r = Reader(&bytes);
        let grant = Grant::decode(&mut r)?;
        let secret = r.array()?;
        r.end()?;
        Ok(Self { grant, secret })
    }
}

/// What a new member sends: the grant (without the secret), its WireGuard public key, a
/// fresh nonce, and a tag over all of it keyed by the secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollRequest {
    pub grant: Grant,
    pub public_key: [u8; 32],
    pub nonce: [u8; 16],
    tag: [u8; 32],
}

impl EnrollRequest {
    pub fn new(token: &Token, public_key: [u8; 32], nonce: [u8; 16]) -> Self {
        let grant = token.grant.clone();
        let tag = mac(
            &token.secret,
            &[b"request", &grant.encode(), &public_key, &nonce],
        );
        Self {
            grant,
            public_key,
            nonce,
            tag,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = REQUEST_MAGIC.to_vec();
        out.extend_from_slice(&self.grant.encode());
        out.extend_from_slice(&self.public_key);
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.tag);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, TokenError> {
        let mut r = Reader(bytes);
        if r.take(4)? != REQUEST_MAGIC {
            return Err(TokenError::Malformed("not an enrollment request".into()));
        }
        let grant = Grant::decode(&mut r)?;
        let out = Self {
            grant,
            public_key: r.array()?,
            nonce: r.array()?,
            tag: r.array()?,
        };
        r.end()?;
        Ok(out)
    }

    /// The lighthouse's check: the grant is its own (the derived secret keys the tag), not
    /// expired, and not used before (`used` is asked only after the tag holds). Returns the
    /// secret that authenticates the answer.
    pub fn check(
        &self,
        enroll_key: &[u8; 32],
        ca_fingerprint: &[u8; 32],
        now: u64,
        used: impl FnOnce(&[u8; 16]) -> bool,
    ) -> Result<[u8; 32], TokenError> {
        let secret = self.grant.secret(enroll_key);
        let parts: [&[u8]; 4] = [
            b"request",
            &self.grant.encode(),
            &self.public_key,
            &self.nonce,
        ];
        if !mac_ok(&secret, &parts, &self.tag) || &self.grant.ca_fingerprint != ca_fingerprint {
            return Err(TokenError::WrongFleet);
        }
        if now > self.grant.expires {
            return Err(TokenError::Expired {
                expires: self.grant.expires,
                now,
            });
        }
        if used(&self.grant.id) {
            return Err(TokenError::AlreadyUsed);
        }
        Ok(secret)
    }
}

/// The lighthouse's answer: the member's certificate chain and the CA certificate (PEM), or
/// why not; authenticated with the token's secret and bound to the request's nonce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnrollAnswer {
    Enrolled { chain_pem: String, ca_pem: String },
    Refused(String),
}

impl EnrollAnswer {
    fn payload(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            EnrollAnswer::Enrolled { chain_pem, ca_pem } => {
                out.push(0);
                put_bytes(&mut out, chain_pem.as_bytes());
                put_bytes(&mut out, ca_pem.as_bytes());
            }
            EnrollAnswer::Refused(why) => {
                out.push(1);
                put_bytes(&mut out, why.as_bytes());
            }
        }
        out
    }

    /// Encodes the answer; `secret` is `None` when the request could not be tied to a token
    /// (then the answer is unauthenticated and the member treats it as a refusal only).
    pub fn encode(&self, secret: Option<&[u8; 32]>, nonce: &[u8; 16]) -> Vec<u8> {
        let payload = self.payload();
        let mut out = ANSWER_MAGIC.to_vec();
        out.extend_from_slice(&payload);
        match secret {
            Some(s) => {
                out.push(1);
                out.extend_from_slice(&mac(s, &[b"answer", nonce, &payload]));
            }
            None => out.push(0),
        }
        out
    }

    /// The member's check. An enrolment is accepted only when authenticated by the secret
    /// and bound to this request's nonce; an unauthenticated refusal is reported as such.
    pub fn decode(bytes: &[u8], token: &Token, nonce: &[u8; 16]) -> Result<Self, TokenError> {
        let mut r = Reader(bytes);
        if r.take(4)? != ANSWER_MAGIC {
            return Err(TokenError::Malformed("not an enrollment answer".into()));
        }
        let start = r.0;
        let answer = match r.u8()? {
            0 => {
                let chain = r.bytes()?;
                let ca = r.bytes()?;
                EnrollAnswer::Enrolled {
                    chain_pem: String::from_utf8_lossy(chain).into_owned(),
                    ca_pem: String::from_utf8_lossy(ca).into_owned(),
                }
            }
            1 => EnrollAnswer::Refused(String::from_utf8_lossy(r.bytes()?).into_owned()),
            t => return Err(TokenError::Malformed(format!("unknown answer {t}"))),
        };
        let payload = &start[..start.len() - r.0.len()];
        let authenticated = match r.u8()? {
            1 => {
                let tag = r.array::<32>()?;
                mac_ok(&token.secret, &[b"answer", nonce, payload], &tag)
            }
            _ => false,
        };
        r.end()?;
        match (answer, authenticated) {
            (EnrollAnswer::Refused(why), _) => Err(TokenError::Refused(why)),
            (answer, true) => Ok(answer),
            (_, false) => Err(TokenError::Unauthenticated),
        }
    }
}

/// Formats a 32-byte fingerprint as the hex `Certificate::fingerprint` prints.
pub fn fingerprint_bytes(hex_text: &str) -> Option<[u8; 32]> {
    if hex_text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex_text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_800_000_000;
    const KEY: [u8; 32] = [3; 32];

    fn grant() -> Grant {
        Grant {
            id: [1; 16],
            ca_fingerprint: [2; 32],
            lighthouses: vec![LighthouseRef {
                endpoint: "192.0.2.1:51820".parse().unwrap(),
                public_key: [4; 32],
                overlay: "10.77.0.1".parse().unwrap(),
                enroll: "192.0.2.1:51821".parse().unwrap(),
            }],
            name: "robot7".into(),
            groups: vec!["robots".into()],
            talk_to: vec!["operators".into()],
            addresses: vec![],
            expires: NOW + 3600,
        }
    }

    #[test]
    fn a_token_roundtrips_as_text_and_enrolls_once() {
        let token = Token::issue(grant(), &KEY);
        let text = token.to_text();
        assert!(text.starts_with("myelin1-") && !text.contains('='));
        let parsed = Token::parse(&text).unwrap();
        assert_eq!(parsed, token);
        let req =
            EnrollRequest::decode(&EnrollRequest::new(&parsed, [9; 32], [5; 16]).encode()).unwrap();
        let secret = req.check(&KEY, &[2; 32], NOW, |_| false).unwrap();
        assert_eq!(
            req.check(&KEY, &[2; 32], NOW, |_| true),
            Err(TokenError::AlreadyUsed)
        );
        assert_eq!(
            req.check(&KEY, &[2; 32], NOW + 3601, |_| false),
            Err(TokenError::Expired {
                expires: NOW + 3600,
                now: NOW + 3601
            })
        );
        assert_eq!(
            req.check(&[8; 32], &[2; 32], NOW, |_| false),
            Err(TokenError::WrongFleet)
        );
        assert_eq!(
            req.check(&KEY, &[7; 32], NOW, |_| false),
            Err(TokenError::WrongFleet)
        );
        let answer = EnrollAnswer::Enrolled {
            chain_pem: "c".into(),
            ca_pem: "a".into(),
        };
        let wire = answer.encode(Some(&secret), &[5; 16]);
        assert_eq!(
            EnrollAnswer::decode(&wire, &parsed, &[5; 16]),
            Ok(answer.clone())
        );
        // Replayed for another request (nonce), or forged without the secret.
        assert_eq!(
            EnrollAnswer::decode(&wire, &parsed, &[6; 16]),
            Err(TokenError::Unauthenticated)
        );
        let forged = answer.encode(Some(&[0; 32]), &[5; 16]);
        assert_eq!(
            EnrollAnswer::decode(&forged, &parsed, &[5; 16]),
            Err(TokenError::Unauthenticated)
        );
        let unauth = answer.encode(None, &[5; 16]);
        assert_eq!(
            EnrollAnswer::decode(&unauth, &parsed, &[5; 16]),
            Err(TokenError::Unauthenticated)
        );
        let refused =
            EnrollAnswer::Refused("this token was already used".into()).encode(None, &[5; 16]);
        assert!(matches!(
            EnrollAnswer::decode(&refused, &parsed, &[5; 16]),
            Err(TokenError::Refused(_))
        ));
    }

    #[test]
    fn an_altered_grant_is_refused() {
        let token = Token::issue(grant(), &KEY);
        let mut altered = token.clone();
        altered.grant.groups = vec!["operators".into()];
        let req = EnrollRequest::new(&altered, [9; 32], [5; 16]);
        assert_eq!(
            req.check(&KEY, &[2; 32], NOW, |_| false),
            Err(TokenError::WrongFleet)
        );
    }

    #[test]
    fn fingerprints_parse_from_hex() {
        let hex = "ab".repeat(32);
        assert_eq!(fingerprint_bytes(&hex), Some([0xab; 32]));
        assert_eq!(fingerprint_bytes("ab"), None);
        assert_eq!(fingerprint_bytes(&"zz".repeat(32)), None);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let token = Token::issue(grant(), &KEY);
            let _ = EnrollRequest::decode(&bytes);
            let _ = EnrollAnswer::decode(&bytes, &token, &[0; 16]);
            let _ = Token::parse(&format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(&bytes)));
        }
    }
}
