#!/usr/bin/env bash
# Tunnel latency, Myelin against boringtun-cli 0.7.1, Debian's wireguard-go and the raw veth,
# with every path up at once, each in its own pair of network namespaces, and pings alternating
# between the paths in short bursts. Machine noise on a shared 2-core box drifts over seconds;
# bursts that alternate every ~0.25 s see the same drift, which makes the per-cycle ratio stable
# where separate runs of each path are not. scripts/bench-tunnel.sh uses the same bursts, fewer,
# between its iperf3 runs.
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
start_paths "$@"

echo "bench: $CYCLES cycles of $PINGS pings (-i 0.005) per path, $(nproc) cores, $(uname -r)"
ping_bursts "$CYCLES" "$PINGS"

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
