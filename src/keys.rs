//! WireGuard keys: generation and derivation byte-compatible with `wg genkey` / `wg pubkey`,
//! and loading the node's private key file with a permission check.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not a WireGuard key: {0}\n  fix: a key is 44 characters of base64 (32 bytes), as printed by `myelin keygen` or `wg genkey`")]
    Malformed(String),
    #[error("refusing to start: {0}")]
    Secret(myelin_sdk::secret::SecretError),
    #[error("private key file {path}: {inner}")]
    Content { path: PathBuf, inner: Box<KeyError> },
    #[error("the system random number generator failed: {0}")]
    Random(String),
}

/// A Curve25519 private key.
pub struct PrivateKey(x25519_dalek::StaticSecret);

/// A Curve25519 public key; parses from base64 in configs.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct PublicKey(pub [u8; 32]);

fn decode32(text: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|e| KeyError::Malformed(e.to_string()))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| KeyError::Malformed(format!("decodes to {} bytes, not 32", bytes.len())))
}

impl TryFrom<String> for PublicKey {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        decode32(&s).map(PublicKey).map_err(|e| e.to_string())
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl PrivateKey {
    /// A fresh key, clamped as `wg genkey` does.
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| KeyError::Random(e.to_string()))?;
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Ok(Self(x25519_dalek::StaticSecret::from(bytes)))
    }

    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        decode32(text).map(|b| Self(x25519_dalek::StaticSecret::from(b)))
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.to_bytes())
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }

    pub fn secret(&self) -> &x25519_dalek::StaticSecret {
        &self.0
    }

    /// Loads the node's key, refusing a file that group or others can read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = read_secret(path)?;
        Self::from_base64(&text).map_err(|inner| KeyError::Content {
            path: path.to_path_buf(),
            inner: Box::new(inner),
        })
    }
}

/// Writes a secret (a key, a token) readable by its owner only: created 0600, and an existing
/// file is narrowed to 0600 before the secret is written into it.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        f.write_all(b"\n")?;
    }
    f.sync_all()
}

/// Reads a secret (key or token) file through the SDK's one check (mode and owner).
pub fn read_secret(path: &Path) -> Result<String, KeyError> {
    myelin_sdk::secret::read_secret(path).map_err(KeyError::Secret)
}

/// Compares two secrets in time independent of where they differ (shared with plugins).
pub use myelin_sdk::constant_time_eq;

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn rfc7748_vector() {
        // RFC 7748 §6.1, Alice's key pair.
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let sk = hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let pk = hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        let key = PrivateKey::from_base64(&STANDARD.encode(sk)).unwrap();
        assert_eq!(key.public_key().0.to_vec(), pk);
    }

    #[test]
    fn generated_keys_are_clamped_and_distinct() {
        let a = PrivateKey::generate().unwrap();
        let b = PrivateKey::generate().unwrap();
        assert_ne!(a.to_base64(), b.to_base64());
        let raw = STANDARD.decode(a.to_base64()).unwrap();
        assert_eq!(raw[0] & 7, 0);
        assert_eq!(raw[31] & 0xc0, 0x40);
        assert_eq!(a.to_base64().len(), 44);
    }

    #[test]
    fn refuses_open_key_file_and_names_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.key");
        std::fs::write(&path, PrivateKey::generate().unwrap().to_base64()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = PrivateKey::load(&path).err().unwrap().to_string();
        assert!(e.contains("chmod 600") && e.contains("0644"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(PrivateKey::load(&path).is_ok());
    }

    #[test]
    fn constant_time_eq_compares_whole_secrets() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn malformed_keys_are_errors() {
        assert!(PrivateKey::from_base64("abc").is_err());
        assert!(PrivateKey::from_base64(&STANDARD.encode([1u8; 31])).is_err());
        assert!(PublicKey::try_from("!!!".to_string()).is_err());
    }
}
