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
