//! The chaos plugin: fails on purpose, on command, so the plugin host's containment can be
//! measured. Never enabled by default; build with `--features chaos`.
//!
//! `mode` (config, or `POST /plugins/<instance>/trigger/<mode>`):
//! - `none`: healthy; counts health checks in `myelin_chaos_health_checks_total`;
//! - `panic`: panics in a task;
//! - `abort`: calls `std::process::abort()` (process isolation only: it would end the node);
//! - `error`: `start()` returns an error;
//! - `hang`: `health()` spins in a blocking busy loop and never answers;
//! - `block`: blocks every worker thread of the plugin's runtime.
//!
//! `after_ms` delays the failure after start.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use myelin_sdk::axum::{
    extract::Path, http::StatusCode, response::Html, routing::get, routing::post, Json, Router,
};
use myelin_sdk::{async_trait, Health, Plugin, PluginContext, PluginError, Registration};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    None,
    Panic,
    Abort,
    Error,
    Hang,
    Block,
}

impl Mode {
    fn parse(s: &str) -> Option<Mode> {
        Mode::deserialize(myelin_sdk::toml::Value::String(s.to_string())).ok()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChaosConfig {
    #[serde(default = "default_mode")]
    mode: Mode,
    #[serde(default)]
    after_ms: u64,
}

fn default_mode() -> Mode {
    Mode::None
}

struct Chaos {
    config: ChaosConfig,
    ctx: Option<PluginContext>,
    hang: Arc<AtomicBool>,
}

/// Carries out `mode` now. Runs inside the plugin's runtime.
fn unleash(mode: Mode, hang: &AtomicBool) {
    match mode {
        Mode::None | Mode::Error => {}
        Mode::Panic => {
            myelin_sdk::tokio::spawn(async { panic!("chaos: panicking on purpose") });
        }
        Mode::Abort => {
            eprintln!("chaos: aborting on purpose");
            std::process::abort();
        }
        Mode::Hang => hang.store(true, Ordering::SeqCst),
        Mode::Block => {
            let workers = myelin_sdk::tokio::runtime::Handle::current()
                .metrics()
                .num_workers();
            for _ in 0..workers.max(1) {
                myelin_sdk::tokio::spawn(async {
                    loop {
                        std::thread::sleep(Duration::from_secs(3600));
                    }
                });
            }
        }
    }
}

#[async_trait]
impl Plugin for Chaos {
    fn name(&self) -> &str {
        "chaos"
    }

    async fn start(&mut self, ctx: PluginContext) -> Result<(), PluginError> {
        self.ctx = Some(ctx.clone());
        myelin_sdk::metrics::describe_counter!(
            "myelin_chaos_health_checks_total",
            "Health checks the chaos plugin answered."
        );
        let after = Duration::from_millis(self.config.after_ms);
        let mode = self.config.mode;
        if mode == Mode::Error {
            myelin_sdk::tokio::time::sleep(after).await;
            return Err(PluginError::Failed(
                "chaos: start failed on purpose".to_string(),
            ));
        }
        if mode != Mode::None {
            let hang = self.hang.clone();
            let cancel = ctx.cancellation();
            myelin_sdk::tokio::spawn(async move {
                myelin_sdk::tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = myelin_sdk::tokio::time::sleep(after) => unleash(mode, &hang),
                }
            });
        }
        Ok(())
    }

    async fn stop(&mut self) -> Result<(), PluginError> {
        Ok(())
    }

    async fn health(&self) -> Health {
        if let Some(ctx) = &self.ctx {
            ctx.metrics()
                .counter("myelin_chaos_health_checks_total")
                .increment(1);
        }
        // Hung for good, but asleep: a hang must not burn a core (a thread-isolated plugin's
        // abandoned thread would spin until the node restarts).
        while self.hang.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Health::Healthy
    }

    fn routes(&self) -> Option<Router> {
        let hang = self.hang.clone();
        let mode = self.config.mode;
        Some(
            Router::new()
                .route("/", get(move || async move { Json(serde_json_mode(mode)) }))
                .route("/panel", get(move || async move { Html(panel(mode)) }))
                .route(
                    "/trigger/{mode}",
                    post(move |Path(name): Path<String>| async move {
                        match Mode::parse(&name) {
                            Some(Mode::Error) | None => Err((
                                StatusCode::BAD_REQUEST,
                                format!("unknown chaos mode `{name}`: use none, panic, abort, hang or block"),
                            )),
                            Some(m) => {
                                unleash(m, &hang);
                                Ok(StatusCode::ACCEPTED)
                            }
                        }
                    }),
                ),
        )
    }
}

/// The dashboard panel: the configured mode, and a button that panics the plugin on purpose,
/// to watch the host restart it. It talks to the dashboard through postMessage.
fn panel(mode: Mode) -> String {
    format!(
        r#"<!doctype html><meta charset="utf-8"><body style="font:14px system-ui;margin:8px">
<p>chaos mode: <b id="mode">{mode:?}</b></p>
<button id="panic">panic now</button> <span id="out"></span>
<script>
document.getElementById("panic").onclick = () =>
  parent.postMessage({{ myelin: "call", id: 1, method: "POST", path: "trigger/panic" }}, "*");
addEventListener("message", (e) => {{
  if (e.data && e.data.myelin === "reply") document.getElementById("out").textContent = "answered " + e.data.status;
}});
</script>"#
    )
}

fn serde_json_mode(mode: Mode) -> std::collections::BTreeMap<&'static str, Mode> {
    [("mode", mode)].into_iter().collect()
}

fn build(section: &myelin_sdk::toml::Table) -> Result<Box<dyn Plugin>, PluginError> {
    let config: ChaosConfig = myelin_sdk::parse_section(section)?;
    Ok(Box::new(Chaos {
        config,
        ctx: None,
        hang: Arc::new(AtomicBool::new(false)),
    }))
}

myelin_sdk::inventory::submit! {
    Registration {
        name: "chaos",
        about: "fails on purpose (panic, abort, error, hang, block) to test plugin isolation",
        build,
        process_only: false,
        mesh_every_probe: false,
        // A test plugin: never in a new node's config; the lab writes `[plugins.chaos]`.
        init_section: None,
        lab_section: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_mode_and_key() {
        let t: myelin_sdk::toml::Table = myelin_sdk::toml::from_str("mode = 'explode'").unwrap();
        let err = build(&t).err().unwrap().to_string();
        assert!(err.contains("explode"), "{err}");
        let t: myelin_sdk::toml::Table = myelin_sdk::toml::from_str("mood = 'panic'").unwrap();
        let err = build(&t).err().unwrap().to_string();
        assert!(err.contains("mood"), "{err}");
    }
}
