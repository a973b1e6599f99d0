"""A plain Cyclone DDS publisher or subscriber with Cyclone's DEFAULT discovery: SPDP over
multicast on the interface Cyclone picks, no CYCLONEDDS_URI, no peer list. This is what a
closed DDS stack on a robot does, and what [multicast] must carry over the overlay.

  dds_plain.py sub --topic chatter --expect 100 --timeout 30
  dds_plain.py pub --topic chatter --count 100 --subscribers 2 --timeout 30

Both print "ready" once their entities exist. `sub` prints {"discovered_s": ..} when it
first matches a writer, then one JSON line with "done": true and the count and distinct
sequence numbers received. `pub` waits for `--subscribers` matched readers, publishes, waits
for their acknowledgements, prints its JSON line and keeps serving late joiners until killed.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

os.environ.pop("CYCLONEDDS_URI", None)

from cyclonedds.core import (  # noqa: E402
    InstanceState,
    Policy,
    Qos,
    ReadCondition,
    SampleState,
    ViewState,
    WaitSet,
)
from cyclonedds.domain import DomainParticipant  # noqa: E402
from cyclonedds.idl import IdlStruct  # noqa: E402
from cyclonedds.idl.types import int64  # noqa: E402
from cyclonedds.pub import DataWriter  # noqa: E402
from cyclonedds.sub import DataReader  # noqa: E402
from cyclonedds.topic import Topic  # noqa: E402
from cyclonedds.util import duration  # noqa: E402


@dataclass
class Message(IdlStruct, typename="myelin_test::Message"):
    seq: int64
    text: str


QOS = Qos(
    Policy.Reliability.Reliable(duration(seconds=5)),
    Policy.History.KeepLast(1000),
    Policy.Durability.Volatile,
)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["pub", "sub"])
    ap.add_argument("--topic", default="chatter")
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--expect", type=int, default=100)
    ap.add_argument("--subscribers", type=int, default=1)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--timeout", type=float, default=30.0)
    args = ap.parse_args()
    start = time.monotonic()
    dp = DomainParticipant(0)
    topic = Topic(dp, args.topic, Message)
    deadline = start + args.timeout
    if args.mode == "sub":
        reader = DataReader(dp, topic, qos=QOS)
        waitset = WaitSet(dp)
        waitset.attach(
            ReadCondition(reader, SampleState.NotRead | ViewState.Any | InstanceState.Any))
        print("ready", flush=True)
        discovered = None
        seqs = []
        def waiting():
            # --expect 0: until the first writer is discovered (a late joiner's measure).
            return len(seqs) < args.expect if args.expect > 0 else discovered is None

        while time.monotonic() < deadline and waiting():
            if discovered is None and reader.get_subscription_matched_status().current_count > 0:
                discovered = time.monotonic() - start
                print(json.dumps({"discovered_s": round(discovered, 3)}), flush=True)
            for s in reader.take(N=100):
                seqs.append(s.seq)
            if waiting():
                waitset.wait(duration(milliseconds=50))
        print(json.dumps({
            "done": True,
            "received": len(seqs),
            "unique": len(set(seqs)),
            "discovered_s": None if discovered is None else round(discovered, 3),
        }), flush=True)
        return 0 if not waiting() else 1
    writer = DataWriter(dp, topic, qos=QOS)
    print("ready", flush=True)
    while writer.get_publication_matched_status().current_count < args.subscribers:
        if time.monotonic() > deadline:
            print(json.dumps({"done": True, "matched": writer.get_publication_matched_status().current_count,
                              "error": "subscribers not matched"}), flush=True)
            return 1
        time.sleep(0.02)
    matched_s = time.monotonic() - start
    for i in range(args.count):
        writer.write(Message(seq=i, text=f"message {i}"))
        time.sleep(1.0 / args.rate)
    acked = True
    try:
        writer.wait_for_acknowledgments(duration(seconds=10))
    except Exception:  # noqa: BLE001 - reported, the subscribers' counts decide
        acked = False
    print(json.dumps({"done": True, "matched_s": round(matched_s, 3), "sent": args.count,
                      "acked": acked}), flush=True)
    # Serve late joiners (discovery answers) until the test kills us.
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
