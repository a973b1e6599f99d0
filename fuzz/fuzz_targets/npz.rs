//! `.npz` archives (zip of `.npy`): a request body at the ai plugin's HTTP API.
#![no_main]

use libfuzzer_sys::fuzz_target;
use myelin_plugin_ai::tensor::{parse_npz_limited, TensorError};

/// Smaller than the plugin's default (64 MiB) so bombs cost milliseconds, not seconds; the limit
/// is enforced by the same code whatever its value.
const LIMIT: usize = 4 << 20;

fuzz_target!(|data: &[u8]| {
    match parse_npz_limited(data, LIMIT) {
        Ok(arrays) => {
            // Every element is at least one decompressed byte.
            let elements: usize = arrays.iter().map(|(_, t)| t.data.len()).sum();
            assert!(elements <= LIMIT);
        }
        Err(TensorError::TooLarge { limit, .. }) => assert_eq!(limit, LIMIT),
        Err(_) => {}
    }
});
