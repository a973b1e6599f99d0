//! The Myelin plugin SDK: the [`Plugin`] trait, the [`PluginContext`] a plugin is handed, the
//! [`MeshView`] of peers, and the [`Registration`] that puts a plugin into the binary.
//!
//! A plugin is a Rust crate under `plugins/` that depends on this crate only. It is compiled in
//! behind a Cargo feature and registers itself with [`inventory`]. The plugin host runs it in a
//! child process of the same binary (`isolation = "process"`, the default) or on its own runtime
//! thread inside the node (`isolation = "thread"`); the plugin's code is the same in both.
//!
//! # Lifecycle
//!
//! 1. `build(section)` (the [`Registration`]'s function) parses the plugin's own config section.
//!    It must only validate and construct: the host also calls it once at start-up to reject a
//!    bad section before anything runs.
//! 2. [`Plugin::start`] gets the [`PluginContext`] once the tunnel is up, starts the plugin's
//!    work and returns; long-running work is spawned with [`tokio::spawn`] and ends when
//!    [`PluginContext::cancellation`] fires.
//! 3. [`Plugin::health`] is polled with a deadline. Missing it gets the plugin restarted.
//! 4. [`Plugin::stop`] is called on disable, restart and shutdown.
//!
//! A panic, an abort, an `Err` from `start`, an `Unhealthy` health or a missed health deadline
//! all count as a failure: the host kills the plugin and restarts it with backoff.
//!
//! # Dashboard panel
//!
//! A plugin whose [`Plugin::routes`] answer `GET /panel` with an HTML page gets a panel on the
//! node's dashboard. The page runs in a sandboxed frame without access to the API; it asks the
//! dashboard to call one of the plugin's own routes with
//! `parent.postMessage({myelin: "call", id, method: "GET" | "POST", path: "relative/route"}, "*")`
//! and receives `{myelin: "reply", id, status, body}`. A panel taller than the default asks for
//! its height with `parent.postMessage({myelin: "resize", height: <pixels>}, "*")`.
//!
//! # Example
//!
//! ```
//! use myelin_sdk::{async_trait, axum, Health, Plugin, PluginContext, PluginError, Registration};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct GreeterConfig {
//!     #[serde(default = "default_greeting")]
//!     greeting: String,
//! }
//! fn default_greeting() -> String { "hello".into() }
//!
//! struct Greeter { config: GreeterConfig }
//!
//! #[async_trait]
//! impl Plugin for Greeter {
//!     fn name(&self) -> &str { "greeter" }
//!     async fn start(&mut self, ctx: PluginContext) -> Result<(), PluginError> {
//!         let greets = ctx.metrics().counter("myelin_greeter_greetings_total");
//!         let mut mesh = ctx.mesh();
//!         let cancel = ctx.cancellation();
//!         let greeting = self.config.greeting.clone();
//!         myelin_sdk::tokio::spawn(async move {
//!             loop {
//!                 myelin_sdk::tokio::select! {
//!                     _ = cancel.cancelled() => break,
//!                     changed = mesh.changed() => {
//!                         if changed.is_err() { break }
//!                         for peer in mesh.borrow_and_update().peers.iter().filter(|p| p.up) {
//!                             greets.increment(1);
//!                             eprintln!("{greeting}, {}", peer.name);
//!                         }
//!                     }
//!                 }
//!             }
//!         });
//!         Ok(())
//!     }
//!     async fn stop(&mut self) -> Result<(), PluginError> { Ok(()) }
//!     async fn health(&self) -> Health { Health::Healthy }
//!     // Served by the control API at /plugins/<instance>/hello.
//!     fn routes(&self) -> Option<axum::Router> {
//!         let greeting = self.config.greeting.clone();
//!         Some(axum::Router::new().route("/hello", axum::routing::get(move || async move { greeting })))
//!     }
//! }
//!
//! fn build(section: &myelin_sdk::toml::Table) -> Result<Box<dyn Plugin>, PluginError> {
//!     let config: GreeterConfig = myelin_sdk::parse_section(section)?;
//!     Ok(Box::new(Greeter { config }))
//! }
//!
//! myelin_sdk::inventory::submit! {
//!     Registration { name: "greeter", about: "greets every peer that comes up", build, process_only: false, mesh_every_probe: false,
//!                    init_section: None, lab_section: None }
//! }
//!
//! // The binary lists every registered plugin from inventory:
//! assert!(myelin_sdk::registrations().any(|r| r.name == "greeter"));
//! let table: myelin_sdk::toml::Table = myelin_sdk::toml::from_str("greeting = 'hi'").unwrap();
//! assert!(build(&table).is_ok());
//! let bad: myelin_sdk::toml::Table = myelin_sdk::toml::from_str("greting = 'hi'").unwrap();
//! assert!(matches!(build(&bad), Err(PluginError::Config { .. })));
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod caller;
mod context;
mod kit;
mod mesh;
pub mod secret;
pub mod serve;

pub use async_trait::async_trait;
pub use axum;
pub use caller::{Caller, Via, CALLER_HEADER};
pub use context::{PluginContext, PluginMetrics};
pub use inventory;
#[cfg(feature = "zenoh")]
pub use kit::zenoh_loopback;
pub use kit::{config_error, error_response, log, unix_ms};
pub use mesh::{MeshView, NodeIdentity, PeerView, ProbeSample};
pub use metrics;
pub use tokio;
pub use tokio_util::sync::CancellationToken;
pub use toml;
pub use tracing;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// What a plugin reports when the host asks how it is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Health {
    /// Working as configured.
    Healthy,
    /// Working, but something needs attention; shown, never acted on.
    Degraded { reason: String },
    /// Not working: the host counts a failure and restarts the plugin.
    Unhealthy { reason: String },
}

/// Errors a plugin returns to the host.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The plugin's config section is wrong. `message` names the key and the fix.
    #[error("invalid config: {message}")]
    Config { message: String },
    /// A lifecycle call came in the wrong order.
    #[error("plugin not ready: {0}")]
    NotReady(&'static str),
    /// An I/O operation failed; `context` says which.
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },
    /// Anything else, described for the operator.
    #[error("{0}")]
    Failed(String),
}

/// The plugin lifecycle. See the crate docs for the order of calls.
#[async_trait]
pub trait Plugin: Send + Sync {
    /// The registration name of this plugin.
    fn name(&self) -> &str;
    /// The tunnel is up: start the plugin's work and return once it runs. The context stays
    /// valid for the life of this plugin instance.
    async fn start(&mut self, ctx: PluginContext) -> Result<(), PluginError>;
    /// Stop the plugin's work; the host waits for this up to its stop grace period.
    async fn stop(&mut self) -> Result<(), PluginError>;
    /// Answer the host's health check. It must answer within the health deadline.
    async fn health(&self) -> Health {
        Health::Healthy
    }
    /// HTTP routes, served by the control API under `/plugins/<instance>/`.
    fn routes(&self) -> Option<axum::Router> {
        None
    }
}

/// Builds a plugin from its config section (the host's own keys already removed).
pub type BuildFn = fn(&toml::Table) -> Result<Box<dyn Plugin>, PluginError>;

/// One compiled-in plugin, collected with [`inventory`].
pub struct Registration {
    /// The name used in `[plugins.<name>]`, the CLI and the API.
    pub name: &'static str,
    /// One line for `myelin version` and the dashboard.
    pub about: &'static str,
    /// Parses the config section and constructs the plugin.
    pub build: BuildFn,
    /// The plugin can only run in its own process: the host refuses `isolation = "thread"`.
    /// For plugins whose libraries cannot be stopped and started again inside one process.
    pub process_only: bool,
    /// The plugin judges the link probe by probe (safety) and gets every mesh view, up to
    /// one per probe answer. Every other plugin in its own process gets the view when a peer
    /// comes or goes, comes up or goes down, or moves endpoint, and otherwise at most once a
    /// second: decoding ten views a second per peer is a plugin's whole idle cost.
    pub mesh_every_probe: bool,
    /// The section `myelin init` writes for a new node, after a `# <about>` line (the whole
    /// `[plugins.<name>]` table); `None` leaves the plugin out (test plugins).
    pub init_section: Option<fn() -> String>,
    /// The section `myelin lab` writes for one lab node; `None` writes `[plugins.<name>]`.
    pub lab_section: Option<fn(&LabNode) -> String>,
}

/// A node of `myelin lab`, as a plugin's `lab_section` sees it.
#[derive(Clone, Copy, Debug)]
pub struct LabNode<'a> {
    /// `operator` or `robot<N>`.
    pub name: &'a str,
    /// The operator station (true) or a robot (false).
    pub operator: bool,
    /// Where the lab host's browser opens the nodes' dashboards (`http://<underlay>:7800`),
    /// for plugins that answer browsers themselves.
    pub dashboards: &'a [String],
}

inventory::collect!(Registration);

/// Every plugin compiled into this binary, sorted by name.
pub fn registrations() -> impl Iterator<Item = &'static Registration> {
    let mut all: Vec<&'static Registration> = inventory::iter::<Registration>.into_iter().collect();
    all.sort_by_key(|r| r.name);
    all.into_iter()
}

/// The registration called `name`, if it is compiled in.
pub fn registration(name: &str) -> Option<&'static Registration> {
    inventory::iter::<Registration>
        .into_iter()
        .find(|r| r.name == name)
}

/// Compares two secrets (tokens, keys) in time that depends only on their lengths, so a
/// remote caller cannot learn a token byte by byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Deserialises a plugin's config section, turning serde's message into a [`PluginError::Config`].
pub fn parse_section<T: DeserializeOwned>(section: &toml::Table) -> Result<T, PluginError> {
    T::deserialize(section.clone()).map_err(|e| PluginError::Config {
        message: e.message().trim().to_string(),
    })
}
