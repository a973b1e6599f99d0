//! rtnetlink messages the address watch reads (the kernel writes them, but a parser that
//! trusts lengths is a parser waiting for a bug): any bytes give a verdict, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use myelin::tunnel::netwatch::changes_reachability;

fuzz_target!(|data: &[u8]| {
    let ignore = data.first().copied().map_or(0, u32::from);
    let _ = changes_reachability(data, ignore);
});
