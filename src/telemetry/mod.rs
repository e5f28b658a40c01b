//! Logging and the OpenTelemetry audit pipeline shared by both binaries (`audit.md` §1, §4, §7).
//!
//! * [`init_logging`] installs the process subscriber once, before the configuration is read:
//!   a stderr layer filtered by `--log` (which shows [`AUDIT_TARGET`] only when named) and an
//!   audit slot that accepts only [`AUDIT_TARGET`] and stays empty until [`start`] fills it.
//! * [`start`] builds the OTLP pipeline from [`AuditSettings`]: an `SdkLoggerProvider` whose
//!   processor bounds the records in flight and counts every drop, fed by
//!   `opentelemetry-appender-tracing`'s bridge.
//! * [`AuditPipeline::shutdown`] flushes within `audit.shutdown_timeout_ms` (blocking: call it
//!   from a blocking thread, never from inside a current-thread runtime).

mod pipeline;
mod settings;

use std::sync::{Arc, OnceLock};

use opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge;
use opentelemetry_sdk::logs::{SdkLogger, SdkLoggerProvider};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub use pipeline::{AuditPipeline, Identity, start};
pub use settings::{AuditSettings, ExportProtocol, check_endpoint, parse_key_values};

/// `tracing` target of audit records (only this target is exported).
pub const AUDIT_TARGET: &str = "portcullis::audit";
/// `tracing` target of the pipeline's own log lines (drop warnings, the final summary).
pub const TELEMETRY_TARGET: &str = "portcullis::telemetry";

/// Why an audit record was dropped (`portcullis_audit_events_dropped_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditDropReason {
    /// `audit.max_queue_size` records were already in flight.
    QueueFull,
    /// The export request carrying it failed.
    ExportFailed,
    /// Still in flight when the shutdown flush ended.
    Shutdown,
}

/// The audit counters of `audit.md` §7.3, read together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuditCountSnapshot {
    /// Records emitted.
    pub total: u64,
    /// Records exported.
    pub exported: u64,
    /// Dropped, `queue_full`.
    pub queue_full: u64,
    /// Dropped, `export_failed`.
    pub export_failed: u64,
    /// Dropped, `shutdown`.
    pub shutdown: u64,
}

impl AuditCountSnapshot {
    /// Sum of the dropped counters.
    pub fn dropped(&self) -> u64 {
        self.queue_full + self.export_failed + self.shutdown
    }
}

/// Where the pipeline counts records: the data plane's metrics registry, or [`AuditStats`].
/// Every method is called on hot paths and must be a few atomic operations.
pub trait AuditCounters: Send + Sync + 'static {
    /// One record emitted (`portcullis_audit_events_total`).
    fn emitted(&self);
    /// `n` records exported.
    fn exported(&self, n: u64);
    /// `n` records dropped for `reason`.
    fn dropped(&self, reason: AuditDropReason, n: u64);
    /// The current values.
    fn snapshot(&self) -> AuditCountSnapshot;
}

/// A stand-alone [`AuditCounters`] (for processes without a metrics registry).
#[derive(Debug, Default)]
pub struct AuditStats {
    total: std::sync::atomic::AtomicU64,
    exported: std::sync::atomic::AtomicU64,
    dropped: [std::sync::atomic::AtomicU64; 3],
}

impl AuditCounters for AuditStats {
    fn emitted(&self) {
        self.total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    fn exported(&self, n: u64) {
        self.exported
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
    fn dropped(&self, reason: AuditDropReason, n: u64) {
        self.dropped[reason as usize].fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
    fn snapshot(&self) -> AuditCountSnapshot {
        use std::sync::atomic::Ordering::Relaxed;
        AuditCountSnapshot {
            total: self.total.load(Relaxed),
            exported: self.exported.load(Relaxed),
            queue_full: self.dropped[0].load(Relaxed),
            export_failed: self.dropped[1].load(Relaxed),
            shutdown: self.dropped[2].load(Relaxed),
        }
    }
}

type Bridge = OpenTelemetryTracingBridge<SdkLoggerProvider, SdkLogger>;

/// `tracing` target of the spans exported when `audit.traces` is on (`audit.md` §7.6).
pub const SPAN_TARGET: &str = "portcullis::span";

type SpanLayer = tracing_opentelemetry::OpenTelemetryLayer<
    tracing_subscriber::Registry,
    opentelemetry_sdk::trace::SdkTracer,
>;
type SpanHandle =
    tracing_subscriber::reload::Handle<Option<SpanLayer>, tracing_subscriber::Registry>;

static SPANS_ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether connection spans are being exported (callers skip building spans otherwise).
pub fn spans_enabled() -> bool {
    SPANS_ON.load(std::sync::atomic::Ordering::Relaxed)
}

/// The audit layer's slot: empty (records go nowhere) until [`start`] installs the bridge;
/// likewise the span layer when `audit.traces` is on.
#[derive(Clone, Default)]
pub struct AuditSlot {
    bridge: Arc<OnceLock<Bridge>>,
    spans: Arc<OnceLock<SpanHandle>>,
}

impl std::fmt::Debug for AuditSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSlot")
            .field("installed", &self.bridge.get().is_some())
            .finish()
    }
}

impl AuditSlot {
    /// Installs the bridge; false when one was installed already.
    fn install(&self, bridge: Bridge) -> bool {
        self.bridge.set(bridge).is_ok()
    }

    /// Installs the span layer (only when [`init_logging`] made the slot).
    fn install_spans(&self, layer: SpanLayer) -> bool {
        let ok = self
            .spans
            .get()
            .is_some_and(|h| h.reload(Some(layer)).is_ok());
        if ok {
            SPANS_ON.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        ok
    }

    /// A `tracing` layer forwarding [`AUDIT_TARGET`] events to the installed bridge. Combine it
    /// with a per-layer filter accepting only that target (as [`init_logging`] does).
    pub fn layer(&self) -> AuditLayer {
        AuditLayer {
            bridge: self.bridge.clone(),
        }
    }
}

/// See [`AuditSlot::layer`].
pub struct AuditLayer {
    bridge: Arc<OnceLock<Bridge>>,
}

impl<S> Layer<S> for AuditLayer
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() != AUDIT_TARGET {
            return;
        }
        if let Some(bridge) = self.bridge.get() {
            bridge.on_event(event, ctx);
        }
    }
}

/// The stderr filter: `--log` as given, plus `portcullis::audit=off` unless the audit target
/// is named explicitly (`audit.md` §1.4). An invalid filter falls back to `info`.
pub fn stderr_filter(spec: &str) -> tracing_subscriber::EnvFilter {
    let spec = if spec.contains(AUDIT_TARGET) {
        spec.to_string()
    } else if spec.trim().is_empty() {
        format!("{AUDIT_TARGET}=off")
    } else {
        format!("{spec},{AUDIT_TARGET}=off")
    };
    tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("info,{AUDIT_TARGET}=off")))
}

static GLOBAL_SLOT: OnceLock<AuditSlot> = OnceLock::new();

/// The slot [`init_logging`] installed, if it ran (for [`start`] far from `main`).
pub fn global_slot() -> Option<AuditSlot> {
    GLOBAL_SLOT.get().cloned()
}

/// Installs the process subscriber: stderr (filtered by `log_filter`) and the audit slot
/// (only [`AUDIT_TARGET`], independent of `log_filter`). Returns the slot for [`start`]
/// (also available later from [`global_slot`]).
pub fn init_logging(log_filter: &str) -> AuditSlot {
    let slot = GLOBAL_SLOT.get_or_init(AuditSlot::default).clone();
    let (spans, handle) = tracing_subscriber::reload::Layer::new(None::<SpanLayer>);
    let _ = slot.spans.set(handle);
    let spans = spans.with_filter(tracing_subscriber::filter::filter_fn(|m| {
        m.is_span() && m.target() == SPAN_TARGET
    }));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true)
        .with_filter(stderr_filter(log_filter));
    let audit = slot.layer().with_filter(
        tracing_subscriber::filter::filter_fn(|m| m.target() == AUDIT_TARGET)
            .with_max_level_hint(tracing::Level::INFO),
    );
    let _ = tracing_subscriber::registry()
        .with(spans)
        .with(fmt)
        .with(audit)
        .try_init();
    slot
}
