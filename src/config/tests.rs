//! Library-level tests of `config.md` "Tests that must exist" (numbers refer to that list).

use std::net::SocketAddr;
use std::path::PathBuf;

use proptest::prelude::*;
use serde_json::json;

use super::parse::{Field, LIMITS_KEYS, limits_field};
use super::*;

const P: &str = "/etc/portcullis.toml";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml_str(text, P)
}

fn err(text: &str) -> String {
    match parse(text) {
        Ok(c) => panic!("expected an error for {text:?}, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// Test normaliser standing in for the policy compiler: lower-case, one trailing dot removed.
fn simple_hook(_: PatternList, _: &str, p: &str) -> Result<String, String> {
    if p.contains("..") {
        return Err(format!("invalid pattern \"{p}\": empty label"));
    }
    let lower = p.to_ascii_lowercase();
    Ok(lower.strip_suffix('.').unwrap_or(&lower).to_string())
}

// 1.
#[test]
fn defaults_match_table() {
    let c = Config::default();
    let expected = json!({
        "state_dir": null,
        "network": {
            "enabled": true, "mode": "full",
            "allowed_domains": [], "denied_domains": [],
            "allow_unix_sockets": [], "deny_unix_sockets": [],
            "dangerously_allow_all_unix_sockets": false,
            "allow_local_binding": false,
            "enable_socks5": true, "enable_socks5_udp": true,
            "allow_upstream_proxy": true,
            "dangerously_allow_non_loopback_proxy": false,
            "proxy_url": "127.0.0.1:3128", "socks_url": "127.0.0.1:8081",
            "admin_url": "127.0.0.1:8080", "enable_admin": true,
            "admin_token_file": null, "mitm": false, "dns_servers": [],
            "socks_username": null, "socks_password_file": null
        },
        "limits": {
            "max_header_bytes": 65536, "max_headers": 100, "max_connections": 16384,
            "header_read_timeout_ms": 30000, "client_idle_timeout_ms": 60000,
            "connect_timeout_ms": 10000, "dns_timeout_ms": 2000,
            "response_header_timeout_ms": 300000, "tunnel_idle_timeout_ms": 3600000,
            "udp_idle_timeout_ms": 300000, "max_udp_associations": 1024,
            "max_udp_destinations": 1024, "blocked_log_size": 200,
            "max_pending_approvals": 4096, "shutdown_grace_ms": 10000
        },
        "mitm": {
            "ca_cert_file": null, "ca_key_file": null, "create_ca_files": false,
            "out_dir": null, "leaf_cache_size": 1024, "extra_upstream_ca_files": []
        },
        "control": {
            "endpoint": null, "token_file": null, "session_id": "default",
            "attach_timeout_secs": 10, "reconnect_initial_ms": 250,
            "reconnect_max_ms": 10000, "event_buffer": 4096,
            "listen": "127.0.0.1:50051", "unix_socket": null, "rules": null,
            "dangerously_allow_non_loopback": false, "watch_buffer": 1024
        },
        "approvals": {
            "enabled": true, "ask_timeout_secs": 60, "max_pending": 1024,
            "max_waiters_per_ask": 1024, "max_session_allows": 4096, "report_allows": false
        },
        "requirements": {
            "url": null, "token_file": null, "token_env": null, "ca_file": null,
            "timeout_secs": 15, "max_attempts": 5, "cache_file": null,
            "cache_max_age_secs": 900, "refresh_interval_secs": 900, "optional": false
        },
        "audit": {
            "exporter": null, "protocol": null, "endpoint": null, "headers": {},
            "timeout_ms": null, "ca_file": null, "max_queue_size": null,
            "max_export_batch_size": null, "scheduled_delay_ms": null,
            "shutdown_timeout_ms": 5000, "traces": null, "resource": {}
        }
    });
    assert_eq!(c.to_json(), expected);
    assert_eq!(
        c.requirements.token_env_name(),
        "PORTCULLIS_REQUIREMENTS_TOKEN"
    );
    let l = c.listeners();
    assert_eq!(l.http, sa("127.0.0.1:3128"));
    assert_eq!(l.socks5, Some(sa("127.0.0.1:8081")));
    assert_eq!(l.admin, Some(sa("127.0.0.1:8080")));
    assert!(l.warnings.is_empty());
}

#[test]
fn embedded_default_toml_equals_default() {
    let c = Config::embedded().expect("embedded defaults parse");
    assert_eq!(c, Config::default());
    assert_eq!(c.to_json(), Config::default().to_json());
}

// 2.
#[test]
fn empty_file_equals_defaults() {
    assert_eq!(parse("").expect("empty"), Config::default());
    assert_eq!(
        parse("# only a comment\n\n").expect("comment"),
        Config::default()
    );
}

#[test]
fn partial_network_table_fills_defaults() {
    let c = parse("[network]\nmode = \"limited\"\n").expect("parse");
    let mut want = Config::default();
    want.network.mode = Mode::Limited;
    assert_eq!(c, want);
}

// 3.
#[test]
fn unknown_key_names_key_position_and_hint() {
    let e = err("[network]\nalow_local_binding = true\n");
    assert!(e.contains("network.alow_local_binding"), "{e}");
    assert!(e.contains(&format!("{P}:2:1")), "{e}");
    assert!(e.contains("did you mean allow_local_binding"), "{e}");
    assert_eq!(
        e,
        format!(
            "config error: {P}:2:1: network.alow_local_binding: unknown key (did you mean allow_local_binding?)"
        )
    );
}

#[test]
fn unknown_table_rejected() {
    let e = err("[netwrk]\nmode = \"full\"\n");
    assert!(
        e.starts_with(&format!("config error: {P}:1:2: netwrk: unknown table")),
        "{e}"
    );
    assert!(e.contains("did you mean network?"), "{e}");
    // No hint when nothing is close.
    let e = err("[limits]\ncompletely_different = 1\n");
    assert!(
        e.ends_with("limits.completely_different: unknown key"),
        "{e}"
    );
    // Unknown keys in every table.
    for t in ["mitm", "control", "approvals", "requirements", "audit"] {
        let e = err(&format!("[{t}]\nbogus = 1\n"));
        assert!(e.contains(&format!("{t}.bogus: unknown key")), "{e}");
    }
    let e = err("stat_dir = \"/x\"\n");
    assert!(
        e.contains("stat_dir: unknown key (did you mean state_dir?)"),
        "{e}"
    );
}

#[test]
fn edit_distance_basics() {
    use super::parse::{edit_distance, suggest};
    assert_eq!(edit_distance("kitten", "sitting", 5), Some(3));
    assert_eq!(edit_distance("abc", "abc", 2), Some(0));
    assert_eq!(edit_distance("abc", "abcdef", 2), None);
    assert_eq!(suggest("mdoe", &["mode", "enabled"]), Some("mode"));
    assert_eq!(suggest("zzzzzz", &["mode", "enabled"]), None);
}

// 4.
#[test]
fn type_error_has_line_and_column() {
    let e = err("[network]\nenable_socks5 = \"yes\"\n");
    assert_eq!(
        e,
        format!(
            "config error: {P}:2:17: network.enable_socks5: expected a boolean, found a string"
        )
    );
    let e = err("[limits]\nmax_headers = 1.5\n");
    assert!(
        e.contains(":2:15: limits.max_headers: expected an integer, found a float"),
        "{e}"
    );
    let e = err("network = 3\n");
    assert!(
        e.contains(":1:11: network: expected a table, found an integer"),
        "{e}"
    );
    let e = err("[network]\nallowed_domains = \"a.com\"\n");
    assert!(
        e.contains("network.allowed_domains: expected an array, found a string"),
        "{e}"
    );
    let e = err("[network]\nallowed_domains = [\"a.com\", 3]\n");
    assert!(
        e.contains(":2:29: network.allowed_domains[1]: expected a string, found an integer"),
        "{e}"
    );
}

#[test]
fn syntax_error_has_line_and_column() {
    let e = err("[network]\nmode = \"full\n");
    assert!(e.starts_with(&format!("config error: {P}:2:")), "{e}");
    assert!(e.contains("invalid TOML"), "{e}");
    assert!(!e.contains('\n'), "{e}");
    let e = err("[network]\nmode = \"full\"\nmode = \"limited\"\n");
    assert!(e.starts_with(&format!("config error: {P}:3:")), "{e}");
}

// 4 (enums).
#[test]
fn enum_values_checked() {
    let e = err("[network]\nmode = \"readonly\"\n");
    assert!(
        e.ends_with("network.mode: expected \"full\" or \"limited\""),
        "{e}"
    );
    let e = err("[network.domains]\n\"a.com\" = \"maybe\"\n");
    assert!(
        e.contains(":2:11: network.domains.\"a.com\": expected \"allow\" or \"deny\""),
        "{e}"
    );
    let e = err("[network.domains]\n\"a.com\" = true\n");
    assert!(
        e.contains("expected \"allow\" or \"deny\", found a boolean"),
        "{e}"
    );
    let e = err("[audit]\nprotocol = \"http/json\"\n");
    assert!(
        e.contains("audit.protocol: http/json is not supported"),
        "{e}"
    );
    let e = err("[audit]\nexporter = \"jaeger\"\n");
    assert!(
        e.contains("audit.exporter: expected \"otlp\" or \"none\""),
        "{e}"
    );
}

// 5.
#[test]
fn list_and_map_forms_cannot_mix() {
    let e =
        err("[network]\nallowed_domains = [\"a.com\"]\n[network.domains]\n\"b.com\" = \"allow\"\n");
    assert_eq!(
        e,
        format!(
            "config error: {P}:2:1: network.allowed_domains: cannot be combined with network.domains; use one form"
        )
    );
    let e = err("[network]\ndenied_domains = []\n[network.domains]\n\"b.com\" = \"deny\"\n");
    assert!(
        e.contains("network.denied_domains: cannot be combined with network.domains"),
        "{e}"
    );
    // An empty list still counts, and so does an empty map.
    let e = err("[network]\nallowed_domains = []\ndomains = {}\n");
    assert!(
        e.contains("network.allowed_domains: cannot be combined with network.domains"),
        "{e}"
    );
    let e = err(
        "[network]\nallow_unix_sockets = []\n[network.unix_sockets]\n\"/a.sock\" = \"allow\"\n",
    );
    assert!(
        e.contains(
            "network.allow_unix_sockets: cannot be combined with network.unix_sockets; use one form"
        ),
        "{e}"
    );
}

#[test]
fn map_form_equivalent_to_lists() {
    let lists = parse(
        "[network]\nallowed_domains = [\"**.example.com\"]\ndenied_domains = [\"uploads.example.com\"]\n\
         allow_unix_sockets = [\"/run/a.sock\"]\n",
    )
    .expect("lists");
    let maps = parse(
        "[network.domains]\n\"**.example.com\" = \"allow\"\n\"uploads.example.com\" = \"deny\"\n\
         [network.unix_sockets]\n\"/run/a.sock\" = \"allow\"\n\"/run/b.sock\" = \"deny\"\n",
    )
    .expect("maps");
    let vals = |v: &[ListEntry]| v.iter().map(|e| e.value.clone()).collect::<Vec<_>>();
    assert_eq!(
        vals(&lists.network.allowed_domains),
        vals(&maps.network.allowed_domains)
    );
    assert_eq!(
        vals(&lists.network.denied_domains),
        vals(&maps.network.denied_domains)
    );
    assert_eq!(
        vals(&lists.network.allow_unix_sockets),
        vals(&maps.network.allow_unix_sockets)
    );
    assert_eq!(
        vals(&maps.network.deny_unix_sockets),
        vec!["/run/b.sock".to_string()]
    );
    assert_eq!(
        maps.network.denied_domains[0].key(),
        "network.domains.\"uploads.example.com\""
    );
    assert_eq!(
        lists.network.denied_domains[0].key(),
        "network.denied_domains[0]"
    );
    // JSON shows the list form either way.
    assert_eq!(
        lists.to_json()["network"]["allowed_domains"],
        maps.to_json()["network"]["allowed_domains"]
    );
}

// 6.
#[test]
fn map_duplicate_after_normalisation_deny_wins() {
    let c = parse("[network.domains]\n\"Example.com\" = \"allow\"\n\"example.com.\" = \"deny\"\n")
        .expect("parse");
    let l = c.validate_with(&simple_hook).expect("valid");
    assert!(l.allowed_domains.is_empty(), "{l:?}");
    assert_eq!(l.denied_domains.len(), 1);
    assert_eq!(l.denied_domains[0].normalized, "example.com");
    assert_eq!(l.warnings.len(), 1, "{l:?}");
    assert!(l.warnings[0].contains("\"Example.com\""), "{l:?}");
    assert!(l.warnings[0].contains("\"example.com.\""), "{l:?}");
    assert!(l.warnings[0].contains("deny wins"), "{l:?}");
}

#[test]
fn agreeing_duplicates_collapse_silently() {
    let c =
        parse("[network]\nallowed_domains = [\"A.com\", \"a.com.\", \"b.com\"]\n").expect("parse");
    let l = c.validate_with(&simple_hook).expect("valid");
    let n: Vec<_> = l
        .allowed_domains
        .iter()
        .map(|e| e.normalized.as_str())
        .collect();
    assert_eq!(n, ["a.com", "b.com"]);
    assert!(l.warnings.is_empty());
}

#[test]
fn hook_errors_are_attributed_to_the_key() {
    let c = parse("[network]\nallowed_domains = [\"a.com\",\n  \"a..b\"]\n").expect("parse");
    let e = c
        .validate_with(&simple_hook)
        .expect_err("invalid")
        .to_string();
    assert_eq!(
        e,
        format!(
            "config error: {P}:3:3: network.allowed_domains[1]: invalid pattern \"a..b\": empty label"
        )
    );
    let c = parse("[network.domains]\n\"x..y\" = \"deny\"\n").expect("parse");
    let e = c
        .validate_with(&simple_hook)
        .expect_err("invalid")
        .to_string();
    assert!(
        e.contains(":2:1: network.domains.\"x..y\": invalid pattern"),
        "{e}"
    );
    let mut c = Config::default();
    c.apply_proxy_overrides(&ProxyOverrides {
        deny: vec!["p..q".into()],
        ..Default::default()
    })
    .expect("flags");
    let e = c
        .validate_with(&simple_hook)
        .expect_err("invalid")
        .to_string();
    assert_eq!(
        e,
        "usage error: --deny: invalid pattern \"p..q\": empty label"
    );
}

#[test]
fn pattern_length_limit() {
    let long = "a".repeat(1001);
    let e = err(&format!("[network]\nallowed_domains = [\"{long}\"]\n"));
    assert!(
        e.contains("network.allowed_domains[0]: pattern is longer than 1000 characters"),
        "{e}"
    );
    let ok = "a".repeat(1000);
    parse(&format!("[network]\nallowed_domains = [\"{ok}\"]\n")).expect("1000 is fine");
}

// 7.
#[test]
fn deny_global_wildcard_rejected() {
    let e = err("[network]\ndenied_domains = [\"a.com\", \"*\"]\n");
    assert!(
        e.ends_with(
            "network.denied_domains[1]: the denylist cannot contain the global wildcard \"*\""
        ),
        "{e}"
    );
    let e = err("[network.domains]\n\"*\" = \"deny\"\n");
    assert!(
        e.contains("network.domains.\"*\": the denylist cannot contain"),
        "{e}"
    );
    parse("[network]\ndenied_domains = [\"*:22\"]\n").expect("*:22 is fine");
    let mut c = Config::default();
    let e = c
        .apply_proxy_overrides(&ProxyOverrides {
            deny: vec!["*".into()],
            ..Default::default()
        })
        .expect_err("flag");
    assert!(
        e.to_string()
            .starts_with("usage error: --deny: the denylist cannot contain")
    );
}

#[test]
fn allow_global_wildcard_accepted() {
    let c = parse("[network]\nallowed_domains = [\"*\"]\n").expect("parse");
    assert_eq!(c.network.allowed_domains[0].value, "*");
    parse("[network.domains]\n\"*\" = \"allow\"\n").expect("map");
}

// 8.
#[test]
fn relative_unix_socket_rejected() {
    let e = err("[network]\nallow_unix_sockets = [\"agent.sock\"]\n");
    assert_eq!(
        e,
        format!("config error: {P}:2:23: network.allow_unix_sockets[0]: must be an absolute path")
    );
    let e = err("[network.unix_sockets]\n\"rel.sock\" = \"allow\"\n");
    assert!(
        e.contains("network.unix_sockets.\"rel.sock\": must be an absolute path"),
        "{e}"
    );
    let long = format!("/{}", "a".repeat(103));
    let e = err(&format!("[network]\nallow_unix_sockets = [\"{long}\"]\n"));
    assert!(e.contains("must be at most 103 bytes"), "{e}");
    let e = err("[network]\nallow_unix_sockets = [\"/a\\u0000b\"]\n");
    assert!(e.contains("must not contain NUL"), "{e}");
    parse(&format!(
        "[network]\nallow_unix_sockets = [\"/{}\"]\n",
        "a".repeat(102)
    ))
    .expect("103 ok");
}

// 9.
#[test]
fn address_parser_table() {
    use ListenerKind::*;
    let ok = [
        ("127.0.0.1:8080", Http, "127.0.0.1:8080"),
        ("http://127.0.0.1:8080/", Http, "127.0.0.1:8080"),
        ("http://127.0.0.1:8080", Http, "127.0.0.1:8080"),
        ("HTTP://127.0.0.1:8080", Http, "127.0.0.1:8080"),
        ("[::1]:9999", Http, "[::1]:9999"),
        ("::1", Http, "[::1]:3128"),
        ("localhost", Http, "127.0.0.1:3128"),
        ("LocalHost.", Http, "127.0.0.1:3128"),
        ("localhost:1", Http, "127.0.0.1:1"),
        ("127.0.0.1:0", Http, "127.0.0.1:0"),
        ("  127.0.0.1  ", Http, "127.0.0.1:3128"),
        ("127.0.0.1", Socks5, "127.0.0.1:8081"),
        ("socks5://127.0.0.1", Socks5, "127.0.0.1:8081"),
        ("socks5h://[::1]:1080", Socks5, "[::1]:1080"),
        ("127.0.0.1", Admin, "127.0.0.1:8080"),
        ("[::]", Admin, "[::]:8080"),
        ("0.0.0.0:65535", Http, "0.0.0.0:65535"),
        ("127.0.0.1", Control, "127.0.0.1:50051"),
    ];
    for (input, kind, want) in ok {
        assert_eq!(parse_listener_addr(input, kind), Ok(sa(want)), "{input}");
    }
    let bad = [
        ("", Http),
        ("   ", Http),
        ("example.com:80", Http),
        ("user:pw@127.0.0.1:1", Http),
        ("127.0.0.1:99999", Http),
        ("127.0.0.1:x", Http),
        ("127.0.0.1:", Http),
        ("127.0.0.1:-1", Http),
        ("ftp://127.0.0.1:1", Http),
        ("http://127.0.0.1:1/path", Http),
        ("http://127.0.0.1:1/?q=1", Http),
        ("socks5://127.0.0.1", Http),
        ("https://127.0.0.1", Http),
        ("[::1", Http),
        ("[127.0.0.1]:1", Http),
        ("[::1]x", Http),
        ("127.1", Http),
        ("01.2.3.4", Http),
        ("http://", Http),
        ("fe80::1%eth0", Http),
    ];
    for (input, kind) in bad {
        assert!(
            parse_listener_addr(input, kind).is_err(),
            "{input:?} should be rejected"
        );
    }
    assert_eq!(
        parse_listener_addr("example.com:80", Http),
        Err("listener host must be an IP address or localhost".to_string())
    );
    // Through the file, with the key and position.
    let e = err("[network]\nproxy_url = \"example.com:80\"\n");
    assert_eq!(
        e,
        format!(
            "config error: {P}:2:13: network.proxy_url: listener host must be an IP address or localhost"
        )
    );
    let c = parse("[network]\nproxy_url = \"::1\"\nsocks_url = \"socks5://localhost:0\"\n")
        .expect("ok");
    assert_eq!(c.network.proxy_url, sa("[::1]:3128"));
    assert_eq!(c.network.socks_url, sa("127.0.0.1:0"));
}

// 10.
#[test]
fn clamping_pure_function() {
    let base = ListenerRequest {
        http: sa("0.0.0.0:0"),
        socks5: Some(sa("[::]:0")),
        admin: Some(sa("127.0.0.1:0")),
        dangerously_allow_non_loopback_proxy: false,
        unix_sockets_allowed: false,
    };
    let r = clamp_listeners(&base);
    assert_eq!(r.http, sa("127.0.0.1:0"));
    assert_eq!(r.socks5, Some(sa("[::1]:0")));
    assert_eq!(r.warnings.len(), 2);
    assert!(
        r.warnings
            .iter()
            .all(|w| w.contains("dangerously_allow_non_loopback_proxy")),
        "{r:?}"
    );

    let r = clamp_listeners(&ListenerRequest {
        dangerously_allow_non_loopback_proxy: true,
        ..base
    });
    assert_eq!(r.http, sa("0.0.0.0:0"));
    assert_eq!(r.socks5, Some(sa("[::]:0")));
    assert!(r.warnings.iter().all(|w| w.contains("DANGEROUS")), "{r:?}");
    assert_eq!(r.warnings.len(), 2);

    let r = clamp_listeners(&ListenerRequest {
        dangerously_allow_non_loopback_proxy: true,
        unix_sockets_allowed: true,
        ..base
    });
    assert_eq!(r.http, sa("127.0.0.1:0"));
    assert_eq!(r.socks5, Some(sa("[::1]:0")));
    assert!(
        r.warnings
            .iter()
            .all(|w| w.contains("remote clients must never reach local sockets"))
    );

    let r = clamp_listeners(&ListenerRequest {
        http: sa("127.0.0.1:0"),
        socks5: None,
        admin: Some(sa("0.0.0.0:8080")),
        dangerously_allow_non_loopback_proxy: true,
        unix_sockets_allowed: false,
    });
    assert_eq!(r.admin, Some(sa("127.0.0.1:8080")));
    assert_eq!(
        r.warnings,
        vec!["network.admin_url: admin API is loopback-only; binding 127.0.0.1:8080".to_string()]
    );
    let r = clamp_listeners(&ListenerRequest {
        admin: Some(sa("[::]:0")),
        ..base
    });
    assert_eq!(r.admin, Some(sa("[::1]:0")));

    // Through a config file, with the unix-socket list.
    let c = parse(
        "[network]\nproxy_url = \"0.0.0.0:0\"\ndangerously_allow_non_loopback_proxy = true\n\
         allow_unix_sockets = [\"/tmp/x.sock\"]\nadmin_url = \"0.0.0.0:0\"\n",
    )
    .expect("parse");
    let l = c.listeners();
    assert_eq!(l.http, sa("127.0.0.1:0"));
    assert_eq!(l.admin, Some(sa("127.0.0.1:0")));
    assert_eq!(l.socks5, Some(sa("127.0.0.1:8081")));

    let (a, w) = clamp_control_listener(sa("0.0.0.0:50051"), false);
    assert_eq!(a, sa("127.0.0.1:50051"));
    assert!(w.is_some_and(|w| w.contains("control.dangerously_allow_non_loopback")));
    let (a, w) = clamp_control_listener(sa("0.0.0.0:50051"), true);
    assert_eq!(a, sa("0.0.0.0:50051"));
    assert!(w.is_some_and(|w| w.contains("DANGEROUS")));
}

// 11.
#[test]
fn listener_port_conflict() {
    let e = err("[network]\nproxy_url = \"127.0.0.1:9000\"\nsocks_url = \"127.0.0.1:9000\"\n");
    assert_eq!(
        e,
        format!(
            "config error: {P}:3:13: network.socks_url: conflicts with network.proxy_url (127.0.0.1:9000)"
        )
    );
    let e = err("[network]\nadmin_url = \"127.0.0.1:3128\"\n");
    assert!(
        e.contains("network.admin_url: conflicts with network.proxy_url (127.0.0.1:3128)"),
        "{e}"
    );
    // Port 0, disabled listeners and different IPs do not conflict.
    parse("[network]\nproxy_url = \"127.0.0.1:0\"\nsocks_url = \"127.0.0.1:0\"\nadmin_url = \"127.0.0.1:0\"\n")
        .expect("ephemeral");
    parse("[network]\nsocks_url = \"127.0.0.1:3128\"\nenable_socks5 = false\n").expect("disabled");
    parse("[network]\nsocks_url = \"127.0.0.2:3128\"\n").expect("other ip");
    // After clamping: 0.0.0.0:3128 becomes 127.0.0.1:3128.
    let e = err("[network]\nsocks_url = \"0.0.0.0:3128\"\n");
    assert!(e.contains("conflicts with network.proxy_url"), "{e}");
    // A conflict caused by a flag is a usage error naming the flag.
    let mut c = Config::default();
    let e = c
        .apply_proxy_overrides(&ProxyOverrides {
            socks5: Some("127.0.0.1:3128".into()),
            ..Default::default()
        })
        .expect_err("conflict");
    assert_eq!(
        e.to_string(),
        "usage error: --socks5: conflicts with network.proxy_url (127.0.0.1:3128)"
    );
    assert!(listeners_conflict(sa("0.0.0.0:1"), sa("127.0.0.1:1")));
    assert!(!listeners_conflict(sa("0.0.0.0:1"), sa("[::1]:1")));
}

// 12.
#[test]
fn flags_override_file() {
    let mut c =
        parse("[network]\nmode = \"full\"\nallowed_domains = [\"a.com\"]\nenable_socks5 = false\n")
            .expect("parse");
    c.apply_proxy_overrides(&ProxyOverrides {
        mode: Some("limited".into()),
        allow: vec!["b.com".into()],
        deny: vec!["c.com".into()],
        socks5: Some("127.0.0.1:0".into()),
        http: Some("localhost:0".into()),
        admin: Some("[::1]:0".into()),
        control: Some("unix:///run/portcullis/control.sock".into()),
        control_token_file: Some(PathBuf::from("/tmp/tok")),
        session_id: Some("s-1".into()),
        control_timeout: Some("30".into()),
        mitm_dir: Some(PathBuf::from("/tmp/mitm")),
    })
    .expect("flags");
    assert_eq!(c.network.mode, Mode::Limited);
    let allowed: Vec<_> = c
        .network
        .allowed_domains
        .iter()
        .map(|e| e.value.as_str())
        .collect();
    assert_eq!(allowed, ["a.com", "b.com"]);
    assert_eq!(c.network.allowed_domains[1].key(), "--allow");
    assert_eq!(c.network.denied_domains[0].key(), "--deny");
    assert!(c.network.enable_socks5);
    assert_eq!(c.network.socks_url, sa("127.0.0.1:0"));
    assert_eq!(c.network.proxy_url, sa("127.0.0.1:0"));
    assert_eq!(c.network.admin_url, sa("[::1]:0"));
    assert_eq!(
        c.control.endpoint,
        Some(ControlEndpoint::Unix(PathBuf::from(
            "/run/portcullis/control.sock"
        )))
    );
    assert_eq!(c.control.token_file, Some(PathBuf::from("/tmp/tok")));
    assert_eq!(c.control.session_id, "s-1");
    assert_eq!(c.control.attach_timeout_secs, 30);
    assert_eq!(c.mitm.out_dir, Some(PathBuf::from("/tmp/mitm")));

    // --allow also adds to the map form.
    let mut c = parse("[network.domains]\n\"a.com\" = \"allow\"\n").expect("parse");
    c.apply_proxy_overrides(&ProxyOverrides {
        allow: vec!["b.com".into()],
        ..Default::default()
    })
    .expect("flags");
    assert_eq!(c.network.allowed_domains.len(), 2);
}

#[test]
fn bad_flag_value_names_flag() {
    let cases: Vec<(ProxyOverrides, &str)> = vec![
        (
            ProxyOverrides {
                http: Some("example.com:80".into()),
                ..Default::default()
            },
            "usage error: --http: listener host must be an IP address or localhost",
        ),
        (
            ProxyOverrides {
                socks5: Some("ftp://1.2.3.4".into()),
                ..Default::default()
            },
            "usage error: --socks5: unsupported scheme",
        ),
        (
            ProxyOverrides {
                admin: Some("".into()),
                ..Default::default()
            },
            "usage error: --admin: ",
        ),
        (
            ProxyOverrides {
                mode: Some("Full".into()),
                ..Default::default()
            },
            "usage error: --mode: expected \"full\" or \"limited\"",
        ),
        (
            ProxyOverrides {
                control: Some("https://x:1".into()),
                ..Default::default()
            },
            "usage error: --control: expected http://HOST:PORT or unix:/absolute/path",
        ),
        (
            ProxyOverrides {
                session_id: Some("-bad".into()),
                ..Default::default()
            },
            "usage error: --session-id: must match",
        ),
        (
            ProxyOverrides {
                control_timeout: Some("0".into()),
                ..Default::default()
            },
            "usage error: --control-timeout: must be between 1 and 600",
        ),
        (
            ProxyOverrides {
                control_timeout: Some("601".into()),
                ..Default::default()
            },
            "usage error: --control-timeout: must be between 1 and 600",
        ),
        (
            ProxyOverrides {
                control_timeout: Some("ten".into()),
                ..Default::default()
            },
            "usage error: --control-timeout: must be between 1 and 600",
        ),
        (
            ProxyOverrides {
                mitm_dir: Some(PathBuf::new()),
                ..Default::default()
            },
            "usage error: --mitm-dir: must not be empty",
        ),
        (
            ProxyOverrides {
                allow: vec!["x".repeat(1001)],
                ..Default::default()
            },
            "usage error: --allow: pattern is longer than 1000 characters",
        ),
    ];
    for (o, want) in cases {
        let mut c = Config::default();
        let e = c
            .apply_proxy_overrides(&o)
            .expect_err("bad flag")
            .to_string();
        assert!(e.starts_with(want), "{e} should start with {want}");
        assert!(matches!(
            c.apply_proxy_overrides(&o),
            Err(SettingsError::Usage(_))
        ));
    }
}

// 13.
#[test]
fn limits_out_of_range() {
    for key in LIMITS_KEYS {
        let mut l = LimitsConfig::default();
        let Some(Field::Int(_, range)) = limits_field(&mut l, key) else {
            panic!("{key} is an integer field");
        };
        // In range at both ends.
        for ok in [range.min, range.max] {
            let c = parse(&format!("[limits]\n{key} = {ok}\n")).expect("in range");
            assert_eq!(c.to_json()["limits"][key], json!(ok), "{key}");
        }
        if range.zero_ok {
            parse(&format!("[limits]\n{key} = 0\n")).expect("0 allowed");
        }
        let mut bad = vec![range.max + 1, u64::MAX];
        if range.min > 0 && !(range.zero_ok && range.min == 1) {
            bad.push(range.min - 1);
        }
        if range.min > 1 && range.zero_ok {
            bad.push(1);
        }
        for b in bad {
            let e = err(&format!("[limits]\n{key} = {b}\n"));
            assert!(e.starts_with(&format!("config error: {P}:2:")), "{e}");
            assert!(
                e.contains(&format!("limits.{key}: {}", range.message())),
                "{e}"
            );
        }
        let e = err(&format!("[limits]\n{key} = -1\n"));
        assert!(e.contains(&format!("limits.{key}: must be")), "{e}");
    }
    let e = err("[limits]\ndns_timeout_ms = 99\n");
    assert!(
        e.ends_with("limits.dns_timeout_ms: must be between 100 and 60000"),
        "{e}"
    );
    let e = err("[limits]\nresponse_header_timeout_ms = 999\n");
    assert!(e.ends_with("must be 0 or between 1000 and 86400000"), "{e}");
    // Other radixes and underscores.
    let c = parse("[limits]\nmax_headers = 0x10\nmax_connections = 1_000\n").expect("radix");
    assert_eq!(c.limits.max_headers, 16);
    assert_eq!(c.limits.max_connections, 1000);
}

#[test]
fn other_tables_ranges() {
    let cases = [
        (
            "[mitm]\nleaf_cache_size = 0\n",
            "mitm.leaf_cache_size: must be between 1 and 100000",
        ),
        (
            "[control]\nattach_timeout_secs = 601\n",
            "control.attach_timeout_secs: must be between 1 and 600",
        ),
        (
            "[control]\nreconnect_initial_ms = 9\n",
            "control.reconnect_initial_ms: must be between 10 and 60000",
        ),
        (
            "[control]\nreconnect_max_ms = 600001\n",
            "control.reconnect_max_ms: must be between 10 and 600000",
        ),
        (
            "[control]\nreconnect_initial_ms = 5000\nreconnect_max_ms = 4000\n",
            "control.reconnect_max_ms: must be at least control.reconnect_initial_ms (5000)",
        ),
        (
            "[control]\nevent_buffer = 15\n",
            "control.event_buffer: must be between 16 and 1000000",
        ),
        (
            "[control]\nwatch_buffer = 0\n",
            "control.watch_buffer: must be between 1 and 1000000",
        ),
        (
            "[approvals]\nask_timeout_secs = 3601\n",
            "approvals.ask_timeout_secs: must be between 1 and 3600",
        ),
        (
            "[approvals]\nmax_pending = 0\n",
            "approvals.max_pending: must be between 1 and 1000000",
        ),
        (
            "[approvals]\nmax_waiters_per_ask = 1000001\n",
            "approvals.max_waiters_per_ask: must be between 1 and 1000000",
        ),
        (
            "[approvals]\nmax_session_allows = 0\n",
            "approvals.max_session_allows: must be between 1 and 1000000",
        ),
        (
            "[requirements]\ntimeout_secs = 301\n",
            "requirements.timeout_secs: must be between 1 and 300",
        ),
        (
            "[requirements]\nmax_attempts = 11\n",
            "requirements.max_attempts: must be between 1 and 10",
        ),
        (
            "[requirements]\nrefresh_interval_secs = 0\n",
            "requirements.refresh_interval_secs: must be between 1 and 86400",
        ),
        (
            "[requirements]\ncache_max_age_secs = -1\n",
            "requirements.cache_max_age_secs: must be between 0 and 31536000",
        ),
        (
            "[audit]\ntimeout_ms = 0\n",
            "audit.timeout_ms: must be between 1 and 600000",
        ),
        (
            "[audit]\nmax_queue_size = 0\n",
            "audit.max_queue_size: must be between 1 and 1000000",
        ),
        (
            "[audit]\nmax_queue_size = 8\nmax_export_batch_size = 9\n",
            "audit.max_export_batch_size: must not exceed audit.max_queue_size (8)",
        ),
        (
            "[audit]\nscheduled_delay_ms = 0\n",
            "audit.scheduled_delay_ms: must be between 1 and 600000",
        ),
        (
            "[audit]\nshutdown_timeout_ms = 600001\n",
            "audit.shutdown_timeout_ms: must be between 0 and 600000",
        ),
    ];
    for (text, want) in cases {
        let e = err(text);
        assert!(e.ends_with(want), "{e} should end with {want}");
    }
}

// Rules 13–16 and the other tables' string keys.
#[test]
fn pairs_must_be_set_together() {
    let e = err("[mitm]\nca_cert_file = \"/ca.pem\"\n");
    assert_eq!(
        e,
        format!("config error: {P}:2:16: mitm.ca_cert_file: set together with mitm.ca_key_file")
    );
    let e = err("[mitm]\nca_key_file = \"/ca.key\"\n");
    assert!(
        e.ends_with("mitm.ca_key_file: set together with mitm.ca_cert_file"),
        "{e}"
    );
    let e = err("[network]\nsocks_username = \"u\"\n");
    assert!(
        e.ends_with("network.socks_username: set together with network.socks_password_file"),
        "{e}"
    );
    let e = err("[network]\nsocks_password_file = \"/p\"\n");
    assert!(
        e.ends_with("network.socks_password_file: set together with network.socks_username"),
        "{e}"
    );
    parse("[mitm]\nca_cert_file = \"/ca.pem\"\nca_key_file = \"/ca.key\"\n").expect("pair");
    parse("[network]\nsocks_username = \"u\"\nsocks_password_file = \"/p\"\n").expect("pair");
}

#[test]
fn socks_username_length() {
    let e = err("[network]\nsocks_username = \"\"\nsocks_password_file = \"/p\"\n");
    assert!(
        e.ends_with("network.socks_username: must be 1 to 255 bytes"),
        "{e}"
    );
    let long = "é".repeat(128); // 256 bytes
    let e = err(&format!(
        "[network]\nsocks_username = \"{long}\"\nsocks_password_file = \"/p\"\n"
    ));
    assert!(e.ends_with("must be 1 to 255 bytes"), "{e}");
    let ok = "u".repeat(255);
    parse(&format!(
        "[network]\nsocks_username = \"{ok}\"\nsocks_password_file = \"/p\"\n"
    ))
    .expect("255");
}

#[test]
fn dns_servers_literals() {
    let c = parse("[network]\ndns_servers = [\"1.1.1.1\", \"9.9.9.9:5353\", \"::1\", \"[2001:db8::1]:53\", \"[::2]\"]\n")
        .expect("parse");
    let want: Vec<SocketAddr> = [
        "1.1.1.1:53",
        "9.9.9.9:5353",
        "[::1]:53",
        "[2001:db8::1]:53",
        "[::2]:53",
    ]
    .iter()
    .map(|s| sa(s))
    .collect();
    assert_eq!(c.network.dns_servers, want);
    for bad in [
        "dns.google",
        "1.1.1.1:0",
        "1.1.1.1:65536",
        "",
        "1.1.1.1:x",
        "[::1]:",
    ] {
        let e = err(&format!("[network]\ndns_servers = [\"{bad}\"]\n"));
        assert!(
            e.contains("network.dns_servers[0]: expected IP or IP:port"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn control_endpoint_forms() {
    let c = parse("[control]\nendpoint = \"http://127.0.0.1:50051\"\n").expect("http");
    assert_eq!(
        c.control.endpoint,
        Some(ControlEndpoint::Http {
            host: "127.0.0.1".into(),
            port: 50051
        })
    );
    let c = parse("[control]\nendpoint = \"http://[::1]:1/\"\n").expect("http v6");
    assert_eq!(
        c.control.endpoint.as_ref().map(|e| e.to_string()),
        Some("http://[::1]:1".to_string())
    );
    let c = parse("[control]\nendpoint = \"unix:/run/c.sock\"\n").expect("unix");
    assert_eq!(
        c.control.endpoint,
        Some(ControlEndpoint::Unix("/run/c.sock".into()))
    );
    let c = parse("[control]\nendpoint = \"unix:///run/c.sock\"\n").expect("unix3");
    assert_eq!(
        c.control.endpoint,
        Some(ControlEndpoint::Unix("/run/c.sock".into()))
    );
    assert_eq!(
        c.to_json()["control"]["endpoint"],
        json!("unix:/run/c.sock")
    );
    for bad in [
        "https://127.0.0.1:1",
        "http://127.0.0.1",
        "http://127.0.0.1:0",
        "http://h:1/x",
        "http://u@h:1",
        "unix:rel.sock",
        "unix://host/x",
        "grpc://h:1",
        "",
        "http://:1",
    ] {
        let e = err(&format!("[control]\nendpoint = \"{bad}\"\n"));
        assert!(e.contains("control.endpoint: "), "{bad}: {e}");
    }
    let e = err("[control]\nendpoint = \"https://x:1\"\n");
    assert!(
        e.ends_with("control.endpoint: expected http://HOST:PORT or unix:/absolute/path"),
        "{e}"
    );
}

#[test]
fn session_id_and_control_keys() {
    parse("[control]\nsession_id = \"a\"\n").expect("one char");
    parse(&format!(
        "[control]\nsession_id = \"a{}\"\n",
        "b".repeat(127)
    ))
    .expect("128");
    for bad in [
        "",
        "-a",
        ".a",
        "a b",
        "a/b",
        &format!("a{}", "b".repeat(128)),
    ] {
        let e = err(&format!("[control]\nsession_id = \"{bad}\"\n"));
        assert!(e.contains("control.session_id: must match"), "{bad}: {e}");
    }
    let c = parse(
        "[control]\nlisten = \"0.0.0.0:0\"\nunix_socket = \"/run/p/c.sock\"\nrules = \"r.rules\"\n\
         dangerously_allow_non_loopback = true\ntoken_file = \"/t\"\n",
    )
    .expect("control");
    assert_eq!(c.control.listen, sa("0.0.0.0:0"));
    assert_eq!(c.rules_file().expect("rules"), PathBuf::from("r.rules"));
    assert_eq!(c.control_token_file().expect("token"), PathBuf::from("/t"));
    let e = err("[control]\nunix_socket = \"c.sock\"\n");
    assert!(
        e.ends_with("control.unix_socket: must be an absolute path"),
        "{e}"
    );
}

#[test]
fn requirements_keys() {
    let c = parse("[requirements]\nurl = \"https://req.example.com/p\"\ntoken_env = \"MY_TOKEN\"\noptional = true\n")
        .expect("req");
    assert_eq!(c.requirements.token_env_name(), "MY_TOKEN");
    assert!(
        c.check_environment(&|_| None)
            .is_err_and(|e| e.to_string().ends_with(
                "requirements.token_env: requirements.token_env names MY_TOKEN, which is not set"
            ))
    );
    assert!(c.check_environment(&|_| Some("x".into())).is_ok());
    for bad in [
        "http://req.example.com",
        "https://",
        "https://u:p@h/",
        "https://h:0/",
        "req.example.com",
    ] {
        let e = err(&format!("[requirements]\nurl = \"{bad}\"\n"));
        assert!(e.contains("requirements.url: "), "{bad}: {e}");
    }
    let e = err("[requirements]\ntoken_file = \"/t\"\ntoken_env = \"X\"\n");
    assert!(
        e.ends_with(
            "requirements.token_env: cannot be combined with requirements.token_file; set one"
        ),
        "{e}"
    );
}

#[test]
fn audit_keys_and_redaction() {
    let c = parse(
        "[audit]\nexporter = \"otlp\"\nprotocol = \"http/protobuf\"\nendpoint = \"https://otel:4318/v1/logs\"\n\
         traces = true\n[audit.headers]\nauthorization = \"Bearer secret\"\n[audit.resource]\n\"user.id\" = \"u1\"\n",
    )
    .expect("audit");
    assert_eq!(c.audit.protocol, Some(AuditProtocol::HttpProtobuf));
    assert_eq!(
        c.audit.headers.get("authorization").map(String::as_str),
        Some("Bearer secret")
    );
    let j = c.to_json();
    assert_eq!(j["audit"]["headers"]["authorization"], json!("<redacted>"));
    assert_eq!(j["audit"]["protocol"], json!("http/protobuf"));
    assert_eq!(j["audit"]["resource"]["user.id"], json!("u1"));
    assert!(!j.to_string().contains("secret"));
    let e = err("[audit]\nendpoint = \"localhost:4317\"\n");
    assert!(e.contains("audit.endpoint: "), "{e}");
    let e = err("[audit.headers]\n\"bad name\" = \"x\"\n");
    assert!(
        e.contains("audit.headers.\"bad name\": invalid header name"),
        "{e}"
    );
    let e = err("[audit.headers]\nx = 1\n");
    assert!(
        e.contains("audit.headers.x: expected a string, found an integer"),
        "{e}"
    );
}

#[test]
fn state_dir_resolution() {
    let c = Config::default();
    let env = |xdg: Option<&'static str>, home: Option<&'static str>| {
        move |v: &str| -> Option<PathBuf> {
            match v {
                "XDG_STATE_HOME" => xdg.map(PathBuf::from),
                "HOME" => home.map(PathBuf::from),
                _ => None,
            }
        }
    };
    assert_eq!(
        c.state_dir_from(&env(Some("/x"), Some("/h"))).expect("xdg"),
        PathBuf::from("/x/portcullis")
    );
    assert_eq!(
        c.state_dir_from(&env(None, Some("/h"))).expect("home"),
        PathBuf::from("/h/.local/state/portcullis")
    );
    assert_eq!(
        c.state_dir_from(&env(Some(""), Some("/h")))
            .expect("empty xdg"),
        PathBuf::from("/h/.local/state/portcullis")
    );
    let e = c
        .state_dir_from(&env(None, None))
        .expect_err("none")
        .to_string();
    assert!(
        e.starts_with("config error: <embedded defaults>: state_dir: "),
        "{e}"
    );
    let c = parse("state_dir = \"/var/lib/p\"\n").expect("explicit");
    assert_eq!(
        c.state_dir_from(&env(None, None)).expect("explicit"),
        PathBuf::from("/var/lib/p")
    );
}

#[test]
fn reload_check_names_first_immutable_key() {
    let old = Config::default();
    let same = parse("[network]\nallowed_domains = [\"a.com\"]\nmode = \"limited\"\n[limits]\nmax_headers = 50\n")
        .expect("parse");
    assert_eq!(Config::reload_check(&old, &same), Ok(()));
    let new = parse("[network]\nproxy_url = \"127.0.0.1:3129\"\n").expect("parse");
    assert_eq!(
        Config::reload_check(&old, &new),
        Err("network.proxy_url cannot change on a running proxy; restart it".to_string())
    );
    let new = parse("[mitm]\nleaf_cache_size = 5\n").expect("parse");
    assert_eq!(
        Config::reload_check(&old, &new),
        Err("mitm.leaf_cache_size cannot change on a running proxy; restart it".to_string())
    );
    let new = parse("[control]\nsession_id = \"x\"\n").expect("parse");
    assert!(Config::reload_check(&old, &new).is_err_and(|e| e.starts_with("control.session_id ")));
    let new = parse("[audit]\ntraces = true\n").expect("parse");
    assert!(Config::reload_check(&old, &new).is_err_and(|e| e.starts_with("audit.traces ")));
    // Unix sockets added while a listener is non-loopback.
    let old = parse(
        "[network]\nproxy_url = \"0.0.0.0:3128\"\ndangerously_allow_non_loopback_proxy = true\n",
    )
    .expect("parse");
    let new = parse(
        "[network]\nproxy_url = \"0.0.0.0:3128\"\ndangerously_allow_non_loopback_proxy = true\n\
         allow_unix_sockets = [\"/a.sock\"]\n",
    )
    .expect("parse");
    assert!(
        Config::reload_check(&old, &new)
            .is_err_and(|e| e.starts_with("network.allow_unix_sockets "))
    );
}

#[test]
fn load_reads_files() {
    let dir = std::env::temp_dir().join(format!("portcullis-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let missing = dir.join("missing.toml");
    let e = Config::load(&missing).expect_err("missing").to_string();
    assert_eq!(
        e,
        format!(
            "config error: {}: cannot read config file: No such file or directory",
            missing.display()
        )
    );
    let e = Config::load(&dir).expect_err("dir").to_string();
    assert!(e.contains("cannot read config file"), "{e}");
    let f = dir.join("c.toml");
    std::fs::write(&f, "[network]\nmode = \"limited\"\n").expect("write");
    assert_eq!(Config::load(&f).expect("load").network.mode, Mode::Limited);
    std::fs::write(&f, b"[network]\nmode = \"\xff\"\n").expect("write");
    let e = Config::load(&f).expect_err("utf8").to_string();
    assert!(e.contains(":2:9: config file is not valid UTF-8"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn messages_stay_on_one_line() {
    let e = err("[network]\n\"evil\\nkey\\u001b[31m\" = 1\n");
    assert!(!e.contains('\n') && !e.contains('\u{1b}'), "{e}");
    assert!(e.contains("network.\"evil\\nkey"), "{e}");
}

// 18.
fn toml_fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("[network]\n".to_string()),
        Just("[network.domains]\n".to_string()),
        Just("[limits]\n".to_string()),
        Just("[control]\n".to_string()),
        Just("[audit.headers]\n".to_string()),
        Just("mode = \"limited\"\n".to_string()),
        Just("allowed_domains = [\"a.com\", \"*\"]\n".to_string()),
        Just("denied_domains = [\"*\"]\n".to_string()),
        Just("\"x.com\" = \"deny\"\n".to_string()),
        Just("proxy_url = \"0.0.0.0:0\"\n".to_string()),
        Just("max_headers = 99999999999999999999999\n".to_string()),
        Just("endpoint = \"unix:///a\"\n".to_string()),
        "[a-z_]{1,12} = [0-9]{1,6}\n",
        "[a-z_.\\[\\]\"=, \n]{0,40}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Err(e) = Config::from_toml_bytes(&bytes, "f.toml") {
            let s = e.to_string();
            prop_assert!(s.starts_with("config error: f.toml"), "{}", s);
            prop_assert!(!s.contains('\n'));
        }
    }

    #[test]
    fn random_toml_never_panics(parts in proptest::collection::vec(toml_fragment(), 0..12)) {
        let text = parts.concat();
        match Config::from_toml_str(&text, "f.toml") {
            Err(e) => {
                let s = e.to_string();
                prop_assert!(s.starts_with("config error: f.toml"), "{}", s);
                prop_assert!(!s.contains('\n'));
            }
            Ok(c) => {
                let _ = c.validate_with(&simple_hook);
                let _ = c.listeners();
                let _ = c.to_json();
            }
        }
    }

    #[test]
    fn address_parser_never_panics(s in "\\PC{0,40}") {
        for k in [ListenerKind::Http, ListenerKind::Socks5, ListenerKind::Admin] {
            let _ = parse_listener_addr(&s, k);
        }
        let _ = check_control_endpoint(&s);
        let _ = check_dns_server(&s);
    }
}
