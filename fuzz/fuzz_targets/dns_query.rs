//! A DNS question from anyone on the overlay: hickory's parser (the one the node's server
//! uses) and then the node's answer for every question in it.
#![no_main]

use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use libfuzzer_sys::fuzz_target;
use myelin::dns::zone::{answer, Answer, Wanted};
use std::net::IpAddr;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = Message::from_vec(data) else {
        return;
    };
    let robot: [IpAddr; 2] = ["10.77.0.2".parse().unwrap(), "fd77::2".parse().unwrap()];
    for q in &message.queries {
        let wanted = match q.query_type() {
            RecordType::A => Wanted::V4,
            RecordType::AAAA => Wanted::V6,
            RecordType::ANY => Wanted::Both,
            _ => Wanted::Other,
        };
        let name = q.name().to_ascii();
        let got = answer("myelin.internal", &name, wanted, |label| {
            (label == "robot1").then(|| robot.to_vec())
        });
        let lower = name.strip_suffix('.').unwrap_or(&name).to_ascii_lowercase();
        let inside = lower == "myelin.internal" || lower.ends_with(".myelin.internal");
        assert_eq!(got == Answer::Refused, !inside, "{name}");
    }
});
