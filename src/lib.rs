//! Myelin: a peer-to-peer VPN for robot fleets, with supervised plugins.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod api;
pub mod build_info;
pub mod cli;
pub mod config;
pub mod dns;
pub mod host;
pub mod keys;
pub mod lab;
pub mod logging;
pub mod mesh;
pub mod metrics_help;
pub mod node;
pub mod policy;
pub mod tunnel;

// Each compiled-in plugin is referenced here, in one place, so the linker keeps its
// inventory registration (inventory issue #7).
#[cfg(any(feature = "ai", feature = "ai-onnxruntime"))]
use myelin_plugin_ai as _;
#[cfg(feature = "chaos")]
use myelin_plugin_chaos as _;
#[cfg(feature = "safety")]
use myelin_plugin_safety as _;
#[cfg(feature = "telemetry")]
use myelin_plugin_telemetry as _;
#[cfg(feature = "webrtc")]
use myelin_plugin_webrtc as _;
#[cfg(feature = "zenoh")]
use myelin_plugin_zenoh as _;
