//! The node's config file: TOML, possibly written by hand or by tools, parsed and validated.
#![no_main]

use libfuzzer_sys::fuzz_target;
use myelin::config::Config;
use std::path::Path;

fn parse(text: &str) {
    match Config::parse(text, Path::new("/etc/myelin/config.toml")) {
        Ok(config) => {
            let _ = config
                .error_at(&["node", "name"], "fuzz".into(), "fuzz")
                .to_string();
        }
        // The message locates the key by line: that code runs on the same untrusted text.
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    match std::str::from_utf8(data) {
        Ok(text) => parse(text),
        Err(_) => parse(&String::from_utf8_lossy(data)),
    }
});
