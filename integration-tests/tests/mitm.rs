//! http.md test 12 and socks5.md test 12: limited mode enforced inside HTTPS by interception.
//! Real curl (`--cacert` with the exported CA) through CONNECT and SOCKS5 to loopback HTTPS
//! origins that have their own rcgen CA.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use portcullis_integration_tests::origin::http_echo;
use portcullis_integration_tests::raw::{connect, read_response_opts};
use portcullis_integration_tests::tls_origin::{HttpsOrigin, https_echo, https_echo_443};
use portcullis_integration_tests::{
    CurlResult, PREFIX, ProxyProcess, admin_get, admin_post, blocked, curl,
};

/// A proxy with `network.mitm = true`, its MITM directory and the exported CA path.
struct Mitm {
    proxy: ProxyProcess,
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Mitm {
    fn ca(&self) -> String {
        self.dir.join("ca.pem").display().to_string()
    }
}

fn start(allow: &str, mode: &str, trusted_upstream_ca: Option<&Path>) -> Mitm {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mitm");
    let extra = match trusted_upstream_ca {
        Some(p) => format!("extra_upstream_ca_files = [\"{}\"]\n", p.display()),
        None => String::new(),
    };
    let cfg = format!("[network]\nmitm = true\n\n[mitm]\n{extra}");
    let dir_text = dir.display().to_string();
    let proxy = ProxyProcess::start(
        &["--allow", allow, "--mode", mode, "--mitm-dir", &dir_text],
        Some(&cfg),
    );
    Mitm {
        proxy,
        dir,
        _tmp: tmp,
    }
}

fn via_connect(m: &Mitm, extra: &[&str], url: &str) -> CurlResult {
    let ca = m.ca();
    let proxy = m.proxy.http_url();
    let mut args = vec!["--cacert", &ca, "-x", &proxy];
    args.extend_from_slice(extra);
    args.push(url);
    curl(&args)
}

fn via_socks(m: &Mitm, extra: &[&str], url: &str) -> CurlResult {
    let ca = m.ca();
    let mut args = vec!["--cacert", &ca, "--socks5-hostname", m.proxy.socks5_addr()];
    args.extend_from_slice(extra);
    args.push(url);
    curl(&args)
}

/// The structured 403 of decisions.md §3, checked in text and JSON form.
fn assert_method_block(text: &CurlResult, json: &CurlResult, protocol: &str, target: &str) {
    assert_eq!(text.status, 403, "text: {} {}", text.text(), text.stderr);
    assert_eq!(
        text.header("x-proxy-error"),
        Some("blocked-by-method-policy")
    );
    assert!(text.header("x-portcullis-decision-id").is_some());
    assert_eq!(
        text.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(text.header("cache-control"), Some("no-store"));
    let body = text.text();
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.len(), 2, "{body}");
    let line1: serde_json::Value = serde_json::from_str(
        lines[0]
            .strip_prefix("PORTCULLIS_POLICY_DECISION ")
            .unwrap_or_else(|| panic!("first line: {body}")),
    )
    .unwrap();
    assert_eq!(line1["reason"], "method_not_allowed");
    assert_eq!(line1["source"], "mode_guard");
    assert_eq!(line1["protocol"], protocol);
    assert_eq!(
        line1["id"].as_str(),
        text.header("x-portcullis-decision-id")
    );
    assert_eq!(
        lines[1],
        format!(
            "{PREFIX}POST to {target} is not allowed in limited mode, which permits only GET, HEAD and OPTIONS. Approval is not possible; do not retry through another route."
        )
    );
    assert_eq!(json.status, 403, "json: {}", json.text());
    assert_eq!(json.header("content-type"), Some("application/json"));
    let j = json.json();
    assert_eq!(j["status"], "blocked");
    assert_eq!(j["reason"], "method_not_allowed");
    assert_eq!(j["protocol"], protocol);
}

#[test]
fn connect_get_allowed_post_blocked_inside_tls() {
    let origin = https_echo("127.0.0.1");
    let target = format!("127.0.0.1:{}", origin.port());
    let m = start(&target, "limited", Some(&origin.ca.pem_path));
    let url = format!("https://{target}/read?q=1");
    let r = via_connect(&m, &[], &url);
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/read?q=1");
    let r = via_connect(&m, &["-I"], &url);
    assert_eq!(r.status, 200, "HEAD: {}", r.stderr);

    let text = via_connect(&m, &["-d", "payload"], &url);
    let json = via_connect(
        &m,
        &["-d", "payload", "-H", "Accept: application/json"],
        &url,
    );
    assert_method_block(&text, &json, "https_connect", &target);
    // Only the GET and HEAD reached the origin.
    let methods: Vec<String> = origin
        .origin
        .requests()
        .iter()
        .map(|r| r["method"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(methods, ["GET", "HEAD"]);
    // The inner refusal is a Decision like any other: blocked log with the inner method.
    let b = blocked(m.proxy.admin_addr());
    let last = b["blocked"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["protocol"], "https_connect");
    assert_eq!(last["method"], "POST");
    assert_eq!(last["reason"], "method_not_allowed");
}

#[test]
fn socks5_port_443_get_allowed_post_blocked_inside_tls() {
    let (origin, ip) = https_echo_443();
    let target = format!("{ip}:443");
    let m = start(&target, "limited", Some(&origin.ca.pem_path));
    let url = format!("https://{ip}/via-socks");
    let r = via_socks(&m, &[], &url);
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/via-socks");
    let text = via_socks(&m, &["-d", "x"], &url);
    let json = via_socks(&m, &["-d", "x", "-H", "Accept: application/json"], &url);
    assert_method_block(&text, &json, "socks5_tcp", &target);
    assert_eq!(origin.origin.requests().len(), 1);
}

#[test]
fn connect_without_mitm_is_mitm_required() {
    let origin = https_echo("127.0.0.1");
    let target = format!("127.0.0.1:{}", origin.port());
    let proxy = ProxyProcess::start(&["--allow", &target, "--mode", "limited"], None);
    let mut s = connect(&proxy.http);
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .unwrap();
    let r = read_response_opts(&mut s, false).expect("CONNECT response");
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.header("x-proxy-error"), Some("blocked-by-mitm-required"));
    assert!(
        r.text().contains("\"reason\":\"mitm_required\""),
        "{}",
        r.text()
    );
    assert_eq!(origin.origin.connections(), 0);
}

#[test]
fn untrusted_upstream_certificate_is_502_never_a_downgrade() {
    let origin = https_echo("127.0.0.1");
    let target = format!("127.0.0.1:{}", origin.port());
    // The origin's CA is not configured as an extra upstream CA.
    let m = start(&target, "limited", None);
    let r = via_connect(&m, &[], &format!("https://{target}/"));
    assert_eq!(r.status, 502, "{} {}", r.text(), r.stderr);
    assert_eq!(r.header("x-proxy-error"), Some("upstream-tls-failed"));
    assert!(
        r.text()
            .starts_with("upstream-tls-failed: TLS with 127.0.0.1:"),
        "{}",
        r.text()
    );
    assert!(r.header("x-portcullis-decision-id").is_none());
    assert!(origin.origin.requests().is_empty());

    // An origin that answers the TLS handshake with plain HTTP (garbage for TLS): also 502.
    let plain = http_echo("127.0.0.1");
    let target = format!("127.0.0.1:{}", plain.port());
    let m = start(&target, "limited", None);
    let r = via_connect(&m, &[], &format!("https://{target}/"));
    assert_eq!(r.status, 502, "{} {}", r.text(), r.stderr);
    assert_eq!(r.header("x-proxy-error"), Some("upstream-tls-failed"));
    assert!(plain.requests().is_empty());
}

#[test]
fn mode_switch_changes_the_next_request() {
    let origin = https_echo("127.0.0.1");
    let target = format!("127.0.0.1:{}", origin.port());
    let m = start(&target, "full", Some(&origin.ca.pem_path));
    // In full mode CONNECT is a raw tunnel: the client must trust the origin's own CA.
    let both = m._tmp.path().join("both.pem");
    let mitm_ca = std::fs::read_to_string(m.ca()).unwrap();
    std::fs::write(&both, format!("{}{}", origin.ca.pem, mitm_ca)).unwrap();
    let both = both.display().to_string();
    let url = format!("https://{target}/w");
    let post = |m: &Mitm| {
        curl(&[
            "--cacert",
            &both,
            "-x",
            &m.proxy.http_url(),
            "-d",
            "x",
            &url,
        ])
    };
    let r = post(&m);
    assert_eq!(r.status, 200, "full mode: {} {}", r.text(), r.stderr);
    let admin = m.proxy.admin_addr();
    let r = admin_post(admin, "/mode", r#"{"mode":"limited"}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post(&m);
    assert_eq!(r.status, 403, "limited: {} {}", r.text(), r.stderr);
    assert_eq!(r.header("x-proxy-error"), Some("blocked-by-method-policy"));
    let r = admin_post(admin, "/mode", r#"{"mode":"full"}"#);
    assert_eq!(r.status, 200);
    let r = post(&m);
    assert_eq!(r.status, 200, "full again: {}", r.stderr);
    assert_eq!(origin.origin.requests().len(), 2);
}

#[test]
fn inner_host_mismatch_and_connect_are_refused() {
    let origin = https_echo("127.0.0.1");
    let target = format!("127.0.0.1:{}", origin.port());
    let m = start(&target, "limited", Some(&origin.ca.pem_path));
    let url = format!("https://{target}/");
    let r = via_connect(&m, &["-H", "Host: 10.0.0.1"], &url);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.text(), "invalid-request: host mismatch\n");
    let r = via_connect(&m, &["-X", "CONNECT"], &url);
    assert_eq!(r.status, 405, "{}", r.text());
    assert!(origin.origin.requests().is_empty());
}

/// A blocking rustls client over a CONNECT tunnel; returns the handshake result and the leaf.
fn tls_through_connect(
    proxy: &ProxyProcess,
    target: &str,
    sni: &str,
    ca_pem: &Path,
) -> Result<Vec<u8>, String> {
    let mut s = connect(&proxy.http);
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .unwrap();
    let r = read_response_opts(&mut s, true).expect("CONNECT response");
    assert_eq!(r.status, 200);
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca_pem).unwrap();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        let c: rustls::pki_types::CertificateDer<'static> = c.unwrap();
        roots.add(c).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    for _ in 0..100 {
        if !conn.is_handshaking() {
            break;
        }
        conn.complete_io(&mut s).map_err(|e| e.to_string())?;
    }
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .ok_or("no peer certificate")?;
    Ok(leaf)
}

fn metric(admin: &str, line_start: &str) -> u64 {
    let m = admin_get(admin, "/metrics").text();
    m.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line_start} missing"))
}

#[test]
fn bad_client_tls_fails_one_connection_and_the_proxy_survives() {
    let origin: HttpsOrigin = https_echo("127.0.0.1");
    let target = format!("127.0.0.1:{}", origin.port());
    let m = start(&target, "limited", Some(&origin.ca.pem_path));
    let admin = m.proxy.admin_addr().to_string();

    // Plain-text garbage instead of a ClientHello: that connection closes.
    let mut s = connect(&m.proxy.http);
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .unwrap();
    let r = read_response_opts(&mut s, true).expect("CONNECT response");
    assert_eq!(r.status, 200);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff\x16\x03garbage")
        .unwrap();
    let mut rest = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.read_to_end(&mut rest);
    assert!(
        !rest.starts_with(b"HTTP/"),
        "no HTTP answer to non-TLS bytes"
    );

    // An oversized "handshake": a TLS record header announcing a huge message, then bytes.
    let mut s = connect(&m.proxy.http);
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .unwrap();
    assert_eq!(read_response_opts(&mut s, true).unwrap().status, 200);
    let mut big = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0xff, 0xff, 0xff];
    big.extend(std::iter::repeat_n(0u8, 100_000));
    let _ = s.write_all(&big);
    let _ = s.read_to_end(&mut Vec::new());

    // SNI that differs from the CONNECT host: handshake refused.
    let ca = m.dir.join("ca.pem");
    let e = tls_through_connect(&m.proxy, &target, "evil.test", &ca).unwrap_err();
    assert!(e.contains("UnrecognisedName"), "{e}");
    assert_eq!(
        metric(
            &admin,
            "portcullis_mitm_errors_total{kind=\"sni_mismatch\"}"
        ),
        1
    );
    assert!(
        metric(
            &admin,
            "portcullis_mitm_errors_total{kind=\"client_handshake\"}"
        ) >= 2
    );
    assert!(
        m.proxy
            .wait_for_stderr("MITM: client TLS handshake failed", Duration::from_secs(10))
    );

    // The proxy still serves, and a host keeps one leaf (same certificate twice).
    let first = tls_through_connect(&m.proxy, &target, "127.0.0.1", &ca);
    let second = tls_through_connect(&m.proxy, &target, "127.0.0.1", &ca);
    // Clients send no SNI for IP literals; rustls too, so both succeed.
    assert_eq!(first.as_ref().unwrap(), second.as_ref().unwrap());
    let r = via_connect(&m, &[], &format!("https://{target}/after"));
    assert_eq!(r.status, 200, "{}", r.stderr);
}

#[test]
fn exported_files_hold_no_key_and_are_removed_on_sigterm() {
    let origin = https_echo("127.0.0.1");
    let target = format!("127.0.0.1:{}", origin.port());
    let mut m = start(&target, "limited", Some(&origin.ca.pem_path));
    let mut names: Vec<String> = std::fs::read_dir(&m.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["ca-bundle.pem", "ca.pem"]);
    let ca = std::fs::read_to_string(m.dir.join("ca.pem")).unwrap();
    let bundle = std::fs::read_to_string(m.dir.join("ca-bundle.pem")).unwrap();
    assert!(ca.contains("BEGIN CERTIFICATE"));
    assert!(bundle.contains(ca.trim()));
    assert!(!ca.contains("PRIVATE KEY") && !bundle.contains("PRIVATE KEY"));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&m.dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
    let cfg = admin_get(m.proxy.admin_addr(), "/config");
    let cfg: serde_json::Value = serde_json::from_slice(&cfg.body).unwrap();
    assert_eq!(cfg["mitm"]["ca_cert_path"], m.ca());
    m.proxy.signal(libc::SIGTERM);
    assert!(m.proxy.wait_exit(Duration::from_secs(30)).is_some());
    assert!(
        !m.dir.exists(),
        "the directory the proxy created is removed"
    );
}

#[test]
fn full_mode_with_mitm_keeps_raw_tunnels() {
    let origin = https_echo("127.0.0.1");
    let target = format!("127.0.0.1:{}", origin.port());
    let m = start(&target, "full", None);
    // Trusting only the origin's CA works: nothing was intercepted.
    let r = curl(&[
        "--cacert",
        &origin.ca.pem_path.display().to_string(),
        "-x",
        &m.proxy.http_url(),
        &format!("https://{target}/raw"),
    ]);
    assert_eq!(r.status, 200, "{}", r.stderr);
    let _ = TcpStream::connect(&m.proxy.http);
}
