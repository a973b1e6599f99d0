"""A ROS-like DDS workload with Cyclone's default discovery and transport (multicast SPDP,
no CYCLONEDDS_URI): `pub` writes --topics topics (rt/topic0 ...) at --rate Hz each, messages
of --size bytes, for --seconds; `sub` reads the first --topics of them for --seconds. Both
print "ready", then one JSON line with "done": true and what they sent or got.

  dds_load.py pub --topics 10 --rate 10 --size 200 --seconds 10
  dds_load.py sub --topics 1 --seconds 12
"""

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

os.environ.pop("CYCLONEDDS_URI", None)

from cyclonedds.core import Policy, Qos  # noqa: E402
from cyclonedds.domain import DomainParticipant  # noqa: E402
from cyclonedds.idl import IdlStruct  # noqa: E402
from cyclonedds.idl.types import int64  # noqa: E402
from cyclonedds.pub import DataWriter  # noqa: E402
from cyclonedds.sub import DataReader  # noqa: E402
from cyclonedds.topic import Topic  # noqa: E402
from cyclonedds.util import duration  # noqa: E402


@dataclass
class Sample(IdlStruct, typename="myelin_test::Sample"):
    seq: int64
    payload: str


QOS = Qos(Policy.Reliability.BestEffort, Policy.History.KeepLast(10))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["pub", "sub"])
    ap.add_argument("--topics", type=int, default=10)
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--size", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    dp = DomainParticipant(0)
    topics = [Topic(dp, f"rt/topic{i}", Sample) for i in range(args.topics)]
    if args.mode == "sub":
        readers = [DataReader(dp, t, qos=QOS) for t in topics]
        print("ready", flush=True)
        got = 0
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            for r in readers:
                got += len(r.take(N=100))
            time.sleep(0.01)
        print(json.dumps({"done": True, "received": got}), flush=True)
        return 0
    writers = [DataWriter(dp, t, qos=QOS) for t in topics]
    print("ready", flush=True)
    payload = "x" * args.size
    start = time.monotonic()
    period = 1.0 / args.rate
    n = 0
    while time.monotonic() - start < args.seconds:
        for w in writers:
            w.write(Sample(seq=n, payload=payload))
        n += 1
        delay = start + n * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print(json.dumps({"done": True, "sent": n * len(writers),
                      "seconds": round(time.monotonic() - start, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
