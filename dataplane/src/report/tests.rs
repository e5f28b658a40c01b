//! Unit tests of the reporting module.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use portcullis::decision::{Decision, Origin, Protocol, Reason, Source, Verdict, new_decision_id};

use super::blocked_log::{BlockedLog, violation_line};
use super::metrics::{
    AuditDropReason, BLOCK_REASONS, BadRequestKind, Direction, Listener, Metrics, MitmErrorKind,
    PolicyList, Sink, UdpDropReason, UpstreamErrorKind,
};
use super::{ControlQueue, ControlSink, DecisionSink, Offer, Reporter};
use portcullis::decision::VIOLATION_LINE_PREFIX as VIOLATION_PREFIX;

pub(super) fn decision(
    verdict: Verdict,
    reason: Reason,
    protocol: Protocol,
    host: &str,
) -> Decision {
    Decision {
        decision: verdict,
        reason,
        source: Source::BaselinePolicy,
        protocol,
        host: host.to_owned(),
        port: 443,
        id: new_decision_id(),
        timestamp: SystemTime::now(),
        method: Some("CONNECT".to_owned()),
        client_address: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        client_port: Some(50000),
        override_: false,
        ask_id: None,
        rule: None,
        address: None,
        socket_path: None,
        message: Some("Portcullis blocked this request: x".to_owned()),
        origin: Origin {
            proxy_id: Arc::from("px-0123456789ab"),
            session_id: Arc::from("default"),
        },
    }
}

fn deny(host: &str) -> Decision {
    decision(
        Verdict::Deny,
        Reason::NotAllowed,
        Protocol::HttpsConnect,
        host,
    )
}

// ---- blocked log ---------------------------------------------------------------------------

#[test]
fn ring_keeps_last_200_of_205() {
    let log = BlockedLog::new(200);
    let mut evicted = 0;
    for i in 0..205 {
        evicted += log.append(Arc::new(deny(&format!("h{i}.test"))));
    }
    assert_eq!(evicted, 5);
    let s = log.snapshot();
    assert_eq!((s.capacity, s.total, s.dropped), (200, 205, 5));
    assert_eq!(s.entries.len(), 200);
    assert_eq!(s.entries[0].host, "h5.test", "oldest is the 6th append");
    assert_eq!(s.entries[199].host, "h204.test");
}

#[test]
fn snapshot_is_non_consuming() {
    let log = BlockedLog::new(10);
    for i in 0..3 {
        log.append(Arc::new(deny(&format!("h{i}.test"))));
    }
    let a = log.snapshot();
    let b = log.snapshot();
    assert_eq!(a.entries.len(), 3);
    let ids = |s: &super::blocked_log::BlockedSnapshot| {
        s.entries.iter().map(|d| d.id).collect::<Vec<_>>()
    };
    assert_eq!(ids(&a), ids(&b));
    assert_eq!(log.to_admin_json(), log.to_admin_json());
}

#[test]
fn allow_is_not_a_blocked_entry() {
    let log = BlockedLog::new(10);
    let allow = decision(Verdict::Allow, Reason::Allow, Protocol::Http, "ok.test");
    assert_eq!(log.append(Arc::new(allow)), 0);
    let ask = decision(Verdict::Ask, Reason::NotAllowed, Protocol::Http, "ask.test");
    log.append(Arc::new(ask));
    let s = log.snapshot();
    assert_eq!((s.total, s.entries.len()), (1, 1));
    assert_eq!(s.entries[0].decision, Verdict::Ask);
}

#[test]
fn resize_shrink_counts_drops_and_grow_keeps_entries() {
    let log = BlockedLog::new(10);
    for i in 0..10 {
        log.append(Arc::new(deny(&format!("h{i}.test"))));
    }
    assert_eq!(log.resize(4), 6);
    let s = log.snapshot();
    assert_eq!(
        (s.capacity, s.total, s.dropped, s.entries.len()),
        (4, 10, 6, 4)
    );
    assert_eq!(s.entries[0].host, "h6.test");
    assert_eq!(log.resize(8), 0);
    log.append(Arc::new(deny("new.test")));
    let s = log.snapshot();
    assert_eq!(
        (s.capacity, s.total, s.dropped, s.entries.len()),
        (8, 11, 6, 5)
    );
    assert_eq!(s.entries[4].host, "new.test");
}

#[test]
fn admin_json_shape() {
    let log = BlockedLog::new(200);
    assert_eq!(
        log.to_admin_json(),
        r#"{"capacity":200,"total":0,"dropped":0,"blocked":[]}"#
    );
    let first = Arc::new(deny("a.test"));
    let second = Arc::new(deny("b.test"));
    log.append(first.clone());
    log.append(second.clone());
    let json = log.to_admin_json();
    let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    let mut expected = vec!["capacity", "total", "dropped", "blocked"];
    expected.sort_unstable(); // serde_json's default map is sorted
    assert_eq!(keys, expected);
    assert!(
        json.starts_with(r#"{"capacity":200,"total":2,"dropped":0,"blocked":[{"decision":"deny","#)
    );
    let blocked = v["blocked"].as_array().unwrap();
    assert_eq!(blocked.len(), 2);
    assert_eq!(blocked[0]["id"], first.id.to_string());
    assert_eq!(blocked[1]["id"], second.id.to_string());
    assert_eq!(blocked[0]["host"], "a.test");
    // Each entry is exactly the violation line's JSON.
    let line = violation_line(&first);
    let entry_json = line.strip_prefix(VIOLATION_PREFIX).unwrap();
    assert!(json.contains(entry_json));
}

#[test]
fn canonical_entry_has_every_key_in_order() {
    let d = deny("a.test");
    let line = violation_line(&d);
    let json = line.strip_prefix(VIOLATION_PREFIX).expect("prefix");
    let keys = portcullis::decision::CANONICAL_KEYS;
    let mut at = 0;
    for k in keys {
        let needle = format!("\"{k}\":");
        let pos = json[at..]
            .find(&needle)
            .unwrap_or_else(|| panic!("{k} missing or out of order in {json}"));
        at += pos + needle.len();
    }
    assert!(!json.contains(' ') || json.contains("Portcullis blocked"));
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v.as_object().unwrap().len(), keys.len());
    assert!(v["ask_id"].is_null());
    assert_eq!(v["timestamp"].as_str().unwrap().len(), 24);
}

// ---- metrics -------------------------------------------------------------------------------

const FAMILIES: &[(&str, &str)] = &[
    ("portcullis_requests_total", "counter"),
    ("portcullis_decisions_total", "counter"),
    ("portcullis_blocks_total", "counter"),
    ("portcullis_bad_requests_total", "counter"),
    ("portcullis_active_connections", "gauge"),
    ("portcullis_connections_rejected_total", "counter"),
    ("portcullis_active_tunnels", "gauge"),
    ("portcullis_bytes_total", "counter"),
    ("portcullis_upstream_errors_total", "counter"),
    ("portcullis_decision_duration_seconds", "histogram"),
    ("portcullis_dns_duration_seconds", "histogram"),
    ("portcullis_ask_wait_seconds", "histogram"),
    ("portcullis_pending_approvals", "gauge"),
    ("portcullis_blocked_log_total", "counter"),
    ("portcullis_blocked_log_dropped_total", "counter"),
    ("portcullis_events_dropped_total", "counter"),
    ("portcullis_udp_datagrams_total", "counter"),
    ("portcullis_udp_datagrams_dropped_total", "counter"),
    ("portcullis_mitm_errors_total", "counter"),
    ("portcullis_control_connected", "gauge"),
    ("portcullis_policy_version", "gauge"),
    ("portcullis_policy_entries", "gauge"),
    ("portcullis_build_info", "gauge"),
    ("portcullis_audit_events_total", "counter"),
    ("portcullis_audit_events_exported_total", "counter"),
    ("portcullis_audit_events_dropped_total", "counter"),
];

const PROTOCOL_LABELS: [&str; 5] = [
    "http",
    "https_connect",
    "socks5_tcp",
    "socks5_udp",
    "unix_socket",
];

/// One parsed sample line.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses exposition text line by line; panics on anything malformed. Returns the TYPE of each
/// family and every sample.
fn parse_prometheus(text: &str) -> (HashMap<String, String>, Vec<Sample>) {
    assert!(text.ends_with('\n'), "text ends with a newline");
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashSet<String> = HashSet::new();
    let mut samples = Vec::new();
    let mut seen_series = HashSet::new();
    for line in text.lines() {
        assert!(!line.is_empty(), "no empty lines");
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP has text");
            assert!(valid_name(name), "{line}");
            assert!(!help.is_empty());
            assert!(helps.insert(name.to_owned()), "one HELP per family: {name}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE has a type");
            assert!(valid_name(name), "{line}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty),
                "{line}"
            );
            assert!(
                types.insert(name.to_owned(), ty.to_owned()).is_none(),
                "one TYPE per family: {name}"
            );
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line}");
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let mut labels = Vec::new();
                for pair in body.split(',') {
                    let (k, v) = pair.split_once('=').expect("label k=v");
                    assert!(valid_label_name(k), "{line}");
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .expect("quoted label value");
                    assert!(!v.contains('"') && !v.contains('\\'), "{line}");
                    labels.push((k.to_owned(), v.to_owned()));
                }
                (name, labels)
            }
        };
        assert!(valid_name(name), "{line}");
        // The sample's family must have been typed before it.
        let family = if types.contains_key(name) {
            name.to_owned()
        } else {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or_else(|| panic!("sample before its TYPE: {line}"));
            assert_eq!(
                types.get(base).map(String::as_str),
                Some("histogram"),
                "{line}"
            );
            base.to_owned()
        };
        assert!(helps.contains(&family), "HELP for {family}");
        assert!(
            seen_series.insert(series.to_owned()),
            "duplicate series {series}"
        );
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    (types, samples)
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|s| s.value)
}

#[test]
fn every_family_present_at_startup_with_zero_series() {
    let m = Metrics::new();
    let text = m.render_prometheus();
    let (types, samples) = parse_prometheus(&text);
    for (name, ty) in FAMILIES {
        assert_eq!(types.get(*name).map(String::as_str), Some(*ty), "{name}");
    }
    assert_eq!(types.len(), FAMILIES.len(), "no unexpected families");

    for p in PROTOCOL_LABELS {
        assert_eq!(
            value(&samples, "portcullis_requests_total", &[("protocol", p)]),
            Some(0.0)
        );
        assert_eq!(
            value(&samples, "portcullis_active_tunnels", &[("protocol", p)]),
            Some(0.0)
        );
        for d in ["allow", "deny", "ask"] {
            let v = value(
                &samples,
                "portcullis_decisions_total",
                &[("protocol", p), ("decision", d)],
            );
            assert_eq!(v, Some(0.0), "{p} {d}");
        }
        for r in BLOCK_REASONS {
            let v = value(
                &samples,
                "portcullis_blocks_total",
                &[("protocol", p), ("reason", r)],
            );
            assert_eq!(v, Some(0.0), "{p} {r}");
        }
        for d in ["upstream", "downstream"] {
            let v = value(
                &samples,
                "portcullis_bytes_total",
                &[("protocol", p), ("direction", d)],
            );
            assert_eq!(v, Some(0.0));
        }
    }
    for l in ["http", "socks5", "admin"] {
        assert_eq!(
            value(
                &samples,
                "portcullis_active_connections",
                &[("listener", l)]
            ),
            Some(0.0)
        );
        assert_eq!(
            value(
                &samples,
                "portcullis_connections_rejected_total",
                &[("listener", l)]
            ),
            Some(0.0)
        );
    }
    for k in BadRequestKind::ALL {
        assert_eq!(
            value(
                &samples,
                "portcullis_bad_requests_total",
                &[("kind", k.as_str())]
            ),
            Some(0.0)
        );
    }
    for k in [
        "invalid_host",
        "socks_timeout",
        "socks_protocol",
        "socks_auth_failed",
    ] {
        assert!(
            value(&samples, "portcullis_bad_requests_total", &[("kind", k)]).is_some(),
            "{k}"
        );
    }
    for k in UpstreamErrorKind::ALL {
        assert_eq!(
            value(
                &samples,
                "portcullis_upstream_errors_total",
                &[("kind", k.as_str())]
            ),
            Some(0.0)
        );
    }
    for s in ["control", "audit"] {
        assert_eq!(
            value(&samples, "portcullis_events_dropped_total", &[("sink", s)]),
            Some(0.0)
        );
    }
    for d in Direction::ALL {
        assert_eq!(
            value(
                &samples,
                "portcullis_udp_datagrams_total",
                &[("direction", d.as_str())]
            ),
            Some(0.0)
        );
    }
    for r in UdpDropReason::ALL {
        assert_eq!(
            value(
                &samples,
                "portcullis_udp_datagrams_dropped_total",
                &[("reason", r.as_str())]
            ),
            Some(0.0)
        );
    }
    assert_eq!(
        value(
            &samples,
            "portcullis_mitm_errors_total",
            &[("kind", "sni_mismatch")]
        ),
        Some(0.0)
    );
    for k in MitmErrorKind::ALL {
        assert!(
            value(
                &samples,
                "portcullis_mitm_errors_total",
                &[("kind", k.as_str())]
            )
            .is_some()
        );
    }
    for l in PolicyList::ALL {
        assert_eq!(
            value(
                &samples,
                "portcullis_policy_entries",
                &[("list", l.as_str())]
            ),
            Some(0.0)
        );
    }
    for r in ["queue_full", "export_failed", "shutdown"] {
        assert_eq!(
            value(
                &samples,
                "portcullis_audit_events_dropped_total",
                &[("reason", r)]
            ),
            Some(0.0)
        );
    }
    for name in [
        "portcullis_pending_approvals",
        "portcullis_blocked_log_total",
        "portcullis_blocked_log_dropped_total",
        "portcullis_control_connected",
        "portcullis_policy_version",
        "portcullis_audit_events_total",
        "portcullis_audit_events_exported_total",
    ] {
        assert_eq!(value(&samples, name, &[]), Some(0.0), "{name}");
    }
    assert_eq!(
        value(
            &samples,
            "portcullis_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    for h in [
        "portcullis_decision_duration_seconds",
        "portcullis_dns_duration_seconds",
        "portcullis_ask_wait_seconds",
    ] {
        assert_eq!(
            value(&samples, &format!("{h}_bucket"), &[("le", "+Inf")]),
            Some(0.0)
        );
        assert_eq!(value(&samples, &format!("{h}_sum"), &[]), Some(0.0));
        assert_eq!(value(&samples, &format!("{h}_count"), &[]), Some(0.0));
    }
}

#[test]
fn decision_duration_buckets_are_the_specified_ones() {
    let m = Metrics::new();
    let les: Vec<&str> = m.decision_duration().buckets.iter().map(|b| b.0).collect();
    let bounds: Vec<f64> = les.iter().map(|s| s.parse().unwrap()).collect();
    assert_eq!(
        bounds,
        [
            1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2
        ]
    );
    let dns: Vec<f64> = m
        .dns_duration()
        .buckets
        .iter()
        .map(|b| b.0.parse().unwrap())
        .collect();
    assert_eq!(dns.first(), Some(&0.0005));
    assert_eq!(dns.last(), Some(&5.0));
    assert!(dns.windows(2).all(|w| w[0] < w[1]));
    let ask: Vec<f64> = m
        .ask_wait_duration()
        .buckets
        .iter()
        .map(|b| b.0.parse().unwrap())
        .collect();
    assert!(ask.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn histogram_bucket_math() {
    let m = Metrics::new();
    // 1 µs exactly lands in le=0.000001 (upper bounds are inclusive).
    m.decision_time(Duration::from_nanos(1_000));
    m.decision_time(Duration::from_nanos(1_001)); // le=0.0000025
    m.decision_time(Duration::from_micros(30)); // le=0.00005
    m.decision_time(Duration::from_millis(5)); // le=0.01
    m.decision_time(Duration::from_millis(50)); // +Inf only
    let s = m.decision_duration();
    let cum: Vec<u64> = s.buckets.iter().map(|b| b.1).collect();
    assert_eq!(cum, [1, 2, 2, 2, 2, 3, 3, 3, 3, 4]);
    assert_eq!(s.count, 5);
    assert_eq!(s.sum_ns, 1_000 + 1_001 + 30_000 + 5_000_000 + 50_000_000);

    let (_, samples) = parse_prometheus(&m.render_prometheus());
    let b = |le: &str| {
        value(
            &samples,
            "portcullis_decision_duration_seconds_bucket",
            &[("le", le)],
        )
        .unwrap()
    };
    assert_eq!(b("0.000001"), 1.0);
    assert_eq!(b("0.0000025"), 2.0);
    assert_eq!(b("0.00005"), 3.0);
    assert_eq!(b("0.01"), 4.0);
    assert_eq!(b("+Inf"), 5.0);
    assert_eq!(
        value(&samples, "portcullis_decision_duration_seconds_count", &[]),
        Some(5.0)
    );
    let sum = value(&samples, "portcullis_decision_duration_seconds_sum", &[]).unwrap();
    assert!((sum - 0.055032001).abs() < 1e-12, "{sum}");
    // Buckets are rendered in ascending order and never decrease.
    let buckets: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == "portcullis_decision_duration_seconds_bucket")
        .map(|s| s.value)
        .collect();
    assert_eq!(buckets.len(), 11);
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]));

    m.dns_time(Duration::from_secs(3));
    m.ask_wait(Duration::from_secs(90));
    let (_, samples) = parse_prometheus(&m.render_prometheus());
    assert_eq!(
        value(
            &samples,
            "portcullis_dns_duration_seconds_bucket",
            &[("le", "2.5")]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &samples,
            "portcullis_dns_duration_seconds_bucket",
            &[("le", "5")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, "portcullis_dns_duration_seconds_sum", &[]),
        Some(3.0)
    );
    assert_eq!(
        value(
            &samples,
            "portcullis_ask_wait_seconds_bucket",
            &[("le", "60")]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &samples,
            "portcullis_ask_wait_seconds_bucket",
            &[("le", "120")]
        ),
        Some(1.0)
    );
}

#[test]
fn record_decision_bumps_decisions_and_blocks() {
    let m = Metrics::new();
    m.record_decision(&decision(
        Verdict::Allow,
        Reason::Allow,
        Protocol::Http,
        "a",
    ));
    m.record_decision(&decision(
        Verdict::Deny,
        Reason::Denied,
        Protocol::Http,
        "a",
    ));
    m.record_decision(&decision(
        Verdict::Ask,
        Reason::NotAllowed,
        Protocol::Socks5Tcp,
        "a",
    ));
    m.record_decision(&decision(
        Verdict::Deny,
        Reason::Other(Arc::from("weird_reason")),
        Protocol::UnixSocket,
        "unix-socket",
    ));
    assert_eq!(m.decisions_count(Protocol::Http, Verdict::Allow), 1);
    assert_eq!(m.decisions_count(Protocol::Http, Verdict::Deny), 1);
    assert_eq!(m.decisions_count(Protocol::Socks5Tcp, Verdict::Ask), 1);
    assert_eq!(m.blocks_count(Protocol::Http, &Reason::Denied), 1);
    assert_eq!(m.blocks_count(Protocol::Socks5Tcp, &Reason::NotAllowed), 1);
    let (_, samples) = parse_prometheus(&m.render_prometheus());
    assert_eq!(
        value(
            &samples,
            "portcullis_blocks_total",
            &[("protocol", "unix_socket"), ("reason", "other")]
        ),
        Some(1.0)
    );
    let blocks: f64 = samples
        .iter()
        .filter(|s| s.name == "portcullis_blocks_total")
        .map(|s| s.value)
        .sum();
    assert_eq!(blocks, 3.0, "allows are not blocks");
}

#[test]
fn other_recorders_reach_their_series() {
    let m = Arc::new(Metrics::new());
    m.request(Protocol::Socks5Udp);
    m.bad_request("invalid_host");
    m.bad_request("no_such_kind");
    m.bad_request(BadRequestKind::SocksTimeout);
    m.upstream_error("tls");
    m.mitm_error(MitmErrorKind::SniMismatch);
    m.bytes(Protocol::HttpsConnect, true, 100);
    m.bytes(Protocol::HttpsConnect, false, 7);
    m.udp_datagram(Direction::Downstream);
    m.udp_dropped(UdpDropReason::Fragmented);
    m.connection_rejected(Listener::Socks5);
    m.set_control_connected(true);
    m.set_policy_version(42);
    m.set_policy_entries(PolicyList::Denied, 3);
    m.set_pending_approvals(2);
    m.add_pending_approvals(-1);
    m.audit_event();
    m.audit_event();
    m.audit_exported(1);
    m.audit_dropped(AuditDropReason::QueueFull, 1);
    let conn = m.connection_opened(Listener::Http);
    let tun = m.tunnel_opened(Protocol::Socks5Tcp);

    let (_, s) = parse_prometheus(&m.render_prometheus());
    let v = |n: &str, l: &[(&str, &str)]| value(&s, n, l).unwrap();
    assert_eq!(
        v("portcullis_requests_total", &[("protocol", "socks5_udp")]),
        1.0
    );
    assert_eq!(
        v("portcullis_bad_requests_total", &[("kind", "invalid_host")]),
        1.0
    );
    assert_eq!(
        v("portcullis_bad_requests_total", &[("kind", "other")]),
        1.0
    );
    assert_eq!(
        v(
            "portcullis_bad_requests_total",
            &[("kind", "socks_timeout")]
        ),
        1.0
    );
    assert_eq!(
        v("portcullis_upstream_errors_total", &[("kind", "tls")]),
        1.0
    );
    assert_eq!(
        v("portcullis_mitm_errors_total", &[("kind", "sni_mismatch")]),
        1.0
    );
    assert_eq!(
        v(
            "portcullis_bytes_total",
            &[("protocol", "https_connect"), ("direction", "upstream")]
        ),
        100.0
    );
    assert_eq!(
        v(
            "portcullis_bytes_total",
            &[("protocol", "https_connect"), ("direction", "downstream")]
        ),
        7.0
    );
    assert_eq!(
        v(
            "portcullis_udp_datagrams_total",
            &[("direction", "downstream")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "portcullis_udp_datagrams_dropped_total",
            &[("reason", "fragmented")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "portcullis_connections_rejected_total",
            &[("listener", "socks5")]
        ),
        1.0
    );
    assert_eq!(v("portcullis_control_connected", &[]), 1.0);
    assert_eq!(v("portcullis_policy_version", &[]), 42.0);
    assert_eq!(v("portcullis_policy_entries", &[("list", "denied")]), 3.0);
    assert_eq!(v("portcullis_pending_approvals", &[]), 1.0);
    assert_eq!(
        v("portcullis_active_connections", &[("listener", "http")]),
        1.0
    );
    assert_eq!(
        v("portcullis_active_tunnels", &[("protocol", "socks5_tcp")]),
        1.0
    );
    assert_eq!(v("portcullis_audit_events_total", &[]), 2.0);
    assert_eq!(v("portcullis_audit_events_exported_total", &[]), 1.0);
    assert_eq!(
        v(
            "portcullis_audit_events_dropped_total",
            &[("reason", "queue_full")]
        ),
        1.0
    );
    let audit = m.audit_counts();
    assert_eq!(audit.total, audit.exported + audit.dropped());

    drop(conn);
    drop(tun);
    let (_, s) = parse_prometheus(&m.render_prometheus());
    assert_eq!(
        value(&s, "portcullis_active_connections", &[("listener", "http")]),
        Some(0.0)
    );
    assert_eq!(
        value(
            &s,
            "portcullis_active_tunnels",
            &[("protocol", "socks5_tcp")]
        ),
        Some(0.0)
    );
}

#[test]
fn concurrent_recording_gives_exact_totals() {
    const THREADS: usize = 8;
    const PER: u64 = 10_000;
    let reporter = Arc::new(Reporter::new(50));
    let metrics = reporter.metrics_arc();
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let reporter = reporter.clone();
            let metrics = metrics.clone();
            std::thread::spawn(move || {
                for i in 0..PER {
                    metrics.request(Protocol::Http);
                    metrics.bytes(Protocol::Socks5Tcp, t % 2 == 0, 3);
                    metrics.decision_time(Duration::from_nanos(i % 20_000));
                    if i % 100 == 0 {
                        reporter.report(deny("c.test"));
                    } else {
                        metrics.record_decision(&decision(
                            Verdict::Allow,
                            Reason::Allow,
                            Protocol::Http,
                            "c.test",
                        ));
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let n = THREADS as u64 * PER;
    let blocks = THREADS as u64 * PER / 100;
    assert_eq!(
        metrics.decisions_count(Protocol::Http, Verdict::Allow),
        n - blocks
    );
    assert_eq!(
        metrics.decisions_count(Protocol::HttpsConnect, Verdict::Deny),
        blocks
    );
    assert_eq!(metrics.decision_duration().count, n);
    let snap = reporter.blocked_log().snapshot();
    assert_eq!(snap.total, blocks);
    assert_eq!(snap.dropped, blocks - 50);
    assert_eq!(snap.entries.len(), 50);
    assert_eq!(metrics.blocked_log_counts(), (blocks, blocks - 50));
    let (_, s) = parse_prometheus(&metrics.render_prometheus());
    assert_eq!(
        value(&s, "portcullis_requests_total", &[("protocol", "http")]),
        Some(n as f64)
    );
    let up = value(
        &s,
        "portcullis_bytes_total",
        &[("protocol", "socks5_tcp"), ("direction", "upstream")],
    )
    .unwrap();
    let down = value(
        &s,
        "portcullis_bytes_total",
        &[("protocol", "socks5_tcp"), ("direction", "downstream")],
    )
    .unwrap();
    assert_eq!(up + down, (n * 3) as f64);
}

// ---- reporter ------------------------------------------------------------------------------

#[test]
fn report_returns_the_same_value_and_feeds_every_surface() {
    let reporter = Reporter::new(200);
    let allow = reporter.report(decision(
        Verdict::Allow,
        Reason::Allow,
        Protocol::Http,
        "ok.test",
    ));
    let denied = deny("no.test");
    let id = denied.id;
    let d = reporter.report(denied);
    assert_eq!(d.id, id);
    assert_eq!(allow.decision, Verdict::Allow);
    let snap = reporter.blocked_log().snapshot();
    assert_eq!(snap.entries.len(), 1);
    assert!(
        Arc::ptr_eq(&snap.entries[0], &d),
        "the log holds the returned Arc"
    );
    let m = reporter.metrics();
    assert_eq!(m.decisions_count(Protocol::Http, Verdict::Allow), 1);
    assert_eq!(
        m.blocks_count(Protocol::HttpsConnect, &Reason::NotAllowed),
        1
    );
    assert_eq!(m.blocked_log_counts(), (1, 0));
    assert!(reporter.blocked_json().contains(&id.to_string()));
    assert!(
        reporter
            .render_metrics()
            .contains("portcullis_blocked_log_total 1\n")
    );
}

#[test]
fn resize_through_reporter_counts_dropped_metric() {
    let reporter = Reporter::new(5);
    for i in 0..5 {
        reporter.report(deny(&format!("h{i}.test")));
    }
    reporter.resize_blocked_log(2);
    assert_eq!(reporter.metrics().blocked_log_counts(), (5, 3));
    let snap = reporter.blocked_log().snapshot();
    assert_eq!((snap.capacity, snap.total, snap.dropped), (2, 5, 3));
}

#[test]
fn violation_line_is_warn_on_policy_target() {
    use std::sync::Mutex;
    use tracing::field::{Field, Visit};
    use tracing::{Event, Level, Metadata, Subscriber, span};

    #[derive(Default)]
    struct Capture(Mutex<Vec<(Level, String, String)>>);
    struct Msg(String);
    impl Visit for Msg {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                self.0 = format!("{value:?}");
            }
        }
    }
    struct Sub(Arc<Capture>);
    impl Subscriber for Sub {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
            span::Id::from_u64(1)
        }
        fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
        fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
        fn event(&self, e: &Event<'_>) {
            let mut m = Msg(String::new());
            e.record(&mut m);
            let meta = e.metadata();
            self.0
                .0
                .lock()
                .unwrap()
                .push((*meta.level(), meta.target().to_owned(), m.0));
        }
        fn enter(&self, _: &span::Id) {}
        fn exit(&self, _: &span::Id) {}
    }

    // A callsite another test thread is registering at this moment can be cached as "never"
    // after our rebuild (tracing-core registration race between parallel tests; a binary sets
    // its subscriber before any callsite exists). Each attempt is judged in full; only an
    // attempt that saw no event at all is repeated, a bounded number of times.
    for attempt in 1..=20 {
        let cap = Arc::new(Capture::default());
        let reporter = Reporter::new(10);
        let d = tracing::subscriber::with_default(Sub(cap.clone()), || {
            tracing::callsite::rebuild_interest_cache();
            reporter.report(decision(
                Verdict::Allow,
                Reason::Allow,
                Protocol::Http,
                "ok.test",
            ));
            reporter.report(deny("no.test"))
        });
        let events = cap.0.lock().unwrap();
        if events.is_empty() && attempt < 20 {
            continue;
        }
        let lines: Vec<_> = events
            .iter()
            .filter(|(_, target, _)| target == "portcullis::policy")
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "exactly one line per blocked Decision: {events:?}"
        );
        assert_eq!(lines[0].0, Level::WARN);
        assert_eq!(lines[0].2, violation_line(&d));
        let json = lines[0].2.strip_prefix(VIOLATION_PREFIX).unwrap();
        assert!(reporter.blocked_json().contains(json));
        return;
    }
}

struct FullSink;

impl DecisionSink for FullSink {
    fn sink(&self) -> Sink {
        Sink::Audit
    }
    fn offer(&self, _: &Arc<Decision>) -> Offer {
        Offer::Dropped
    }
}

#[test]
fn sinks_never_block_and_drops_are_counted() {
    let queue = ControlQueue::new(2);
    let mut reporter = Reporter::new(10);
    reporter.add_sink(Box::new(ControlSink(queue.clone())));
    reporter.add_sink(Box::new(FullSink));
    reporter.report(deny("a.test"));
    reporter.report(deny("b.test"));
    reporter.report(deny("c.test")); // queue of 2 is full: the oldest goes, counted
    let m = reporter.metrics();
    assert_eq!(m.events_dropped_count(Sink::Control), 1);
    assert_eq!(m.events_dropped_count(Sink::Audit), 3);
    assert_eq!(queue.len(), 2);
    assert!(
        reporter
            .render_metrics()
            .contains("portcullis_events_dropped_total{sink=\"control\"} 1\n")
    );

    // Allows are skipped (not reported by default) without counting a drop.
    let queue = ControlQueue::new(4);
    let mut reporter = Reporter::new(10);
    reporter.add_sink(Box::new(ControlSink(queue.clone())));
    reporter.report(decision(
        Verdict::Allow,
        Reason::Allow,
        Protocol::Http,
        "ok.test",
    ));
    reporter.report(deny("no.test"));
    assert_eq!(queue.len(), 1);
    assert_eq!(reporter.metrics().events_dropped_count(Sink::Control), 0);
}
