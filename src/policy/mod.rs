//! Policy: who may reach what over the tunnel.

pub mod firewall;
