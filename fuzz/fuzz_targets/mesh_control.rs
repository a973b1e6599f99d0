//! Mesh control messages: what a peer sends inside WireGuard to port 51822 (registration,
//! rosters, certificate introductions). A peer's key is authenticated; its bytes are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use myelin::mesh::wire::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::decode(data) {
        // What decodes re-encodes to something that decodes to the same message.
        assert_eq!(Message::decode(&m.encode()), Ok(m));
    }
});
