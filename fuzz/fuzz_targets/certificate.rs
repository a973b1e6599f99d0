//! Certificates: presented by strangers in Hello messages and rosters, read from files. Decoding
//! must refuse every non-canonical form, and verification must never accept a forgery. Also the
//! CA's revocation lists.
#![no_main]

use libfuzzer_sys::fuzz_target;
use myelin::mesh::cert::{verify, CertBody, Certificate, Role};
use myelin::mesh::revoke::RevocationList;
use std::sync::OnceLock;

fn ca() -> &'static Certificate {
    static CA: OnceLock<Certificate> = OnceLock::new();
    CA.get_or_init(|| {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let body = CertBody {
            role: Role::Ca,
            name: "fuzz".into(),
            public_key: key.verifying_key().to_bytes(),
            networks: vec![],
            groups: vec![],
            not_before: 0,
            not_after: u64::MAX / 2,
            max_days: 0,
            issuer: [0; 32],
        };
        match Certificate::sign(body, &key) {
            Ok(c) => c,
            Err(e) => panic!("fuzz CA: {e}"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Certificate::decode(data) {
        assert_eq!(c.to_bytes(), data, "decoding is canonical");
        // Without the CA's key nothing random verifies.
        assert!(verify(&[c], ca(), 1_800_000_000).is_err());
    }
    let _ = Certificate::parse_pem(&String::from_utf8_lossy(data));
    // Revocation lists arrive in pages from lighthouses; nothing random carries the CA's signature.
    if let Ok(list) = RevocationList::decode(data) {
        assert!(list.verify(&ca().body().public_key).is_err());
    }
});
