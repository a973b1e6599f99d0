//! The multicast routes of `[multicast]`: one host route per group on the TUN (IPv6 groups in
//! the local table, where the kernel keeps `ff00::/8` per interface), so that a program that
//! sends to a group, or joins it, without naming an interface uses the overlay. Installed with
//! the tunnel, removed when it stops (the kernel also drops them with the device).

use std::net::IpAddr;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("cannot run `ip` to route multicast group {group} to {interface}: {cause}\n  fix: install iproute2 (`apt install iproute2`), or remove [multicast]")]
    Missing {
        group: IpAddr,
        interface: String,
        cause: std::io::Error,
    },
    #[error("`ip route` refused the route for multicast group {group} on {interface}: {stderr}\n  fix: the node needs CAP_NET_ADMIN; check `ip route show table all {group}`")]
    Refused {
        group: IpAddr,
        interface: String,
        stderr: String,
    },
}

/// The routes a node installed; `remove` takes them away again.
#[derive(Debug)]
pub struct MulticastRoutes {
    interface: String,
    groups: Vec<IpAddr>,
}

/// `ip` arguments for one group's route (`verb`: "replace" or "del").
pub fn route_args(verb: &str, group: IpAddr, interface: &str) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    let prefix = match group {
        IpAddr::V4(_) => format!("{group}/32"),
        IpAddr::V6(_) => {
            args.push("-6".into());
            format!("{group}/128")
        }
    };
    args.extend(["route".into(), verb.into(), prefix]);
    args.extend(["dev".into(), interface.into()]);
    if group.is_ipv6() {
        args.extend(["table".into(), "local".into()]);
    }
    args
}

impl MulticastRoutes {
    pub fn install(interface: &str, groups: &[IpAddr]) -> Result<MulticastRoutes, RouteError> {
        let mut routes = MulticastRoutes {
            interface: interface.into(),
            groups: Vec::new(),
        };
        for group in groups {
            let out = Command::new("ip")
                .args(route_args("replace", *group, interface))
                .output()
                .map_err(|cause| RouteError::Missing {
                    group: *group,
                    interface: interface.into(),
                    cause,
                })?;
            if !out.status.success() {
                routes.remove();
                return Err(RouteError::Refused {
                    group: *group,
                    interface: interface.into(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
            routes.groups.push(*group);
        }
        tracing::info!(interface, groups = ?groups, "multicast routed to the overlay");
        Ok(routes)
    }

    /// Removes the routes (those already gone with the device are no error).
    pub fn remove(&self) {
        for group in &self.groups {
            let _ = Command::new("ip")
                .args(route_args("del", *group, &self.interface))
                .output();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_routes_go_in_main_v6_routes_in_local() {
        assert_eq!(
            route_args("replace", "239.255.0.1".parse().unwrap(), "myelin0").join(" "),
            "route replace 239.255.0.1/32 dev myelin0"
        );
        assert_eq!(
            route_args("del", "ff05::1:3".parse().unwrap(), "myelin0").join(" "),
            "-6 route del ff05::1:3/128 dev myelin0 table local"
        );
    }
}
