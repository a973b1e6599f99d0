//! A WHEP offer body from any viewer on the VPN, as plugins/webrtc takes it: UTF-8 or refused,
//! then webrtc-rs's SDP parser (`RTCSessionDescription::offer` unmarshals eagerly with this
//! crate), then the lookups a remote description goes through (media sections, codecs,
//! ICE credentials, fingerprint, direction).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rtc_sdp::description::session::SessionDescription;
use std::io::Cursor;

fn parse(offer: &str) -> Option<SessionDescription> {
    SessionDescription::unmarshal(&mut Cursor::new(offer.as_bytes())).ok()
}

fuzz_target!(|data: &[u8]| {
    let Ok(offer) = String::from_utf8(data.to_vec()) else {
        return;
    };
    let Some(sdp) = parse(&offer) else {
        return;
    };
    for key in [
        "group",
        "fingerprint",
        "ice-ufrag",
        "ice-pwd",
        "ice-lite",
        "setup",
    ] {
        let _ = sdp.attribute(key);
    }
    for media in &sdp.media_descriptions {
        for key in [
            "mid",
            "recvonly",
            "sendrecv",
            "inactive",
            "rtcp-mux",
            "ice-ufrag",
            "ice-pwd",
            "fingerprint",
            "setup",
            "candidate",
            "extmap",
        ] {
            let _ = media.attribute(key);
        }
        for (pt, codec) in media.codecs() {
            let _ = sdp.get_codec_for_payload_type(pt);
            let _ = sdp.get_payload_type_for_codec(&codec);
        }
        for format in &media.media_name.formats {
            if let Ok(pt) = format.parse::<u8>() {
                let _ = sdp.get_codec_for_payload_type(pt);
            }
        }
    }
    let _ = parse(&sdp.marshal());
});
