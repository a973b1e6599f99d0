//! The firewall's packet reader and verdict: every decapsulated packet a peer sends, and every
//! packet read from the TUN, passes through them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use myelin::policy::firewall::{summarize, Firewall, PeerIdentity, Peers, Proto, Rule, RuleSet};
use std::sync::Arc;
use std::time::Instant;

fuzz_target!(|data: &[u8]| {
    let _ = summarize(data);
    let rules = RuleSet {
        default_inbound_allow: false,
        default_outbound_allow: true,
        timeouts: Default::default(),
        inbound: vec![Rule {
            name: "ssh".into(),
            peers: Peers {
                groups: vec!["operators".into()],
                ..Peers::default()
            },
            proto: Proto::Tcp,
            ports: (22, 22),
        }],
        outbound: vec![],
    };
    let now = Instant::now();
    let mut fw = Firewall::new(Arc::new(rules), now);
    let groups = vec!["operators".to_string()];
    let peer = PeerIdentity {
        name: "operator",
        groups: &groups,
    };
    if fw.outbound(data, &peer, now).is_ok() {
        // A packet let out is its own flow's first packet: the same packet again passes.
        assert!(fw.outbound(data, &peer, now).is_ok());
    }
    let _ = fw.inbound(data, &peer, now);
});
