//! http.md §10 admin API (test 13).

use portcullis_integration_tests::{
    ProxyProcess, RawResponse, admin_get, admin_post, blocked, raw_request,
};

fn json(r: &RawResponse) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.text()))
}

#[test]
fn admin_health() {
    let proxy = ProxyProcess::start(&[], None);
    let r = admin_get(proxy.admin_addr(), "/health");
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("text/plain")
    );
    assert_eq!(r.text(), "ok\n");
}

#[test]
fn admin_config_shows_listeners_and_lists() {
    let proxy = ProxyProcess::start(&["--allow", "Example.TEST", "--deny", "bad.test"], None);
    let r = admin_get(proxy.admin_addr(), "/config");
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("application/json")
    );
    let v = json(&r);
    assert_eq!(v["listeners"]["http"], proxy.http.as_str());
    assert_eq!(v["listeners"]["admin"], proxy.admin_addr());
    let allowed = v["network"]["allowed_domains"].to_string();
    assert!(
        allowed.contains("\"example.test\""),
        "GET /config lists must be normalised: {allowed}"
    );
    assert!(
        v["network"]["denied_domains"]
            .to_string()
            .contains("bad.test")
    );
    assert!(v["limits"].is_object());
}

#[test]
fn admin_metrics_has_every_family() {
    let proxy = ProxyProcess::start(&[], None);
    let r = admin_get(proxy.admin_addr(), "/metrics");
    assert_eq!(r.status, 200);
    let text = r.text();
    for name in [
        "portcullis_requests_total",
        "portcullis_decisions_total",
        "portcullis_blocks_total",
        "portcullis_bad_requests_total",
        "portcullis_active_connections",
        "portcullis_connections_rejected_total",
        "portcullis_active_tunnels",
        "portcullis_bytes_total",
        "portcullis_upstream_errors_total",
        "portcullis_decision_duration_seconds",
        "portcullis_dns_duration_seconds",
        "portcullis_ask_wait_seconds",
        "portcullis_pending_approvals",
        "portcullis_blocked_log_total",
        "portcullis_blocked_log_dropped_total",
        "portcullis_events_dropped_total",
        "portcullis_udp_datagrams_total",
        "portcullis_udp_datagrams_dropped_total",
        "portcullis_mitm_errors_total",
        "portcullis_control_connected",
        "portcullis_policy_version",
        "portcullis_policy_entries",
        "portcullis_build_info",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "missing family {name}"
        );
    }
    // Every sample line is `name{labels} value`.
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let value = line.rsplit(' ').next().unwrap();
        assert!(
            value.parse::<f64>().is_ok() || value == "+Inf",
            "bad sample: {line}"
        );
        assert!(line.starts_with("portcullis_"), "bad sample: {line}");
    }
}

#[test]
fn admin_blocked_does_not_drain() {
    let proxy = ProxyProcess::start(&[], None);
    let req = b"GET http://nope.test/ HTTP/1.1\r\nHost: nope.test\r\n\r\n";
    assert_eq!(raw_request(&proxy.http, req).unwrap().status, 403);
    let a = blocked(proxy.admin_addr());
    let b = blocked(proxy.admin_addr());
    assert_eq!(a, b);
    assert_eq!(a["total"], 1);
    assert_eq!(a["capacity"], 200);
    assert_eq!(a["dropped"], 0);
}

#[test]
fn admin_mode_answers() {
    let proxy = ProxyProcess::start(&["--allow", "ok.test"], None);
    let admin = proxy.admin_addr();
    let r = admin_post(admin, "/mode", r#"{"mode":"limited"}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        json(&r),
        serde_json::json!({"status":"ok","mode":"limited"})
    );
    // Limited now applies: CONNECT without mitm → mitm_required.
    let c = raw_request(
        &proxy.http,
        b"CONNECT ok.test:443 HTTP/1.1\r\nHost: ok.test:443\r\n\r\n",
    )
    .unwrap();
    assert!(
        c.text().contains("\"reason\":\"mitm_required\""),
        "{}",
        c.text()
    );
    let cases = [
        ("", "missing body"),
        ("not json", "invalid json"),
        (r#"{"mode":"sideways"}"#, "invalid mode"),
    ];
    for (body, err) in cases {
        let r = admin_post(admin, "/mode", body);
        assert_eq!(r.status, 400, "{body:?}: {}", r.text());
        assert_eq!(json(&r)["error"], err, "{body:?}");
        assert_eq!(json(&r)["status"], "error");
    }
    let r = admin_post(admin, "/mode", r#"{"mode":"full"}"#);
    assert_eq!(r.status, 200);
}

#[test]
fn admin_reload_ok() {
    let proxy = ProxyProcess::start(&[], Some("[network]\nallowed_domains = []\n"));
    let r = admin_post(proxy.admin_addr(), "/reload", "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(json(&r), serde_json::json!({"status":"reloaded"}));
}

#[test]
fn admin_unknown_path_404_and_wrong_method_405() {
    let proxy = ProxyProcess::start(&[], None);
    let admin = proxy.admin_addr();
    let r = admin_get(admin, "/nope");
    assert_eq!(r.status, 404);
    assert_eq!(json(&r)["error"], "not found");
    let r = admin_post(admin, "/blocked", "{}");
    assert_eq!(r.status, 405);
    assert!(r.header("allow").is_some(), "405 carries Allow");
    let r = admin_get(admin, "/mode");
    assert_eq!(r.status, 405);
}

#[test]
fn admin_body_over_8kib_is_413() {
    let proxy = ProxyProcess::start(&[], None);
    let big = "x".repeat(8 * 1024 + 1);
    let r = admin_post(proxy.admin_addr(), "/mode", &big);
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(json(&r)["error"], "body too large");
}

#[test]
fn admin_token_required_except_health() {
    let dir = tempfile::tempdir().unwrap();
    let token_path = dir.path().join("token");
    let token = "s3cret-admin-token-value";
    std::fs::write(&token_path, format!("{token}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = format!(
        "[network]\nadmin_token_file = \"{}\"\n",
        token_path.display()
    );
    let proxy = ProxyProcess::start(&[], Some(&cfg));
    let admin = proxy.admin_addr();
    let r = admin_get(admin, "/health");
    assert_eq!(r.status, 200, "/health needs no token");
    let r = admin_get(admin, "/config");
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let req = format!(
        "GET /config HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer wrong\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw_request(admin, req.as_bytes()).unwrap().status, 401);
    let req = format!(
        "GET /config HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let r = raw_request(admin, req.as_bytes()).unwrap();
    assert_eq!(r.status, 200);
    assert!(
        !r.text().contains(token),
        "/config must not contain the token text"
    );
}

fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn admin_metrics_count_decisions_and_blocks() {
    let proxy = ProxyProcess::start(&[], None);
    let before = admin_get(proxy.admin_addr(), "/metrics").text();
    assert_eq!(
        metric(
            &before,
            r#"portcullis_blocks_total{protocol="http",reason="not_allowed"}"#
        ),
        Some(0.0),
        "labelled families are pre-initialised with zero"
    );
    let req = b"GET http://nope.test/ HTTP/1.1\r\nHost: nope.test\r\n\r\n";
    for _ in 0..2 {
        assert_eq!(raw_request(&proxy.http, req).unwrap().status, 403);
    }
    let after = admin_get(proxy.admin_addr(), "/metrics").text();
    assert_eq!(
        metric(
            &after,
            r#"portcullis_blocks_total{protocol="http",reason="not_allowed"}"#
        ),
        Some(2.0),
        "{after}"
    );
    assert_eq!(
        metric(
            &after,
            r#"portcullis_decisions_total{protocol="http",decision="deny"}"#
        ),
        Some(2.0)
    );
    assert_eq!(metric(&after, "portcullis_blocked_log_total"), Some(2.0));
}

#[test]
fn admin_reload_applies_new_allowlist_and_rejects_invalid() {
    let origin = portcullis_integration_tests::origin::http_echo("127.0.0.1");
    let allow = format!("127.0.0.1:{}", origin.port());
    let proxy = ProxyProcess::start(&[], Some("[network]\nallowed_domains = []\n"));
    let req = format!("GET http://{allow}/ HTTP/1.1\r\nHost: {allow}\r\n\r\n");
    assert_eq!(
        raw_request(&proxy.http, req.as_bytes()).unwrap().status,
        403
    );
    let path = proxy.config_path().unwrap().to_path_buf();
    std::fs::write(
        &path,
        format!("[network]\nallowed_domains = [\"{allow}\"]\n"),
    )
    .unwrap();
    let r = admin_post(proxy.admin_addr(), "/reload", "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        raw_request(&proxy.http, req.as_bytes()).unwrap().status,
        200
    );
    std::fs::write(&path, "[network]\nallowed_domains = [\"**\"]\n").unwrap();
    let r = admin_post(proxy.admin_addr(), "/reload", "");
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(
        raw_request(&proxy.http, req.as_bytes()).unwrap().status,
        200,
        "a refused reload keeps the previous policy"
    );
}
