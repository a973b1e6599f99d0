//! The `MeshView` plugins see: probes every peer in the tunnel's table, answers their probes,
//! and publishes each peer's session, RTT, jitter and loss (and the per-peer metrics).

use super::probe::{ProbeStats, Prober, PROBE_LEN};
use crate::tunnel::{Peer, PeerControl, PeerTable, PROBE_PORT, SESSION_LIFETIME};
use myelin_sdk::{MeshView, PeerView};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

fn peer_view(
    peer: &Peer,
    relay: Option<String>,
    probe: ProbeStats,
    recent_probes: Vec<myelin_sdk::ProbeSample>,
) -> PeerView {
    let (handshake, tx, rx, _, _) = peer
        .tunn
        .lock()
        .map(|t| t.stats())
        .unwrap_or((None, 0, 0, 0.0, None));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    PeerView {
        name: peer.name.clone(),
        public_key: peer.public_key.clone(),
        overlay_ips: peer.allowed_ips.clone(),
        endpoint: peer.endpoint(),
        relay,
        path_changes: peer.path.changes(),
        last_handshake_age_ms: handshake.map(|d| d.as_millis() as u64),
        rtt_ms: probe.rtt.map(ms),
        jitter_ms: probe.jitter.map(ms),
        loss: probe.loss,
        last_seen_ms: probe.last_seen.map(|d| d.as_millis() as u64),
        rx_bytes: rx as u64,
        tx_bytes: tx as u64,
        rx_packets: peer.rx_packets.load(Ordering::Relaxed),
        tx_packets: peer.tx_packets.load(Ordering::Relaxed),
        up: handshake.is_some_and(|d| d < SESSION_LIFETIME),
        recent_probes,
    }
}

fn record_metrics(view: &PeerView, endpoint_changes: u64) {
    let peer = view.name.clone();
    metrics::counter!("myelin_peer_rx_bytes_total", "peer" => peer.clone()).absolute(view.rx_bytes);
    metrics::counter!("myelin_peer_tx_bytes_total", "peer" => peer.clone()).absolute(view.tx_bytes);
    metrics::counter!("myelin_peer_rx_packets_total", "peer" => peer.clone())
        .absolute(view.rx_packets);
    metrics::counter!("myelin_peer_tx_packets_total", "peer" => peer.clone())
        .absolute(view.tx_packets);
    metrics::counter!("myelin_peer_endpoint_changes_total", "peer" => peer.clone())
        .absolute(endpoint_changes);
    metrics::gauge!("myelin_peer_up", "peer" => peer.clone()).set(if view.up { 1.0 } else { 0.0 });
    if let Some(age) = view.last_handshake_age_ms {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        metrics::gauge!("myelin_peer_last_handshake_timestamp_seconds", "peer" => peer.clone())
            .set(now - age as f64 / 1000.0);
    }
    if let Some(loss) = view.loss {
        metrics::gauge!("myelin_peer_loss_ratio", "peer" => peer).set(loss);
    }
}

/// Probes per peer listed in the `MeshView` (a second's worth at the default interval).
const RECENT_PROBES: usize = 10;
/// The shortest time between two `MeshView`s published because probe answers arrived. Every
/// view is copied to each plugin and, for plugin processes, encoded and parsed whole: an
/// operator probing fifty robots ten times a second would otherwise publish two hundred views
/// a second. A view carries a second of probes per peer, so a later view still holds every
/// answer; 20 ms is a tenth of the interlock's tightest limit.
const ANSWER_PUBLISH_GAP: Duration = Duration::from_millis(20);
/// How long a probe answer waits for the answers of the other peers probed at the same moment,
/// so one view carries them all (far below any latency limit a plugin judges).
const ANSWER_BATCH: Duration = Duration::from_millis(2);
/// The shortest time between two updates of the per-peer gauges.
const METRICS_GAP: Duration = Duration::from_millis(250);

/// What the control task keeps per slot, following the peer table.
#[derive(Default)]
struct ControlSlots {
    /// The peer each slot held when last looked at, to tell a new peer from the same one.
    peers: Vec<Option<Arc<Peer>>>,
    answered: Vec<u64>,
    /// Looked up once per peer: a registry lookup per answer was most of the loop's idle cost.
    rtt_histograms: Vec<Option<metrics::Histogram>>,
}

impl ControlSlots {
    /// Loads the current table and starts or stops probing the slots that changed.
    fn follow(&mut self, table: &mut Arc<PeerTable>, peers: &PeerControl, prober: &mut Prober) {
        *table = peers.table();
        let n = table.slot_count().max(self.peers.len());
        self.peers.resize(n, None);
        self.answered.resize(n, 0);
        self.rtt_histograms.resize(n, None);
        let now = Instant::now();
        for slot in 0..n {
            let current = table.get(slot);
            let same = match (current, self.peers.get(slot).and_then(Option::as_ref)) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if same {
                continue;
            }
            self.answered[slot] = 0;
            match current {
                Some(p) => {
                    prober.track(slot, now, p.spec.probe_interval, p.spec.idles);
                    self.rtt_histograms[slot] = Some(
                        metrics::histogram!("myelin_peer_rtt_seconds", "peer" => p.name.clone()),
                    );
                }
                None => {
                    prober.untrack(slot);
                    self.rtt_histograms[slot] = None;
                }
            }
            self.peers[slot] = current.cloned();
        }
    }

    /// Whether `count` answers for `slot` is more than last seen (and remembers it).
    fn newly_answered(&mut self, slot: usize, count: u64) -> bool {
        match self.answered.get_mut(slot) {
            Some(seen) if count > *seen => {
                *seen = count;
                true
            }
            _ => false,
        }
    }

    fn rtt_histogram(&self, slot: usize) -> Option<&metrics::Histogram> {
        self.rtt_histograms.get(slot)?.as_ref()
    }
}

/// Probes every peer each interval, answers their probes, and publishes the `MeshView`.
pub async fn run(
    peers: PeerControl,
    probe_socket: Option<tokio::net::UdpSocket>,
    interval: Duration,
    mesh_tx: watch::Sender<MeshView>,
) {
    let session = getrandom::u64().unwrap_or_else(|e| {
        tracing::warn!("no OS randomness for the probe nonce ({e}); using the clock");
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id())
    });
    let mut prober = Prober::new(0, interval, Instant::now(), session);
    // Without answers (no peers up, plain WireGuard peers) the view is still refreshed, so
    // ages move on and a silent peer shows.
    let refresh = interval.max(Duration::from_millis(100));
    let mut buf = [0u8; 64];
    let mut table: Arc<PeerTable> = Arc::new(PeerTable::default());
    let mut slots = ControlSlots::default();
    slots.follow(&mut table, &peers, &mut prober);
    // A probe answer is published at once (at most every ANSWER_PUBLISH_GAP), so plugins that
    // judge the link probe by probe (safety) never act on a view that misses an answer.
    let mut publish_soon: Option<tokio::time::Instant> = None;
    let mut last_publish = tokio::time::Instant::now();
    let mut last_metrics = last_publish
        .checked_sub(METRICS_GAP)
        .unwrap_or(last_publish);
    loop {
        let wake = prober
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + interval);
        let soon = publish_soon.unwrap_or_else(|| tokio::time::Instant::now() + interval * 10);
        let publish_now = tokio::select! {
            _ = peers.changed() => {
                slots.follow(&mut table, &peers, &mut prober);
                true
            }
            _ = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                while let Some((idx, ping)) = prober.poll_transmit(now) {
                    let (Some(sock), Some(to)) = (&probe_socket, table.get(idx).and_then(|p| p.probe_addr)) else { continue };
                    let _ = sock.try_send_to(&ping, SocketAddr::new(to, PROBE_PORT));
                }
                false
            }
            received = async {
                match &probe_socket {
                    Some(s) => s.recv_from(&mut buf).await,
                    None => std::future::pending().await,
                }
            } => {
                let Ok((n, from)) = received else { continue };
                let Some(idx) = table.route(from.ip()) else { continue };
                let now = Instant::now();
                if let Some(pong) = prober.handle_input(idx, &buf[..n.min(PROBE_LEN + 1)], now) {
                    if let Some(sock) = &probe_socket {
                        let _ = sock.try_send_to(&pong, from);
                    }
                }
                let (count, rtt) = prober.answered(idx);
                if slots.newly_answered(idx, count) {
                    if let (Some(rtt), Some(histogram)) = (rtt, slots.rtt_histogram(idx)) {
                        histogram.record(rtt.as_secs_f64());
                    }
                    // Only peers probed at this node's own cadence are judged probe by probe;
                    // a slower-probed peer's answer (a robot of the same group, probed once a
                    // second) waits for the next refresh, at most one interval away.
                    let judged = table.get(idx).is_some_and(|p| p.spec.probe_interval.is_none());
                    if judged && publish_soon.is_none() {
                        publish_soon = Some((last_publish + ANSWER_PUBLISH_GAP).max(tokio::time::Instant::now() + ANSWER_BATCH));
                    }
                }
                false
            }
            _ = tokio::time::sleep_until(soon), if publish_soon.is_some() => true,
            _ = tokio::time::sleep_until(last_publish + refresh), if publish_soon.is_none() => true,
        };
        if publish_now {
            let now = Instant::now();
            for (i, p) in table.iter().filter(|(_, p)| p.spec.idles) {
                let packets = p
                    .rx_packets
                    .load(Ordering::Relaxed)
                    .wrapping_add(p.tx_packets.load(Ordering::Relaxed));
                prober.traffic(i, packets, now);
            }
            publish_soon = None;
            last_publish = tokio::time::Instant::now();
            // The gauges follow at most four times a second; scrapes are seconds apart.
            let record = last_metrics.elapsed() >= METRICS_GAP;
            if record {
                last_metrics = last_publish;
            }
            let now = Instant::now();
            let view = MeshView {
                // Restricted peers (certificate not yet shown) are nobody's business yet.
                peers: table
                    .iter()
                    .filter(|(_, p)| !p.allowed_ips.is_empty())
                    .map(|(i, p)| {
                        let relay = p.path.relay().map(|k| match table.by_key(&k) {
                            Some((_, r)) => r.name.clone(),
                            None => crate::mesh::cert::hex(&k[..6]),
                        });
                        let v = peer_view(
                            p,
                            relay,
                            prober.stats(i, now),
                            prober.recent(i, now, RECENT_PROBES),
                        );
                        if record {
                            record_metrics(&v, p.endpoint_changes.load(Ordering::Relaxed));
                        }
                        v
                    })
                    .collect(),
            };
            // An unchanged view (no peers, nothing probed) wakes nobody.
            mesh_tx.send_if_modified(|current| {
                let changed = *current != view;
                if changed {
                    *current = view;
                }
                changed
            });
        }
    }
}
