//! policy.md tests 10, 12, 13, 14: resolution order, fail-closed lookups, anti-rebinding and
//! always-refused addresses, against a loopback test DNS server.

use portcullis_integration_tests::origin::{http_echo, http_echo_at};
use portcullis_integration_tests::raw::{connect, read_response};
use portcullis_integration_tests::{
    DnsServer, END_NO, PREFIX, ProxyProcess, RawResponse, blocked, raw_request,
};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};

const A: u16 = 1;

fn config(dns: &DnsServer, network: &str, limits: &str) -> String {
    format!(
        "[network]\ndns_servers = [\"{}\"]\n{network}\n[limits]\n{limits}\n",
        dns.addr_string()
    )
}

fn get(proxy: &ProxyProcess, authority: &str) -> RawResponse {
    let req = format!("GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    raw_request(&proxy.http, req.as_bytes()).expect("response")
}

fn connect_req(proxy: &ProxyProcess, authority: &str) -> RawResponse {
    let mut s = connect(&proxy.http);
    let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    read_response(&mut s).expect("response")
}

fn line1(r: &RawResponse) -> serde_json::Value {
    let first = r.text().lines().next().unwrap_or("").to_string();
    let json = first
        .strip_prefix("PORTCULLIS_POLICY_DECISION ")
        .unwrap_or_else(|| panic!("not a Decision body: {:?}", r.text()));
    serde_json::from_str(json).unwrap()
}

fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

#[test]
fn order_denied_and_not_allowlisted_names_cause_zero_queries() {
    let dns = DnsServer::start();
    dns.set("denied.test", &[ip(127, 0, 0, 2)]);
    dns.set("stranger.test", &[ip(127, 0, 0, 2)]);
    dns.set("listed.test", &[ip(127, 0, 0, 2)]);
    let proxy = ProxyProcess::start(
        &["--deny", "denied.test", "--allow", "listed.test"],
        Some(&config(&dns, "", "")),
    );
    assert_eq!(line1(&get(&proxy, "denied.test"))["reason"], "denied");
    assert_eq!(
        line1(&connect_req(&proxy, "denied.test:443"))["reason"],
        "denied"
    );
    assert_eq!(
        line1(&get(&proxy, "stranger.test"))["reason"],
        "not_allowed"
    );
    assert_eq!(
        line1(&connect_req(&proxy, "stranger.test:443"))["reason"],
        "not_allowed"
    );
    assert_eq!(dns.query_count("denied.test"), 0);
    assert_eq!(dns.query_count("stranger.test"), 0);
    // Allowlisted: exactly one lookup (one A query, at most one AAAA query).
    assert_eq!(
        line1(&get(&proxy, "listed.test"))["reason"],
        "not_allowed_local"
    );
    assert_eq!(dns.query_count_type("listed.test", A), 1);
    assert!(dns.query_count_type("listed.test", 28) <= 1);
}

#[test]
fn resolution_to_loopback_is_not_allowed_local_with_address() {
    let dns = DnsServer::start();
    dns.set("inside.test", &[ip(127, 0, 0, 2)]);
    let origin = http_echo("127.0.0.2");
    let authority = format!("inside.test:{}", origin.port());
    let proxy = ProxyProcess::start(&["--allow", "inside.test"], Some(&config(&dns, "", "")));
    let r = get(&proxy, &authority);
    assert_eq!(r.status, 403);
    let v = line1(&r);
    assert_eq!(v["reason"], "not_allowed_local");
    let b = blocked(proxy.admin_addr());
    assert_eq!(b["blocked"][0]["address"], "127.0.0.2");
    assert_eq!(origin.connections(), 0, "nothing dialled");
}

#[test]
fn resolution_timeout_is_not_allowed_local() {
    let dns = DnsServer::start();
    dns.set_drop("slow.test");
    let proxy = ProxyProcess::start(
        &["--allow", "slow.test"],
        Some(&config(&dns, "", "dns_timeout_ms = 200")),
    );
    let r = get(&proxy, "slow.test");
    assert_eq!(r.status, 403);
    assert_eq!(line1(&r)["reason"], "not_allowed_local");
    assert!(r.text().contains(&format!(
        "{PREFIX}slow.test could not be resolved (timed out), so its addresses cannot be checked. {END_NO}"
    )));
}

#[test]
fn resolution_nxdomain_is_not_allowed_local() {
    let dns = DnsServer::start();
    dns.set_nxdomain("gone.test");
    let proxy = ProxyProcess::start(&["--allow", "gone.test"], Some(&config(&dns, "", "")));
    for r in [
        get(&proxy, "gone.test"),
        connect_req(&proxy, "gone.test:443"),
    ] {
        assert_eq!(r.status, 403);
        assert_eq!(line1(&r)["reason"], "not_allowed_local");
        assert!(
            r.text().contains("gone.test could not be resolved ("),
            "{}",
            r.text()
        );
    }
}

#[test]
fn resolution_failures_with_local_binding_are_504_and_502() {
    let dns = DnsServer::start();
    dns.set_drop("slow.test");
    dns.set_nxdomain("gone.test");
    let proxy = ProxyProcess::start(
        &["--allow", "slow.test", "--allow", "gone.test"],
        Some(&config(
            &dns,
            "allow_local_binding = true",
            "dns_timeout_ms = 200",
        )),
    );
    let r = get(&proxy, "slow.test");
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.header("x-proxy-error"), Some("upstream-timeout"));
    let r = get(&proxy, "gone.test");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.header("x-proxy-error"), Some("upstream-connect-failed"));
    assert_eq!(blocked(proxy.admin_addr())["total"], 0);
}

#[test]
fn rebinding_one_lookup_dials_only_checked_address() {
    // Origins on the same port at 127.0.0.2 (first answer) and 127.0.0.1 (later answers).
    let mut pair = None;
    for _ in 0..20 {
        let second = http_echo("127.0.0.2");
        if let Ok(first) = http_echo_at("127.0.0.1", second.port()) {
            pair = Some((second, first));
            break;
        }
    }
    let (good, evil) = pair.expect("bind origins on 127.0.0.2 and 127.0.0.1 with one port");
    let dns = DnsServer::start();
    dns.set_sequence(
        "rebind.test",
        &[vec![ip(127, 0, 0, 2)], vec![ip(127, 0, 0, 1)]],
    );
    let proxy = ProxyProcess::start(
        &["--allow", "rebind.test", "--deny", "127.0.0.1/32"],
        Some(&config(&dns, "allow_local_binding = true", "")),
    );
    let r = get(&proxy, &format!("rebind.test:{}", good.port()));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        dns.query_count_type("rebind.test", A),
        1,
        "exactly one lookup"
    );
    assert_eq!(good.connections(), 1);
    assert_eq!(evil.connections(), 0, "the 127.0.0.1 origin sees nothing");
}

#[test]
fn always_refused_addresses_and_own_listeners() {
    let proxy = ProxyProcess::start(
        &["--allow", "*"],
        Some("[network]\nallow_local_binding = true\n"),
    );
    let http = proxy.http.clone();
    let admin = proxy.admin_addr().to_string();
    let targets = [
        ("0.0.0.0:80", "0.0.0.0:80"),
        ("[::]:80", "[::]:80"),
        ("224.0.0.1:80", "224.0.0.1:80"),
        ("255.255.255.255:80", "255.255.255.255:80"),
        (http.as_str(), http.as_str()),
        (admin.as_str(), admin.as_str()),
    ];
    for (authority, shown) in targets {
        for r in [get(&proxy, authority), connect_req(&proxy, authority)] {
            assert_eq!(r.status, 403, "{authority}: {}", r.text());
            assert_eq!(line1(&r)["reason"], "not_allowed_local", "{authority}");
            assert!(
                r.text().contains(&format!(
                    "{PREFIX}{shown} is a reserved address or this proxy itself. {END_NO}"
                )),
                "{authority}: {}",
                r.text()
            );
        }
    }
}

#[test]
fn local_names_and_literals_with_empty_allowlist() {
    let dns = DnsServer::start();
    let proxy = ProxyProcess::start(&[], Some(&config(&dns, "", "")));
    for authority in [
        "localhost:80",
        "127.0.0.1:80",
        "[::1]:80",
        "10.0.0.1:80",
        "169.254.169.254:80",
        "foo.localhost:80",
    ] {
        let r = get(&proxy, authority);
        assert_eq!(r.status, 403, "{authority}");
        assert_eq!(line1(&r)["reason"], "not_allowed_local", "{authority}");
    }
    assert_eq!(dns.total_queries(), 0, "localhost names never reach DNS");
}

#[test]
fn exact_localhost_entry_opens_only_that_name() {
    let origin = http_echo("127.0.0.1");
    let port = origin.port();
    let entry = format!("localhost:{port}");
    let proxy = ProxyProcess::start(&["--allow", &entry], None);
    let r = get(&proxy, &entry);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&proxy, &format!("127.0.0.1:{port}"));
    assert_eq!(r.status, 403);
    assert_eq!(line1(&r)["reason"], "not_allowed_local");
    assert_eq!(origin.requests().len(), 1);
}
