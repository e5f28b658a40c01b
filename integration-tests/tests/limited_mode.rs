//! http.md test 11: limited mode.

use portcullis_integration_tests::origin::{http_echo, tcp_echo};
use portcullis_integration_tests::raw::{connect, read_response_opts, read_to_eof};
use portcullis_integration_tests::{DnsServer, ProxyProcess, admin_post, raw_request};
use std::io::{Read, Write};

fn request(
    proxy: &ProxyProcess,
    method: &str,
    authority: &str,
) -> portcullis_integration_tests::RawResponse {
    let req = format!(
        "{method} http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\ncontent-length: 0\r\n\r\n"
    );
    let mut s = connect(&proxy.http);
    s.write_all(req.as_bytes()).unwrap();
    read_response_opts(&mut s, method == "HEAD").expect("response")
}

#[test]
fn limited_mode_allows_get_head_options_only() {
    let origin = http_echo("127.0.0.1");
    let allow = format!("127.0.0.1:{}", origin.port());
    let proxy = ProxyProcess::start(&["--allow", &allow, "--mode", "limited"], None);
    for m in ["GET", "HEAD", "OPTIONS"] {
        let r = request(&proxy, m, &allow);
        assert_eq!(r.status, 200, "{m}: {}", r.text());
    }
    for m in ["POST", "get", "PUT", "DELETE"] {
        let r = request(&proxy, m, &allow);
        assert_eq!(r.status, 403, "{m}: {}", r.text());
        assert_eq!(
            r.header("x-proxy-error"),
            Some("blocked-by-method-policy"),
            "{m}"
        );
        assert!(
            r.text().contains("\"reason\":\"method_not_allowed\""),
            "{m}"
        );
        assert!(r.text().contains("\"source\":\"mode_guard\""), "{m}");
    }
    assert_eq!(origin.requests().len(), 3);
}

#[test]
fn limited_mode_post_to_unlisted_name_causes_no_dns_query() {
    let dns = DnsServer::start();
    dns.set_nxdomain("stranger.test");
    dns.set_nxdomain("listed.test");
    let cfg = format!("[network]\ndns_servers = [\"{}\"]\n", dns.addr_string());
    let proxy = ProxyProcess::start(&["--allow", "listed.test", "--mode", "limited"], Some(&cfg));
    for host in ["stranger.test", "listed.test"] {
        let r = request(&proxy, "POST", host);
        assert_eq!(r.status, 403);
        assert!(
            r.text().contains("\"reason\":\"method_not_allowed\""),
            "{host}: {}",
            r.text()
        );
    }
    assert_eq!(
        dns.total_queries(),
        0,
        "the mode guard runs before any DNS lookup"
    );
}

#[test]
fn limited_mode_refuses_upgrade() {
    let origin = http_echo("127.0.0.1");
    let allow = format!("127.0.0.1:{}", origin.port());
    let proxy = ProxyProcess::start(&["--allow", &allow, "--mode", "limited"], None);
    let req = format!(
        "GET http://{allow}/ HTTP/1.1\r\nHost: {allow}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    );
    let r = raw_request(&proxy.http, req.as_bytes()).expect("response");
    assert_eq!(r.status, 403);
    assert!(r.text().contains("\"reason\":\"method_not_allowed\""));
    assert!(r.text().contains("protocol upgrades to"));
    assert_eq!(origin.connections(), 0);
}

#[test]
fn switching_to_limited_closes_open_raw_tunnel() {
    let echo = tcp_echo("127.0.0.1");
    let allow = format!("127.0.0.1:{}", echo.port());
    let proxy = ProxyProcess::start(&["--allow", &allow], None);
    let mut s = connect(&proxy.http);
    let req = format!("CONNECT {allow} HTTP/1.1\r\nHost: {allow}\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let r = read_response_opts(&mut s, true).expect("CONNECT response");
    assert_eq!(r.status, 200);
    s.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    let r = admin_post(proxy.admin_addr(), "/mode", r#"{"mode":"limited"}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    // The proxy closes the tunnel: the client reads EOF (bounded by the 20 s read timeout).
    let rest = read_to_eof(&mut s);
    assert!(rest.is_empty());
    let still_open = s.write_all(b"more").is_ok() && {
        let mut b = [0u8; 4];
        matches!(s.read(&mut b), Ok(n) if n > 0)
    };
    assert!(
        !still_open,
        "tunnel must be closed after switching to limited mode"
    );
}
