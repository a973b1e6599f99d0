"""An emulated ROS 2 node made of plain Cyclone DDS, for tests without a ROS install.

The zenoh ROS 2 bridge routes only readers and writers that belong to a ROS node, i.e. that
the node's participant announces on `ros_discovery_info` (rmw_dds_common
ParticipantEntitiesInfo, 16-byte Gids = DDS GUIDs since Iron). This script creates the topic
entities and that announcement, with the DDS settings rmw_cyclonedds uses for
ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST.

  ros_node.py pub --topic rt/chatter --count 100 --rate 20
  ros_node.py sub --topic rt/robot1/chatter --expect 95 --timeout 30

`sub` prints one JSON line {"received": N, "first": ..., "last": ...} and exits 0 once it has
`--expect` messages, or 1 at the timeout (or after `--quiet` seconds without messages). `pub --count 0` publishes until killed; with `--go`
it waits for a line on stdin before publishing, so a test can first see the routes set up.
Both print "ready" on stdout once their entities are announced.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

# The same discovery settings rmw_cyclonedds generates for the LOCALHOST range.
os.environ.setdefault(
    "CYCLONEDDS_URI",
    "<CycloneDDS><Domain><General><AllowMulticast>false</AllowMulticast></General>"
    "<Discovery><ParticipantIndex>auto</ParticipantIndex>"
    "<MaxAutoParticipantIndex>32</MaxAutoParticipantIndex>"
    "<Peers><Peer address=\"localhost\"/></Peers></Discovery></Domain></CycloneDDS>",
)

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
from cyclonedds.idl.types import array, float64, sequence, uint8  # noqa: E402
from cyclonedds.pub import DataWriter  # noqa: E402
from cyclonedds.sub import DataReader  # noqa: E402
from cyclonedds.topic import Topic  # noqa: E402
from cyclonedds.util import duration  # noqa: E402


@dataclass
class Gid(IdlStruct, typename="rmw_dds_common::msg::dds_::Gid_"):
    data: array[uint8, 16]


@dataclass
class NodeEntitiesInfo(IdlStruct, typename="rmw_dds_common::msg::dds_::NodeEntitiesInfo_"):
    node_namespace: str
    node_name: str
    reader_gid_seq: sequence[Gid]
    writer_gid_seq: sequence[Gid]


@dataclass
class ParticipantEntitiesInfo(
    IdlStruct, typename="rmw_dds_common::msg::dds_::ParticipantEntitiesInfo_"
):
    gid: Gid
    node_entities_info_seq: sequence[NodeEntitiesInfo]


@dataclass
class String(IdlStruct, typename="std_msgs::msg::dds_::String_"):
    data: str


@dataclass
class Bool(IdlStruct, typename="std_msgs::msg::dds_::Bool_"):
    data: bool


@dataclass
class Vector3(IdlStruct, typename="geometry_msgs::msg::dds_::Vector3_"):
    x: float64
    y: float64
    z: float64


@dataclass
class Twist(IdlStruct, typename="geometry_msgs::msg::dds_::Twist_"):
    linear: Vector3 = field(default_factory=lambda: Vector3(0.0, 0.0, 0.0))
    angular: Vector3 = field(default_factory=lambda: Vector3(0.0, 0.0, 0.0))


TYPES = {"string": String, "bool": Bool, "twist": Twist}

# ROS 2 default topic QoS: reliable, volatile, keep last 10.
TOPIC_QOS = Qos(Policy.Reliability.Reliable(duration(seconds=1)), Policy.History.KeepLast(10))
# ros_discovery_info: reliable, transient local, keep last 1.
DISCOVERY_QOS = Qos(
    Policy.Reliability.Reliable(duration(seconds=1)),
    Policy.Durability.TransientLocal,
    Policy.History.KeepLast(1),
)


def gid(entity) -> Gid:
    return Gid(list(entity.guid.bytes))


def announce(dp, namespace, name, readers, writers):
    topic = Topic(dp, "ros_discovery_info", ParticipantEntitiesInfo)
    writer = DataWriter(dp, topic, qos=DISCOVERY_QOS)
    info = ParticipantEntitiesInfo(
        gid=gid(dp),
        node_entities_info_seq=[
            NodeEntitiesInfo(
                node_namespace=namespace,
                node_name=name,
                reader_gid_seq=[gid(r) for r in readers],
                writer_gid_seq=[gid(w) for w in writers],
            )
        ],
    )
    writer.write(info)
    return writer


def make(kind, i):
    if kind == "string":
        return String(data=f"hello {i}")
    if kind == "bool":
        return Bool(data=True)
    return Twist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["pub", "sub"])
    ap.add_argument("--topic", required=True, help="DDS topic name, e.g. rt/chatter")
    ap.add_argument("--type", default="string", choices=sorted(TYPES))
    ap.add_argument("--namespace", default="/")
    ap.add_argument("--name", default="emulated")
    ap.add_argument("--domain", type=int, default=0)
    ap.add_argument("--count", type=int, default=100, help="pub: messages to send, 0 = forever")
    ap.add_argument("--rate", type=float, default=20.0, help="pub: messages per second")
    ap.add_argument("--expect", type=int, default=1, help="sub: messages to wait for")
    ap.add_argument("--timeout", type=float, default=30.0, help="sub: seconds to wait")
    ap.add_argument("--go", action="store_true", help="pub: wait for a line on stdin first")
    ap.add_argument(
        "--print",
        action="store_true",
        help="sub: print every sample as {\"t_ms\": unix ms, \"data\": value}",
    )
    ap.add_argument(
        "--quiet",
        type=float,
        default=0.0,
        help="sub: also stop once messages arrived and then none for this many seconds",
    )
    a = ap.parse_args()

    dp = DomainParticipant(a.domain)
    topic = Topic(dp, a.topic, TYPES[a.type])
    if a.role == "pub":
        w = DataWriter(dp, topic, qos=TOPIC_QOS)
        _keep = announce(dp, a.namespace, a.name, [], [w])
        print("ready", flush=True)
        if a.go:
            sys.stdin.readline()
        i = 0
        while a.count == 0 or i < a.count:
            w.write(make(a.type, i))
            i += 1
            time.sleep(1.0 / a.rate)  # the publishing rate, not synchronisation
        # Let reliable delivery finish before the writer goes away.
        time.sleep(1.0)
        return 0
    r = DataReader(dp, topic, qos=TOPIC_QOS)
    _keep = announce(dp, a.namespace, a.name, [r], [])
    print("ready", flush=True)
    received, first, last = 0, None, None
    deadline = time.monotonic() + a.timeout
    waitset = WaitSet(dp)
    waitset.attach(ReadCondition(r, SampleState.NotRead | ViewState.Any | InstanceState.Any))
    last_at = None
    while received < a.expect and time.monotonic() < deadline:
        if a.quiet and last_at is not None and time.monotonic() - last_at > a.quiet:
            break
        waitset.wait(duration(milliseconds=200))
        for sample in r.take(N=100):
            last_at = time.monotonic()
            received += 1
            value = getattr(sample, "data", None)
            if a.print:
                print(json.dumps({"t_ms": time.time() * 1000.0, "data": value}), flush=True)
            first = value if first is None else first
            last = value
    print(json.dumps({"received": received, "first": first, "last": last, "done": True}), flush=True)
    return 0 if received >= a.expect else 1


if __name__ == "__main__":
    sys.exit(main())
