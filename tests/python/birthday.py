"""Many-port ("birthday") probing between an easy and a hard NAT, for the NAT lab's
measurement (tests/nat.rs). Plain UDP, no WireGuard: it measures whether and how fast the
technique finds a path through the two NATs, not the node.

  birthday.py hard EASY_IP EASY_PORT --ports N --seconds S
  birthday.py easy PORT HARD_IP --rate R --seconds S

`hard` opens N sockets on ephemeral ports and sends one datagram from each to the easy side's
public mapping (EASY_IP:EASY_PORT): behind an endpoint-dependent NAT each gets its own public
port, and the easy side's NAT drops them all (it filters by address and port). It prints
"ready", then answers the first datagram that arrives on any of them from that socket.
`easy` binds PORT and sends to distinct random ports of HARD_IP at R datagrams a second: each
opens its own NAT's filter for that port, and one that hits a mapping the hard side opened
gets through. Both print one JSON line ("done": true): whether a two-way path was found, after how many
milliseconds and (easy) probes.
"""

import argparse
import json
import random
import select
import socket
import sys
import time


def hard(args):
    socks = []
    for _ in range(args.ports):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", 0))
        s.setblocking(False)
        socks.append(s)
    target = (args.ip, args.port)
    for s in socks:
        s.sendto(b"open", target)
    print("ready", flush=True)
    start = time.monotonic()
    deadline = start + args.seconds
    while time.monotonic() < deadline:
        readable, _, _ = select.select(socks, [], [], deadline - time.monotonic())
        for s in readable:
            try:
                data, src = s.recvfrom(64)
            except BlockingIOError:
                continue
            if src[0] != args.ip:
                continue
            s.sendto(b"answer", src)
            print(json.dumps({"done": True, "ok": True, "ms": (time.monotonic() - start) * 1000,
                              "local_port": s.getsockname()[1], "from": f"{src[0]}:{src[1]}"}))
            return
    print(json.dumps({"done": True, "ok": False}))


def easy(args):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", args.port))
    s.setblocking(False)
    ports = list(range(1024, 65536))
    random.shuffle(ports)
    start = time.monotonic()
    deadline = start + args.seconds
    sent = 0
    while time.monotonic() < deadline and sent < len(ports):
        due = min(len(ports), int((time.monotonic() - start) * args.rate) + 1)
        while sent < due:
            s.sendto(b"probe", (args.ip, ports[sent]))
            sent += 1
        wait = min(deadline, start + sent / args.rate) - time.monotonic()
        readable, _, _ = select.select([s], [], [], max(0.0, wait))
        if not readable:
            continue
        try:
            data, src = s.recvfrom(64)
        except BlockingIOError:
            continue
        if src[0] != args.ip:
            continue
        # Either the hard side's answer to a probe, or one of its own datagrams let in by a
        # probe to its port: both mean the path works both ways from here.
        s.sendto(b"answer", src)
        print(json.dumps({"done": True, "ok": True, "ms": (time.monotonic() - start) * 1000, "probes": sent,
                          "got": data.decode(errors="replace"), "from": f"{src[0]}:{src[1]}"}))
        return
    print(json.dumps({"done": True, "ok": False, "probes": sent}))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="side", required=True)
    h = sub.add_parser("hard")
    h.add_argument("ip")
    h.add_argument("port", type=int)
    h.add_argument("--ports", type=int, default=256)
    h.add_argument("--seconds", type=float, default=10)
    e = sub.add_parser("easy")
    e.add_argument("port", type=int)
    e.add_argument("ip")
    e.add_argument("--rate", type=float, default=1000)
    e.add_argument("--seconds", type=float, default=10)
    args = p.parse_args()
    {"hard": hard, "easy": easy}[args.side](args)


if __name__ == "__main__":
    sys.exit(main())
