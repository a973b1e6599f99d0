# Sourced by the whole-system benchmarks that measure a running lab (bench-idle.sh,
# bench-memory.sh): the machine set up, Myelin built as $MYELIN (the release profile, or the
# profile robots ship, `dist`, with MYELIN_PROFILE=dist; or MYELIN_BIN, built before), and
#   lab_start DIR [lab up options...]  a detached 3-node lab in DIR, every node settled
#                                      (enabled plugins running, robots' interlocks armed),
#                                      its "name pid" lines in $LAB_NODES
#   tree PID                           PID and every descendant
#   iperf3_server DIR NODE             a one-shot iperf3 server in NODE, listening on return
scripts/setup.sh >/dev/null
. scripts/env.sh
MYELIN_PROFILE="${MYELIN_PROFILE:-release}"
if [ -n "${MYELIN_BIN:-}" ]; then # a binary built before (another commit, another profile)
  MYELIN="$MYELIN_BIN"
else
  cargo build --profile "$MYELIN_PROFILE" --locked --quiet
  MYELIN="$CARGO_TARGET_DIR/$MYELIN_PROFILE/myelin"
fi

settled() { # dir node: every enabled plugin running; robots' interlocks armed
  local dir=$1 node=$2
  "$MYELIN" lab exec --dir "$dir" "$node" -- "$MYELIN" plugins --json | python3 -c '
import json, sys
v = json.load(sys.stdin)
ps = v["plugins"] if isinstance(v, dict) else v
sys.exit(0 if all(p["state"] == "running" for p in ps if p["enabled"]) else 1)' || return 1
  [ "$node" = operator ] && return 0
  if "$MYELIN" lab exec --dir "$dir" "$node" -- "$MYELIN" plugins --json | grep -q '"safety"'; then
    "$MYELIN" lab exec --dir "$dir" "$node" -- "$MYELIN" safety status | grep -q "armed: motion permitted"
  fi
}

lab_start() { # dir [lab up options...]
  local dir=$1; shift
  chmod 755 "$dir" # the plugins' unprivileged user must enter it (mktemp makes it 0700)
  "$MYELIN" lab down --dir "$dir" >/dev/null 2>&1 || true
  "$MYELIN" lab up --nodes 3 --dir "$dir" --detach "$@" >/dev/null
  LAB_NODES=$("$MYELIN" lab status --dir "$dir" --json | python3 -c 'import json,sys; [print(n["name"], n["pid"]) for n in json.load(sys.stdin)["nodes"]]')
  local name i
  while read -r name _; do
    for i in $(seq 1 600); do settled "$dir" "$name" && break; sleep 0.2
      [ "$i" = 600 ] && { echo "lab: $name did not settle in 120 s" >&2; return 1; }
    done
  done <<<"$LAB_NODES"
}

tree() { # pid: the pid and every descendant
  local p=$1; echo "$p"
  for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do tree "$c"; done
}

iperf3_server() { # dir node: a one-shot iperf3 server on port 5201, listening when this returns
  local dir=$1 node=$2 i
  "$MYELIN" lab exec --dir "$dir" "$node" -- iperf3 -s -1 >/dev/null 2>&1 &
  for i in $(seq 1 100); do
    "$MYELIN" lab exec --dir "$dir" "$node" -- ss -ltn | grep -q ':5201 ' && return 0
    sleep 0.1
  done
  echo "lab: iperf3 did not listen in $node" >&2
  return 1
}
