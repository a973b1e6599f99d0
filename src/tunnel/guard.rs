//! The overlay guard: an nftables table, one per TUN device, that drops every packet for the
//! node's overlay addresses which does not arrive through that device (or loopback). Linux
//! accepts a packet for any local address on any interface, so without it a host on the
//! robot's LAN that routes the overlay prefix via the robot reaches every overlay-bound
//! service (telemetry, WHEP, the zenoh router, the probe port) with no WireGuard key. One
//! table covers every listener, plugins' included, present and future (docs/security.md).

use ipnet::IpNet;
use std::io::Write;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("cannot run `nft` to install the overlay guard: {cause}\n  fix: install nftables (`apt install nftables`), or set [node].overlay_guard = false (services on the overlay address are then reachable from the physical network)")]
    Missing { cause: std::io::Error },
    #[error("`nft` refused the overlay guard table {table}: {stderr}\n  fix: the node needs CAP_NET_ADMIN and a kernel with nf_tables; or set [node].overlay_guard = false")]
    Refused { table: String, stderr: String },
}

/// An installed guard; `remove` takes the table away again.
#[derive(Debug)]
pub struct OverlayGuard {
    table: String,
}

/// The nftables table name for `interface` (nft names take letters, digits and `_`).
fn table_name(interface: &str) -> String {
    let clean: String = interface
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("myelin_{clean}")
}

/// The nft script: (re)creates the table whole, so a table left by a killed node is replaced.
pub fn script(interface: &str, addresses: &[IpNet]) -> String {
    let table = table_name(interface);
    let list = |v6: bool| {
        addresses
            .iter()
            .filter(|a| a.addr().is_ipv6() == v6)
            .map(|a| a.addr().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut rules = String::new();
    for (family, v6) in [("ip", false), ("ip6", true)] {
        let addrs = list(v6);
        if !addrs.is_empty() {
            rules.push_str(&format!(
                "    iifname != {{ \"{interface}\", \"lo\" }} {family} daddr {{ {addrs} }} counter drop\n"
            ));
        }
    }
    format!(
        "table inet {table} {{}}\ndelete table inet {table}\ntable inet {table} {{\n  chain input {{\n    type filter hook input priority -1; policy accept;\n{rules}  }}\n}}\n"
    )
}

fn nft(script: &str, table: &str) -> Result<(), GuardError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|cause| GuardError::Missing { cause })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|cause| GuardError::Missing { cause })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|cause| GuardError::Missing { cause })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(GuardError::Refused {
            table: table.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

impl OverlayGuard {
    /// Installs the guard for the overlay `addresses` on `interface`.
    pub fn install(interface: &str, addresses: &[IpNet]) -> Result<Self, GuardError> {
        let table = table_name(interface);
        nft(&script(interface, addresses), &table)?;
        tracing::info!(table = %table, "overlay guard installed: overlay addresses answer only through {interface}");
        Ok(Self { table })
    }

    pub fn remove(self) {
        let script = format!("delete table inet {}\n", self.table);
        if let Err(e) = nft(&script, &self.table) {
            tracing::warn!("removing the overlay guard: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_drops_both_families_off_the_tun_and_replaces_a_stale_table() {
        let addrs: Vec<IpNet> = vec![
            "10.77.0.1/16".parse().unwrap(),
            "fd77::1/64".parse().unwrap(),
        ];
        let s = script("myelin-0", &addrs);
        assert!(s.starts_with("table inet myelin_myelin_0 {}\ndelete table inet myelin_myelin_0\n"));
        assert!(
            s.contains("iifname != { \"myelin-0\", \"lo\" } ip daddr { 10.77.0.1 } counter drop")
        );
        assert!(
            s.contains("iifname != { \"myelin-0\", \"lo\" } ip6 daddr { fd77::1 } counter drop")
        );
        let v4only = script("t0", &addrs[..1]);
        assert!(!v4only.contains("ip6 daddr"), "{v4only}");
    }
}
