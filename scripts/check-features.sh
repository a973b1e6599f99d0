#!/usr/bin/env bash
# The feature matrix: the binary compiles with no plugins, with each plugin alone, and with
# the default set (cargo check; the test suite builds --all-features).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
sets=("--no-default-features" "")
for f in telemetry zenoh safety webrtc chaos; do
  sets+=("--no-default-features --features $f")
done
for s in "${sets[@]}"; do
  echo "check-features: cargo check --locked -p myelin ${s:-(default features)}"
  # shellcheck disable=SC2086
  cargo check --locked --quiet -p myelin --bins --lib $s
done
