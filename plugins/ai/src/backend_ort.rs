//! The ONNX Runtime backend: the shared library is opened at start-up (`library` or
//! `ORT_DYLIB_PATH`, never downloaded), so one binary serves a Jetson's GPU build of ONNX
//! Runtime and a laptop's CPU one. Execution providers are tried in the configured order; one
//! that cannot register is logged with its reason and the next is tried.

use crate::config::{AiConfig, BackendKind, ModelConfig};
use crate::engine::{
    fix_shapes, read_model_file, DeclaredInput, Engine, InputInfo, Model, ModelError, OutputInfo,
};
use crate::tensor::{DType, Data, Tensor};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{TensorElementType, ValueType};
use std::path::PathBuf;
use std::sync::OnceLock;

static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// Where ONNX Runtime's library is: the config's `library`, else `ORT_DYLIB_PATH`.
pub fn library(config: &AiConfig) -> Result<PathBuf, ModelError> {
    let path = config
        .library
        .clone()
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()).map(PathBuf::from))
        .ok_or_else(|| {
            ModelError::Backend(
                "backend = \"onnxruntime\" needs ONNX Runtime's shared library: set library = \"/path/to/libonnxruntime.so\" in [plugins.ai] or ORT_DYLIB_PATH (pip's onnxruntime wheel has it in onnxruntime/capi/)".into(),
            )
        })?;
    if !path.is_file() {
        return Err(ModelError::Backend(format!(
            "ONNX Runtime library {} does not exist; set library (or ORT_DYLIB_PATH) to libonnxruntime.so",
            path.display()
        )));
    }
    Ok(path)
}

/// Opens the library once per process (plugins run in their own process, so each instance
/// gets its own).
fn environment(config: &AiConfig) -> Result<&'static ort::environment::Environment, ModelError> {
    let path = library(config)?;
    let env = ENVIRONMENT.get_or_init(|| {
        ort::init_from(&path)
            .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", path.display()))?
            .with_name("myelin-ai")
            .build()
            .map_err(|e| format!("ONNX Runtime environment: {e}"))
    });
    env.as_ref().map_err(|e| ModelError::Backend(e.clone()))
}

/// The ONNX Runtime version the loaded library reports.
pub fn version() -> String {
    ort::info()
        .split(',')
        .find_map(|kv| kv.trim().strip_prefix("git-branch="))
        .unwrap_or("unknown")
        .to_string()
}

fn dtype(t: TensorElementType) -> Option<DType> {
    match t {
        TensorElementType::Float32 => Some(DType::Float32),
        TensorElementType::Int64 => Some(DType::Int64),
        TensorElementType::Int32 => Some(DType::Int32),
        TensorElementType::Uint8 => Some(DType::Uint8),
        _ => None,
    }
}

fn dims(shape: &[i64]) -> Vec<Option<usize>> {
    shape.iter().map(|&d| usize::try_from(d).ok()).collect()
}

struct OrtEngine {
    session: Session,
    input_names: Vec<String>,
}

pub fn load(
    ai: &AiConfig,
    config: &ModelConfig,
    log: &dyn Fn(String),
) -> Result<Model, ModelError> {
    let env = environment(ai)?;
    let bytes = read_model_file(config)?;
    let fail = |e: ort::Error| {
        let message = e.to_string();
        if message.contains("Protobuf parsing failed") || message.contains("INVALID_PROTOBUF") {
            ModelError::NotOnnx {
                model: config.name.clone(),
                path: config.path.display().to_string(),
                cause: message,
            }
        } else {
            ModelError::Unsupported {
                model: config.name.clone(),
                backend: "onnxruntime",
                message,
            }
        }
    };
    let mut builder = Session::builder(env)
        .map_err(fail)?
        // `All`, as Python's onnxruntime defaults to; ort's `Level3` is ORT_ENABLE_LAYOUT, which
        // left the CNNs 1.5–1.8× slower than Python here.
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| fail(e.into()))?;
    if ai.threads > 0 {
        builder = builder
            .with_intra_threads(ai.threads)
            .map_err(|e| fail(e.into()))?;
    }
    let mut provider = "cpu".to_string();
    for name in &ai.execution_providers {
        let dispatch = match name.as_str() {
            "tensorrt" => ort::ep::TensorRT::default().build().error_on_failure(),
            "cuda" => ort::ep::CUDA::default().build().error_on_failure(),
            _ => break,
        };
        match dispatch.register(&mut builder) {
            Ok(()) => {
                provider = name.clone();
                break;
            }
            Err(e) => log(format!(
                "model \"{}\": execution provider {name} is unavailable ({e}); trying the next",
                config.name
            )),
        }
    }
    if provider == "cpu" && ai.execution_providers.first().is_some_and(|p| p != "cpu") {
        log(format!(
            "model \"{}\": running on the CPU execution provider",
            config.name
        ));
    }
    let session = builder.commit_from_memory(&bytes).map_err(fail)?;
    let mut declared = Vec::new();
    for i in session.inputs() {
        match i.dtype() {
            ValueType::Tensor { ty, shape, .. } => declared.push(DeclaredInput {
                name: i.name().to_string(),
                dtype: dtype(*ty),
                dims: dims(shape),
            }),
            other => {
                return Err(ModelError::Unsupported {
                    model: config.name.clone(),
                    backend: "onnxruntime",
                    message: format!("input \"{}\" is a {other:?}, not a tensor", i.name()),
                })
            }
        }
    }
    let shapes = fix_shapes(config, &declared)?;
    let mut inputs = Vec::new();
    for (d, shape) in declared.into_iter().zip(shapes) {
        let dtype = d.dtype.ok_or_else(|| ModelError::Unsupported {
            model: config.name.clone(),
            backend: "onnxruntime",
            message: format!(
                "input \"{}\" has an element type Myelin does not feed (float32, int64, int32, uint8)",
                d.name
            ),
        })?;
        inputs.push(InputInfo {
            name: d.name,
            dtype,
            shape,
        });
    }
    let outputs = session
        .outputs()
        .iter()
        .map(|o| match o.dtype() {
            ValueType::Tensor { ty, shape, .. } => OutputInfo {
                name: o.name().to_string(),
                dtype: dtype(*ty),
                shape: dims(shape),
            },
            _ => OutputInfo {
                name: o.name().to_string(),
                dtype: None,
                shape: vec![],
            },
        })
        .collect();
    let input_names = inputs.iter().map(|i| i.name.clone()).collect();
    Ok(Model::new(
        config.clone(),
        BackendKind::Onnxruntime,
        provider,
        inputs,
        outputs,
        Box::new(OrtEngine {
            session,
            input_names,
        }),
    ))
}

impl Engine for OrtEngine {
    fn run(&mut self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, ModelError> {
        let backend = |e: ort::Error| ModelError::Backend(format!("onnxruntime: {e}"));
        let mut values: Vec<(String, ort::value::DynValue)> = Vec::with_capacity(inputs.len());
        for (name, t) in self.input_names.iter().zip(inputs) {
            let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            let value = match t.data {
                Data::F32(v) => ort::value::Tensor::from_array((shape, v)).map(|t| t.into_dyn()),
                Data::I64(v) => ort::value::Tensor::from_array((shape, v)).map(|t| t.into_dyn()),
                Data::I32(v) => ort::value::Tensor::from_array((shape, v)).map(|t| t.into_dyn()),
                Data::U8(v) => ort::value::Tensor::from_array((shape, v)).map(|t| t.into_dyn()),
            }
            .map_err(backend)?;
            values.push((name.clone(), value));
        }
        let outputs = self.session.run(values).map_err(backend)?;
        let mut out = Vec::new();
        for (_, value) in outputs.iter() {
            let ty = match value.dtype() {
                ValueType::Tensor { ty, .. } => *ty,
                other => {
                    return Err(ModelError::Backend(format!(
                        "an output is a {other:?}, not a tensor"
                    )))
                }
            };
            macro_rules! take {
                ($t:ty, $variant:ident) => {{
                    let (shape, data) = value.try_extract_tensor::<$t>().map_err(backend)?;
                    (
                        shape.iter().map(|&d| d.max(0) as usize).collect::<Vec<_>>(),
                        Data::$variant(data.to_vec()),
                    )
                }};
            }
            let (shape, data) = match ty {
                TensorElementType::Float32 => take!(f32, F32),
                TensorElementType::Int64 => take!(i64, I64),
                TensorElementType::Int32 => take!(i32, I32),
                TensorElementType::Uint8 => take!(u8, U8),
                other => {
                    return Err(ModelError::Backend(format!(
                        "an output is {other:?}, which Myelin does not return"
                    )))
                }
            };
            out.push(Tensor::new(shape, data).map_err(|e| ModelError::Backend(e.to_string()))?);
        }
        Ok(out)
    }
}
