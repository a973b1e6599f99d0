#!/usr/bin/env bash
# The main job until `myelin lab` exists: builds Myelin, starts two nodes (robot1 and operator)
# in their own network namespaces joined by a veth, waits for the encrypted tunnel, pings
# across it, and prints each node's status and peers. Runs until Ctrl-C, then removes
# everything it made. `--once` prints and exits. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
ONCE=${1:-}
scripts/setup.sh
. scripts/env.sh
cargo build --release --locked --features chaos
MYELIN="$CARGO_TARGET_DIR/release/myelin"
WORK=/tmp/myelin-demo
ROBOT=myelin-demo-robot1 OPERATOR=myelin-demo-operator

cleanup() {
  for ns in "$ROBOT" "$OPERATOR"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
  done
  for ns in "$ROBOT" "$OPERATOR"; do
    for _ in $(seq 1 50); do [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break; sleep 0.1; done
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
}
trap cleanup EXIT
cleanup
rm -rf "$WORK"; mkdir -p "$WORK"

ip netns add "$ROBOT"; ip netns add "$OPERATOR"
ip link add veth-robot netns "$ROBOT" type veth peer name veth-op netns "$OPERATOR"
ip -n "$ROBOT" addr add 10.203.0.1/24 dev veth-robot
ip -n "$OPERATOR" addr add 10.203.0.2/24 dev veth-op
for ns in "$ROBOT" "$OPERATOR"; do ip -n "$ns" link set lo up; done
ip -n "$ROBOT" link set veth-robot up; ip -n "$OPERATOR" link set veth-op up

"$MYELIN" init --name robot1 --address 10.77.0.1/16 --address fd77::1/64 --dir "$WORK/robot1" >/dev/null
"$MYELIN" init --name operator --address 10.77.0.2/16 --address fd77::2/64 --dir "$WORK/operator" >/dev/null
pub() { "$MYELIN" pubkey <"$WORK/$1/private.key"; }
cat >>"$WORK/robot1/myelin.toml" <<EOF

[[peers]]
name = "operator"
public_key = "$(pub operator)"
endpoint = "10.203.0.2:51820"
allowed_ips = ["10.77.0.2/32", "fd77::2/128"]

[plugins]
runtime_dir = "$WORK/robot1/run"

# A plugin that runs and answers health checks; try
#   ip netns exec $ROBOT $MYELIN plugins restart heartbeat
[plugins.heartbeat]
plugin = "chaos"
mode = "none"
EOF
cat >>"$WORK/operator/myelin.toml" <<EOF

[[peers]]
name = "robot1"
public_key = "$(pub robot1)"
endpoint = "10.203.0.1:51820"
allowed_ips = ["10.77.0.1/32", "fd77::1/128"]
EOF

ip netns exec "$ROBOT" "$MYELIN" up --config "$WORK/robot1/myelin.toml" >"$WORK/robot1.log" 2>&1 &
ip netns exec "$OPERATOR" "$MYELIN" up --config "$WORK/operator/myelin.toml" >"$WORK/operator.log" 2>&1 &

echo "waiting for the tunnel (robot1 10.77.0.1 <-> operator 10.77.0.2)..."
for i in $(seq 1 50); do
  ip netns exec "$OPERATOR" ping -c 1 -W 0.3 10.77.0.1 >/dev/null 2>&1 && break
  if [ "$i" = 50 ]; then echo "no tunnel after 15 s; logs in $WORK/*.log" >&2; exit 1; fi
done
ip netns exec "$OPERATOR" ping -c 3 -i 0.2 10.77.0.1
echo
echo "== robot1: myelin status"
ip netns exec "$ROBOT" "$MYELIN" status
echo
echo "== robot1: myelin peers"
ip netns exec "$ROBOT" "$MYELIN" peers
echo
echo "== robot1: myelin plugins"
ip netns exec "$ROBOT" "$MYELIN" plugins
echo
echo "control API (inside the robot's namespace): http://127.0.0.1:7800/api/v1/status"
echo "  e.g. ip netns exec $ROBOT curl -s http://127.0.0.1:7800/api/v1/peers"
echo "logs: $WORK/robot1.log $WORK/operator.log"
if [ "$ONCE" = "--once" ]; then exit 0; fi
echo "running; Ctrl-C stops both nodes and removes the namespaces"
wait
