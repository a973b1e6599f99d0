//! The control protocol between Myelin nodes, sans-IO: state machines take bytes and `now`
//! and return what to send. Fleet identity (certificates), enrollment tokens and RTT/jitter/loss probes.

pub mod cert;
pub mod control;
pub mod enroll;
pub mod paths;
pub mod probe;
pub mod revoke;
pub mod shell;
pub mod token;
pub mod view;
pub mod wire;
