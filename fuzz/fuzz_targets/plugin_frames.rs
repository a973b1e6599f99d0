//! The plugin channel: length-delimited JSON frames between the node and its plugin children.
//! Either side may be the broken or compromised one, so both message types are decoded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use myelin::host::protocol::{codec, decode, encode, HostMsg, PluginMsg, MAX_FRAME};
use tokio_util::codec::Decoder;

fn check(frame: &[u8]) {
    if let Ok(msg) = decode::<HostMsg>(frame) {
        let again = encode(&msg).map(|b| decode::<HostMsg>(&b).is_ok());
        assert!(
            matches!(again, Ok(true)),
            "a HostMsg does not survive a round trip"
        );
    }
    if let Ok(msg) = decode::<PluginMsg>(frame) {
        let again = encode(&msg).map(|b| decode::<PluginMsg>(&b).is_ok());
        assert!(
            matches!(again, Ok(true)),
            "a PluginMsg does not survive a round trip"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut codec = codec();
    let mut stream = bytes::BytesMut::from(data);
    while let Ok(Some(frame)) = codec.decode(&mut stream) {
        assert!(frame.len() <= MAX_FRAME);
        check(&frame);
    }
    if let Ok(Some(frame)) = codec.decode_eof(&mut stream) {
        check(&frame);
    }
});
