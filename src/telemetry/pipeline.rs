//! The OTLP logs pipeline: bounded in-flight records, counted drops, bounded shutdown
//! (`audit.md` §7).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::logs::{
    BatchConfigBuilder, BatchLogProcessor, LogBatch, LogExporter, LogProcessor, SdkLogRecord,
    SdkLoggerProvider,
};

use super::{
    AuditCounters, AuditDropReason, AuditSettings, AuditSlot, ExportProtocol, TELEMETRY_TARGET,
};

/// Who this process is, for the resource (`audit.md` §4).
#[derive(Debug, Clone)]
pub struct Identity {
    /// `portcullis-proxy` or `portcullis-control`.
    pub service_name: &'static str,
    /// The crate version.
    pub service_version: &'static str,
    /// The proxy id, or the control instance id.
    pub instance_id: String,
    /// The proxy's session id (data plane only).
    pub session_id: Option<String>,
}

/// State shared by the processor, the exporter wrapper and the pipeline handle.
struct Flight {
    in_flight: AtomicUsize,
    max: usize,
    closed: AtomicBool,
    counters: Arc<dyn AuditCounters>,
}

impl fmt::Debug for Flight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flight")
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl Flight {
    /// Reserves a slot; false when `max` records are in flight.
    fn try_reserve(&self) -> bool {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self, n: usize) {
        let _ = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                Some(c.saturating_sub(n))
            });
    }
}

/// Wraps the SDK batch processor: at most `max_queue_size` records in flight, the rest
/// dropped and counted `queue_full`. Never blocks.
#[derive(Debug)]
struct BoundedProcessor {
    inner: BatchLogProcessor,
    flight: Arc<Flight>,
}

impl LogProcessor for BoundedProcessor {
    fn emit(&self, data: &mut SdkLogRecord, instrumentation: &InstrumentationScope) {
        if self.flight.closed.load(Ordering::Acquire) {
            return;
        }
        self.flight.counters.emitted();
        if !self.flight.try_reserve() {
            self.flight.counters.dropped(AuditDropReason::QueueFull, 1);
            return;
        }
        self.inner.emit(data, instrumentation);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    /// Asked by the bridge before it builds a record: a full queue drops (and counts) the
    /// record here, so the drop path costs no record construction.
    fn event_enabled(
        &self,
        _level: opentelemetry::logs::Severity,
        _target: &str,
        _name: Option<&str>,
    ) -> bool {
        if self.flight.closed.load(Ordering::Acquire) {
            return false;
        }
        if self.flight.in_flight.load(Ordering::Acquire) >= self.flight.max {
            self.flight.counters.emitted();
            self.flight.counters.dropped(AuditDropReason::QueueFull, 1);
            return false;
        }
        true
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Wraps the OTLP exporter: releases each batch's slots after the attempt and counts it
/// exported or `export_failed`.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    flight: Arc<Flight>,
}

impl<E: LogExporter> LogExporter for CountingExporter<E> {
    async fn export(&self, batch: LogBatch<'_>) -> OTelSdkResult {
        let n = batch.iter().count();
        let result = self.inner.export(batch).await;
        // After shutdown the leftovers were counted `shutdown` already.
        if !self.flight.closed.load(Ordering::Acquire) {
            match &result {
                Ok(()) => self.flight.counters.exported(n as u64),
                Err(_) => self
                    .flight
                    .counters
                    .dropped(AuditDropReason::ExportFailed, n as u64),
            }
            self.flight.release(n);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// A running audit pipeline. Dropping it without [`AuditPipeline::shutdown`] loses what is
/// in flight.
pub struct AuditPipeline {
    provider: SdkLoggerProvider,
    tracer: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    flight: Arc<Flight>,
    shutdown_timeout: Duration,
    warner: Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl fmt::Debug for AuditPipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditPipeline")
            .field("flight", &self.flight)
            .finish_non_exhaustive()
    }
}

impl AuditPipeline {
    /// Flushes what is in flight within `audit.shutdown_timeout_ms`, counts the rest
    /// `shutdown`, and logs `audit: exported=N dropped=M`. Blocks: run it on a blocking
    /// thread (`spawn_blocking`), never inside a current-thread runtime.
    pub fn shutdown(mut self) {
        let provider = self.provider.clone();
        let tracer = self.tracer.clone();
        let timeout = self.shutdown_timeout;
        // The SDK's own bound is best effort; bound the wait here too.
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("audit-shutdown".into())
            .spawn(move || {
                let _ = provider.shutdown_with_timeout(timeout);
                if let Some(t) = tracer {
                    let _ = t.shutdown_with_timeout(timeout);
                }
                let _ = tx.send(());
            });
        if spawned.is_ok() {
            let _ = rx.recv_timeout(timeout + Duration::from_millis(250));
        }
        self.flight.closed.store(true, Ordering::Release);
        let left = self.flight.in_flight.swap(0, Ordering::AcqRel);
        if left > 0 {
            self.flight
                .counters
                .dropped(AuditDropReason::Shutdown, left as u64);
        }
        if let Some((stop, handle)) = self.warner.take() {
            let _ = stop.send(());
            let _ = handle.join();
        }
        let c = self.flight.counters.snapshot();
        tracing::info!(
            target: TELEMETRY_TARGET,
            "audit: exported={} dropped={}",
            c.exported,
            c.dropped()
        );
    }
}

fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for `len` bytes; gethostname NUL-terminates on success
    // (and we stop at the first NUL or the end either way).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    std::str::from_utf8(&buf[..end])
        .ok()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// The resource: built-in values, then the settings' map (environment and `audit.resource`,
/// already in precedence order).
fn resource(identity: &Identity, settings: &AuditSettings) -> Resource {
    let mut attrs: Vec<KeyValue> = vec![
        KeyValue::new("service.name", identity.service_name),
        KeyValue::new("service.version", identity.service_version),
        KeyValue::new("service.instance.id", identity.instance_id.clone()),
        KeyValue::new("process.pid", i64::from(std::process::id())),
    ];
    if let Some(s) = &identity.session_id {
        attrs.push(KeyValue::new("portcullis.session.id", s.clone()));
    }
    if let Some(h) = host_name() {
        attrs.push(KeyValue::new("host.name", h));
    }
    attrs.retain(|kv| !settings.resource.contains_key(kv.key.as_str()));
    attrs.extend(
        settings
            .resource
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
    );
    Resource::builder_empty().with_attributes(attrs).build()
}

fn read_ca(settings: &AuditSettings) -> Result<Option<Vec<u8>>, String> {
    match &settings.ca_file {
        None => Ok(None),
        Some(p) => std::fs::read(p)
            .map(Some)
            .map_err(|e| format!("audit.ca_file: cannot read {}: {e}", p.to_string_lossy())),
    }
}

fn build_exporter(settings: &AuditSettings) -> Result<opentelemetry_otlp::LogExporter, String> {
    let ca = read_ca(settings)?;
    let built = match settings.protocol {
        ExportProtocol::Grpc => {
            let mut builder = opentelemetry_otlp::LogExporter::builder()
                .with_tonic()
                .with_endpoint(settings.endpoint.clone())
                .with_timeout(settings.timeout)
                .with_metadata(metadata(settings)?);
            if settings.endpoint.starts_with("https://") {
                builder = builder.with_tls_config(tls_config(ca));
            }
            builder.build()
        }
        ExportProtocol::HttpProtobuf => {
            let client = blocking_http_client(settings.timeout, ca)?;
            opentelemetry_otlp::LogExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(settings.endpoint.clone())
                .with_timeout(settings.timeout)
                .with_headers(settings.headers.clone().into_iter().collect())
                .with_http_client(client)
                .build()
        }
    };
    built.map_err(|e| format!("audit exporter: {e}"))
}

/// The span exporter: same protocol and endpoint as the logs (HTTP path `/v1/traces`).
fn build_span_exporter(
    settings: &AuditSettings,
) -> Result<opentelemetry_otlp::SpanExporter, String> {
    let ca = read_ca(settings)?;
    let built = match settings.protocol {
        ExportProtocol::Grpc => {
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(settings.endpoint.clone())
                .with_timeout(settings.timeout)
                .with_metadata(metadata(settings)?);
            if settings.endpoint.starts_with("https://") {
                builder = builder.with_tls_config(tls_config(ca));
            }
            builder.build()
        }
        ExportProtocol::HttpProtobuf => {
            let endpoint = match settings.endpoint.strip_suffix("/v1/logs") {
                Some(base) => format!("{base}/v1/traces"),
                None => settings.endpoint.clone(),
            };
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(endpoint)
                .with_timeout(settings.timeout)
                .with_headers(settings.headers.clone().into_iter().collect())
                .with_http_client(blocking_http_client(settings.timeout, ca)?)
                .build()
        }
    };
    built.map_err(|e| format!("audit span exporter: {e}"))
}

/// `audit.headers` as gRPC metadata.
fn metadata(settings: &AuditSettings) -> Result<tonic::metadata::MetadataMap, String> {
    let mut metadata = tonic::metadata::MetadataMap::new();
    for (k, v) in &settings.headers {
        let key = tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("audit.headers: invalid header name \"{k}\""))?;
        let value = v
            .parse()
            .map_err(|_| format!("audit.headers.{k}: invalid header value"))?;
        metadata.insert(key, value);
    }
    Ok(metadata)
}

/// TLS for `https://` gRPC endpoints: webpki roots plus `audit.ca_file`.
fn tls_config(ca: Option<Vec<u8>>) -> tonic::transport::ClientTlsConfig {
    let mut tls = tonic::transport::ClientTlsConfig::new().with_webpki_roots();
    if let Some(pem) = ca {
        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
    }
    tls
}

/// A blocking reqwest client (rustls with ring), built on its own thread because building or
/// dropping one inside a tokio runtime panics.
fn blocking_http_client(
    timeout: Duration,
    ca_pem: Option<Vec<u8>>,
) -> Result<reqwest::blocking::Client, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    std::thread::Builder::new()
        .name("audit-http-client".into())
        .spawn(move || {
            let mut b = reqwest::blocking::Client::builder().timeout(timeout);
            if let Some(pem) = ca_pem {
                let certs = reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| format!("audit.ca_file: {e}"))?;
                for c in certs {
                    b = b.add_root_certificate(c);
                }
            }
            b.build()
                .map_err(|e| format!("audit exporter: cannot build the HTTP client: {e}"))
        })
        .map_err(|e| format!("audit exporter: cannot spawn a thread: {e}"))?
        .join()
        .map_err(|_| "audit exporter: building the HTTP client panicked".to_string())?
}

/// The drop warning (`audit.md` §7.4): the first at once, then at most one line per 10 s
/// while the count grows. Runs on its own thread so the data path never logs.
fn spawn_warner(
    counters: Arc<dyn AuditCounters>,
    endpoint: String,
) -> Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("audit-drop-warn".into())
        .spawn(move || {
            let mut reported = 0u64;
            let mut last: Option<Instant> = None;
            loop {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let c = counters.snapshot();
                let dropped = c.queue_full + c.export_failed;
                if dropped > reported
                    && last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
                {
                    tracing::warn!(
                        target: TELEMETRY_TARGET,
                        "audit events dropped: {dropped} so far (queue_full={}, export_failed={}); is the collector at {endpoint} reachable?",
                        c.queue_full,
                        c.export_failed
                    );
                    reported = dropped;
                    last = Some(Instant::now());
                }
            }
        })
        .ok()?;
    Some((tx, handle))
}

/// Builds and installs the pipeline, or returns `Ok(None)` when the exporter is `none`.
/// Must run inside a tokio runtime (the gRPC channel is created there, connecting lazily);
/// an unreachable collector is not an error.
pub fn start(
    settings: &AuditSettings,
    identity: &Identity,
    counters: Arc<dyn AuditCounters>,
    slot: &AuditSlot,
) -> Result<Option<AuditPipeline>, String> {
    if !settings.enabled {
        return Ok(None);
    }
    let flight = Arc::new(Flight {
        in_flight: AtomicUsize::new(0),
        max: settings.max_queue_size.max(1),
        closed: AtomicBool::new(false),
        counters: counters.clone(),
    });
    let exporter = CountingExporter {
        inner: build_exporter(settings)?,
        flight: flight.clone(),
    };
    let batch = BatchLogProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(flight.max)
                .with_max_export_batch_size(settings.max_export_batch_size.clamp(1, flight.max))
                .with_scheduled_delay(settings.scheduled_delay)
                .build(),
        )
        .build();
    let provider = SdkLoggerProvider::builder()
        .with_resource(resource(identity, settings))
        .with_log_processor(BoundedProcessor {
            inner: batch,
            flight: flight.clone(),
        })
        .build();
    if !slot.install(OpenTelemetryTracingBridge::new(&provider)) {
        let _ = provider.shutdown_with_timeout(Duration::from_millis(100));
        return Err("audit pipeline started twice".to_string());
    }
    let tracer = if settings.traces {
        let tp = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_resource(resource(identity, settings))
            .with_batch_exporter(build_span_exporter(settings)?)
            .build();
        let layer = tracing_opentelemetry::layer()
            .with_tracer(opentelemetry::trace::TracerProvider::tracer(
                &tp,
                "portcullis",
            ))
            .with_location(false)
            .with_threads(false)
            .with_level(false)
            .with_target(false)
            .with_tracked_inactivity(false);
        slot.install_spans(layer).then_some(tp)
    } else {
        None
    };
    Ok(Some(AuditPipeline {
        provider,
        tracer,
        flight,
        shutdown_timeout: settings.shutdown_timeout,
        warner: spawn_warner(counters, settings.endpoint.clone()),
    }))
}
