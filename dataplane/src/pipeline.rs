//! The decision pipeline every protocol handler calls: name stage → resolve once → address
//! stage → one `Decision`, reported once, handed back with the addresses to dial.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::Response;
use portcullis::decision::{Decision, Protocol, ProxyError, ResolveFailure};
use portcullis::policy::{AddressPlan, Host, NameStage, Proceed, RequestContext};

use crate::dial::DialError;
use crate::http::respond::{self, Body, RenderOpts};
use crate::http::target::{Destination, bracketed};
use crate::state::Shared;

/// What a handler asks about.
pub struct Query<'a> {
    /// How the client reached us.
    pub protocol: Protocol,
    /// Normalised destination host.
    pub host: &'a Host,
    /// Destination port.
    pub port: u16,
    /// HTTP method, if any.
    pub method: Option<&'a str>,
    /// The request carries `Upgrade`.
    pub upgrade: bool,
    /// Client peer.
    pub client: SocketAddr,
}

/// The pipeline's answer.
pub enum Outcome {
    /// Allowed: dial only these checked addresses, in order.
    Allow(Arc<Decision>, Vec<IpAddr>),
    /// Allowed (local binding on) but the name has no address: an upstream error, not policy.
    Unresolvable(ResolveFailure),
    /// Refused: render this Decision.
    Refuse(Arc<Decision>),
}

/// Runs the whole decision order of `policy.md` §4 against one runtime version.
pub async fn decide(shared: &Shared, q: &Query<'_>) -> Outcome {
    let started = Instant::now();
    let rt = shared.runtime();
    let ctx = RequestContext {
        protocol: q.protocol,
        host: q.host,
        port: q.port,
        method: q.method,
        upgrade: q.upgrade,
        own_addrs: shared.own_addrs(),
    };
    let proceed: Proceed = match rt.policy.check_name(&ctx) {
        NameStage::Refuse(refusal) => {
            let d = refusal.into_decision(&ctx, q.client, shared.origin());
            shared.metrics().decision_time(started.elapsed());
            return Outcome::Refuse(shared.reporter().report(d));
        }
        NameStage::Proceed(p) => p,
    };
    let name_time = started.elapsed();
    let addrs = match &proceed.plan {
        AddressPlan::Addresses(a) => a.clone(),
        AddressPlan::Resolve(name) => {
            let t = Instant::now();
            let r = rt.resolver.resolve(name, rt.settings.dns_timeout).await;
            shared.metrics().dns_time(t.elapsed());
            match r {
                Ok(a) => a,
                Err(failure) => {
                    let after = Instant::now();
                    let d = match rt.policy.resolution_failed(&ctx, &proceed, failure) {
                        Some(refusal) => refusal.into_decision(&ctx, q.client, shared.origin()),
                        None => {
                            let d = proceed.allow_decision(&ctx, q.client, shared.origin());
                            shared.metrics().decision_time(name_time + after.elapsed());
                            shared.reporter().report(d);
                            return Outcome::Unresolvable(failure);
                        }
                    };
                    shared.metrics().decision_time(name_time + after.elapsed());
                    return Outcome::Refuse(shared.reporter().report(d));
                }
            }
        }
    };
    let after = Instant::now();
    let outcome = match rt.policy.check_addresses(&ctx, &proceed, &addrs) {
        Err(refusal) => Outcome::Refuse(shared.reporter().report(refusal.into_decision(
            &ctx,
            q.client,
            shared.origin(),
        ))),
        Ok(()) => Outcome::Allow(
            shared
                .reporter()
                .report(proceed.allow_decision(&ctx, q.client, shared.origin())),
            addrs,
        ),
    };
    shared.metrics().decision_time(name_time + after.elapsed());
    outcome
}

/// 502/504 for an allowed name without addresses (`policy.md` §4 step 5.2).
pub fn unresolved_response(
    failure: ResolveFailure,
    host: &Host,
    opts: RenderOpts,
) -> Response<Body> {
    match failure {
        ResolveFailure::TimedOut => respond::error_response(
            ProxyError::UpstreamTimeout,
            &format!("resolving {host} timed out"),
            opts,
        ),
        ResolveFailure::NoAddresses => respond::error_response(
            ProxyError::UpstreamConnectFailed,
            &format!("{host} has no addresses"),
            opts,
        ),
        ResolveFailure::LookupFailed => respond::error_response(
            ProxyError::UpstreamConnectFailed,
            &format!("resolving {host} failed"),
            opts,
        ),
    }
}

/// 502/504 for a failed dial.
pub fn dial_error_response(
    shared: &Shared,
    e: &DialError,
    dest: &Destination,
    opts: RenderOpts,
) -> Response<Body> {
    let target = format!("{}:{}", bracketed(&dest.host), dest.port);
    match e {
        DialError::Timeout(ms) => {
            shared.metrics().upstream_error("timeout");
            respond::error_response(
                ProxyError::UpstreamTimeout,
                &format!("connecting to {target} timed out after {ms} ms"),
                opts,
            )
        }
        other => {
            shared.metrics().upstream_error("connect");
            respond::error_response(
                ProxyError::UpstreamConnectFailed,
                &format!("connecting to {target} failed: {other}"),
                opts,
            )
        }
    }
}

/// 502/504 for a failed route through the upstream proxy.
pub fn via_error_response(
    shared: &Shared,
    e: &crate::upstream_proxy::ViaError,
    opts: RenderOpts,
) -> Response<Body> {
    use crate::upstream_proxy::ViaError;
    match e {
        ViaError::Timeout(_) => {
            shared.metrics().upstream_error("timeout");
            respond::error_response(ProxyError::UpstreamTimeout, &e.to_string(), opts)
        }
        _ => {
            shared.metrics().upstream_error("connect");
            respond::error_response(ProxyError::UpstreamConnectFailed, &e.to_string(), opts)
        }
    }
}
