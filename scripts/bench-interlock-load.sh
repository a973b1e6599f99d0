#!/usr/bin/env bash
# The interlock's view under load (issue 23): in a 3-node lab (release build, every default
# plugin), the probe RTTs robot1's safety plugin judges on its link to the operator, idle and
# while iperf3 saturates robot1 -> operator (TCP), each for WINDOW seconds (default 20); and
# the trips the interlock counted meanwhile. Probes are read from robot1's peer view (the same
# samples the safety plugin gets), each probe counted once by its sequence number. As root.
# Usage: scripts/bench-interlock-load.sh [WINDOW_S]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lab-common.sh
WINDOW=${1:-20}
DIR=$(mktemp -d /tmp/myelin-interlock.XXXXXX)
trap '"$MYELIN" lab down --dir "$DIR" >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT
lab_start "$DIR"

trips() {
  "$MYELIN" lab exec --dir "$DIR" robot1 -- "$MYELIN" safety status --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["trips"])'
}

sample() { # label: probe RTTs to the operator for WINDOW seconds, then their percentiles
  local label=$1 end=$((SECONDS + WINDOW))
  while [ $SECONDS -lt $end ]; do
    "$MYELIN" lab exec --dir "$DIR" robot1 -- "$MYELIN" peers --json
    sleep 0.5 # the view keeps the latest probes; polling twice a second sees each of them
  done | python3 -c '
import json, sys
label, seen = sys.argv[1], {}
text, at, decoder = sys.stdin.read(), 0, json.JSONDecoder()
while True:
    while at < len(text) and text[at].isspace():
        at += 1
    if at >= len(text):
        break
    v, at = decoder.raw_decode(text, at)
    for p in v.get("peers", []):
        if p.get("name") != "operator":
            continue
        for s in p.get("recent_probes", []):
            seen[s["seq"]] = s.get("rtt_ms")
rtts = sorted(r for r in seen.values() if r is not None)
lost = sum(1 for r in seen.values() if r is None)
q = lambda f: rtts[min(len(rtts) - 1, int(f * len(rtts)))] if rtts else float("nan")
mx = max(rtts) if rtts else float("nan")
print(f"| {label} | {len(seen)} | {lost} | {q(0.5):.2f} | {q(0.99):.2f} | {mx:.2f} |")
' "$label"
}

echo "| robot1 -> operator link | probes | unanswered | RTT p50 ms | p99 ms | max ms |"
echo "|---|---:|---:|---:|---:|---:|"
before=$(trips)
sample "idle"
iperf3_server "$DIR" operator
"$MYELIN" lab exec --dir "$DIR" robot1 -- iperf3 -c 10.77.0.1 -t "$((WINDOW + 2))" >"$DIR/iperf3.txt" &
client=$!
sleep 1 # let the stream reach its rate before sampling
sample "iperf3 TCP robot1 -> operator"
wait "$client"
after=$(trips)
rate=$(awk '/receiver/ { print $(NF-2), $(NF-1) }' "$DIR/iperf3.txt")
echo
echo "iperf3 robot1 -> operator: $rate; interlock trips during the run: $((after - before)) (max_rtt_ms 200, trip after 3 bad probes)"
echo "$(nproc) cores, $(git rev-parse --short HEAD)"
