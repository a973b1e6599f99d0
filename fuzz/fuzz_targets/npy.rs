//! `.npy` tensors: a request body at the ai plugin's HTTP API, or a frame from the zenoh pipeline.
#![no_main]

use libfuzzer_sys::fuzz_target;
use myelin_plugin_ai::tensor::{parse_npy, write_npy};

fuzz_target!(|data: &[u8]| {
    let Ok(tensor) = parse_npy(data) else {
        return;
    };
    // Compared as bytes: NaN payloads are equal there, not as floats.
    let written = write_npy(&tensor);
    let again = parse_npy(&written).map(|t| write_npy(&t));
    assert_eq!(
        again.as_deref(),
        Ok(&written[..]),
        "an .npy does not survive a round trip"
    );
});
