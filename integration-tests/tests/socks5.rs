//! decisions.md test 9 (SOCKS5 reply codes) and SOCKS5 CONNECT through curl.

use portcullis_integration_tests::origin::{http_echo, tcp_echo};
use portcullis_integration_tests::raw::connect;
use portcullis_integration_tests::{DnsServer, ProxyProcess, blocked, curl};
use std::io::{Read, Write};
use std::net::TcpStream;

/// Greeting (no auth) then a request; returns the reply's REP byte (None if closed early).
fn socks_request(addr: &str, request: &[u8]) -> (TcpStream, Option<u8>) {
    let mut s = connect(addr);
    s.write_all(&[5, 1, 0]).unwrap();
    let mut g = [0u8; 2];
    s.read_exact(&mut g).unwrap();
    assert_eq!(g, [5, 0], "greeting answer");
    s.write_all(request).unwrap();
    let mut head = [0u8; 4];
    if s.read_exact(&mut head).is_err() {
        return (s, None);
    }
    assert_eq!(head[0], 5);
    // Consume BND.ADDR and BND.PORT.
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        _ => 0,
    };
    let mut tail = vec![0u8; rest];
    let _ = s.read_exact(&mut tail);
    (s, Some(head[1]))
}

fn domain_connect(cmd: u8, name: &str, port: u16) -> Vec<u8> {
    let mut r = vec![5, cmd, 0, 3, name.len() as u8];
    r.extend_from_slice(name.as_bytes());
    r.extend_from_slice(&port.to_be_bytes());
    r
}

#[test]
fn socks_denied_host_via_curl_is_rep_2_with_blocked_entry() {
    let proxy = ProxyProcess::start(&["--allow", "*", "--deny", "bad.test"], None);
    let socks = format!("socks5h://{}", proxy.socks5_addr());
    let r = curl(&["-x", &socks, "http://bad.test/"]);
    assert_ne!(r.exit_code, 0);
    assert!(r.stderr.contains("SOCKS"), "curl stderr: {}", r.stderr);
    let b = blocked(proxy.admin_addr());
    let e = &b["blocked"][0];
    assert_eq!(e["protocol"], "socks5_tcp");
    assert_eq!(e["reason"], "denied");
    assert_eq!(e["host"], "bad.test");
    assert_eq!(e["method"], serde_json::Value::Null);
    // Wire view: REP 0x02.
    let (_s, rep) = socks_request(proxy.socks5_addr(), &domain_connect(1, "bad.test", 80));
    assert_eq!(rep, Some(2));
}

#[test]
fn socks_allowed_via_curl_socks5_hostname_returns_body() {
    let origin = http_echo("127.0.0.1");
    let allow = format!("127.0.0.1:{}", origin.port());
    let proxy = ProxyProcess::start(&["--allow", &allow], None);
    let r = curl(&[
        "--socks5-hostname",
        proxy.socks5_addr(),
        &format!("http://{allow}/via-socks"),
    ]);
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/via-socks");
}

#[test]
fn socks_not_allowed_and_local_are_rep_2() {
    let echo = tcp_echo("127.0.0.1");
    let proxy = ProxyProcess::start(&[], None);
    let (_s, rep) = socks_request(proxy.socks5_addr(), &domain_connect(1, "other.test", 443));
    assert_eq!(rep, Some(2));
    let mut ipv4 = vec![5, 1, 0, 1, 127, 0, 0, 1];
    ipv4.extend_from_slice(&echo.port().to_be_bytes());
    let (_s, rep) = socks_request(proxy.socks5_addr(), &ipv4);
    assert_eq!(rep, Some(2));
    assert_eq!(echo.connections(), 0);
    let b = blocked(proxy.admin_addr());
    let reasons: Vec<&str> = b["blocked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["not_allowed", "not_allowed_local"]);
}

#[test]
fn socks_codes() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dns = DnsServer::start();
    dns.set_nxdomain("gone.test");
    let cfg = format!(
        "[network]\nallow_local_binding = true\ndns_servers = [\"{}\"]\n",
        dns.addr_string()
    );
    let allow = format!("127.0.0.1:{port}");
    let proxy = ProxyProcess::start(&["--allow", &allow, "--allow", "gone.test"], Some(&cfg));
    // Closed port → 0x05.
    let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
    req.extend_from_slice(&port.to_be_bytes());
    let (_s, rep) = socks_request(proxy.socks5_addr(), &req);
    assert_eq!(rep, Some(5), "connection refused");
    // BIND → 0x07.
    let (_s, rep) = socks_request(proxy.socks5_addr(), &domain_connect(2, "gone.test", 80));
    assert_eq!(rep, Some(7), "BIND");
    // ATYP 5 → 0x08.
    let (_s, rep) = socks_request(proxy.socks5_addr(), &[5, 1, 0, 5, 1, 2, 3, 4, 0, 80]);
    assert_eq!(rep, Some(8), "ATYP 5");
    // Allowlisted name with no address, local binding on → 0x04.
    let (_s, rep) = socks_request(proxy.socks5_addr(), &domain_connect(1, "gone.test", 80));
    assert_eq!(rep, Some(4), "no address");
}

#[test]
fn socks_allowed_name_resolves_once_and_relays() {
    let origin = http_echo("127.0.0.2");
    let dns = DnsServer::start();
    dns.set(
        "svc.test",
        &[std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2))],
    );
    let cfg = format!(
        "[network]\nallow_local_binding = true\ndns_servers = [\"{}\"]\n",
        dns.addr_string()
    );
    let proxy = ProxyProcess::start(&["--allow", "svc.test"], Some(&cfg));
    let r = curl(&[
        "--socks5-hostname",
        proxy.socks5_addr(),
        &format!("http://svc.test:{}/named", origin.port()),
    ]);
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    assert_eq!(r.json()["path"], "/named");
    assert_eq!(dns.query_count_type("svc.test", 1), 1);
    // Denied by name: no lookup at all.
    let (_s, rep) = socks_request(proxy.socks5_addr(), &domain_connect(1, "other.test", 80));
    assert_eq!(rep, Some(2));
    assert_eq!(dns.query_count("other.test"), 0);
}

#[test]
fn socks_greeting_without_methods_is_refused() {
    let proxy = ProxyProcess::start(&[], None);
    let mut s = connect(proxy.socks5_addr());
    s.write_all(&[5, 0]).unwrap();
    let mut g = [0u8; 2];
    s.read_exact(&mut g).unwrap();
    assert_eq!(g, [5, 0xff]);
    let mut s = connect(proxy.socks5_addr());
    s.write_all(&[5, 1, 2]).unwrap();
    s.read_exact(&mut g).unwrap();
    assert_eq!(
        g,
        [5, 0xff],
        "only user/pass offered without auth configured"
    );
}

#[test]
fn socks_tunnel_64mib_sha256_with_half_close() {
    let sink = portcullis_integration_tests::origin::tcp_sink("127.0.0.1");
    let allow = format!("127.0.0.1:{}", sink.port());
    let proxy = ProxyProcess::start(&["--allow", &allow], None);
    let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
    req.extend_from_slice(&sink.port().to_be_bytes());
    let (mut s, rep) = socks_request(proxy.socks5_addr(), &req);
    assert_eq!(rep, Some(0));
    let data: Vec<u8> = (0..64usize << 20)
        .map(|i| (i * 31 + i / 8192) as u8)
        .collect();
    let want = portcullis_integration_tests::origin::sha256_hex(&data);
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for chunk in data.chunks(1 << 20) {
            w.write_all(chunk).unwrap();
        }
        portcullis_integration_tests::raw::shutdown_write(&w);
    });
    let got = portcullis_integration_tests::raw::read_to_eof(&mut s);
    writer.join().unwrap();
    assert_eq!(String::from_utf8_lossy(&got), want);
}
