//! config.md "Tests that must exist" at the binary level: exit status 2 and messages that name
//! the key, line and column; listener parsing and clamping in the ready line.

use portcullis_integration_tests::{ProxyProcess, run_to_exit};

fn expect_exit_2(config: &str, needles: &[&str]) {
    let (status, out, err) = run_to_exit(&[], Some(config));
    assert_eq!(status.code(), Some(2), "config {config:?}: stderr {err}");
    assert!(
        out.is_empty(),
        "nothing on stdout when refusing to start: {out}"
    );
    assert!(err.contains("config error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "stderr should contain {n:?}: {err}");
    }
}

#[test]
fn unknown_key_exit_2_names_key() {
    expect_exit_2(
        "[network]\nalow_local_binding = true\n",
        &[
            "network.alow_local_binding",
            ":2:1",
            "did you mean allow_local_binding",
        ],
    );
    expect_exit_2("[netwrk]\n", &["netwrk"]);
}

#[test]
fn type_error_has_line_and_column() {
    expect_exit_2(
        "[network]\nenable_socks5 = \"yes\"\n",
        &["network.enable_socks5", ":2:"],
    );
}

#[test]
fn list_and_map_forms_cannot_mix() {
    expect_exit_2(
        "[network]\nallowed_domains = []\n[network.domains]\n\"a.test\" = \"allow\"\n",
        &["network.domains", "allowed_domains"],
    );
    expect_exit_2(
        "[network]\nallow_unix_sockets = [\"/tmp/a.sock\"]\n[network.unix_sockets]\n\"/tmp/b.sock\" = \"deny\"\n",
        &["network.unix_sockets", "allow_unix_sockets"],
    );
}

#[test]
fn bad_patterns_are_exit_2() {
    expect_exit_2(
        "[network]\ndenied_domains = [\"*\"]\n",
        &["network.denied_domains[0]", "global wildcard"],
    );
    expect_exit_2(
        "[network]\nallowed_domains = [\"ok.test\", \"a..b\"]\n",
        &[
            "network.allowed_domains[1]",
            "invalid pattern \"a..b\": empty label",
        ],
    );
    expect_exit_2(
        "[network]\nallowed_domains = [\"example.*\"]\n",
        &["network.allowed_domains[0]"],
    );
    expect_exit_2(
        "[network]\nallow_unix_sockets = [\"agent.sock\"]\n",
        &["network.allow_unix_sockets[0]", "absolute"],
    );
    // `*:22` in the denylist and `*` in the allowlist are fine.
    let p = ProxyProcess::start(
        &[],
        Some("[network]\ndenied_domains = [\"*:22\"]\nallowed_domains = [\"*\"]\n"),
    );
    assert!(!p.http.is_empty());
}

#[test]
fn map_duplicate_after_normalisation_deny_wins() {
    let cfg = "[network.domains]\n\"Example.com\" = \"allow\"\n\"example.com.\" = \"deny\"\n";
    let proxy = ProxyProcess::start(&[], Some(cfg));
    let px = proxy.http_url();
    let r = portcullis_integration_tests::curl(&["-x", &px, "http://example.com/"]);
    assert!(r.text().contains(r#""reason":"denied""#), "{}", r.text());
    assert!(
        proxy.stderr_text().contains("deny wins"),
        "{}",
        proxy.stderr_text()
    );
}

#[test]
fn limits_out_of_range_exit_2() {
    for (key, low, high) in [
        ("max_header_bytes", 1023, 1048577),
        ("max_headers", 7, 1001),
        ("max_connections", 0, 1000001),
        ("header_read_timeout_ms", 99, 600001),
        ("client_idle_timeout_ms", 99, 86400001),
        ("connect_timeout_ms", 99, 300001),
        ("dns_timeout_ms", 99, 60001),
        ("response_header_timeout_ms", 999, 86400001),
        ("tunnel_idle_timeout_ms", 999, 604800001),
        ("udp_idle_timeout_ms", 999, 86400001),
        ("max_udp_associations", 0, 65537),
        ("max_udp_destinations", 0, 65537),
        ("blocked_log_size", 0, 100001),
        ("max_pending_approvals", 0, 1000001),
        ("shutdown_grace_ms", -1, 600001),
    ] {
        for v in [low, high] {
            expect_exit_2(
                &format!("[limits]\n{key} = {v}\n"),
                &[&format!("limits.{key}")],
            );
        }
    }
}

#[test]
fn listener_addresses_and_conflicts() {
    for bad in [
        "",
        "example.com:80",
        "user:pw@127.0.0.1:1",
        "127.0.0.1:99999",
        "127.0.0.1:x",
        "ftp://127.0.0.1:1",
        "http://127.0.0.1:1/path",
    ] {
        expect_exit_2(
            &format!("[network]\nproxy_url = \"{bad}\"\n"),
            &["network.proxy_url"],
        );
    }
    expect_exit_2(
        "[network]\nproxy_url = \"127.0.0.1:45123\"\nsocks_url = \"127.0.0.1:45123\"\n",
        &["conflicts with network.proxy_url"],
    );
    let (status, _o, err) = run_to_exit(&["--http", "example.com:80"], None);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("usage error: --http"), "{err}");
}

#[test]
fn clamping_in_the_ready_line() {
    let p = ProxyProcess::start(&["--http", "0.0.0.0:0", "--admin", "0.0.0.0:0"], None);
    assert!(p.http.starts_with("127.0.0.1:"), "{}", p.http);
    assert!(p.admin_addr().starts_with("127.0.0.1:"));
    let p = ProxyProcess::start(&["--http", "[::]:0"], None);
    assert!(p.http.starts_with("[::1]:"), "{}", p.http);
    let p = ProxyProcess::start(
        &["--http", "0.0.0.0:0", "--admin", "0.0.0.0:0"],
        Some("[network]\ndangerously_allow_non_loopback_proxy = true\n"),
    );
    assert!(p.http.starts_with("0.0.0.0:"), "{}", p.http);
    assert!(
        p.admin_addr().starts_with("127.0.0.1:"),
        "admin is loopback even with the flag"
    );
    assert!(p.stderr_text().contains("DANGEROUS"), "{}", p.stderr_text());
}

#[test]
fn flags_override_file() {
    let cfg = "[network]\nmode = \"full\"\nenable_socks5 = false\nallowed_domains = [\"a.test\"]\n";
    let p = ProxyProcess::start(&["--mode", "limited", "--allow", "b.test"], Some(cfg));
    let r = portcullis_integration_tests::admin_get(p.admin_addr(), "/config");
    let c: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(c["network"]["mode"], "limited");
    let allowed = c["network"]["allowed_domains"].to_string();
    assert!(
        allowed.contains("a.test") && allowed.contains("b.test"),
        "{allowed}"
    );
    assert!(
        p.socks5.is_some(),
        "--socks5 enables a disabled SOCKS listener"
    );
    let (status, _o, err) = run_to_exit(&["--mode", "open"], None);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("--mode"), "{err}");
}

#[test]
fn random_bytes_config_never_panics() {
    // A bounded handful of hostile files; the library-level proptest covers many more.
    let cases: [&[u8]; 5] = [
        b"\xff\xfe\x00garbage",
        b"[[[[",
        b"network = 5",
        b"[network]\nallowed_domains = [\"\x01\"]",
        b"a = \"\\u0000\"",
    ];
    for bytes in cases {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, bytes).unwrap();
        let (status, _o, err) = run_to_exit(&["--config", f.to_str().unwrap()], None);
        assert_eq!(status.code(), Some(2), "{err}");
        assert!(err.contains("config error:"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
