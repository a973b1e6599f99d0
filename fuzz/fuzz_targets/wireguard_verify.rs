//! The data plane's first steps on a datagram from anywhere: boringtun's rate limiter (mac1 and
//! cookie check), the packet parser, the anonymous handshake parse that picks the peer, and
//! the peer's decapsulation.
#![no_main]

use blake2::digest::consts::U16;
use blake2::digest::{Digest, Mac};
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn};
use boringtun::x25519::{PublicKey, StaticSecret};
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;

struct Keys {
    node_private: StaticSecret,
    node_public: PublicKey,
    peer_public: PublicKey,
    mac1_key: [u8; 32],
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let node_private = StaticSecret::from([0x11; 32]);
        let node_public = PublicKey::from(&node_private);
        let peer_public = PublicKey::from(&StaticSecret::from([0x22; 32]));
        let mut hash = blake2::Blake2s256::new();
        hash.update(b"mac1----");
        hash.update(node_public.as_bytes());
        Keys {
            node_private,
            node_public,
            peer_public,
            mac1_key: hash.finalize().into(),
        }
    })
}

/// Gives a handshake message a valid mac1, as anyone who knows the node's public key can, so
/// the fuzzer reaches what lies behind the check.
fn sign_mac1(datagram: &mut [u8], mac1_key: &[u8; 32]) {
    let at = match datagram.len() {
        148 => 116,
        92 => 60,
        _ => return,
    };
    let Ok(mut mac) = blake2::Blake2sMac::<U16>::new_from_slice(mac1_key) else {
        return;
    };
    mac.update(&datagram[..at]);
    let tag: [u8; 16] = mac.finalize().into_bytes().into();
    datagram[at..at + 16].copy_from_slice(&tag);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, datagram)) = data.split_first() else {
        return;
    };
    let k = keys();
    let _ = Tunn::parse_incoming_packet(datagram);
    let mut datagram = datagram.to_vec();
    if mode & 1 != 0 {
        sign_mac1(&mut datagram, &k.mac1_key);
    }
    // Limit 0: every handshake is "under load" and must carry a cookie.
    let limiter = RateLimiter::new(&k.node_public, if mode & 2 != 0 { 0 } else { 100 });
    let from = IpAddr::V4(Ipv4Addr::new(192, 0, 2, mode));
    let mut reply = vec![0u8; 2048];
    let Ok(packet) = limiter.verify_packet(Some(from), &datagram, &mut reply) else {
        return;
    };
    if let Packet::HandshakeInit(init) = &packet {
        if parse_handshake_anon(&k.node_private, &k.node_public, init).is_err() {
            return;
        }
    }
    if mode & 4 != 0 {
        let mut tunn = Tunn::new(
            k.node_private.clone(),
            k.peer_public,
            None,
            None,
            1 << 8,
            None,
        );
        let mut dst = vec![0u8; 2048];
        let _ = tunn.decapsulate(Some(from), &datagram, &mut dst);
    }
});
