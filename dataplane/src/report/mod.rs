//! Reporting: every Decision goes through [`Reporter::report`] exactly once, which feeds the
//! metrics, the blocked log and its violation line, and the non-blocking sinks (gRPC reports,
//! audit) — all from the same `Arc<Decision>` the caller then renders its response from.

// Removed once the module is wired into the data plane (some items are not yet used).
#![allow(dead_code)]

pub mod audit;
pub mod blocked_log;
pub mod control_queue;
pub mod metrics;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use portcullis::decision::{Decision, Verdict};

pub use blocked_log::BlockedLog;
pub use control_queue::{ControlQueue, ControlSink};
pub use metrics::{Metrics, Sink};

/// What a [`DecisionSink`] did with a Decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Queued (or otherwise handed on).
    Accepted,
    /// Not for this sink (e.g. the control sink's filter, `control.md` §6 rule 5); not a drop.
    Skipped,
    /// The sink's bounded queue was full or closed; counted in
    /// `portcullis_events_dropped_total{sink}`.
    Dropped,
}

/// Extension point for the later gRPC report and audit surfaces.
///
/// **Contract:** `offer` is called on the data path for every Decision, so it must never block,
/// await or do I/O: hand the `Arc` to a bounded queue with `try_send` (or emit a `tracing`
/// event) and return. A full queue returns [`Offer::Dropped`]; the reporter counts it under
/// [`DecisionSink::sink`].
pub trait DecisionSink: Send + Sync {
    /// The `sink` label its drops are counted under.
    fn sink(&self) -> Sink;
    /// Hands the Decision on without blocking.
    fn offer(&self, d: &Arc<Decision>) -> Offer;
}

/// The one place Decisions are reported.
pub struct Reporter {
    metrics: Arc<Metrics>,
    blocked: BlockedLog,
    sinks: Vec<Box<dyn DecisionSink>>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter")
            .field("blocked", &self.blocked)
            .field("sinks", &self.sinks.len())
            .finish_non_exhaustive()
    }
}

impl Reporter {
    /// A reporter with a fresh metrics registry and a blocked log of `blocked_log_size`.
    pub fn new(blocked_log_size: usize) -> Reporter {
        Reporter::with_metrics(Arc::new(Metrics::new()), blocked_log_size)
    }

    /// A reporter over an existing metrics registry.
    pub fn with_metrics(metrics: Arc<Metrics>, blocked_log_size: usize) -> Reporter {
        Reporter {
            metrics,
            blocked: BlockedLog::new(blocked_log_size),
            sinks: Vec::new(),
        }
    }

    /// Adds a sink (before the reporter is shared). Sinks are offered every Decision in the
    /// order they were added.
    pub fn add_sink(&mut self, sink: Box<dyn DecisionSink>) {
        self.sinks.push(sink);
    }

    /// Reports one Decision: metrics for every Decision; for `deny` and `ask`, a blocked-log
    /// entry and the WARN violation line (emitted after the ring lock is released); then each
    /// sink, without blocking. Returns the shared Decision so the caller renders its response
    /// from the very same value.
    pub fn report(&self, d: Decision) -> Arc<Decision> {
        self.metrics.record_decision(&d);
        let d = Arc::new(d);
        if d.decision != Verdict::Allow {
            let evicted = self.blocked.append(d.clone());
            self.metrics.record_blocked_log(1, evicted);
            blocked_log::log_violation(&d);
        }
        for sink in &self.sinks {
            if sink.offer(&d) == Offer::Dropped {
                self.metrics.event_dropped(sink.sink());
            }
        }
        d
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The metrics registry, shared.
    pub fn metrics_arc(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The blocked log (read-only use: snapshots).
    pub fn blocked_log(&self) -> &BlockedLog {
        &self.blocked
    }

    /// Resizes the blocked log (reload); entries shrunk away count as dropped, in the log and
    /// in `portcullis_blocked_log_dropped_total`.
    pub fn resize_blocked_log(&self, new_capacity: usize) {
        let evicted = self.blocked.resize(new_capacity);
        self.metrics.record_blocked_log(0, evicted);
    }

    /// The admin `GET /blocked` body.
    pub fn blocked_json(&self) -> String {
        self.blocked.to_admin_json()
    }

    /// The admin `GET /metrics` body.
    pub fn render_metrics(&self) -> String {
        self.metrics.render_prometheus()
    }
}
