//! What every plugin would otherwise write again: the `{error, hint}` JSON error answer, the
//! config error, a log line, wall-clock milliseconds, and (feature `zenoh`) a zenoh client
//! session to the node's own router on loopback.

use crate::PluginError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// The JSON error every Myelin HTTP answer uses: `{"error": ..., "hint": ...}` with `status`.
pub fn error_response(
    status: StatusCode,
    error: impl Into<String>,
    hint: impl Into<String>,
) -> Response {
    let (error, hint) = (error.into(), hint.into());
    (
        status,
        Json(serde_json::json!({ "error": error, "hint": hint })),
    )
        .into_response()
}

/// A plugin section that cannot work, in words that name the key and the fix.
pub fn config_error(message: impl Into<String>) -> PluginError {
    PluginError::Config {
        message: message.into(),
    }
}

/// One line for the node's log. A plugin child's log goes into the node's log, tagged with
/// the plugin's name; in thread mode it is the node's own log.
pub fn log(line: &str) {
    tracing::info!("{line}");
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// A zenoh client session to the router the zenoh plugin runs on `127.0.0.1:<port>`, with
/// scouting off (it must never find anything else).
#[cfg(feature = "zenoh")]
pub async fn zenoh_loopback(port: u16) -> Result<zenoh::Session, String> {
    let mut c = zenoh::Config::default();
    for (key, value) in [
        ("mode", "\"client\"".to_string()),
        ("connect/endpoints", format!("[\"tcp/127.0.0.1:{port}\"]")),
        ("scouting/multicast/enabled", "false".to_string()),
    ] {
        c.insert_json5(key, &value)
            .map_err(|e| format!("{key}: {e}"))?;
    }
    zenoh::open(c).await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_the_one_shape() {
        let r = error_response(StatusCode::CONFLICT, "busy", "retry");
        assert_eq!(r.status(), StatusCode::CONFLICT);
        assert!(
            matches!(config_error("x = 1 is wrong"), PluginError::Config { message } if message == "x = 1 is wrong")
        );
        assert!(unix_ms() > 1_600_000_000_000);
    }
}
