//! The tract backend: pure Rust, no shared library, so it goes into the static binary. The
//! input shapes are fixed before tract analyses the graph (open dimensions fail or run several
//! times slower), and the graph is optimised once at load.

use crate::config::{BackendKind, ModelConfig};
use crate::engine::{
    fix_shapes, read_model_file, DeclaredInput, Engine, InputInfo, Model, ModelError, OutputInfo,
};
use crate::tensor::{DType, Data, Tensor};
use std::sync::Arc;
use tract_linalg::multithread::{multithread_tract_scope, Executor};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;
use tract_onnx::tract_hir::internal::DimLike;

struct TractEngine {
    plan: Arc<TypedRunnableModel>,
    executor: Executor,
}

fn dtype(dt: DatumType) -> Option<DType> {
    match dt {
        DatumType::F32 => Some(DType::Float32),
        DatumType::I64 => Some(DType::Int64),
        DatumType::I32 => Some(DType::Int32),
        DatumType::U8 => Some(DType::Uint8),
        _ => None,
    }
}

fn datum(dt: DType) -> DatumType {
    match dt {
        DType::Float32 => DatumType::F32,
        DType::Int64 => DatumType::I64,
        DType::Int32 => DatumType::I32,
        DType::Uint8 => DatumType::U8,
    }
}

/// tract's whole error chain: the node name and op are in the inner causes.
fn chain(e: &TractError) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

fn hint(message: &str) -> &'static str {
    if message.contains("If") {
        " — the graph has a runtime If: use an If-free export of the model (e.g. silero_vad_op18_ifless.onnx) or simplify it with onnxslim / onnxsim with fixed input shapes"
    } else {
        " — fix every input shape in the config (input_shape / input_shapes), or simplify the model with onnxslim; backend = \"onnxruntime\" runs more operators"
    }
}

/// `threads`: cores for one inference (0: all of them).
pub fn load(config: &ModelConfig, threads: usize) -> Result<Model, ModelError> {
    let bytes = read_model_file(config)?;
    // The file's intermediate and output shapes may keep the exporter's symbols (a batch of
    // "DynamicDimension.0") that contradict the fixed input shapes; then only the inputs are
    // taken from the file and tract infers the rest. Some exports need their shapes, so the
    // file as it is comes second.
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let executor = if threads > 1 {
        match rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("tract-{i}"))
            .build()
        {
            Ok(pool) => Executor::MultiThread(Arc::new(pool)),
            Err(e) => {
                eprintln!(
                    "ai: model {}: no {threads}-thread pool ({e}); running on one core",
                    config.name
                );
                Executor::SingleThread
            }
        }
    } else {
        Executor::SingleThread
    };
    match analyse(config, &bytes, true, executor.clone()) {
        Ok(m) => Ok(m),
        Err(first @ ModelError::Unsupported { .. }) => {
            analyse(config, &bytes, false, executor).map_err(|_| first)
        }
        Err(e) => Err(e),
    }
}

fn analyse(
    config: &ModelConfig,
    bytes: &[u8],
    infer_inner_shapes: bool,
    executor: Executor,
) -> Result<Model, ModelError> {
    let unsupported = |message: String| ModelError::Unsupported {
        model: config.name.clone(),
        backend: "tract",
        message: format!("{message}{}", hint(&message)),
    };
    let not_onnx = |e: TractError| ModelError::NotOnnx {
        model: config.name.clone(),
        path: config.path.display().to_string(),
        cause: chain(&e),
    };
    let onnx = tract_onnx::onnx()
        .with_ignore_output_shapes(infer_inner_shapes)
        .with_ignore_value_info(infer_inner_shapes);
    let mut proto = onnx
        .proto_model_for_read(&mut &bytes[..])
        .map_err(not_onnx)?;
    // Some exporters (OpenVINO's, for silero-vad) repeat node names; ONNX does not require them
    // unique, tract does.
    if let Some(graph) = proto.graph.as_mut() {
        let mut seen = std::collections::HashSet::new();
        for (i, node) in graph.node.iter_mut().enumerate() {
            if !seen.insert(node.name.clone()) {
                node.name = format!("{}#{i}", node.name);
                seen.insert(node.name.clone());
            }
        }
    }
    let mut model = onnx
        .model_for_proto_model(&proto)
        .map_err(|e| unsupported(chain(&e)))?;
    let outlets = model
        .input_outlets()
        .map_err(|e| unsupported(chain(&e)))?
        .to_vec();
    let mut declared = Vec::new();
    for (i, outlet) in outlets.iter().enumerate() {
        let fact = model.input_fact(i).map_err(|e| unsupported(chain(&e)))?;
        let dims = fact
            .shape
            .dims()
            .map(|d| d.concretize().and_then(|d| d.to_usize().ok()))
            .collect();
        declared.push(DeclaredInput {
            name: model.node(outlet.node).name.clone(),
            dtype: fact.datum_type.concretize().and_then(dtype),
            dims,
        });
    }
    let shapes = fix_shapes(config, &declared)?;
    let mut inputs = Vec::new();
    for (i, (d, shape)) in declared.iter().zip(shapes).enumerate() {
        let dt = d.dtype.ok_or_else(|| {
            unsupported(format!(
                "input \"{}\" has an element type Myelin does not feed (float32, int64, int32, uint8)",
                d.name
            ))
        })?;
        // Inputs the file already fixes are left as they are.
        if d.dims
            .iter()
            .map(|x| x.unwrap_or(0))
            .ne(shape.iter().copied())
        {
            model
                .set_input_fact(i, InferenceFact::dt_shape(datum(dt), shape.clone()))
                .map_err(|e| unsupported(chain(&e)))?;
        }
        inputs.push(InputInfo {
            name: d.name.clone(),
            dtype: dt,
            shape,
        });
    }
    let typed = model.into_optimized().map_err(|e| unsupported(chain(&e)))?;
    let mut outputs = Vec::new();
    for outlet in typed.output_outlets().map_err(|e| unsupported(chain(&e)))? {
        let fact = typed
            .outlet_fact(*outlet)
            .map_err(|e| unsupported(chain(&e)))?;
        outputs.push(OutputInfo {
            name: typed
                .outlet_label(*outlet)
                .map(str::to_string)
                .unwrap_or_else(|| typed.node(outlet.node).name.clone()),
            dtype: dtype(fact.datum_type),
            shape: fact.shape.iter().map(|d| d.to_usize().ok()).collect(),
        });
    }
    let plan = typed.into_runnable().map_err(|e| unsupported(chain(&e)))?;
    Ok(Model::new(
        config.clone(),
        BackendKind::Tract,
        "cpu".into(),
        inputs,
        outputs,
        Box::new(TractEngine { plan, executor }),
    ))
}

/// A tract tensor of `shape` over `values` (row-major).
fn tract_tensor<T: Datum>(
    shape: Vec<usize>,
    values: Vec<T>,
) -> Result<tract_onnx::prelude::Tensor, tract_ndarray::ShapeError> {
    tract_ndarray::ArrayD::from_shape_vec(shape, values).map(|a| a.into_tensor())
}

/// An output's elements in row-major order.
fn plain<T: Datum + Copy>(value: &TValue) -> TractResult<Vec<T>> {
    Ok(value.to_plain_array_view::<T>()?.iter().copied().collect())
}

impl Engine for TractEngine {
    fn run(&mut self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, ModelError> {
        let backend = |e: TractError| ModelError::Backend(format!("tract: {}", chain(&e)));
        let values: TVec<TValue> = inputs
            .into_iter()
            .map(|t| {
                let tensor = match t.data {
                    Data::F32(v) => tract_tensor(t.shape, v),
                    Data::I64(v) => tract_tensor(t.shape, v),
                    Data::I32(v) => tract_tensor(t.shape, v),
                    Data::U8(v) => tract_tensor(t.shape, v),
                };
                tensor
                    .map(|t| t.into_tvalue())
                    .map_err(|e| ModelError::Input(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        let plan = &self.plan;
        let outputs =
            multithread_tract_scope(self.executor.clone(), || plan.run(values)).map_err(backend)?;
        outputs
            .into_iter()
            .map(|v| {
                let shape = v.shape().to_vec();
                let data = match v.datum_type() {
                    DatumType::F32 => Data::F32(plain(&v).map_err(backend)?),
                    DatumType::I64 => Data::I64(plain(&v).map_err(backend)?),
                    DatumType::I32 => Data::I32(plain(&v).map_err(backend)?),
                    DatumType::U8 => Data::U8(plain(&v).map_err(backend)?),
                    other => {
                        return Err(ModelError::Backend(format!(
                            "an output is {other:?}, which Myelin does not return"
                        )))
                    }
                };
                Tensor::new(shape, data).map_err(|e| ModelError::Backend(e.to_string()))
            })
            .collect()
    }
}
