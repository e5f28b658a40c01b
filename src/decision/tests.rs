use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proptest::prelude::*;

use super::*;

const ID: &str = "0193a4c2-7b1e-7c3a-9f10-2b5e8d4c6a01";

fn base() -> Decision {
    Decision {
        decision: Verdict::Deny,
        reason: Reason::NotAllowed,
        source: Source::BaselinePolicy,
        protocol: Protocol::HttpsConnect,
        host: "api.example.com".into(),
        port: 443,
        id: uuid::Uuid::parse_str(ID).unwrap(),
        timestamp: UNIX_EPOCH + Duration::from_millis(1_795_511_702_117),
        method: None,
        client_address: None,
        client_port: None,
        override_: false,
        ask_id: None,
        rule: None,
        address: None,
        socket_path: None,
        message: None,
        origin: Origin {
            proxy_id: Arc::from("px-0123456789ab"),
            session_id: Arc::from("default"),
        },
    }
}

fn full() -> Decision {
    let mut d = base();
    d.method = Some("CONNECT".into());
    d.client_address = Some("127.0.0.1".parse().unwrap());
    d.client_port = Some(54321);
    d.override_ = true;
    d.ask_id = Some("ask-1".into());
    d.rule = Some("*.example.com:443".into());
    d.address = Some("fe80::1".parse().unwrap());
    d.socket_path = Some("/run/x.sock".into());
    d.message = Some("m \"q\"\n".into());
    d
}

#[test]
fn canonical_json_roundtrip() {
    let d = full();
    let json = d.canonical_json();
    assert_eq!(
        json,
        concat!(
            r#"{"decision":"deny","reason":"not_allowed","source":"baseline_policy","#,
            r#""protocol":"https_connect","host":"api.example.com","port":443,"#,
            r#""id":"0193a4c2-7b1e-7c3a-9f10-2b5e8d4c6a01","timestamp":"2026-11-24T09:15:02.117Z","#,
            r#""method":"CONNECT","client_address":"127.0.0.1","client_port":54321,"#,
            r#""override":true,"ask_id":"ask-1","rule":"*.example.com:443","address":"fe80::1","#,
            r#""socket_path":"/run/x.sock","message":"m \"q\"\n","proxy_id":"px-0123456789ab","#,
            r#""session_id":"default"}"#
        )
    );
    assert_eq!(Decision::from_canonical_json(&json).unwrap(), d);

    let d = base();
    let json = d.canonical_json();
    assert_eq!(
        json,
        concat!(
            r#"{"decision":"deny","reason":"not_allowed","source":"baseline_policy","#,
            r#""protocol":"https_connect","host":"api.example.com","port":443,"#,
            r#""id":"0193a4c2-7b1e-7c3a-9f10-2b5e8d4c6a01","timestamp":"2026-11-24T09:15:02.117Z","#,
            r#""method":null,"client_address":null,"client_port":null,"override":false,"#,
            r#""ask_id":null,"rule":null,"address":null,"socket_path":null,"message":null,"#,
            r#""proxy_id":"px-0123456789ab","session_id":"default"}"#
        )
    );
    assert_eq!(Decision::from_canonical_json(&json).unwrap(), d);

    // Key order checked against the table constant too.
    let mut pos = 0;
    for k in CANONICAL_KEYS {
        let at = json[pos..].find(&format!("\"{k}\":")).expect(k) + pos;
        pos = at + 1;
    }
    assert_eq!(
        d.violation_line(),
        format!("PORTCULLIS_POLICY_VIOLATION {json}")
    );
}

#[test]
fn decode_errors() {
    let json = base().canonical_json();
    assert!(matches!(
        Decision::from_canonical_json("nope"),
        Err(DecodeError::Json(_))
    ));
    assert_eq!(
        Decision::from_canonical_json("[]"),
        Err(DecodeError::NotAnObject)
    );
    let missing = json.replace(r#","rule":null"#, "");
    assert_eq!(
        Decision::from_canonical_json(&missing),
        Err(DecodeError::MissingKey("rule"))
    );
    let extra = json.replace(r#""rule":null"#, r#""rule":null,"x":1"#);
    assert_eq!(
        Decision::from_canonical_json(&extra),
        Err(DecodeError::UnknownKey("x".into()))
    );
    let bad = json.replace(r#""port":443"#, r#""port":70000"#);
    assert_eq!(
        Decision::from_canonical_json(&bad),
        Err(DecodeError::InvalidValue("port"))
    );
    let upper = json.replace(ID, &ID.to_uppercase());
    assert_eq!(
        Decision::from_canonical_json(&upper),
        Err(DecodeError::InvalidValue("id"))
    );
    let ts = json.replace("2026-11-24T09:15:02.117Z", "2026-02-29T09:15:02.117Z");
    assert_eq!(
        Decision::from_canonical_json(&ts),
        Err(DecodeError::InvalidValue("timestamp"))
    );
    let other = json.replace("not_allowed", "quota_exceeded");
    assert_eq!(
        Decision::from_canonical_json(&other).unwrap().reason,
        Reason::Other(Arc::from("quota_exceeded"))
    );
}

fn t(host: &str, port: u16) -> MessageTarget<'_> {
    MessageTarget {
        host,
        port,
        method: None,
        address: None,
        socket_path: None,
    }
}

const P: &str = "Portcullis blocked this request: ";
const NO: &str = " Approval is not possible; do not retry through another route.";
const ASK: &str = " Ask the operator to approve it; do not retry through another route.";
const LATER: &str = " Retry later.";

#[test]
fn message_table() {
    use MessageKind::*;
    let h = t("api.example.com", 443);
    let m = |k| render_message(k, &h);
    let cases: Vec<(MessageKind, MessageTarget<'_>, String)> = vec![
        (
            NotAllowed,
            h,
            format!("{P}api.example.com:443 is not in the allowlist.{ASK}"),
        ),
        (
            NotAllowedAsksDisabled,
            h,
            format!(
                "{P}api.example.com:443 is not in the allowlist and approvals are disabled.{NO}"
            ),
        ),
        (
            NotAllowedWaiting,
            h,
            format!(
                "{P}api.example.com:443 is not in the allowlist and is waiting for approval.{ASK}"
            ),
        ),
        (
            LocalLiteral,
            t("10.0.0.1", 80),
            format!("{P}10.0.0.1:80 is a local or private address.{NO}"),
        ),
        (
            LocalResolved,
            MessageTarget {
                address: Some("192.168.1.5".parse().unwrap()),
                ..t("intranet.example", 80)
            },
            format!(
                "{P}intranet.example:80 resolves to the local or private address 192.168.1.5.{NO}"
            ),
        ),
        (
            Unresolvable(ResolveFailure::TimedOut),
            t("nx.example", 443),
            format!(
                "{P}nx.example could not be resolved (timed out), so its addresses cannot be checked.{NO}"
            ),
        ),
        (
            Unresolvable(ResolveFailure::NoAddresses),
            t("nx.example", 443),
            format!(
                "{P}nx.example could not be resolved (no addresses), so its addresses cannot be checked.{NO}"
            ),
        ),
        (
            Unresolvable(ResolveFailure::LookupFailed),
            t("nx.example", 443),
            format!(
                "{P}nx.example could not be resolved (lookup failed), so its addresses cannot be checked.{NO}"
            ),
        ),
        (
            AlwaysRefused,
            t("::", 8080),
            format!("{P}[::]:8080 is a reserved address or this proxy itself.{NO}"),
        ),
        (
            Denied,
            h,
            format!("{P}api.example.com:443 is explicitly denied.{NO}"),
        ),
        (
            MethodNotAllowed,
            MessageTarget {
                method: Some("POST"),
                ..h
            },
            format!(
                "{P}POST to api.example.com:443 is not allowed in limited mode, which permits only GET, HEAD and OPTIONS.{NO}"
            ),
        ),
        (
            UpgradeNotAllowed,
            h,
            format!(
                "{P}protocol upgrades to api.example.com:443 are not allowed in limited mode.{NO}"
            ),
        ),
        (
            Socks5TcpNotAllowed,
            t("api.example.com", 22),
            format!(
                "{P}SOCKS5 connections to api.example.com:22 are not allowed in limited mode, which permits only HTTPS on port 443.{NO}"
            ),
        ),
        (
            UdpNotAllowed,
            t("2001:db8::1", 53),
            format!("{P}UDP to [2001:db8::1]:53 is not allowed in limited mode.{NO}"),
        ),
        (
            MitmRequired,
            h,
            format!(
                "{P}HTTPS to api.example.com:443 must be inspected in limited mode, but interception is off.{NO}"
            ),
        ),
        (
            ProxyDisabled,
            h,
            format!("{P}the proxy is disabled, so no traffic is allowed.{NO}"),
        ),
        (
            ApprovalDenied,
            h,
            format!("{P}the operator refused access to api.example.com:443.{NO}"),
        ),
        (
            ApprovalTimeout,
            h,
            format!(
                "{P}no one answered the approval request for api.example.com:443 in time.{LATER}"
            ),
        ),
        (
            ApprovalsFull,
            h,
            format!("{P}too many requests are waiting for approval.{LATER}"),
        ),
        (
            ControlUnavailable,
            h,
            format!(
                "{P}api.example.com:443 needs approval, but the control plane is unavailable.{LATER}"
            ),
        ),
        (
            SessionEnded,
            h,
            format!("{P}the session ended before access to api.example.com:443 was approved.{NO}"),
        ),
        (
            PolicyDenied,
            h,
            format!("{P}api.example.com:443 is blocked by network policy.{NO}"),
        ),
        (
            UnixNotAllowed,
            MessageTarget {
                socket_path: Some("/run/docker.sock"),
                ..t("unix-socket", 0)
            },
            format!("{P}unix socket /run/docker.sock is not in the unix-socket allowlist.{ASK}"),
        ),
        (
            UnixRelative,
            MessageTarget {
                socket_path: Some("run/x.sock"),
                ..t("unix-socket", 0)
            },
            format!("{P}unix socket run/x.sock is not an absolute path.{NO}"),
        ),
        (
            UnixDenied,
            MessageTarget {
                socket_path: Some("/run/docker.sock"),
                ..t("unix-socket", 0)
            },
            format!("{P}unix socket /run/docker.sock is explicitly denied.{NO}"),
        ),
    ];
    assert_eq!(cases.len(), 25); // 23 rows; the no-address row has three causes.
    for (kind, target, want) in &cases {
        let got = render_message(*kind, target);
        assert_eq!(&got, want, "{kind:?}");
        assert!(got.starts_with(MESSAGE_PREFIX));
        let endings = [NO, ASK, LATER]
            .iter()
            .filter(|e| got.ends_with(&e[1..]))
            .count();
        assert_eq!(endings, 1, "{got}");
        assert!(got.ends_with(kind.ending().as_str()));
    }
    // Zones stay inside the brackets; IPv4/names are never bracketed.
    assert_eq!(
        render_message(Denied, &t("fe80::1%eth0", 80)),
        format!("{P}[fe80::1%eth0]:80 is explicitly denied.{NO}")
    );
    assert_eq!(m(PolicyDenied), render_message(PolicyDenied, &h));
    // Denied on a unix socket renders the unix-socket target.
    assert_eq!(
        render_message(
            Denied,
            &MessageTarget {
                socket_path: Some("/s"),
                ..t("unix-socket", 0)
            }
        ),
        format!("{P}unix socket /s is explicitly denied.{NO}")
    );
    assert_eq!(NotAllowed.reason(), Reason::NotAllowed);
    assert_eq!(
        Unresolvable(ResolveFailure::TimedOut).reason(),
        Reason::NotAllowedLocal
    );
}

#[test]
fn text_and_json_body_exact() {
    let mut d = base();
    d.set_message(MessageKind::NotAllowed);
    assert_eq!(
        d.text_body(),
        concat!(
            r#"PORTCULLIS_POLICY_DECISION {"decision":"deny","reason":"not_allowed","source":"baseline_policy","protocol":"https_connect","host":"api.example.com","port":443,"id":"0193a4c2-7b1e-7c3a-9f10-2b5e8d4c6a01"}"#,
            "\n",
            "Portcullis blocked this request: api.example.com:443 is not in the allowlist. Ask the operator to approve it; do not retry through another route.\n"
        )
    );
    assert_eq!(
        d.prefix_line(),
        d.text_body().lines().next().unwrap().to_owned()
    );
    assert_eq!(
        d.json_body(),
        concat!(
            r#"{"status":"blocked","host":"api.example.com","port":443,"protocol":"https_connect","reason":"not_allowed","decision":"deny","source":"baseline_policy","message":"Portcullis blocked this request: api.example.com:443 is not in the allowlist. Ask the operator to approve it; do not retry through another route.","id":"0193a4c2-7b1e-7c3a-9f10-2b5e8d4c6a01"}"#,
            "\n"
        )
    );
    assert_eq!(d.body(true).1, "application/json");
    assert_eq!(d.body(false).1, "text/plain; charset=utf-8");
    assert!(d.is_block());
    assert_eq!(d.proxy_error(), "blocked-by-allowlist");
    assert_eq!(d.http_status(), 403);
    assert_eq!(d.id_string(), ID);
}

fn acc(values: &[&str]) -> bool {
    accepts_json(values.iter().map(|v| v.as_bytes()))
}

#[test]
fn accepts_json_cases() {
    // decisions.md tests item 2.
    assert!(acc(&["application/json"]));
    assert!(!acc(&["*/*"]));
    assert!(!acc(&["text/html, application/json;q=0"]));
    assert!(acc(&["application/JSON; charset=utf-8"]));
    // Edge cases.
    assert!(!acc(&[]));
    assert!(!acc(&["application/*"]));
    assert!(!acc(&["text/html"]));
    assert!(acc(&["text/html", "application/json"]));
    assert!(acc(&["text/html,application/json"]));
    assert!(acc(&["  APPLICATION/Json  ;  Q=0.5 "]));
    assert!(acc(&["application/json;q=1"]));
    assert!(acc(&["application/json;q=0.001"]));
    assert!(!acc(&["application/json;q=0.000"]));
    assert!(!acc(&["application/json; q=0"]));
    assert!(!acc(&["application/json;q=abc"]));
    assert!(!acc(&["application/json;q="]));
    assert!(acc(&["application/json;charset=\"a;q=0\""]));
    assert!(!acc(&["text/plain;x=\"a, application/json\""]));
    assert!(!acc(&[
        "application/json+ld",
        "application/jsonx",
        "xapplication/json"
    ]));
    assert!(!acc(&["application/problem+json"]));
    assert!(!acc(&[""]));
    assert!(!acc(&[
        ",,,;;;",
        "/",
        ";q=1",
        "\"",
        "application/json\"",
        "=\\\""
    ]));
    assert!(accepts_json([&b"\xff\xfe, application/json"[..]]));
    assert!(!accepts_json([&b"\xff/\xff;q=\xff"[..]]));
}

proptest! {
    #[test]
    fn accepts_json_never_panics(v in proptest::collection::vec(any::<Vec<u8>>(), 0..4)) {
        let _ = accepts_json(v.iter().map(Vec::as_slice));
    }

    #[test]
    fn json_survives_random_strings(
        host in any::<String>(),
        method in proptest::option::of(any::<String>()),
        message in proptest::option::of(any::<String>()),
        reason in any::<String>(),
        ms in 0u64..253_402_300_800_000,
    ) {
        let mut d = base();
        d.host = host.clone();
        d.method = method.clone();
        d.message = message.clone();
        d.reason = Reason::parse(&reason);
        d.timestamp = UNIX_EPOCH + Duration::from_millis(ms);
        let canon = d.canonical_json();
        let v: serde_json::Value = serde_json::from_str(&canon).unwrap();
        prop_assert_eq!(v["host"].as_str(), Some(host.as_str()));
        prop_assert_eq!(v["method"].as_str(), method.as_deref());
        prop_assert_eq!(v["message"].as_str(), message.as_deref());
        prop_assert_eq!(v["reason"].as_str(), Some(reason.as_str()));
        prop_assert_eq!(&Decision::from_canonical_json(&canon).unwrap(), &d);
        // Our escaper matches serde_json byte for byte.
        prop_assert_eq!(&v["host"].to_string(), &serde_json::to_string(&host).unwrap());
        let body: serde_json::Value = serde_json::from_str(&d.json_body()).unwrap();
        prop_assert_eq!(body["host"].as_str(), Some(host.as_str()));
        prop_assert_eq!(body["message"].as_str(), message.as_deref());
        let text = d.text_body();
        let line1 = text.split('\n').next().unwrap();
        let p: serde_json::Value =
            serde_json::from_str(line1.strip_prefix("PORTCULLIS_POLICY_DECISION ").unwrap()).unwrap();
        prop_assert_eq!(p["host"].as_str(), Some(host.as_str()));
        let e: serde_json::Value = serde_json::from_str(&error_body("upstream-failed", &host, true)).unwrap();
        prop_assert_eq!(e["message"].as_str(), Some(host.as_str()));
        let line = error_body("upstream-failed", &host, false);
        prop_assert_eq!(line.matches('\n').count(), 1);
        prop_assert!(line.ends_with('\n'));
    }

    #[test]
    fn timestamp_roundtrip(ms in -62_167_219_200_000i64..253_402_300_800_000) {
        let t = if ms >= 0 {
            UNIX_EPOCH + Duration::from_millis(ms as u64)
        } else {
            UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
        };
        let s = format_timestamp(t);
        prop_assert_eq!(s.len(), 24);
        prop_assert_eq!(parse_timestamp(&s), Some(t));
    }
}

#[test]
fn timestamp_format() {
    let at = |ms: i64| {
        if ms >= 0 {
            format_timestamp(UNIX_EPOCH + Duration::from_millis(ms as u64))
        } else {
            format_timestamp(UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs()))
        }
    };
    assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(at(1_234_567_890_123), "2009-02-13T23:31:30.123Z");
    assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z"); // 400-year leap
    assert_eq!(at(951_782_400_000 - 1), "2000-02-28T23:59:59.999Z");
    assert_eq!(at(1_709_164_800_000), "2024-02-29T00:00:00.000Z");
    assert_eq!(at(4_107_542_399_999), "2100-02-28T23:59:59.999Z"); // not a leap year
    assert_eq!(at(4_107_542_400_000), "2100-03-01T00:00:00.000Z");
    assert_eq!(at(-2_203_891_200_000), "1900-03-01T00:00:00.000Z");
    assert_eq!(at(-1), "1969-12-31T23:59:59.999Z");
    assert_eq!(at(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
    assert_eq!(at(1_795_511_702_117), "2026-11-24T09:15:02.117Z");
    // Sub-millisecond precision truncates (floors) in both directions.
    assert_eq!(
        format_timestamp(UNIX_EPOCH + Duration::from_nanos(1_999_999)),
        "1970-01-01T00:00:00.001Z"
    );
    assert_eq!(
        format_timestamp(UNIX_EPOCH - Duration::from_nanos(1)),
        "1969-12-31T23:59:59.999Z"
    );
    let now = format_timestamp(SystemTime::now());
    assert_eq!(now.len(), 24);
    assert!(now.ends_with('Z'));
    assert_eq!(parse_timestamp("2024-02-30T00:00:00.000Z"), None);
    assert_eq!(parse_timestamp("2024-02-29T24:00:00.000Z"), None);
    assert_eq!(parse_timestamp("2024-02-29T00:00:00.000"), None);
    assert_eq!(parse_timestamp("2024-02-29T00:00:00.00Z0"), None);
}

#[test]
fn proxy_errors() {
    let all = [
        (ProxyError::InvalidRequest, "invalid-request", 400),
        (ProxyError::ConnectInTunnel, "invalid-request", 405),
        (
            ProxyError::UnixSocketsUnsupported,
            "unix-sockets-unsupported",
            501,
        ),
        (
            ProxyError::UpstreamConnectFailed,
            "upstream-connect-failed",
            502,
        ),
        (ProxyError::UpstreamTlsFailed, "upstream-tls-failed", 502),
        (ProxyError::UpstreamFailed, "upstream-failed", 502),
        (ProxyError::TooManyConnections, "too-many-connections", 503),
        (ProxyError::UpstreamTimeout, "upstream-timeout", 504),
    ];
    for (e, s, st) in all {
        assert_eq!(e.as_str(), s);
        assert_eq!(e.status(), st);
    }
    assert_eq!(
        error_body("upstream-connect-failed", "connection refused", false),
        "upstream-connect-failed: connection refused\n"
    );
    assert_eq!(
        ProxyError::UpstreamTimeout.body("connect \"x\"", true),
        "{\"status\":\"error\",\"error\":\"upstream-timeout\",\"message\":\"connect \\\"x\\\"\"}\n"
    );
    assert_eq!(
        error_body("invalid-request", "a\r\nb", false),
        "invalid-request: a  b\n"
    );
}

#[test]
fn target_and_allow() {
    let mut d = full();
    d.decision = Verdict::Allow;
    assert!(!d.is_block());
    let t = d.target();
    assert_eq!(t.host, "api.example.com");
    assert_eq!(t.method, Some("CONNECT"));
    assert_eq!(t.socket_path, Some("/run/x.sock"));
    assert_eq!(t.address, Some("fe80::1".parse::<IpAddr>().unwrap()));
}
