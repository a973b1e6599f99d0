"""A robot's camera, emulated with eclipse-zenoh (not our code): JPEG frames on a zenoh key,
alternating a page of text and a blank wall, one at a time (each waits for the ai plugin's
result before the next, so none is dropped by the rate limit).

  ai_frames.py --connect tcp/127.0.0.1:7447 --key robot1/camera/front \
      --results robot1/ai/det --sync robot1/sync --frames 20

Before sending it waits (bounded) until the plugin subscribes to --key and a remote subscriber
to --sync exists. With --burst it sends every frame at once and waits for no result. Prints "ready", then one JSON line with every result and "done": true.
"""

import argparse
import io
import json
import queue
import sys
import time

import zenoh
from PIL import Image, ImageDraw, ImageFont


def frame(text, size):
    img = Image.new("RGB", size, "white")
    if text:
        draw = ImageDraw.Draw(img)
        font = ImageFont.load_default(size=28)
        for row in range(4):
            draw.text((16, 20 + row * 52), "MYELIN robot 42", fill="black", font=font)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def wait_matching(publisher, what, timeout):
    deadline = time.monotonic() + timeout
    while not publisher.matching_status.matching:
        if time.monotonic() > deadline:
            print(json.dumps({"error": f"no subscriber for {what} within {timeout} s", "done": True}), flush=True)
            sys.exit(1)
        time.sleep(0.05)  # bounded poll of zenoh's matching status


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connect", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--sync")
    ap.add_argument("--burst", action="store_true", help="send every frame at once, waiting for nothing")
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--size", default="320x256")
    ap.add_argument("--timeout", type=float, default=60.0)
    a = ap.parse_args()
    size = tuple(int(v) for v in a.size.split("x"))

    conf = zenoh.Config()
    conf.insert_json5("mode", '"client"')
    conf.insert_json5("connect/endpoints", json.dumps([a.connect]))
    conf.insert_json5("scouting/multicast/enabled", "false")
    results = queue.Queue()
    with zenoh.open(conf) as session:
        _sub = session.declare_subscriber(a.results, lambda s: results.put(json.loads(s.payload.to_bytes())))
        # BLOCK: a burst must reach the plugin whole; dropping is the plugin's job, not the transport's.
        camera = session.declare_publisher(a.key, encoding=zenoh.Encoding.IMAGE_JPEG, congestion_control=zenoh.CongestionControl.BLOCK)
        wait_matching(camera, a.key, a.timeout)
        if a.sync:
            wait_matching(session.declare_publisher(a.sync), a.sync, a.timeout)
        print("ready", flush=True)
        frames = [frame(True, size), frame(False, size)]
        if a.burst:
            for i in range(a.frames):
                camera.put(frames[i % 2])
            print(json.dumps({"sent": a.frames, "done": True}), flush=True)
            return 0
        got = []
        started = time.monotonic()
        for i in range(a.frames):
            camera.put(frames[i % 2])
            try:
                r = results.get(timeout=a.timeout)
            except queue.Empty:
                print(json.dumps({"error": f"no result for frame {i} within {a.timeout} s", "results": got, "done": True}), flush=True)
                return 1
            got.append({"text": i % 2 == 0, "value": r["value"], "forwarded": r["forwarded"], "seq": r["seq"], "inference_ms": r["inference_ms"]})
        elapsed = time.monotonic() - started
    print(json.dumps({"results": got, "elapsed_s": elapsed, "fps": a.frames / elapsed, "done": True}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
