//! http.md §10 admin API and config.md §5 reload, driven against the real proxy.

use std::time::Duration;

use portcullis_integration_tests::{ProxyProcess, admin_get, admin_post, blocked, curl};

fn block_once(proxy: &ProxyProcess, host: &str) -> u16 {
    let px = proxy.http_url();
    curl(&["-x", &px, &format!("http://{host}/")]).status
}

fn write(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn config_json(proxy: &ProxyProcess) -> serde_json::Value {
    let r = admin_get(proxy.admin_addr(), "/config");
    assert_eq!(r.status, 200);
    serde_json::from_slice(&r.body).unwrap()
}

#[test]
fn defaults_match_table() {
    let proxy = ProxyProcess::start(&[], None);
    let c = config_json(&proxy);
    let n = &c["network"];
    assert_eq!(n["enabled"], true);
    assert_eq!(n["mode"], "full");
    assert_eq!(n["allowed_domains"], serde_json::json!([]));
    assert_eq!(n["allow_local_binding"], false);
    assert_eq!(n["enable_socks5"], true);
    assert_eq!(n["enable_socks5_udp"], true);
    assert_eq!(n["allow_upstream_proxy"], true);
    assert_eq!(n["mitm"], false);
    let l = &c["limits"];
    for (k, v) in [
        ("max_header_bytes", 65536),
        ("max_headers", 100),
        ("max_connections", 16384),
        ("header_read_timeout_ms", 30000),
        ("client_idle_timeout_ms", 60000),
        ("connect_timeout_ms", 10000),
        ("dns_timeout_ms", 2000),
        ("response_header_timeout_ms", 300000),
        ("tunnel_idle_timeout_ms", 3600000),
        ("udp_idle_timeout_ms", 300000),
        ("max_udp_associations", 1024),
        ("max_udp_destinations", 1024),
        ("blocked_log_size", 200),
        ("max_pending_approvals", 4096),
        ("shutdown_grace_ms", 10000),
    ] {
        assert_eq!(l[k], v, "limits.{k}");
    }
    assert_eq!(c["control"]["session_id"], "default");
    assert_eq!(c["control"]["attached"], false);
    assert_eq!(c["listeners"]["http"], proxy.http.as_str());
}

#[test]
fn health_metrics_and_errors() {
    let proxy = ProxyProcess::start(&[], None);
    let r = admin_get(proxy.admin_addr(), "/health");
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    let r = admin_get(proxy.admin_addr(), "/metrics");
    assert_eq!(r.status, 200);
    let text = r.text();
    for family in [
        "portcullis_requests_total",
        "portcullis_decisions_total",
        "portcullis_blocks_total",
        "portcullis_active_tunnels",
        "portcullis_bytes_total",
        "portcullis_decision_duration_seconds_bucket",
        "portcullis_events_dropped_total",
        "portcullis_blocked_log_dropped_total",
    ] {
        assert!(text.contains(family), "{family} missing from /metrics");
    }
    assert_eq!(admin_get(proxy.admin_addr(), "/nope").status, 404);
    let r = admin_post(proxy.admin_addr(), "/health", "");
    assert_eq!(r.status, 405);
    assert!(r.header("allow").is_some());
    assert_eq!(admin_post(proxy.admin_addr(), "/mode", "").status, 400);
    assert_eq!(admin_post(proxy.admin_addr(), "/mode", "{").status, 400);
    let r = admin_post(proxy.admin_addr(), "/mode", r#"{"mode":"open"}"#);
    assert_eq!(r.status, 400);
    assert!(r.text().contains("invalid mode"));
    let big = format!(r#"{{"mode":"full","pad":"{}"}}"#, "x".repeat(9000));
    assert_eq!(admin_post(proxy.admin_addr(), "/mode", &big).status, 413);
}

#[test]
fn admin_token_required_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin.token");
    write(&token, "t0ken-abcdefghijklmnopqrstuvwxyz0123\n");
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let cfg = format!("[network]\nadmin_token_file = \"{}\"\n", token.display());
    let proxy = ProxyProcess::start(&[], Some(&cfg));
    assert_eq!(admin_get(proxy.admin_addr(), "/health").status, 200);
    let r = admin_get(proxy.admin_addr(), "/blocked");
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = curl(&[
        "-H",
        "Authorization: Bearer t0ken-abcdefghijklmnopqrstuvwxyz0123",
        &format!("http://{}/blocked", proxy.admin_addr()),
    ]);
    assert_eq!(r.status, 200);
}

#[test]
fn reload_applies_lists_keeps_blocked_log_and_resets_mode() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    write(&cfg, "[network]\ndenied_domains = [\"a.test\"]\n");
    let proxy = ProxyProcess::start(&["--config", cfg.to_str().unwrap()], None);
    assert_eq!(block_once(&proxy, "a.test"), 403);
    let before = blocked(proxy.admin_addr());
    assert_eq!(before["total"], 1);
    assert_eq!(before["blocked"][0]["reason"], "denied");

    // POST /mode lasts until the next reload.
    assert_eq!(
        admin_post(proxy.admin_addr(), "/mode", r#"{"mode":"limited"}"#).status,
        200
    );
    assert_eq!(config_json(&proxy)["network"]["mode"], "limited");

    write(&cfg, "[network]\ndenied_domains = [\"b.test\"]\n");
    let r = admin_post(proxy.admin_addr(), "/reload", "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        config_json(&proxy)["network"]["mode"],
        "full",
        "reload resets the runtime mode"
    );
    let px = proxy.http_url();
    let r = curl(&["-x", &px, "http://a.test/"]);
    assert!(
        r.text().contains(r#""reason":"not_allowed""#),
        "{}",
        r.text()
    );
    let r = curl(&["-x", &px, "http://b.test/"]);
    assert!(r.text().contains(r#""reason":"denied""#), "{}", r.text());
    let after = blocked(proxy.admin_addr());
    assert_eq!(after["total"], 3, "blocked log survives the reload");
    assert_eq!(after["blocked"][0]["id"], before["blocked"][0]["id"]);
}

#[test]
fn reload_invalid_keeps_old_config_and_refuses_listener_change() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    write(&cfg, "[network]\ndenied_domains = [\"a.test\"]\n");
    let proxy = ProxyProcess::start(&["--config", cfg.to_str().unwrap()], None);
    write(&cfg, "[network]\nalow_local_binding = true\n");
    let r = admin_post(proxy.admin_addr(), "/reload", "");
    assert_eq!(r.status, 422);
    assert!(
        r.text().contains("network.alow_local_binding"),
        "{}",
        r.text()
    );
    assert!(block_once(&proxy, "a.test") == 403);
    let px = proxy.http_url();
    assert!(
        curl(&["-x", &px, "http://a.test/"])
            .text()
            .contains(r#""reason":"denied""#)
    );

    write(&cfg, "[network]\nmitm = true\n");
    let r = admin_post(proxy.admin_addr(), "/reload", "");
    assert_eq!(r.status, 422);
    assert!(
        r.text().contains("cannot change on a running proxy"),
        "{}",
        r.text()
    );
}

#[test]
fn sighup_equals_post_reload_and_sigterm_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    write(&cfg, "[network]\ndenied_domains = [\"a.test\"]\n");
    let mut proxy = ProxyProcess::start(&["--config", cfg.to_str().unwrap()], None);
    write(&cfg, "[network]\ndenied_domains = [\"b.test\"]\n");
    proxy.signal(libc::SIGHUP);
    assert!(
        proxy.wait_for_stderr("configuration reloaded", Duration::from_secs(10)),
        "{}",
        proxy.stderr_text()
    );
    let px = proxy.http_url();
    assert!(
        curl(&["-x", &px, "http://b.test/"])
            .text()
            .contains(r#""reason":"denied""#)
    );
    // A bad file on SIGHUP logs an ERROR and keeps running.
    write(&cfg, "[network]\nmode = \"open\"\n");
    proxy.signal(libc::SIGHUP);
    assert!(
        proxy.wait_for_stderr("reload failed", Duration::from_secs(10)),
        "{}",
        proxy.stderr_text()
    );
    assert!(
        curl(&["-x", &px, "http://b.test/"])
            .text()
            .contains(r#""reason":"denied""#)
    );
    proxy.signal(libc::SIGTERM);
    let status = proxy
        .wait_exit(Duration::from_secs(15))
        .expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0));
}
