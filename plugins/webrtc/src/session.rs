//! One WHEP viewer: its peer connection (one host candidate, on the overlay address the offer
//! arrived on), its own track, and the task that replays the cached GOP and then forwards the
//! live stream, rewriting SSRC, payload type and sequence numbers for this viewer.

use crate::h264::Ingested;
use crate::streams::Stream;
use crate::whep::{Slot, Viewer};
use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::Registry;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RtpCodecKind,
};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{broadcast, watch};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCIceConnectionState,
    RTCIceGatheringState, RTCPeerConnectionState,
};

#[derive(Debug)]
pub enum SessionError {
    BadOffer(String),
    Internal(String),
}

/// H.264 constrained baseline, packetization-mode 1: what browsers and aiortc offer, and what
/// Jetson and x264 pipelines send. Profile matching compares the profile-level-id prefix.
const H264_FMTP: &str = "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f";

/// How long a vanished viewer may stay: ICE goes disconnected, then failed, within this.
const ICE_DISCONNECTED: Duration = Duration::from_secs(2);
const ICE_FAILED: Duration = Duration::from_secs(2);
const ICE_KEEPALIVE: Duration = Duration::from_millis(500);
/// From the offer's arrival to ICE connected. A viewer that means it starts its checks as soon
/// as it has the answer; an offer that never does ICE would otherwise hold a viewer slot.
pub(crate) const ICE_CONNECT: Duration = Duration::from_secs(2);
/// From ICE connected to the DTLS handshake done.
const DTLS_CONNECT: Duration = Duration::from_secs(10);

fn runtime() -> Option<Arc<dyn webrtc::runtime::Runtime>> {
    static RUNTIME: OnceLock<Option<Arc<dyn webrtc::runtime::Runtime>>> = OnceLock::new();
    RUNTIME
        .get_or_init(webrtc::runtime::default_runtime)
        .clone()
}

/// Only sends on channels: the handler runs on the connection's own task and must never hold
/// the connection (that would be a reference cycle).
struct Events {
    gathered: watch::Sender<bool>,
    ice: watch::Sender<RTCIceConnectionState>,
    state: watch::Sender<RTCPeerConnectionState>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Events {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.gathered.send_replace(true);
        }
    }

    async fn on_ice_connection_state_change(&self, state: RTCIceConnectionState) {
        self.ice.send_replace(state);
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        self.state.send_replace(state);
    }
}

fn h264_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: "video/H264".to_owned(),
        clock_rate: 90000,
        channels: 0,
        sdp_fmtp_line: H264_FMTP.to_owned(),
        rtcp_feedback: vec![],
    }
}

/// The payload type the answer uses for H.264 (the offerer's number, e.g. aiortc's 101).
fn negotiated_h264_pt(answer: &str) -> Option<u8> {
    answer.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("a=rtpmap:")?;
        let (pt, codec) = rest.split_once(' ')?;
        codec
            .to_ascii_uppercase()
            .starts_with("H264/90000")
            .then(|| pt.parse().ok())
            .flatten()
    })
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    u32::from_be_bytes(b)
}

fn session_id() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Answers `offer` and starts the viewer in `slot` (given back if this fails); returns the
/// session id and the answer SDP.
pub async fn start(
    stream: Arc<Stream>,
    slot: Slot,
    local: IpAddr,
    offer: String,
) -> Result<(String, String), SessionError> {
    let internal = |e: &dyn std::fmt::Display| SessionError::Internal(e.to_string());
    let runtime = runtime().ok_or_else(|| SessionError::Internal("no WebRTC runtime".into()))?;
    let mut media = MediaEngine::default();
    media
        .register_codec(
            RTCRtpCodecParameters {
                rtp_codec: h264_codec(),
                payload_type: 102,
            },
            RtpCodecKind::Video,
        )
        .map_err(|e| internal(&e))?;
    let registry =
        register_default_interceptors(Registry::new(), &mut media).map_err(|e| internal(&e))?;
    let settings = SettingEngineBuilder::new()
        .with_multicast_dns_mode(MulticastDnsMode::Disabled)
        .with_ice_timeouts(
            Some(ICE_DISCONNECTED),
            Some(ICE_FAILED),
            Some(ICE_KEEPALIVE),
        )
        .build();
    let (gathered_tx, mut gathered) = watch::channel(false);
    let (state_tx, state) = watch::channel(RTCPeerConnectionState::New);
    let (ice_tx, ice) = watch::channel(RTCIceConnectionState::New);
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(media)
        .with_setting_engine(settings)
        .with_interceptor_registry(registry)
        .with_handler(Arc::new(Events {
            gathered: gathered_tx,
            ice: ice_tx,
            state: state_tx,
        }))
        .with_runtime(runtime)
        .with_udp_addrs(vec![std::net::SocketAddr::new(local, 0)])
        .build()
        .await
        .map_err(|e| internal(&e))?;
    let ssrc = random_u32();
    let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        format!("myelin-{}", stream.name),
        format!("video-{}", stream.name),
        format!("{} camera", stream.name),
        RtpCodecKind::Video,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(ssrc),
                ..Default::default()
            },
            codec: h264_codec(),
            ..Default::default()
        }],
    )));
    let answer = async {
        pc.add_track(Arc::clone(&track) as Arc<dyn TrackLocal>)
            .await
            .map_err(|e| internal(&e))?;
        let offer = RTCSessionDescription::offer(offer)
            .map_err(|e| SessionError::BadOffer(e.to_string()))?;
        pc.set_remote_description(offer)
            .await
            .map_err(|e| SessionError::BadOffer(e.to_string()))?;
        let answer = pc
            .create_answer(None)
            .await
            .map_err(|e| SessionError::BadOffer(e.to_string()))?;
        pc.set_local_description(answer)
            .await
            .map_err(|e| internal(&e))?;
        tokio::time::timeout(Duration::from_secs(5), gathered.wait_for(|g| *g))
            .await
            .map_err(|_| SessionError::Internal("ICE gathering did not complete in 5 s".into()))?
            .map_err(|e| internal(&e))?;
        let sdp = pc
            .local_description()
            .await
            .ok_or_else(|| SessionError::Internal("no local description".into()))?
            .sdp;
        let pt = negotiated_h264_pt(&sdp).ok_or_else(|| {
            SessionError::BadOffer("the offer has no H.264 video this server can send".into())
        })?;
        Ok::<_, SessionError>((sdp, pt))
    }
    .await;
    let (sdp, pt) = match answer {
        Ok(a) => a,
        Err(e) => {
            let _ = pc.close().await;
            return Err(e);
        }
    };
    let id = session_id();
    let cancel = myelin_sdk::CancellationToken::new();
    let ice_deadline = slot.taken + ICE_CONNECT;
    let viewer = Viewer {
        cancel: cancel.clone(),
        _slot: slot,
    };
    let inserted = stream
        .viewers
        .lock()
        .map(|mut v| v.insert(id.clone(), viewer))
        .is_ok();
    if !inserted {
        let _ = pc.close().await;
        return Err(SessionError::Internal(
            "the viewer table is poisoned (a viewer task panicked)".into(),
        ));
    }
    let watches = Watches {
        ice,
        state,
        ice_deadline,
    };
    tokio::spawn(run(
        stream,
        pc,
        track,
        ssrc,
        pt,
        id.clone(),
        cancel,
        watches,
    ));
    Ok((id, sdp))
}

/// What a session task watches of its connection.
struct Watches {
    ice: watch::Receiver<RTCIceConnectionState>,
    state: watch::Receiver<RTCPeerConnectionState>,
    ice_deadline: tokio::time::Instant,
}

fn ended(s: &RTCPeerConnectionState) -> bool {
    matches!(
        s,
        RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
    )
}

/// True once the viewer is connected; false if ICE misses its deadline or fails, or DTLS does.
async fn connect(w: &mut Watches) -> bool {
    let ice_up = |s: &RTCIceConnectionState| {
        matches!(
            s,
            RTCIceConnectionState::Connected | RTCIceConnectionState::Completed
        )
    };
    let ice_ended = |s: &RTCIceConnectionState| {
        matches!(
            s,
            RTCIceConnectionState::Failed | RTCIceConnectionState::Closed
        )
    };
    let connected = |s: &RTCPeerConnectionState| *s == RTCPeerConnectionState::Connected;
    let (ice, state) = (&mut w.ice, &mut w.state);
    let ice = tokio::time::timeout_at(w.ice_deadline, async {
        tokio::select! {
            r = ice.wait_for(|s| ice_up(s) || ice_ended(s)) => r.is_ok_and(|s| ice_up(&s)),
            r = state.wait_for(|s| connected(s) || ended(s)) => r.is_ok_and(|s| connected(&s)),
        }
    })
    .await;
    if !matches!(ice, Ok(true)) {
        return false;
    }
    let dtls =
        tokio::time::timeout(DTLS_CONNECT, w.state.wait_for(|s| connected(s) || ended(s))).await;
    dtls.is_ok_and(|r| r.is_ok_and(|s| connected(&s)))
}

#[allow(clippy::too_many_arguments)]
async fn run(
    stream: Arc<Stream>,
    pc: impl PeerConnection,
    track: Arc<TrackLocalStaticRTP>,
    ssrc: u32,
    pt: u8,
    id: String,
    cancel: myelin_sdk::CancellationToken,
    mut watches: Watches,
) {
    let connected = tokio::select! {
        _ = cancel.cancelled() => false,
        c = connect(&mut watches) => c,
    };
    let mut state = watches.state;
    if connected {
        // RTCP from the viewer (receiver reports, PLI) must be drained.
        let rtcp = track.clone();
        let rtcp_cancel = cancel.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = rtcp_cancel.cancelled() => return,
                    e = rtcp.poll() => if e.is_none() { return },
                }
            }
        });
        forward(&stream, &track, ssrc, pt, &cancel, &mut state, ended).await;
    }
    // Frees the slot before the (slower) close.
    let viewer = stream.viewers.lock().ok().and_then(|mut v| v.remove(&id));
    drop(viewer);
    cancel.cancel();
    let _ = pc.close().await;
}

async fn forward(
    stream: &Stream,
    track: &TrackLocalStaticRTP,
    ssrc: u32,
    pt: u8,
    cancel: &myelin_sdk::CancellationToken,
    state: &mut watch::Receiver<RTCPeerConnectionState>,
    ended: impl Fn(&RTCPeerConnectionState) -> bool,
) {
    let labels = [("stream", stream.name.as_str())];
    let frames = stream
        .metrics
        .counter_with("myelin_webrtc_frames_sent_total", &labels);
    let bytes = stream
        .metrics
        .counter_with("myelin_webrtc_bytes_sent_total", &labels);
    let dropped = stream
        .metrics
        .counter_with("myelin_webrtc_rtp_dropped_total", &labels);
    let waits = stream
        .metrics
        .counter_with("myelin_webrtc_keyframe_waits_total", &labels);
    // Subscribe before reading the cache, so nothing falls between the two.
    let mut live = stream.tx.subscribe();
    let cached = stream
        .cache
        .lock()
        .map(|c| c.snapshot())
        .unwrap_or_default();
    let mut seq = random_u32() as u16;
    let mut last = None;
    let mut waiting_keyframe = cached.is_empty();
    if waiting_keyframe {
        waits.increment(1);
        stream
            .counters
            .keyframe_waits
            .fetch_add(1, Ordering::Relaxed);
    }
    // Each viewer gets the shared packet with its own SSRC, payload type and sequence number.
    let send = |p: &Ingested, seq: u16| {
        let mut packet = p.packet.clone();
        packet.header.ssrc = ssrc;
        packet.header.payload_type = pt;
        packet.header.sequence_number = seq;
        (packet, p.len, p.packet.header.marker)
    };
    for p in &cached {
        let (packet, len, marker) = send(p, seq);
        seq = seq.wrapping_add(1);
        if track.write_rtp(packet).await.is_err() {
            return;
        }
        account(stream, &frames, &bytes, len, marker);
        last = Some(p.index);
    }
    loop {
        let p = tokio::select! {
            _ = cancel.cancelled() => return,
            changed = state.changed() => {
                if changed.is_err() || ended(&state.borrow_and_update()) { return }
                continue;
            }
            r = live.recv() => match r {
                Ok(p) => p,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // This viewer fell behind; the others never wait for it. Resume at the
                    // next keyframe so it never decodes a picture with parts missing.
                    dropped.increment(n);
                    stream.counters.dropped.fetch_add(n, Ordering::Relaxed);
                    if !waiting_keyframe {
                        waits.increment(1);
                        stream.counters.keyframe_waits.fetch_add(1, Ordering::Relaxed);
                    }
                    waiting_keyframe = true;
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if last.is_some_and(|l| p.index <= l) {
            continue;
        }
        if waiting_keyframe {
            if !p.keyframe_start {
                continue;
            }
            waiting_keyframe = false;
        }
        let (packet, len, marker) = send(&p, seq);
        seq = seq.wrapping_add(1);
        // write_rtp returns Ok even for packets dropped later; an error means the session
        // is gone (close() emits no Closed event).
        if track.write_rtp(packet).await.is_err() {
            return;
        }
        account(stream, &frames, &bytes, len, marker);
        last = Some(p.index);
    }
}

fn account(
    stream: &Stream,
    frames: &myelin_sdk::metrics::Counter,
    bytes: &myelin_sdk::metrics::Counter,
    len: usize,
    marker: bool,
) {
    bytes.increment(len as u64);
    stream
        .counters
        .bytes_sent
        .fetch_add(len as u64, Ordering::Relaxed);
    if marker {
        frames.increment(1);
        stream.counters.frames_sent.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_names_the_negotiated_payload_type() {
        let sdp = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 101\r\na=rtpmap:101 H264/90000\r\na=fmtp:101 packetization-mode=1\r\n";
        assert_eq!(negotiated_h264_pt(sdp), Some(101));
        assert_eq!(negotiated_h264_pt("a=rtpmap:96 VP8/90000\r\n"), None);
    }
}
