//! Streaming mode end to end: ffmpeg sends H.264 RTP to robot1's plugin; aiortc viewers in the
//! operator's namespace play it over WHEP through the tunnel; headless Chromium plays it in the
//! operator's dashboard. None of the clients is our code.

mod common;

use common::netns::{Fleet, Netns};
use common::python::Py;
use common::{state, Node, Spec};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(30);

/// A process killed when the test ends, however it ends.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 request from inside `ns`; (status, headers+body text).
fn http(ns: &Netns, addr: SocketAddr, request: String) -> Result<(u16, String), String> {
    ns.enter(move || {
        let mut s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("not HTTP: {out:?}"))?;
        Ok((code, out))
    })
}

fn post(
    ns: &Netns,
    addr: SocketAddr,
    path: &str,
    content_type: &str,
    body: &str,
    auth: Option<&str>,
) -> (u16, String) {
    let auth = auth
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    http(
        ns,
        addr,
        format!(
            "POST {path} HTTP/1.1\r\nHost: robot\r\nContent-Type: {content_type}\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

fn status(node: &Node) -> Value {
    node.get("/plugins/webrtc/status")
}

fn viewers(node: &Node) -> u64 {
    status(node)["streams"][0]["viewers"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

fn viewer(ns: &Netns, url: &str, extra: &[&str]) -> Py {
    let mut args = vec!["--url", url];
    args.extend_from_slice(extra);
    Py::spawn(ns, "whep_client.py", &args)
}

#[test]
fn robot_video_reaches_viewers_over_whep() {
    let fleet = Fleet::new("rtc", &["robot1", "operator"]);
    let (robot_ns, op_ns) = (fleet.nodes[0].clone(), fleet.nodes[1].clone());
    let mut robot = Spec::new("robot1", &["10.90.0.1/16"]);
    let mut operator = Spec::new("operator", &["10.90.0.2/16"]);
    let (r, o) = (robot.clone(), operator.clone());
    robot.peer(&o, Some(&format!("{}:51820", fleet.underlay[1])), "");
    operator.peer(&r, Some(&format!("{}:51820", fleet.underlay[0])), "");
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("whep.token");
    std::fs::write(&token_file, "s3cret-viewer-token\n").unwrap();
    let robot1 = Node::start_spec(
        robot_ns.clone(),
        &robot,
        &format!(
            "[plugins.webrtc]\nmax_viewers = 2\n[[plugins.webrtc.streams]]\nname = \"front\"\nrtp = \"127.0.0.1:5004\"\n\n[plugins.webrtc_secure]\nplugin = \"webrtc\"\nlisten_port = 8890\ntoken_file = \"{}\"\n[[plugins.webrtc_secure.streams]]\nname = \"door\"\nrtp = \"127.0.0.1:5006\"\n",
            token_file.display()
        ),
    );
    let operator = Node::start_spec(op_ns.clone(), &operator, "[plugins.webrtc]\n");
    for (node, instance) in [
        (&robot1, "webrtc"),
        (&robot1, "webrtc_secure"),
        (&operator, "webrtc"),
    ] {
        node.wait_plugin(instance, LONG, "running", |p| state(p) == "running");
    }
    operator.wait_peer("robot1", LONG, "up", |p| p["up"] == true);

    // The camera: ffmpeg's test pattern, H.264 baseline, 30 fps, a keyframe every second.
    let _ffmpeg = Guard(
        robot_ns
            .command("ffmpeg")
            .args([
                "-nostdin",
                "-loglevel",
                "error",
                "-re",
                "-f",
                "lavfi",
                "-i",
                "testsrc=size=640x480:rate=30",
                "-pix_fmt",
                "yuv420p",
                "-c:v",
                "libx264",
                "-preset",
                "ultrafast",
                "-tune",
                "zerolatency",
                "-profile:v",
                "baseline",
                "-g",
                "30",
                "-f",
                "rtp",
                "rtp://127.0.0.1:5004?pkt_size=1200",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ffmpeg (scripts/setup.sh installs it)"),
    );
    robot1.poll(
        "RTP from ffmpeg",
        LONG,
        || status(&robot1),
        |s| s["streams"][0]["rtp_packets_in"].as_u64().unwrap_or(0) > 100,
    );

    let whep = "http://10.90.0.1:8889/front/whep";
    // Two viewers at once, each decoding for 10 s; both end with DELETE.
    let mut a = viewer(&op_ns, whep, &["--seconds", "10", "--delete"]);
    let mut b = viewer(&op_ns, whep, &["--seconds", "10", "--delete"]);
    let (ra, rb) = (a.result(LONG), b.result(LONG));
    for (who, r) in [("first", &ra), ("second", &rb)] {
        println!("{who} viewer: {r}");
        assert_eq!(r["status"], 201, "{who}: {r}");
        assert!(
            r["fps"].as_f64().unwrap_or(0.0) >= 25.0,
            "{who} viewer decoded {r}"
        );
        assert_eq!(r["delete_status"], 200, "{who}: {r}");
        // The GOP cache: a viewer joining mid-stream decodes at once, not at the next keyframe.
        let first = r["connected_to_first_frame_ms"]
            .as_f64()
            .unwrap_or(f64::MAX);
        assert!(
            first <= 150.0,
            "{who}: first frame {first:.0} ms after connecting"
        );
    }
    robot1.poll(
        "DELETE to free both sessions",
        LONG,
        || status(&robot1),
        |s| s["streams"][0]["viewers"] == 0,
    );
    let s = status(&robot1);
    assert!(
        s["streams"][0]["frames_sent"].as_u64().unwrap_or(0) > 500,
        "{s:#}"
    );

    // A viewer that vanishes (killed, no DELETE) is cleaned up by ICE within 5 s.
    let mut gone = viewer(&op_ns, whep, &["--seconds", "1", "--hold"]);
    gone.wait_line(LONG, |l| l == "decoding");
    assert_eq!(viewers(&robot1), 1);
    drop(gone);
    let killed = Instant::now();
    robot1.poll(
        "the killed viewer's session to end",
        LONG,
        || status(&robot1),
        |s| s["streams"][0]["viewers"] == 0,
    );
    let cleanup = killed.elapsed();
    println!("a killed viewer was cleaned up after {cleanup:?}");
    assert!(
        cleanup <= Duration::from_millis(5200),
        "cleanup took {cleanup:?}"
    );

    // Over the viewer limit: 503 (checked before the offer is even read).
    let robot_whep: SocketAddr = "10.90.0.1:8889".parse().unwrap();
    let mut v1 = viewer(&op_ns, whep, &["--seconds", "1", "--hold"]);
    let mut v2 = viewer(&op_ns, whep, &["--seconds", "1", "--hold"]);
    v1.wait_line(LONG, |l| l == "decoding");
    v2.wait_line(LONG, |l| l == "decoding");
    let (code, text) = post(
        &op_ns,
        robot_whep,
        "/front/whep",
        "application/sdp",
        "v=0\r\n",
        None,
    );
    assert_eq!(code, 503, "{text}");
    drop((v1, v2));

    // Every error status, with a JSON error and the CORS headers the dashboard needs.
    let (code, text) = post(
        &op_ns,
        robot_whep,
        "/back/whep",
        "application/sdp",
        "v=0\r\n",
        None,
    );
    assert_eq!(code, 404, "{text}");
    assert!(text.contains("front"), "names the streams: {text}");
    let (code, text) = post(
        &op_ns,
        robot_whep,
        "/front/whep",
        "text/plain",
        "v=0\r\n",
        None,
    );
    assert_eq!(code, 415, "{text}");
    robot1.poll(
        "the viewer limit to free up",
        LONG,
        || status(&robot1),
        |s| s["streams"][0]["viewers"] == 0,
    );
    let (code, text) = post(
        &op_ns,
        robot_whep,
        "/front/whep",
        "application/sdp",
        "this is not SDP",
        None,
    );
    assert_eq!(code, 400, "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("access-control-allow-origin: *"),
        "{text}"
    );
    let (code, text) = http(
        &op_ns,
        robot_whep,
        "OPTIONS /front/whep HTTP/1.1\r\nHost: robot\r\nOrigin: null\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n".into(),
    )
    .unwrap();
    assert_eq!(code, 204, "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("access-control-expose-headers: location"),
        "{text}"
    );
    let secure: SocketAddr = "10.90.0.1:8890".parse().unwrap();
    let (code, text) = post(
        &op_ns,
        secure,
        "/door/whep",
        "application/sdp",
        "v=0\r\n",
        None,
    );
    assert_eq!(code, 401, "{text}");
    let (code, text) = post(
        &op_ns,
        secure,
        "/door/whep",
        "application/sdp",
        "v=0\r\n",
        Some("wrong"),
    );
    assert_eq!(code, 401, "{text}");
    let (code, text) = post(
        &op_ns,
        secure,
        "/door/whep",
        "text/plain",
        "v=0\r\n",
        Some("s3cret-viewer-token"),
    );
    assert_eq!(code, 415, "the right token gets past the check: {text}");

    // The underlay never serves WHEP.
    let underlay: SocketAddr = format!("{}:8889", fleet.underlay[0]).parse().unwrap();
    let refused = http(
        &op_ns,
        underlay,
        "GET /streams HTTP/1.1\r\nHost: x\r\n\r\n".into(),
    );
    assert!(refused.is_err(), "the underlay answered: {refused:?}");

    let metrics = robot1.metrics();
    for name in [
        "myelin_webrtc_frames_sent_total",
        "myelin_webrtc_bytes_sent_total",
        "myelin_webrtc_viewers",
        "myelin_webrtc_keyframe_waits_total",
    ] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(name) && l.contains("stream=\"front\"")),
            "{name} missing"
        );
    }

    // The operator's dashboard plays robot1's stream in its webrtc panel (Chromium in the
    // operator's namespace, where the overlay is reachable).
    let browser_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let artifacts = std::path::PathBuf::from(
        std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()),
    )
    .join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("dashboard-video.png");
    let run = op_ns
        .command("node")
        .arg(browser_dir.join("video.mjs"))
        .args([
            format!("http://{}/", operator.api),
            shot.display().to_string(),
            "robot1/front".into(),
        ])
        .output()
        .expect("node");
    let out = String::from_utf8_lossy(&run.stdout);
    println!("{out}");
    assert!(
        run.status.success(),
        "browser: {out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(out.contains("framesDecoded"), "{out}");
}
