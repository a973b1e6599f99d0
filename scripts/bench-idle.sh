#!/usr/bin/env bash
# Idle CPU of every Myelin process in a 3-node lab (release build, every default plugin on, the
# mesh up, nothing sent): utime+stime from /proc/<pid>/stat over a window (default 30 s), per
# process, as a markdown table. As root. Usage: scripts/bench-idle.sh [WINDOW_S]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
. scripts/env.sh
cargo build --release --locked --quiet
MYELIN="$CARGO_TARGET_DIR/release/myelin"
WINDOW=${1:-30}
DIR=$(mktemp -d /tmp/myelin-idle.XXXXXX)
trap '"$MYELIN" lab down --dir "$DIR" >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT
"$MYELIN" lab down --dir "$DIR" >/dev/null 2>&1 || true
"$MYELIN" lab up --nodes 3 --dir "$DIR" --detach >/dev/null

nodes=$("$MYELIN" lab status --dir "$DIR" --json | python3 -c 'import json,sys; [print(n["name"], n["pid"]) for n in json.load(sys.stdin)["nodes"]]')

settled() { # node: every enabled plugin running; robots' interlocks armed
  local node=$1
  "$MYELIN" lab exec --dir "$DIR" "$node" -- "$MYELIN" plugins --json | python3 -c '
import json, sys
v = json.load(sys.stdin)
ps = v["plugins"] if isinstance(v, dict) else v
sys.exit(0 if ps and all(p["state"] == "running" for p in ps if p["enabled"]) else 1)' || return 1
  [ "$node" = operator ] && return 0
  "$MYELIN" lab exec --dir "$DIR" "$node" -- "$MYELIN" safety status | grep -q "armed: motion permitted"
}
while read -r name _; do
  for i in $(seq 1 600); do settled "$name" && break; sleep 0.2
    [ "$i" = 600 ] && { echo "bench-idle: $name did not settle in 120 s" >&2; exit 1; }
  done
done <<<"$nodes"

tree() { # pid: the pid and every descendant
  local p=$1; echo "$p"
  for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do tree "$c"; done
}
ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo -1; }

declare -A before who
pids=()
while read -r name pid; do
  for p in $(tree "$pid"); do
    pids+=("$p"); who[$p]="$name"; before[$p]=$(ticks "$p")
  done
done <<<"$nodes"
start=$(date +%s.%N)
sleep "$WINDOW" # the measurement window: the lab is left alone
end=$(date +%s.%N)
hz=$(getconf CLK_TCK)
echo "| node | process | CPU % of one core |"
echo "|---|---|---|"
for p in "${pids[@]}"; do
  after=$(ticks "$p")
  cmd=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | sed 's/ *$//; s|^[^ ]*/myelin|myelin|; s/ --config [^ ]*//')
  awk -v a="$after" -v b="${before[$p]}" -v hz="$hz" -v s="$start" -v e="$end" -v n="${who[$p]}" -v c="$cmd" \
    'BEGIN { printf "| %s | `%s` | %.2f |\n", n, c, (a - b) / hz / (e - s) * 100 }'
done
echo
echo "window ${WINDOW} s, $(nproc) cores, $(git rev-parse --short HEAD)"
