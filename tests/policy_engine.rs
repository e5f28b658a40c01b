//! Engine-level tests of policy.md "Tests that must exist" 4–9, 11, 12, 14 and the limited-mode
//! guards: nothing is dialled, no DNS; the name stage and the address stage are driven directly.

use std::net::{IpAddr, SocketAddr};

use portcullis::decision::{Origin, Protocol, Reason, ResolveFailure, Source, Verdict};
use portcullis::policy::{
    AddressPlan, CompiledPolicy, NameStage, PolicySpec, Proceed, Refusal, RequestContext,
    normalize_host,
};

fn policy(allow: &[&str], deny: &[&str], local: bool) -> CompiledPolicy {
    CompiledPolicy::compile(&PolicySpec {
        enabled: true,
        allow_local_binding: local,
        allowed: allow.iter().map(|s| s.to_string()).collect(),
        denied: deny.iter().map(|s| s.to_string()).collect(),
        ..PolicySpec::default()
    })
    .unwrap_or_else(|(_, i, e)| panic!("entry {i}: {e}"))
}

fn name_stage(p: &CompiledPolicy, host: &str, port: u16) -> NameStage {
    name_stage_with(p, host, port, Protocol::HttpsConnect, Some("CONNECT"), &[])
}

fn name_stage_with(
    p: &CompiledPolicy,
    host: &str,
    port: u16,
    protocol: Protocol,
    method: Option<&str>,
    own: &[SocketAddr],
) -> NameStage {
    let host = normalize_host(host).unwrap_or_else(|e| panic!("{host}: {e}"));
    let ctx = RequestContext {
        protocol,
        host: &host,
        port,
        method,
        upgrade: false,
        own_addrs: own,
    };
    p.check_name(&ctx)
}

fn reason(stage: &NameStage) -> String {
    match stage {
        NameStage::Refuse(r) => r.reason.as_str().to_string(),
        NameStage::Proceed(_) => "allow".into(),
    }
}

fn refusal(stage: NameStage) -> Refusal {
    match stage {
        NameStage::Refuse(r) => r,
        NameStage::Proceed(p) => panic!("expected a refusal, got {p:?}"),
    }
}

fn proceed(stage: NameStage) -> Proceed {
    match stage {
        NameStage::Proceed(p) => p,
        NameStage::Refuse(r) => panic!("expected to proceed, got {r:?}"),
    }
}

#[test]
fn wildcards_case_and_trailing_dots() {
    let p = policy(
        &[
            "*.example.com",
            "**.apex.test",
            "region*.v2.x.test",
            "api-?.q.test",
        ],
        &[],
        false,
    );
    for (host, want) in [
        ("example.com", "not_allowed"),
        ("a.example.com", "allow"),
        ("A.B.Example.COM.", "allow"),
        ("evilexample.com", "not_allowed"),
        ("example.com.evil.net", "not_allowed"),
        ("apex.test", "allow"),
        ("a.b.apex.test", "allow"),
        ("region.v2.x.test", "allow"),
        ("region1.v2.x.test", "allow"),
        ("xregion1.v2.x.test", "not_allowed"),
        ("a.region1.v2.x.test", "not_allowed"),
        ("api-1.q.test", "allow"),
        ("api-10.q.test", "not_allowed"),
    ] {
        assert_eq!(reason(&name_stage(&p, host, 443)), want, "{host}");
    }
    let p = policy(&["Example.COM."], &[], false);
    assert_eq!(reason(&name_stage(&p, "example.com", 443)), "allow");
}

#[test]
fn names_and_ips_are_separate() {
    let p = policy(&["*.example.com"], &[], false);
    assert_eq!(reason(&name_stage(&p, "[::1]", 443)), "not_allowed_local");
    let p = policy(&["*"], &[], false);
    assert_eq!(reason(&name_stage(&p, "8.8.8.8", 443)), "allow");
    assert_eq!(
        reason(&name_stage(&p, "127.0.0.1", 443)),
        "not_allowed_local"
    );
    assert_eq!(
        reason(&name_stage(&p, "203.0.113.7", 443)),
        "not_allowed_local"
    );
    let p = policy(&["8.8.8.8"], &[], false);
    assert_eq!(reason(&name_stage(&p, "dns.google", 443)), "not_allowed");
}

#[test]
fn ports() {
    let p = policy(&["api.example.com:443"], &[], false);
    assert_eq!(reason(&name_stage(&p, "api.example.com", 443)), "allow");
    assert_eq!(
        reason(&name_stage(&p, "api.example.com", 80)),
        "not_allowed"
    );
    let p = policy(&["example.com"], &["example.com:22"], false);
    assert_eq!(reason(&name_stage(&p, "example.com", 22)), "denied");
    assert_eq!(reason(&name_stage(&p, "example.com", 443)), "allow");
    let p = policy(&["*"], &["*:22"], false);
    assert_eq!(reason(&name_stage(&p, "anything.test", 22)), "denied");
    assert_eq!(reason(&name_stage(&p, "8.8.8.8", 22)), "denied");
}

#[test]
fn cidr_entries() {
    let p = policy(&["8.8.8.0/24"], &[], false);
    assert_eq!(reason(&name_stage(&p, "8.8.8.9", 443)), "allow");
    assert_eq!(reason(&name_stage(&p, "8.8.9.1", 443)), "not_allowed");
    let p = policy(&["10.0.0.0/8"], &[], false);
    assert_eq!(
        reason(&name_stage(&p, "10.1.2.3", 443)),
        "not_allowed_local"
    );
    let p = policy(&["10.0.0.0/8"], &[], true);
    assert_eq!(reason(&name_stage(&p, "10.1.2.3", 443)), "allow");
    // A deny CIDR also applies to resolved addresses.
    let p = policy(&["internal.test"], &["10.0.0.0/8"], true);
    let host = normalize_host("internal.test").unwrap();
    let ctx = RequestContext {
        protocol: Protocol::Http,
        host: &host,
        port: 80,
        method: Some("GET"),
        upgrade: false,
        own_addrs: &[],
    };
    let go = proceed(p.check_name(&ctx));
    assert_eq!(go.plan, AddressPlan::Resolve("internal.test".into()));
    let r = p
        .check_addresses(&ctx, &go, &["10.9.9.9".parse().unwrap()])
        .unwrap_err();
    assert_eq!(r.reason, Reason::Denied);
    assert_eq!(r.address, Some("10.9.9.9".parse().unwrap()));
    assert_eq!(r.rule.as_deref(), Some("10.0.0.0/8"));
}

#[test]
fn scoped_ipv6() {
    let p = policy(&["fe80::1"], &[], true);
    assert_eq!(reason(&name_stage(&p, "[fe80::1%eth0]", 443)), "allow");
    let p = policy(&["[fe80::1%25eth0]"], &[], true);
    assert_eq!(reason(&name_stage(&p, "[fe80::1%eth0]", 443)), "allow");
    assert_eq!(reason(&name_stage(&p, "[FE80::1%25eth0]", 443)), "allow");
    assert_eq!(
        reason(&name_stage(&p, "[fe80::1%eth1]", 443)),
        "not_allowed"
    );
    let p = policy(&["*"], &["[fe80::1%25eth0]"], true);
    assert_eq!(reason(&name_stage(&p, "[fe80::1%eth0]", 443)), "denied");
    assert_eq!(reason(&name_stage(&p, "[fe80::1%eth1]", 443)), "allow");
}

#[test]
fn deny_wins_and_rule_is_most_specific() {
    let p = policy(&["**.example.com"], &["api.example.com"], false);
    assert_eq!(reason(&name_stage(&p, "api.example.com", 443)), "denied");
    let p = policy(&["*"], &["bad.test"], false);
    let r = refusal(name_stage(&p, "bad.test", 443));
    assert_eq!(
        (r.reason, r.rule.as_deref()),
        (Reason::Denied, Some("bad.test"))
    );
    let p = policy(
        &[
            "*",
            "**.example.com",
            "*.a.example.com",
            "x.a.example.com",
            "x.a.example.com:443",
        ],
        &[],
        false,
    );
    let go = proceed(name_stage(&p, "x.a.example.com", 443));
    assert_eq!(go.rule.as_deref(), Some("x.a.example.com:443"));
    let go = proceed(name_stage(&p, "y.a.example.com", 443));
    assert_eq!(go.rule.as_deref(), Some("*.a.example.com"));
    let go = proceed(name_stage(&p, "other.test", 443));
    assert_eq!(go.rule.as_deref(), Some("*"));
}

#[test]
fn local_names_and_literals() {
    let p = policy(&[], &[], false);
    for host in [
        "localhost",
        "127.0.0.1",
        "[::1]",
        "10.0.0.1",
        "169.254.169.254",
        "foo.localhost",
    ] {
        let r = refusal(name_stage(&p, host, 8080));
        assert_eq!(r.reason, Reason::NotAllowedLocal, "{host}");
        assert_eq!(r.source, Source::BaselinePolicy);
    }
    let p = policy(&["localhost:8080"], &[], false);
    let go = proceed(name_stage(&p, "localhost", 8080));
    assert!(go.opened_local);
    assert_eq!(
        go.plan,
        AddressPlan::Addresses(vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()])
    );
    assert_eq!(
        reason(&name_stage(&p, "127.0.0.1", 8080)),
        "not_allowed_local"
    );
    assert_eq!(
        reason(&name_stage(&p, "localhost", 8081)),
        "not_allowed_local"
    );
}

#[test]
fn resolution_and_address_checks() {
    let p = policy(&["app.test"], &[], false);
    let host = normalize_host("app.test").unwrap();
    let ctx = RequestContext {
        protocol: Protocol::Http,
        host: &host,
        port: 80,
        method: Some("GET"),
        upgrade: false,
        own_addrs: &[],
    };
    let go = proceed(p.check_name(&ctx));
    let mixed: Vec<IpAddr> = vec!["8.8.8.8".parse().unwrap(), "10.0.0.1".parse().unwrap()];
    let r = p.check_addresses(&ctx, &go, &mixed).unwrap_err();
    assert_eq!(
        (r.reason, r.address),
        (Reason::NotAllowedLocal, Some("10.0.0.1".parse().unwrap()))
    );
    assert!(
        p.check_addresses(&ctx, &go, &["198.18.0.5".parse().unwrap()])
            .is_err()
    );
    assert!(
        p.check_addresses(&ctx, &go, &["8.8.8.8".parse().unwrap()])
            .is_ok()
    );
    let r = p
        .resolution_failed(&ctx, &go, ResolveFailure::TimedOut)
        .expect("fail closed");
    let d = r.into_decision(&ctx, "127.0.0.1:5000".parse().unwrap(), &origin());
    assert_eq!(d.reason, Reason::NotAllowedLocal);
    assert_eq!(
        d.message.as_deref(),
        Some(
            "Portcullis blocked this request: app.test could not be resolved (timed out), so its addresses cannot be checked. Approval is not possible; do not retry through another route."
        )
    );
    let lenient = policy(&["app.test"], &[], true);
    assert!(
        lenient
            .resolution_failed(&ctx, &go, ResolveFailure::NoAddresses)
            .is_none()
    );
    // NAT64: a deny CIDR covers the embedded IPv4 address.
    let p = policy(&["app.test"], &["169.254.0.0/16"], true);
    let go = proceed(p.check_name(&ctx));
    let r = p
        .check_addresses(&ctx, &go, &["64:ff9b::a9fe:a9fe".parse().unwrap()])
        .unwrap_err();
    assert_eq!(r.reason, Reason::Denied);
}

#[test]
fn always_refused_even_with_everything_open() {
    let p = policy(&["*"], &[], true);
    let own: [SocketAddr; 1] = ["127.0.0.1:3128".parse().unwrap()];
    for host in ["0.0.0.0", "[::]", "224.0.0.1", "255.255.255.255"] {
        let r = refusal(name_stage_with(
            &p,
            host,
            80,
            Protocol::Http,
            Some("GET"),
            &own,
        ));
        assert_eq!(r.reason, Reason::NotAllowedLocal, "{host}");
    }
    let r = refusal(name_stage_with(
        &p,
        "127.0.0.1",
        3128,
        Protocol::Http,
        Some("GET"),
        &own,
    ));
    assert_eq!(r.reason, Reason::NotAllowedLocal);
    assert_eq!(
        reason(&name_stage_with(
            &p,
            "127.0.0.1",
            3129,
            Protocol::Http,
            Some("GET"),
            &own
        )),
        "allow"
    );
}

#[test]
fn limited_mode_guards_and_proxy_disabled() {
    let limited = |mitm| {
        CompiledPolicy::compile(&PolicySpec {
            enabled: true,
            limited: true,
            mitm,
            allowed: vec!["*".into()],
            ..PolicySpec::default()
        })
        .unwrap()
    };
    let p = limited(false);
    for (protocol, method, port, want) in [
        (Protocol::Http, Some("GET"), 80, "allow"),
        (Protocol::Http, Some("HEAD"), 80, "allow"),
        (Protocol::Http, Some("POST"), 80, "method_not_allowed"),
        (Protocol::Http, Some("get"), 80, "method_not_allowed"),
        (
            Protocol::HttpsConnect,
            Some("CONNECT"),
            443,
            "mitm_required",
        ),
        (Protocol::Socks5Tcp, None, 22, "method_not_allowed"),
        (Protocol::Socks5Tcp, None, 443, "mitm_required"),
        (Protocol::Socks5Udp, None, 53, "method_not_allowed"),
    ] {
        let got = reason(&name_stage_with(
            &p,
            "api.test",
            port,
            protocol,
            method,
            &[],
        ));
        assert_eq!(got, want, "{protocol:?} {method:?} {port}");
    }
    let p = limited(true);
    assert_eq!(
        reason(&name_stage_with(
            &p,
            "api.test",
            443,
            Protocol::HttpsConnect,
            Some("CONNECT"),
            &[]
        )),
        "allow"
    );
    // Deny and local literals come before the mode guard.
    let p = CompiledPolicy::compile(&PolicySpec {
        enabled: true,
        limited: true,
        denied: vec!["bad.test".into()],
        ..PolicySpec::default()
    })
    .unwrap();
    assert_eq!(
        reason(&name_stage_with(
            &p,
            "bad.test",
            80,
            Protocol::Http,
            Some("POST"),
            &[]
        )),
        "denied"
    );
    let off = CompiledPolicy::compile(&PolicySpec {
        enabled: false,
        allowed: vec!["*".into()],
        ..PolicySpec::default()
    })
    .unwrap();
    let r = refusal(name_stage(&off, "api.test", 443));
    assert_eq!(
        (r.reason, r.source),
        (Reason::ProxyDisabled, Source::ProxyState)
    );
}

#[test]
fn decisions_built_from_outcomes() {
    let p = policy(&["ok.test"], &[], false);
    let host = normalize_host("nope.test").unwrap();
    let ctx = RequestContext {
        protocol: Protocol::HttpsConnect,
        host: &host,
        port: 443,
        method: Some("CONNECT"),
        upgrade: false,
        own_addrs: &[],
    };
    let d = refusal(p.check_name(&ctx)).into_decision(
        &ctx,
        "127.0.0.1:4000".parse().unwrap(),
        &origin(),
    );
    assert_eq!(
        (d.decision, d.reason.as_str(), d.source),
        (Verdict::Deny, "not_allowed", Source::BaselinePolicy)
    );
    assert_eq!(
        d.message.as_deref(),
        Some(
            "Portcullis blocked this request: nope.test:443 is not in the allowlist. Ask the operator to approve it; do not retry through another route."
        )
    );
    assert_eq!(d.client_port, Some(4000));
    let ok_host = normalize_host("ok.test").unwrap();
    let ctx = RequestContext {
        host: &ok_host,
        ..ctx
    };
    let go = proceed(p.check_name(&ctx));
    let d = go.allow_decision(&ctx, "127.0.0.1:4000".parse().unwrap(), &origin());
    assert_eq!(
        (d.decision, d.reason.as_str(), d.message.as_deref()),
        (Verdict::Allow, "allow", None)
    );
    assert_eq!(d.rule.as_deref(), Some("ok.test"));
}

fn origin() -> Origin {
    Origin {
        proxy_id: "px-0123456789ab".into(),
        session_id: "default".into(),
    }
}

#[test]
fn mitm_in_config_intercepts_limited_https_and_guards_inner_requests() {
    let config = |mitm: bool| {
        let mut c = portcullis::config::Config::from_toml_str(
            "[network]\nmode = \"limited\"\nallowed_domains = [\"*\"]\n",
            "test.toml",
        )
        .unwrap();
        c.network.mitm = mitm;
        CompiledPolicy::from_config(&c).unwrap()
    };
    let connect = |p: &CompiledPolicy, protocol, method, port| {
        reason(&name_stage_with(p, "api.test", port, protocol, method, &[]))
    };
    let off = config(false);
    assert_eq!(
        connect(&off, Protocol::HttpsConnect, Some("CONNECT"), 443),
        "mitm_required"
    );
    assert_eq!(
        connect(&off, Protocol::Socks5Tcp, None, 443),
        "mitm_required"
    );
    let on = config(true);
    // The outer CONNECT is intercepted, not refused.
    assert_eq!(
        connect(&on, Protocol::HttpsConnect, Some("CONNECT"), 443),
        "allow"
    );
    assert_eq!(connect(&on, Protocol::Socks5Tcp, None, 443), "allow");
    assert_eq!(
        connect(&on, Protocol::Socks5Tcp, None, 22),
        "method_not_allowed"
    );
    // Inner requests carry their method and are read-only in limited mode.
    for protocol in [Protocol::HttpsConnect, Protocol::Socks5Tcp] {
        for (method, want) in [
            ("GET", "allow"),
            ("HEAD", "allow"),
            ("OPTIONS", "allow"),
            ("POST", "method_not_allowed"),
            ("get", "method_not_allowed"),
            ("DELETE", "method_not_allowed"),
        ] {
            assert_eq!(
                connect(&on, protocol, Some(method), 443),
                want,
                "{protocol:?} {method}"
            );
        }
    }
}
