//! A loaded model, whatever the backend: its inputs with the fixed shapes callers must send, its
//! outputs, and `run`. Loading checks the file and reconciles the model's declared shapes with
//! the config; running checks every input before the backend sees it, so bad input is an error
//! value with a message, never a backend crash.

use crate::config::{BackendKind, ModelConfig};
use crate::tensor::{DType, Tensor};
use serde::Serialize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model \"{model}\": {path}: {cause}")]
    File {
        model: String,
        path: String,
        cause: String,
    },
    #[error("model \"{model}\": {path} is not an ONNX model ({cause}); export it with torch.onnx.export or tf2onnx")]
    NotOnnx {
        model: String,
        path: String,
        cause: String,
    },
    #[error("model \"{model}\": {message}")]
    Shape { model: String, message: String },
    #[error("model \"{model}\": {backend} cannot run it: {message}")]
    Unsupported {
        model: String,
        backend: &'static str,
        message: String,
    },
    #[error("{0}")]
    Backend(String),
    /// The caller's input is wrong (HTTP 400/415).
    #[error("{0}")]
    Input(String),
}

/// One input as the model takes it.
#[derive(Clone, Debug, Serialize)]
pub struct InputInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// One output as the file declares it (`None`: decided when it runs).
#[derive(Clone, Debug, Serialize)]
pub struct OutputInfo {
    pub name: String,
    pub dtype: Option<DType>,
    pub shape: Vec<Option<usize>>,
}

/// What a backend found in the file before shapes were fixed.
#[derive(Clone, Debug)]
pub struct DeclaredInput {
    pub name: String,
    pub dtype: Option<DType>,
    /// `None` for a dynamic dimension.
    pub dims: Vec<Option<usize>>,
}

pub trait Engine: Send {
    /// `inputs` are in model order and already match [`InputInfo`].
    fn run(&mut self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, ModelError>;
}

pub struct Model {
    pub config: ModelConfig,
    pub backend: BackendKind,
    /// The execution provider that runs it (onnxruntime), or "cpu".
    pub provider: String,
    pub inputs: Vec<InputInfo>,
    pub outputs: Vec<OutputInfo>,
    engine: Mutex<Box<dyn Engine>>,
    timings: Mutex<Timings>,
    /// `myelin_ai_inferences_total` and `myelin_ai_inference_seconds`, once the plugin runs.
    pub metrics:
        std::sync::OnceLock<(myelin_sdk::metrics::Counter, myelin_sdk::metrics::Histogram)>,
}

/// The last inference times, for the status page and the panel.
#[derive(Default)]
struct Timings {
    recent: std::collections::VecDeque<Duration>,
    runs: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelSummary {
    pub name: String,
    pub backend: &'static str,
    pub provider: String,
    pub path: String,
    pub inputs: Vec<InputInfo>,
    pub outputs: Vec<OutputInfo>,
    pub runs: u64,
    pub median_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Model {
    pub fn new(
        config: ModelConfig,
        backend: BackendKind,
        provider: String,
        inputs: Vec<InputInfo>,
        outputs: Vec<OutputInfo>,
        engine: Box<dyn Engine>,
    ) -> Model {
        Model {
            config,
            backend,
            provider,
            inputs,
            outputs,
            engine: Mutex::new(engine),
            timings: Mutex::new(Timings::default()),
            metrics: std::sync::OnceLock::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// One run on zeros at load, so the first real frame is not the slow one and a model that
    /// loads but cannot run fails at start. Not counted in the timings.
    pub fn warm_up(&self) -> Result<(), ModelError> {
        let zeros = self
            .inputs
            .iter()
            .map(|i| {
                let n = crate::tensor::element_count(&i.shape)
                    .map_err(|e| ModelError::Backend(e.to_string()))?;
                let data = match i.dtype {
                    DType::Float32 => crate::tensor::Data::F32(vec![0.0; n]),
                    DType::Int64 => crate::tensor::Data::I64(vec![0; n]),
                    DType::Int32 => crate::tensor::Data::I32(vec![0; n]),
                    DType::Uint8 => crate::tensor::Data::U8(vec![0; n]),
                };
                Tensor::new(i.shape.clone(), data).map_err(|e| ModelError::Backend(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut engine = self.engine.lock().map_err(|_| {
            ModelError::Backend("the model's engine was poisoned by an earlier panic; restart the plugin (POST /api/v1/plugins/<instance>/restart)".into())
        })?;
        engine
            .run(zeros)
            .map(|_| ())
            .map_err(|e| ModelError::Unsupported {
                model: self.config.name.clone(),
                backend: self.backend.name(),
                message: format!("a first run on zeros failed: {e}"),
            })
    }

    /// Runs the model on named inputs (`None` name: the next input in order). Blocking.
    pub fn run(
        &self,
        given: Vec<(Option<String>, Tensor)>,
    ) -> Result<Vec<(String, Tensor)>, ModelError> {
        let ordered = self.order_inputs(given)?;
        let start = Instant::now();
        let outputs = {
            let mut engine = self.engine.lock().map_err(|_| {
                ModelError::Backend("the model's engine was poisoned by an earlier panic; restart the plugin (POST /api/v1/plugins/<instance>/restart)".into())
            })?;
            engine.run(ordered)?
        };
        let took = start.elapsed();
        if let Some((count, seconds)) = self.metrics.get() {
            count.increment(1);
            seconds.record(took.as_secs_f64());
        }
        if let Ok(mut t) = self.timings.lock() {
            t.runs += 1;
            t.recent.push_back(took);
            if t.recent.len() > 200 {
                t.recent.pop_front();
            }
        }
        Ok(self
            .outputs
            .iter()
            .map(|o| o.name.clone())
            .zip(outputs)
            .collect())
    }

    fn order_inputs(
        &self,
        given: Vec<(Option<String>, Tensor)>,
    ) -> Result<Vec<Tensor>, ModelError> {
        let mut slots: Vec<Option<Tensor>> = vec![None; self.inputs.len()];
        let mut next = 0;
        for (name, tensor) in given {
            let i = match name {
                Some(n) => self
                    .inputs
                    .iter()
                    .position(|i| i.name == n)
                    .ok_or_else(|| {
                        ModelError::Input(format!(
                            "model \"{}\" has no input \"{n}\"; its inputs are {}",
                            self.name(),
                            self.describe_inputs()
                        ))
                    })?,
                None => {
                    while next < slots.len() && slots[next].is_some() {
                        next += 1;
                    }
                    next
                }
            };
            let Some(slot) = slots.get_mut(i) else {
                return Err(ModelError::Input(format!(
                    "model \"{}\" takes {} input(s): {}",
                    self.name(),
                    self.inputs.len(),
                    self.describe_inputs()
                )));
            };
            let info = &self.inputs[i];
            if tensor.dtype() != info.dtype {
                return Err(ModelError::Input(format!(
                    "input \"{}\" of model \"{}\" is {}, not {}; convert it (numpy: .astype(numpy.{}))",
                    info.name,
                    self.name(),
                    info.dtype.name(),
                    tensor.dtype().name(),
                    info.dtype.name()
                )));
            }
            if tensor.shape != info.shape {
                return Err(ModelError::Input(format!(
                    "input \"{}\" of model \"{}\" has shape {:?}, not {:?} (the shape is fixed in the config)",
                    info.name,
                    self.name(),
                    info.shape,
                    tensor.shape
                )));
            }
            *slot = Some(tensor);
        }
        slots
            .into_iter()
            .zip(&self.inputs)
            .map(|(t, info)| {
                t.ok_or_else(|| {
                    ModelError::Input(format!(
                        "input \"{}\" of model \"{}\" is missing; send all of {} (an .npz names each)",
                        info.name,
                        self.name(),
                        self.describe_inputs()
                    ))
                })
            })
            .collect()
    }

    pub fn describe_inputs(&self) -> String {
        self.inputs
            .iter()
            .map(|i| format!("{} {} {:?}", i.name, i.dtype.name(), i.shape))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn summary(&self) -> ModelSummary {
        let (runs, median_ms, p99_ms) = match self.timings.lock() {
            Ok(t) => {
                let mut v: Vec<f64> = t.recent.iter().map(|d| d.as_secs_f64() * 1e3).collect();
                v.sort_by(f64::total_cmp);
                let at = |q: f64| {
                    v.get(((v.len() as f64 - 1.0) * q).round() as usize)
                        .copied()
                };
                (t.runs, at(0.5), at(0.99))
            }
            Err(_) => (0, None, None),
        };
        ModelSummary {
            name: self.config.name.clone(),
            backend: self.backend.name(),
            provider: self.provider.clone(),
            path: self.config.path.display().to_string(),
            inputs: self.inputs.clone(),
            outputs: self.outputs.clone(),
            runs,
            median_ms,
            p99_ms,
        }
    }
}

/// Reads the model file, with the errors a user can act on.
pub fn read_model_file(config: &ModelConfig) -> Result<Vec<u8>, ModelError> {
    let path = config.path.display().to_string();
    let bytes = std::fs::read(&config.path).map_err(|e| ModelError::File {
        model: config.name.clone(),
        path: path.clone(),
        cause: if e.kind() == std::io::ErrorKind::NotFound {
            "no such file; check [[plugins.ai.models]] path".into()
        } else {
            e.to_string()
        },
    })?;
    // An ONNX file is a protobuf ModelProto: it starts with field 1 (ir_version, varint, tag
    // 0x08). Anything else (an HTML error page, a .pt, a truncated download) stops here.
    if bytes.first() != Some(&0x08) || bytes.len() < 16 {
        return Err(ModelError::NotOnnx {
            model: config.name.clone(),
            path,
            cause: "it does not start like an ONNX ModelProto".into(),
        });
    }
    Ok(bytes)
}

/// The fixed shape of every input: the model's own dims where fixed, the config's where not.
pub fn fix_shapes(
    config: &ModelConfig,
    declared: &[DeclaredInput],
) -> Result<Vec<Vec<usize>>, ModelError> {
    let shape_err = |message: String| ModelError::Shape {
        model: config.name.clone(),
        message,
    };
    for name in config.input_shapes.keys() {
        if !declared.iter().any(|d| &d.name == name) {
            return Err(shape_err(format!(
                "input_shapes.{name}: the model has no input \"{name}\"; its inputs are {}",
                declared
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let show = |dims: &[Option<usize>]| {
        let d: Vec<String> = dims
            .iter()
            .map(|d| d.map_or("?".to_string(), |v| v.to_string()))
            .collect();
        format!("[{}]", d.join(", "))
    };
    declared
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let configured = config
                .input_shapes
                .get(&d.name)
                .or(if i == 0 { config.input_shape.as_ref() } else { None });
            match configured {
                Some(shape) => {
                    let key = if i == 0 && config.input_shape.is_some() {
                        "input_shape".to_string()
                    } else {
                        format!("input_shapes.{}", d.name)
                    };
                    if shape.len() != d.dims.len() {
                        return Err(shape_err(format!(
                            "{key} = {shape:?} has {} dimensions but input \"{}\" is {} in the file",
                            shape.len(),
                            d.name,
                            show(&d.dims)
                        )));
                    }
                    for (axis, (want, have)) in shape.iter().zip(&d.dims).enumerate() {
                        if let Some(have) = have {
                            if have != want {
                                return Err(shape_err(format!(
                                    "{key} = {shape:?} does not fit input \"{}\" = {} in the file: dimension {axis} is fixed to {have}",
                                    d.name,
                                    show(&d.dims)
                                )));
                            }
                        }
                    }
                    Ok(shape.clone())
                }
                None => d.dims.iter().copied().collect::<Option<Vec<usize>>>().ok_or_else(|| {
                    shape_err(format!(
                        "input \"{}\" has open dimensions {} in the file; fix them in the config, e.g. {} = {}",
                        d.name,
                        show(&d.dims),
                        if i == 0 { "input_shape".to_string() } else { format!("input_shapes.{}", d.name) },
                        show(&d.dims).replace('?', "1")
                    ))
                }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(input_shape: Option<Vec<usize>>) -> ModelConfig {
        ModelConfig {
            name: "det".into(),
            path: "/nonexistent/det.onnx".into(),
            input_shape,
            input_shapes: Default::default(),
            image: None,
            top_k: None,
            labels: vec![],
        }
    }

    fn declared(dims: Vec<Option<usize>>) -> Vec<DeclaredInput> {
        vec![DeclaredInput {
            name: "x".into(),
            dtype: Some(DType::Float32),
            dims,
        }]
    }

    #[test]
    fn config_fills_open_dims_and_must_agree_with_fixed_ones() {
        let d = declared(vec![None, Some(3), None, None]);
        assert_eq!(
            fix_shapes(&model(Some(vec![1, 3, 480, 640])), &d).unwrap(),
            vec![vec![1, 3, 480, 640]]
        );
        let e = fix_shapes(&model(Some(vec![1, 4, 480, 640])), &d)
            .unwrap_err()
            .to_string();
        assert!(e.contains("dimension 1 is fixed to 3"), "{e}");
        let e = fix_shapes(&model(Some(vec![1, 3, 480])), &d)
            .unwrap_err()
            .to_string();
        assert!(e.contains("has 3 dimensions"), "{e}");
        let e = fix_shapes(&model(None), &d).unwrap_err().to_string();
        assert!(
            e.contains("open dimensions [?, 3, ?, ?]") && e.contains("input_shape = [1, 3, 1, 1]"),
            "{e}"
        );
        assert_eq!(
            fix_shapes(&model(None), &declared(vec![Some(1), Some(576)])).unwrap(),
            vec![vec![1, 576]]
        );
    }

    #[test]
    fn missing_and_non_onnx_files_are_named() {
        let e = read_model_file(&model(None)).unwrap_err().to_string();
        assert!(
            e.contains("/nonexistent/det.onnx") && e.contains("no such file"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("myelin-ai-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("page.onnx");
        std::fs::write(&p, b"<html>404 Not Found</html>").unwrap();
        let mut m = model(None);
        m.path = p;
        let e = read_model_file(&m).unwrap_err().to_string();
        assert!(e.contains("is not an ONNX model"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
