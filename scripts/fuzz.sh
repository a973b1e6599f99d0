#!/usr/bin/env bash
# Fuzzes every parser of untrusted bytes (fuzz/fuzz_targets) for SECONDS each, default 60:
# coverage-guided libFuzzer through cargo-fuzz on the stable toolchain (no sanitizer; Rust's
# bounds and overflow checks are the oracle). Prints each target's executions and whether it
# crashed; exits non-zero if any did.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Inputs: fuzz/seeds/<target> (hand-made valid inputs) and fuzz/regressions/<target> (inputs
# that once crashed: replayed first on every run). The growing corpus lives next to the build,
# outside the clone, so CI keeps fuzzing where it stopped. A crashing input is kept in
# fuzz/artifacts/<target>/ and printed as base64; once fixed, it belongs in fuzz/regressions.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh

seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(probe plugin_frames config wireguard_verify npy npz image_frame rtp_h264 whep_offer mesh_control certificate enrollment firewall_packet dns_query multicast_packet rtnetlink)
fi

# Its own target directory: the fuzz build (instrumented, release) would otherwise evict the
# test build from the shared one.
export CARGO_TARGET_DIR="${MYELIN_FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR}-fuzz}"
corpus_root="$CARGO_TARGET_DIR/corpus"
log_root="$CARGO_TARGET_DIR/logs"
mkdir -p "$corpus_root" "$log_root"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --version 0.13.2
fi

start=$(date +%s)
cargo fuzz build --sanitizer none
echo "fuzz: built in $(( $(date +%s) - start )) s"

failed=()
printf '%-18s %12s %10s %8s  %s\n' target execs "execs/s" seconds result
for t in "${targets[@]}"; do
  mkdir -p "$corpus_root/$t" "fuzz/artifacts/$t"
  inputs=("$corpus_root/$t")
  for d in "fuzz/regressions/$t" "fuzz/seeds/$t"; do
    if [ -d "$d" ]; then inputs+=("$d"); fi
  done
  log="$log_root/$t.log"
  t0=$(date +%s)
  rc=0
  cargo fuzz run --sanitizer none "$t" "${inputs[@]}" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1 || rc=$?
  took=$(( $(date +%s) - t0 ))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  if [ "$rc" -eq 0 ]; then
    result=ok
  else
    result="CRASHED (exit $rc)"
    failed+=("$t")
  fi
  printf '%-18s %12s %10s %8s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "$took" "$result"
  if [ "$rc" -ne 0 ]; then
    echo "---- $t: end of $log"
    tail -n 40 "$log"
    for f in $(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log"); do
      echo "---- $t: input $f (base64; keep it in fuzz/regressions/$t once fixed)"
      head -c 8192 "$f" | base64
    done
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}"
  exit 1
fi
echo "fuzz: ${#targets[@]} targets, ${seconds} s each, no crashes ($(( $(date +%s) - start )) s in all)"
