//! This node's streams: the registry that the WHEP server, discovery and the panel share, and
//! the RTP ingest that numbers each stream's packets, caches its current GOP and fans it out.

use crate::config::StreamConfig;
use crate::discovery::PeerStreams;
use crate::h264::{GopCache, Ingested};
use crate::whep::{Slots, Viewer};
use myelin_sdk::axum::body::Bytes;
use myelin_sdk::CancellationToken;
use rtc::shared::marshal::Unmarshal;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// Counters of one stream, shared by its viewers.
#[derive(Debug, Default)]
pub struct StreamCounters {
    pub packets_in: AtomicU64,
    /// RTP packets from a source not allowed by `rtp_sources` (or not loopback).
    pub rtp_refused: AtomicU64,
    pub frames_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub dropped: AtomicU64,
    pub keyframe_waits: AtomicU64,
}

pub struct Stream {
    pub name: String,
    pub rtp: SocketAddr,
    /// None: loopback senders only.
    rtp_sources: Option<Vec<IpAddr>>,
    pub tx: broadcast::Sender<Arc<Ingested>>,
    pub cache: Mutex<GopCache>,
    pub viewers: Mutex<HashMap<String, Viewer>>,
    pub slots: Arc<Slots>,
    pub counters: StreamCounters,
    pub metrics: myelin_sdk::PluginMetrics,
}

impl Stream {
    pub fn new(
        config: &StreamConfig,
        max_viewers: usize,
        metrics: myelin_sdk::PluginMetrics,
    ) -> Arc<Stream> {
        // Only ever moved by increments and decrements: a restarted plugin's new streams share
        // the gauge with sessions of the old ones still ending.
        let gauge = metrics.gauge_with("myelin_webrtc_viewers", &[("stream", &config.name)]);
        let (tx, _) = broadcast::channel(2048);
        Arc::new(Stream {
            name: config.name.clone(),
            rtp: config.rtp,
            rtp_sources: config.rtp_sources.clone(),
            tx,
            cache: Mutex::new(GopCache::new(4096)),
            viewers: Mutex::new(HashMap::new()),
            slots: Arc::new(Slots::new(max_viewers, gauge)),
            counters: StreamCounters::default(),
            metrics,
        })
    }

    /// Sessions holding a slot: connected viewers and offers still connecting.
    pub fn viewer_count(&self) -> usize {
        self.slots.used()
    }

    fn source_allowed(&self, from: IpAddr) -> bool {
        let from = from.to_canonical();
        match &self.rtp_sources {
            None => from.is_loopback(),
            Some(list) => list.iter().any(|a| a.to_canonical() == from),
        }
    }
}

/// Everything the plugin serves and shows: this node's streams, the viewer token, and the
/// streams its peers announce.
pub struct StreamHub {
    pub streams: HashMap<String, Arc<Stream>>,
    pub token: Option<String>,
    pub port: u16,
    /// This node's name and WHEP base URL on its overlay address, for the panel's own tiles.
    pub own: Option<(String, String)>,
    /// The web pages that may play the video.
    pub origins: crate::whep::Origins,
    /// Peers' streams, for the dashboard panel.
    pub remote: Mutex<Vec<PeerStreams>>,
    pub metrics: myelin_sdk::PluginMetrics,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StreamInfo {
    pub name: String,
    pub whep: String,
    pub viewers: usize,
}

pub fn stream_list(hub: &StreamHub) -> Vec<StreamInfo> {
    let mut list: Vec<StreamInfo> = hub
        .streams
        .values()
        .map(|s| StreamInfo {
            name: s.name.clone(),
            whep: format!("/{}/whep", s.name),
            viewers: s.viewer_count(),
        })
        .collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    list
}

/// Receives one stream's RTP: numbers each packet, notes keyframes, caches the current GOP and
/// fans it out. Nothing here waits on a viewer.
pub async fn ingest(stream: Arc<Stream>, socket: tokio::net::UdpSocket, cancel: CancellationToken) {
    let mut buf = vec![0u8; 2048];
    let mut index = 0u64;
    let packets_in = stream.metrics.counter_with(
        "myelin_webrtc_rtp_packets_in_total",
        &[("stream", &stream.name)],
    );
    let refused = stream.metrics.counter_with(
        "myelin_webrtc_rtp_refused_total",
        &[("stream", &stream.name)],
    );
    let mut told = false;
    loop {
        let (n, from) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(got) => got,
                Err(_) => continue,
            },
        };
        if !stream.source_allowed(from.ip()) {
            stream.counters.rtp_refused.fetch_add(1, Ordering::Relaxed);
            refused.increment(1);
            if !told {
                told = true;
                eprintln!(
                    "webrtc: stream `{}` refused RTP from {from} (not in rtp_sources; only the first is logged, myelin_webrtc_rtp_refused_total counts them)",
                    stream.name
                );
            }
            continue;
        }
        let mut raw = Bytes::copy_from_slice(&buf[..n]);
        let Ok(packet) = rtc::rtp::Packet::unmarshal(&mut raw) else {
            continue;
        };
        let p = Arc::new(Ingested::new(index, packet, n));
        index += 1;
        stream.counters.packets_in.fetch_add(1, Ordering::Relaxed);
        packets_in.increment(1);
        if let Ok(mut c) = stream.cache.lock() {
            c.push(p.clone());
        }
        // No receivers is fine: nobody is watching.
        let _ = stream.tx.send(p);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use myelin_sdk::PluginContext;
    use std::time::Duration;

    pub(crate) fn metrics() -> myelin_sdk::PluginMetrics {
        let (_tx, rx) = tokio::sync::watch::channel(myelin_sdk::MeshView::default());
        PluginContext::new(
            myelin_sdk::NodeIdentity::default(),
            "webrtc_test",
            myelin_sdk::toml::Table::new(),
            rx,
            CancellationToken::new(),
        )
        .metrics()
    }

    pub(crate) fn stream(
        name: &str,
        rtp: &str,
        sources: Option<&[&str]>,
        max: usize,
    ) -> Arc<Stream> {
        let config = StreamConfig {
            name: name.into(),
            rtp: rtp.parse().unwrap(),
            rtp_sources: sources.map(|l| l.iter().map(|a| a.parse().unwrap()).collect()),
        };
        Stream::new(&config, max, metrics())
    }

    fn rtp_packet(seq: u16) -> Vec<u8> {
        let mut p = vec![0x80, 96];
        p.extend_from_slice(&seq.to_be_bytes());
        // An IDR slice, so the GOP cache keeps it.
        p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 7, 0x65, 0x88, 0x80]);
        p
    }

    async fn ingested_after(s: &Stream, want: u64) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            let c = &s.counters;
            if c.packets_in.load(Ordering::Relaxed) + c.rtp_refused.load(Ordering::Relaxed) >= want
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn rtp_from_other_sources_is_dropped_and_counted() {
        // The allow-list: 127.0.0.2 may send, 127.0.0.1 (any other address) may not.
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = socket.local_addr().unwrap();
        let s = stream("front", &to.to_string(), Some(&["127.0.0.2"]), 1);
        let cancel = CancellationToken::new();
        tokio::spawn(ingest(s.clone(), socket, cancel.clone()));
        let camera = tokio::net::UdpSocket::bind("127.0.0.2:0").await.unwrap();
        let stranger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for seq in 0..3 {
            stranger.send_to(&rtp_packet(seq), to).await.unwrap();
        }
        camera.send_to(&rtp_packet(3), to).await.unwrap();
        assert!(ingested_after(&s, 4).await, "the packets never arrived");
        assert_eq!(s.counters.rtp_refused.load(Ordering::Relaxed), 3);
        assert_eq!(s.counters.packets_in.load(Ordering::Relaxed), 1);
        assert_eq!(s.cache.lock().unwrap().snapshot().len(), 1);
        cancel.cancel();

        // Without a list, only loopback: a source that is not loopback is refused.
        let s = stream("back", "127.0.0.1:9", None, 1);
        assert!(s.source_allowed("127.0.0.1".parse().unwrap()));
        assert!(s.source_allowed("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!s.source_allowed("10.90.0.2".parse().unwrap()));
        let s = stream("yard", "0.0.0.0:9", Some(&["10.0.0.5"]), 1);
        assert!(s.source_allowed("::ffff:10.0.0.5".parse().unwrap()));
        assert!(!s.source_allowed("127.0.0.1".parse().unwrap()));
    }
}
