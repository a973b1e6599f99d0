//! Mesh control messages: what a peer sends inside WireGuard to port 51822 (registration,
//! rosters, certificate introductions, relayed datagrams). A peer's key is authenticated; its bytes are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use myelin::mesh::wire::{parse_relay, relay_frame, Message};

fuzz_target!(|data: &[u8]| {
    // A relay frame (a member's WireGuard datagram through a relay) frames again the same.
    if let Some((leg, peer, datagram)) = parse_relay(data) {
        assert_eq!(relay_frame(leg, peer, datagram), data);
    }
    if let Ok(m) = Message::decode(data) {
        // What decodes re-encodes to something that decodes to the same message.
        assert_eq!(Message::decode(&m.encode()), Ok(m));
    }
});
