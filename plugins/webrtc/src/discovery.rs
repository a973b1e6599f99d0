//! Discovery of peers' streams, for the panel: every few seconds each peer that is up is asked
//! for its stream list on its overlay address; names outside the safe set are refused.

use crate::config::{valid_stream_name, MAX_NAME};
use crate::streams::{StreamHub, StreamInfo};
use myelin_sdk::PluginContext;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Debug, Serialize)]
pub struct PeerStreams {
    peer: String,
    base: String,
    streams: Vec<StreamInfo>,
    /// Announced streams dropped for an unsafe name.
    refused: usize,
}

/// A peer's answer is read up to this; a real stream list is a few hundred bytes.
const MAX_ANSWER: u64 = 256 * 1024;
/// Streams kept per peer.
const MAX_PEER_STREAMS: usize = 64;

/// What a peer announces, with the streams whose names are unsafe taken out.
#[derive(Debug, Default)]
struct Announced {
    streams: Vec<StreamInfo>,
    /// The names refused (at most `MAX_PEER_STREAMS` of them).
    refused: Vec<String>,
}

/// Only the name and viewer count are taken from a peer; the WHEP path is made here, so a
/// peer cannot point this node's dashboard at another host.
#[derive(Deserialize)]
struct Announcement {
    name: String,
    #[serde(default)]
    viewers: usize,
}

/// A peer's stream list, from its WHEP server; names outside the safe set are refused.
async fn fetch_streams(addr: SocketAddr) -> Result<Announced, String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /streams HTTP/1.0\r\nHost: peer\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    (&mut s)
        .take(MAX_ANSWER + 1)
        .read_to_end(&mut raw)
        .await
        .map_err(|e| e.to_string())?;
    if raw.len() as u64 > MAX_ANSWER {
        return Err(format!(
            "the stream list from {addr} is over {MAX_ANSWER} bytes; ignored"
        ));
    }
    let body = String::from_utf8(raw).map_err(|_| "the stream list is not UTF-8".to_string())?;
    let (head, json) = body.split_once("\r\n\r\n").ok_or("no HTTP body")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(head.lines().next().unwrap_or("").to_string());
    }
    let list: Vec<Announcement> = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let mut out = Announced::default();
    for a in list.into_iter().take(MAX_PEER_STREAMS) {
        if valid_stream_name(&a.name) {
            out.streams.push(StreamInfo {
                whep: format!("/{}/whep", a.name),
                name: a.name,
                viewers: a.viewers,
            });
        } else {
            // Kept short: it is only for the log.
            out.refused.push(a.name.chars().take(80).collect());
        }
    }
    Ok(out)
}

/// Asks every peer that is up for its streams, for the panel.
pub async fn discover(ctx: PluginContext, hub: Arc<StreamHub>) {
    let cancel = ctx.cancellation();
    let mesh = ctx.mesh();
    let mut warned = std::collections::HashSet::new();
    loop {
        let peers = mesh.borrow().peers.clone();
        let mut found = Vec::new();
        for p in peers.iter().filter(|p| p.up) {
            let Some(ip) = p
                .overlay_ips
                .iter()
                .find(|n| n.prefix_len() == n.max_prefix_len())
                .map(|n| n.addr())
            else {
                continue;
            };
            let addr = SocketAddr::new(ip, hub.port);
            if let Ok(Ok(announced)) =
                tokio::time::timeout(Duration::from_secs(2), fetch_streams(addr)).await
            {
                let base = match ip {
                    IpAddr::V4(v4) => format!("http://{v4}:{}", hub.port),
                    IpAddr::V6(v6) => format!("http://[{v6}]:{}", hub.port),
                };
                // A peer inventing new names forever must not grow this without end.
                if warned.len() > 1024 {
                    warned.clear();
                }
                for bad in &announced.refused {
                    if warned.insert((p.name.clone(), bad.clone())) {
                        eprintln!(
                            "webrtc: peer `{}` announced a stream named {bad:?}; ignored: names must be 1 to {MAX_NAME} letters, digits, `_` or `-` (check that peer's [plugins.webrtc] or what answers on {addr})",
                            p.name
                        );
                    }
                }
                if !announced.refused.is_empty() {
                    hub.metrics
                        .counter_with(
                            "myelin_webrtc_peer_streams_refused_total",
                            &[("peer", &p.name)],
                        )
                        .increment(announced.refused.len() as u64);
                }
                found.push(PeerStreams {
                    peer: p.name.clone(),
                    base,
                    streams: announced.streams,
                    refused: announced.refused.len(),
                });
            }
        }
        if let Ok(mut r) = hub.remote.lock() {
            *r = found;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(3)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `body` once as a peer's `GET /streams` answer.
    async fn peer_answering(body: Vec<u8>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 512];
            let _ = s.read(&mut request).await;
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n").await;
            let _ = s.write_all(&body).await;
        });
        addr
    }

    #[tokio::test]
    async fn peers_cannot_announce_unsafe_names_or_urls() {
        let body = serde_json::json!([
            { "name": "<img src=x onerror=alert(1)>", "whep": "/x/whep", "viewers": 0 },
            { "name": "front", "whep": "//evil.example/steal", "viewers": 2 },
            { "name": "a/../b", "whep": "/a/whep", "viewers": 0 },
        ]);
        let got = fetch_streams(peer_answering(body.to_string().into_bytes()).await)
            .await
            .unwrap();
        assert_eq!(got.streams.len(), 1);
        assert_eq!(
            (
                got.streams[0].name.as_str(),
                got.streams[0].whep.as_str(),
                got.streams[0].viewers
            ),
            ("front", "/front/whep", 2)
        );
        assert_eq!(got.refused, ["<img src=x onerror=alert(1)>", "a/../b"]);

        let huge = format!("[{}]", "{\"name\":\"a\"},".repeat(30_000));
        let err = fetch_streams(peer_answering(huge.into_bytes()).await)
            .await
            .unwrap_err();
        assert!(err.contains("bytes"), "{err}");
    }
}
