#!/usr/bin/env bash
# Idle CPU of every Myelin process in a 3-node lab (release build, every default plugin on, the
# mesh up, nothing sent): utime+stime from /proc/<pid>/stat over a window (default 30 s), per
# process, as a markdown table. As root. Usage: scripts/bench-idle.sh [WINDOW_S]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lab-common.sh
WINDOW=${1:-30}
DIR=$(mktemp -d /tmp/myelin-idle.XXXXXX)
trap '"$MYELIN" lab down --dir "$DIR" >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT
lab_start "$DIR"
nodes=$LAB_NODES

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
