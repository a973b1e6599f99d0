"""Forwards RTP from one local UDP port to another and logs, for each RTP timestamp (each
video frame), when its first packet passed: the ingest time for the WebRTC latency benchmark.

  rtp_stamp.py --listen 127.0.0.1:5010 --to 127.0.0.1:5004 --log /tmp/ingest.jsonl
"""

import argparse
import json
import socket
import struct
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--to", required=True)
    ap.add_argument("--log", required=True)
    a = ap.parse_args()
    host, port = a.listen.rsplit(":", 1)
    to_host, to_port = a.to.rsplit(":", 1)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind((host, int(port)))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    seen = set()
    with open(a.log, "a", buffering=1) as log:
        print("ready", flush=True)
        while True:
            data = rx.recv(65536)
            now = time.time()
            tx.sendto(data, (to_host, int(to_port)))
            if len(data) >= 12:
                ts = struct.unpack("!I", data[4:8])[0]
                if ts not in seen:
                    seen.add(ts)
                    log.write(json.dumps({"rtp_ts": ts, "t": now}) + "\n")


if __name__ == "__main__":
    main()
