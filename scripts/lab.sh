#!/usr/bin/env bash
# The main job: builds Myelin and runs a 3-node lab fleet (operator, robot1, robot2) in network
# namespaces on this machine, printing each node's overlay address and dashboard URL. Runs until
# Ctrl-C, then removes everything it made. Extra arguments go to `myelin lab up`
# (e.g. --nodes 5, --detach). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/env.sh
cargo build --release --locked
MYELIN="$CARGO_TARGET_DIR/release/myelin"
# A lab left by an earlier run that was killed is removed first.
"$MYELIN" lab down >/dev/null
exec "$MYELIN" lab up --nodes 3 "$@"
