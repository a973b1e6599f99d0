//! Messages between the plugin host and a plugin (child process or thread), and their framing
//! on the inherited socketpair: a 4-byte big-endian length, then JSON.

use crate::host::metrics_bridge::MetricsSnapshot;
use myelin_sdk::{Health, MeshView, NodeIdentity};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Largest frame accepted; a bigger one means a broken peer.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Init {
    pub node: NodeIdentity,
    pub instance: String,
    pub kind: String,
    /// The plugin's section (host keys removed), as TOML text.
    pub config_toml: String,
    /// Where the plugin serves its HTTP routes.
    pub http_socket: PathBuf,
    /// The instance's persistent directory.
    pub state_dir: PathBuf,
    pub worker_threads: usize,
    pub mesh: MeshView,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum HostMsg {
    Init(Box<Init>),
    Mesh(MeshView),
    Ping { seq: u64 },
    Stop,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PluginMsg {
    /// Started; `http` tells whether it serves routes.
    Ready {
        http: bool,
    },
    Pong {
        seq: u64,
        health: Health,
    },
    /// Start failed or the plugin panicked; it will be killed.
    Failed {
        reason: String,
    },
    Metrics(MetricsSnapshot),
    Stopped,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("plugin channel I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("plugin channel message is malformed: {0}")]
    Decode(#[from] serde_json::Error),
}

pub type Framed =
    tokio_util::codec::Framed<tokio::net::UnixStream, tokio_util::codec::LengthDelimitedCodec>;

/// The channel's framing (4-byte big-endian length, at most `MAX_FRAME`), on its own so the
/// fuzz targets split a byte stream exactly as the host and the plugins do.
pub fn codec() -> tokio_util::codec::LengthDelimitedCodec {
    tokio_util::codec::LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

pub fn framed(stream: tokio::net::UnixStream) -> Framed {
    tokio_util::codec::Framed::new(stream, codec())
}

pub fn encode<T: Serialize>(msg: &T) -> Result<bytes::Bytes, FrameError> {
    Ok(serde_json::to_vec(msg)?.into())
}

pub fn decode<T: for<'de> Deserialize<'de>>(frame: &[u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(frame)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};

    #[tokio::test]
    async fn frames_round_trip_and_reject_garbage() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (mut a, mut b) = (framed(a), framed(b));
        a.send(encode(&HostMsg::Ping { seq: 7 }).unwrap())
            .await
            .unwrap();
        let frame = b.next().await.unwrap().unwrap();
        assert!(matches!(
            decode::<HostMsg>(&frame).unwrap(),
            HostMsg::Ping { seq: 7 }
        ));
        a.send(bytes::Bytes::from_static(b"{not json"))
            .await
            .unwrap();
        let frame = b.next().await.unwrap().unwrap();
        assert!(decode::<HostMsg>(&frame).is_err());
    }
}
