//! The part of webrtc-rs's `rtc` crate that plugins/webrtc's RTP code names (`rtc::rtp`,
//! `rtc::shared`): the same crates at the same version, without DTLS, ICE, SCTP and the rest.

pub use rtp;
pub use shared;
