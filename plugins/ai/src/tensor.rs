//! Tensors as the plugin moves them between HTTP, zenoh and the backends: a shape and a typed,
//! row-major buffer. Reads NumPy `.npy` and `.npz` (what a robotics engineer already has), and
//! turns outputs into JSON: full data, statistics, or a top-k for classifiers.

use serde::Serialize;
use std::io::Read;

/// The element types the backends exchange with us.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    Float32,
    Int64,
    Int32,
    Uint8,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::Float32 => "float32",
            DType::Int64 => "int64",
            DType::Int32 => "int32",
            DType::Uint8 => "uint8",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    U8(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TensorError {
    #[error("not a NumPy .npy file: {0}")]
    Npy(String),
    #[error("not a NumPy .npz archive: {0}")]
    Npz(String),
    #[error("shape {shape:?} holds {expected} elements but the data has {actual}")]
    Length {
        shape: Vec<usize>,
        expected: usize,
        actual: usize,
    },
    #[error("shape {shape:?} holds more elements than this machine can address")]
    Overflow { shape: Vec<usize> },
    /// The arrays of one request decompress to more than the caller's limit.
    #[error("{what}, more than the limit of {limit} bytes for one request")]
    TooLarge { what: String, limit: usize },
}

/// What [`parse_npz`] lets the arrays of one archive decompress to, in total.
pub const DEFAULT_MAX_DECODED_BYTES: usize = 64 * 1024 * 1024;

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Data) -> Result<Tensor, TensorError> {
        let expected = element_count(&shape)?;
        let actual = data.len();
        if expected != actual {
            return Err(TensorError::Length {
                shape,
                expected,
                actual,
            });
        }
        Ok(Tensor { shape, data })
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// Every element as f64, for thresholds and summaries.
    pub fn values(&self) -> Vec<f64> {
        match &self.data {
            Data::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Data::I64(v) => v.iter().map(|&x| x as f64).collect(),
            Data::I32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Data::U8(v) => v.iter().map(|&x| f64::from(x)).collect(),
        }
    }
}

impl Data {
    pub fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::I64(v) => v.len(),
            Data::I32(v) => v.len(),
            Data::U8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            Data::F32(_) => DType::Float32,
            Data::I64(_) => DType::Int64,
            Data::I32(_) => DType::Int32,
            Data::U8(_) => DType::Uint8,
        }
    }
}

/// The number of elements a tensor of `shape` holds; an error when the product overflows `usize`
/// (a hostile header can declare any shape).
pub fn element_count(shape: &[usize]) -> Result<usize, TensorError> {
    if shape.contains(&0) {
        return Ok(0);
    }
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| TensorError::Overflow {
            shape: shape.to_vec(),
        })
}

/// Parses one `.npy` (format versions 1–3, little-endian, C order) from untrusted bytes.
///
/// Never panics; allocates no more than `bytes.len()` for the data, since the header's shape
/// must match the bytes that follow it.
pub fn parse_npy(bytes: &[u8]) -> Result<Tensor, TensorError> {
    let bad = |m: &str| TensorError::Npy(m.to_string());
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad(
            "it does not start with the \\x93NUMPY magic; save it with numpy.save",
        ));
    }
    let (header_len, start): (usize, usize) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => {
            return Err(TensorError::Npy(format!(
                "format version {v} is not 1, 2 or 3"
            )))
        }
    };
    let header = bytes
        .get(start..start.saturating_add(header_len))
        .ok_or_else(|| bad("the header is cut short"))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("the header is not text"))?;
    let descr = dict_value(header, "descr").ok_or_else(|| bad("the header has no 'descr'"))?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    if dict_value(header, "fortran_order").is_some_and(|v| v.starts_with("True")) {
        return Err(bad(
            "it is in Fortran order; save a C-ordered array (numpy.ascontiguousarray)",
        ));
    }
    let shape_text = dict_value(header, "shape").ok_or_else(|| bad("the header has no 'shape'"))?;
    let shape = parse_shape(shape_text).ok_or_else(|| bad("the shape is not a tuple of sizes"))?;
    let body = &bytes[start + header_len..];
    let n = element_count(&shape)?;
    let data = match descr {
        "<f4" => Data::F32(decode(body, n, f32::from_le_bytes)?),
        "<i8" => Data::I64(decode(body, n, i64::from_le_bytes)?),
        "<i4" => Data::I32(decode(body, n, i32::from_le_bytes)?),
        "|u1" | "<u1" => Data::U8(decode(body, n, |b: [u8; 1]| b[0])?),
        other => {
            return Err(TensorError::Npy(format!(
            "dtype '{other}' is not supported; use float32, int64, int32 or uint8 (little-endian)"
        )))
        }
    };
    Tensor::new(shape, data)
}

/// Parses an `.npz` archive (numpy.savez / savez_compressed) from untrusted bytes: named
/// arrays, decompressing at most [`DEFAULT_MAX_DECODED_BYTES`] in total.
///
/// Never panics; see [`parse_npz_limited`] for the limit's error.
pub fn parse_npz(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, TensorError> {
    parse_npz_limited(bytes, DEFAULT_MAX_DECODED_BYTES)
}

/// [`parse_npz`] with the total decompressed size of all entries capped at `max_decoded` bytes:
/// beyond it, [`TensorError::TooLarge`], with no more than `max_decoded + 1` bytes inflated.
pub fn parse_npz_limited(
    bytes: &[u8],
    max_decoded: usize,
) -> Result<Vec<(String, Tensor)>, TensorError> {
    let too_large = |what: String| TensorError::TooLarge {
        what,
        limit: max_decoded,
    };
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| TensorError::Npz(e.to_string()))?;
    // The sizes the archive declares cost nothing to check and turn away a bomb before any
    // inflating; the counting below holds even when they lie.
    let declared = (0..archive.len()).try_fold(0u64, |sum, i| {
        archive
            .by_index_data(i)
            .map(|f| sum.saturating_add(f.size()))
            .map_err(|e| TensorError::Npz(e.to_string()))
    })?;
    if declared > max_decoded as u64 {
        return Err(too_large(format!(
            "the .npz declares {declared} bytes of arrays"
        )));
    }
    let mut left = max_decoded;
    let mut out = Vec::new();
    for i in 0..archive.len() {
        let mut file = archive
            .by_index(i)
            .map_err(|e| TensorError::Npz(e.to_string()))?;
        let name = file
            .name()
            .map_err(|e| TensorError::Npz(e.to_string()))?
            .trim_end_matches(".npy")
            .to_string();
        let mut buf = Vec::new();
        file.by_ref()
            .take((left as u64).saturating_add(1))
            .read_to_end(&mut buf)
            .map_err(|e| TensorError::Npz(format!("{name}: {e}")))?;
        left = left.checked_sub(buf.len()).ok_or_else(|| {
            too_large(format!(
                "the .npz's arrays decompress to more than {max_decoded} bytes (at \"{name}\")"
            ))
        })?;
        let tensor = parse_npy(&buf).map_err(|e| TensorError::Npz(format!("{name}: {e}")))?;
        out.push((name, tensor));
    }
    if out.is_empty() {
        return Err(TensorError::Npz("the archive holds no arrays".into()));
    }
    Ok(out)
}

fn decode<T, const N: usize>(
    body: &[u8],
    n: usize,
    f: impl Fn([u8; N]) -> T,
) -> Result<Vec<T>, TensorError> {
    let need = n
        .checked_mul(N)
        .ok_or_else(|| TensorError::Npy(format!("{n} elements of {N} bytes overflow")))?;
    if body.len() != need {
        return Err(TensorError::Npy(format!(
            "the data is {} bytes but the header's shape needs {need}",
            body.len()
        )));
    }
    Ok(body
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            f(a)
        })
        .collect())
}

/// The text after `'key':` up to the next top-level comma.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = &header[at + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0i32;
    for (i, c) in rest.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    None
}

fn parse_shape(text: &str) -> Option<Vec<usize>> {
    let inner = text.trim().strip_prefix('(')?.strip_suffix(')')?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse().ok())
        .collect()
}

/// Writes a `.npy` (version 1); used by the tests and by callers that want raw outputs back.
pub fn write_npy(t: &Tensor) -> Vec<u8> {
    let descr = match t.dtype() {
        DType::Float32 => "<f4",
        DType::Int64 => "<i8",
        DType::Int32 => "<i4",
        DType::Uint8 => "|u1",
    };
    let dims: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    match &t.data {
        Data::F32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Data::I64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Data::I32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Data::U8(v) => out.extend_from_slice(v),
    }
    out
}

/// One output as JSON.
#[derive(Clone, Debug, Serialize)]
pub struct OutputJson {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    /// Every element, row-major; left out of summaries of large outputs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// The best classes, for classifier outputs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<Vec<Class>>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Class {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub score: f64,
}

/// `full_data_up_to`: outputs with at most this many elements carry their data.
pub fn output_json(
    name: &str,
    t: &Tensor,
    full_data_up_to: usize,
    top_k: Option<usize>,
    labels: &[String],
) -> OutputJson {
    let values = t.values();
    let (min, max, sum) = values.iter().fold(
        (f64::INFINITY, f64::NEG_INFINITY, 0.0),
        |(lo, hi, s), &v| (lo.min(v), hi.max(v), s + v),
    );
    let mean = if values.is_empty() {
        0.0
    } else {
        sum / values.len() as f64
    };
    let data = (values.len() <= full_data_up_to).then(|| match &t.data {
        Data::F32(v) => serde_json::json!(v),
        Data::I64(v) => serde_json::json!(v),
        Data::I32(v) => serde_json::json!(v),
        Data::U8(v) => serde_json::json!(v),
    });
    let top_k = top_k.map(|k| {
        // Classifier outputs are [1, classes] or [classes]: rank the last axis of row 0.
        let classes = t.shape.last().copied().unwrap_or(0).min(values.len());
        let mut ranked: Vec<(usize, f64)> = values[..classes].iter().copied().enumerate().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        ranked
            .into_iter()
            .take(k)
            .map(|(index, score)| Class {
                index,
                label: labels.get(index).cloned(),
                score,
            })
            .collect()
    });
    OutputJson {
        name: name.to_string(),
        shape: t.shape.clone(),
        dtype: t.dtype(),
        min: if values.is_empty() { 0.0 } else { min },
        max: if values.is_empty() { 0.0 } else { max },
        mean,
        data,
        top_k,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn npy_round_trip_every_dtype() {
        for t in [
            Tensor::new(vec![2, 3], Data::F32(vec![1.0, -2.5, 3.0, 4.0, 5.0, 6.25])).unwrap(),
            Tensor::new(vec![1], Data::I64(vec![16000])).unwrap(),
            Tensor::new(vec![2, 2], Data::I32(vec![1, 2, 3, -4])).unwrap(),
            Tensor::new(vec![1, 2, 2, 1], Data::U8(vec![0, 255, 7, 9])).unwrap(),
        ] {
            assert_eq!(parse_npy(&write_npy(&t)).unwrap(), t);
        }
    }

    #[test]
    fn npy_written_by_numpy_parses() {
        // numpy.save(f, numpy.arange(6, dtype=numpy.float32).reshape(2, 3)), header as numpy 2 writes it.
        let mut b = b"\x93NUMPY\x01\x00v\x00".to_vec();
        let mut h = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }".to_string();
        while h.len() < 117 {
            h.push(' ');
        }
        h.push('\n');
        b.extend_from_slice(h.as_bytes());
        for i in 0..6 {
            b.extend_from_slice(&(i as f32).to_le_bytes());
        }
        let t = parse_npy(&b).unwrap();
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(t.data, Data::F32(vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]));
    }

    #[test]
    fn bad_npy_is_an_error_not_a_panic() {
        let good = write_npy(&Tensor::new(vec![4], Data::F32(vec![0.0; 4])).unwrap());
        assert!(parse_npy(b"garbage").is_err());
        assert!(parse_npy(&good[..good.len() - 1]).is_err());
        let swap = |from: &[u8], to: &[u8]| {
            let mut b = good.clone();
            let at = b.windows(from.len()).position(|w| w == from).unwrap();
            b[at..at + from.len()].copy_from_slice(to);
            b
        };
        assert!(parse_npy(&swap(b"<f4", b"<f8"))
            .unwrap_err()
            .to_string()
            .contains("float32"));
        assert!(parse_npy(&swap(b"False", b"True ")).is_err());
        // Every prefix of a valid file fails cleanly.
        for n in 0..good.len() {
            assert!(parse_npy(&good[..n]).is_err());
        }
        assert!(parse_npz(b"PK\x03\x04 not really").is_err());
    }

    /// A version 1 `.npy` header for uint8 data of `shape` (Python tuple syntax).
    fn npy_header(shape: &str) -> Vec<u8> {
        let h = format!("{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, }}\n");
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend_from_slice(h.as_bytes());
        out
    }

    /// An .npz of uint8 zero arrays, deflated, streamed so no array is held whole.
    pub(crate) fn zeros_npz(entries: &[(&str, usize)]) -> Vec<u8> {
        use std::io::Write;
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        let chunk = vec![0u8; 1 << 20];
        for &(name, len) in entries {
            zip.start_file(format!("{name}.npy"), options).unwrap();
            zip.write_all(&npy_header(&format!("({len},)"))).unwrap();
            let mut left = len;
            while left > 0 {
                let n = left.min(chunk.len());
                zip.write_all(&chunk[..n]).unwrap();
                left -= n;
            }
        }
        zip.finish().unwrap().into_inner()
    }

    #[test]
    fn npz_total_decompressed_size_is_capped_not_each_entry() {
        let ok = zeros_npz(&[("a", 1000), ("b", 24)]);
        let arrays = parse_npz(&ok).unwrap();
        assert_eq!(arrays.len(), 2);
        assert_eq!(arrays[0].1.shape, vec![1000]);
        // Five 16 MiB arrays: each under the 64 MiB default, together over it; the archive is
        // a few hundred KiB.
        let mib = 1024 * 1024;
        let names = ["a", "b", "c", "d", "e"];
        let bomb = zeros_npz(&names.map(|n| (n, 16 * mib)));
        assert!(bomb.len() < mib, "{} bytes", bomb.len());
        let e = parse_npz(&bomb).unwrap_err();
        assert!(
            matches!(e, TensorError::TooLarge { limit, .. } if limit == DEFAULT_MAX_DECODED_BYTES),
            "{e}"
        );
        assert!(e.to_string().contains("67108864 bytes"), "{e}");
        let e = parse_npz_limited(&ok, 1024).unwrap_err();
        assert!(
            matches!(e, TensorError::TooLarge { limit: 1024, .. }),
            "{e}"
        );
    }

    #[test]
    fn npz_that_understates_its_sizes_is_still_refused() {
        let mib = 1024 * 1024;
        let mut bomb = zeros_npz(&[("a", mib / 2), ("b", mib / 2), ("c", mib / 2)]);
        // Claim 200 bytes per entry in both the local and the central headers.
        for (magic, at) in [(b"PK\x03\x04", 22), (b"PK\x01\x02", 24)] {
            let starts: Vec<usize> = bomb
                .windows(4)
                .enumerate()
                .filter(|(_, w)| w == magic)
                .map(|(i, _)| i)
                .collect();
            assert_eq!(starts.len(), 3);
            for i in starts {
                bomb[i + at..i + at + 4].copy_from_slice(&200u32.to_le_bytes());
            }
        }
        // zip stops at the declared size; were it not to, the running count stops at the cap.
        let e = parse_npz_limited(&bomb, mib).unwrap_err().to_string();
        assert!(
            e.contains("larger than its declared")
                || e.contains("decompress to more than 1048576 bytes"),
            "{e}"
        );
    }

    #[test]
    fn element_count_overflow_is_an_error_not_a_wrap() {
        assert_eq!(element_count(&[2, 3, 4]), Ok(24));
        assert_eq!(element_count(&[]), Ok(1));
        assert_eq!(element_count(&[usize::MAX, 0]), Ok(0));
        for shape in [
            vec![usize::MAX, 2],
            vec![1 << 32, 1 << 32, 1],
            vec![1 << 63, 2],
        ] {
            assert_eq!(
                element_count(&shape),
                Err(TensorError::Overflow {
                    shape: shape.clone()
                })
            );
            assert!(Tensor::new(shape, Data::U8(vec![])).is_err());
        }
        // A header whose shape wraps to 0 elements must not pass as an empty array.
        let e = parse_npy(&npy_header(&format!("({}, 2)", 1u64 << 63))).unwrap_err();
        assert!(e.to_string().contains("more elements than"), "{e}");
    }

    #[test]
    fn top_k_ranks_classes_with_labels() {
        let t = Tensor::new(vec![1, 4], Data::F32(vec![0.1, 0.6, 0.05, 0.25])).unwrap();
        let labels = vec!["0".into(), "90".into(), "180".into(), "270".into()];
        let j = output_json("p", &t, 0, Some(2), &labels);
        let top = j.top_k.unwrap();
        assert_eq!(top[0].index, 1);
        assert_eq!(top[0].label.as_deref(), Some("90"));
        assert_eq!(top[1].index, 3);
        assert!(j.data.is_none());
        assert!((j.max - 0.6).abs() < 1e-6);
    }
}
