#!/usr/bin/env bash
# WebRTC streaming latency: per-frame time from RTP ingest at robot1 to the decoded frame at an
# aiortc viewer in the operator's namespace, matched on RTP timestamps, over Myelin and over the
# raw veth in the same run; and the first-frame time of a viewer that joins mid-stream.
#
#   scripts/bench-webrtc.sh [ROUNDS (default 3)] [SECONDS per viewer (default 10)]
#
# Both paths use the same WHEP server, namespaces and client. "raw" adds a host route in the
# operator's namespace (and one back in robot1's) that send the overlay addresses straight over
# the veth, so the packets skip the tunnel; "myelin" goes through it. Needs root.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SECONDS_PER_RUN=${2:-10}
scripts/setup.sh
. scripts/env.sh
cargo build --release --locked --quiet
MYELIN="$CARGO_TARGET_DIR/release/myelin"
PY="${MYELIN_VENV:-/var/cache/myelin/venv}/bin/python"
WORK=$(mktemp -d)
LAB="$WORK/lab"
cleanup() {
  "$MYELIN" lab down --dir "$LAB" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
"$MYELIN" lab up --nodes 2 --dir "$LAB" --detach >/dev/null
"$MYELIN" lab status --dir "$LAB" --json >"$WORK/lab.json"
read -r ROBOT_OVERLAY ROBOT_UNDERLAY OP_OVERLAY OP_UNDERLAY < <(python3 -c '
import json, sys
nodes = {n["name"]: n for n in json.load(open(sys.argv[1]))["nodes"]}
r, o = nodes["robot1"], nodes["operator"]
print(r["overlay"][0], r["underlay"], o["overlay"][0], o["underlay"])' "$WORK/lab.json")
run() { "$MYELIN" lab exec --dir "$LAB" "$@"; }

# The camera: ffmpeg → the stamping relay → the plugin's RTP port.
run robot1 -- "$PY" tests/python/rtp_stamp.py --listen 127.0.0.1:5010 --to 127.0.0.1:5004 --log "$WORK/ingest.jsonl" >"$WORK/relay.log" 2>&1 &
for _ in $(seq 1 100); do grep -q ready "$WORK/relay.log" && break; sleep 0.05; done
run robot1 -- ffmpeg -nostdin -loglevel error -re -f lavfi -i testsrc=size=640x480:rate=30 \
  -pix_fmt yuv420p -c:v libx264 -preset ultrafast -tune zerolatency -profile:v baseline -g 30 \
  -f rtp "rtp://127.0.0.1:5010?pkt_size=1200" >/dev/null 2>&1 &

: >"$WORK/results"
for r in $(seq 1 "$ROUNDS"); do
  for path in raw myelin; do
    if [ "$path" = raw ]; then
      run operator -- ip route add "$ROBOT_OVERLAY/32" via "$ROBOT_UNDERLAY" dev eth0
      run robot1 -- ip route add "$OP_OVERLAY/32" via "$OP_UNDERLAY" dev eth0
    fi
    run operator -- "$PY" tests/python/whep_client.py --url "http://$ROBOT_OVERLAY:8889/front/whep" \
      --seconds "$SECONDS_PER_RUN" --delete --latency >"$WORK/client-$path-$r.jsonl"
    if [ "$path" = raw ]; then
      run operator -- ip route del "$ROBOT_OVERLAY/32" via "$ROBOT_UNDERLAY" dev eth0
      run robot1 -- ip route del "$OP_OVERLAY/32" via "$OP_UNDERLAY" dev eth0
    fi
    python3 - "$WORK/ingest.jsonl" "$WORK/client-$path-$r.jsonl" "$path" >>"$WORK/results" <<'PY'
import json, statistics, sys
ingest = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    ingest.setdefault(d["rtp_ts"], d["t"])
lat, first = [], None
for line in open(sys.argv[2]):
    if not line.startswith("{"):
        continue
    d = json.loads(line)
    if "rtp_ts" in d and d["rtp_ts"] in ingest:
        lat.append((d["t"] - ingest[d["rtp_ts"]]) * 1000)
    if "first_frame_ms" in d:
        first = d["first_frame_ms"]
        fps = d["fps"]
lat = sorted(lat[30:])  # skip the replayed GOP of a late joiner
p = lambda q: lat[min(len(lat) - 1, round((len(lat) - 1) * q))]
print(sys.argv[3], f"{p(0.5):.1f}", f"{p(0.99):.1f}", f"{first:.0f}", f"{fps:.1f}", len(lat))
PY
    tail -1 "$WORK/results" >&2
  done
done

python3 - "$WORK/results" "$ROUNDS" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = {p: [statistics.median(float(r[i]) for r in rows if r[0] == p) for i in (1, 2, 3, 4)]
       for p in ("raw", "myelin")}
print(f"ingest → decoded frame (aiortc), medians of {sys.argv[2]} rounds")
print("| path | latency p50 (ms) | latency p99 (ms) | first frame (ms) | fps |")
print("|---|---:|---:|---:|---:|")
for p in ("raw", "myelin"):
    print(f"| {p} | " + " | ".join(f"{v:.1f}" for v in med[p]) + " |")
print(f"Myelin adds {med['myelin'][0] - med['raw'][0]:.1f} ms at p50, {med['myelin'][1] - med['raw'][1]:.1f} ms at p99")
PY
