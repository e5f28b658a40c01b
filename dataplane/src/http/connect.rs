//! `CONNECT host:port`: policy, dial a checked address, `200`, raw tunnel (`http.md` §6).

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use portcullis::decision::{Protocol, ProxyError};
use tokio::io::AsyncWriteExt;

use super::ConnCtx;
use super::respond::{self, Body, RenderOpts};
use super::target;
use crate::dial;
use crate::pipeline::{self, Outcome};

/// Answers one CONNECT request.
pub async fn handle(
    ctx: Arc<ConnCtx>,
    mut req: Request<Incoming>,
    opts: RenderOpts,
) -> Response<Body> {
    let dest = match target::connect_target(&req) {
        Ok(d) => d,
        Err(detail) => {
            ctx.shared.metrics().bad_request(bad_kind(detail));
            return respond::error_response(ProxyError::InvalidRequest, detail, opts);
        }
    };
    let query = pipeline::Query {
        protocol: Protocol::HttpsConnect,
        host: &dest.host,
        port: dest.port,
        method: Some("CONNECT"),
        upgrade: false,
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
    if let Some(mitm) = crate::mitm::required(&ctx.shared) {
        // Limited mode: the CONNECT is intercepted, never a raw tunnel (`http.md` §9).
        return intercept(ctx, req, dest, addrs, mitm);
    }
    let settings = ctx.shared.settings();
    let upstream = match ctx.shared.upstream_proxy(true, &dest.host, dest.port) {
        Some(via) => {
            let authority = format!("{}:{}", target::bracketed(&dest.host), dest.port);
            match crate::upstream_proxy::connect_via(&via, &authority, settings.connect_timeout)
                .await
            {
                Ok(s) => {
                    tracing::info!(host = %dest.host, port = dest.port, route = %"upstream_proxy", "tunnel open");
                    s
                }
                Err(e) => return pipeline::via_error_response(&ctx.shared, &e, opts),
            }
        }
        None => match dial::dial(&addrs, dest.port, settings.connect_timeout).await {
            Ok(s) => {
                tracing::info!(host = %dest.host, port = dest.port, route = %"direct", "tunnel open");
                s
            }
            Err(e) => return pipeline::dial_error_response(&ctx.shared, &e, &dest, opts),
        },
    };
    let shared = ctx.shared.clone();
    let on_upgrade = hyper::upgrade::on(&mut req);
    let guard = ctx.guard.clone();
    tokio::spawn(async move {
        let _guard = guard;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT client went away before the tunnel started");
                return;
            }
        };
        match upgraded.downcast::<TokioIo<super::timed_io::TimedIo>>() {
            Ok(parts) => {
                let mut client = parts.io.into_inner().into_inner();
                let mut upstream = upstream;
                // Bytes the client sent right after the CONNECT head go first, in order.
                let early = parts.read_buf;
                if !early.is_empty() && upstream.write_all(&early).await.is_err() {
                    return;
                }
                // The HTTP read buffer is not needed for the life of the tunnel.
                drop(early);
                crate::tunnel_run::run(&shared, Protocol::HttpsConnect, &mut client, &mut upstream)
                    .await;
            }
            Err(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                let mut upstream = upstream;
                crate::tunnel_run::run(&shared, Protocol::HttpsConnect, &mut client, &mut upstream)
                    .await;
            }
        }
    });
    let mut resp = Response::new(respond::empty());
    *resp.status_mut() = StatusCode::OK;
    resp.extensions_mut()
        .insert(hyper::ext::ReasonPhrase::from_static(
            b"Connection established",
        ));
    resp
}

/// Answers `200` and serves the tunnel through the interception once the client switches.
fn intercept(
    ctx: Arc<ConnCtx>,
    mut req: Request<Incoming>,
    dest: target::Destination,
    addrs: Vec<std::net::IpAddr>,
    mitm: Arc<crate::mitm::Mitm>,
) -> Response<Body> {
    use crate::mitm::serve::{self, ClientStream, Prefixed};
    let on_upgrade = hyper::upgrade::on(&mut req);
    let shared = ctx.shared.clone();
    let client = serve::Client {
        peer: ctx.peer,
        guard: ctx.guard.clone(),
    };
    let target = serve::Target {
        dest: target::Destination {
            scheme: Some(target::Scheme::Https),
            ..dest
        },
        addrs,
        protocol: Protocol::HttpsConnect,
    };
    tracing::info!(host = %target.dest.host, port = target.dest.port, "CONNECT intercepted");
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT client went away before the interception started");
                return;
            }
        };
        let io: Box<dyn ClientStream> =
            match upgraded.downcast::<TokioIo<super::timed_io::TimedIo>>() {
                Ok(parts) => {
                    let stream = parts.io.into_inner().into_inner();
                    Box::new(Prefixed::new(parts.read_buf, stream))
                }
                Err(upgraded) => Box::new(TokioIo::new(upgraded)),
            };
        serve::intercept(mitm, shared, client, target, io).await;
    });
    let mut resp = Response::new(respond::empty());
    *resp.status_mut() = StatusCode::OK;
    resp.extensions_mut()
        .insert(hyper::ext::ReasonPhrase::from_static(
            b"Connection established",
        ));
    resp
}

/// The `portcullis_bad_requests_total{kind}` label for a target error.
pub fn bad_kind(detail: &str) -> &'static str {
    if detail.contains("invalid host") {
        "invalid_host"
    } else {
        "invalid_target"
    }
}
