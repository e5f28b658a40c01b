//! The `portcullis.policy_decision` audit record (`audit.md` §2), built from the one `Decision`.
//!
//! [`AuditSink`] is a [`DecisionSink`]: it emits one `tracing` event with target
//! `portcullis::audit`; the telemetry pipeline's bridge turns it into an OTLP log record. Emitting
//! never blocks (the pipeline drops and counts when its bounded queue is full).

use std::sync::Arc;

use portcullis::decision::{Decision, Protocol, Reason, Source, format_timestamp};
use portcullis::telemetry::{AuditCountSnapshot, AuditCounters, AuditDropReason};

use super::metrics::{self, Metrics, Sink};
use super::{DecisionSink, Offer};

/// Event name of a data-plane Decision record.
pub const EVENT_NAME: &str = "portcullis.policy_decision";

/// `network.policy.scope`: `domain` for host-policy outcomes, `non_domain` for mode guards,
/// proxy-state guards, unix sockets, MITM and method checks.
pub fn scope(d: &Decision) -> &'static str {
    if d.protocol == Protocol::UnixSocket {
        return "non_domain";
    }
    match (&d.source, &d.reason) {
        (Source::ModeGuard | Source::ProxyState, _) => "non_domain",
        (_, Reason::MethodNotAllowed | Reason::MitmRequired | Reason::ProxyDisabled) => {
            "non_domain"
        }
        _ => "domain",
    }
}

/// The record body: `<decision> <protocol> <host>:<port> (<reason>)`.
pub fn body(d: &Decision) -> String {
    format!(
        "{} {} {}:{} ({})",
        d.decision.as_str(),
        d.protocol.as_str(),
        d.host,
        d.port,
        d.reason.as_str()
    )
}

/// Emits the audit record of `d` (target `portcullis::audit`, INFO, exact attribute set).
pub fn emit(d: &Decision) {
    let client_address = d
        .client_address
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".to_string());
    tracing::event!(
        name: "portcullis.policy_decision",
        target: "portcullis::audit",
        tracing::Level::INFO,
        {
            "event.name" = EVENT_NAME,
            "event.timestamp" = format_timestamp(d.timestamp).as_str(),
            "network.policy.scope" = scope(d),
            "network.policy.decision" = d.decision.as_str(),
            "network.policy.source" = d.source.as_str(),
            "network.policy.reason" = d.reason.as_str(),
            "network.policy.override" = d.override_,
            "network.transport.protocol" = d.protocol.as_str(),
            "server.address" = d.host.as_str(),
            "server.port" = i64::from(d.port),
            "http.request.method" = d.method.as_deref().unwrap_or("none"),
            "client.address" = client_address.as_str(),
            "client.port" = d.client_port.map(i64::from),
            "portcullis.decision.id" = d.id.to_string().as_str(),
            "portcullis.session.id" = &*d.origin.session_id,
            "portcullis.proxy.id" = &*d.origin.proxy_id,
            "portcullis.ask.id" = d.ask_id.as_deref(),
        },
        "{}",
        body(d)
    );
}

/// The audit [`DecisionSink`]: one record per Decision.
#[derive(Debug, Default)]
pub struct AuditSink;

impl DecisionSink for AuditSink {
    fn sink(&self) -> Sink {
        Sink::Audit
    }

    fn offer(&self, d: &Arc<Decision>) -> Offer {
        emit(d);
        Offer::Accepted
    }
}

/// The data plane's metrics registry as the pipeline's counters (`/metrics`, `audit.md` §7.3).
#[derive(Clone)]
pub struct MetricsCounters(pub Arc<Metrics>);

impl AuditCounters for MetricsCounters {
    fn emitted(&self) {
        self.0.audit_event();
    }

    fn exported(&self, n: u64) {
        self.0.audit_exported(n);
    }

    fn dropped(&self, reason: AuditDropReason, n: u64) {
        let r = match reason {
            AuditDropReason::QueueFull => metrics::AuditDropReason::QueueFull,
            AuditDropReason::ExportFailed => metrics::AuditDropReason::ExportFailed,
            AuditDropReason::Shutdown => metrics::AuditDropReason::Shutdown,
        };
        self.0.audit_dropped(r, n);
    }

    fn snapshot(&self) -> AuditCountSnapshot {
        let c = self.0.audit_counts();
        AuditCountSnapshot {
            total: c.total,
            exported: c.exported,
            queue_full: c.dropped_queue_full,
            export_failed: c.dropped_export_failed,
            shutdown: c.dropped_shutdown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis::decision::{Origin, Verdict, new_decision_id};
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::SystemTime;

    fn d(source: Source, reason: Reason, protocol: Protocol) -> Decision {
        Decision {
            decision: Verdict::Deny,
            reason,
            source,
            protocol,
            host: "api.example.com".into(),
            port: 443,
            id: new_decision_id(),
            timestamp: SystemTime::now(),
            method: None,
            client_address: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            client_port: None,
            override_: false,
            ask_id: None,
            rule: None,
            address: None,
            socket_path: Some("/tmp/secret.sock".into()),
            message: None,
            origin: Origin {
                proxy_id: Arc::from("px-0123456789ab"),
                session_id: Arc::from("default"),
            },
        }
    }

    #[test]
    fn scope_mapping_table() {
        use Protocol::*;
        use Source::*;
        let cases = [
            (BaselinePolicy, Reason::NotAllowed, HttpsConnect, "domain"),
            (BaselinePolicy, Reason::Denied, Http, "domain"),
            (BaselinePolicy, Reason::NotAllowedLocal, Socks5Tcp, "domain"),
            (BaselinePolicy, Reason::Allow, Http, "domain"),
            (Decider, Reason::NotAllowed, Http, "domain"),
            (Decider, Reason::ApprovalDenied, Http, "domain"),
            (ModeGuard, Reason::MethodNotAllowed, Http, "non_domain"),
            (ModeGuard, Reason::MitmRequired, HttpsConnect, "non_domain"),
            (ProxyState, Reason::ProxyDisabled, Http, "non_domain"),
            (BaselinePolicy, Reason::NotAllowed, UnixSocket, "non_domain"),
            (BaselinePolicy, Reason::Allow, UnixSocket, "non_domain"),
        ];
        for (s, r, p, want) in cases {
            assert_eq!(scope(&d(s, r.clone(), p)), want, "{s:?} {r:?} {p:?}");
        }
    }

    #[test]
    fn body_has_no_path() {
        let mut x = d(
            Source::BaselinePolicy,
            Reason::NotAllowed,
            Protocol::UnixSocket,
        );
        x.host = "unix-socket".into();
        x.port = 0;
        assert_eq!(body(&x), "deny unix_socket unix-socket:0 (not_allowed)");
        let x = d(
            Source::BaselinePolicy,
            Reason::Denied,
            Protocol::HttpsConnect,
        );
        assert_eq!(body(&x), "deny https_connect api.example.com:443 (denied)");
    }
}
