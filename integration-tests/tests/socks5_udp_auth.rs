//! socks5.md §2 (authentication), §3 (request codes) and §6 (UDP ASSOCIATE) against the real
//! proxy with hand-written SOCKS5 clients over real sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use portcullis_integration_tests::{ProxyProcess, blocked};

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to SOCKS5 listener");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn greet_no_auth(s: &mut TcpStream) {
    s.write_all(&[5, 1, 0]).unwrap();
    let mut r = [0u8; 2];
    s.read_exact(&mut r).unwrap();
    assert_eq!(r, [5, 0]);
}

/// Sends a request with IPv4 target; returns REP and BND.
fn request_v4(s: &mut TcpStream, cmd: u8, addr: SocketAddr) -> (u8, SocketAddr) {
    let SocketAddr::V4(v4) = addr else {
        panic!("v4 only")
    };
    let mut req = vec![5, cmd, 0, 1];
    req.extend_from_slice(&v4.ip().octets());
    req.extend_from_slice(&v4.port().to_be_bytes());
    s.write_all(&req).unwrap();
    read_reply(s)
}

fn read_reply(s: &mut TcpStream) -> (u8, SocketAddr) {
    let mut head = [0u8; 4];
    s.read_exact(&mut head).unwrap();
    assert_eq!(head[0], 5);
    assert_eq!(head[3], 1, "BND ATYP 1 expected");
    let mut rest = [0u8; 6];
    s.read_exact(&mut rest).unwrap();
    let ip = std::net::Ipv4Addr::new(rest[0], rest[1], rest[2], rest[3]);
    (
        head[1],
        SocketAddr::from((ip, u16::from_be_bytes([rest[4], rest[5]]))),
    )
}

fn udp_echo() -> (SocketAddr, std::thread::JoinHandle<()>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let addr = sock.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        for _ in 0..64 {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                return;
            };
            let _ = sock.send_to(&buf[..n], from);
        }
    });
    (addr, h)
}

fn datagram(dest: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let SocketAddr::V4(v4) = dest else {
        panic!("v4 only")
    };
    let mut d = vec![0, 0, 0, 1];
    d.extend_from_slice(&v4.ip().octets());
    d.extend_from_slice(&v4.port().to_be_bytes());
    d.extend_from_slice(payload);
    d
}

const BENCH_LIKE: &str =
    "[network]\nallowed_domains = [\"127.0.0.1\"]\nallow_local_binding = true\n";

#[test]
fn udp_associate_relays_allowed_and_drops_denied() {
    let (echo, _h) = udp_echo();
    let (other, _h2) = udp_echo();
    let cfg = format!(
        "[network]\nallowed_domains = [\"127.0.0.1:{}\"]\n",
        echo.port()
    );
    let proxy = ProxyProcess::start(&[], Some(&cfg));
    let mut ctl = connect(proxy.socks5_addr());
    greet_no_auth(&mut ctl);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (rep, relay) = request_v4(&mut ctl, 3, client.local_addr().unwrap());
    assert_eq!(rep, 0);
    assert!(relay.ip().is_loopback(), "relay bound to loopback: {relay}");

    client.send_to(&datagram(echo, b"ping"), relay).unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = client
        .recv_from(&mut buf)
        .expect("echo reply through the relay");
    assert_eq!(from, relay);
    assert_eq!(
        &buf[..n],
        &datagram(echo, b"ping")[..],
        "reply wrapped with the source"
    );
    // From here on, silence is the expected answer.
    client
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();

    // Not allowlisted: dropped, and the refusal is a Decision with protocol socks5_udp.
    client.send_to(&datagram(other, b"nope"), relay).unwrap();
    assert!(
        client.recv_from(&mut buf).is_err(),
        "a denied destination gets nothing"
    );
    let b = blocked(proxy.admin_addr());
    let last = b["blocked"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["protocol"], "socks5_udp");
    assert_eq!(last["reason"], "not_allowed_local");
    assert_eq!(last["method"], serde_json::Value::Null);

    // Fragmented datagrams are dropped.
    let mut frag = datagram(echo, b"frag");
    frag[2] = 1;
    client.send_to(&frag, relay).unwrap();
    assert!(client.recv_from(&mut buf).is_err());

    // A foreign sender (another source port) is ignored.
    let foreign = UdpSocket::bind("127.0.0.1:0").unwrap();
    foreign
        .set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    foreign.send_to(&datagram(echo, b"x"), relay).unwrap();
    assert!(foreign.recv_from(&mut buf).is_err());

    // Closing the control connection ends the association (polled: the proxy notices the
    // close asynchronously).
    drop(ctl);
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut ended = false;
    for _ in 0..20 {
        client.send_to(&datagram(echo, b"late"), relay).unwrap();
        if client.recv_from(&mut buf).is_err() {
            ended = true;
            break;
        }
    }
    assert!(ended, "association ended with its TCP connection");
}

#[test]
fn bind_is_0x07_and_bad_atyp_is_0x08() {
    let proxy = ProxyProcess::start(&[], Some(BENCH_LIKE));
    let mut s = connect(proxy.socks5_addr());
    greet_no_auth(&mut s);
    let (rep, bnd) = request_v4(&mut s, 2, "127.0.0.1:9".parse().unwrap());
    assert_eq!((rep, bnd), (0x07, "0.0.0.0:0".parse().unwrap()));

    let mut s = connect(proxy.socks5_addr());
    greet_no_auth(&mut s);
    s.write_all(&[5, 1, 0, 5, 1, 2, 3, 4, 0, 80]).unwrap();
    let (rep, _) = read_reply(&mut s);
    assert_eq!(rep, 0x08);
}

#[test]
fn greeting_rules() {
    let proxy = ProxyProcess::start(&[], Some(BENCH_LIKE));
    // Not SOCKS5: closed without a reply.
    let mut s = connect(proxy.socks5_addr());
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
    // No methods → 05 FF.
    let mut s = connect(proxy.socks5_addr());
    s.write_all(&[5, 0]).unwrap();
    let mut r = [0u8; 2];
    s.read_exact(&mut r).unwrap();
    assert_eq!(r, [5, 0xff]);
}

#[test]
fn username_password_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let cfg = format!(
        "{BENCH_LIKE}socks_username = \"agent\"\nsocks_password_file = \"{}\"\n",
        pw.display()
    );
    let proxy = ProxyProcess::start(&[], Some(&cfg));
    let auth = |user: &[u8], pass: &[u8]| {
        let mut s = connect(proxy.socks5_addr());
        s.write_all(&[5, 2, 0, 2]).unwrap();
        let mut r = [0u8; 2];
        s.read_exact(&mut r).unwrap();
        assert_eq!(r, [5, 2]);
        let mut msg = vec![1, user.len() as u8];
        msg.extend_from_slice(user);
        msg.push(pass.len() as u8);
        msg.extend_from_slice(pass);
        s.write_all(&msg).unwrap();
        s.read_exact(&mut r).unwrap();
        r
    };
    assert_eq!(auth(b"agent", b"s3cret"), [1, 0]);
    assert_eq!(auth(b"agent", b"wrong"), [1, 1]);
    assert_eq!(auth(b"other", b"s3cret"), [1, 1]);
    // Configured auth: offering only "no auth" is refused.
    let mut s = connect(proxy.socks5_addr());
    s.write_all(&[5, 1, 0]).unwrap();
    let mut r = [0u8; 2];
    s.read_exact(&mut r).unwrap();
    assert_eq!(r, [5, 0xff]);
}

#[test]
fn password_file_readable_by_others_is_a_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let cfg = format!(
        "{BENCH_LIKE}socks_username = \"agent\"\nsocks_password_file = \"{}\"\n",
        pw.display()
    );
    let (status, _out, err) = portcullis_integration_tests::run_to_exit(&[], Some(&cfg));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("accessible by other users"), "{err}");
}

#[test]
fn tunnel_64mib_sha256_through_socks5() {
    use portcullis_integration_tests::origin::{sha256_hex, tcp_sink};
    let sink = tcp_sink("127.0.0.1");
    let allow = format!("127.0.0.1:{}", sink.port());
    let proxy = ProxyProcess::start(&["--allow", &allow], None);
    let mut s = connect(proxy.socks5_addr());
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    greet_no_auth(&mut s);
    let (rep, bnd) = request_v4(&mut s, 1, allow.parse().unwrap());
    assert_eq!(rep, 0);
    assert!(
        bnd.ip().is_loopback(),
        "BND is the outbound socket's local address: {bnd}"
    );
    let data: Vec<u8> = (0..64usize << 20)
        .map(|i| (i * 7 + i / 4093) as u8)
        .collect();
    let want = sha256_hex(&data);
    let writer = {
        let mut w = s.try_clone().unwrap();
        std::thread::spawn(move || {
            for chunk in data.chunks(1 << 20) {
                w.write_all(chunk).unwrap();
            }
            w.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert_eq!(String::from_utf8_lossy(&got), want);
}

#[test]
fn ipv6_targets_and_malformed_greetings() {
    let proxy = ProxyProcess::start(&[], None);
    // IPv6 loopback literal with local binding off: a policy refusal (0x02) with a Decision.
    let mut s = connect(proxy.socks5_addr());
    greet_no_auth(&mut s);
    let mut req = vec![5, 1, 0, 4];
    req.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    req.extend_from_slice(&80u16.to_be_bytes());
    s.write_all(&req).unwrap();
    let (rep, _) = read_reply(&mut s);
    assert_eq!(rep, 0x02);
    let b = blocked(proxy.admin_addr());
    let last = b["blocked"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["host"].as_str(), last["reason"].as_str()),
        (Some("::1"), Some("not_allowed_local"))
    );
    assert_eq!(last["protocol"], "socks5_tcp");

    // A domain target that is an IPv6 text with a port suffix is invalid: 0x01, no Decision.
    let before = blocked(proxy.admin_addr())["total"].as_u64().unwrap();
    let mut s = connect(proxy.socks5_addr());
    greet_no_auth(&mut s);
    let name = b"example.test:443";
    let mut req = vec![5, 1, 0, 3, name.len() as u8];
    req.extend_from_slice(name);
    req.extend_from_slice(&443u16.to_be_bytes());
    s.write_all(&req).unwrap();
    let (rep, _) = read_reply(&mut s);
    assert_eq!(rep, 0x01);
    assert_eq!(
        blocked(proxy.admin_addr())["total"].as_u64().unwrap(),
        before
    );

    // Bad version in the request: closed without a reply.
    let mut s = connect(proxy.socks5_addr());
    greet_no_auth(&mut s);
    s.write_all(&[4, 1, 0, 1, 127, 0, 0, 1, 0, 80]).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0);

    // Truncated greeting: the proxy waits (bounded by the handshake timeout), never crashes.
    let mut s = connect(proxy.socks5_addr());
    s.write_all(&[5, 3, 0]).unwrap();
    drop(s);
    let r = portcullis_integration_tests::admin_get(proxy.admin_addr(), "/health");
    assert_eq!(r.status, 200, "still serving after hostile greetings");
}

#[test]
fn curl_socks5_ip_and_hostname() {
    use portcullis_integration_tests::curl;
    use portcullis_integration_tests::origin::http_echo;
    let origin = http_echo("127.0.0.1");
    let allow = format!("127.0.0.1:{}", origin.port());
    let proxy = ProxyProcess::start(&["--allow", &allow, "--deny", "denied.test"], None);
    let url = format!("http://{allow}/x");
    let r = curl(&["--socks5", proxy.socks5_addr(), &url]);
    assert_eq!(r.status, 200, "curl --socks5 (IP)");
    let r = curl(&["--socks5-hostname", proxy.socks5_addr(), &url]);
    assert_eq!(r.status, 200, "curl --socks5-hostname");
    let r = curl(&[
        "--socks5-hostname",
        proxy.socks5_addr(),
        "http://denied.test/",
    ]);
    assert_ne!(r.exit_code, 0);
    let b = blocked(proxy.admin_addr());
    let last = b["blocked"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["reason"].as_str(), last["protocol"].as_str()),
        (Some("denied"), Some("socks5_tcp"))
    );
}
