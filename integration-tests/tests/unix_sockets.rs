//! unix-sockets.md: `x-unix-socket` forwarding through the real proxy, with a real HTTP origin
//! listening on a unix socket in a fresh temporary directory.

use std::path::{Path, PathBuf};

use portcullis_integration_tests::origin::{read_head, runtime};
use portcullis_integration_tests::{ProxyProcess, admin_post, blocked, curl, raw_request};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;

/// An HTTP origin on a unix socket that answers every request with a JSON echo of its head.
struct UnixOrigin {
    path: PathBuf,
    _task: tokio::task::JoinHandle<()>,
}

fn unix_origin(path: &Path) -> UnixOrigin {
    let listener = {
        let _g = runtime().enter();
        UnixListener::bind(path).expect("bind unix origin")
    };
    let task = runtime().spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let Some((head, _)) = read_head(&mut s).await else { return };
                let body = serde_json::json!({
                    "method": head.method,
                    "target": head.target,
                    "headers": head.headers,
                })
                .to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    UnixOrigin {
        path: path.to_path_buf(),
        _task: task,
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("pc-unix")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

fn via(
    proxy: &ProxyProcess,
    socket: &str,
    extra: &[&str],
    url: &str,
) -> portcullis_integration_tests::CurlResult {
    let px = proxy.http_url();
    let header = format!("x-unix-socket: {socket}");
    let mut args = vec!["-x", &px, "-H", &header];
    args.extend_from_slice(extra);
    args.push(url);
    curl(&args)
}

fn config_allow(path: &Path) -> String {
    format!("[network]\nallow_unix_sockets = [\"{}\"]\n", path.display())
}

#[test]
fn allowed_exact_path_forwards() {
    let dir = tempdir();
    let sock = dir.path().join("app.sock");
    let _o = unix_origin(&sock);
    let proxy = ProxyProcess::start(&[], Some(&config_allow(&sock)));
    let r = via(
        &proxy,
        sock.to_str().unwrap(),
        &[],
        "http://localhost/v1.43/info?x=1",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let echo = r.json();
    assert_eq!(echo["target"], "/v1.43/info?x=1");
    let headers = echo["headers"].as_array().unwrap();
    assert!(
        !headers
            .iter()
            .any(|h| h[0].as_str().unwrap().eq_ignore_ascii_case("x-unix-socket")),
        "the origin must not see x-unix-socket: {headers:?}"
    );
    assert!(
        headers
            .iter()
            .any(|h| h[0].as_str().unwrap().eq_ignore_ascii_case("host") && h[1] == "localhost")
    );
    let _ = &_o.path;
}

#[test]
fn origin_form_with_header_forwards() {
    let dir = tempdir();
    let sock = dir.path().join("app.sock");
    let _o = unix_origin(&sock);
    let proxy = ProxyProcess::start(&[], Some(&config_allow(&sock)));
    let req = format!(
        "GET /info HTTP/1.1\r\nHost: localhost\r\nx-unix-socket: {}\r\nConnection: close\r\n\r\n",
        sock.display()
    );
    let r = raw_request(&proxy.http, req.as_bytes()).expect("response");
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn symlinks_and_dotdot_are_canonicalised() {
    let dir = tempdir();
    std::fs::create_dir(dir.path().join("x")).unwrap();
    let sock = dir.path().join("app.sock");
    let _o = unix_origin(&sock);
    let link = dir.path().join("link.sock");
    std::os::unix::fs::symlink(&sock, &link).unwrap();
    // Entry = real path, request via the symlink and via `..`.
    let proxy = ProxyProcess::start(&[], Some(&config_allow(&sock)));
    let r = via(&proxy, link.to_str().unwrap(), &[], "http://localhost/");
    assert_eq!(
        r.status,
        200,
        "symlink_to_allowed_socket_is_allowed: {}",
        r.text()
    );
    let dotdot = format!("{}/x/../app.sock", dir.path().display());
    let r = via(&proxy, &dotdot, &[], "http://localhost/");
    assert_eq!(
        r.status,
        200,
        "dotdot_spelling_is_canonicalised: {}",
        r.text()
    );
    drop(proxy);
    // Entry = symlink, request = real path.
    let proxy = ProxyProcess::start(&[], Some(&config_allow(&link)));
    let r = via(&proxy, sock.to_str().unwrap(), &[], "http://localhost/");
    assert_eq!(
        r.status,
        200,
        "allowed_symlink_entry_matches_real_path: {}",
        r.text()
    );
}

#[test]
fn not_allowlisted_is_403() {
    let dir = tempdir();
    let sock = dir.path().join("app.sock");
    let _o = unix_origin(&sock);
    let proxy = ProxyProcess::start(&[], None);
    let path = sock.to_str().unwrap();
    let r = via(&proxy, path, &[], "http://localhost/");
    assert_eq!(r.status, 403);
    assert_eq!(r.header("x-proxy-error"), Some("blocked-by-allowlist"));
    let text = r.text();
    let line1 = text.lines().next().unwrap();
    assert!(
        line1.contains(r#""protocol":"unix_socket","host":"unix-socket","port":0"#),
        "{line1}"
    );
    assert_eq!(
        text.lines().nth(1).unwrap(),
        format!(
            "Portcullis blocked this request: unix socket {path} is not in the unix-socket allowlist. Ask the operator to approve it; do not retry through another route."
        )
    );
    let r = via(
        &proxy,
        path,
        &["-H", "Accept: application/json"],
        "http://localhost/",
    );
    assert_eq!(r.json()["host"], "unix-socket");
    let b = blocked(proxy.admin_addr());
    let last = b["blocked"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["socket_path"], path);
    assert_eq!(last["protocol"], "unix_socket");
}

#[test]
fn relative_path_is_403_even_with_allow_all() {
    let proxy = ProxyProcess::start(
        &[],
        Some("[network]\ndangerously_allow_all_unix_sockets = true\n"),
    );
    let r = via(&proxy, "app.sock", &[], "http://localhost/");
    assert_eq!(r.status, 403);
    assert!(
        r.text()
            .contains("unix socket app.sock is not an absolute path."),
        "{}",
        r.text()
    );
}

#[test]
fn deny_entry_beats_allow_all() {
    let dir = tempdir();
    let denied = dir.path().join("denied.sock");
    let other = dir.path().join("other.sock");
    let _a = unix_origin(&denied);
    let _b = unix_origin(&other);
    let cfg = format!(
        "[network]\ndangerously_allow_all_unix_sockets = true\n[network.unix_sockets]\n\"{}\" = \"deny\"\n",
        denied.display()
    );
    let proxy = ProxyProcess::start(&[], Some(&cfg));
    let r = via(&proxy, denied.to_str().unwrap(), &[], "http://localhost/");
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.header("x-proxy-error"), Some("blocked-by-denylist"));
    let r = via(&proxy, other.to_str().unwrap(), &[], "http://localhost/");
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn invalid_header_is_400_and_connect_with_header_is_400() {
    let dir = tempdir();
    let sock = dir.path().join("app.sock");
    let _o = unix_origin(&sock);
    let proxy = ProxyProcess::start(&[], Some(&config_allow(&sock)));
    let long = format!("/{}", "a".repeat(5000));
    let s = sock.display().to_string();
    let cases: Vec<(String, &str)> = vec![
        (
            "GET /x HTTP/1.1\r\nHost: localhost\r\nx-unix-socket: \r\n\r\n".to_string(),
            "empty",
        ),
        (
            format!(
                "GET /x HTTP/1.1\r\nHost: localhost\r\nx-unix-socket: {s}\r\nx-unix-socket: {s}\r\n\r\n"
            ),
            "two fields",
        ),
        (
            format!("GET /x HTTP/1.1\r\nHost: localhost\r\nx-unix-socket: {long}\r\n\r\n"),
            "5000 bytes",
        ),
        (
            format!(
                "CONNECT localhost:80 HTTP/1.1\r\nHost: localhost:80\r\nx-unix-socket: {s}\r\n\r\n"
            ),
            "CONNECT",
        ),
    ];
    for (req, what) in cases {
        let r = raw_request(&proxy.http, req.as_bytes()).expect("response");
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert_eq!(r.header("x-portcullis-decision-id"), None, "{what}");
    }
    // Non-UTF-8 bytes in the value.
    let mut req =
        b"GET /x HTTP/1.1\r\nHost: localhost\r\nx-unix-socket: /tmp/\xff\xfe\r\n\r\n".to_vec();
    req.extend_from_slice(b"");
    let r = raw_request(&proxy.http, &req).expect("response");
    assert_eq!(r.status, 400);
}

#[test]
fn missing_socket_and_plain_file_are_502() {
    let dir = tempdir();
    let missing = dir.path().join("missing.sock");
    let plain = dir.path().join("plain.sock");
    std::fs::write(&plain, b"not a socket").unwrap();
    let cfg = format!(
        "[network]\nallow_unix_sockets = [\"{}\", \"{}\"]\n",
        missing.display(),
        plain.display()
    );
    let proxy = ProxyProcess::start(&[], Some(&cfg));
    for p in [&missing, &plain] {
        let r = via(&proxy, p.to_str().unwrap(), &[], "http://localhost/");
        assert_eq!(r.status, 502, "{}", r.text());
        assert_eq!(r.header("x-proxy-error"), Some("upstream-connect-failed"));
        assert!(
            r.text()
                .starts_with("upstream-connect-failed: unix socket connect failed"),
            "{}",
            r.text()
        );
    }
}

#[test]
fn limited_mode_get_ok_post_403_and_disabled_503() {
    let dir = tempdir();
    let sock = dir.path().join("app.sock");
    let _o = unix_origin(&sock);
    let cfg = format!("{}mode = \"limited\"\n", config_allow(&sock));
    let proxy = ProxyProcess::start(&[], Some(&cfg));
    let path = sock.to_str().unwrap();
    let r = via(&proxy, path, &[], "http://localhost/");
    assert_eq!(r.status, 200);
    let r = via(
        &proxy,
        path,
        &["-X", "POST", "-d", "x"],
        "http://localhost/",
    );
    assert_eq!(r.status, 403);
    assert_eq!(r.header("x-proxy-error"), Some("blocked-by-method-policy"));
    assert!(r.text().contains(
        r#""reason":"method_not_allowed","source":"mode_guard","protocol":"unix_socket""#
    ));
    let r = admin_post(proxy.admin_addr(), "/mode", r#"{"mode":"full"}"#);
    assert_eq!(r.status, 200);
    let r = via(
        &proxy,
        path,
        &["-X", "POST", "-d", "x"],
        "http://localhost/",
    );
    assert_eq!(r.status, 200);
    drop(proxy);
    let cfg = format!("{}enabled = false\n", config_allow(&sock));
    let proxy = ProxyProcess::start(&[], Some(&cfg));
    let r = via(&proxy, path, &[], "http://localhost/");
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-proxy-error"), Some("proxy-disabled"));
}

#[test]
fn listeners_forced_to_loopback_when_sockets_allowed() {
    let cfg = "[network]\ndangerously_allow_non_loopback_proxy = true\nallow_unix_sockets = [\"/tmp/x.sock\"]\n";
    let proxy = ProxyProcess::start(&["--http", "0.0.0.0:0", "--socks5", "0.0.0.0:0"], Some(cfg));
    assert!(proxy.http.starts_with("127.0.0.1:"), "{}", proxy.http);
    assert!(proxy.socks5.as_deref().unwrap().starts_with("127.0.0.1:"));
}

#[test]
fn upgrade_tcp_relays_bytes() {
    use std::io::{Read, Write};
    let dir = tempdir();
    let sock = dir.path().join("up.sock");
    let listener = {
        let _g = runtime().enter();
        UnixListener::bind(&sock).expect("bind")
    };
    let _task = runtime().spawn(async move {
        use tokio::io::AsyncReadExt;
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let Some((head, _)) = read_head(&mut s).await else {
            return;
        };
        assert!(
            head.headers
                .iter()
                .any(|(k, v)| k.eq_ignore_ascii_case("upgrade") && v == "tcp")
        );
        let _ = s
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n",
            )
            .await;
        let mut buf = [0u8; 64];
        for _ in 0..16 {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let _ = s.write_all(&buf[..n]).await;
                }
            }
        }
    });
    let proxy = ProxyProcess::start(&[], Some(&config_allow(&sock)));
    let mut s = std::net::TcpStream::connect(&proxy.http).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let req = format!(
        "GET /attach HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nx-unix-socket: {}\r\n\r\n",
        sock.display()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: tcp"), "{head}");
    s.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
}
