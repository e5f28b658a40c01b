//! decisions.md "Tests that must exist".

use portcullis_integration_tests::origin::{blackhole, fixed_response, http_echo, never_answer};

use portcullis_integration_tests::raw::{connect, read_response, read_response_opts};
use portcullis_integration_tests::{
    DnsServer, END_ASK, END_NO, PREFIX, ProxyProcess, admin_get, admin_post, blocked, curl,
};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

const LINE1_KEYS: [&str; 7] = [
    "decision", "reason", "source", "protocol", "host", "port", "id",
];
const JSON_BODY_KEYS: [&str; 9] = [
    "status", "host", "port", "protocol", "reason", "decision", "source", "message", "id",
];
const CANONICAL_KEYS: [&str; 19] = [
    "decision",
    "reason",
    "source",
    "protocol",
    "host",
    "port",
    "id",
    "timestamp",
    "method",
    "client_address",
    "client_port",
    "override",
    "ask_id",
    "rule",
    "address",
    "socket_path",
    "message",
    "proxy_id",
    "session_id",
];

/// Keys of a top-level JSON object in textual order (serde_json without preserve_order sorts).
fn key_order(json: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let b = json.as_bytes();
    let (mut depth, mut i) = (0i32, 0usize);
    let mut in_str = false;
    let mut start = 0;
    while i < b.len() {
        let c = b[i];
        if in_str {
            if c == b'\\' {
                i += 1;
            } else if c == b'"' {
                in_str = false;
                if depth == 1 && b.get(i + 1) == Some(&b':') {
                    keys.push(json[start..i].to_string());
                }
            }
        } else {
            match c {
                b'"' => {
                    in_str = true;
                    start = i + 1;
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' => depth -= 1,
                _ => {}
            }
        }
        i += 1;
    }
    keys
}

fn dns_config(dns: &DnsServer, extra_network: &str) -> String {
    format!(
        "[network]\ndns_servers = [\"{}\"]\n{extra_network}\n",
        dns.addr_string()
    )
}

fn is_uuid_v7(id: &str) -> bool {
    id.len() == 36
        && id.chars().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_digit() || ('a'..='f').contains(&c),
        })
        && id.as_bytes()[14] == b'7'
        && matches!(id.as_bytes()[19], b'8' | b'9' | b'a' | b'b')
}

/// Splits a text Decision body into (line 1 JSON, line 2 message).
fn split_text_body(body: &str) -> (String, String) {
    assert!(body.ends_with('\n'), "body must end in \\n: {body:?}");
    let lines: Vec<&str> = body.split_terminator('\n').collect();
    assert_eq!(lines.len(), 2, "exactly two lines: {body:?}");
    let json = lines[0]
        .strip_prefix("PORTCULLIS_POLICY_DECISION ")
        .unwrap_or_else(|| panic!("line 1 prefix: {body:?}"));
    (json.to_string(), lines[1].to_string())
}

#[test]
fn text_body_prefix_line_exact() {
    let dns = DnsServer::start();
    let proxy = ProxyProcess::start(&[], Some(&dns_config(&dns, "")));
    let r = curl(&["-x", &proxy.http_url(), "http://api.example.test/x"]);
    assert_eq!(r.status, 403);
    assert_eq!(r.header("x-proxy-error"), Some("blocked-by-allowlist"));
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let (json, message) = split_text_body(&r.text());
    assert_eq!(key_order(&json), LINE1_KEYS);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["reason"], "not_allowed");
    assert_eq!(v["source"], "baseline_policy");
    assert_eq!(v["protocol"], "http");
    assert_eq!(v["host"], "api.example.test");
    assert_eq!(v["port"], 80);
    assert_eq!(
        v["id"].as_str(),
        r.header("x-portcullis-decision-id"),
        "line-1 id equals header"
    );
    assert_eq!(
        message,
        format!("{PREFIX}api.example.test:80 is not in the allowlist. {END_ASK}")
    );
    assert_eq!(
        dns.total_queries(),
        0,
        "not-allowlisted name must not be resolved"
    );
}

#[test]
fn json_body_on_accept() {
    let proxy = ProxyProcess::start(&[], None);
    let target = "http://api.example.test/";
    let cases: [(&str, bool); 4] = [
        ("application/json", true),
        ("*/*", false),
        ("text/html, application/json;q=0", false),
        ("application/JSON; charset=utf-8", true),
    ];
    for (accept, want_json) in cases {
        let hdr = format!("Accept: {accept}");
        let r = curl(&["-x", &proxy.http_url(), "-H", &hdr, target]);
        assert_eq!(r.status, 403, "Accept {accept}");
        let body = r.text();
        if want_json {
            assert_eq!(
                r.header("content-type"),
                Some("application/json"),
                "{accept}"
            );
            assert!(body.ends_with("}\n"), "{accept}: {body:?}");
            assert_eq!(key_order(body.trim_end()), JSON_BODY_KEYS, "{accept}");
            let v = r.json();
            assert_eq!(v["status"], "blocked");
            assert_eq!(v["reason"], "not_allowed");
            assert_eq!(v["protocol"], "http");
            assert_eq!(v["port"], 80);
            assert_eq!(v["id"].as_str(), r.header("x-portcullis-decision-id"));
            assert_eq!(
                v["message"],
                format!("{PREFIX}api.example.test:80 is not in the allowlist. {END_ASK}")
            );
        } else {
            assert!(
                body.starts_with("PORTCULLIS_POLICY_DECISION "),
                "{accept}: want text, got {body:?}"
            );
        }
    }
}

/// A block response checked against the §2/§3 contract; returns line-1 JSON.
struct Expect<'a> {
    status: u16,
    x_proxy_error: &'a str,
    reason: &'a str,
    source: &'a str,
    protocol: &'a str,
    message: &'a str,
}

fn check_block(r: &portcullis_integration_tests::RawResponse, e: &Expect) -> serde_json::Value {
    let ctx = format!("{} / {}: {} {}", e.protocol, e.reason, r.status, r.text());
    assert_eq!(r.status, e.status, "{ctx}");
    assert_eq!(r.header("x-proxy-error"), Some(e.x_proxy_error), "{ctx}");
    assert_eq!(r.header("cache-control"), Some("no-store"), "{ctx}");
    let (json, message) = split_text_body(&r.text());
    assert_eq!(key_order(&json), LINE1_KEYS, "{ctx}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["reason"], e.reason, "{ctx}");
    assert_eq!(v["source"], e.source, "{ctx}");
    assert_eq!(v["protocol"], e.protocol, "{ctx}");
    assert_eq!(
        v["id"].as_str(),
        r.header("x-portcullis-decision-id"),
        "{ctx}"
    );
    assert_eq!(message, e.message, "{ctx}");
    v
}

fn get_abs(
    proxy: &ProxyProcess,
    authority: &str,
    extra: &str,
) -> portcullis_integration_tests::RawResponse {
    let req = format!("GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n");
    portcullis_integration_tests::raw_request(&proxy.http, req.as_bytes()).expect("response")
}

fn method_abs(
    proxy: &ProxyProcess,
    method: &str,
    authority: &str,
) -> portcullis_integration_tests::RawResponse {
    let req = format!(
        "{method} http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\ncontent-length: 0\r\n\r\n"
    );
    portcullis_integration_tests::raw_request(&proxy.http, req.as_bytes()).expect("response")
}

fn connect_req(proxy: &ProxyProcess, authority: &str) -> portcullis_integration_tests::RawResponse {
    let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    portcullis_integration_tests::raw_request(&proxy.http, req.as_bytes()).expect("response")
}

fn deny_expect<'a>(
    reason: &'a str,
    xerr: &'a str,
    protocol: &'a str,
    message: &'a str,
) -> Expect<'a> {
    Expect {
        status: 403,
        x_proxy_error: xerr,
        reason,
        source: "baseline_policy",
        protocol,
        message,
    }
}

#[test]
fn reason_not_allowed() {
    let proxy = ProxyProcess::start(&[], None);
    let m = format!("{PREFIX}api.example.test:80 is not in the allowlist. {END_ASK}");
    check_block(
        &get_abs(&proxy, "api.example.test", ""),
        &deny_expect("not_allowed", "blocked-by-allowlist", "http", &m),
    );
    let m = format!("{PREFIX}api.example.test:443 is not in the allowlist. {END_ASK}");
    check_block(
        &connect_req(&proxy, "api.example.test:443"),
        &deny_expect("not_allowed", "blocked-by-allowlist", "https_connect", &m),
    );
}

#[test]
fn reason_not_allowed_local_literal() {
    let proxy = ProxyProcess::start(&[], None);
    for proto in ["http", "https_connect"] {
        let m = format!("{PREFIX}127.0.0.1:9 is a local or private address. {END_NO}");
        let r = if proto == "http" {
            get_abs(&proxy, "127.0.0.1:9", "")
        } else {
            connect_req(&proxy, "127.0.0.1:9")
        };
        let v = check_block(
            &r,
            &deny_expect("not_allowed_local", "blocked-by-allowlist", proto, &m),
        );
        assert_eq!(v["host"], "127.0.0.1");
    }
}

#[test]
fn reason_not_allowed_local_resolved() {
    let dns = DnsServer::start();
    dns.set("res.test", &[IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))]);
    let proxy = ProxyProcess::start(&["--allow", "res.test"], Some(&dns_config(&dns, "")));
    for (proto, port) in [("http", 80), ("https_connect", 443)] {
        let m = format!(
            "{PREFIX}res.test:{port} resolves to the local or private address 127.0.0.2. {END_NO}"
        );
        let r = if proto == "http" {
            get_abs(&proxy, "res.test", "")
        } else {
            connect_req(&proxy, "res.test:443")
        };
        check_block(
            &r,
            &deny_expect("not_allowed_local", "blocked-by-allowlist", proto, &m),
        );
    }
    let b = blocked(proxy.admin_addr());
    for e in b["blocked"].as_array().unwrap() {
        assert_eq!(e["address"], "127.0.0.2", "{e}");
    }
}

#[test]
fn reason_not_allowed_local_no_address() {
    let dns = DnsServer::start();
    dns.set_drop("slow.test");
    let cfg = format!("{}\n[limits]\ndns_timeout_ms = 200\n", dns_config(&dns, ""));
    let proxy = ProxyProcess::start(&["--allow", "slow.test"], Some(&cfg));
    let m = format!(
        "{PREFIX}slow.test could not be resolved (timed out), so its addresses cannot be checked. {END_NO}"
    );
    check_block(
        &get_abs(&proxy, "slow.test", ""),
        &deny_expect("not_allowed_local", "blocked-by-allowlist", "http", &m),
    );
    check_block(
        &connect_req(&proxy, "slow.test:443"),
        &deny_expect(
            "not_allowed_local",
            "blocked-by-allowlist",
            "https_connect",
            &m,
        ),
    );
}

#[test]
fn reason_not_allowed_local_always_refused() {
    let proxy = ProxyProcess::start(
        &["--allow", "*"],
        Some("[network]\nallow_local_binding = true\n"),
    );
    let m = format!("{PREFIX}0.0.0.0:80 is a reserved address or this proxy itself. {END_NO}");
    check_block(
        &get_abs(&proxy, "0.0.0.0", ""),
        &deny_expect("not_allowed_local", "blocked-by-allowlist", "http", &m),
    );
    let m = format!("{PREFIX}0.0.0.0:443 is a reserved address or this proxy itself. {END_NO}");
    check_block(
        &connect_req(&proxy, "0.0.0.0:443"),
        &deny_expect(
            "not_allowed_local",
            "blocked-by-allowlist",
            "https_connect",
            &m,
        ),
    );
}

#[test]
fn reason_denied() {
    let proxy = ProxyProcess::start(&["--allow", "*", "--deny", "bad.test"], None);
    let m = format!("{PREFIX}bad.test:80 is explicitly denied. {END_NO}");
    check_block(
        &get_abs(&proxy, "bad.test", ""),
        &deny_expect("denied", "blocked-by-denylist", "http", &m),
    );
    let m = format!("{PREFIX}bad.test:443 is explicitly denied. {END_NO}");
    check_block(
        &connect_req(&proxy, "bad.test:443"),
        &deny_expect("denied", "blocked-by-denylist", "https_connect", &m),
    );
}

#[test]
fn reason_method_not_allowed_method_and_upgrade() {
    let proxy = ProxyProcess::start(&["--allow", "ok.test", "--mode", "limited"], None);
    let mut e = deny_expect("method_not_allowed", "blocked-by-method-policy", "http", "");
    e.source = "mode_guard";
    let m = format!(
        "{PREFIX}POST to ok.test:80 is not allowed in limited mode, which permits only GET, HEAD and OPTIONS. {END_NO}"
    );
    e.message = &m;
    check_block(&method_abs(&proxy, "POST", "ok.test"), &e);
    let m2 = format!(
        "{PREFIX}protocol upgrades to ok.test:80 are not allowed in limited mode. {END_NO}"
    );
    e.message = &m2;
    let r = get_abs(
        &proxy,
        "ok.test",
        "Connection: upgrade\r\nUpgrade: websocket\r\n",
    );
    check_block(&r, &e);
}

#[test]
fn reason_mitm_required() {
    let proxy = ProxyProcess::start(&["--allow", "ok.test", "--mode", "limited"], None);
    let m = format!(
        "{PREFIX}HTTPS to ok.test:443 must be inspected in limited mode, but interception is off. {END_NO}"
    );
    let mut e = deny_expect(
        "mitm_required",
        "blocked-by-mitm-required",
        "https_connect",
        &m,
    );
    e.source = "mode_guard";
    check_block(&connect_req(&proxy, "ok.test:443"), &e);
}

#[test]
fn reason_proxy_disabled_503() {
    let proxy = ProxyProcess::start(&["--allow", "*"], Some("[network]\nenabled = false\n"));
    let m = format!("{PREFIX}the proxy is disabled, so no traffic is allowed. {END_NO}");
    let mut e = deny_expect("proxy_disabled", "proxy-disabled", "http", &m);
    e.status = 503;
    e.source = "proxy_state";
    check_block(&get_abs(&proxy, "ok.test", ""), &e);
    e.protocol = "https_connect";
    check_block(&connect_req(&proxy, "ok.test:443"), &e);
}

#[test]
fn decision_id_same_everywhere() {
    let proxy = ProxyProcess::start(&[], None);
    let r1 = get_abs(&proxy, "one.test", "");
    std::thread::sleep(Duration::from_millis(5));
    let r2 = get_abs(&proxy, "two.test", "");
    let mut ids = Vec::new();
    for r in [&r1, &r2] {
        let hdr = r
            .header("x-portcullis-decision-id")
            .expect("id header")
            .to_string();
        let (json, _) = split_text_body(&r.text());
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["id"], hdr.as_str());
        assert!(is_uuid_v7(&hdr), "not a lower-case UUIDv7: {hdr}");
        ids.push(hdr);
    }
    assert_ne!(ids[0], ids[1]);
    assert!(ids[0] < ids[1], "v7 ids increase with time: {ids:?}");
    let b = blocked(proxy.admin_addr());
    let logged: Vec<&str> = b["blocked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(logged, ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(proxy.wait_for_stderr(&ids[1], Duration::from_secs(10)));
    let vio: Vec<String> = proxy
        .violations()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(vio, ids);
}

#[test]
fn blocked_log_ring() {
    let proxy = ProxyProcess::start(&[], Some("[limits]\nblocked_log_size = 200\n"));
    let mut s = connect(&proxy.http);
    for i in 0..205 {
        let req = format!("GET http://h{i}.test/ HTTP/1.1\r\nHost: h{i}.test\r\n\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let r = read_response(&mut s).expect("response on keep-alive connection");
        assert_eq!(r.status, 403, "request {i}");
    }
    let check = |b: &serde_json::Value| {
        assert_eq!(b["capacity"], 200);
        assert_eq!(b["total"], 205);
        assert_eq!(b["dropped"], 5);
        let entries = b["blocked"].as_array().unwrap();
        assert_eq!(entries.len(), 200);
        assert_eq!(
            entries[0]["host"], "h5.test",
            "oldest kept is the 6th request"
        );
        assert_eq!(entries[199]["host"], "h204.test");
    };
    let first = blocked(proxy.admin_addr());
    check(&first);
    let second = blocked(proxy.admin_addr());
    assert_eq!(first, second, "/blocked does not drain");
    let r = admin_post(proxy.admin_addr(), "/reload", "");
    assert_eq!(r.status, 200, "reload: {}", r.text());
    let third = blocked(proxy.admin_addr());
    assert_eq!(first, third, "ring survives reload");
}

#[test]
fn violation_line_matches_blocked_entry() {
    let proxy = ProxyProcess::start(&[], None);
    let r = get_abs(&proxy, "api.example.test", "");
    let id = r.header("x-portcullis-decision-id").unwrap().to_string();
    assert!(proxy.wait_for_stderr(&id, Duration::from_secs(10)));
    let line = proxy
        .stderr_text()
        .lines()
        .find(|l| l.contains("PORTCULLIS_POLICY_VIOLATION ") && l.contains(&id))
        .unwrap()
        .to_string();
    let json = line
        .split_once("PORTCULLIS_POLICY_VIOLATION ")
        .unwrap()
        .1
        .trim();
    assert_eq!(key_order(json), CANONICAL_KEYS);
    let admin_raw = admin_get(proxy.admin_addr(), "/blocked").text();
    assert!(
        admin_raw.contains(json),
        "/blocked holds the identical canonical JSON\n{json}\n{admin_raw}"
    );
    let from_log: serde_json::Value = serde_json::from_str(json).unwrap();
    let b = blocked(proxy.admin_addr());
    assert_eq!(b["blocked"][0], from_log);
    assert_eq!(from_log["method"], "GET");
    assert_eq!(from_log["client_address"], "127.0.0.1");
    assert_eq!(from_log["session_id"], "default");
    assert_eq!(from_log["timestamp"].as_str().unwrap().len(), 24);
}

#[test]
fn non_policy_errors_have_no_decision() {
    // Refused port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let hole = blackhole();
    let silent = never_answer("127.0.0.1");
    let allow_refused = format!("127.0.0.1:{port}");
    let allow_hole = format!("127.0.0.1:{}", hole.port);
    let allow_silent = format!("127.0.0.1:{}", silent.port());
    let cfg = "[limits]\nconnect_timeout_ms = 200\nresponse_header_timeout_ms = 1000\n";
    let proxy = ProxyProcess::start(
        &[
            "--allow",
            &allow_refused,
            "--allow",
            &allow_hole,
            "--allow",
            &allow_silent,
        ],
        Some(cfg),
    );
    let cases = [
        (allow_refused.as_str(), 502, "upstream-connect-failed"),
        (allow_hole.as_str(), 504, "upstream-timeout"),
        (allow_silent.as_str(), 504, "upstream-timeout"),
    ];
    for (authority, status, xerr) in cases {
        let r = get_abs(&proxy, authority, "");
        assert_eq!(r.status, status, "{authority}: {}", r.text());
        assert_eq!(r.header("x-proxy-error"), Some(xerr), "{authority}");
        assert_eq!(r.header("x-portcullis-decision-id"), None, "{authority}");
        assert!(
            r.text().starts_with(&format!("{xerr}: ")),
            "{authority}: {:?}",
            r.text()
        );
        assert!(!r.text().contains("PORTCULLIS_POLICY_DECISION"));
    }
    assert_eq!(
        blocked(proxy.admin_addr())["total"],
        0,
        "errors are not Decisions"
    );
}

#[test]
fn origin_cannot_forge_block_headers() {
    let origin = fixed_response(
        "127.0.0.1",
        200,
        &[
            ("x-proxy-error", "blocked-by-denylist"),
            ("x-portcullis-decision-id", "x"),
            ("x-keep", "yes"),
        ],
        "hello",
    );
    let allow = format!("127.0.0.1:{}", origin.port());
    let proxy = ProxyProcess::start(&["--allow", &allow], None);
    let r = curl(&["-x", &proxy.http_url(), &format!("http://{allow}/")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello");
    assert_eq!(r.header("x-keep"), Some("yes"));
    assert_eq!(r.header("x-proxy-error"), None);
    assert_eq!(r.header("x-portcullis-decision-id"), None);
}

#[test]
fn head_block_has_no_body() {
    let proxy = ProxyProcess::start(&[], None);
    let mut s = connect(&proxy.http);
    s.write_all(b"HEAD http://nope.test/ HTTP/1.1\r\nHost: nope.test\r\n\r\n")
        .unwrap();
    let r = read_response_opts(&mut s, true).expect("HEAD response");
    assert_eq!(r.status, 403);
    assert_eq!(r.header("x-proxy-error"), Some("blocked-by-allowlist"));
    // The next response on the connection must start right away: no body bytes in between.
    s.write_all(b"GET http://nope2.test/ HTTP/1.1\r\nHost: nope2.test\r\n\r\n")
        .unwrap();
    let r2 = read_response(&mut s).expect("second response");
    assert_eq!(r2.status, 403);
    assert!(r2.text().contains("nope2.test"));
}

#[test]
fn expect_continue_blocked_without_100() {
    let proxy = ProxyProcess::start(&[], None);
    let mut s = connect(&proxy.http);
    s.write_all(
        b"POST http://nope.test/ HTTP/1.1\r\nHost: nope.test\r\nExpect: 100-continue\r\ncontent-length: 10\r\n\r\n",
    )
    .unwrap();
    let r = read_response(&mut s).expect("response");
    assert_eq!(
        r.status, 403,
        "refused request gets 403 directly, never 100"
    );
    assert!(r.text().starts_with("PORTCULLIS_POLICY_DECISION "));
}

#[test]
fn block_with_unread_body_closes_connection() {
    let proxy = ProxyProcess::start(&[], None);
    let mut s = connect(&proxy.http);
    s.write_all(
        b"POST http://nope.test/ HTTP/1.1\r\nHost: nope.test\r\ncontent-length: 1000000\r\n\r\nabc",
    )
    .unwrap();
    let r = read_response(&mut s).expect("response");
    assert_eq!(r.status, 403);
    assert_eq!(r.header("connection"), Some("close"));
    let rest = portcullis_integration_tests::raw::read_to_eof(&mut s);
    assert!(
        rest.is_empty(),
        "connection closed after the 403, got {} more bytes",
        rest.len()
    );
}

#[test]
fn keepalive_survives_block_without_body() {
    let origin = http_echo("127.0.0.1");
    let allow = format!("127.0.0.1:{}", origin.port());
    let proxy = ProxyProcess::start(&["--allow", &allow], None);
    let mut s = connect(&proxy.http);
    s.write_all(b"GET http://nope.test/ HTTP/1.1\r\nHost: nope.test\r\n\r\n")
        .unwrap();
    let r = read_response(&mut s).expect("first response");
    assert_eq!(r.status, 403);
    assert_ne!(r.header("connection"), Some("close"));
    let req = format!("GET http://{allow}/after HTTP/1.1\r\nHost: {allow}\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let r2 = read_response(&mut s).expect("second response on the same connection");
    assert_eq!(r2.status, 200, "{}", r2.text());
    let v: serde_json::Value = serde_json::from_slice(&r2.body).unwrap();
    assert_eq!(v["path"], "/after");
}
