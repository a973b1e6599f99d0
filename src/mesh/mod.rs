//! The control protocol between Myelin nodes, sans-IO: state machines take bytes and `now`
//! and return what to send. Today: RTT/jitter/loss probes.

pub mod probe;
