//! The inner HTTP/1.1 server of an intercepted stream (`http.md` §9 rules 3–5): terminate the
//! client's TLS with the host's leaf, then judge every inner request through the same pipeline
//! and Decision responses as a plain request, and forward allowed ones over verified TLS.

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Version, header};
use hyper::body::{Body as _, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use portcullis::decision::{Protocol, ProxyError};
use portcullis::policy::{normalize_host, split_authority};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Mitm;
use super::handshake::{self, HandshakeError};
use crate::http::ConnCtx;
use crate::http::forward;
use crate::http::headers;
use crate::http::respond::{self, Body, RenderOpts};
use crate::http::target::Destination;
use crate::listeners::ConnGuard;
use crate::pipeline::{self, Outcome};
use crate::report::metrics::MitmErrorKind;
use crate::state::Shared;

/// A client byte stream the interception can run on.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientStream for T {}

/// What the outer request decided: the destination and the addresses checked for it.
pub struct Target {
    /// CONNECT host and port (scheme `https`).
    pub dest: Destination,
    /// The addresses checked when the outer request was allowed; inner requests re-check
    /// these and never look the name up again.
    pub addrs: Vec<IpAddr>,
    /// `https_connect` or `socks5_tcp`: the protocol of every inner Decision.
    pub protocol: Protocol,
}

/// Who the client is and which connection slot it holds.
pub struct Client {
    /// The client's address.
    pub peer: SocketAddr,
    /// Its place under the connection limit.
    pub guard: ConnGuard,
}

/// Runs an intercepted stream to its end. Every failure ends this connection only.
pub async fn intercept(
    mitm: Arc<Mitm>,
    shared: Arc<Shared>,
    client: Client,
    target: Target,
    io: Box<dyn ClientStream>,
) {
    let host = &target.dest.host;
    let port = target.dest.port;
    let peer = client.peer;
    let config = match mitm.server_config(host) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%peer, %host, port, error = %e, "MITM: cannot make a leaf certificate");
            shared.metrics().mitm_error(MitmErrorKind::LeafGeneration);
            return;
        }
    };
    let settings = shared.settings();
    let tls = match handshake::accept(io, host, config, settings.header_read_timeout).await {
        Ok(s) => s,
        Err(e) => {
            let kind = match e {
                HandshakeError::SniMismatch { .. } => MitmErrorKind::SniMismatch,
                _ => MitmErrorKind::ClientHandshake,
            };
            tracing::warn!(%peer, %host, port, error = %e, "MITM: client TLS handshake failed");
            shared.metrics().mitm_error(kind);
            return;
        }
    };
    tracing::debug!(%peer, %host, port, "MITM: client TLS established");
    let ctx = Arc::new(ConnCtx {
        shared: shared.clone(),
        peer,
        guard: client.guard,
        upstream: tokio::sync::Mutex::new(None),
    });
    let target = Arc::new(target);
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        let target = target.clone();
        async move { Ok::<_, Infallible>(inner_request(ctx, &target, req).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(true)
        .half_close(false)
        // Bounds both a slow head and an idle keep-alive connection.
        .header_read_timeout(settings.client_idle_timeout)
        .max_buf_size(settings.max_header_bytes.max(8192))
        .max_header_size(settings.max_header_bytes)
        .max_headers(settings.max_headers);
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    let mut shutdown = shared.shutdown_signal();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "MITM inner connection ended with an error");
            }
        }
        _ = shutdown.wait() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(settings.shutdown_grace, conn).await;
        }
    }
}

/// Judges and answers one inner request (`http.md` §9 rule 4).
async fn inner_request(
    ctx: Arc<ConnCtx>,
    target: &Target,
    req: Request<Incoming>,
) -> Response<Body> {
    let shared = ctx.shared.clone();
    shared.metrics().request(target.protocol);
    let mut opts = RenderOpts {
        json: respond::wants_json(req.headers()),
        head: req.method() == Method::HEAD,
        close: !req.body().is_end_stream(),
    };
    let method = req.method().as_str().to_string();
    let (host, port) = (&target.dest.host, target.dest.port);
    if req.method() == Method::CONNECT {
        shared.metrics().bad_request("connect_in_mitm");
        return respond::error_response(
            ProxyError::ConnectInTunnel,
            "CONNECT is not allowed inside an intercepted tunnel",
            opts,
        );
    }
    if req.version() != Version::HTTP_11 && req.version() != Version::HTTP_10 {
        return respond::bare(StatusCode::HTTP_VERSION_NOT_SUPPORTED);
    }
    if let Err(detail) = check_host(&req, &target.dest) {
        shared.metrics().bad_request("invalid_target");
        opts.close = true;
        tracing::info!(%method, %host, port, status = 400, "MITM inner request refused: {detail}");
        return respond::error_response(ProxyError::InvalidRequest, detail, opts);
    }
    let query = pipeline::Query {
        protocol: target.protocol,
        host,
        port,
        method: Some(&method),
        upgrade: headers::has_upgrade(req.headers()),
        client: ctx.peer,
    };
    let resp = match pipeline::decide_known(&shared, &query, &target.addrs).await {
        Outcome::Refuse(d) => respond::decision_response(&d, opts),
        Outcome::Unresolvable(failure) => pipeline::unresolved_response(failure, host, opts),
        Outcome::Allow(d, addrs) => {
            tracing::debug!(decision_id = %d.id, "allowed");
            opts.close = false;
            forward::forward_allowed(ctx.clone(), req, &target.dest, &addrs, false, opts).await
        }
    };
    // Method, host, port and status only: never the path or query.
    tracing::info!(%method, %host, port, status = resp.status().as_u16(), "MITM inner request");
    resp
}

/// The inner request's host (absolute-form authority, else `Host`) must be the CONNECT host,
/// and its port, when given, the CONNECT port.
fn check_host<B>(req: &Request<B>, dest: &Destination) -> Result<(), &'static str> {
    const MISMATCH: &str = "host mismatch";
    let text = match req.uri().authority() {
        Some(a) => {
            if a.as_str().contains('@') {
                return Err("userinfo in the request target is not allowed");
            }
            a.as_str().to_string()
        }
        None => {
            let mut values = req.headers().get_all(header::HOST).iter();
            match (values.next(), values.next()) {
                (Some(v), None) => v.to_str().map_err(|_| MISMATCH)?.to_string(),
                (Some(_), Some(_)) => return Err("several Host headers"),
                (None, _) if req.version() == Version::HTTP_10 => return Ok(()),
                (None, _) => return Err("missing Host header"),
            }
        }
    };
    let (h, p) = split_authority(&text).map_err(|_| MISMATCH)?;
    let h = normalize_host(h).map_err(|_| MISMATCH)?;
    if h != dest.host || p.is_some_and(|p| p != dest.port) {
        return Err(MISMATCH);
    }
    Ok(())
}

/// A stream that first yields bytes already read from it (the client's early ClientHello read
/// together with the CONNECT head), then reads from the stream itself.
pub struct Prefixed<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO> Prefixed<IO> {
    /// Wraps `io`, replaying `prefix` first.
    pub fn new(prefix: Bytes, io: IO) -> Prefixed<IO> {
        Prefixed { prefix, io }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis::policy::normalize_host;

    fn dest(host: &str, port: u16) -> Destination {
        Destination {
            host: normalize_host(host).unwrap(),
            port,
            scheme: Some(crate::http::target::Scheme::Https),
        }
    }

    fn req(uri: &str, host: Option<&str>) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn inner_host_must_match_connect_target() {
        let d = dest("api.test", 443);
        assert!(check_host(&req("/x", Some("API.test")), &d).is_ok());
        assert!(check_host(&req("/x", Some("api.test:443")), &d).is_ok());
        assert_eq!(
            check_host(&req("/x", Some("10.0.0.1")), &d),
            Err("host mismatch")
        );
        assert_eq!(
            check_host(&req("/x", Some("api.test:8443")), &d),
            Err("host mismatch")
        );
        assert!(check_host(&req("https://api.test/x", Some("api.test")), &d).is_ok());
        assert_eq!(
            check_host(&req("https://other.test/x", Some("api.test")), &d),
            Err("host mismatch")
        );
        assert_eq!(check_host(&req("/x", None), &d), Err("missing Host header"));
    }

    #[tokio::test]
    async fn prefixed_replays_then_reads() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"world").await.unwrap();
        drop(a);
        let mut p = Prefixed::new(Bytes::from_static(b"hello "), b);
        let mut out = String::new();
        p.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }
}
