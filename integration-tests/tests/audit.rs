//! audit.md: `portcullis.policy_decision` records exported over OTLP to a real in-process
//! receiver, from the real proxy.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use portcullis_integration_tests::origin::{http_echo, never_answer};
use portcullis_integration_tests::otlp::{OtlpReceiver, Record, Val};
use portcullis_integration_tests::proxy::proxy_bin;
use portcullis_integration_tests::{ProxyProcess, admin_get, blocked, curl, raw_request};

const WAIT: Duration = Duration::from_secs(20);

/// The exact key set of §2 for a Decision with a known client port and no ask.
const KEYS: &[&str] = &[
    "client.address",
    "client.port",
    "event.name",
    "event.timestamp",
    "http.request.method",
    "network.policy.decision",
    "network.policy.override",
    "network.policy.reason",
    "network.policy.scope",
    "network.policy.source",
    "network.transport.protocol",
    "portcullis.decision.id",
    "portcullis.proxy.id",
    "portcullis.session.id",
    "server.address",
    "server.port",
];

fn audit_config(endpoint: &str, extra: &str) -> String {
    format!("[audit]\nendpoint = \"{endpoint}\"\nscheduled_delay_ms = 100\n{extra}")
}

fn s(v: &str) -> Val {
    Val::Str(v.to_string())
}

fn is_timestamp(t: &str) -> bool {
    let b = t.as_bytes();
    b.len() == 24
        && b.iter().enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b'-',
            10 => c == b'T',
            13 | 16 => c == b':',
            19 => c == b'.',
            23 => c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

/// Checks the invariant parts of every record and returns it.
fn check_common(r: &Record, proxy_session: &str) {
    assert_eq!(r.event_name, "portcullis.policy_decision", "{r:?}");
    assert_eq!(r.severity_number, 9, "{r:?}");
    assert_eq!(r.attrs["event.name"], s("portcullis.policy_decision"));
    let ts = r.s("event.timestamp").expect("timestamp");
    assert!(is_timestamp(ts), "timestamp {ts}");
    assert_eq!(r.s("portcullis.session.id"), Some(proxy_session));
    let px = r.s("portcullis.proxy.id").expect("proxy id");
    assert!(px.starts_with("px-") && px.len() == 15, "{px}");
    assert_eq!(
        r.attr_count,
        r.attrs.len(),
        "duplicated attribute keys: {r:?}"
    );
    // Resource (§4).
    assert_eq!(r.resource["service.name"], s("portcullis-proxy"));
    assert_eq!(r.resource["service.version"], s(env!("CARGO_PKG_VERSION")));
    assert_eq!(r.resource["service.instance.id"], s(px));
    assert_eq!(r.resource["portcullis.session.id"], s(proxy_session));
    assert!(matches!(r.resource["process.pid"], Val::Int(p) if p > 0));
    assert!(r.resource.contains_key("host.name"));
}

fn keys(r: &Record) -> BTreeSet<&str> {
    r.attrs.keys().map(String::as_str).collect()
}

fn want_keys(extra_less: &[&str]) -> BTreeSet<&'static str> {
    KEYS.iter()
        .copied()
        .filter(|k| !extra_less.contains(k))
        .collect()
}

fn block_id(r: &portcullis_integration_tests::CurlResult) -> String {
    r.header("x-portcullis-decision-id")
        .unwrap_or_else(|| panic!("no decision id header: {}", r.text()))
        .to_string()
}

#[test]
fn allow_event_has_exact_attributes() {
    let recv = OtlpReceiver::grpc();
    let origin = http_echo("127.0.0.1");
    let allow = format!("127.0.0.1:{}", origin.port());
    let proxy = ProxyProcess::start(
        &["--allow", &allow],
        Some(&audit_config(&recv.endpoint(), "")),
    );
    let r = curl(&["-x", &proxy.http_url(), &format!("http://{allow}/hello")]);
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = recv
        .wait_for(WAIT, |r| r.s("network.policy.decision") == Some("allow"))
        .expect("allow record");
    check_common(&rec, "default");
    assert_eq!(keys(&rec), want_keys(&[]), "{rec:?}");
    let a = &rec.attrs;
    assert_eq!(a["network.policy.scope"], s("domain"));
    assert_eq!(a["network.policy.source"], s("baseline_policy"));
    assert_eq!(a["network.policy.reason"], s("allow"));
    assert_eq!(a["network.policy.override"], Val::Bool(false));
    assert_eq!(a["network.transport.protocol"], s("http"));
    assert_eq!(a["server.address"], s("127.0.0.1"));
    assert_eq!(a["server.port"], Val::Int(i64::from(origin.port())));
    assert_eq!(a["http.request.method"], s("GET"));
    assert_eq!(a["client.address"], s("127.0.0.1"));
    assert!(matches!(a["client.port"], Val::Int(p) if p > 0 && p < 65536));
    let id = rec.s("portcullis.decision.id").unwrap();
    assert_eq!(id.len(), 36, "{id}");
    assert_eq!(rec.body, format!("allow http {allow} (allow)"));
    assert_eq!(rec.scope, "portcullis::audit");
    // Exactly one record for the one Decision.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(recv.records().len(), 1, "{:?}", recv.records());
}

#[test]
fn denylist_block_event() {
    let recv = OtlpReceiver::grpc();
    let proxy = ProxyProcess::start(
        &["--allow", "*", "--deny", "bad.test"],
        Some(&audit_config(&recv.endpoint(), "")),
    );
    let r = curl(&["-x", &proxy.http_url(), "http://bad.test/x"]);
    assert_eq!(r.status, 403);
    let id = block_id(&r);
    let rec = recv.wait_for_decision(&id, WAIT).expect("deny record");
    check_common(&rec, "default");
    assert_eq!(keys(&rec), want_keys(&[]));
    assert_eq!(rec.attrs["network.policy.decision"], s("deny"));
    assert_eq!(rec.attrs["network.policy.reason"], s("denied"));
    assert_eq!(rec.attrs["network.policy.source"], s("baseline_policy"));
    assert_eq!(rec.attrs["network.policy.scope"], s("domain"));
    assert_eq!(rec.attrs["server.address"], s("bad.test"));
    assert_eq!(rec.attrs["server.port"], Val::Int(80));
    assert_eq!(rec.body, "deny http bad.test:80 (denied)");
    // Same id as the blocked log.
    let b = blocked(proxy.admin_addr());
    assert_eq!(b["blocked"][0]["id"], serde_json::json!(id));
}

#[test]
fn allowlist_miss_event() {
    let recv = OtlpReceiver::grpc();
    let proxy = ProxyProcess::start(
        &["--worker-threads", "1"],
        Some(&audit_config(&recv.endpoint(), "")),
    );
    let r = curl(&["-x", &proxy.http_url(), "http://api.example.test/x"]);
    assert_eq!(r.status, 403);
    let id = block_id(&r);
    let rec = recv.wait_for_decision(&id, WAIT).expect("record");
    check_common(&rec, "default");
    assert_eq!(rec.attrs["network.policy.reason"], s("not_allowed"));
    assert_eq!(rec.attrs["network.policy.scope"], s("domain"));
    assert_eq!(rec.attrs["server.address"], s("api.example.test"));
}

#[test]
fn local_address_block_event() {
    let recv = OtlpReceiver::grpc();
    let proxy = ProxyProcess::start(&[], Some(&audit_config(&recv.endpoint(), "")));
    let r = curl(&["-x", &proxy.http_url(), "http://127.0.0.1:9/"]);
    assert_eq!(r.status, 403);
    let id = block_id(&r);
    let rec = recv.wait_for_decision(&id, WAIT).expect("record");
    check_common(&rec, "default");
    assert_eq!(rec.attrs["network.policy.reason"], s("not_allowed_local"));
    assert_eq!(rec.attrs["network.policy.scope"], s("domain"));
    assert_eq!(rec.attrs["server.address"], s("127.0.0.1"));
    assert_eq!(rec.attrs["server.port"], Val::Int(9));
}

#[test]
fn limited_mode_method_block_is_non_domain() {
    let recv = OtlpReceiver::grpc();
    let origin = http_echo("127.0.0.1");
    let allow = format!("127.0.0.1:{}", origin.port());
    let proxy = ProxyProcess::start(
        &["--allow", &allow, "--mode", "limited"],
        Some(&audit_config(&recv.endpoint(), "")),
    );
    let r = curl(&[
        "-x",
        &proxy.http_url(),
        "-X",
        "POST",
        &format!("http://{allow}/"),
    ]);
    assert_eq!(r.status, 403);
    let id = block_id(&r);
    let rec = recv.wait_for_decision(&id, WAIT).expect("record");
    check_common(&rec, "default");
    assert_eq!(rec.attrs["network.policy.reason"], s("method_not_allowed"));
    assert_eq!(rec.attrs["network.policy.source"], s("mode_guard"));
    assert_eq!(rec.attrs["network.policy.scope"], s("non_domain"));
    assert_eq!(rec.attrs["http.request.method"], s("POST"));
}

#[test]
fn socks5_event_has_method_none() {
    let recv = OtlpReceiver::grpc();
    let proxy = ProxyProcess::start(
        &["--allow", "*", "--deny", "bad.test"],
        Some(&audit_config(&recv.endpoint(), "")),
    );
    let socks = format!("socks5h://{}", proxy.socks5_addr());
    let r = curl(&["-x", &socks, "http://bad.test/"]);
    assert_ne!(r.exit_code, 0);
    let b = blocked(proxy.admin_addr());
    let id = b["blocked"][0]["id"]
        .as_str()
        .expect("blocked id")
        .to_string();
    let rec = recv.wait_for_decision(&id, WAIT).expect("record");
    check_common(&rec, "default");
    assert_eq!(rec.attrs["network.transport.protocol"], s("socks5_tcp"));
    assert_eq!(rec.attrs["http.request.method"], s("none"));
    assert_eq!(rec.attrs["network.policy.reason"], s("denied"));
    assert_eq!(rec.attrs["server.address"], s("bad.test"));
    assert_eq!(rec.attrs["server.port"], Val::Int(80));
}

#[test]
fn unix_socket_event_uses_sentinels() {
    let recv = OtlpReceiver::grpc();
    let proxy = ProxyProcess::start(&[], Some(&audit_config(&recv.endpoint(), "")));
    let sock = "/tmp/pc-audit-secret-dir/agent.sock";
    let header = format!("x-unix-socket: {sock}");
    let r = curl(&[
        "-x",
        &proxy.http_url(),
        "-H",
        &header,
        "http://localhost/v1/info",
    ]);
    assert_eq!(r.status, 403, "{}", r.text());
    let id = block_id(&r);
    let rec = recv.wait_for_decision(&id, WAIT).expect("record");
    check_common(&rec, "default");
    assert_eq!(rec.attrs["network.transport.protocol"], s("unix_socket"));
    assert_eq!(rec.attrs["server.address"], s("unix-socket"));
    assert_eq!(rec.attrs["server.port"], Val::Int(0));
    assert_eq!(rec.attrs["network.policy.scope"], s("non_domain"));
    let all: Vec<u8> = recv.raw().concat();
    let text = String::from_utf8_lossy(&all);
    assert!(
        !text.contains("pc-audit-secret-dir"),
        "socket path exported"
    );
    assert!(!text.contains("/v1/info"), "path exported");
}

#[test]
fn no_url_path_query_or_credentials_in_events() {
    let recv = OtlpReceiver::grpc();
    let origin = http_echo("127.0.0.1");
    let allow = format!("127.0.0.1:{}", origin.port());
    let proxy = ProxyProcess::start(
        &["--allow", &allow, "--deny", "bad.test"],
        Some(&audit_config(&recv.endpoint(), "")),
    );
    for url in [
        format!("http://{allow}/secret/path?token=abc#frag"),
        "http://user:pw@bad.test/secret/path?token=abc".to_string(),
    ] {
        let _ = curl(&[
            "-x",
            &proxy.http_url(),
            "-H",
            "Authorization: Bearer sekrit",
            "-H",
            "Proxy-Authorization: Basic cHJveHk6c2Vrcml0",
            &url,
        ]);
    }
    assert!(
        recv.wait_for(WAIT, |r| r.s("server.address") == Some("bad.test"))
            .is_some()
    );
    assert!(
        recv.wait_for(WAIT, |r| r.s("network.policy.decision") == Some("allow"))
            .is_some()
    );
    let all: Vec<u8> = recv.raw().concat();
    let text = String::from_utf8_lossy(&all);
    for needle in [
        "secret/path",
        "token=abc",
        "frag",
        "sekrit",
        "cHJveHk6c2Vrcml0",
        "Bearer",
        "user:pw",
        "http://",
    ] {
        assert!(!text.contains(needle), "{needle:?} appears in the export");
    }
}

#[test]
fn resource_attributes_and_precedence() {
    let recv = OtlpReceiver::grpc();
    let cfg = audit_config(
        &recv.endpoint(),
        "[audit.resource]\n\"user.id\" = \"from-file\"\n",
    );
    let proxy = ProxyProcess::start_env(
        &[],
        Some(&cfg),
        &[
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "user.id=from-env,deployment.environment.name=ci%20lab",
            ),
            ("OTEL_SERVICE_NAME", "my-proxy"),
        ],
    );
    let r = curl(&["-x", &proxy.http_url(), "http://api.example.test/"]);
    let id = block_id(&r);
    let rec = recv.wait_for_decision(&id, WAIT).expect("record");
    assert_eq!(rec.resource["user.id"], s("from-file"));
    assert_eq!(rec.resource["deployment.environment.name"], s("ci lab"));
    assert_eq!(rec.resource["service.name"], s("my-proxy"));
    assert_eq!(
        rec.resource["service.version"],
        s(env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn http_protobuf_export() {
    let recv = OtlpReceiver::http();
    let cfg = audit_config(&recv.endpoint(), "protocol = \"http/protobuf\"\n");
    let proxy = ProxyProcess::start(&[], Some(&cfg));
    let r = curl(&["-x", &proxy.http_url(), "http://api.example.test/"]);
    let id = block_id(&r);
    let rec = recv.wait_for_decision(&id, WAIT).expect("record over HTTP");
    check_common(&rec, "default");
    assert_eq!(keys(&rec), want_keys(&[]));
}

#[test]
fn endpoint_from_environment_when_config_absent() {
    let recv = OtlpReceiver::http();
    let base = format!("http://{}", recv.addr);
    let proxy = ProxyProcess::start_env(
        &[],
        None,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", base.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_BLRP_SCHEDULE_DELAY", "100"),
        ],
    );
    let r = curl(&["-x", &proxy.http_url(), "http://api.example.test/"]);
    let id = block_id(&r);
    assert!(recv.wait_for_decision(&id, WAIT).is_some());
}

fn run_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(proxy_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("OTEL_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn http_json_protocol_is_exit_2() {
    let listeners = ["--http", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
    let (code, err) = run_env(&listeners, &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{err}");
    let (code, err) = run_env(
        &listeners,
        &[("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "not a url")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"), "{err}");
}

fn metric(admin: &str, series: &str) -> u64 {
    let r = admin_get(admin, "/metrics");
    let text = r.text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in /metrics:\n{text}"))
}

fn audit_counts(admin: &str) -> (u64, u64, u64, u64, u64) {
    (
        metric(admin, "portcullis_audit_events_total "),
        metric(admin, "portcullis_audit_events_exported_total "),
        metric(
            admin,
            "portcullis_audit_events_dropped_total{reason=\"queue_full\"} ",
        ),
        metric(
            admin,
            "portcullis_audit_events_dropped_total{reason=\"export_failed\"} ",
        ),
        metric(
            admin,
            "portcullis_audit_events_dropped_total{reason=\"shutdown\"} ",
        ),
    )
}

fn deny_raw(proxy: &ProxyProcess, n: usize) {
    let req = b"GET http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\nConnection: close\r\n\r\n";
    for i in 0..n {
        let r = raw_request(&proxy.http, req).unwrap_or_else(|| panic!("request {i}: no response"));
        assert_eq!(r.status, 403, "request {i}");
    }
}

#[test]
fn collector_down_keeps_data_path_and_counts_drops() {
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let cfg = audit_config(
        &format!("http://127.0.0.1:{port}"),
        "max_queue_size = 8\nmax_export_batch_size = 4\ntimeout_ms = 500\n",
    );
    let proxy = ProxyProcess::start(&[], Some(&cfg));
    deny_raw(&proxy, 500);
    let admin = proxy.admin_addr().to_string();
    let (total, _, qf, ef, _) = audit_counts(&admin);
    assert_eq!(total, 500);
    assert!(qf + ef > 0, "drops are counted: qf={qf} ef={ef}");
    assert!(
        proxy.wait_for_stderr("audit events dropped:", WAIT),
        "drop WARN line:\n{}",
        proxy.stderr_text()
    );
    assert!(proxy.stderr_text().contains(&format!("127.0.0.1:{port}")));
    // Once idle: total = exported + dropped (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (t, e, qf, ef, sd) = audit_counts(&admin);
        if t == e + qf + ef + sd {
            assert_eq!(e, 0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "counter identity never held: {t} {e} {qf} {ef} {sd}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn stalled_collector_does_not_block_requests() {
    let stall = never_answer("127.0.0.1");
    let cfg = audit_config(
        &format!("http://127.0.0.1:{}", stall.port()),
        "max_queue_size = 8\nmax_export_batch_size = 4\n",
    );
    let proxy = ProxyProcess::start(&[], Some(&cfg));
    deny_raw(&proxy, 300);
    let (total, exported, qf, _, _) = audit_counts(proxy.admin_addr());
    assert_eq!(total, 300);
    assert_eq!(exported, 0);
    // At most max_queue_size records are in flight; the rest were dropped at once.
    assert!(qf >= 300 - 8, "queue_full={qf}");
}

#[test]
fn shutdown_flushes_buffered_events() {
    let recv = OtlpReceiver::grpc();
    let cfg = format!(
        "[audit]\nendpoint = \"{}\"\nscheduled_delay_ms = 60000\n",
        recv.endpoint()
    );
    // One worker = the current-thread runtime: the export task and the blocking shutdown
    // must still meet (a 1-CPU container gets this runtime by default).
    let mut proxy = ProxyProcess::start(&["--worker-threads", "1"], Some(&cfg));
    deny_raw(&proxy, 5);
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_exit(WAIT).expect("exit");
    assert!(status.success(), "{status:?}\n{}", proxy.stderr_text());
    assert_eq!(recv.records().len(), 5, "{}", proxy.stderr_text());
    assert!(
        proxy.stderr_text().contains("audit: exported=5 dropped=0"),
        "{}",
        proxy.stderr_text()
    );
}

#[test]
fn log_level_does_not_suppress_audit() {
    let recv = OtlpReceiver::grpc();
    let proxy = ProxyProcess::start(
        &["--log", "error"],
        Some(&audit_config(&recv.endpoint(), "")),
    );
    let r = curl(&["-x", &proxy.http_url(), "http://api.example.test/"]);
    let id = block_id(&r);
    assert!(recv.wait_for_decision(&id, WAIT).is_some());
}

#[test]
fn audit_records_not_on_stderr_by_default() {
    let recv = OtlpReceiver::grpc();
    let proxy = ProxyProcess::start(&[], Some(&audit_config(&recv.endpoint(), "")));
    let r = curl(&["-x", &proxy.http_url(), "http://api.example.test/"]);
    let id = block_id(&r);
    assert!(recv.wait_for_decision(&id, WAIT).is_some());
    assert!(
        !proxy.stderr_text().contains("portcullis::audit"),
        "{}",
        proxy.stderr_text()
    );
}

#[test]
fn exporter_none_by_default() {
    let proxy = ProxyProcess::start(&[], None);
    let _ = curl(&["-x", &proxy.http_url(), "http://api.example.test/"]);
    let (t, e, qf, ef, sd) = audit_counts(proxy.admin_addr());
    assert_eq!((t, e, qf, ef, sd), (0, 0, 0, 0, 0));
}

#[test]
fn connection_span_exported_and_record_carries_its_context() {
    let recv = OtlpReceiver::grpc();
    let origin = http_echo("127.0.0.1");
    let allow = format!("127.0.0.1:{}", origin.port());
    let proxy = ProxyProcess::start(
        &["--allow", &allow],
        Some(&audit_config(&recv.endpoint(), "traces = true\n")),
    );
    let r = curl(&["-x", &proxy.http_url(), &format!("http://{allow}/")]);
    assert_eq!(r.status, 200);
    let rec = recv
        .wait_for(WAIT, |r| r.s("network.policy.decision") == Some("allow"))
        .expect("allow record");
    let deadline = Instant::now() + WAIT;
    let span = loop {
        if let Some(s) = recv
            .spans()
            .into_iter()
            .find(|s| s.name == "portcullis.connection")
        {
            break s;
        }
        assert!(Instant::now() < deadline, "no connection span");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(span.attrs["network.transport.protocol"], s("http"));
    assert_eq!(span.attrs["client.address"], s("127.0.0.1"));
    assert!(matches!(span.attrs["client.port"], Val::Int(p) if p > 0));
    assert_eq!(span.attrs["portcullis.session.id"], s("default"));
    assert_eq!(
        span.attrs["portcullis.proxy.id"],
        rec.attrs["portcullis.proxy.id"]
    );
    assert_eq!(span.resource["service.name"], s("portcullis-proxy"));
    // The audit record was emitted inside the connection span.
    assert_eq!(rec.trace_id, span.trace_id);
    assert_eq!(rec.span_id, span.span_id);
    assert_eq!(keys(&rec), want_keys(&[]), "spans add no record attributes");
}
