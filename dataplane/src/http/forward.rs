//! Absolute-form requests: policy, then stream to the origin and back (`http.md` §3–§5).

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use portcullis::decision::{Protocol, ProxyError};

use super::ConnCtx;
use super::headers;
use super::respond::{self, Body, RenderOpts};
use super::target::{self, Destination};
use super::upstream::{self, UpstreamError};
use crate::pipeline::{self, Outcome};

/// Answers one absolute-form request.
pub async fn handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
    mut opts: RenderOpts,
) -> Response<Body> {
    // A refusal leaves an unread body behind; the connection must then close.
    opts.close = !req.body().is_end_stream();
    let dest = match target::absolute_target(&req) {
        Ok(d) => d,
        Err(detail) => {
            ctx.shared
                .metrics()
                .bad_request(super::connect::bad_kind(detail));
            opts.close = true;
            return respond::error_response(ProxyError::InvalidRequest, detail, opts);
        }
    };
    let websocket = headers::is_websocket_upgrade(req.headers());
    let query = pipeline::Query {
        protocol: Protocol::Http,
        host: &dest.host,
        port: dest.port,
        method: Some(req.method().as_str()),
        upgrade: headers::has_upgrade(req.headers()),
        client: ctx.peer,
    };
    let addrs = match pipeline::decide(&ctx.shared, &query).await {
        Outcome::Refuse(d) => return respond::decision_response(&d, opts),
        Outcome::Unresolvable(failure) => {
            return pipeline::unresolved_response(failure, &dest.host, opts);
        }
        Outcome::Allow(d, addrs) => {
            tracing::debug!(decision_id = %d.id, "allowed");
            addrs
        }
    };
    opts.close = false;
    forward_allowed(ctx, req, &dest, &addrs, websocket, opts).await
}

/// Forwards an allowed request to `dest` over one of the checked `addrs` (or the upstream
/// proxy) and streams the answer back (`http.md` §4). Shared by absolute-form requests and the
/// inner requests of an intercepted stream; `websocket` keeps a WebSocket upgrade.
pub async fn forward_allowed(
    ctx: Arc<ConnCtx>,
    mut req: Request<Incoming>,
    dest: &Destination,
    addrs: &[IpAddr],
    websocket: bool,
    opts: RenderOpts,
) -> Response<Body> {
    let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
    let upstream_req = match build_upstream_request(req, dest, websocket) {
        Ok(r) => r,
        Err(detail) => return respond::error_response(ProxyError::InvalidRequest, detail, opts),
    };
    let tls_name = dest
        .scheme
        .filter(|s| s.is_tls())
        .map(|_| dest.host.to_string());
    let settings = ctx.shared.settings();

    let via = ctx
        .shared
        .upstream_proxy(tls_name.is_some(), &dest.host, dest.port);
    let mut upstream_req = upstream_req;
    let (mut conn, poolable) = match via {
        Some(via) => {
            match connect_upstream_proxy(&ctx, &via, dest, tls_name.as_deref(), &mut upstream_req)
                .await
            {
                Ok(c) => (c, false),
                Err(e) => return upstream_error(&ctx, e, dest, opts),
            }
        }
        None => {
            // Reuse this client connection's upstream connection only if it goes to a checked
            // address (`policy.md` §4).
            let mut slot = ctx.upstream.lock().await;
            let conn = match slot.take() {
                Some(p) if p.fits(addrs, dest.port, tls_name.as_deref()) => p,
                _ => match upstream::connect(
                    addrs,
                    dest.port,
                    tls_name.as_deref(),
                    &ctx.shared.tls_connector(),
                    settings.connect_timeout,
                )
                .await
                {
                    Ok(p) => p,
                    Err(e) => return upstream_error(&ctx, e, dest, opts),
                },
            };
            drop(slot);
            tracing::info!(host = %dest.host, port = dest.port, route = %"direct", "forwarding request");
            (conn, true)
        }
    };

    if conn.sender.ready().await.is_err() {
        return respond::error_response(
            ProxyError::UpstreamFailed,
            "upstream connection closed",
            opts,
        );
    }
    let send = conn.sender.send_request(upstream_req);
    let result = match settings.response_header_timeout {
        Some(t) => match tokio::time::timeout(t, send).await {
            Ok(r) => r,
            Err(_) => {
                ctx.shared.metrics().upstream_error("timeout");
                return respond::error_response(
                    ProxyError::UpstreamTimeout,
                    "no response head from the origin in time",
                    opts,
                );
            }
        },
        None => send.await,
    };
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            ctx.shared.metrics().upstream_error("failed");
            return respond::error_response(
                ProxyError::UpstreamFailed,
                &format!("no valid response from the origin: {e}"),
                opts,
            );
        }
    };

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            return switch_protocols(&ctx, resp, client_upgrade, Protocol::Http);
        }
    } else if poolable {
        // Keep the connection for the next request of this client.
        *ctx.upstream.lock().await = Some(conn);
    }
    headers::strip_response(resp.headers_mut());
    // An origin that dies mid-body (TCP reset, or EOF before the declared length) shows up as an
    // error frame of this body stream; hyper then aborts the client connection (short
    // Content-Length body, no last chunk), so the client never sees a complete-looking answer.
    // Count it here: `upstream_errors_total{kind="aborted"}` was defined for exactly this but
    // never incremented, so such failures were invisible in /metrics (issue 12, faults.rs).
    let shared = ctx.shared.clone();
    resp.map(move |b| {
        b.map_err(move |e| {
            shared.metrics().upstream_error("aborted");
            e
        })
        .boxed()
    })
}

/// Opens the route through the upstream (parent) proxy: plain `http` goes as an absolute-form
/// request to it (it receives the name), everything else through `CONNECT host:port`.
async fn connect_upstream_proxy(
    ctx: &ConnCtx,
    via: &crate::upstream_proxy::ProxyTarget,
    dest: &Destination,
    tls_name: Option<&str>,
    req: &mut Request<Incoming>,
) -> Result<upstream::Pooled, UpstreamError> {
    let budget = ctx.shared.settings().connect_timeout;
    let tls = ctx.shared.tls_connector();
    tracing::info!(host = %dest.host, port = dest.port, route = %"upstream_proxy", "forwarding request");
    if tls_name.is_some() {
        let authority = format!("{}:{}", target::bracketed(&dest.host), dest.port);
        let stream = crate::upstream_proxy::connect_via(via, &authority, budget).await?;
        return upstream::establish(stream, tls_name, &tls, budget).await;
    }
    let stream = crate::upstream_proxy::connect_proxy(via, budget).await?;
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let absolute = format!("http://{}{}", dest.host_header(), path);
    *req.uri_mut() = absolute
        .parse::<Uri>()
        .map_err(|e| UpstreamError::Tls(std::io::Error::other(e)))?;
    if let Some(auth) = &via.auth {
        req.headers_mut()
            .insert(header::PROXY_AUTHORIZATION, auth.clone());
    }
    upstream::establish(stream, None, &tls, budget).await
}

/// Rewrites the client's request into origin-form with the canonical `Host`.
fn build_upstream_request(
    req: Request<Incoming>,
    dest: &Destination,
    websocket: bool,
) -> Result<Request<Incoming>, &'static str> {
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| !p.is_empty())
        .unwrap_or("/");
    parts.uri = path.parse::<Uri>().map_err(|_| "invalid request target")?;
    parts.version = Version::HTTP_11;
    headers::strip_request(&mut parts.headers, websocket);
    let host = HeaderValue::from_str(&dest.host_header()).map_err(|_| "invalid host")?;
    parts.headers.insert(header::HOST, host);
    Ok(Request::from_parts(parts, body))
}

/// `101` from the origin: answer the client with it (hop-by-hop headers stripped, the
/// origin's `Upgrade` token kept) and relay raw bytes both ways through the shared relay.
pub fn switch_protocols(
    ctx: &ConnCtx,
    mut resp: Response<Incoming>,
    client_upgrade: hyper::upgrade::OnUpgrade,
    protocol: Protocol,
) -> Response<Body> {
    let upstream_upgrade = hyper::upgrade::on(&mut resp);
    let shared = ctx.shared.clone();
    let guard = ctx.guard.clone();
    tokio::spawn(async move {
        let _guard = guard;
        if let (Ok(client), Ok(upstream)) = tokio::join!(client_upgrade, upstream_upgrade) {
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            crate::tunnel_run::run(&shared, protocol, &mut client, &mut upstream).await;
        }
    });
    let (mut parts, _) = resp.into_parts();
    let token = parts.headers.get(header::UPGRADE).cloned();
    headers::strip_response(&mut parts.headers);
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(token) = token {
        parts.headers.insert(header::UPGRADE, token);
    }
    Response::from_parts(parts, respond::empty())
}

fn upstream_error(
    ctx: &ConnCtx,
    e: UpstreamError,
    dest: &Destination,
    opts: RenderOpts,
) -> Response<Body> {
    match e {
        UpstreamError::Dial(d) => pipeline::dial_error_response(&ctx.shared, &d, dest, opts),
        UpstreamError::Tls(err) => {
            ctx.shared.metrics().upstream_error("tls");
            respond::error_response(
                ProxyError::UpstreamTlsFailed,
                &format!(
                    "TLS with {}:{} failed: {err}",
                    target::bracketed(&dest.host),
                    dest.port
                ),
                opts,
            )
        }
        UpstreamError::Via(err) => pipeline::via_error_response(&ctx.shared, &err, opts),
        UpstreamError::Handshake(err) => {
            ctx.shared.metrics().upstream_error("failed");
            respond::error_response(ProxyError::UpstreamFailed, &err.to_string(), opts)
        }
    }
}
