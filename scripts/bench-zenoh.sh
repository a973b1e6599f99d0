#!/usr/bin/env bash
# Zenoh pub/sub latency and throughput between two lab nodes, over Myelin (the peers' overlay
# addresses, through the tunnel) and over the raw veth (their underlay addresses), in the same
# run and with the same two zenoh peers (benches/zenoh_link.rs, zenoh 1.10.2 in peer mode).
#
#   scripts/bench-zenoh.sh [ROUNDS (default 3)] [SECONDS per throughput run (default 5)]
#
# Per round and path: 1000 round trips of 1 KB and 200 of 1 MB (RTT p50/p99), and a flood of
# 1 KB and 1 MB messages for SECONDS (Mbit/s at the receiver). Prints medians over rounds and
# the ratio Myelin / raw. Needs root (the lab makes network namespaces).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SECONDS_PER_RUN=${2:-5}
scripts/setup.sh
. scripts/env.sh
cargo build --release --locked --quiet
BENCH=$(cargo bench --locked --no-run --bench zenoh_link 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
[ -x "$BENCH" ] || { echo "could not build benches/zenoh_link.rs" >&2; exit 1; }
MYELIN="$CARGO_TARGET_DIR/release/myelin"
WORK=$(mktemp -d)
LAB="$WORK/lab"
cleanup() {
  "$MYELIN" lab down --dir "$LAB" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
"$MYELIN" lab up --nodes 2 --dir "$LAB" --detach >/dev/null
"$MYELIN" lab status --dir "$LAB" --json >"$WORK/lab.json"
read -r ROBOT_OVERLAY ROBOT_UNDERLAY < <(python3 -c '
import json, sys
n = [n for n in json.load(open(sys.argv[1]))["nodes"] if n["name"] == "robot1"][0]
print(n["overlay"][0], n["underlay"])' "$WORK/lab.json")
run() { "$MYELIN" lab exec --dir "$LAB" "$@"; }

# One pong for the whole run; it answers on both addresses.
run robot1 -- "$BENCH" pong tcp/0.0.0.0:7460 >"$WORK/pong.log" 2>&1 &
PONG=$!
for _ in $(seq 1 200); do grep -q ready "$WORK/pong.log" && break; sleep 0.05; done
grep -q ready "$WORK/pong.log" || { echo "pong did not start: $(cat "$WORK/pong.log")" >&2; exit 1; }

flood() { # address size -> mbit/s
  local addr=$1 size=$2
  run robot1 -- "$BENCH" sink tcp/0.0.0.0:7461 >"$WORK/sink.log" 2>&1 &
  local sink=$!
  for _ in $(seq 1 200); do grep -q ready "$WORK/sink.log" && break; sleep 0.05; done
  if ! run operator -- "$BENCH" flood "tcp/$addr:7461" "$size" "$SECONDS_PER_RUN" >&2; then
    kill "$sink" 2>/dev/null || true
    echo "flood of $size B to $addr failed; sink: $(cat "$WORK/sink.log")" >&2
    exit 1
  fi
  wait "$sink"
  python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["mbit_s"])' "$WORK/sink.log"
}
ping() { # address size count -> "p50 p99"
  run operator -- "$BENCH" ping "tcp/$1:7460" "$2" "$3" |
    python3 -c 'import json,sys; d=json.loads(sys.stdin.read().splitlines()[-1]); print(d["rtt_p50_us"], d["rtt_p99_us"])'
}

: >"$WORK/results"
for r in $(seq 1 "$ROUNDS"); do
  for path in raw myelin; do
    addr=$ROBOT_UNDERLAY; [ "$path" = myelin ] && addr=$ROBOT_OVERLAY
    read -r l1p50 l1p99 < <(ping "$addr" 1024 1000)
    read -r lmp50 lmp99 < <(ping "$addr" 1048576 200)
    t1=$(flood "$addr" 1024)
    tm=$(flood "$addr" 1048576)
    echo "$path $l1p50 $l1p99 $lmp50 $lmp99 $t1 $tm" | tee -a "$WORK/results" >&2
  done
done
kill "$PONG" 2>/dev/null || true

python3 - "$WORK/results" "$ROUNDS" "$SECONDS_PER_RUN" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
cols = ["1 KB RTT p50 (µs)", "1 KB RTT p99 (µs)", "1 MB RTT p50 (µs)", "1 MB RTT p99 (µs)",
        "1 KB Mbit/s", "1 MB Mbit/s"]
med = {p: [statistics.median(float(r[i + 1]) for r in rows if r[0] == p) for i in range(6)]
       for p in ("raw", "myelin")}
print(f"zenoh 1.10.2 peer to peer, medians of {sys.argv[2]} rounds, {sys.argv[3]} s floods")
print(f"| {'path':8} | " + " | ".join(cols) + " |")
print("|---" * (len(cols) + 1) + "|")
for p in ("raw", "myelin"):
    print(f"| {p:8} | " + " | ".join(f"{v:.1f}" for v in med[p]) + " |")
print(f"| {'ratio':8} | " + " | ".join(f"{m / r:.2f}×" for m, r in zip(med["myelin"], med["raw"])) + " |")
PY
