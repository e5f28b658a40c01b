//! http.md §6 CONNECT: refusals, raw tunnels, 64 MiB transfer, half-close, early data.

use portcullis_integration_tests::origin::{sha256_hex, tcp_echo, tcp_send_then_close, tcp_sink};
use portcullis_integration_tests::raw::{
    connect, read_response, read_response_opts, read_to_eof, shutdown_write,
};
use portcullis_integration_tests::{ProxyProcess, RawResponse};
use std::io::{Read, Write};
use std::net::TcpStream;

fn open_tunnel(proxy: &ProxyProcess, authority: &str) -> (TcpStream, RawResponse) {
    let mut s = connect(&proxy.http);
    let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let r = read_response_opts(&mut s, true).expect("CONNECT response");
    (s, r)
}

fn assert_established(r: &RawResponse) {
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), None);
    assert_eq!(r.header("transfer-encoding"), None);
}

#[test]
fn connect_denied_not_allowed_and_local() {
    let echo = tcp_echo("127.0.0.1");
    let proxy = ProxyProcess::start(&["--deny", "bad.test"], None);
    let cases = [
        ("bad.test:443", "denied", "blocked-by-denylist"),
        ("other.test:443", "not_allowed", "blocked-by-allowlist"),
        (
            &*format!("127.0.0.1:{}", echo.port()),
            "not_allowed_local",
            "blocked-by-allowlist",
        ),
        (
            &*format!("localhost:{}", echo.port()),
            "not_allowed_local",
            "blocked-by-allowlist",
        ),
    ];
    // All refusals on one connection: it stays usable after each 403.
    let mut s = connect(&proxy.http);
    for (authority, reason, xerr) in cases {
        let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let r = read_response(&mut s).expect("refusal");
        assert_eq!(r.status, 403, "{authority}");
        assert_eq!(r.header("x-proxy-error"), Some(xerr), "{authority}");
        assert!(
            r.text().contains(&format!("\"reason\":\"{reason}\"")),
            "{authority}: {}",
            r.text()
        );
        assert!(r.text().contains("\"protocol\":\"https_connect\""));
    }
    assert_eq!(echo.connections(), 0);
}

#[test]
fn connect_allowed_echo_round_trip() {
    let echo = tcp_echo("127.0.0.1");
    let allow = format!("127.0.0.1:{}", echo.port());
    let proxy = ProxyProcess::start(&["--allow", &allow], None);
    let (mut s, r) = open_tunnel(&proxy, &allow);
    assert_established(&r);
    s.write_all(b"hello tunnel").unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello tunnel");
}

#[test]
fn connect_tunnel_64mib_sha256() {
    let sink = tcp_sink("127.0.0.1");
    let allow = format!("127.0.0.1:{}", sink.port());
    // One worker = the current-thread runtime: the whole splice path on the main thread.
    let proxy = ProxyProcess::start(&["--allow", &allow, "--worker-threads", "1"], None);
    let (mut s, r) = open_tunnel(&proxy, &allow);
    assert_established(&r);
    let data: Vec<u8> = (0..64usize << 20)
        .map(|i| (i * 13 + i / 65536) as u8)
        .collect();
    let want = sha256_hex(&data);
    let writer = {
        let mut w = s.try_clone().unwrap();
        std::thread::spawn(move || {
            for chunk in data.chunks(1 << 20) {
                w.write_all(chunk).unwrap();
            }
            shutdown_write(&w);
        })
    };
    let got = read_to_eof(&mut s);
    writer.join().unwrap();
    assert_eq!(String::from_utf8_lossy(&got), want);
}

#[test]
fn connect_half_close_client_first() {
    let echo = tcp_echo("127.0.0.1");
    let allow = format!("127.0.0.1:{}", echo.port());
    let proxy = ProxyProcess::start(&["--allow", &allow], None);
    let (mut s, r) = open_tunnel(&proxy, &allow);
    assert_established(&r);
    let payload: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
    s.write_all(&payload).unwrap();
    shutdown_write(&s);
    // The echo sees EOF only through the proxy's half-close, then finishes its reply.
    let got = read_to_eof(&mut s);
    assert_eq!(got.len(), payload.len());
    assert!(
        got == payload,
        "full echo delivered after the client's half-close"
    );
}

#[test]
fn connect_half_close_origin_first() {
    let origin = tcp_send_then_close("127.0.0.1", b"server speaks first and closes");
    let allow = format!("127.0.0.1:{}", origin.port());
    let proxy = ProxyProcess::start(&["--allow", &allow], None);
    let (mut s, r) = open_tunnel(&proxy, &allow);
    assert_established(&r);
    let mut buf = [0u8; 30];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"server speaks first and closes");
    // Origin half-closed: client sees EOF but can still send.
    let mut more = [0u8; 1];
    assert_eq!(
        s.read(&mut more).unwrap(),
        0,
        "EOF after the origin's half-close"
    );
    s.write_all(b"client still talking").unwrap();
    shutdown_write(&s);
}

#[test]
fn connect_early_data_forwarded() {
    let echo = tcp_echo("127.0.0.1");
    let allow = format!("127.0.0.1:{}", echo.port());
    let proxy = ProxyProcess::start(&["--allow", &allow], None);
    let mut s = connect(&proxy.http);
    let req = format!("CONNECT {allow} HTTP/1.1\r\nHost: {allow}\r\n\r\nEARLY-BYTES");
    s.write_all(req.as_bytes()).unwrap();
    let r = read_response_opts(&mut s, true).expect("CONNECT response");
    assert_established(&r);
    s.write_all(b"+LATE").unwrap();
    let mut buf = [0u8; 16];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"EARLY-BYTES+LATE");
}

#[test]
fn connect_refused_port_is_502_not_200() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let allow = format!("127.0.0.1:{port}");
    let proxy = ProxyProcess::start(&["--allow", &allow], None);
    let mut s = connect(&proxy.http);
    let req = format!("CONNECT {allow} HTTP/1.1\r\nHost: {allow}\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let r = read_response(&mut s).expect("response");
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-proxy-error"), Some("upstream-connect-failed"));
    assert_eq!(r.header("x-portcullis-decision-id"), None);
}

#[test]
fn connect_blackhole_is_504() {
    let hole = portcullis_integration_tests::origin::blackhole();
    let allow = format!("127.0.0.1:{}", hole.port);
    let proxy = ProxyProcess::start(
        &["--allow", &allow],
        Some("[limits]\nconnect_timeout_ms = 200\n"),
    );
    let mut s = connect(&proxy.http);
    let req = format!("CONNECT {allow} HTTP/1.1\r\nHost: {allow}\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let r = read_response(&mut s).expect("response");
    assert_eq!(r.status, 504);
    assert_eq!(r.header("x-proxy-error"), Some("upstream-timeout"));
}

#[test]
fn connect_host_mismatch_is_400() {
    let echo = tcp_echo("127.0.0.1");
    let allow = format!("127.0.0.1:{}", echo.port());
    let proxy = ProxyProcess::start(&["--allow", &allow], None);
    let req = format!("CONNECT {allow} HTTP/1.1\r\nHost: other.test\r\n\r\n");
    let r =
        portcullis_integration_tests::raw_request(&proxy.http, req.as_bytes()).expect("response");
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.header("x-proxy-error"), Some("invalid-request"));
    let req = b"CONNECT user@allowed.test:443 HTTP/1.1\r\n\r\n";
    let r = portcullis_integration_tests::raw_request(&proxy.http, req).expect("response");
    assert_eq!(r.status, 400, "userinfo in CONNECT: {}", r.text());
    assert_eq!(echo.connections(), 0);
}
