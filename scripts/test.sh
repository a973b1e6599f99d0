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
# The output is kept, so that a failure's own message is printed again at the very end: CI
# shows only the tail of a long run.
log="$(mktemp /tmp/myelin-test.XXXXXX.log)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --all-features --locked --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" != 0 ]; then
  echo
  echo "==== test.sh: the failures again (first 150 lines of each; the whole output is above) ===="
  awk '/^---- .* stdout ----$/ {on = 1; n = 0}
       on && /^failures:$/ {on = 0}
       on && n < 150 {print; n++}' "$log"
  grep -E "^test .* \.\.\. FAILED$|^error: .*target.* failed|^error: test failed|^    \`" "$log" || true
fi
exit "$status"
