//! The decision pipeline every protocol handler calls: name stage → resolve once → address
//! stage → one `Decision`, reported once, handed back with the addresses to dial.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::Response;
use portcullis::decision::{
    Decision, MessageKind, Protocol, ProxyError, Reason, ResolveFailure, Source, Verdict,
};
use portcullis::policy::{AddressPlan, Host, NameStage, Proceed, Refusal, RequestContext};
use portcullis::proto::v1;

use crate::asker::AskResult;

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
    decide_with(shared, q, None).await
}

/// As [`decide`], but step 5 re-checks `known` (the addresses checked when the outer CONNECT
/// was decided) instead of resolving again: the inner requests of an intercepted stream
/// (`http.md` §9 rule 4).
pub async fn decide_known(shared: &Shared, q: &Query<'_>, known: &[IpAddr]) -> Outcome {
    decide_with(shared, q, Some(known)).await
}

async fn decide_with(shared: &Shared, q: &Query<'_>, known: Option<&[IpAddr]>) -> Outcome {
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
        NameStage::Refuse(refusal) if refusal.verdict == Verdict::Ask => {
            drop(rt);
            // Time spent waiting for a person is not decision time.
            match ask(shared, &ctx, q.client, refusal).await {
                Ok((proceed, ask_id)) => {
                    let zero = std::time::Duration::ZERO;
                    let ask_id = Some(ask_id);
                    return finish(shared, &ctx, q.client, proceed, ask_id, zero, known).await;
                }
                Err(d) => return Outcome::Refuse(d),
            }
        }
        NameStage::Refuse(refusal) => {
            let d = refusal.into_decision(&ctx, q.client, shared.origin());
            shared.metrics().decision_time(started.elapsed());
            return Outcome::Refuse(shared.reporter().report(d));
        }
        NameStage::Proceed(p) => p,
    };
    let name_time = started.elapsed();
    drop(rt);
    finish(shared, &ctx, q.client, proceed, None, name_time, known).await
}

/// Steps 5–6 after the name stage passed (directly or through an approval): resolve once,
/// check every address, report the one Decision.
async fn finish(
    shared: &Shared,
    ctx: &RequestContext<'_>,
    client: SocketAddr,
    proceed: Proceed,
    ask_id: Option<String>,
    name_time: std::time::Duration,
    known: Option<&[IpAddr]>,
) -> Outcome {
    // The version current now: a held request continues against the policy of the answer.
    let rt = shared.runtime();
    let ctx = *ctx;
    let q_client = client;
    let stamp = |mut d: Decision| {
        d.ask_id.clone_from(&ask_id);
        d
    };
    let addrs = match (&proceed.plan, known) {
        (_, Some(known)) => known.to_vec(),
        (AddressPlan::Addresses(a), None) => a.clone(),
        (AddressPlan::Resolve(name), None) => {
            let t = Instant::now();
            let r = rt.resolver.resolve(name, rt.settings.dns_timeout).await;
            shared.metrics().dns_time(t.elapsed());
            match r {
                Ok(a) => a,
                Err(failure) => {
                    let after = Instant::now();
                    let d = match rt.policy.resolution_failed(&ctx, &proceed, failure) {
                        Some(refusal) => {
                            stamp(refusal.into_decision(&ctx, q_client, shared.origin()))
                        }
                        None => {
                            let d = stamp(proceed.allow_decision(&ctx, q_client, shared.origin()));
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
    let outcome =
        match rt.policy.check_addresses(&ctx, &proceed, &addrs) {
            Err(refusal) => Outcome::Refuse(shared.reporter().report(stamp(
                refusal.into_decision(&ctx, q_client, shared.origin()),
            ))),
            Ok(()) => Outcome::Allow(
                shared.reporter().report(stamp(proceed.allow_decision(
                    &ctx,
                    q_client,
                    shared.origin(),
                ))),
                addrs,
            ),
        };
    shared.metrics().decision_time(name_time + after.elapsed());
    outcome
}

/// An allowlist miss while asks are enabled (`control.md` §7): report the `ask` Decision, hold
/// the request until the answer, and return how to continue — or the final refusal.
async fn ask(
    shared: &Shared,
    ctx: &RequestContext<'_>,
    client: SocketAddr,
    refusal: Refusal,
) -> Result<(Proceed, String), Arc<Decision>> {
    let deny = |reason: Reason, kind: MessageKind, ask_id: Option<String>| {
        let mut d = Refusal {
            verdict: Verdict::Deny,
            reason,
            source: Source::Decider,
            kind,
            rule: None,
            address: None,
        }
        .into_decision(ctx, client, shared.origin());
        d.ask_id = ask_id;
        shared.reporter().report(d)
    };
    let Some(asker) = shared.asker().filter(|a| a.is_up()).cloned() else {
        return Err(deny(
            Reason::ControlUnavailable,
            MessageKind::ControlUnavailable,
            None,
        ));
    };
    let ask_decision =
        shared
            .reporter()
            .report(refusal.into_decision(ctx, client, shared.origin()));
    let req = v1::AskRequest {
        ask_ref: 0,
        decision_id: ask_decision.id.hyphenated().to_string(),
        host: ctx.host.to_string(),
        port: u32::from(ctx.port),
        protocol: ctx.protocol.as_str().into(),
        method: ctx.method.unwrap_or_default().into(),
        client_address: client.ip().to_string(),
        hold: true,
    };
    if ctx.protocol == Protocol::Socks5Udp {
        // Datagrams are never held: the ask only helps later datagrams (control.md §7.8).
        asker.ask_without_hold(req);
        return Err(ask_decision);
    }
    let waited = Instant::now();
    let result = asker.ask(req).await;
    shared.metrics().ask_wait(waited.elapsed());
    match result {
        AskResult::Answer(a) if is_policy_answer(&a) => {
            // A policy change resolved the ask; its snapshot came first on the stream, so the
            // current policy renders the answer as a plain list decision (decisions.md §2).
            let rt = shared.runtime();
            let ask_id = (!a.ask_id.is_empty()).then(|| a.ask_id.clone());
            match rt.policy.check_name(ctx) {
                NameStage::Proceed(p) if a.verdict == "allow" => Ok((p, a.ask_id)),
                NameStage::Refuse(r) if a.verdict != "allow" && r.verdict == Verdict::Deny => {
                    let mut d = r.into_decision(ctx, client, shared.origin());
                    d.ask_id = ask_id;
                    Err(shared.reporter().report(d))
                }
                _ if a.verdict == "allow" => Ok((rt.policy.approved(ctx), a.ask_id)),
                _ => Err(deny(
                    Reason::parse(&a.reason),
                    MessageKind::PolicyDenied,
                    ask_id,
                )),
            }
        }
        AskResult::Answer(a) if a.verdict == "allow" => {
            let rt = shared.runtime();
            Ok((rt.policy.approved(ctx), a.ask_id))
        }
        AskResult::Answer(a) => {
            let reason = Reason::parse(&a.reason);
            let kind = match reason {
                Reason::ApprovalDenied => MessageKind::ApprovalDenied,
                Reason::ApprovalTimeout => MessageKind::ApprovalTimeout,
                Reason::ApprovalsFull => MessageKind::ApprovalsFull,
                Reason::ControlUnavailable => MessageKind::ControlUnavailable,
                Reason::SessionEnded => MessageKind::SessionEnded,
                _ => MessageKind::PolicyDenied,
            };
            let ask_id = (!a.ask_id.is_empty()).then_some(a.ask_id);
            Err(deny(reason, kind, ask_id))
        }
        AskResult::Unavailable => Err(deny(
            Reason::ControlUnavailable,
            MessageKind::ControlUnavailable,
            None,
        )),
        AskResult::Full => Err(deny(
            Reason::ApprovalsFull,
            MessageKind::ApprovalsFull,
            None,
        )),
        AskResult::TimedOut => Err(deny(
            Reason::ApprovalTimeout,
            MessageKind::ApprovalTimeout,
            None,
        )),
    }
}

/// An answer that a policy change produced (`POLICY_ALLOW` / `POLICY_DENY`).
fn is_policy_answer(a: &v1::AskAnswer) -> bool {
    a.outcome == v1::Outcome::PolicyAllow as i32 || a.outcome == v1::Outcome::PolicyDeny as i32
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
