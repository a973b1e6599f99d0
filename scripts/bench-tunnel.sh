#!/usr/bin/env bash
# Tunnel throughput and latency, Myelin against baselines measured in the same run: raw veth,
# boringtun-cli 0.7.1, Debian's wireguard-go, and Myelin (release build).
#
#   scripts/bench-tunnel.sh [ROUNDS (default 3)] [DURATION seconds (default 10)] [--firewall]
#
# --firewall adds a fifth path: Myelin with a 20-rule [firewall] on both ends (the cost of the
# policy; compare with the plain Myelin path of the same run).
#
# Every path is up for the whole run, each in its own pair of network namespaces joined by a
# veth. Per round: iperf3 TCP for DURATION seconds on each path in turn (CPU of the tunnel
# processes measured meanwhile), then 10 cycles of 20 pings (-i 0.005) that alternate between
# the paths, so that the machine's drift over a round hits every path's RTT alike. Prints a
# table of medians over rounds (Mbit/s; ping RTT median and mean of the round's pings; CPU
# seconds of the tunnel processes per second) and the ratios Myelin / boringtun-cli. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
DURATION=${2:-10}
. scripts/bench-common.sh
WORK=$(mktemp -d)
trap cleanup_paths EXIT
add_baseline_paths
if [ "${3:-}" = --firewall ]; then add_path myelin-fw myelin-fw "$MYELIN"; fi
# Another Myelin build in the same run (e.g. an older commit, to tell a regression from the
# machine): MYELIN_BASELINE=/path/to/myelin scripts/bench-tunnel.sh
if [ -n "${MYELIN_BASELINE:-}" ]; then add_path myelin-base myelin "$MYELIN_BASELINE"; fi

cpu_ticks() { # label: total utime+stime of the path's processes, except iperf3
  local t=0 ns pid
  for ns in "${NS_A[$1]}" "${NS_B[$1]}"; do
    for pid in $(ip netns pids "$ns"); do
      [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = iperf3 ] && continue
      t=$((t + $(awk '{print $14 + $15}' /proc/"$pid"/stat 2>/dev/null || echo 0)))
    done
  done
  echo $t
}

throughput() { # label: prints "Mbit/s cpu-s/s"
  local label=$1 a=${NS_A[$1]} b=${NS_B[$1]} target=${TARGET[$1]} t0 t1 mbit
  ip netns exec "$b" iperf3 -s -1 -B "$target" >/dev/null 2>&1 & disown
  wait_for "iperf3 server ($label)" ip netns exec "$b" bash -c "ss -ltn | grep -q ':5201'"
  t0=$(cpu_ticks "$label")
  mbit=$(ip netns exec "$a" iperf3 -c "$target" -t "$DURATION" -J |
    python3 -c 'import json,sys; print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6))')
  t1=$(cpu_ticks "$label")
  echo "$mbit $(python3 -c "print(round(($t1 - $t0) / $(getconf CLK_TCK) / $DURATION, 2))")"
}

echo "bench: $ROUNDS rounds, iperf3 TCP ${DURATION}s, 10 x 20 alternating pings per path, $(nproc) cores, $(uname -r)"
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round"
  declare -A MBIT CPU
  for label in "${PATHS[@]}"; do
    read -r "MBIT[$label]" "CPU[$label]" < <(throughput "$label")
  done
  rm -f "$WORK"/rtt-*
  ping_bursts 10 20
  for label in "${PATHS[@]}"; do
    read -r rtt rtt_mean < <(python3 -c "import statistics,sys; v=[float(l.split()[1]) for l in open(sys.argv[1])]; print(round(statistics.median(v),3), round(statistics.mean(v),3))" "$WORK/rtt-$label")
    echo "$label ${MBIT[$label]} $rtt ${CPU[$label]} $rtt_mean" >>"$WORK/results"
    printf '  %-14s %8s Mbit/s  rtt median %6s ms (mean %6s)  cpu %5s s/s\n' "$label" "${MBIT[$label]}" "$rtt" "$rtt_mean" "${CPU[$label]}"
  done
done

python3 - "$WORK/results" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, mbit, rtt, cpu, rtt_mean = line.split()
    rows.setdefault(name, []).append((float(mbit), float(rtt), float(cpu), float(rtt_mean)))
print("\nmedians:")
print(f"  {'path':<14} {'Mbit/s':>8} {'rtt p50 ms':>11} {'rtt mean ms':>12} {'cpu s/s':>8}")
med = {}
for name in ["raw-veth", "boringtun-cli", "wireguard-go", "myelin", "myelin-fw", "myelin-base"]:
    r = rows.get(name, [])
    if not r:
        continue
    m = tuple(statistics.median(x[i] for x in r) for i in range(4))
    med[name] = m
    print(f"  {name:<14} {m[0]:>8.0f} {m[1]:>11.3f} {m[3]:>12.3f} {m[2]:>8.2f}")
if "myelin" in med and "boringtun-cli" in med:
    print(f"\nmyelin / boringtun-cli: throughput {med['myelin'][0] / med['boringtun-cli'][0]:.2f}x, "
          f"rtt p50 {med['myelin'][1] / med['boringtun-cli'][1]:.2f}x, rtt mean {med['myelin'][3] / med['boringtun-cli'][3]:.2f}x")
if "myelin" in med and "myelin-fw" in med:
    print(f"myelin with 20 firewall rules / without: throughput {med['myelin-fw'][0] / med['myelin'][0]:.3f}x, "
          f"rtt p50 {med['myelin-fw'][1] / med['myelin'][1]:.2f}x")
if "myelin" in med and "myelin-base" in med:
    print(f"myelin / myelin-base (MYELIN_BASELINE): throughput {med['myelin'][0] / med['myelin-base'][0]:.3f}x, "
          f"rtt p50 {med['myelin'][1] / med['myelin-base'][1]:.2f}x")
if "myelin" in med and "wireguard-go" in med:
    print(f"myelin / wireguard-go:  throughput {med['myelin'][0] / med['wireguard-go'][0]:.2f}x")
EOF
