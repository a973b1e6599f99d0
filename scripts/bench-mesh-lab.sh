#!/usr/bin/env bash
# A lab of N nodes (default 50: an operator and N-1 robots) forming its mesh through one
# lighthouse, every node enrolled with `myelin join`: the time from the members' start until the
# operator has a session with every robot, and until the full mesh is up; then the lighthouse's
# CPU and memory (RSS, USS) while it serves them. Release build, as root.
# Usage: scripts/bench-mesh-lab.sh [NODES] [--with-plugins]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
. scripts/env.sh
cargo build --release --locked --quiet
MYELIN="$CARGO_TARGET_DIR/release/myelin"
NODES=${1:-50}
FLAGS=(--no-plugins)
[ "${2:-}" = --with-plugins ] && FLAGS=()
DIR=$(mktemp -d /tmp/myelin-meshlab.XXXXXX)
trap '"$MYELIN" lab down --dir "$DIR" >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT
"$MYELIN" lab down --dir "$DIR" >/dev/null 2>&1 || true
start=$(date +%s.%N)
"$MYELIN" lab up --nodes "$NODES" --dir "$DIR" --detach "${FLAGS[@]}" | tee "$DIR/up.txt" | grep -E "operator had|handshakes: [0-9]+/[0-9]+$" | tail -2
end=$(date +%s.%N)
echo "lab up (namespaces, $NODES joins, start, full mesh): $(python3 -c "print(f'{$end-$start:.1f}')") s"
lh_pid=$("$MYELIN" lab status --dir "$DIR" --json | python3 -c 'import json,sys; print([n["pid"] for n in json.load(sys.stdin)["nodes"] if n["name"]=="lighthouse"][0])')
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
t0=$(ticks "$lh_pid"); w0=$(date +%s.%N)
# The measurement window: the mesh is left alone (registrations every 30 s, probes).
sleep 30
t1=$(ticks "$lh_pid"); w1=$(date +%s.%N)
python3 - "$lh_pid" "$t0" "$t1" "$w0" "$w1" "$hz" "$NODES" <<'PY'
import sys
pid, t0, t1, w0, w1, hz, nodes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
rss = uss = 0
for line in open(f"/proc/{pid}/smaps_rollup"):
    k, v = line.split(":", 1)
    kb = int(v.split()[0]) if v.split() and v.split()[0].isdigit() else 0
    if k == "Rss": rss = kb
    if k in ("Private_Clean", "Private_Dirty"): uss += kb
print(f"lighthouse serving {nodes} members: CPU {(t1-t0)/hz/(w1-w0)*100:.2f} % of a core over {w1-w0:.0f} s, RSS {rss/1024:.1f} MiB, USS {uss/1024:.1f} MiB")
PY
