#!/usr/bin/env bash
# The feature matrix: the binary compiles with no plugins, with each plugin alone, and with
# the default set (cargo check; the test suite builds --all-features).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
sets=("--no-default-features" "")
for f in telemetry zenoh safety webrtc ai ai-onnxruntime static chaos; do
  sets+=("--no-default-features --features $f")
done
for s in "${sets[@]}"; do
  echo "check-features: cargo check --locked -p myelin ${s:-(default features)}"
  # shellcheck disable=SC2086
  out=$(cargo check --locked --quiet -p myelin --bins --lib $s 2>&1) || { echo "$out"; exit 1; }
  if grep -q '^warning' <<<"$out"; then
    echo "$out"
    echo "check-features: warnings with ${s:-default features}" >&2
    exit 1
  fi
done
