"""A zenoh client (eclipse-zenoh) that puts CDR-encoded ROS messages on a key, the way a
plugin such as safety reaches a robot's local ROS subscribers through the zenoh router.

  zenoh_put.py --connect tcp/127.0.0.1:7447 --key robot1/e_stop --bool true --count 100

Prints "ready" once the session is open, then {"sent": N}.
"""

import argparse
import json
import sys
import time

import zenoh

# CDR little-endian encapsulation header, as ROS 2 middlewares write it.
CDR_LE = bytes([0x00, 0x01, 0x00, 0x00])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connect", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--bool", choices=["true", "false"], default="true")
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--rate", type=float, default=50.0)
    a = ap.parse_args()

    conf = zenoh.Config()
    conf.insert_json5("mode", '"client"')
    conf.insert_json5("connect/endpoints", json.dumps([a.connect]))
    conf.insert_json5("scouting/multicast/enabled", "false")
    payload = CDR_LE + bytes([1 if a.bool == "true" else 0])
    with zenoh.open(conf) as session:
        publisher = session.declare_publisher(a.key)
        print("ready", flush=True)
        for _ in range(a.count):
            publisher.put(payload)
            time.sleep(1.0 / a.rate)  # the sending rate, not synchronisation
    print(json.dumps({"sent": a.count, "done": True}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
