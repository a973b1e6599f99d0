//! A minimal HTTP/1.1 client over TCP or a Unix socket: the CLI talks to the control API with
//! it, and the API proxies plugin routes to plugin sockets with it.

use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {target}: {cause}")]
    Connect {
        target: String,
        cause: std::io::Error,
    },
    #[error("HTTP exchange with {target} failed: {cause}")]
    Http { target: String, cause: hyper::Error },
    #[error("reading the answer from {target}: {cause}")]
    Body { target: String, cause: String },
    #[error("bad request: {0}")]
    Request(String),
}

async fn exchange<T>(
    io: T,
    target: String,
    req: Request<Body>,
) -> Result<Response<hyper::body::Incoming>, ClientError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|cause| ClientError::Http {
            target: target.clone(),
            cause,
        })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
        .send_request(req)
        .await
        .map_err(|cause| ClientError::Http { target, cause })
}

/// Sends `req` over the Unix socket at `path`, streaming the response back.
pub async fn unix(
    path: &Path,
    req: Request<Body>,
) -> Result<Response<hyper::body::Incoming>, ClientError> {
    let target = path.display().to_string();
    let io = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|cause| ClientError::Connect {
            target: target.clone(),
            cause,
        })?;
    exchange(io, target, req).await
}

/// A whole request/response over TCP, for the CLI; `bearer` adds an Authorization header.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
    bearer: Option<&str>,
) -> Result<(u16, Bytes), ClientError> {
    call_capped(addr, method, path, body, bearer, usize::MAX).await
}

/// `call`, reading at most `max` bytes of the answer (for answers from other machines).
pub async fn call_capped(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
    bearer: Option<&str>,
    max: usize,
) -> Result<(u16, Bytes), ClientError> {
    let target = format!("http://{addr}");
    let io = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|cause| ClientError::Connect {
            target: target.clone(),
            cause,
        })?;
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if let Some(token) = bearer {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    let body = match body {
        Some(v) => {
            builder = builder.header("content-type", "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    let req = builder
        .body(body)
        .map_err(|e| ClientError::Request(e.to_string()))?;
    let resp = exchange(io, target.clone(), req).await?;
    let status = resp.status().as_u16();
    let bytes = http_body_util::Limited::new(resp.into_body(), max)
        .collect()
        .await
        .map_err(|cause| ClientError::Body {
            target,
            cause: cause.to_string(),
        })?
        .to_bytes();
    Ok((status, bytes))
}
