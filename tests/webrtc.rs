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
    // A plugin's secret is the plugin user's alone: 0600, owned by the user plugins run as,
    // in a directory that user can enter.
    std::fs::set_permissions(
        dir.path(),
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(
        &token_file,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .unwrap();
    std::os::unix::fs::chown(&token_file, Some(common::plugin_uid()), None).unwrap();
    let robot1 = Node::start_spec(
        robot_ns.clone(),
        &robot,
        &format!(
            "[plugins.webrtc]\nmax_viewers = 2\n[[plugins.webrtc.streams]]\nname = \"front\"\nrtp = \"127.0.0.1:5004\"\n\n[plugins.webrtc_secure]\nplugin = \"webrtc\"\nlisten_port = 8890\ntoken_file = \"{}\"\n[[plugins.webrtc_secure.streams]]\nname = \"door\"\nrtp = \"127.0.0.1:5006\"\n[[plugins.webrtc_secure.streams]]\nname = \"yard\"\nrtp = \"0.0.0.0:5008\"\nrtp_sources = [\"127.0.0.1\"]\n",
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
    // A dashboard of the fleet (the operator's, on its overlay address) passes the preflight
    // and is named back; a sandboxed frame (`null`, which any site can make) and another site
    // are refused with nothing a page could read.
    let (code, text) = http(
        &op_ns,
        robot_whep,
        "OPTIONS /front/whep HTTP/1.1\r\nHost: robot\r\nOrigin: http://10.90.0.2:7800\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n".into(),
    )
    .unwrap();
    assert_eq!(code, 204, "{text}");
    let lower = text.to_ascii_lowercase();
    assert!(
        lower.contains("access-control-expose-headers: location")
            && lower.contains("access-control-allow-origin: http://10.90.0.2:7800"),
        "{text}"
    );
    for other in ["null", "http://evil.example"] {
        let (code, text) = http(
            &op_ns,
            robot_whep,
            format!("OPTIONS /front/whep HTTP/1.1\r\nHost: robot\r\nOrigin: {other}\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n"),
        )
        .unwrap();
        assert_eq!(code, 403, "{other}: {text}");
        assert!(
            !text
                .to_ascii_lowercase()
                .contains("access-control-allow-origin"),
            "{other}: {text}"
        );
    }
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

    // RTP from a source outside rtp_sources is dropped and counted; the listed one is taken.
    let yard: SocketAddr = format!("{}:5008", fleet.underlay[0]).parse().unwrap();
    let stranger = udp_from(&op_ns, "0.0.0.0:0");
    let camera = udp_from(&robot_ns, "127.0.0.1:0");
    for seq in 0..5u16 {
        stranger.send_to(&rtp_packet(seq), yard).unwrap();
    }
    camera
        .send_to(
            &rtp_packet(5),
            "127.0.0.1:5008".parse::<SocketAddr>().unwrap(),
        )
        .unwrap();
    let secure_status = || robot1.get("/plugins/webrtc_secure/status");
    let yard_of = |s: &Value| {
        s["streams"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == "yard").cloned())
            .unwrap_or(Value::Null)
    };
    let s = robot1.poll(
        "the yard stream to see all six packets",
        LONG,
        secure_status,
        |s| {
            let y = yard_of(s);
            y["rtp_refused"].as_u64().unwrap_or(0) + y["rtp_packets_in"].as_u64().unwrap_or(0) >= 6
        },
    );
    let y = yard_of(&s);
    assert_eq!(
        (y["rtp_refused"].as_u64(), y["rtp_packets_in"].as_u64()),
        (Some(5), Some(1)),
        "{y}"
    );

    // A peer announcing unsafe stream names: the operator's namespace answers robot1's
    // webrtc_secure discovery (it asks peers on its own port, 8890) with a script as a name
    // and a WHEP URL on another host. Only the safe name is kept, with a WHEP path made here.
    let rogue = op_ns
        .enter(|| std::net::TcpListener::bind("10.90.0.2:8890"))
        .expect("bind the rogue announcer on the operator's overlay address");
    std::thread::spawn(move || {
        let body = serde_json::json!([
            { "name": "<img src=x onerror=alert(1)>", "whep": "/x/whep", "viewers": 0 },
            { "name": "cam_ok", "whep": "http://evil.example/steal", "viewers": 1 },
        ])
        .to_string();
        for mut c in rogue.incoming().map_while(Result::ok) {
            let mut request = [0u8; 1024];
            let _ = c.read(&mut request);
            let _ = write!(
                c,
                "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{body}"
            );
        }
    });
    let s = robot1.poll(
        "robot1 to discover the operator's announced streams",
        LONG,
        secure_status,
        |s| s["peers"][0]["peer"] == "operator",
    );
    let peer = &s["peers"][0];
    assert_eq!(peer["refused"], 1, "{peer}");
    assert_eq!(
        peer["streams"],
        serde_json::json!([{ "name": "cam_ok", "whep": "/cam_ok/whep", "viewers": 1 }]),
        "{peer}"
    );
    assert!(
        robot1
            .log()
            .contains("announced a stream named \"<img src=x onerror=alert(1)>\""),
        "the refusal is logged"
    );

    let counted = |m: &Value, name: &str, label: &str| {
        m.as_str()
            .unwrap_or("")
            .lines()
            .any(|l| l.starts_with(name) && l.contains(label) && !l.ends_with(" 0"))
    };
    let metrics = robot1.poll(
        "the refusal counters in /metrics",
        LONG,
        || Value::String(robot1.metrics()),
        |m| {
            counted(m, "myelin_webrtc_rtp_refused_total", "stream=\"yard\"")
                && counted(
                    m,
                    "myelin_webrtc_peer_streams_refused_total",
                    "peer=\"operator\"",
                )
        },
    );
    let metrics = metrics.as_str().unwrap_or("").to_string();
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

    // Peer-supplied names are shown as text in the panel, never parsed as markup: the status
    // the panel gets is replaced with names that are HTML.
    let run = op_ns
        .command("node")
        .args(["--input-type=module", "-e", PANEL_XSS])
        .args([&format!("http://{}/", operator.api), XSS_PEER, XSS_STREAM])
        .current_dir(&browser_dir)
        .output()
        .expect("node");
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "browser: {out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let seen: Value = out
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no result from the browser: {out}"));
    println!("panel with hostile names: {seen}");
    assert_eq!(seen["xss"], Value::Null, "injected script ran: {seen}");
    assert_eq!(
        seen["elements"], 0,
        "injected markup became elements: {seen}"
    );
    let key = format!("{XSS_PEER}/{XSS_STREAM}");
    assert!(
        seen["stats"]
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s["key"] == key.as_str()
                && s["text"].as_str().is_some_and(|t| t.starts_with(&key)))),
        "the names are not shown as text: {seen}"
    );
}

fn udp_from(ns: &Netns, bind: &'static str) -> std::net::UdpSocket {
    ns.enter(move || std::net::UdpSocket::bind(bind))
        .unwrap_or_else(|e| panic!("bind {bind} in {}: {e}", ns.name))
}

/// An RTP packet holding the start of an H.264 IDR slice.
fn rtp_packet(seq: u16) -> Vec<u8> {
    let mut p = vec![0x80, 96];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 7, 0x65, 0x88, 0x80]);
    p
}

const XSS_PEER: &str = "<b id=peer>robot9</b>";
const XSS_STREAM: &str = "<img src=x onerror=window.__xss=1>";

/// Opens the dashboard (argv[1]) in headless Chromium with the webrtc panel's status call
/// answered by a peer and a stream with hostile names (argv[2], argv[3]), and prints what the
/// panel made of them as JSON.
const PANEL_XSS: &str = r#"
import { chromium } from "playwright-core";
const [url, peer, name] = process.argv.slice(1);
const status = { streams: [], listen_port: 8889,
  peers: [{ peer, base: "http://127.0.0.1:9", streams: [{ name, whep: "/x/whep", viewers: 0 }] }] };
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => console.log(`page error: ${e.message}`));
  await page.route("**/plugins/webrtc/status", (route) =>
    route.fulfill({ status: 200, contentType: "application/json", body: JSON.stringify(status) }));
  await page.goto(url);
  await page.click('#show-node');
  const iframe = page.locator(`section[data-panel="webrtc"] iframe`);
  await page.frameLocator(`section[data-panel="webrtc"] iframe`).locator(".stats").first().waitFor({ timeout: 30000 });
  const frame = await (await iframe.elementHandle()).contentFrame();
  // Time for an injected image's onerror to fire, and for the failed WHEP fetch to report.
  await new Promise((r) => setTimeout(r, 1500));
  const seen = await frame.evaluate(() => ({
    xss: window.__xss ?? null,
    elements: document.querySelectorAll("img, b").length,
    stats: [...document.querySelectorAll(".stats")].map((e) => ({ key: e.dataset.stream, text: e.textContent })),
  }));
  console.log(JSON.stringify(seen));
} finally {
  await browser.close();
}
"#;
