//! The `[plugins.webrtc]` section: the WHEP port, the viewer token and limit, and the streams
//! with their RTP ports and allowed senders, checked with the key and the fix in the message.

use myelin_sdk::{config_error, PluginError};
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    pub name: String,
    /// Where the camera pipeline sends H.264 RTP, e.g. 127.0.0.1:5004.
    pub rtp: SocketAddr,
    /// The only source addresses RTP is taken from; required when `rtp` is not a loopback
    /// address. Without it only this machine (loopback) may send.
    pub rtp_sources: Option<Vec<IpAddr>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebrtcConfig {
    /// WHEP port on the overlay addresses (MediaMTX's).
    #[serde(default = "default_port")]
    pub listen_port: u16,
    /// A file holding a bearer token viewers must send; none means open to the VPN.
    pub token_file: Option<std::path::PathBuf>,
    /// Viewers per stream.
    #[serde(default = "default_max_viewers")]
    pub max_viewers: usize,
    #[serde(default)]
    pub streams: Vec<StreamConfig>,
    /// Web pages (origins, e.g. "http://10.210.0.1:7800") that may play this node's video
    /// besides the dashboards served on loopback and on fleet members' overlay addresses.
    #[serde(default)]
    pub allow_origins: Vec<String>,
}

fn default_port() -> u16 {
    8889
}
fn default_max_viewers() -> usize {
    8
}

impl WebrtcConfig {
    pub fn parse(section: &myelin_sdk::toml::Table) -> Result<Self, PluginError> {
        let c: WebrtcConfig = myelin_sdk::parse_section(section)?;
        if c.listen_port == 0 {
            return Err(config_error(
                "listen_port = 0: viewers need a fixed port; use 8889",
            ));
        }
        if c.max_viewers == 0 {
            return Err(config_error(
                "max_viewers = 0 would refuse every viewer; use at least 1 (default 8)",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for s in &c.streams {
            if !valid_stream_name(&s.name) {
                return Err(config_error(format!(
                    "streams: name = {:?} must be 1 to {MAX_NAME} letters, digits, `_` or `-` (it is part of the URL /<name>/whep)",
                    s.name
                )));
            }
            check_rtp_sources(s)?;
            if !seen.insert(s.name.clone()) {
                return Err(config_error(format!(
                    "streams: `{}` appears twice; names must be unique",
                    s.name
                )));
            }
        }
        let mut c = c;
        for o in &mut c.allow_origins {
            *o = o.trim().to_ascii_lowercase();
            if !is_origin(o) {
                return Err(config_error(format!(
                    "allow_origins: {o:?} is not an origin; write scheme, host and port only, e.g. \"http://10.210.0.1:7800\""
                )));
            }
        }
        Ok(c)
    }
}

/// `http(s)://host[:port]`, nothing after it.
fn is_origin(o: &str) -> bool {
    let Some(rest) = o
        .strip_prefix("http://")
        .or_else(|| o.strip_prefix("https://"))
    else {
        return false;
    };
    !rest.is_empty() && !rest.contains(['/', '?', '#', '@', ' '])
}

/// Longest stream name; names travel to every peer's dashboard.
pub const MAX_NAME: usize = 64;

/// Stream names are path segments of the WHEP URL and are shown in peers' dashboards, so both
/// our config and what peers announce are held to this.
pub fn valid_stream_name(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len())
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
}

/// RTP is unauthenticated: whoever can reach the port can replace the video. Listening beyond
/// loopback therefore needs an explicit list of senders.
fn check_rtp_sources(s: &StreamConfig) -> Result<(), PluginError> {
    let bind = s.rtp.ip().to_canonical();
    match &s.rtp_sources {
        None if !bind.is_loopback() => Err(config_error(format!(
            "streams `{}`: rtp = \"{}\" listens beyond this machine, so anyone who can reach it could inject video; bind 127.0.0.1:{} for a local camera pipeline, or list the camera's addresses in rtp_sources = [\"<camera IP>\"]",
            s.name, s.rtp, s.rtp.port()
        ))),
        Some(list) if list.is_empty() => Err(config_error(format!(
            "streams `{}`: rtp_sources = [] would refuse every packet; list the camera's addresses, or remove the key to accept only this machine (rtp on 127.0.0.1)",
            s.name
        ))),
        Some(list) if bind.is_loopback() => match list.iter().find(|a| !a.to_canonical().is_loopback()) {
            Some(remote) => Err(config_error(format!(
                "streams `{}`: rtp_sources lists {remote}, but rtp = \"{}\" is loopback and only hears this machine; bind the address the camera sends to (e.g. 0.0.0.0:{})",
                s.name, s.rtp, s.rtp.port()
            ))),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<WebrtcConfig, String> {
        WebrtcConfig::parse(&myelin_sdk::toml::from_str(text).unwrap()).map_err(|e| e.to_string())
    }

    #[test]
    fn config_is_checked() {
        let c =
            parse("allow_origins = [\"HTTP://10.210.0.1:7800\", \"https://ops.example\"]").unwrap();
        assert_eq!(
            c.allow_origins,
            ["http://10.210.0.1:7800", "https://ops.example"]
        );
        for bad in [
            "10.210.0.1:7800",
            "http://a/b",
            "http://",
            "ftp://a",
            "http://a b",
        ] {
            let e = parse(&format!("allow_origins = [\"{bad}\"]")).unwrap_err();
            assert!(e.contains("not an origin"), "{bad}: {e}");
        }
        let c = parse("[[streams]]\nname = \"front\"\nrtp = \"127.0.0.1:5004\"").unwrap();
        assert_eq!(
            (c.listen_port, c.max_viewers, c.streams.len()),
            (8889, 8, 1)
        );
        assert!(
            parse("[[streams]]\nname = \"front cam\"\nrtp = \"127.0.0.1:5004\"")
                .unwrap_err()
                .contains("name")
        );
        assert!(parse("[[streams]]\nname = \"a\"\nrtp = \"127.0.0.1:1\"\n[[streams]]\nname = \"a\"\nrtp = \"127.0.0.1:2\"").unwrap_err().contains("twice"));
        assert!(parse("[[streams]]\nname = \"a\"\nrtp = \"localhost\"").is_err());
        assert!(parse("max_viewers = 0")
            .unwrap_err()
            .contains("max_viewers"));
        assert!(parse("listen_prot = 1")
            .unwrap_err()
            .contains("listen_prot"));
        let long = format!(
            "[[streams]]\nname = \"{}\"\nrtp = \"127.0.0.1:1\"",
            "a".repeat(65)
        );
        assert!(parse(&long).unwrap_err().contains("64"));
    }

    #[test]
    fn rtp_beyond_loopback_needs_an_allow_list() {
        let err = parse("[[streams]]\nname = \"front\"\nrtp = \"0.0.0.0:5004\"").unwrap_err();
        assert!(
            err.contains("rtp_sources") && err.contains("127.0.0.1:5004"),
            "{err}"
        );
        assert!(parse("[[streams]]\nname = \"front\"\nrtp = \"[::]:5004\"").is_err());
        let c = parse(
            "[[streams]]\nname = \"front\"\nrtp = \"0.0.0.0:5004\"\nrtp_sources = [\"192.168.1.20\"]",
        )
        .unwrap();
        assert_eq!(
            c.streams[0].rtp_sources,
            Some(vec!["192.168.1.20".parse().unwrap()])
        );
        assert!(
            parse("[[streams]]\nname = \"front\"\nrtp = \"0.0.0.0:5004\"\nrtp_sources = []")
                .unwrap_err()
                .contains("refuse every packet")
        );
        assert!(parse(
            "[[streams]]\nname = \"front\"\nrtp = \"127.0.0.1:5004\"\nrtp_sources = [\"10.0.0.5\"]"
        )
        .unwrap_err()
        .contains("loopback"));
        assert!(parse("[[streams]]\nname = \"front\"\nrtp = \"[::1]:5004\"").is_ok());
    }
}
