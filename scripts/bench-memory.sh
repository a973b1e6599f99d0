#!/usr/bin/env bash
# Memory of one robot node of a 3-node lab (release build, or MYELIN_PROFILE=dist; every default plugin) as the kernel
# charges it: each process's RSS and USS, and the node's total with every physical page counted
# once (scripts/memory.py: private pages of every process plus the shared binary's pages once).
# Three states: idle with the lab's model in the ai plugin; the same under iperf3 load
# (operator -> robot1, TCP); idle without models (the ai plugin then does not run). As root.
# Usage: scripts/bench-memory.sh   (MYELIN_PROFILE=dist: the profile robots ship, LTO and cold code for size)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lab-common.sh
DIR=$(mktemp -d /tmp/myelin-memory.XXXXXX)
trap '"$MYELIN" lab down --dir "$DIR" >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT

measure() { # title: robot1's node and its plugins
  local pid args=() p label
  pid=$(awk '$1 == "robot1" { print $2 }' <<<"$LAB_NODES")
  for p in $(tree "$pid"); do
    label=$(tr '\0' ' ' <"/proc/$p/cmdline" | awk '{ print ($2 == "plugin-run") ? "plugin " $3 : "node" }')
    args+=("$label=$p")
  done
  echo "#### $1"
  echo
  python3 scripts/memory.py "${args[@]}"
  echo
}

lab_start "$DIR"
measure "robot1 idle, the lab's model loaded in ai"

# Under load: an iperf3 TCP stream from the operator into robot1, measured in its middle.
iperf3_server "$DIR" robot1
"$MYELIN" lab exec --dir "$DIR" operator -- iperf3 -c 10.77.0.2 -t 8 >/dev/null &
client=$!
sleep 4 # into the middle of the 8 s stream: the measurement point, not a synchronisation
measure "robot1 under iperf3 load (operator -> robot1 TCP)"
wait "$client"

"$MYELIN" lab down --dir "$DIR" >/dev/null
MYELIN_MODELS=/nonexistent lab_start "$DIR"
measure "robot1 idle without models (the ai plugin off)"
echo "$(nproc) cores, $(git rev-parse --short HEAD), $(du -m "$MYELIN" | cut -f1) MB binary"
