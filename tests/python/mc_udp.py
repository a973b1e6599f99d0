"""Plain UDP multicast with no interface named anywhere: the kernel's route for the group
decides (the one [multicast] installs on the TUN).

  mc_udp.py recv GROUP PORT --seconds S     joins GROUP on interface 0, counts datagrams
  mc_udp.py send GROUP PORT --count N --rate R [--size B]

`--ifname IF` names the interface instead (for a group with no route). `recv` prints "ready"
once joined and, after S seconds (or on any line on stdin), one JSON line with "done": true,
the datagrams and the distinct sequence numbers it got. `send` prints its JSON line when it
has sent everything.
"""

import argparse
import ipaddress
import json
import select
import socket
import struct
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["send", "recv"])
    ap.add_argument("group")
    ap.add_argument("port", type=int)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--ttl", type=int, default=1)
    ap.add_argument("--ifname", default=None)
    args = ap.parse_args()
    ifindex = socket.if_nametoindex(args.ifname) if args.ifname else 0
    group = ipaddress.ip_address(args.group)
    v6 = group.version == 6
    family = socket.AF_INET6 if v6 else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    if args.mode == "recv":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::" if v6 else "0.0.0.0", args.port))
        if v6:
            mreq = group.packed + struct.pack("@I", ifindex)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        else:
            mreq = struct.pack("=4s4si", group.packed, b"\0" * 4, ifindex)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        print("ready", flush=True)
        end = time.monotonic() + args.seconds
        got, seqs, first, last = 0, set(), None, None
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select([s, sys.stdin], [], [], left)
            if sys.stdin in r:
                sys.stdin.readline()
                break
            if s in r:
                data, src = s.recvfrom(65535)
                now = time.monotonic()
                first = first or now
                last = now
                got += 1
                if len(data) >= 8:
                    seqs.add(struct.unpack("!Q", data[:8])[0])
                if got == 1:
                    print(json.dumps({"first_from": src[0]}), flush=True)
        print(json.dumps({"done": True, "received": got, "unique": len(seqs),
                          "span_s": round((last - first), 3) if first else 0.0}), flush=True)
        return 0
    if v6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, args.ttl)
        if ifindex:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
    else:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, args.ttl)
        if ifindex:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                         struct.pack("=4s4si", b"\0" * 4, b"\0" * 4, ifindex))
    pad = b"x" * max(0, args.size - 8)
    start = time.monotonic()
    sent = 0
    for i in range(args.count):
        s.sendto(struct.pack("!Q", i) + pad, (args.group, args.port))
        sent += 1
        due = start + (i + 1) / args.rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print(json.dumps({"done": True, "sent": sent,
                      "seconds": round(time.monotonic() - start, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
