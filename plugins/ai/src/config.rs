//! The `[plugins.ai]` section: backend, models with their fixed shapes and image preprocessing,
//! and gateway pipelines. Everything that can be checked without loading a model is checked
//! here, with the key and the fix in the message.

use myelin_sdk::PluginError;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Tract,
    Onnxruntime,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Tract => "tract",
            BackendKind::Onnxruntime => "onnxruntime",
        }
    }

    pub fn compiled(self) -> bool {
        match self {
            BackendKind::Tract => cfg!(feature = "tract"),
            BackendKind::Onnxruntime => cfg!(feature = "onnxruntime"),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AiConfig {
    /// Default: tract when compiled in, else onnxruntime.
    pub backend: Option<BackendKind>,
    /// ONNX Runtime's shared library; else `ORT_DYLIB_PATH`.
    #[cfg_attr(not(feature = "onnxruntime"), allow(dead_code))]
    pub library: Option<PathBuf>,
    /// Tried in order; `cpu` is always the last resort.
    #[serde(default = "default_providers")]
    pub execution_providers: Vec<String>,
    /// Cores for one inference; 0: every core (tract) or ONNX Runtime's default.
    #[serde(default)]
    pub threads: usize,
    /// Key prefix of results: `<namespace>/ai/<model>` (default: the node's name).
    pub namespace: Option<String>,
    /// The zenoh plugin's router on loopback.
    #[serde(default = "default_zenoh_port")]
    pub zenoh_port: u16,
    /// What one request or frame may decode to: all arrays of an `.npz` together, or an
    /// image's pixels while decoding and resizing. Beyond it the request gets HTTP 413.
    #[serde(default = "default_max_decoded_mib")]
    pub max_decoded_mib: usize,
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    #[serde(default)]
    pub pipelines: Vec<PipelineConfig>,
}

fn default_providers() -> Vec<String> {
    vec!["cpu".into()]
}
fn default_zenoh_port() -> u16 {
    7447
}
fn default_max_decoded_mib() -> usize {
    crate::tensor::DEFAULT_MAX_DECODED_BYTES >> 20
}
/// 64 GiB: beyond any gateway's memory, and far from overflowing as bytes.
const MAX_DECODED_MIB: usize = 64 * 1024;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    pub path: PathBuf,
    /// The first input's shape; fixed (tract needs it, and it checks what callers send).
    pub input_shape: Option<Vec<usize>>,
    /// Shapes of further inputs, by input name.
    #[serde(default)]
    pub input_shapes: BTreeMap<String, Vec<usize>>,
    /// Preprocessing when the first input is fed an image.
    pub image: Option<ImageConfig>,
    /// Summarise the first output as the best `top_k` classes.
    pub top_k: Option<usize>,
    /// Class names for `top_k`, by index.
    #[serde(default)]
    pub labels: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Channels {
    #[default]
    Rgb,
    Bgr,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    #[default]
    Nchw,
    Nhwc,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// [width, height]; default: the input shape's.
    pub resize: Option<[u32; 2]>,
    #[serde(default = "default_mean")]
    pub mean: [f32; 3],
    #[serde(default = "default_std")]
    pub std: [f32; 3],
    /// Pixel values are multiplied by this before `mean` and `std` (default 1/255).
    #[serde(default = "default_scale")]
    pub scale: f32,
    #[serde(default)]
    pub channels: Channels,
    #[serde(default)]
    pub layout: Layout,
}

fn default_mean() -> [f32; 3] {
    [0.0; 3]
}
fn default_std() -> [f32; 3] {
    [1.0; 3]
}
fn default_scale() -> f32 {
    1.0 / 255.0
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FrameFormat {
    /// JPEG or PNG bytes, or a `sensor_msgs/CompressedImage` in CDR (what the ROS bridge sends).
    #[default]
    Auto,
    Image,
    CompressedImage,
    Npy,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub model: String,
    /// The zenoh key (expression) frames arrive on, e.g. "robot1/camera/front/compressed".
    pub key: String,
    #[serde(default)]
    pub format: FrameFormat,
    /// At most this many inferences per second; newer frames replace waiting ones.
    #[serde(default = "default_rate")]
    pub max_rate_hz: f64,
    /// A frame older than this when its turn comes is dropped as stale.
    #[serde(default = "default_max_age")]
    #[cfg_attr(not(feature = "zenoh"), allow(dead_code))]
    pub max_age_ms: u64,
    /// Default `<namespace>/ai/<model>`.
    pub results_key: Option<String>,
    pub forward_when: Option<ForwardWhen>,
    /// Default `<results_key>/frames`.
    pub forward_key: Option<String>,
}

fn default_rate() -> f64 {
    10.0
}
fn default_max_age() -> u64 {
    1000
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reduce {
    #[default]
    Max,
    Mean,
    Min,
}

/// Forward the input frame only when this output crosses the threshold.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardWhen {
    /// Output name; default the model's first output.
    pub output: Option<String>,
    /// Compare this element (row-major index) instead of a reduction.
    pub index: Option<usize>,
    #[serde(default)]
    pub reduce: Reduce,
    pub above: Option<f64>,
    pub below: Option<f64>,
}

fn err(message: impl Into<String>) -> PluginError {
    PluginError::Config {
        message: message.into(),
    }
}

pub const PROVIDERS: [&str; 3] = ["tensorrt", "cuda", "cpu"];

impl AiConfig {
    pub fn parse(section: &myelin_sdk::toml::Table) -> Result<AiConfig, PluginError> {
        let c: AiConfig = myelin_sdk::parse_section(section)?;
        let backend = c.backend();
        if !backend.compiled() {
            let feature = match backend {
                BackendKind::Tract => "ai",
                BackendKind::Onnxruntime => "ai-onnxruntime",
            };
            return Err(err(format!(
                "backend = \"{}\" is not in this binary: build with --features {feature}, or choose backend = \"{}\"",
                backend.name(),
                match backend {
                    BackendKind::Tract => "onnxruntime",
                    BackendKind::Onnxruntime => "tract",
                }
            )));
        }
        for p in &c.execution_providers {
            if !PROVIDERS.contains(&p.as_str()) {
                return Err(err(format!(
                    "execution_providers: \"{p}\" is unknown; use any of {PROVIDERS:?} in order of preference"
                )));
            }
        }
        if backend == BackendKind::Tract && c.execution_providers.iter().any(|p| p != "cpu") {
            return Err(err(
                "execution_providers other than \"cpu\" need backend = \"onnxruntime\" (tract runs on the CPU)",
            ));
        }
        if c.models.is_empty() {
            return Err(err(
                "no models: add [[plugins.ai.models]] with name, path and input_shape",
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, m) in c.models.iter().enumerate() {
            m.check(i)?;
            if !names.insert(m.name.as_str()) {
                return Err(err(format!(
                    "models[{i}]: the name \"{}\" is used twice; model names must be unique",
                    m.name
                )));
            }
        }
        for (i, p) in c.pipelines.iter().enumerate() {
            let Some(model) = c.models.iter().find(|m| m.name == p.model) else {
                return Err(err(format!(
                    "pipelines[{i}]: model \"{}\" is not among the models ({})",
                    p.model,
                    c.models
                        .iter()
                        .map(|m| m.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            p.check(i, model)?;
        }
        if !c.pipelines.is_empty() && !cfg!(feature = "zenoh") {
            return Err(err(
                "pipelines subscribe and publish through robotics mode, which this binary was built without; build with --features zenoh",
            ));
        }
        if let Some(ns) = &c.namespace {
            check_key("namespace", ns.trim_start_matches('/'))?;
        }
        if !(1..=MAX_DECODED_MIB).contains(&c.max_decoded_mib) {
            return Err(err(format!(
                "max_decoded_mib = {} must be from 1 to {MAX_DECODED_MIB} (MiB; default {})",
                c.max_decoded_mib,
                default_max_decoded_mib()
            )));
        }
        Ok(c)
    }

    /// `max_decoded_mib` in bytes.
    pub fn max_decoded_bytes(&self) -> usize {
        self.max_decoded_mib.saturating_mul(1 << 20)
    }

    pub fn backend(&self) -> BackendKind {
        self.backend.unwrap_or(if cfg!(feature = "tract") {
            BackendKind::Tract
        } else {
            BackendKind::Onnxruntime
        })
    }
}

fn check_key(what: &str, key: &str) -> Result<(), PluginError> {
    if key.is_empty()
        || key.starts_with('/')
        || key.ends_with('/')
        || key.contains("//")
        || key.contains(['#', '?', '$'])
    {
        return Err(err(format!(
            "{what} = \"{key}\" is not a zenoh key: use segments separated by '/', e.g. \"robot1/camera/front\""
        )));
    }
    Ok(())
}

impl ModelConfig {
    fn check(&self, i: usize) -> Result<(), PluginError> {
        let n = &self.name;
        if n.is_empty()
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(err(format!(
                "models[{i}]: name \"{n}\" must be letters, digits, '_' or '-' (it is part of URLs and zenoh keys)"
            )));
        }
        if let Some(s) = &self.input_shape {
            if s.is_empty() || s.contains(&0) {
                return Err(err(format!(
                    "models[{i}] ({n}): input_shape {s:?} must be non-empty sizes of at least 1"
                )));
            }
        }
        for (input, s) in &self.input_shapes {
            if s.contains(&0) {
                return Err(err(format!(
                    "models[{i}] ({n}): input_shapes.{input} {s:?} has a 0 size"
                )));
            }
        }
        if let Some(img) = &self.image {
            let Some(shape) = &self.input_shape else {
                return Err(err(format!(
                    "models[{i}] ({n}): [image] needs input_shape, e.g. input_shape = [1, 3, 224, 224]"
                )));
            };
            let (h, w) = image_dims(shape, img.layout).ok_or_else(|| {
                err(format!(
                    "models[{i}] ({n}): an image input needs a 4-D input_shape with 3 channels ({} layout), not {shape:?}",
                    match img.layout { Layout::Nchw => "[1, 3, H, W]", Layout::Nhwc => "[1, H, W, 3]" }
                ))
            })?;
            if let Some([rw, rh]) = img.resize {
                if (rw as usize, rh as usize) != (w, h) {
                    return Err(err(format!(
                        "models[{i}] ({n}): image.resize = [{rw}, {rh}] does not match input_shape {shape:?} (width {w}, height {h})"
                    )));
                }
            }
            if img.std.contains(&0.0) || !img.scale.is_finite() {
                return Err(err(format!(
                    "models[{i}] ({n}): image.std must not contain 0 and image.scale must be finite"
                )));
            }
        }
        if self.top_k == Some(0) {
            return Err(err(format!("models[{i}] ({n}): top_k must be at least 1")));
        }
        Ok(())
    }
}

/// (height, width) of an image input shape, if it is one.
pub fn image_dims(shape: &[usize], layout: Layout) -> Option<(usize, usize)> {
    match (layout, shape) {
        (Layout::Nchw, [1, 3, h, w]) | (Layout::Nhwc, [1, h, w, 3]) => Some((*h, *w)),
        _ => None,
    }
}

impl PipelineConfig {
    fn check(&self, i: usize, model: &ModelConfig) -> Result<(), PluginError> {
        check_key(&format!("pipelines[{i}].key"), &self.key)?;
        if let Some(k) = &self.results_key {
            check_key(&format!("pipelines[{i}].results_key"), k)?;
        }
        if let Some(k) = &self.forward_key {
            check_key(&format!("pipelines[{i}].forward_key"), k)?;
        }
        if !(self.max_rate_hz.is_finite() && self.max_rate_hz > 0.0 && self.max_rate_hz <= 1000.0) {
            return Err(err(format!(
                "pipelines[{i}].max_rate_hz = {} must be above 0 and at most 1000",
                self.max_rate_hz
            )));
        }
        if self.format != FrameFormat::Npy && model.image.is_none() {
            return Err(err(format!(
                "pipelines[{i}]: model \"{}\" has no [image] section, so it cannot take camera frames; add [plugins.ai.models.image] or set format = \"npy\"",
                model.name
            )));
        }
        if let Some(f) = &self.forward_when {
            if f.above.is_some() == f.below.is_some() {
                return Err(err(format!(
                    "pipelines[{i}].forward_when needs exactly one of above or below, e.g. {{ reduce = \"max\", above = 0.5 }}"
                )));
            }
            if f.above.is_some_and(|v| !v.is_finite()) || f.below.is_some_and(|v| !v.is_finite()) {
                return Err(err(format!(
                    "pipelines[{i}].forward_when: the threshold must be a finite number"
                )));
            }
        } else if self.forward_key.is_some() {
            return Err(err(format!(
                "pipelines[{i}]: forward_key without forward_when forwards nothing; add forward_when"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AiConfig, PluginError> {
        AiConfig::parse(&myelin_sdk::toml::from_str(text).unwrap())
    }

    fn message(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    const MODEL: &str = "[[models]]\nname = \"det\"\npath = \"/m/det.onnx\"\ninput_shape = [1, 3, 480, 640]\n[models.image]\nresize = [640, 480]\nmean = [0.485, 0.456, 0.406]\nstd = [0.229, 0.224, 0.225]\n";

    #[test]
    fn the_issue_example_parses() {
        let c = parse(MODEL).unwrap();
        assert_eq!(c.models[0].input_shape, Some(vec![1, 3, 480, 640]));
        assert_eq!(c.execution_providers, vec!["cpu"]);
    }

    #[test]
    fn errors_name_the_key_and_the_fix() {
        assert!(message("").contains("no models"));
        assert!(message(&MODEL.replace("[640, 480]", "[480, 640]"))
            .contains("does not match input_shape"));
        assert!(
            message(&format!("execution_providers = [\"gpu\"]\n{MODEL}"))
                .contains("\"gpu\" is unknown")
        );
        assert!(message(&format!(
            "{MODEL}[[pipelines]]\nmodel = \"nope\"\nkey = \"robot1/cam\"\n"
        ))
        .contains("not among the models (det)"));
        assert!(message(&format!(
            "{MODEL}[[pipelines]]\nmodel = \"det\"\nkey = \"/robot1/cam\"\n"
        ))
        .contains("not a zenoh key"));
        assert!(message(&format!("{MODEL}[[pipelines]]\nmodel = \"det\"\nkey = \"r/c\"\nforward_when = {{ above = 1, below = 2 }}\n")).contains("exactly one of above or below"));
        assert!(message(&format!(
            "{MODEL}[[models]]\nname = \"det\"\npath = \"x\"\n"
        ))
        .contains("used twice"));
        assert!(
            message(&MODEL.replace("name = \"det\"", "name = \"a b\"")).contains("letters, digits")
        );
        assert!(message(&format!("{MODEL}bogus = 1\n")).contains("bogus"));
        assert!(message(&format!("max_decoded_mib = 0\n{MODEL}")).contains("max_decoded_mib"));
    }

    #[test]
    fn decoded_size_limit_defaults_to_64_mib() {
        assert_eq!(parse(MODEL).unwrap().max_decoded_bytes(), 64 << 20);
        let c = parse(&format!("max_decoded_mib = 256\n{MODEL}")).unwrap();
        assert_eq!(c.max_decoded_bytes(), 256 << 20);
    }

    #[test]
    fn image_inputs_need_an_image_shape() {
        let m =
            "[[models]]\nname = \"v\"\npath = \"v.onnx\"\ninput_shape = [1, 576]\n[models.image]\n";
        assert!(message(m).contains("4-D input_shape with 3 channels"));
        assert_eq!(
            image_dims(&[1, 224, 224, 3], Layout::Nhwc),
            Some((224, 224))
        );
    }
}
