//! Audit pipeline setup and shutdown for the data plane (`audit.md` §1, §7), over the shared
//! `portcullis::telemetry`.

use std::sync::Arc;

use portcullis::decision::Origin;
use portcullis::telemetry::{self as shared, AuditPipeline, AuditSettings, AuditSlot, Identity};

use crate::report::Reporter;
use crate::report::audit::{AuditSink, MetricsCounters};

/// Starts the OTLP pipeline (when the exporter is not `none`) and adds the audit sink to the
/// reporter. Must run inside the tokio runtime.
pub fn start(
    settings: &AuditSettings,
    origin: &Origin,
    reporter: &mut Reporter,
    slot: &AuditSlot,
) -> Result<Option<AuditPipeline>, String> {
    let identity = Identity {
        service_name: "portcullis-proxy",
        service_version: env!("CARGO_PKG_VERSION"),
        instance_id: origin.proxy_id.to_string(),
        session_id: Some(origin.session_id.to_string()),
    };
    let counters = Arc::new(MetricsCounters(reporter.metrics_arc()));
    let pipeline = shared::start(settings, &identity, counters, slot)?;
    if pipeline.is_some() {
        reporter.add_sink(Box::new(AuditSink));
        tracing::info!(
            target: shared::TELEMETRY_TARGET,
            endpoint = %settings.endpoint,
            "audit records are exported over OTLP"
        );
    }
    Ok(pipeline)
}

/// Flushes the pipeline on a blocking thread, bounded by `audit.shutdown_timeout_ms`.
pub async fn shutdown(pipeline: Option<AuditPipeline>) {
    if let Some(p) = pipeline {
        let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
    }
}

/// The `portcullis.connection` span of an accepted client connection (`audit.md` §7.6), or
/// `None` when spans are not exported (or for the admin listener).
pub fn connection_span(
    shared: &crate::state::Shared,
    kind: crate::listeners::ListenerKind,
    peer: std::net::SocketAddr,
) -> Option<tracing::Span> {
    use crate::listeners::ListenerKind;
    if !shared::spans_enabled() {
        return None;
    }
    let protocol = match kind {
        ListenerKind::Http => "http",
        ListenerKind::Socks5 => "socks5_tcp",
        ListenerKind::Admin => return None,
    };
    let origin = shared.origin();
    Some(tracing::info_span!(
        target: "portcullis::span",
        "portcullis.connection",
        "network.transport.protocol" = protocol,
        "client.address" = %peer.ip(),
        "client.port" = i64::from(peer.port()),
        "portcullis.proxy.id" = &*origin.proxy_id,
        "portcullis.session.id" = &*origin.session_id,
    ))
}
