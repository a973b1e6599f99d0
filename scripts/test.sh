#!/usr/bin/env bash
# The whole test suite: unit, doc and end-to-end tests (the latter as root, in network
# namespaces the tests create and remove themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/env.sh
if [ "$(id -u)" != 0 ]; then
  echo "test.sh: run as root: the end-to-end tests create network namespaces and TUN devices" >&2
  exit 1
fi
cargo test --workspace --all-features --locked --no-fail-fast "$@"
