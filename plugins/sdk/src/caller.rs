//! Who sent a request that the node proxied to a plugin: the node sets the
//! [`CALLER_HEADER`] on every proxied request (after removing any the client sent), so a
//! plugin can decide by identity (a mesh member's certificate groups) and say who did what.

use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// The header the node sets on every request it proxies to a plugin.
pub const CALLER_HEADER: &str = "x-myelin-caller";

/// How the caller reached the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// The node's loopback API: someone on this machine.
    Local,
    /// The remote listener with the node's bearer token: a client outside the mesh.
    Token,
    /// Through the tunnel from a mesh member, known by its certificate.
    Mesh,
}

/// The sender of a request, as the node established it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub via: Via,
    /// The member's name (mesh) or the client's address (token), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    /// The member's certificate groups (mesh only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

impl Caller {
    pub fn local() -> Self {
        Self {
            via: Via::Local,
            name: None,
            address: None,
            groups: Vec::new(),
        }
    }

    /// The caller the node put on a proxied request; `None` when the header is missing or
    /// malformed (the request did not come through the node).
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let value = headers.get(CALLER_HEADER)?.to_str().ok()?;
        serde_json::from_str(value).ok()
    }

    /// The header value the node sets.
    pub fn to_header(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn in_any_group(&self, groups: &[String]) -> bool {
        self.groups.iter().any(|g| groups.contains(g))
    }

    /// For logs and events: "operator (10.77.0.1, groups operators)", "the API token holder
    /// at 192.0.2.9", "a local client".
    pub fn describe(&self) -> String {
        let addr = self.address.map(|a| a.to_string()).unwrap_or_default();
        match self.via {
            Via::Local => "a local client of the node's API".into(),
            Via::Token => format!("the API token holder at {addr}"),
            Via::Mesh => format!(
                "{} ({addr}, groups {})",
                self.name.as_deref().unwrap_or("?"),
                if self.groups.is_empty() {
                    "none".into()
                } else {
                    self.groups.join(",")
                }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_round_trips_and_garbage_is_no_caller() {
        let c = Caller {
            via: Via::Mesh,
            name: Some("operator".into()),
            address: "10.77.0.1".parse().ok(),
            groups: vec!["operators".into()],
        };
        let mut h = HeaderMap::new();
        h.insert(CALLER_HEADER, c.to_header().parse().unwrap());
        assert_eq!(Caller::from_headers(&h), Some(c.clone()));
        assert!(c.in_any_group(&["operators".into()]));
        assert!(!c.in_any_group(&["robots".into()]));
        assert_eq!(c.describe(), "operator (10.77.0.1, groups operators)");
        h.insert(CALLER_HEADER, "{\"via\":\"root\"}".parse().unwrap());
        assert_eq!(Caller::from_headers(&h), None);
        assert_eq!(Caller::from_headers(&HeaderMap::new()), None);
    }
}
