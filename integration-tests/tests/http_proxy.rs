//! http.md: absolute-form requests, request forms, Host checks, hostile input, streaming,
//! keep-alive and WebSocket upgrades; policy.md test 2 (numeric spellings).

use portcullis_integration_tests::origin::{http_echo, sha256_hex, websocket_echo};
use portcullis_integration_tests::raw::{connect, read_response, read_response_opts, read_to_eof};
use portcullis_integration_tests::{ProxyProcess, blocked, curl, raw_request};
use std::io::{Read, Write};

fn header_of(v: &serde_json::Value, name: &str) -> Option<String> {
    v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h[0].as_str().unwrap().eq_ignore_ascii_case(name))
        .map(|h| h[1].as_str().unwrap().to_string())
}

fn echo_proxy() -> (
    portcullis_integration_tests::origin::Origin,
    ProxyProcess,
    String,
) {
    echo_proxy_with(&[])
}

fn echo_proxy_with(
    extra: &[&str],
) -> (
    portcullis_integration_tests::origin::Origin,
    ProxyProcess,
    String,
) {
    let origin = http_echo("127.0.0.1");
    let allow = format!("127.0.0.1:{}", origin.port());
    let mut args = vec!["--allow", &allow, "--deny", "bad.test"];
    args.extend_from_slice(extra);
    let proxy = ProxyProcess::start(&args, None);
    (origin, proxy, allow)
}

#[test]
fn absolute_form_allowed_streams() {
    let (origin, proxy, allow) = echo_proxy();
    let r = curl(&[
        "-x",
        &proxy.http_url(),
        "-H",
        "X-Test: one",
        &format!("http://{allow}/path?q=1"),
    ]);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/path?q=1");
    assert_eq!(header_of(&v, "x-test").as_deref(), Some("one"));
    assert_eq!(header_of(&v, "host").as_deref(), Some(allow.as_str()));
    assert_eq!(header_of(&v, "via"), None, "no Via added");
    assert_eq!(origin.requests().len(), 1);
}

#[test]
fn absolute_form_denied_not_allowed_and_local() {
    let (origin, proxy, _allow) = echo_proxy();
    let cases = [
        ("http://bad.test/", "denied", "blocked-by-denylist"),
        ("http://other.test/", "not_allowed", "blocked-by-allowlist"),
        (
            "http://127.0.0.1:1/",
            "not_allowed_local",
            "blocked-by-allowlist",
        ),
        (
            "http://localhost:1/",
            "not_allowed_local",
            "blocked-by-allowlist",
        ),
    ];
    for (url, reason, xerr) in cases {
        let r = curl(&["-x", &proxy.http_url(), url]);
        assert_eq!(r.status, 403, "{url}");
        assert_eq!(r.header("x-proxy-error"), Some(xerr), "{url}");
        assert!(
            r.text().contains(&format!("\"reason\":\"{reason}\"")),
            "{url}: {}",
            r.text()
        );
    }
    assert_eq!(origin.connections(), 0);
}

#[test]
fn keepalive_reuses_connection() {
    // One worker = the current-thread runtime (`--worker-threads 1`, the per-core figure).
    let (origin, proxy, allow) = echo_proxy_with(&["--worker-threads", "1"]);
    let url = format!("http://{allow}/a");
    let url2 = format!("http://{allow}/b");
    // One curl invocation, two URLs: curl reuses its proxy connection.
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "-x",
            &proxy.http_url(),
            &url,
            &url2,
        ])
        .args(["-w", "%{num_connects}\n"])
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("\"/a\"") && text.contains("\"/b\""), "{text}");
    // Second transfer opened no new connection to the proxy.
    assert!(text.trim_end().ends_with('0'), "curl reconnected: {text}");
    // And the raw-socket view: two requests, one client connection.
    let mut s = connect(&proxy.http);
    for p in ["/x", "/y"] {
        let req = format!("GET http://{allow}{p} HTTP/1.1\r\nHost: {allow}\r\n\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let r = read_response(&mut s).expect("response");
        assert_eq!(r.status, 200);
    }
    assert_eq!(origin.requests().len(), 4);
}

#[test]
fn pipelined_requests_answered_in_order() {
    let (_origin, proxy, allow) = echo_proxy_with(&["--worker-threads", "1"]);
    let mut s = connect(&proxy.http);
    let req = format!(
        "GET http://{allow}/1 HTTP/1.1\r\nHost: {allow}\r\n\r\nGET http://other.test/ HTTP/1.1\r\nHost: other.test\r\n\r\nGET http://{allow}/3 HTTP/1.1\r\nHost: {allow}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let r1 = read_response(&mut s).expect("1");
    let r2 = read_response(&mut s).expect("2");
    let r3 = read_response(&mut s).expect("3");
    assert_eq!((r1.status, r2.status, r3.status), (200, 403, 200));
    assert!(r1.text().contains("\"/1\""));
    assert!(r3.text().contains("\"/3\""));
}

fn assert_400(proxy: &ProxyProcess, req: &[u8], what: &str) -> String {
    let r = raw_request(&proxy.http, req).unwrap_or_else(|| panic!("{what}: no response"));
    assert_eq!(r.status, 400, "{what}: {}", r.text());
    assert_eq!(r.header("x-portcullis-decision-id"), None, "{what}");
    assert_eq!(r.header("x-proxy-error"), Some("invalid-request"), "{what}");
    assert!(
        r.text().starts_with("invalid-request: ") && r.text().ends_with('\n'),
        "{what}: body {:?}",
        r.text()
    );
    r.text()
}

#[test]
fn origin_form_to_proxy_is_400() {
    let (_o, proxy, _a) = echo_proxy();
    let body = assert_400(
        &proxy,
        b"GET /x HTTP/1.1\r\nHost: example.test\r\n\r\n",
        "origin-form",
    );
    assert!(
        body.contains("requests to the proxy itself must use an absolute URI or CONNECT"),
        "{body}"
    );
}

#[test]
fn asterisk_form_is_400() {
    let (_o, proxy, _a) = echo_proxy();
    assert_400(
        &proxy,
        b"OPTIONS * HTTP/1.1\r\nHost: example.test\r\n\r\n",
        "asterisk",
    );
}

#[test]
fn ftp_scheme_is_400() {
    let (_o, proxy, _a) = echo_proxy();
    let body = assert_400(
        &proxy,
        b"GET ftp://example.test/ HTTP/1.1\r\nHost: example.test\r\n\r\n",
        "ftp",
    );
    assert!(body.contains("unsupported scheme"), "{body}");
}

#[test]
fn host_header_mismatch_is_400() {
    let proxy = ProxyProcess::start(&["--allow", "allowed.test"], None);
    let body = assert_400(
        &proxy,
        b"GET http://allowed.test/ HTTP/1.1\r\nHost: other.test\r\n\r\n",
        "Host mismatch",
    );
    assert!(
        body.contains("Host header does not match request target"),
        "{body}"
    );
    assert_400(
        &proxy,
        b"GET http://allowed.test:8080/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
        "Host missing non-default port",
    );
    assert_400(
        &proxy,
        b"GET http://allowed.test/ HTTP/1.1\r\nHost: allowed.test\r\nHost: allowed.test\r\n\r\n",
        "two Host headers",
    );
    assert_eq!(blocked(proxy.admin_addr())["total"], 0);
}

#[test]
fn userinfo_target_is_400_and_nothing_dialled() {
    let (origin, proxy, allow) = echo_proxy();
    let body = assert_400(
        &proxy,
        b"GET http://allowed.test@other.test/ HTTP/1.1\r\nHost: other.test\r\n\r\n",
        "userinfo",
    );
    assert!(
        body.contains("userinfo in the request target is not allowed"),
        "{body}"
    );
    let req = format!("GET http://user@{allow}/ HTTP/1.1\r\nHost: {allow}\r\n\r\n");
    assert_400(&proxy, req.as_bytes(), "userinfo to allowed origin");
    assert_eq!(origin.connections(), 0, "nothing dialled");
}

#[test]
fn hostile_host_inputs_are_400() {
    let (origin, proxy, _allow) = echo_proxy();
    let long_name = format!("{}.test", "a".repeat(249));
    let hosts: Vec<Vec<u8>> = vec![
        b"a\rb.test".to_vec(),
        b"a\nb.test".to_vec(),
        b"a\0b.test".to_vec(),
        b"a%2eb.test".to_vec(),
        long_name.into_bytes(),
    ];
    for h in hosts {
        let mut req = b"GET http://".to_vec();
        req.extend_from_slice(&h);
        req.extend_from_slice(b"/ HTTP/1.1\r\nHost: ");
        req.extend_from_slice(&h);
        req.extend_from_slice(b"\r\n\r\n");
        let what = format!("host {:?}", String::from_utf8_lossy(&h));
        // A CR/LF inside the request line breaks the head itself: still 400 (http.md §1 rule 5).
        let r = raw_request(&proxy.http, &req).unwrap_or_else(|| panic!("{what}: no response"));
        assert_eq!(r.status, 400, "{what}: {}", r.text());
    }
    assert_eq!(origin.connections(), 0);
}

#[test]
fn bogus_ports_are_400() {
    let (_o, proxy, _a) = echo_proxy();
    for port in ["0", "65536", "x", "-1", "99999999999"] {
        let req = format!(
            "GET http://example.test:{port}/ HTTP/1.1\r\nHost: example.test:{port}\r\n\r\n"
        );
        assert_400(&proxy, req.as_bytes(), &format!("absolute port {port}"));
        let req = format!("CONNECT example.test:{port} HTTP/1.1\r\n\r\n");
        assert_400(&proxy, req.as_bytes(), &format!("CONNECT port {port}"));
    }
}

#[test]
fn overlong_headers_are_431() {
    let (_o, proxy, allow) = echo_proxy();
    let big = "a".repeat(70 * 1024);
    let req = format!("GET http://{allow}/ HTTP/1.1\r\nHost: {allow}\r\nX-Big: {big}\r\n\r\n");
    let r = raw_request(&proxy.http, req.as_bytes()).expect("response to 70 KiB header");
    assert_eq!(r.status, 431);
    let mut many = String::new();
    for i in 0..200 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    let req = format!("GET http://{allow}/ HTTP/1.1\r\nHost: {allow}\r\n{many}\r\n");
    let r = raw_request(&proxy.http, req.as_bytes()).expect("response to 200 headers");
    assert_eq!(r.status, 431);
}

#[test]
fn h2_preface_is_505() {
    let (_o, proxy, _a) = echo_proxy();
    let r = raw_request(&proxy.http, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").expect("response");
    assert_eq!(r.status, 505);
}

#[test]
fn forwarded_host_is_canonical() {
    let (origin, proxy, allow) = echo_proxy();
    let port = origin.port();
    let r = curl(&[
        "-x",
        &proxy.http_url(),
        &format!("http://2130706433:{port}/"),
    ]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        header_of(&r.json(), "host").as_deref(),
        Some(allow.as_str())
    );
}

#[test]
fn numeric_ip_spellings_with_star_are_not_allowed_local() {
    let origin = http_echo("127.0.0.1");
    let port = origin.port();
    let proxy = ProxyProcess::start(&["--allow", "*"], None);
    for host in [
        "2130706433",
        "127.1",
        "0x7f.0.0.1",
        "0177.0.0.1",
        "2852039166",
    ] {
        let r = curl(&["-x", &proxy.http_url(), &format!("http://{host}:{port}/")]);
        assert_eq!(r.status, 403, "{host}: {}", r.text());
        assert!(
            r.text().contains("\"reason\":\"not_allowed_local\""),
            "{host}: {}",
            r.text()
        );
    }
    assert_eq!(origin.connections(), 0);
}

#[test]
fn numeric_ip_spellings_with_exact_entry_reach_origin() {
    let (origin, proxy, allow) = echo_proxy();
    let port = origin.port();
    for host in ["2130706433", "127.1", "0x7f.0.0.1", "0177.0.0.1"] {
        let r = curl(&["-x", &proxy.http_url(), &format!("http://{host}:{port}/")]);
        assert_eq!(r.status, 200, "{host}: {}", r.text());
        assert_eq!(
            header_of(&r.json(), "host").as_deref(),
            Some(allow.as_str()),
            "{host}"
        );
    }
    assert_eq!(origin.requests().len(), 4);
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
}

#[test]
fn upload_64mib_sha256() {
    let (_origin, proxy, allow) = echo_proxy();
    let data = pattern(64 << 20);
    let want = sha256_hex(&data);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("up.bin");
    std::fs::write(&file, &data).unwrap();
    let at = format!("@{}", file.display());
    let url = format!("http://{allow}/upload");
    // With a length.
    let r = curl(&["-x", &proxy.http_url(), "--data-binary", &at, &url]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body_sha256"], want.as_str());
    assert_eq!(r.json()["body_len"], 64u64 << 20);
    // Chunked.
    let r = curl(&[
        "-x",
        &proxy.http_url(),
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &at,
        &url,
    ]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body_sha256"], want.as_str());
}

#[test]
fn websocket_upgrade_through_absolute_form() {
    let origin = websocket_echo("127.0.0.1");
    let allow = format!("127.0.0.1:{}", origin.port());
    let proxy = ProxyProcess::start(&["--allow", &allow], None);
    let mut s = connect(&proxy.http);
    let req = format!(
        "GET http://{allow}/ws HTTP/1.1\r\nHost: {allow}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: abc\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let r = read_response_opts(&mut s, true).expect("101");
    assert_eq!(r.status, 101);
    assert!(
        r.header("upgrade")
            .unwrap_or("")
            .eq_ignore_ascii_case("websocket")
    );
    assert_eq!(r.header("sec-websocket-accept"), Some("accept-abc"));
    s.write_all(b"ping-frame-bytes").unwrap();
    let mut buf = [0u8; 16];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping-frame-bytes");
    portcullis_integration_tests::raw::shutdown_write(&s);
    assert!(read_to_eof(&mut s).is_empty());
    let seen = &origin.requests()[0];
    let hdr = |n: &str| {
        seen["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h[0].as_str().unwrap().eq_ignore_ascii_case(n))
            .map(|h| h[1].as_str().unwrap().to_string())
    };
    assert_eq!(hdr("sec-websocket-key").as_deref(), Some("abc"));
    assert!(
        hdr("upgrade")
            .unwrap_or_default()
            .eq_ignore_ascii_case("websocket")
    );
}

#[test]
fn download_64mib_sha256() {
    let data = pattern(64 << 20);
    let want = sha256_hex(&data);
    let origin = portcullis_integration_tests::origin::fixed_response_bytes(
        "127.0.0.1",
        200,
        &[("content-type", "application/octet-stream")],
        &data,
    );
    drop(data);
    let allow = format!("127.0.0.1:{}", origin.port());
    let proxy = ProxyProcess::start(&["--allow", &allow], None);
    let r = curl(&["-x", &proxy.http_url(), &format!("http://{allow}/big")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 64 << 20);
    assert_eq!(sha256_hex(&r.body), want);
}

#[test]
fn hop_by_hop_stripped() {
    let (origin, proxy, allow) = echo_proxy();
    let req = format!(
        "GET http://{allow}/h HTTP/1.1\r\nHost: {allow}\r\nConnection: keep-alive, X-Named\r\nX-Named: gone\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nx-unix-socket: /tmp/x.sock\r\nx-portcullis-foo: forged\r\nAuthorization: Bearer keep\r\nX-Forwarded-For: 192.0.2.1\r\nTE: trailers\r\n\r\n"
    );
    let r = raw_request(&proxy.http, req.as_bytes()).expect("response");
    // x-unix-socket routes the request to the unix-socket handler (unix-sockets.md), so send the
    // rest without it when the proxy refused it.
    let v: serde_json::Value = if r.status == 200 {
        serde_json::from_slice(&r.body).unwrap()
    } else {
        let req = req.replace("x-unix-socket: /tmp/x.sock\r\n", "");
        let r = raw_request(&proxy.http, req.as_bytes()).expect("response");
        assert_eq!(r.status, 200, "{}", r.text());
        serde_json::from_slice(&r.body).unwrap()
    };
    for gone in [
        "proxy-authorization",
        "proxy-connection",
        "keep-alive",
        "x-unix-socket",
        "x-named",
        "x-portcullis-foo",
        "te",
        "via",
        "forwarded",
    ] {
        assert_eq!(
            header_of(&v, gone),
            None,
            "{gone} must not reach the origin"
        );
    }
    assert_eq!(
        header_of(&v, "authorization").as_deref(),
        Some("Bearer keep")
    );
    assert_eq!(
        header_of(&v, "x-forwarded-for").as_deref(),
        Some("192.0.2.1"),
        "client X-Forwarded-For forwarded unchanged, none added"
    );
    assert!(!origin.requests().is_empty());
}

#[test]
fn h2c_upgrade_is_stripped() {
    let (origin, proxy, allow) = echo_proxy();
    let req = format!(
        "GET http://{allow}/ HTTP/1.1\r\nHost: {allow}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
    );
    let r = raw_request(&proxy.http, req.as_bytes()).expect("response");
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(header_of(&v, "upgrade"), None);
    assert_eq!(header_of(&v, "http2-settings"), None);
    assert_eq!(origin.requests().len(), 1);
}

#[test]
fn slow_header_is_408() {
    let proxy = ProxyProcess::start(&[], Some("[limits]\nheader_read_timeout_ms = 500\n"));
    let mut s = connect(&proxy.http);
    s.write_all(b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n")
        .unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        // One header byte every 100 ms, never finishing the head; stops when the proxy closes.
        for _ in 0..100 {
            if w.write_all(b"X").is_err() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    });
    let r = read_response(&mut s).expect("408 response");
    assert_eq!(r.status, 408);
    drop(s);
    writer.join().unwrap();
}

#[test]
fn ipv6_loopback_origin_with_exact_entry() {
    let Ok(probe) = std::net::TcpListener::bind("[::1]:0") else {
        eprintln!("skipping: no IPv6 loopback");
        return;
    };
    drop(probe);
    let origin = http_echo("::1");
    let entry = format!("[::1]:{}", origin.port());
    let proxy = ProxyProcess::start(&["--allow", &entry], None);
    let r = curl(&["-x", &proxy.http_url(), &format!("http://{entry}/v6")]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/v6");
    assert_eq!(
        header_of(&r.json(), "host").as_deref(),
        Some(entry.as_str())
    );
    let other = format!("http://[::1]:{}/", origin.port() as u32 % 65535 + 1);
    let r = curl(&["-x", &proxy.http_url(), &other]);
    assert_eq!(r.status, 403);
    assert!(r.text().contains("\"reason\":\"not_allowed_local\""));
    assert!(
        r.text().contains("\"host\":\"::1\""),
        "IPv6 host without brackets"
    );
}

#[test]
fn host_default_port_ok() {
    let proxy = ProxyProcess::start(&[], None);
    // Target with the scheme's default port, Host without a port: passes the Host check and
    // reaches policy (403 not_allowed), not 400.
    let r = raw_request(
        &proxy.http,
        b"GET http://other.test:80/ HTTP/1.1\r\nHost: other.test\r\n\r\n",
    )
    .expect("response");
    assert_eq!(r.status, 403, "{}", r.text());
    let r = raw_request(
        &proxy.http,
        b"GET http://other.test/ HTTP/1.1\r\nHost: other.test:80\r\n\r\n",
    )
    .expect("response");
    assert_eq!(r.status, 403, "{}", r.text());
}

#[test]
fn http10_without_host_is_accepted() {
    let (_origin, proxy, allow) = echo_proxy();
    let req = format!("GET http://{allow}/old HTTP/1.0\r\n\r\n");
    let r = raw_request(&proxy.http, req.as_bytes()).expect("response");
    assert_eq!(r.status, 200, "{}", r.text());
}
