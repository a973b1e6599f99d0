# Sourced by the tunnel benchmarks (bench-tunnel.sh, bench-latency.sh): the machine set up,
# cargo on PATH, boringtun-cli 0.7.1 installed, Myelin built in release as $MYELIN, and
# `wait_for`, a bounded poll.
scripts/setup.sh
. scripts/env.sh
if ! command -v boringtun-cli >/dev/null 2>&1; then
  cargo install boringtun-cli --version 0.7.1 --locked
fi
cargo build --release --locked --quiet
MYELIN="$CARGO_TARGET_DIR/release/myelin"
export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 WG_SUDO=1

wait_for() { # description, command...
  local what=$1; shift
  for _ in $(seq 1 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "bench: timed out waiting for $what" >&2; return 1
}

# A userspace WireGuard pair, boringtun-cli or wireguard-go, between two namespaces joined by
# the 10.201.0.1/2 veth, configured with wg(8) for the overlay 10.77.0.1/2:
#   start_wg PROGRAM NS_A NS_B IF_A IF_B KEY_FILE_A KEY_FILE_B PUBLIC_KEY_A PUBLIC_KEY_B
start_wg() {
  local prog=$1 a=$2 b=$3 ifa=$4 ifb=$5 keya=$6 keyb=$7 puba=$8 pubb=$9 flags=(-f)
  [ "$(basename "$prog")" = boringtun-cli ] && flags=(--foreground --disable-drop-privileges)
  ip netns exec "$a" "$prog" "${flags[@]}" "$ifa" >/dev/null 2>&1 & disown
  ip netns exec "$b" "$prog" "${flags[@]}" "$ifb" >/dev/null 2>&1 & disown
  wait_for "$prog in $a" ip netns exec "$a" wg show "$ifa"
  wait_for "$prog in $b" ip netns exec "$b" wg show "$ifb"
  ip netns exec "$a" wg set "$ifa" private-key "$keya" listen-port 51820 peer "$pubb" allowed-ips 10.77.0.2/32 endpoint 10.201.0.2:51820
  ip netns exec "$b" wg set "$ifb" private-key "$keyb" listen-port 51820 peer "$puba" allowed-ips 10.77.0.1/32 endpoint 10.201.0.1:51820
  ip -n "$a" addr add 10.77.0.1/16 dev "$ifa"; ip -n "$b" addr add 10.77.0.2/16 dev "$ifb"
  ip -n "$a" link set "$ifa" up mtu 1420; ip -n "$b" link set "$ifb" up mtu 1420
}

# Every path of a benchmark stays up for the whole run, each in its own pair of namespaces
# (NS_A[label], NS_B[label]) joined by a veth; TARGET[label] is what node A pings. Needs $WORK.
NAMESPACES=()
cleanup_paths() {
  for ns in "${NAMESPACES[@]}"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$WORK"
  rm -f /var/run/wireguard/bn*"$$".sock
}
PATHS=()
declare -A NS_A NS_B TARGET
add_path() { # label kind [binary]
  local label=$1 kind=$2 bin=${3:-} i=${#PATHS[@]}
  local a=bench-a$i-$$ b=bench-b$i-$$
  NAMESPACES+=("$a" "$b"); PATHS+=("$label"); NS_A[$label]=$a NS_B[$label]=$b
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
      start_wg "$prog" "$a" "$b" "bn${i}a$$" "bn${i}b$$" "$WORK/a$i.key" "$WORK/b$i.key" "$pa" "$pb" ;;
    myelin|myelin-fw)
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
        # 20 inbound rules, as a fleet's policy might have: 18 that match other peers or
        # ports, then ICMP and the iperf3 port.
        if [ "$kind" = myelin-fw ]; then
          {
            echo '[firewall]'
            echo 'default_inbound = "deny"'
            for r in $(seq 1 18); do
              printf '[[firewall.inbound]]\ngroups = ["group%s"]\nproto = "tcp"\nport = "%s"\n' "$r" $((6000 + r))
            done
            printf '[[firewall.inbound]]\nproto = "icmp"\n'
            printf '[[firewall.inbound]]\nhosts = ["%s"]\nproto = "tcp"\nport = "5201"\n' "$peer"
          } >>"$WORK/$side$i.toml"
        fi
      done
      ip netns exec "$a" "$bin" --log-level warn up --config "$WORK/a$i.toml" >/dev/null 2>&1 & disown
      ip netns exec "$b" "$bin" --log-level warn up --config "$WORK/b$i.toml" >/dev/null 2>&1 & disown
      wait_for "$label in $a" ip -n "$a" addr show myelin0
      wait_for "$label in $b" ip -n "$b" addr show myelin0 ;;
  esac
  wait_for "a path to ${TARGET[$label]} ($label)" ip netns exec "$a" ping -c 1 -W 1 "${TARGET[$label]}"
  ip netns exec "$a" ping -c 20 -i 0.01 "${TARGET[$label]}" >/dev/null
}

# The four paths every tunnel benchmark compares.
add_baseline_paths() {
  add_path raw-veth raw
  add_path boringtun-cli boringtun-cli
  add_path wireguard-go wireguard-go
  add_path myelin myelin "$MYELIN"
}

# The run's work directory (removed with every path on exit), the four baseline paths, and one
# more Myelin path per LABEL=BINARY argument (another build, e.g. the one before a change).
start_paths() { # [LABEL=BINARY ...]
  WORK=$(mktemp -d)
  trap cleanup_paths EXIT
  add_baseline_paths
  local extra
  for extra in "$@"; do add_path "${extra%%=*}" myelin "${extra#*=}"; done
}

# Bursts of pings that alternate between the paths: CYCLES cycles of PINGS pings (-i 0.005)
# per path; each sample goes to $WORK/rtt-<label> as "<cycle> <ms>".
ping_bursts() { # cycles pings [first cycle number]
  local cycles=$1 pings=$2 first=${3:-1} c label
  for c in $(seq "$first" $((first + cycles - 1))); do
    for label in "${PATHS[@]}"; do
      ip netns exec "${NS_A[$label]}" ping -c "$pings" -i 0.005 "${TARGET[$label]}" |
        sed -n "s/.*time=\([0-9.]*\) ms/$c \1/p" >>"$WORK/rtt-$label"
    done
  done
}
