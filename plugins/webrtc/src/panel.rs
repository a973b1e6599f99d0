//! The dashboard panel: this node's streams and every peer's, each played in the browser with a
//! plain `RTCPeerConnection` and a `fetch` to the peer's WHEP URL on its overlay address, with
//! fps, RTT and jitter from `getStats()`.

use crate::{stream_list, PeerStreams, Shared, StreamInfo};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A peer's stream list, from its WHEP server.
pub async fn fetch_streams(addr: SocketAddr) -> Result<Vec<StreamInfo>, String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /streams HTTP/1.0\r\nHost: peer\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    let (head, json) = body.split_once("\r\n\r\n").ok_or("no HTTP body")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(head.lines().next().unwrap_or("").to_string());
    }
    serde_json::from_str(json).map_err(|e| e.to_string())
}

/// What `GET /plugins/webrtc/status` answers: local streams with their counters, and peers'.
pub fn status(shared: &Shared) -> serde_json::Value {
    let local: Vec<serde_json::Value> = stream_list(shared)
        .into_iter()
        .filter_map(|info| {
            let s = shared.streams.get(&info.name)?;
            let c = &s.counters;
            Some(serde_json::json!({
                "name": info.name,
                "rtp": s.rtp.to_string(),
                "viewers": info.viewers,
                "rtp_packets_in": c.packets_in.load(Ordering::Relaxed),
                "frames_sent": c.frames_sent.load(Ordering::Relaxed),
                "bytes_sent": c.bytes_sent.load(Ordering::Relaxed),
                "rtp_dropped": c.dropped.load(Ordering::Relaxed),
                "keyframe_waits": c.keyframe_waits.load(Ordering::Relaxed),
            }))
        })
        .collect();
    let peers: Vec<PeerStreams> = shared.remote.lock().map(|r| r.clone()).unwrap_or_default();
    serde_json::json!({ "streams": local, "peers": peers, "listen_port": shared.port })
}

pub const HTML: &str = r##"<!doctype html><meta charset="utf-8"><body style="font:13px system-ui;margin:8px">
<div id="none" style="color:#666">No streams on this node or its peers yet.</div>
<div id="videos" style="display:flex;flex-wrap:wrap;gap:8px"></div>
<script>
const playing = new Map();
const call = () => parent.postMessage({ myelin: "call", id: 1, method: "GET", path: "status" }, "*");
async function play(key, url) {
  const box = document.createElement("div");
  box.innerHTML = `<video muted autoplay playsinline style="width:320px;background:#000"></video><div class="stats" data-stream="${key}">${key}: connecting…</div>`;
  document.getElementById("videos").appendChild(box);
  const video = box.querySelector("video"), stats = box.querySelector(".stats");
  const pc = new RTCPeerConnection({ iceServers: [] });
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.ontrack = (e) => { video.srcObject = e.streams[0] || new MediaStream([e.track]); };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((done) => {
    if (pc.iceGatheringState === "complete") return done();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && done();
    setTimeout(done, 2000);
  });
  const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/sdp" }, body: pc.localDescription.sdp });
  if (r.status !== 201) { stats.textContent = `${key}: WHEP answered ${r.status}`; return; }
  await pc.setRemoteDescription({ type: "answer", sdp: await r.text() });
  playing.set(key, pc);
  video.onloadedmetadata = () => parent.postMessage({ myelin: "resize", height: document.body.scrollHeight + 16 }, "*");
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
addEventListener("message", (e) => {
  if (!e.data || e.data.myelin !== "reply" || e.data.status !== 200) return;
  const s = JSON.parse(e.data.body);
  for (const p of s.peers) for (const st of p.streams) {
    const key = `${p.peer}/${st.name}`;
    if (!playing.has(key)) { playing.set(key, null); play(key, p.base + st.whep).catch((err) => { console.log(`${key}: ${err}`); playing.delete(key); }); }
  }
  document.getElementById("none").style.display = playing.size ? "none" : "";
  parent.postMessage({ myelin: "resize", height: document.body.scrollHeight + 16 }, "*");
});
call();
setInterval(call, 3000);
</script>"##;
