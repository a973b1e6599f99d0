#!/usr/bin/env bash
# Latency under load: ping RTT through each tunnel while iperf3 saturates it in one direction
# (A → B), for the raw veth, boringtun-cli 0.7.1, Debian's wireguard-go and Myelin, every path
# up for the whole run, each in its own pair of network namespaces.
#
#   scripts/bench-load-latency.sh [ROUNDS (default 3)] [DURATION seconds (default 8)] [LABEL=BINARY ...]
#
# Per round, per path, per load (iperf3 TCP, then iperf3 UDP with no rate limit, 1300-byte
# datagrams): iperf3 runs A → B for DURATION seconds; from its second second on, A pings B
# ("with" the load: the echo requests queue behind the bulk) and B pings A ("against" it: the
# requests travel with the ACKs, the replies behind the bulk), 100 pings a second each. Prints
# p50/p99 per path, load and direction over every round's pings, lost pings, the bulk
# throughput, and Myelin's p99 over boringtun-cli's. Each LABEL=BINARY adds another Myelin build
# as a path of its own (e.g. the build before a change). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
DURATION=${2:-8}
shift $(($# < 2 ? $# : 2))
. scripts/bench-common.sh
start_paths "$@"
PINGS=$(((DURATION - 2) * 100))

source_of() { # label: the address B pings A on
  if [ "${TARGET[$1]}" = 10.201.0.2 ]; then echo 10.201.0.1; else echo 10.77.0.1; fi
}

loaded() { # label load: one iperf3 run with pings both ways; appends to $WORK/samples
  local label=$1 load=$2 a=${NS_A[$1]} b=${NS_B[$1]} target=${TARGET[$1]} back flags=()
  back=$(source_of "$label")
  [ "$load" = udp ] && flags=(-u -b 0 -l 1300)
  ip netns exec "$b" iperf3 -s -1 -B "$target" >/dev/null 2>&1 & disown
  wait_for "iperf3 server ($label)" ip netns exec "$b" bash -c "ss -ltn | grep -q ':5201'"
  ip netns exec "$a" iperf3 -c "$target" -t "$DURATION" "${flags[@]}" -J >"$WORK/iperf.json" &
  local iperf=$!
  # Not a synchronisation: the load's first second is its ramp, left out of the samples.
  sleep 1
  ip netns exec "$a" ping -c "$PINGS" -i 0.01 -W 1 "$target" >"$WORK/ping-with" &
  local p1=$!
  ip netns exec "$b" ping -c "$PINGS" -i 0.01 -W 1 "$back" >"$WORK/ping-against" &
  local p2=$!
  wait "$p1" "$p2" "$iperf" || true
  python3 - "$label" "$load" "$WORK" >>"$WORK/samples" <<'PY'
import json, re, sys
label, load, work = sys.argv[1:4]
end = json.load(open(f"{work}/iperf.json")).get("end", {})
summary = end.get("sum_received") or end.get("sum") or {}
mbit = round(summary.get("bits_per_second", 0) / 1e6)
for direction in ("with", "against"):
    text = open(f"{work}/ping-{direction}").read()
    rtts = [float(x) for x in re.findall(r"time=([0-9.]+) ms", text)]
    sent = re.search(r"(\d+) packets transmitted", text)
    sent = int(sent.group(1)) if sent else 0
    print(label, load, direction, mbit, sent - len(rtts), " ".join(map(str, rtts)))
PY
}

echo "bench: $ROUNDS rounds; per path and load, iperf3 A->B ${DURATION}s with $PINGS pings (-i 0.01) each way; $(nproc) cores, $(uname -r)"
for round in $(seq 1 "$ROUNDS"); do
  for load in tcp udp; do
    for label in "${PATHS[@]}"; do
      loaded "$label" "$load"
      tail -2 "$WORK/samples" | awk -v r="$round" '{n=NF-5; printf "  round %s %-14s %s %-8s %6s Mbit/s  %4d pings, %d lost\n", r, $1, $2, $3, $4, n, $5}'
    done
  done
done

python3 - "$WORK/samples" "${PATHS[@]}" <<'PY'
import collections, statistics, sys
samples, labels = sys.argv[1], sys.argv[2:]
rtts, lost, mbit = collections.defaultdict(list), collections.Counter(), collections.defaultdict(list)
for line in open(samples):
    f = line.split()
    key = (f[0], f[1], f[2])
    rtts[key] += map(float, f[5:])
    lost[key] += int(f[4])
    mbit[(f[0], f[1])].append(int(f[3]))
def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p))] if v else float("nan")
print(f"\n  {'path':<14} {'load':<4} {'pings':<8} {'p50 ms':>8} {'p99 ms':>8} {'lost':>5} {'bulk Mbit/s':>12} {'p99 / boringtun-cli':>20}")
for load in ("tcp", "udp"):
    for direction in ("with", "against"):
        base = pct(rtts[("boringtun-cli", load, direction)], 0.99)
        for label in labels:
            v = rtts[(label, load, direction)]
            p99 = pct(v, 0.99)
            print(f"  {label:<14} {load:<4} {direction:<8} {pct(v, 0.5):>8.3f} {p99:>8.3f} "
                  f"{lost[(label, load, direction)]:>5} {statistics.median(mbit[(label, load)]):>12.0f} "
                  f"{p99 / base:>19.2f}x")
        print()
PY
