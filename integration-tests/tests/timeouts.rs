//! http.md §1 rule 4: idle keep-alive connections close silently after
//! `client_idle_timeout_ms`; a request in progress is not cut by that timer.

use std::io::{Read, Write};
use std::time::Duration;

use portcullis_integration_tests::ProxyProcess;
use portcullis_integration_tests::origin::http_echo;
use portcullis_integration_tests::raw::{connect, read_response};

#[test]
fn idle_keepalive_connection_is_closed_silently() {
    let origin = http_echo("127.0.0.1");
    let allow = format!("127.0.0.1:{}", origin.port());
    // The head timer is far away, so only the idle timer can close the connection in time.
    let cfg = "[limits]\nclient_idle_timeout_ms = 300\nheader_read_timeout_ms = 600000\n";
    let proxy = ProxyProcess::start(&["--allow", &allow], Some(cfg));
    let mut s = connect(&proxy.http);
    let req = format!("GET http://{allow}/a HTTP/1.1\r\nHost: {allow}\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let r = read_response(&mut s).expect("first response");
    assert_eq!(r.status, 200);
    // Nothing sent: the proxy closes the connection without a response.
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 64];
    let n = s
        .read(&mut buf)
        .expect("the idle timer closes the connection (the read must not time out)");
    assert_eq!(
        n,
        0,
        "closed silently, got {:?}",
        String::from_utf8_lossy(&buf[..n])
    );
}
