//! decisions.md "Tests that must exist".

use portcullis_integration_tests::origin::{fixed_response, http_echo, never_answer};
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
    assert_eq!(dns.total_queries(), 0, "not-allowlisted name must not be resolved");
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
            assert_eq!(r.header("content-type"), Some("application/json"), "{accept}");
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
