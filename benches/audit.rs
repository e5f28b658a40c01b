//! Criterion bench `audit`: the data-path cost of emitting one audit record (a
//! `portcullis.policy_decision`-shaped `tracing` event with the §2 attributes) when
//! (a) export is off, (b) the collector is down (HTTP/protobuf exporter to a closed loopback
//! port, `max_queue_size = 64`: the queue fills and records are dropped and counted).
//! Goal (`audit.md` §7): (b) stays in the same range as a successful hand-off; emitting never
//! blocks. Prints emitted vs dropped after the run.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis::config::{AuditConfig, AuditExporter, AuditProtocol};
use portcullis::telemetry::{
    AuditCounters, AuditSettings, AuditStats, Identity, init_logging, start,
};

fn emit(i: u64) {
    tracing::event!(
        name: "portcullis.policy_decision",
        target: "portcullis::audit",
        tracing::Level::INFO,
        {
            "event.name" = "portcullis.policy_decision",
            "event.timestamp" = "2026-11-24T09:15:02.117Z",
            "network.policy.scope" = "domain",
            "network.policy.decision" = "deny",
            "network.policy.source" = "baseline_policy",
            "network.policy.reason" = "not_allowed",
            "network.policy.override" = false,
            "network.transport.protocol" = "https_connect",
            "server.address" = "api.example.com",
            "server.port" = 443i64,
            "http.request.method" = "CONNECT",
            "client.address" = "127.0.0.1",
            "client.port" = 50000i64,
            "portcullis.decision.id" = "019a0000-0000-7000-8000-000000000000",
            "portcullis.session.id" = "default",
            "portcullis.proxy.id" = "px-0123456789ab",
        },
        "deny https_connect api.example.com:443 (not_allowed) {}",
        black_box(i)
    );
}

fn bench(c: &mut Criterion) {
    let slot = init_logging("off");
    let mut g = c.benchmark_group("audit_emit");
    let mut i = 0u64;
    g.bench_function("export_off", |b| {
        b.iter(|| {
            i += 1;
            emit(i)
        })
    });
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(9);
    let cfg = AuditConfig {
        exporter: Some(AuditExporter::Otlp),
        protocol: Some(AuditProtocol::HttpProtobuf),
        endpoint: Some(format!("http://127.0.0.1:{port}/v1/logs")),
        max_queue_size: Some(64),
        max_export_batch_size: Some(64),
        timeout_ms: Some(200),
        shutdown_timeout_ms: 500,
        ..AuditConfig::default()
    };
    let settings = AuditSettings::resolve(&cfg, &|_| None).expect("settings");
    let stats = Arc::new(AuditStats::default());
    let identity = Identity {
        service_name: "portcullis-bench",
        service_version: env!("CARGO_PKG_VERSION"),
        instance_id: "bench".into(),
        session_id: None,
    };
    let pipeline = start(&settings, &identity, stats.clone(), &slot)
        .expect("pipeline")
        .expect("enabled");
    g.bench_function("collector_down", |b| {
        b.iter(|| {
            i += 1;
            emit(i)
        })
    });
    g.finish();
    pipeline.shutdown();
    let s = stats.snapshot();
    println!(
        "collector_down: emitted={} exported={} dropped queue_full={} export_failed={} shutdown={}",
        s.total, s.exported, s.queue_full, s.export_failed, s.shutdown
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
