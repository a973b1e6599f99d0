//! The telemetry plugin: serves Prometheus metrics on the node's overlay addresses and loopback
//! (`listen_port`, default 9477) so an operator's Prometheus scrapes robots over the VPN. A
//! scrape returns the node's own metrics (VPN, plugins; read from the node's local control API)
//! followed by the robot's health, read from /proc and /sys at scrape time.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod health;

use myelin_sdk::axum::{http::header, response::Html, routing::get, Router};
use myelin_sdk::tokio::io::{AsyncReadExt, AsyncWriteExt};
use myelin_sdk::{async_trait, Health, Plugin, PluginContext, PluginError, Registration};
use serde::Deserialize;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TelemetryConfig {
    #[serde(default = "default_port")]
    listen_port: u16,
    /// Mount points reported as `node_filesystem_*`.
    #[serde(default = "default_mounts")]
    mounts: Vec<String>,
}

fn default_port() -> u16 {
    9477
}

fn default_mounts() -> Vec<String> {
    vec!["/".into()]
}

struct Telemetry {
    config: TelemetryConfig,
    ctx: Option<PluginContext>,
    /// The addresses actually listened on, for the panel.
    listening: Arc<Mutex<Vec<SocketAddr>>>,
    /// CPU times at the previous `/summary`, for its busy share.
    cpu: Arc<Mutex<Option<health::CpuTimes>>>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// USER_HZ, the unit of /proc/stat's CPU times.
fn clock_ticks() -> f64 {
    match rustix::param::clock_ticks_per_second() {
        t if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// The robot's health in Prometheus text format, collected now.
fn robot_health(mounts: &[String]) -> String {
    let ticks = clock_ticks();
    let node_pid = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get() as u32);
    let (proc_root, sys_root) = (Path::new("/proc"), Path::new("/sys"));
    let mut samples = [
        health::cpu(proc_root, ticks),
        health::load(proc_root),
        health::memory(proc_root),
        health::filesystems(mounts),
        health::thermal(sys_root),
        health::hwmon(sys_root),
        health::power(sys_root),
        health::network(proc_root),
        health::process(proc_root, node_pid),
    ]
    .concat();
    // One TYPE line per family, all its samples together (a stable sort keeps label order).
    samples.sort_by_key(|s| s.name);
    let mut out = String::new();
    let mut last = "";
    for s in &samples {
        if s.name != last {
            let kind = if s.counter { "counter" } else { "gauge" };
            let _ = writeln!(out, "# HELP {} {}", s.name, health::help(s.name));
            let _ = writeln!(out, "# TYPE {} {kind}", s.name);
            last = s.name;
        }
        let labels: Vec<String> = s
            .labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        if labels.is_empty() {
            let _ = writeln!(out, "{} {}", s.name, s.value);
        } else {
            let _ = writeln!(out, "{}{{{}}} {}", s.name, labels.join(","), s.value);
        }
    }
    out
}

/// The node's own metrics, from its local control API.
async fn node_metrics(api: Option<SocketAddr>) -> Result<String, String> {
    let api = api.ok_or("the node did not tell its control API address")?;
    let mut stream = myelin_sdk::tokio::net::TcpStream::connect(api)
        .await
        .map_err(|e| format!("control API {api}: {e}"))?;
    // The API answers only requests that name it in Host (DNS-rebinding defence).
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {api}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    stream
        .read_to_string(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    match body.split_once("\r\n\r\n") {
        Some((head, rest))
            if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") =>
        {
            Ok(rest.to_string())
        }
        _ => Err(format!("control API {api} did not answer /metrics")),
    }
}

async fn scrape(
    api: Option<SocketAddr>,
    mounts: Vec<String>,
) -> ([(header::HeaderName, &'static str); 1], String) {
    let mut text = match node_metrics(api).await {
        Ok(t) => t,
        Err(e) => format!("# node metrics unavailable: {e}\n"),
    };
    let health = myelin_sdk::tokio::task::spawn_blocking(move || robot_health(&mounts))
        .await
        .unwrap_or_default();
    text.push_str(&health);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

#[async_trait]
impl Plugin for Telemetry {
    fn name(&self) -> &str {
        "telemetry"
    }

    async fn start(&mut self, ctx: PluginContext) -> Result<(), PluginError> {
        self.ctx = Some(ctx.clone());
        let port = self.config.listen_port;
        let mut addrs: Vec<SocketAddr> = ctx
            .node()
            .overlay_addresses
            .iter()
            .map(|n| SocketAddr::new(n.addr(), port))
            .collect();
        addrs.push(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
        let api = ctx.node().control_api;
        let mounts = self.config.mounts.clone();
        let app = Router::new().route("/metrics", get(move || scrape(api, mounts.clone())));
        let mut bound = Vec::new();
        for addr in addrs {
            let listener = myelin_sdk::tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| PluginError::Io {
                    context: format!(
                        "listening on {addr} (set [plugins.telemetry].listen_port to a free port)"
                    ),
                    cause: e,
                })?;
            let cancel = ctx.cancellation();
            let app = app.clone();
            myelin_sdk::tokio::spawn(myelin_sdk::serve::serve(
                listener,
                app,
                myelin_sdk::serve::Limits::default(),
                async move { cancel.cancelled().await },
            ));
            bound.push(addr);
        }
        if let Ok(mut l) = self.listening.lock() {
            *l = bound;
        }
        Ok(())
    }

    async fn stop(&mut self) -> Result<(), PluginError> {
        Ok(())
    }

    async fn health(&self) -> Health {
        Health::Healthy
    }

    fn routes(&self) -> Option<Router> {
        let api = self.ctx.as_ref().and_then(|c| c.node().control_api);
        let mounts = self.config.mounts.clone();
        let figure_mounts = mounts.clone();
        let cpu = self.cpu.clone();
        let listening = self.listening.clone();
        Some(
            Router::new()
                .route("/metrics", get(move || scrape(api, mounts.clone())))
                .route("/figures", get(move || figures(figure_mounts.clone())))
                .route("/summary", get(move || summary(cpu.clone())))
                .route(
                    "/panel",
                    get(move || {
                        let html = panel(&listening);
                        async move { Html(html) }
                    }),
                ),
        )
    }
}

/// `GET /summary`: the robot's health for the fleet page (the node's `/api/v1/summary`).
async fn summary(
    cpu: Arc<Mutex<Option<health::CpuTimes>>>,
) -> myelin_sdk::axum::Json<health::Summary> {
    let figures = myelin_sdk::tokio::task::spawn_blocking(move || {
        let ticks = clock_ticks();
        let (proc_root, sys_root) = (Path::new("/proc"), Path::new("/sys"));
        let samples = [
            health::cpu(proc_root, ticks),
            health::load(proc_root),
            health::memory(proc_root),
            health::thermal(sys_root),
            health::hwmon(sys_root),
            health::power(sys_root),
        ]
        .concat();
        let Ok(mut previous) = cpu.lock() else {
            return health::summarize(&samples, None).0;
        };
        let (summary, now) = health::summarize(&samples, *previous);
        *previous = now;
        summary
    })
    .await
    .unwrap_or_default();
    myelin_sdk::axum::Json(figures)
}

/// A few figures for the panel: load, available memory, temperatures, battery.
async fn figures(mounts: Vec<String>) -> String {
    let text = myelin_sdk::tokio::task::spawn_blocking(move || robot_health(&mounts))
        .await
        .unwrap_or_default();
    const SHOWN: [&str; 4] = [
        "node_load1",
        "node_memory_MemAvailable_bytes",
        "node_thermal_zone_temp",
        "node_power_supply_capacity",
    ];
    text.lines()
        .filter(|l| {
            SHOWN
                .iter()
                .any(|n| l.strip_prefix(n).is_some_and(|r| r.starts_with([' ', '{'])))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The dashboard panel: where Prometheus scrapes this node, and the figures, refreshed every
/// 5 s through the dashboard (the panel itself cannot reach the API).
fn panel(listening: &Mutex<Vec<SocketAddr>>) -> String {
    let urls: String = listening
        .lock()
        .map(|l| {
            l.iter()
                .map(|a| {
                    format!(
                        "<li><code>http://{}/metrics</code></li>",
                        escape_html(&a.to_string())
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        r#"<!doctype html><meta charset="utf-8"><body style="font:13px system-ui;margin:8px">
<p>Prometheus scrape URLs:</p><ul id="urls">{urls}</ul>
<div id="figures"></div>
<script>
const ask = () => parent.postMessage({{ myelin: "call", id: 1, method: "GET", path: "summary" }}, "*");
addEventListener("message", (e) => {{
  if (e.source !== parent || !e.data || e.data.myelin !== "reply" || e.data.status !== 200) return;
  const s = JSON.parse(e.data.body);
  const rows = [["CPU", s.cpu_percent, "%", 100, 0], ["load", s.load1, "", 4, 2], ["memory", s.memory_used_percent, "%", 100, 0],
                ["temperature", s.temperature_c, " °C", 100, 0], ["battery", s.battery_percent, "%", 100, 0]];
  const box = document.getElementById("figures");
  box.replaceChildren();
  for (const [label, v, unit, max, digits] of rows) {{
    if (typeof v !== "number") continue;
    const row = document.createElement("div");
    const meter = document.createElement("meter");
    meter.min = 0; meter.max = max; meter.value = v; meter.style.width = "120px";
    row.append(`${{label}} `, meter, ` ${{v.toFixed(digits)}}${{unit}}`);
    box.append(row);
  }}
}});
ask();
setInterval(ask, 5000);
</script>"#
    )
}

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn build(section: &myelin_sdk::toml::Table) -> Result<Box<dyn Plugin>, PluginError> {
    let config: TelemetryConfig = myelin_sdk::parse_section(section)?;
    Ok(Box::new(Telemetry {
        config,
        ctx: None,
        listening: Arc::new(Mutex::new(Vec::new())),
        cpu: Arc::new(Mutex::new(None)),
    }))
}

myelin_sdk::inventory::submit! {
    Registration {
        name: "telemetry",
        about: "Prometheus metrics of the VPN, the plugins and the robot's health, served over the VPN",
        build,
        process_only: false,
        mesh_every_probe: false,
        init_section: Some(init_section),
        lab_section: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_text_is_prometheus_exposition() {
        let text = robot_health(&["/".into()]);
        assert!(text.contains("# TYPE node_load1 gauge"), "{text}");
        assert!(
            text.contains("# TYPE node_cpu_seconds_total counter"),
            "{text}"
        );
        assert!(
            text.contains("node_filesystem_size_bytes{mountpoint=\"/\"}"),
            "{text}"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "bad sample line {line}");
        }
    }

    #[test]
    fn config_keys_are_checked() {
        let t: myelin_sdk::toml::Table = myelin_sdk::toml::from_str("listen_prot = 1").unwrap();
        assert!(build(&t).is_err());
        let t: myelin_sdk::toml::Table =
            myelin_sdk::toml::from_str("listen_port = 9500\nmounts = [\"/\", \"/data\"]").unwrap();
        assert!(build(&t).is_ok());
    }
}

fn init_section() -> String {
    "[plugins.telemetry]\nenabled = true\n".into()
}
