//! Enrollment: tokens pasted by people, requests from anyone who can reach a lighthouse's
//! enrollment port, and the answers a robot reads back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use myelin::mesh::token::{EnrollAnswer, EnrollRequest, Token};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let token = Token::parse(&text);
    if let Ok(req) = EnrollRequest::decode(data) {
        // A random request never passes: its tag is keyed by a secret it cannot know.
        assert!(req.check(&[7; 32], &req.grant.ca_fingerprint, 0, |_| false).is_err());
    }
    if let Ok(token) = token {
        let _ = EnrollAnswer::decode(data, &token, &[0; 16]);
    }
});
