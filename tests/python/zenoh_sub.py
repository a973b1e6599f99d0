"""A zenoh client (eclipse-zenoh, not our code) that counts samples on a key expression.

  zenoh_sub.py --connect tcp/127.0.0.1:7447 --key robot1/chatter --expect 90 --timeout 30

`--key` may be given several times. Prints "ready" once subscribed, then one JSON line
{"received": N, "keys": [...], "per_key": {key: n}}; exits 0 once it has `--expect` samples,
1 at the timeout.
"""

import argparse
import json
import sys
import threading
import time

import zenoh


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connect", required=True)
    ap.add_argument("--key", required=True, action="append")
    ap.add_argument("--expect", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--quiet", type=float, default=0.0, help="stop after this long without samples")
    a = ap.parse_args()

    conf = zenoh.Config()
    conf.insert_json5("mode", '"client"')
    conf.insert_json5("connect/endpoints", json.dumps([a.connect]))
    conf.insert_json5("scouting/multicast/enabled", "false")
    received = []
    done = threading.Event()
    last_at = [None]

    def on_sample(sample):
        received.append(str(sample.key_expr))
        last_at[0] = time.monotonic()
        if len(received) >= a.expect:
            done.set()

    with zenoh.open(conf) as session:
        _subs = [session.declare_subscriber(k, on_sample) for k in a.key]
        print("ready", flush=True)
        deadline = time.monotonic() + a.timeout
        while not done.wait(0.2) and time.monotonic() < deadline:
            if a.quiet and last_at[0] is not None and time.monotonic() - last_at[0] > a.quiet:
                break
    n = len(received)
    per_key = {k: received.count(k) for k in sorted(set(received))}
    print(json.dumps({"received": n, "keys": sorted(set(received)), "per_key": per_key, "done": True}), flush=True)
    return 0 if n >= a.expect else 1


if __name__ == "__main__":
    sys.exit(main())
