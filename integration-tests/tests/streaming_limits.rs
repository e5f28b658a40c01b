//! http.md tests 7 (aborts) and 14 (connection limit).

use portcullis_integration_tests::ProxyProcess;
use portcullis_integration_tests::origin::{http_echo, truncated_response};
use portcullis_integration_tests::raw::{connect, read_response, read_response_opts, read_to_eof};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn client_abort_mid_upload_never_completes_upstream() {
    let origin = http_echo("127.0.0.1");
    let allow = format!("127.0.0.1:{}", origin.port());
    let proxy = ProxyProcess::start(&["--allow", &allow], None);
    let mut s = connect(&proxy.http);
    let head = format!(
        "POST http://{allow}/up HTTP/1.1\r\nHost: {allow}\r\ncontent-length: 1048576\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&[b'u'; 100_000]).unwrap();
    wait_until("origin connected", || origin.connections() == 1);
    drop(s);
    wait_until("upstream connection closed", || origin.closed() == 1);
    assert!(
        origin.requests().is_empty(),
        "the origin must never see a complete body"
    );
}

#[test]
fn origin_abort_mid_response_is_not_completed() {
    let origin = truncated_response("127.0.0.1");
    let allow = format!("127.0.0.1:{}", origin.port());
    let proxy = ProxyProcess::start(&["--allow", &allow], None);
    let mut s = connect(&proxy.http);
    let req = format!("GET http://{allow}/ HTTP/1.1\r\nHost: {allow}\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let r = read_response_opts(&mut s, true).expect("head");
    assert_eq!(r.status, 200);
    let body = read_to_eof(&mut s);
    assert!(
        body.len() < 1_048_576,
        "client must see a short body and a closed connection, got {} bytes",
        body.len()
    );
    // The connection really is closed (not merely idle).
    let mut b = [0u8; 1];
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
}

#[test]
fn connection_limit() {
    let proxy = ProxyProcess::start(&[], Some("[limits]\nmax_connections = 100\n"));
    let req = b"GET http://nope.test/ HTTP/1.1\r\nHost: nope.test\r\n\r\n";
    let mut conns = Vec::new();
    for i in 0..100 {
        let mut s = connect(&proxy.http);
        s.write_all(req).unwrap();
        let r = read_response(&mut s).unwrap_or_else(|| panic!("connection {i} refused"));
        assert_eq!(r.status, 403);
        conns.push(s);
    }
    let mut extra = connect(&proxy.http);
    let _ = extra.write_all(req);
    match read_response(&mut extra) {
        None => {}
        Some(r) => {
            assert_eq!(r.status, 503, "101st connection: {}", r.text());
            assert_eq!(r.header("x-proxy-error"), Some("too-many-connections"));
        }
    }
    for (i, s) in conns.iter_mut().enumerate() {
        s.write_all(req).unwrap();
        let r = read_response(s).unwrap_or_else(|| panic!("connection {i} broken"));
        assert_eq!(r.status, 403);
    }
}
