"""A WHEP viewer made with aiortc (not our code): POSTs a recvonly H.264 offer, decodes the
video, and reports what it got.

  whep_client.py --url http://10.77.0.2:8889/front/whep --seconds 10 [--token T] [--delete] [--hold]

Prints "decoding" at the first decoded frame, then one JSON line with the status, the time to
the first frame, frames and fps over --seconds, and "done": true. --delete ends the session
with DELETE afterwards; --hold keeps the session until the process is killed. --latency prints
each frame's RTP timestamp and decode time (unix seconds) for the benchmark.
"""

import argparse
import asyncio
import json
import sys
import time
import urllib.error
import urllib.request

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription


def http(method, url, body=None, headers=None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--token")
    ap.add_argument("--delete", action="store_true")
    ap.add_argument("--hold", action="store_true")
    ap.add_argument("--latency", action="store_true")
    a = ap.parse_args()

    # No ICE servers: aiortc's default is a public STUN server.
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    first = asyncio.get_running_loop().create_future()
    stats = {"frames": 0}
    started = time.monotonic()

    async def consume(track, receiver):
        t0 = None
        while True:
            try:
                frame = await track.recv()
            except Exception:
                return
            now = time.monotonic()
            if t0 is None:
                t0 = now
                if not first.done():
                    first.set_result(now)
            stats["frames"] += 1
            stats["last"] = now
            stats["t0"] = t0
            if a.latency:
                # aiortc rebases pts to 0; its timestamp mapper keeps the first RTP timestamp.
                mapper = getattr(receiver, "_RTCRtpReceiver__timestamp_mapper", None)
                origin = getattr(mapper, "_origin", None) or 0
                rtp_ts = (frame.pts + origin) % (1 << 32)
                print(json.dumps({"rtp_ts": rtp_ts, "t": time.time()}), flush=True)

    connected_at = {}

    @pc.on("connectionstatechange")
    def on_state():
        if pc.connectionState == "connected" and "t" not in connected_at:
            connected_at["t"] = time.monotonic()

    @pc.on("track")
    def on_track(track):
        receiver = next((t.receiver for t in pc.getTransceivers() if t.receiver.track is track), None)
        asyncio.ensure_future(consume(track, receiver))

    await pc.setLocalDescription(await pc.createOffer())
    headers = {"Content-Type": "application/sdp"}
    if a.token:
        headers["Authorization"] = f"Bearer {a.token}"
    loop = asyncio.get_running_loop()
    status, resp_headers, body = await loop.run_in_executor(
        None, http, "POST", a.url, pc.localDescription.sdp.encode(), headers
    )
    if status != 201:
        print(json.dumps({"status": status, "body": body, "done": True}), flush=True)
        return 1
    location = resp_headers.get("Location") or resp_headers.get("location")
    await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
    try:
        t_first = await asyncio.wait_for(first, 20)
    except asyncio.TimeoutError:
        print(json.dumps({"status": status, "frames": 0, "error": "no frame in 20 s", "done": True}), flush=True)
        return 1
    print("decoding", flush=True)
    await asyncio.sleep(a.seconds)  # the measuring window, not synchronisation
    span = stats["last"] - stats["t0"]
    result = {
        "status": status,
        "location": location,
        "first_frame_ms": (t_first - started) * 1000.0,
        # From the connection being up (ICE and DTLS done) to the first decoded frame.
        "connected_to_first_frame_ms": (t_first - connected_at["t"]) * 1000.0 if "t" in connected_at else None,
        "frames": stats["frames"],
        "fps": (stats["frames"] - 1) / span if span > 0 else 0.0,
    }
    if a.delete and location:
        base = a.url.split("/", 3)
        code, _, _ = await loop.run_in_executor(
            None, http, "DELETE", f"{base[0]}//{base[2]}{location}", None,
            {"Authorization": f"Bearer {a.token}"} if a.token else {},
        )
        result["delete_status"] = code
    if a.hold:
        print(json.dumps(result), flush=True)
        await asyncio.Event().wait()
    await pc.close()
    result["done"] = True
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
