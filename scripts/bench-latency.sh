#!/usr/bin/env bash
# Tunnel latency, Myelin against boringtun-cli 0.7.1, Debian's wireguard-go and the raw veth,
# with every path up at once, each in its own pair of network namespaces, and pings alternating
# between the paths in short bursts. Machine noise on a shared 2-core box drifts over seconds;
# bursts that alternate every ~0.25 s see the same drift, which makes the per-cycle ratio stable
# where separate runs of each path are not (scripts/bench-tunnel.sh measures throughput).
#
#   scripts/bench-latency.sh [CYCLES (default 25)] [PINGS per burst (default 50)] [LABEL=BINARY ...]
#
# Each LABEL=BINARY adds another Myelin build as a path of its own (to compare data-plane
# layouts). Prints, per path, the median, mean and p90 of all pings, and the median over cycles
# of the ratio to boringtun-cli's burst in the same cycle. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
CYCLES=${1:-25}
PINGS=${2:-50}
shift $(($# < 2 ? $# : 2))
. scripts/bench-common.sh
WORK=$(mktemp -d)
NAMESPACES=()
cleanup() {
  for ns in "${NAMESPACES[@]}"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$WORK"
  rm -f /var/run/wireguard/lat*"$$"*.sock
}
trap cleanup EXIT

PATHS=()
declare -A NS_A TARGET
add_path() { # label kind [binary]
  local label=$1 kind=$2 bin=${3:-} i=${#PATHS[@]}
  local a=lat-a$i-$$ b=lat-b$i-$$
  NAMESPACES+=("$a" "$b"); PATHS+=("$label"); NS_A[$label]=$a
  ip netns add "$a"; ip netns add "$b"
  ip link add ua netns "$a" type veth peer name ub netns "$b"
  ip -n "$a" addr add 10.201.0.1/24 dev ua; ip -n "$b" addr add 10.201.0.2/24 dev ub
  for ns in "$a" "$b"; do ip -n "$ns" link set lo up; done
  ip -n "$a" link set ua up; ip -n "$b" link set ub up
  local ka kb pa pb
  ka=$("$MYELIN" keygen); kb=$("$MYELIN" keygen)
  pa=$(echo "$ka" | "$MYELIN" pubkey); pb=$(echo "$kb" | "$MYELIN" pubkey)
  echo "$ka" >"$WORK/a$i.key"; echo "$kb" >"$WORK/b$i.key"; chmod 600 "$WORK"/*.key
  TARGET[$label]=10.77.0.2
  case $kind in
    raw) TARGET[$label]=10.201.0.2 ;;
    boringtun-cli|wireguard-go)
      local prog=wireguard-go
      [ "$kind" = boringtun-cli ] && prog=$(command -v boringtun-cli)
      start_wg "$prog" "$a" "$b" "lat${i}a$$" "lat${i}b$$" "$WORK/a$i.key" "$WORK/b$i.key" "$pa" "$pb" ;;
    myelin)
      local side me addr peer pk ep pa_
      for side in a b; do
        if [ $side = a ]; then me=alpha addr=10.77.0.1 peer=beta pk=$pb ep=10.201.0.2 pa_=10.77.0.2
        else me=beta addr=10.77.0.2 peer=alpha pk=$pa ep=10.201.0.1 pa_=10.77.0.1; fi
        cat >"$WORK/$side$i.toml" <<EOF
[node]
name = "$me"
private_key_file = "$WORK/$side$i.key"
address = ["$addr/16"]
[plugins]
runtime_dir = "$WORK/run-$side$i"
[[peers]]
name = "$peer"
public_key = "$pk"
endpoint = "$ep:51820"
allowed_ips = ["$pa_/32"]
EOF
      done
      ip netns exec "$a" "$bin" --log-level warn up --config "$WORK/a$i.toml" >/dev/null 2>&1 & disown
      ip netns exec "$b" "$bin" --log-level warn up --config "$WORK/b$i.toml" >/dev/null 2>&1 & disown
      wait_for "$label in $a" ip -n "$a" addr show myelin0
      wait_for "$label in $b" ip -n "$b" addr show myelin0 ;;
  esac
  wait_for "a path to ${TARGET[$label]} ($label)" ip netns exec "$a" ping -c 1 -W 1 "${TARGET[$label]}"
  ip netns exec "$a" ping -c 20 -i 0.01 "${TARGET[$label]}" >/dev/null
}

add_path raw-veth raw
add_path boringtun-cli boringtun-cli
add_path wireguard-go wireguard-go
add_path myelin myelin "$MYELIN"
for extra in "$@"; do add_path "${extra%%=*}" myelin "${extra#*=}"; done

echo "bench: $CYCLES cycles of $PINGS pings (-i 0.005) per path, $(nproc) cores, $(uname -r)"
for c in $(seq 1 "$CYCLES"); do
  for label in "${PATHS[@]}"; do
    ip netns exec "${NS_A[$label]}" ping -c "$PINGS" -i 0.005 "${TARGET[$label]}" |
      sed -n "s/.*time=\([0-9.]*\) ms/$c \1/p" >>"$WORK/rtt-$label"
  done
done

python3 - "$WORK" "${PATHS[@]}" <<'EOF'
import collections, statistics, sys
work, labels = sys.argv[1], sys.argv[2:]
runs = {}
for label in labels:
    per = collections.defaultdict(list)
    for line in open(f"{work}/rtt-{label}"):
        cycle, ms = line.split()
        per[int(cycle)].append(float(ms))
    runs[label] = per
base = runs["boringtun-cli"]
print(f"\n  {'path':<16} {'pings':>6} {'p50 ms':>8} {'mean ms':>8} {'p90 ms':>8} {'/ boringtun-cli':>16} {'cycles faster':>14}")
for label in labels:
    every = sorted(v for burst in runs[label].values() for v in burst)
    ratios = [statistics.median(b) / statistics.median(base[c]) for c, b in runs[label].items() if c in base]
    faster = sum(r < 1 for r in ratios)
    print(f"  {label:<16} {len(every):>6} {statistics.median(every):>8.3f} {statistics.mean(every):>8.3f} "
          f"{every[len(every) * 9 // 10]:>8.3f} {statistics.median(ratios):>15.3f}x {faster:>8}/{len(ratios)}")
EOF
