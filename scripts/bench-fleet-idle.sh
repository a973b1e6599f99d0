#!/usr/bin/env bash
# Idle CPU of a large lab fleet: NODES members (an operator and robots, each robot with its
# interlock, as the 50-node fleet-page test runs them) and a lighthouse, the mesh formed,
# nothing sent. Sums utime+stime from /proc/<pid>/stat over a window for the nodes and for
# their plugin processes. With MYELIN_BASELINE (another build's binary) the same is measured
# for it in the same run, before this build, and the ratio printed.
# As root. Usage: scripts/bench-fleet-idle.sh [NODES] [WINDOW_S]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lab-common.sh
NODES=${1:-50}
WINDOW=${2:-20}
hz=$(getconf CLK_TCK)

ticks() { # pids...: their utime+stime summed
  local sum=0 p t
  for p in "$@"; do
    t=$(awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null || echo 0)
    sum=$((sum + t))
  done
  echo "$sum"
}

LAB_DIR=""
trap '[ -n "$LAB_DIR" ] && { "$LAB_BIN" lab down --dir "$LAB_DIR" >/dev/null 2>&1 || true; rm -rf "$LAB_DIR"; }' EXIT

measure() { # binary label: prints "label nodes% plugins%"
  local bin=$1 label=$2 dir
  dir=$(mktemp -d /tmp/myelin-fleet-idle.XXXXXX)
  LAB_DIR=$dir LAB_BIN=$bin
  chmod 755 "$dir"
  "$bin" lab up --nodes "$NODES" --dir "$dir" --plugins safety --cameras 0 --detach >/dev/null ||
    { echo "bench-fleet-idle: $label: lab up failed" >&2; return 1; }
  local nodes plugins
  nodes=$("$bin" lab status --dir "$dir" --json |
    python3 -c 'import json,sys; print(" ".join(str(n["pid"]) for n in json.load(sys.stdin)["nodes"]))')
  plugins=$(for p in $nodes; do pgrep -P "$p"; done | tr '\n' ' ')
  [ -n "$nodes" ] || { echo "bench-fleet-idle: $label: no node processes" >&2; return 1; }
  # The mesh is formed when `lab up --detach` returns; the first seconds after are the nodes'
  # start-up (plugins starting, the interlocks clearing), which is not idle.
  sleep 10 # settling before the window, not synchronisation
  # shellcheck disable=SC2086
  local n0 p0 n1 p1
  n0=$(ticks $nodes); p0=$(ticks $plugins)
  sleep "$WINDOW" # the measurement window: the lab is left alone
  # shellcheck disable=SC2086
  n1=$(ticks $nodes); p1=$(ticks $plugins)
  "$bin" lab down --dir "$dir" >/dev/null 2>&1 || true
  rm -rf "$dir"
  LAB_DIR=""
  awk -v l="$label" -v n=$((n1 - n0)) -v p=$((p1 - p0)) -v hz="$hz" -v w="$WINDOW" \
    'BEGIN { printf "%s %.1f %.1f\n", l, n / hz / w * 100, p / hz / w * 100 }'
}

rows=()
# Not in $(…), so a failed measurement stops the script (set -e) instead of reading as zero.
tmp=$(mktemp)
if [ -n "${MYELIN_BASELINE:-}" ]; then
  measure "$MYELIN_BASELINE" baseline >"$tmp"
  rows+=("$(cat "$tmp")")
fi
measure "$MYELIN" this >"$tmp"
rows+=("$(cat "$tmp")")
rm -f "$tmp"
echo "| build | $NODES nodes' processes, % of one core | their plugin processes | all |"
echo "|---|---|---|---|"
for r in "${rows[@]}"; do
  read -r label n p <<<"$r"
  awk -v l="$label" -v n="$n" -v p="$p" 'BEGIN { printf "| %s | %.1f | %.1f | %.1f |\n", l, n, p, n + p }'
done
if [ ${#rows[@]} = 2 ]; then
  read -r _ bn bp <<<"${rows[0]}"
  read -r _ tn tp <<<"${rows[1]}"
  awk -v bn="$bn" -v bp="$bp" -v tn="$tn" -v tp="$tp" \
    'BEGIN { printf "\nthis / baseline: %.2fx (nodes %.2fx, plugins %.2fx)\n", (tn + tp) / (bn + bp), tn / bn, tp / bp }'
fi
echo
echo "window ${WINDOW} s, $(nproc) cores, $(git rev-parse --short HEAD)"
