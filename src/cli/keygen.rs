//! `keygen` and `pubkey`: WireGuard keys on the command line.

use crate::keys::PrivateKey;
use anyhow::Context;
use std::io::Read;

pub fn keygen() -> anyhow::Result<()> {
    println!("{}", PrivateKey::generate()?.to_base64());
    Ok(())
}

pub fn pubkey() -> anyhow::Result<()> {
    let mut text = String::new();
    std::io::stdin()
        .take(1024)
        .read_to_string(&mut text)
        .context("reading the private key from stdin")?;
    let key = PrivateKey::from_base64(&text)?;
    println!("{}", key.public_key());
    Ok(())
}
