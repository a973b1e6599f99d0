//! Revocation lists: the CA's signed word that certificates must no longer be accepted, by
//! fingerprint or by name (every certificate for that name issued up to a moment). Lighthouses
//! push the list to members, which check its signature themselves.

use super::cert::{self, CertError, VerifiedNode};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

const MAGIC: &[u8; 4] = b"MYR1";
const SIGNING_CONTEXT: &[u8] = b"myelin revocations v1\0";
const PEM_LABEL: &str = "MYELIN REVOCATIONS";
pub const MAX_ENTRIES: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Revoked {
    /// One certificate, by its SHA-256 fingerprint.
    Fingerprint([u8; 32]),
    /// Every certificate for `name` whose validity began at or before `before` (unix seconds),
    /// so a machine enrolled again afterwards is not caught.
    Name { name: String, before: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevocationList {
    /// The CA's Ed25519 key.
    pub issuer: [u8; 32],
    /// When it was made: a newer list replaces an older one, never the other way round.
    pub issued_at: u64,
    pub entries: Vec<Revoked>,
    signature: [u8; 64],
}

fn body(issuer: &[u8; 32], issued_at: u64, entries: &[Revoked]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(issuer);
    out.extend_from_slice(&issued_at.to_be_bytes());
    out.extend_from_slice(&(entries.len().min(MAX_ENTRIES) as u32).to_be_bytes());
    for e in entries.iter().take(MAX_ENTRIES) {
        match e {
            Revoked::Fingerprint(f) => {
                out.push(0);
                out.extend_from_slice(f);
            }
            Revoked::Name { name, before } => {
                out.push(1);
                let n = &name.as_bytes()[..name.len().min(63)];
                out.push(n.len() as u8);
                out.extend_from_slice(n);
                out.extend_from_slice(&before.to_be_bytes());
            }
        }
    }
    out
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut m = SIGNING_CONTEXT.to_vec();
    m.extend_from_slice(body);
    m
}

fn malformed(why: &str) -> CertError {
    CertError::Malformed(format!("revocation list: {why}"))
}

impl RevocationList {
    pub fn sign(entries: Vec<Revoked>, issued_at: u64, key: &SigningKey) -> Self {
        let issuer = key.verifying_key().to_bytes();
        let signature = key
            .sign(&signed_message(&body(&issuer, issued_at, &entries)))
            .to_bytes();
        Self {
            issuer,
            issued_at,
            entries,
            signature,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = body(&self.issuer, self.issued_at, &self.entries);
        out.extend_from_slice(&self.signature);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, CertError> {
        let take = |at: &mut usize, n: usize| -> Result<&[u8], CertError> {
            let s = bytes
                .get(*at..*at + n)
                .ok_or_else(|| malformed("truncated"))?;
            *at += n;
            Ok(s)
        };
        let mut at = 0;
        if take(&mut at, 4)? != MAGIC {
            return Err(malformed("unknown format"));
        }
        let mut issuer = [0u8; 32];
        issuer.copy_from_slice(take(&mut at, 32)?);
        let mut word = [0u8; 8];
        word.copy_from_slice(take(&mut at, 8)?);
        let issued_at = u64::from_be_bytes(word);
        let mut count = [0u8; 4];
        count.copy_from_slice(take(&mut at, 4)?);
        let count = u32::from_be_bytes(count) as usize;
        if count > MAX_ENTRIES {
            return Err(malformed("too many entries"));
        }
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            match take(&mut at, 1)?[0] {
                0 => {
                    let mut f = [0u8; 32];
                    f.copy_from_slice(take(&mut at, 32)?);
                    entries.push(Revoked::Fingerprint(f));
                }
                1 => {
                    let n = take(&mut at, 1)?[0] as usize;
                    let name = String::from_utf8(take(&mut at, n)?.to_vec())
                        .map_err(|_| malformed("a name is not UTF-8"))?;
                    word.copy_from_slice(take(&mut at, 8)?);
                    entries.push(Revoked::Name {
                        name,
                        before: u64::from_be_bytes(word),
                    });
                }
                _ => return Err(malformed("unknown entry kind")),
            }
        }
        let mut signature = [0u8; 64];
        signature.copy_from_slice(take(&mut at, 64)?);
        if at != bytes.len() {
            return Err(malformed("trailing bytes"));
        }
        Ok(Self {
            issuer,
            issued_at,
            entries,
            signature,
        })
    }

    /// Checks that the CA with key `ca_key` signed this list.
    pub fn verify(&self, ca_key: &[u8; 32]) -> Result<(), CertError> {
        let bad = || CertError::BadSignature {
            name: "revocation list".into(),
        };
        if &self.issuer != ca_key {
            return Err(bad());
        }
        let key = VerifyingKey::from_bytes(ca_key).map_err(|_| bad())?;
        let body = body(&self.issuer, self.issued_at, &self.entries);
        key.verify_strict(
            &signed_message(&body),
            &Signature::from_bytes(&self.signature),
        )
        .map_err(|_| bad())
    }

    /// Whether the member `node` (with its certificate's not-before) is revoked.
    pub fn revokes(&self, node: &VerifiedNode, not_before: u64) -> bool {
        let fingerprint = super::token::fingerprint_bytes(&node.fingerprint);
        self.entries.iter().any(|e| match e {
            Revoked::Fingerprint(f) => Some(*f) == fingerprint,
            Revoked::Name { name, before } => name == &node.name && not_before <= *before,
        })
    }

    pub fn to_pem(&self) -> String {
        cert::armour(PEM_LABEL, &self.encode())
    }

    pub fn parse_pem(text: &str) -> Result<Self, CertError> {
        match cert::dearmour(PEM_LABEL, text)?.as_slice() {
            [bytes] => Self::decode(bytes),
            blocks => Err(malformed(&format!(
                "expected one -----BEGIN {PEM_LABEL}----- block, found {}",
                blocks.len()
            ))),
        }
    }
}

/// Describes an entry for people.
pub fn describe(e: &Revoked) -> String {
    match e {
        Revoked::Fingerprint(f) => format!("certificate {}", cert::hex(f)),
        Revoked::Name { name, before } => {
            format!(
                "every certificate for `{name}` issued up to {}",
                cert::utc(*before)
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, fingerprint: u8) -> VerifiedNode {
        VerifiedNode {
            name: name.into(),
            public_key: [1; 32],
            addresses: vec![],
            groups: vec![],
            not_after: 0,
            fingerprint: cert::hex(&[fingerprint; 32]),
            issuer: "ca".into(),
        }
    }

    #[test]
    fn a_signed_list_roundtrips_verifies_and_revokes_what_it_names() {
        let ca = SigningKey::from_bytes(&[1; 32]);
        let list = RevocationList::sign(
            vec![
                Revoked::Fingerprint([7; 32]),
                Revoked::Name {
                    name: "robot3".into(),
                    before: 1000,
                },
            ],
            1234,
            &ca,
        );
        let back = RevocationList::parse_pem(&list.to_pem()).unwrap();
        assert_eq!(back, list);
        back.verify(&ca.verifying_key().to_bytes()).unwrap();
        assert!(back.revokes(&node("robot7", 7), 5000));
        assert!(back.revokes(&node("robot3", 1), 999));
        assert!(
            !back.revokes(&node("robot3", 1), 1001),
            "enrolled again afterwards"
        );
        assert!(!back.revokes(&node("robot4", 1), 0));
        // Another key, or a changed entry, does not verify.
        let other = SigningKey::from_bytes(&[2; 32]);
        assert!(back.verify(&other.verifying_key().to_bytes()).is_err());
        let mut bytes = list.encode();
        bytes[50] ^= 1;
        if let Ok(t) = RevocationList::decode(&bytes) {
            assert!(t.verify(&ca.verifying_key().to_bytes()).is_err());
        }
        assert!(RevocationList::decode(&bytes[..20]).is_err());
    }
}
