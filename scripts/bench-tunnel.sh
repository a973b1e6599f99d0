#!/usr/bin/env bash
# Tunnel throughput and latency, Myelin against baselines measured in the same run:
# raw veth, boringtun-cli 0.7.1, Debian's wireguard-go, and Myelin (release build).
# Two network namespaces joined by a veth; iperf3 TCP for DURATION seconds and 100 pings per
# path and round; rounds are interleaved so machine noise hits every path alike.
#
#   scripts/bench-tunnel.sh [ROUNDS (default 3)] [DURATION seconds (default 10)]
#
# Prints a table of medians over rounds (Mbit/s; ping RTT as the per-round median and mean of
# 100 pings; CPU seconds of the tunnel processes per second) and the ratio Myelin / boringtun-cli. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
DURATION=${2:-10}
. scripts/bench-common.sh
BORINGTUN=$(command -v boringtun-cli)
WORK=$(mktemp -d)
A=mybench-a-$$ B=mybench-b-$$

cleanup() {
  for ns in "$A" "$B"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$WORK"
  rm -f /var/run/wireguard/{bt,wg}[ab]$$r*.sock
}
trap cleanup EXIT

underlay() {
  cleanup_ns_only
  ip netns add "$A"; ip netns add "$B"
  ip link add ua netns "$A" type veth peer name ub netns "$B"
  ip -n "$A" addr add 10.201.0.1/24 dev ua; ip -n "$B" addr add 10.201.0.2/24 dev ub
  for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
  ip -n "$A" link set ua up; ip -n "$B" link set ub up
}
cleanup_ns_only() {
  for ns in "$A" "$B"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
}

keys() {
  KA=$("$MYELIN" keygen); KB=$("$MYELIN" keygen)
  PA=$(echo "$KA" | "$MYELIN" pubkey); PB=$(echo "$KB" | "$MYELIN" pubkey)
  echo "$KA" >"$WORK/a.key"; echo "$KB" >"$WORK/b.key"; chmod 600 "$WORK"/*.key
}

# Userspace WireGuard (boringtun-cli or wireguard-go) configured with wg(8).
setup_wg() { # program
  local prog=$1 tag=wg
  [ "$prog" = "$BORINGTUN" ] && tag=bt
  # UAPI sockets live in /var/run/wireguard, shared by all namespaces: unique names per run.
  keys
  start_wg "$prog" "$A" "$B" "${tag}a$$r$round" "${tag}b$$r$round" "$WORK/a.key" "$WORK/b.key" "$PA" "$PB"
  TARGET=10.77.0.2
}

setup_myelin() {
  keys
  for side in a b; do
    if [ $side = a ]; then me=alpha; addr=10.77.0.1; peer=beta; pk=$PB; ep=10.201.0.2; pa=10.77.0.2
    else me=beta; addr=10.77.0.2; peer=alpha; pk=$PA; ep=10.201.0.1; pa=10.77.0.1; fi
    cat >"$WORK/$side.toml" <<EOF
[node]
name = "$me"
private_key_file = "$WORK/$side.key"
address = ["$addr/16"]
[plugins]
runtime_dir = "$WORK/run-$side"
[[peers]]
name = "$peer"
public_key = "$pk"
endpoint = "$ep:51820"
allowed_ips = ["$pa/32"]
EOF
  done
  ip netns exec "$A" "$MYELIN" --log-level warn up --config "$WORK/a.toml" & disown
  ip netns exec "$B" "$MYELIN" --log-level warn up --config "$WORK/b.toml" & disown
  wait_for "myelin in $A" ip -n "$A" addr show myelin0
  wait_for "myelin in $B" ip -n "$B" addr show myelin0
  TARGET=10.77.0.2
}

setup_raw() { TARGET=10.201.0.2; }

cpu_ticks() { # total utime+stime of the processes in both namespaces, except iperf3
  local t=0
  for ns in "$A" "$B"; do
    for pid in $(ip netns pids "$ns"); do
      [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = iperf3 ] && continue
      t=$((t + $(awk '{print $14 + $15}' /proc/"$pid"/stat 2>/dev/null || echo 0)))
    done
  done
  echo $t
}

measure() { # name
  local name=$1
  wait_for "a path to $TARGET" ip netns exec "$A" ping -c 1 -W 1 "$TARGET"
  local rtt rtt_mean
  # 100 pings; the median of the per-packet RTTs (the mean is printed too).
  ip netns exec "$A" ping -c 100 -i 0.02 "$TARGET" | sed -n 's/.*time=\([0-9.]*\) ms/\1/p' >"$WORK/ping"
  read -r rtt rtt_mean < <(python3 -c "import statistics,sys; v=[float(x) for x in open(sys.argv[1])]; print(round(statistics.median(v),3), round(statistics.mean(v),3))" "$WORK/ping")
  ip netns exec "$B" iperf3 -s -1 -B "$TARGET" >/dev/null 2>&1 & disown
  wait_for "iperf3 server" ip netns exec "$B" bash -c "ss -ltn | grep -q ':5201'"
  local t0 t1
  t0=$(cpu_ticks)
  local mbit
  mbit=$(ip netns exec "$A" iperf3 -c "$TARGET" -t "$DURATION" -J | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6))')
  t1=$(cpu_ticks)
  local cpu
  cpu=$(python3 -c "print(round(($t1 - $t0) / $(getconf CLK_TCK) / $DURATION, 2))")
  echo "$name $mbit $rtt $cpu $rtt_mean" >>"$WORK/results"
  printf '  %-14s %8s Mbit/s  rtt median %6s ms (mean %6s)  cpu %5s s/s\n' "$name" "$mbit" "$rtt" "$rtt_mean" "$cpu"
}

echo "bench: $ROUNDS rounds, iperf3 TCP ${DURATION}s, $(nproc) cores, $(uname -r)"
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round"
  underlay; setup_raw; measure raw-veth
  underlay; setup_wg "$BORINGTUN"; measure boringtun-cli
  underlay; setup_wg wireguard-go; measure wireguard-go
  underlay; setup_myelin; measure myelin
done
cleanup_ns_only

python3 - "$WORK/results" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, mbit, rtt, cpu, rtt_mean = line.split()
    rows.setdefault(name, []).append((float(mbit), float(rtt), float(cpu), float(rtt_mean)))
print("\nmedians:")
print(f"  {'path':<14} {'Mbit/s':>8} {'rtt p50 ms':>11} {'rtt mean ms':>12} {'cpu s/s':>8}")
med = {}
for name in ["raw-veth", "boringtun-cli", "wireguard-go", "myelin"]:
    r = rows.get(name, [])
    if not r:
        continue
    m = tuple(statistics.median(x[i] for x in r) for i in range(4))
    med[name] = m
    print(f"  {name:<14} {m[0]:>8.0f} {m[1]:>11.3f} {m[3]:>12.3f} {m[2]:>8.2f}")
if "myelin" in med and "boringtun-cli" in med:
    print(f"\nmyelin / boringtun-cli: throughput {med['myelin'][0] / med['boringtun-cli'][0]:.2f}x, "
          f"rtt p50 {med['myelin'][1] / med['boringtun-cli'][1]:.2f}x, rtt mean {med['myelin'][3] / med['boringtun-cli'][3]:.2f}x")
if "myelin" in med and "wireguard-go" in med:
    print(f"myelin / wireguard-go:  throughput {med['myelin'][0] / med['wireguard-go'][0]:.2f}x")
EOF
