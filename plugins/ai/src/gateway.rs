//! The gateway pipeline's I/O shell: a zenoh client session to the zenoh plugin's router on
//! loopback. Frames from the camera key go to the [`Pacer`]; each frame it releases runs on a
//! blocking thread; the result is published as JSON on `<ns>/ai/<model>`, and the frame itself
//! on the forward key only when `forward_when` holds. No in-memory handle is shared with the
//! zenoh plugin.

use crate::config::{FrameFormat, PipelineConfig};
use crate::engine::Model;
use crate::frames::{compressed_image_data, image_tensor, is_image};
use crate::pipeline::{crosses, forward_value, Next, Pacer};
use crate::tensor::{output_json, parse_npy, Tensor};
use crate::PipelineStatus;
use myelin_sdk::unix_ms;
use myelin_sdk::{CancellationToken, PluginMetrics};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use zenoh::bytes::Encoding;

struct Frame {
    seq: u64,
    bytes: Vec<u8>,
    encoding: Encoding,
    received_unix_ms: u128,
}

/// Connects (retrying every second), then runs every pipeline until `cancel`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    pipelines: Vec<(PipelineConfig, Arc<Model>, String, Option<String>)>,
    port: u16,
    max_decoded: usize,
    status: Arc<Mutex<Vec<PipelineStatus>>>,
    connected: Arc<std::sync::atomic::AtomicBool>,
    metrics: PluginMetrics,
    cancel: CancellationToken,
) {
    // Every second at first (the zenoh plugin may still be starting), then backing off to 30 s;
    // the first failure and every tenth are logged.
    let mut failures = 0u32;
    let session = loop {
        match myelin_sdk::zenoh_loopback(port).await {
            Ok(s) => break s,
            Err(e) => {
                if failures % 10 == 0 {
                    eprintln!("ai: zenoh router 127.0.0.1:{port}: {e}; retrying (is [plugins.zenoh] enabled?)");
                }
                failures = failures.saturating_add(1);
                let delay = Duration::from_secs(1u64 << failures.saturating_sub(5).min(5))
                    .min(Duration::from_secs(30));
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    connected.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut subscribers = Vec::new();
    for (index, (config, model, results_key, forward_key)) in pipelines.into_iter().enumerate() {
        let pacer = Arc::new(Mutex::new(Pacer::<Frame>::new(
            config.max_rate_hz,
            Duration::from_millis(config.max_age_ms),
        )));
        let wake = Arc::new(Notify::new());
        let labels = [
            ("model", model.name().to_string()),
            ("key", config.key.clone()),
        ];
        let label_refs: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let frames_in = metrics.counter_with("myelin_ai_frames_in_total", &label_refs);
        let (p, w, st) = (pacer.clone(), wake.clone(), status.clone());
        let seq = std::sync::atomic::AtomicU64::new(0);
        let subscriber = session
            .declare_subscriber(config.key.clone())
            .callback(move |sample| {
                let seq = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                frames_in.increment(1);
                let frame = Frame {
                    seq,
                    bytes: sample.payload().to_bytes().into_owned(),
                    encoding: sample.encoding().clone(),
                    received_unix_ms: unix_ms(),
                };
                if let Ok(mut p) = p.lock() {
                    p.offer(frame, Instant::now());
                }
                if let Ok(mut s) = st.lock() {
                    if let Some(s) = s.get_mut(index) {
                        s.frames_in += 1;
                    }
                }
                w.notify_one();
            })
            .await;
        match subscriber {
            Ok(s) => subscribers.push(s),
            Err(e) => {
                note(
                    &status,
                    index,
                    format!("cannot subscribe to {}: {e}", config.key),
                );
                continue;
            }
        }
        eprintln!(
            "ai: pipeline {} -> model {} -> {results_key}{}",
            config.key,
            model.name(),
            forward_key
                .as_ref()
                .map(|k| format!(" (frames forwarded on {k} when forward_when holds)"))
                .unwrap_or_default()
        );
        let worker = Worker {
            index,
            config,
            model,
            results_key,
            forward_key,
            max_decoded,
            session: session.clone(),
            status: status.clone(),
            metrics: metrics.clone(),
            labels: labels.to_vec(),
        };
        tokio::spawn(worker.run(pacer, wake, cancel.clone()));
    }
    cancel.cancelled().await;
    drop(subscribers);
    // The session lives as long as the plugin's process.
    drop(session);
}

fn note(status: &Mutex<Vec<PipelineStatus>>, index: usize, error: String) {
    eprintln!("ai: {error}");
    if let Ok(mut s) = status.lock() {
        if let Some(s) = s.get_mut(index) {
            s.last_error = Some(error);
        }
    }
}

struct Worker {
    index: usize,
    config: PipelineConfig,
    model: Arc<Model>,
    results_key: String,
    forward_key: Option<String>,
    max_decoded: usize,
    session: zenoh::Session,
    status: Arc<Mutex<Vec<PipelineStatus>>>,
    metrics: PluginMetrics,
    labels: Vec<(&'static str, String)>,
}

impl Worker {
    async fn run(
        self,
        pacer: Arc<Mutex<Pacer<Frame>>>,
        wake: Arc<Notify>,
        cancel: CancellationToken,
    ) {
        let labels: Vec<(&str, &str)> = self.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let inferred = self
            .metrics
            .counter_with("myelin_ai_frames_inferred_total", &labels);
        let forwarded = self
            .metrics
            .counter_with("myelin_ai_frames_forwarded_total", &labels);
        let drop_labels = |reason: &'static str| {
            let mut l = labels.clone();
            l.push(("reason", reason));
            self.metrics
                .counter_with("myelin_ai_frames_dropped_total", &l)
        };
        let (dropped_rate, dropped_stale, dropped_bad) = (
            drop_labels("rate"),
            drop_labels("stale"),
            drop_labels("bad_frame"),
        );
        let mut counted = (0u64, 0u64);
        loop {
            let next = match pacer.lock() {
                Ok(mut p) => {
                    let next = p.next(Instant::now());
                    dropped_rate.increment(p.dropped_replaced - counted.0);
                    dropped_stale.increment(p.dropped_stale - counted.1);
                    counted = (p.dropped_replaced, p.dropped_stale);
                    if let Ok(mut s) = self.status.lock() {
                        if let Some(s) = s.get_mut(self.index) {
                            s.dropped_rate = p.dropped_replaced;
                            s.dropped_stale = p.dropped_stale;
                        }
                    }
                    next
                }
                Err(_) => return,
            };
            match next {
                Next::Run(frame) => {
                    let outcome = self.process(frame).await;
                    if let Ok(mut p) = pacer.lock() {
                        p.finished();
                    }
                    match outcome {
                        Ok(true) => {
                            inferred.increment(1);
                            forwarded.increment(1);
                        }
                        Ok(false) => inferred.increment(1),
                        Err(e) => {
                            dropped_bad.increment(1);
                            if let Ok(mut s) = self.status.lock() {
                                if let Some(s) = s.get_mut(self.index) {
                                    s.dropped_bad += 1;
                                }
                            }
                            note(&self.status, self.index, e);
                        }
                    }
                }
                Next::WaitUntil(at) => {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep_until(at.into()) => {}
                        _ = wake.notified() => {}
                    }
                }
                Next::Idle => {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = wake.notified() => {}
                    }
                }
            }
        }
    }

    fn input(&self, frame: &Frame) -> Result<Tensor, String> {
        let info = self.model.inputs.first().ok_or("the model has no inputs")?;
        let image = |bytes: &[u8]| {
            let cfg = self
                .model
                .config
                .image
                .as_ref()
                .ok_or("the model has no [image] section")?;
            image_tensor(bytes, cfg, &info.shape, self.max_decoded).map_err(|e| e.to_string())
        };
        match self.config.format {
            FrameFormat::Npy => parse_npy(&frame.bytes).map_err(|e| e.to_string()),
            FrameFormat::Image => image(&frame.bytes),
            FrameFormat::CompressedImage => {
                image(compressed_image_data(&frame.bytes).map_err(|e| e.to_string())?)
            }
            FrameFormat::Auto if is_image(&frame.bytes) => image(&frame.bytes),
            FrameFormat::Auto => {
                image(compressed_image_data(&frame.bytes).map_err(|e| e.to_string())?)
            }
        }
    }

    /// Infers one frame and publishes; `Ok(true)` when the frame was forwarded.
    async fn process(&self, frame: Frame) -> Result<bool, String> {
        let seq = frame.seq;
        let input = self
            .input(&frame)
            .map_err(|e| format!("frame {seq} on {}: {e}", self.config.key))?;
        let model = self.model.clone();
        let started = Instant::now();
        let outputs = tokio::task::spawn_blocking(move || model.run(vec![(None, input)]))
            .await
            .map_err(|e| format!("inference task: {e}"))?
            .map_err(|e| format!("frame {seq}: {e}"))?;
        let inference_ms = started.elapsed().as_secs_f64() * 1e3;
        let decision = match &self.config.forward_when {
            Some(rule) => {
                let value = forward_value(rule, &outputs)?;
                Some((value, crosses(rule, value)))
            }
            None => None,
        };
        let forward = decision.is_some_and(|(_, f)| f);
        let cfg = &self.model.config;
        let outputs_json: Vec<_> = outputs
            .iter()
            .enumerate()
            .map(|(i, (name, t))| {
                let top_k = if i == 0 { cfg.top_k } else { None };
                output_json(name, t, 16, top_k, &cfg.labels)
            })
            .collect();
        let result = serde_json::json!({
            "model": self.model.name(),
            "seq": seq,
            "received_unix_ms": frame.received_unix_ms as u64,
            "inference_ms": inference_ms,
            "outputs": outputs_json,
            "value": decision.map(|(v, _)| v),
            "forwarded": forward,
        });
        self.session
            .put(self.results_key.clone(), result.to_string())
            .encoding(Encoding::APPLICATION_JSON)
            .congestion_control(zenoh::qos::CongestionControl::Drop)
            .await
            .map_err(|e| format!("publish on {}: {e}", self.results_key))?;
        if forward {
            if let Some(key) = &self.forward_key {
                self.session
                    .put(key.clone(), frame.bytes)
                    .encoding(frame.encoding)
                    .congestion_control(zenoh::qos::CongestionControl::Drop)
                    .await
                    .map_err(|e| format!("forward on {key}: {e}"))?;
            }
        }
        if let Ok(mut s) = self.status.lock() {
            if let Some(s) = s.get_mut(self.index) {
                s.inferred += 1;
                if forward {
                    s.forwarded += 1;
                }
                s.record(Instant::now(), result);
            }
        }
        Ok(forward)
    }
}
