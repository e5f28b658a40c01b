//! HTTP/1.1 proxy listener: absolute-form requests, CONNECT, upgrades (`http.md`).

mod connect;
pub mod forward;
pub mod headers;
pub mod respond;
pub use portcullis_dataplane::http_target as target;
pub mod timed_io;
mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::state::Shared;
use respond::{Body, RenderOpts};

/// Per-connection context shared by the requests of one client connection.
pub struct ConnCtx {
    /// The shared proxy state.
    pub shared: Arc<Shared>,
    /// Client peer address.
    pub peer: SocketAddr,
    /// This connection's place under the connection limit (tunnels keep a clone).
    pub guard: crate::listeners::ConnGuard,
    /// The upstream connection kept for keep-alive reuse by this client connection.
    pub upstream: tokio::sync::Mutex<Option<upstream::Pooled>>,
}

/// Serves one accepted client connection until it closes.
pub async fn serve_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    guard: crate::listeners::ConnGuard,
) {
    let _ = stream.set_nodelay(true);
    let settings = shared.settings();
    if is_h2_preface(&stream, settings.header_read_timeout).await {
        // HTTP/1.1 only (`http.md` §1): answer 505 and close.
        shared.metrics().bad_request("unsupported_version");
        let mut stream = stream;
        let _ = tokio::io::AsyncWriteExt::write_all(
            &mut stream,
            b"HTTP/1.1 505 HTTP Version Not Supported\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await;
        return;
    }
    let ctx = Arc::new(ConnCtx {
        shared: shared.clone(),
        peer,
        guard,
        upstream: tokio::sync::Mutex::new(None),
    });
    let (io, activity) = timed_io::TimedIo::new(
        stream,
        settings.header_read_timeout,
        settings.client_idle_timeout,
    );
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        let activity = activity.clone();
        activity.started();
        async move {
            let resp = handle(ctx, req).await;
            Ok::<_, Infallible>(resp.map(|b| timed_io::TrackedBody::new(b, activity)))
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(true)
        .half_close(false)
        // The head and idle timers live in TimedIo (hyper's would close without a 408).
        .header_read_timeout(None)
        .max_buf_size(settings.max_header_bytes.max(8192))
        .max_header_size(settings.max_header_bytes)
        .max_headers(settings.max_headers);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut shutdown = shared.shutdown_signal();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "client connection ended with an error");
            }
        }
        _ = shutdown.wait() => {
            // Stop reading new requests; let the one in flight finish within the grace period.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(settings.shutdown_grace, conn).await;
        }
    }
}

/// Whether the connection starts with the HTTP/2 preface (`PRI * HTTP/2.0`). Peeks only the
/// first segment; anything shorter goes to the HTTP/1 parser as usual.
async fn is_h2_preface(stream: &TcpStream, limit: std::time::Duration) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0";
    let mut buf = [0u8; 14];
    match tokio::time::timeout(limit, stream.peek(&mut buf)).await {
        Ok(Ok(n)) => n > 0 && PREFACE.starts_with(&buf[..n]) && n >= 4,
        _ => false,
    }
}

/// Dispatches one request by its form (`http.md` §2).
async fn handle(ctx: Arc<ConnCtx>, req: Request<Incoming>) -> Response<Body> {
    let opts = RenderOpts {
        json: respond::wants_json(req.headers()),
        head: req.method() == Method::HEAD,
        close: false,
    };
    if req.headers().contains_key(&headers::X_UNIX_SOCKET) {
        return crate::unix_socket::handle(ctx, req, opts).await;
    }
    if req.method() == Method::CONNECT {
        ctx.shared
            .metrics()
            .request(portcullis::decision::Protocol::HttpsConnect);
        return connect::handle(ctx, req, opts).await;
    }
    ctx.shared
        .metrics()
        .request(portcullis::decision::Protocol::Http);
    if req.version() != http::Version::HTTP_11 && req.version() != http::Version::HTTP_10 {
        return respond::bare(StatusCode::HTTP_VERSION_NOT_SUPPORTED);
    }
    forward::handle(ctx, req, opts).await
}
