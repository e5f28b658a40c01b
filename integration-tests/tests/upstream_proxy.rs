//! http.md §7: the proxy's own HTTP(S)_PROXY is used after policy allowed the request; the
//! upstream (here a second real portcullis-proxy) receives the name; NO_PROXY goes direct.

use portcullis_integration_tests::origin::http_echo;
use portcullis_integration_tests::{ProxyProcess, curl};

#[test]
fn http_connect_and_socks_go_through_the_upstream_proxy() {
    let origin = http_echo("127.0.0.1");
    let allow = format!("127.0.0.1:{}", origin.port());
    let upstream = ProxyProcess::start(&["--allow", &allow], None);
    let up = format!("http://{}", upstream.http);
    let proxy = ProxyProcess::start_env(
        &["--allow", &allow],
        None,
        &[("HTTP_PROXY", &up), ("HTTPS_PROXY", &up)],
    );
    let px = proxy.http_url();
    let url = format!("http://{allow}/via");
    assert_eq!(
        curl(&["-x", &px, &url]).status,
        200,
        "absolute-form via upstream"
    );
    assert_eq!(
        curl(&["-p", "-x", &px, &url]).status,
        200,
        "CONNECT via upstream"
    );
    assert_eq!(
        curl(&["--socks5-hostname", proxy.socks5.as_deref().unwrap(), &url]).status,
        200,
        "SOCKS5 via upstream"
    );
    assert!(
        proxy.wait_for_stderr("route=upstream_proxy", std::time::Duration::from_secs(5)),
        "{}",
        proxy.stderr_text()
    );
    let up_log = upstream.stderr_text();
    assert_eq!(up_log.matches("route=direct").count(), 3, "{up_log}");

    // Policy still runs first: a name our proxy denies never reaches the upstream.
    let r = curl(&["-x", &px, "http://other.test/"]);
    assert_eq!(r.status, 403);
    assert_eq!(upstream.stderr_text().matches("route=").count(), 3);
}

#[test]
fn no_proxy_goes_direct_and_a_refusing_upstream_is_502() {
    let origin = http_echo("127.0.0.1");
    let allow = format!("127.0.0.1:{}", origin.port());
    // The upstream refuses everything (empty allowlist).
    let upstream = ProxyProcess::start(&[], None);
    let up = format!("http://{}", upstream.http);
    let proxy = ProxyProcess::start_env(&["--allow", &allow], None, &[("HTTPS_PROXY", &up)]);
    let px = proxy.http_url();
    let url = format!("http://{allow}/x");
    let r = curl(&["-p", "-x", &px, &url]);
    assert_eq!(r.status, 502, "curl sees the CONNECT refused");
    let r = portcullis_integration_tests::raw_request(
        &proxy.http,
        format!("CONNECT {allow} HTTP/1.1\r\nHost: {allow}\r\n\r\n").as_bytes(),
    )
    .expect("response");
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-proxy-error"), Some("upstream-connect-failed"));
    assert!(
        r.text().contains("403"),
        "names the upstream status: {}",
        r.text()
    );

    let no_proxy = format!("127.0.0.1:{}", origin.port());
    let proxy = ProxyProcess::start_env(
        &["--allow", &allow],
        None,
        &[("HTTPS_PROXY", &up), ("NO_PROXY", &no_proxy)],
    );
    let r = curl(&["-p", "-x", &proxy.http_url(), &url]);
    assert_eq!(r.status, 200, "NO_PROXY goes direct");
}
