//! Control-plane audit: the OTLP pipeline of `portcullis-control` and the
//! `portcullis.approval` and `portcullis.rule_change` records (`audit.md` §3), over the shared
//! `portcullis::telemetry`.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use portcullis::config::Config;
use portcullis::decision::format_timestamp;
use portcullis::proto::v1;
use portcullis::telemetry::{
    self as shared, AuditCountSnapshot, AuditCounters, AuditPipeline, AuditSettings, AuditStats,
    Identity,
};

/// The process's audit counters (`GetStatus`, `audit.md` §7.3).
static STATS: LazyLock<Arc<AuditStats>> = LazyLock::new(|| Arc::new(AuditStats::default()));

/// The audit counters now (all 0 with exporter `none`).
pub fn counts() -> AuditCountSnapshot {
    STATS.snapshot()
}

/// Resolves `[audit]` + environment and starts the pipeline (`None` for exporter `none`).
/// Errors are configuration errors (exit 2) or startup failures, as one line.
pub fn start(config: &Config, instance_id: &str) -> Result<Option<AuditPipeline>, String> {
    let settings = AuditSettings::from_env(&config.audit)?;
    let Some(slot) = shared::global_slot() else {
        return Ok(None);
    };
    let identity = Identity {
        service_name: "portcullis-control",
        service_version: env!("CARGO_PKG_VERSION"),
        instance_id: instance_id.to_string(),
        session_id: None,
    };
    shared::start(&settings, &identity, STATS.clone(), &slot)
}

/// Flushes the pipeline on a blocking thread, bounded by `audit.shutdown_timeout_ms`.
pub async fn shutdown(pipeline: Option<AuditPipeline>) {
    if let Some(p) = pipeline {
        let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
    }
}

/// `portcullis.approval.outcome` of an outcome (`expired` for the deadline).
fn outcome_label(outcome: Option<v1::Outcome>) -> &'static str {
    match outcome {
        None | Some(v1::Outcome::Unspecified) => "expired",
        Some(v1::Outcome::AllowOnce) => "allow_once",
        Some(v1::Outcome::AllowSession) => "allow_session",
        Some(v1::Outcome::AllowAlways) => "allow_always",
        Some(v1::Outcome::DenyOnce) => "deny_once",
        Some(v1::Outcome::DenyAlways) => "deny_always",
        Some(v1::Outcome::PolicyAllow) => "policy_allow",
        Some(v1::Outcome::PolicyDeny) => "policy_deny",
        Some(v1::Outcome::Cancelled) => "cancelled",
    }
}

fn scope_label(outcome: Option<v1::Outcome>) -> &'static str {
    match outcome {
        Some(v1::Outcome::AllowOnce | v1::Outcome::DenyOnce) => "once",
        Some(v1::Outcome::AllowSession) => "session",
        Some(v1::Outcome::AllowAlways | v1::Outcome::DenyAlways) => "always",
        _ => "none",
    }
}

/// How an ask left the pending state.
pub struct Resolution<'a> {
    /// The outcome; `None` when the deadline passed.
    pub outcome: Option<v1::Outcome>,
    /// Who resolved it (`system` for expiry, policy and cancel).
    pub actor: &'a str,
    /// The approver's address (`unknown` for `system`).
    pub client_address: &'a str,
    /// Requests released.
    pub waiters: usize,
    /// Whether a rule line was written.
    pub persisted: bool,
    /// Policy version carrying the change, 0 if none.
    pub policy_version: u64,
    /// Justification, when one was given.
    pub justification: Option<&'a str>,
}

/// Emits one `portcullis.approval` record for `ask`.
pub fn approval(ask: &v1::PendingAsk, r: &Resolution<'_>) {
    let now = SystemTime::now();
    let wait_ms = ask
        .created_at
        .and_then(|t| {
            let created = UNIX_EPOCH.checked_add(Duration::new(
                u64::try_from(t.seconds).ok()?,
                u32::try_from(t.nanos).ok()?,
            ))?;
            now.duration_since(created).ok()
        })
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let outcome = outcome_label(r.outcome);
    tracing::event!(
        name: "portcullis.approval",
        target: "portcullis::audit",
        tracing::Level::INFO,
        {
            "event.name" = "portcullis.approval",
            "event.timestamp" = format_timestamp(now).as_str(),
            "portcullis.ask.id" = ask.id.as_str(),
            "portcullis.session.id" = ask.session_id.as_str(),
            "portcullis.decision.id" = ask.decision_id.as_str(),
            "network.transport.protocol" = ask.protocol.as_str(),
            "server.address" = ask.host.as_str(),
            "server.port" = i64::from(ask.port),
            "portcullis.approval.outcome" = outcome,
            "portcullis.approval.scope" = scope_label(r.outcome),
            "portcullis.approval.actor" = r.actor,
            "client.address" = r.client_address,
            "portcullis.approval.waiters" = i64::try_from(r.waiters).unwrap_or(i64::MAX),
            "portcullis.approval.wait_ms" = wait_ms,
            "portcullis.approval.justification" = r.justification.filter(|j| !j.is_empty()),
            "portcullis.rule.persisted" = r.persisted,
            "portcullis.policy.version" = i64::try_from(r.policy_version).unwrap_or(i64::MAX),
        },
        "{} {}:{} ({}) by {}",
        outcome,
        ask.host,
        ask.port,
        ask.protocol,
        r.actor
    );
}

/// One change of the rules file (`portcullis.rule_change`, `audit.md` §3).
pub struct RuleChange<'a> {
    /// `add`, `remove` or `reload`.
    pub action: &'static str,
    /// `api`, `approval` or `file`.
    pub origin: &'static str,
    /// The rule's host and port (0 = any); `None` for `reload`.
    pub target: Option<(&'a str, u16)>,
    /// The added rule's protocol and decision (`add` only).
    pub rule: Option<(&'a str, &'a str)>,
    /// Lines added, removed or changed.
    pub count: usize,
    /// Who made the change (`system` for a file edit).
    pub actor: &'a str,
    /// The caller's address (`unknown` for `system`).
    pub client_address: &'a str,
    /// Policy version carrying the change.
    pub policy_version: u64,
}

/// Emits one `portcullis.rule_change` record.
pub fn rule_change(c: &RuleChange<'_>) {
    let now = SystemTime::now();
    let count = i64::try_from(c.count).unwrap_or(i64::MAX);
    let body = match (c.target, c.rule) {
        (Some((host, port)), Some((protocol, decision))) => {
            format!(
                "{} {decision} {host}:{port} ({protocol}) by {}",
                c.action, c.actor
            )
        }
        (Some((host, port)), None) => format!("{} {host}:{port} by {}", c.action, c.actor),
        _ => format!("{} ({count} lines) by {}", c.action, c.actor),
    };
    tracing::event!(
        name: "portcullis.rule_change",
        target: "portcullis::audit",
        tracing::Level::INFO,
        {
            "event.name" = "portcullis.rule_change",
            "event.timestamp" = format_timestamp(now).as_str(),
            "portcullis.rule.action" = c.action,
            "portcullis.rule.origin" = c.origin,
            "server.address" = c.target.map(|(h, _)| h),
            "server.port" = c.target.map(|(_, p)| i64::from(p)),
            "portcullis.rule.protocol" = c.rule.map(|(p, _)| p),
            "portcullis.rule.decision" = c.rule.map(|(_, d)| d),
            "portcullis.rule.count" = count,
            "portcullis.approval.actor" = c.actor,
            "client.address" = c.client_address,
            "portcullis.policy.version" = i64::try_from(c.policy_version).unwrap_or(i64::MAX),
        },
        "{}",
        body
    );
}
