//! The dashboard panel: this node's streams and every peer's, each played in the browser with a
//! plain `RTCPeerConnection` and an offer to the peer's WHEP URL on its overlay address (posted
//! by the dashboard, since the panel's sandboxed frame has no origin WHEP accepts), with fps,
//! RTT and jitter from `getStats()`; and the status JSON it polls.

use crate::discovery::PeerStreams;
use crate::streams::{stream_list, StreamHub};
use std::sync::atomic::Ordering;

/// What `GET /plugins/webrtc/status` answers: local streams with their counters, and peers'.
pub fn status(hub: &StreamHub) -> serde_json::Value {
    let local: Vec<serde_json::Value> = stream_list(hub)
        .into_iter()
        .filter_map(|info| {
            let s = hub.streams.get(&info.name)?;
            let c = &s.counters;
            Some(serde_json::json!({
                "name": info.name,
                "rtp": s.rtp.to_string(),
                "viewers": info.viewers,
                "rtp_packets_in": c.packets_in.load(Ordering::Relaxed),
                "rtp_refused": c.rtp_refused.load(Ordering::Relaxed),
                "frames_sent": c.frames_sent.load(Ordering::Relaxed),
                "bytes_sent": c.bytes_sent.load(Ordering::Relaxed),
                "rtp_dropped": c.dropped.load(Ordering::Relaxed),
                "keyframe_waits": c.keyframe_waits.load(Ordering::Relaxed),
            }))
        })
        .collect();
    let peers: Vec<PeerStreams> = hub.remote.lock().map(|r| r.clone()).unwrap_or_default();
    let own = hub
        .own
        .as_ref()
        .map(|(name, base)| serde_json::json!({ "name": name, "base": base }));
    serde_json::json!({ "streams": local, "peers": peers, "own": own, "listen_port": hub.port })
}

/// What the fleet page shows (`GET /summary`): this node's streams and the port viewers ask
/// for them on (`http://<overlay address>:<port>/<stream>/whep`).
pub fn summary(hub: &StreamHub) -> serde_json::Value {
    let streams: Vec<serde_json::Value> = stream_list(hub)
        .into_iter()
        .map(|info| {
            let packets = hub
                .streams
                .get(&info.name)
                .map_or(0, |s| s.counters.packets_in.load(Ordering::Relaxed));
            serde_json::json!({ "name": info.name, "viewers": info.viewers, "rtp_packets_in": packets })
        })
        .collect();
    serde_json::json!({ "kind": "video", "port": hub.port, "streams": streams })
}

/// Everything a peer supplies (peer and stream names, URLs) reaches the page only through
/// `textContent`, `dataset` and `fetch`, never as markup; the tests check no HTML sink is used.
pub const HTML: &str = r##"<!doctype html><meta charset="utf-8"><body style="font:13px system-ui;margin:8px">
<div id="none" style="color:#666">No streams on this node or its peers yet.</div>
<div id="videos" style="display:flex;flex-wrap:wrap;gap:8px"></div>
<script>
const playing = new Map();
const offers = new Map();
let offerId = 0;
const whep = (url, sdp) => new Promise((done) => {
  const id = `whep-${++offerId}`;
  offers.set(id, done);
  parent.postMessage({ myelin: "whep", id, url, sdp }, "*");
  setTimeout(() => { if (offers.delete(id)) done({ status: 0, body: "no answer from the dashboard" }); }, 10000);
});
const boxes = new Map();
const call = () => parent.postMessage({ myelin: "call", id: 1, method: "GET", path: "status" }, "*");
const resize = () => parent.postMessage({ myelin: "resize", height: document.body.scrollHeight + 16 }, "*");
function box(key) {
  if (boxes.has(key)) return boxes.get(key);
  const div = document.createElement("div");
  const video = document.createElement("video");
  video.muted = true; video.autoplay = true; video.playsInline = true;
  video.setAttribute("muted", ""); video.setAttribute("playsinline", "");
  video.style.cssText = "width:320px;background:#000";
  const stats = document.createElement("div");
  stats.className = "stats";
  stats.dataset.stream = key;
  div.append(video, stats);
  document.getElementById("videos").appendChild(div);
  const b = { video, stats };
  boxes.set(key, b);
  return b;
}
async function play(key, url) {
  const { video, stats } = box(key);
  stats.textContent = `${key}: connecting…`;
  const pc = new RTCPeerConnection({ iceServers: [] });
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.ontrack = (e) => { video.srcObject = e.streams[0] || new MediaStream([e.track]); };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((done) => {
    if (pc.iceGatheringState === "complete") return done();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && done();
    setTimeout(done, 2000);
  });
  // The dashboard posts the offer (this frame's origin is opaque, which WHEP refuses).
  const r = await whep(url, pc.localDescription.sdp);
  if (r.status !== 201) { pc.close(); stats.textContent = `${key}: WHEP answered ${r.status} ${r.body}`.slice(0, 200); return; }
  await pc.setRemoteDescription({ type: "answer", sdp: r.body });
  playing.set(key, pc);
  video.onloadedmetadata = resize;
  setInterval(async () => {
    let frames = 0, fps = 0, jitter = 0, rtt = null;
    (await pc.getStats()).forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") { frames = s.framesDecoded || 0; fps = s.framesPerSecond || 0; jitter = s.jitter || 0; }
      if (s.type === "candidate-pair" && s.nominated && s.currentRoundTripTime != null) rtt = s.currentRoundTripTime;
    });
    stats.dataset.framesDecoded = frames;
    stats.textContent = `${key}: ${fps.toFixed(0)} fps · framesDecoded ${frames} · RTT ${rtt == null ? "–" : (rtt * 1000).toFixed(1) + " ms"} · jitter ${(jitter * 1000).toFixed(1)} ms`;
  }, 1000);
}
// The WHEP URL must stay on the peer's own origin, whatever the peer announced.
function whepUrl(base, path) {
  try {
    const origin = new URL(base).origin, url = new URL(path, base);
    return url.origin === origin ? url.href : null;
  } catch { return null; }
}
addEventListener("message", (e) => {
  // Only the dashboard answers calls; other frames could post look-alike replies.
  if (e.source === parent && e.data && e.data.myelin === "whep-reply" && offers.has(e.data.id)) {
    const done = offers.get(e.data.id);
    offers.delete(e.data.id);
    done({ status: e.data.status, body: String(e.data.body) });
    return;
  }
  if (e.source !== parent || !e.data || e.data.myelin !== "reply" || e.data.status !== 200) return;
  const s = JSON.parse(e.data.body);
  // This node's own streams first, then each peer's: one tile per peer/stream, ever.
  const sources = (s.peers || []).slice();
  if (s.own) sources.unshift({ peer: s.own.name, base: s.own.base, streams: (s.streams || []).map((st) => ({ name: st.name, whep: `/${st.name}/whep` })) });
  for (const p of sources) for (const st of p.streams || []) {
    const key = `${p.peer}/${st.name}`;
    const url = whepUrl(String(p.base), String(st.whep));
    if (url === null || playing.has(key)) continue;
    playing.set(key, null);
    play(key, url).catch((err) => {
      box(key).stats.textContent = `${key}: ${err}`;
      playing.delete(key);
    });
  }
  document.getElementById("none").style.display = playing.size ? "none" : "";
  resize();
});
call();
setInterval(call, 3000);
</script>"##;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_panel_never_turns_text_into_markup() {
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "srcdoc",
            "eval(",
            "new Function",
        ] {
            assert!(!HTML.contains(sink), "the panel uses `{sink}`");
        }
    }
}
