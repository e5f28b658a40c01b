//! Fault injection (issue 12 item 2) against the real binaries, each fault ending in the
//! documented fail-closed answer with nothing lost: a DNS server answering SERVFAIL, DNS answers
//! that flip between lookups, an origin that resets (TCP RST) mid-body, the control plane
//! SIGKILLed while it pushes snapshots, I/O errors (disk full, read-only file system) while a
//! rule is persisted, and a stalled OTLP collector behind the control plane.
//!
//! Already covered elsewhere and not repeated here: DNS timeout / NXDOMAIN / rebinding inside one
//! lookup (`dns_policy.rs`), control killed mid-ask (`control_attach.rs`), crash at each
//! rule-write step and a lock failure on an ALWAYS answer (`rules_file.rs`), the proxy's own
//! collector down or stalled (`audit.rs`).
//!
//! All traffic stays on 127.0.0.0/8: addresses outside it only ever appear in DNS answers that
//! policy refuses before anything is dialled.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portcullis::proto::v1;
use portcullis_integration_tests::control::ControlSpec;
use portcullis_integration_tests::origin::{
    PARTIAL_LEN, Partial, http_echo, http_echo_at, never_answer, reset_mid_body, runtime, tcp_echo,
};
use portcullis_integration_tests::proxy::{control_bin, control_fault_bin};
use portcullis_integration_tests::raw::{connect, read_response, read_response_opts};
use portcullis_integration_tests::{
    ControlProcess, DnsServer, END_NO, PREFIX, ProxyProcess, RawResponse, admin_get, blocked, curl,
};

const A: u16 = 1;
const WAIT: Duration = Duration::from_secs(20);

fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

/// Polls (bounded: 60 s) until `f` holds.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn get(proxy: &ProxyProcess, authority: &str) -> RawResponse {
    let req = format!("GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    let mut s = connect(&proxy.http);
    s.write_all(req.as_bytes()).unwrap();
    read_response(&mut s).expect("response")
}

fn connect_req(proxy: &ProxyProcess, authority: &str) -> RawResponse {
    let mut s = connect(&proxy.http);
    let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    read_response(&mut s).expect("response")
}

/// SOCKS5 greeting (no auth) and CONNECT with `addr` (ATYP 1 or 3 already encoded, port
/// appended here); returns the stream and the REP byte (`None` when closed early).
fn socks_connect(proxy: &ProxyProcess, atyp_addr: &[u8], port: u16) -> (TcpStream, Option<u8>) {
    let mut s = connect(proxy.socks5_addr());
    s.write_all(&[5, 1, 0]).unwrap();
    let mut g = [0u8; 2];
    s.read_exact(&mut g).unwrap();
    assert_eq!(g, [5, 0], "greeting answer");
    let mut req = vec![5, 1, 0];
    req.extend_from_slice(atyp_addr);
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).unwrap();
    let mut head = [0u8; 4];
    if s.read_exact(&mut head).is_err() {
        return (s, None);
    }
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        _ => 0,
    };
    let mut tail = vec![0u8; rest];
    let _ = s.read_exact(&mut tail);
    (s, Some(head[1]))
}

fn socks_name(name: &str) -> Vec<u8> {
    let mut v = vec![3, name.len() as u8];
    v.extend_from_slice(name.as_bytes());
    v
}

/// Line 1 of a Decision body, parsed.
fn line1(r: &RawResponse) -> serde_json::Value {
    let first = r.text().lines().next().unwrap_or("").to_string();
    let json = first
        .strip_prefix("PORTCULLIS_POLICY_DECISION ")
        .unwrap_or_else(|| panic!("not a Decision body: {:?}", r.text()));
    serde_json::from_str(json).unwrap()
}

/// One Prometheus sample from the proxy's `/metrics` (`series` includes the labels).
fn metric(admin: &str, series: &str) -> i64 {
    let text = admin_get(admin, "/metrics").text();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no series {series} in /metrics:\n{text}"))
}

// ---------------------------------------------------------------------------------------------
// 1. DNS SERVFAIL

/// policy.md §4 step 5.2 / decisions.md §5: a lookup error fails closed. Without local binding
/// the Decision is `not_allowed_local` "could not be resolved (lookup failed)" on every
/// protocol; with it, the request fails as an upstream error (502, SOCKS 0x04). Nothing is
/// dialled either way.
#[test]
fn dns_servfail_fails_closed_and_dials_nothing() {
    let origin = http_echo("127.0.0.1");
    let dns = DnsServer::start();
    dns.set_servfail("broken.test");
    let authority = format!("broken.test:{}", origin.port());
    let cfg = |network: &str| {
        format!(
            "[network]\ndns_servers = [\"{}\"]\n{network}\n",
            dns.addr_string()
        )
    };
    let proxy = ProxyProcess::start(&["--allow", "broken.test"], Some(&cfg("")));
    let expected = format!(
        "{PREFIX}broken.test could not be resolved (lookup failed), so its addresses cannot be checked. {END_NO}"
    );
    for (what, r) in [
        ("absolute-form", get(&proxy, &authority)),
        ("CONNECT", connect_req(&proxy, &authority)),
    ] {
        assert_eq!(r.status, 403, "{what}: {}", r.text());
        let d = line1(&r);
        assert_eq!(d["decision"], "deny", "{what}");
        assert_eq!(d["reason"], "not_allowed_local", "{what}");
        assert!(r.text().contains(&expected), "{what}: {}", r.text());
    }
    let (_s, rep) = socks_connect(&proxy, &socks_name("broken.test"), origin.port());
    assert_eq!(rep, Some(0x02), "SOCKS5: connection not allowed by ruleset");
    let b = blocked(proxy.admin_addr());
    assert_eq!(b["total"], 3, "{b}");
    for e in b["blocked"].as_array().unwrap() {
        assert_eq!(e["reason"], "not_allowed_local", "{e}");
        assert_eq!(
            e["address"],
            serde_json::Value::Null,
            "no address exists: {e}"
        );
    }
    assert!(
        dns.query_count("broken.test") >= 1,
        "the name was looked up"
    );

    // With local binding: the Decision is allow, the request an upstream failure.
    let proxy = ProxyProcess::start(
        &["--allow", "broken.test"],
        Some(&cfg("allow_local_binding = true")),
    );
    let r = get(&proxy, &authority);
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.header("x-proxy-error"), Some("upstream-connect-failed"));
    assert_eq!(r.header("x-portcullis-decision-id"), None, "not a block");
    let r = connect_req(&proxy, &authority);
    assert_eq!(r.status, 502, "{}", r.text());
    let (_s, rep) = socks_connect(&proxy, &socks_name("broken.test"), origin.port());
    assert_eq!(rep, Some(0x04), "SOCKS5: host unreachable");
    assert_eq!(blocked(proxy.admin_addr())["total"], 0);
    assert_eq!(origin.connections(), 0, "nothing was dialled");
}

// ---------------------------------------------------------------------------------------------
// 2. DNS answers that flip between lookups

/// Without local binding, a name whose answer alternates between 127.0.0.1 and 10.0.0.1 (TTL 0,
/// so every request looks it up): each request makes exactly one lookup, is blocked
/// `not_allowed_local`, and its Decision names the address of *its* answer. Nothing is dialled.
#[test]
fn dns_flipping_answers_each_request_judged_on_its_own_lookup() {
    let origin = http_echo("127.0.0.1");
    let dns = DnsServer::start();
    dns.set_ttl(0);
    let answers: Vec<IpAddr> = (0..6)
        .map(|i| {
            if i % 2 == 0 {
                ip(127, 0, 0, 1)
            } else {
                ip(10, 0, 0, 1)
            }
        })
        .collect();
    let seq: Vec<Vec<IpAddr>> = answers.iter().map(|a| vec![*a]).collect();
    dns.set_sequence("flip.test", &seq);
    let proxy = ProxyProcess::start(
        &["--allow", "flip.test"],
        Some(&format!(
            "[network]\ndns_servers = [\"{}\"]\n",
            dns.addr_string()
        )),
    );
    let authority = format!("flip.test:{}", origin.port());
    for (i, want) in answers.iter().enumerate() {
        let r = if i % 3 == 2 {
            connect_req(&proxy, &authority)
        } else {
            get(&proxy, &authority)
        };
        assert_eq!(r.status, 403, "request {i}: {}", r.text());
        assert_eq!(line1(&r)["reason"], "not_allowed_local", "request {i}");
        assert!(
            r.text().contains(&format!(
                "{PREFIX}{authority} resolves to the local or private address {want}. {END_NO}"
            )),
            "request {i} is judged on its own answer {want}: {}",
            r.text()
        );
        assert_eq!(
            dns.query_count_type("flip.test", A),
            i + 1,
            "request {i}: exactly one lookup"
        );
        let b = blocked(proxy.admin_addr());
        assert_eq!(b["blocked"][i]["address"], want.to_string(), "{b}");
    }
    assert_eq!(origin.connections(), 0, "nothing was dialled");
}

/// With local binding, answers cycle over 127.0.0.1, 127.0.0.2 and 127.0.0.3 (the last denied
/// by a CIDR entry), with an origin on the same port at each address. On ONE keep-alive client
/// connection (so the per-client upstream pool is exercised too) every request makes exactly one
/// lookup and reaches exactly the origin at the address that lookup returned; the denied answer
/// is blocked `denied` naming 127.0.0.3, whose origin never sees a connection.
#[test]
fn dns_flipping_answers_dial_exactly_the_checked_address() {
    let mut trio = None;
    for _ in 0..20 {
        let two = http_echo("127.0.0.2");
        let (Ok(one), Ok(three)) = (
            http_echo_at("127.0.0.1", two.port()),
            http_echo_at("127.0.0.3", two.port()),
        ) else {
            continue;
        };
        trio = Some([one, two, three]);
        break;
    }
    let origins = trio.expect("bind origins on 127.0.0.1, .2 and .3 with one port");
    let port = origins[0].port();
    let order = [1u8, 2, 3, 2, 1, 3, 1];
    let dns = DnsServer::start();
    dns.set_ttl(0);
    let seq: Vec<Vec<IpAddr>> = order.iter().map(|&n| vec![ip(127, 0, 0, n)]).collect();
    dns.set_sequence("flip.test", &seq);
    let proxy = ProxyProcess::start(
        &["--allow", "flip.test", "--deny", "127.0.0.3/32"],
        Some(&format!(
            "[network]\ndns_servers = [\"{}\"]\nallow_local_binding = true\n",
            dns.addr_string()
        )),
    );
    let authority = format!("flip.test:{port}");
    let mut s = connect(&proxy.http);
    let mut seen = [0usize; 3];
    let mut denied = 0;
    for (i, &n) in order.iter().enumerate() {
        let req = format!("GET http://{authority}/r{i} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let r = read_response(&mut s).unwrap_or_else(|| panic!("request {i}: no response"));
        assert_eq!(
            dns.query_count_type("flip.test", A),
            i + 1,
            "request {i}: exactly one lookup"
        );
        if n == 3 {
            assert_eq!(r.status, 403, "request {i}: {}", r.text());
            assert_eq!(line1(&r)["reason"], "denied", "request {i}");
            let b = blocked(proxy.admin_addr());
            assert_eq!(b["blocked"][denied]["address"], "127.0.0.3", "{b}");
            assert_eq!(b["blocked"][denied]["rule"], "127.0.0.3/32", "{b}");
            denied += 1;
        } else {
            assert_eq!(r.status, 200, "request {i}: {}", r.text());
            seen[usize::from(n) - 1] += 1;
            let last = origins[usize::from(n) - 1].requests();
            assert_eq!(
                last.last().map(|v| v["path"].clone()),
                Some(serde_json::json!(format!("/r{i}"))),
                "request {i} reached 127.0.0.{n}"
            );
        }
        for (k, o) in origins.iter().enumerate() {
            assert_eq!(
                o.requests().len(),
                seen[k],
                "after request {i}: origin 127.0.0.{} saw only its own requests",
                k + 1
            );
        }
    }
    assert_eq!(origins[2].connections(), 0, "127.0.0.3 was never dialled");
}

// ---------------------------------------------------------------------------------------------
// 3. Origin that resets mid-body

/// Reads until EOF or a reset; `true` when the stream ended (not a read timeout) within 20 s.
fn sees_end(s: &mut TcpStream, sink: &mut Vec<u8>) -> bool {
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 65536];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => sink.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Reads exactly `n` bytes (the part the origin sent before its reset).
fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v)
        .unwrap_or_else(|e| panic!("reading the {n} bytes sent before the reset: {e}"));
    v
}

/// Decodes as much of a chunked body as `raw` holds: (data bytes, saw the last chunk).
fn dechunk(raw: &[u8]) -> (usize, bool) {
    let mut i = 0;
    let mut data = 0;
    loop {
        let Some(eol) = raw[i..].windows(2).position(|w| w == b"\r\n") else {
            return (data, false);
        };
        let line = String::from_utf8_lossy(&raw[i..i + eol]).into_owned();
        let Ok(size) = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
        else {
            return (data, false);
        };
        i += eol + 2;
        if size == 0 {
            return (data, true);
        }
        let have = raw.len().saturating_sub(i).min(size);
        data += have;
        if have < size {
            return (data, false);
        }
        i += size + 2;
        if i > raw.len() {
            return (data, false);
        }
    }
}

/// An origin that sends part of its answer and then resets the connection: over absolute-form
/// the client never receives a response that looks complete (short Content-Length body, or no
/// last chunk, then the connection closes); over CONNECT and SOCKS5 the tunnel ends. The proxy
/// serves the next requests, its gauges return to zero, every request has exactly one allow
/// Decision, and both HTTP aborts are counted as `upstream_errors_total{kind="aborted"}`.
#[test]
fn origin_reset_mid_body_is_never_presented_as_complete() {
    let (cl, cl_reset) = reset_mid_body("127.0.0.1", Partial::ContentLength);
    let (chunked, chunked_reset) = reset_mid_body("127.0.0.1", Partial::Chunked);
    let (raw, raw_reset) = reset_mid_body("127.0.0.1", Partial::Raw);
    let healthy = http_echo("127.0.0.1");
    let echo = tcp_echo("127.0.0.1");
    let allow: Vec<String> = [&cl, &chunked, &raw, &healthy, &echo]
        .iter()
        .map(|o| format!("127.0.0.1:{}", o.port()))
        .collect();
    let mut args = Vec::new();
    for a in &allow {
        args.push("--allow");
        args.push(a.as_str());
    }
    let proxy = ProxyProcess::start(&args, None);
    let admin = proxy.admin_addr().to_string();

    // Content-Length: 1 MiB announced, 64 KiB sent, then RST.
    let mut s = connect(&proxy.http);
    let req = format!("GET http://{0}/ HTTP/1.1\r\nHost: {0}\r\n\r\n", allow[0]);
    s.write_all(req.as_bytes()).unwrap();
    let r = read_response_opts(&mut s, true).expect("response head");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("1048576"));
    let mut body = read_n(&mut s, PARTIAL_LEN);
    cl_reset.add_permits(1);
    assert!(sees_end(&mut s, &mut body), "the client connection ends");
    assert!(
        body.len() < 1_048_576,
        "short body ({} bytes) then closed: never complete",
        body.len()
    );

    // Chunked: one chunk, then RST: the client never sees the last chunk.
    let mut s = connect(&proxy.http);
    let req = format!("GET http://{0}/ HTTP/1.1\r\nHost: {0}\r\n\r\n", allow[1]);
    s.write_all(req.as_bytes()).unwrap();
    let r = read_response_opts(&mut s, true).expect("response head");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    let mut wire = Vec::new();
    let mut buf = [0u8; 65536];
    let deadline = Instant::now() + WAIT;
    while dechunk(&wire).0 < PARTIAL_LEN {
        assert!(Instant::now() < deadline, "the sent chunk arrives");
        match s.read(&mut buf) {
            Ok(0) | Err(_) => panic!("closed before the sent chunk arrived"),
            Ok(n) => wire.extend_from_slice(&buf[..n]),
        }
    }
    chunked_reset.add_permits(1);
    assert!(sees_end(&mut s, &mut wire), "the client connection ends");
    let (data, last) = dechunk(&wire);
    assert_eq!(data, PARTIAL_LEN, "exactly the bytes the origin sent");
    assert!(
        !last,
        "no terminating chunk: the body is not presented as complete"
    );

    // CONNECT tunnel: 64 KiB arrive, then the tunnel ends.
    let mut s = connect(&proxy.http);
    let req = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", allow[2]);
    s.write_all(req.as_bytes()).unwrap();
    let r = read_response_opts(&mut s, true).expect("CONNECT response");
    assert_eq!(r.status, 200);
    let mut got = read_n(&mut s, PARTIAL_LEN);
    raw_reset.add_permits(1);
    assert!(sees_end(&mut s, &mut got), "the CONNECT tunnel ends");
    assert_eq!(got.len(), PARTIAL_LEN);
    drop(s);

    // SOCKS5 tunnel: the same.
    let (mut s, rep) = socks_connect(&proxy, &[1, 127, 0, 0, 1], raw.port());
    assert_eq!(rep, Some(0));
    let mut got = read_n(&mut s, PARTIAL_LEN);
    raw_reset.add_permits(1);
    assert!(sees_end(&mut s, &mut got), "the SOCKS5 tunnel ends");
    assert_eq!(got.len(), PARTIAL_LEN);
    drop(s);

    // The proxy keeps serving: absolute-form, CONNECT and SOCKS5 to healthy origins.
    let r = get(&proxy, &allow[3]);
    assert_eq!(r.status, 200, "{}", r.text());
    let mut s = connect(&proxy.http);
    let req = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", allow[4]);
    s.write_all(req.as_bytes()).unwrap();
    assert_eq!(
        read_response_opts(&mut s, true).expect("CONNECT").status,
        200
    );
    s.write_all(b"ping").unwrap();
    assert_eq!(read_n(&mut s, 4), b"ping");
    drop(s);
    let (mut s, rep) = socks_connect(&proxy, &[1, 127, 0, 0, 1], echo.port());
    assert_eq!(rep, Some(0));
    s.write_all(b"pong").unwrap();
    assert_eq!(read_n(&mut s, 4), b"pong");
    drop(s);

    // Counters: gauges back to zero, one allow per request, no blocks, both HTTP aborts counted.
    eventually("tunnels and client connections closed", || {
        metric(
            &admin,
            "portcullis_active_tunnels{protocol=\"https_connect\"}",
        ) == 0
            && metric(&admin, "portcullis_active_tunnels{protocol=\"socks5_tcp\"}") == 0
            && metric(&admin, "portcullis_active_connections{listener=\"http\"}") == 0
            && metric(&admin, "portcullis_active_connections{listener=\"socks5\"}") == 0
    });
    for (protocol, n) in [("http", 3), ("https_connect", 2), ("socks5_tcp", 2)] {
        assert_eq!(
            metric(
                &admin,
                &format!("portcullis_requests_total{{protocol=\"{protocol}\"}}")
            ),
            n,
            "{protocol} requests"
        );
        assert_eq!(
            metric(
                &admin,
                &format!(
                    "portcullis_decisions_total{{protocol=\"{protocol}\",decision=\"allow\"}}"
                )
            ),
            n,
            "{protocol}: one allow Decision per request"
        );
    }
    assert_eq!(blocked(&admin)["total"], 0);
    assert_eq!(
        metric(&admin, "portcullis_upstream_errors_total{kind=\"aborted\"}"),
        2,
        "both HTTP responses cut by a reset are counted"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Control plane SIGKILLed during snapshot pushes

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn allow_rule(host: &str) -> v1::AddRuleRequest {
    v1::AddRuleRequest {
        host: host.into(),
        protocol: "http".into(),
        decision: "allow".into(),
        ..Default::default()
    }
}

/// Three proxies attached; AddRule in a loop; the control plane is SIGKILLed mid-loop and
/// restarted on the same state directory, rules file and address. The file parses and holds
/// exactly the rules whose AddRule returned OK (plus at most the one in flight), every proxy
/// re-attaches and acks the new instance's snapshot, and enforcement matches the file.
#[test]
fn control_killed_during_snapshot_pushes_loses_no_acknowledged_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("portcullis.rules");
    let listen = format!("127.0.0.1:{}", free_port());
    let config = "[network]\nallow_local_binding = true\n[approvals]\nenabled = false\n";
    let start = || {
        ControlProcess::start_spec_at(
            ControlSpec {
                bin: control_bin(),
                dir: tmp.path(),
                rules: &rules,
                config,
                env: &[],
            },
            &listen,
        )
    };
    let mut control = start();
    let first_instance = control.status().control_instance_id;
    let origin = http_echo("127.0.0.1");
    let dns = DnsServer::start();
    let proxy_cfg = format!(
        "[network]\ndns_servers = [\"{}\"]\n[control]\nreconnect_initial_ms = 50\nreconnect_max_ms = 500\n",
        dns.addr_string()
    );
    let token_file = control.token_file.to_str().unwrap().to_string();
    let url = format!("http://{listen}");
    let proxies: Vec<ProxyProcess> = (0..3)
        .map(|_| {
            ProxyProcess::start(
                &["--control", &url, "--control-token-file", &token_file],
                Some(&proxy_cfg),
            )
        })
        .collect();

    // AddRule in a loop (one call in flight at a time), until the first failure.
    let results: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
    let log = results.clone();
    let client = runtime().block_on(control.client());
    let writer = runtime().spawn(async move {
        let mut c = client;
        let deadline = Instant::now() + Duration::from_secs(120);
        for i in 0..5000 {
            if Instant::now() > deadline {
                break;
            }
            let host = format!("h{i}.test");
            let r = tokio::time::timeout(WAIT, c.add_rule(allow_rule(&host))).await;
            let ok = matches!(&r, Ok(Ok(resp)) if resp.get_ref().added);
            log.lock().unwrap().push((host, ok));
            if !ok {
                break;
            }
        }
    });
    eventually("20 rules added", || {
        results.lock().unwrap().iter().filter(|(_, ok)| *ok).count() >= 20
    });
    control.signal(libc::SIGKILL);
    control.wait_exit(WAIT).expect("killed");
    runtime()
        .block_on(async { tokio::time::timeout(WAIT, writer).await })
        .expect("the writer loop ends once its call fails")
        .unwrap();
    let results = results.lock().unwrap().clone();
    let acked: Vec<String> = results
        .iter()
        .filter(|(_, ok)| *ok)
        .map(|(h, _)| h.clone())
        .collect();
    let in_flight = results.iter().find(|(_, ok)| !ok).map(|(h, _)| h.clone());
    assert!(
        in_flight.is_some(),
        "the loop was still running when the control plane was killed"
    );

    // The file: exactly the acknowledged rules, in order, plus at most the one in flight.
    let text = std::fs::read_to_string(&rules).expect("rules file");
    assert!(text.ends_with('\n'), "no torn last line: {text:?}");
    let mut want: Vec<String> = acked
        .iter()
        .map(|h| format!(r#"network_rule(host="{h}", protocol="http", decision="allow")"#))
        .collect();
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.len() == want.len() + 1 {
        let h = in_flight.clone().unwrap();
        want.push(format!(
            r#"network_rule(host="{h}", protocol="http", decision="allow")"#
        ));
    }
    assert_eq!(
        lines, want,
        "acknowledged rules all persisted, nothing else"
    );

    // Restart on the same state: the file parses, every proxy converges on the new snapshot.
    let control = start();
    let listed = runtime().block_on(async {
        control
            .client()
            .await
            .list_rules(v1::ListRulesRequest {})
            .await
            .expect("ListRules")
            .into_inner()
            .rules
    });
    assert_eq!(listed.len(), want.len(), "the file parses with every line");
    let st = control.status();
    assert_ne!(st.control_instance_id, first_instance, "a new instance");
    assert_eq!(st.rules_error, "");
    eventually("all three proxies re-attached and in sync", || {
        let proxies = runtime().block_on(async {
            control
                .client()
                .await
                .list_proxies(v1::ListProxiesRequest {})
                .await
                .expect("ListProxies")
                .into_inner()
                .proxies
        });
        proxies.len() == 3
            && proxies
                .iter()
                .all(|p| p.in_sync && p.acked_version == st.version)
    });
    let view = runtime().block_on(async {
        control
            .client()
            .await
            .get_policy(v1::GetPolicyRequest::default())
            .await
            .expect("GetPolicy")
            .into_inner()
    });
    assert_eq!(view.version, st.version);
    assert_eq!(view.control_instance_id, st.control_instance_id);
    assert_eq!(view.proxies.len(), 3);
    assert!(view.proxies.iter().all(|p| p.acked_version == st.version));

    // Enforcement matches the file on every proxy.
    let first = &acked[0];
    let last = want.len() - 1;
    let last_host = format!("h{last}.test");
    for name in [first.as_str(), last_host.as_str(), "never.test"] {
        dns.set(name, &[ip(127, 0, 0, 1)]);
    }
    for (k, p) in proxies.iter().enumerate() {
        let cfg: serde_json::Value =
            serde_json::from_slice(&admin_get(p.admin_addr(), "/config").body).unwrap();
        assert_eq!(
            cfg["control"]["policy_version"],
            serde_json::json!(st.version),
            "proxy {k}: {cfg}"
        );
        for host in [first.as_str(), last_host.as_str()] {
            let r = curl(&[
                "-x",
                &p.http_url(),
                &format!("http://{host}:{}/", origin.port()),
            ]);
            assert_eq!(r.status, 200, "proxy {k}, {host}: {}", r.text());
        }
        let r = curl(&[
            "-x",
            &p.http_url(),
            &format!("http://never.test:{}/", origin.port()),
        ]);
        assert_eq!(r.status, 403, "proxy {k}: a never-added host");
        assert!(
            r.text().contains(r#""reason":"not_allowed""#),
            "{}",
            r.text()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Disk full / read-only file system while persisting a rule

/// A control plane built with the `fault-injection` hook, one attached proxy, asks enabled.
struct IoFault {
    control: ControlProcess,
    proxy: ProxyProcess,
    fault: std::path::PathBuf,
    origin_port: u16,
    _dns: DnsServer,
    _origin: portcullis_integration_tests::origin::Origin,
    _tmp: tempfile::TempDir,
}

impl IoFault {
    fn set_fault(&self, spec: &str) {
        std::fs::write(&self.fault, spec).unwrap();
    }

    fn request(
        &self,
        host: &str,
    ) -> std::thread::JoinHandle<portcullis_integration_tests::CurlResult> {
        let px = self.proxy.http_url();
        let url = format!("http://{host}:{}/", self.origin_port);
        std::thread::spawn(move || curl(&["-x", &px, &url]))
    }

    fn wait_pending(&self, host: &str) -> v1::PendingAsk {
        let mut found = None;
        eventually("a pending ask with a waiter", || {
            let asks = runtime().block_on(async {
                self.control
                    .client()
                    .await
                    .list_pending(v1::ListPendingRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
                    .asks
            });
            found = asks.into_iter().find(|a| a.host == host && a.waiters > 0);
            found.is_some()
        });
        found.unwrap()
    }

    fn add(&self, host: &str) -> Result<v1::AddRuleResponse, tonic::Status> {
        runtime().block_on(async {
            self.control
                .client()
                .await
                .add_rule(v1::AddRuleRequest {
                    wait_for_enforcement: true,
                    ..allow_rule(host)
                })
                .await
                .map(|r| r.into_inner())
        })
    }

    /// Waits until the proxy has acked the control plane's current version.
    fn wait_in_sync(&self) {
        eventually("the proxy acked the current version", || {
            let version = self.control.status().version;
            let proxies = runtime().block_on(async {
                self.control
                    .client()
                    .await
                    .list_proxies(v1::ListProxiesRequest {})
                    .await
                    .unwrap()
                    .into_inner()
                    .proxies
            });
            proxies.len() == 1 && proxies[0].in_sync && proxies[0].acked_version == version
        });
    }

    fn temps(&self) -> Vec<String> {
        std::fs::read_dir(self.control.rules.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".portcullis.rules.tmp-"))
            .collect()
    }
}

fn io_fault_setup(initial: &str) -> IoFault {
    let bin = control_fault_bin();
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("portcullis.rules");
    std::fs::write(&rules, initial).unwrap();
    let fault = tmp.path().join("io-fault");
    let origin = http_echo("127.0.0.1");
    let dns = DnsServer::start();
    for name in [
        "ok.test",
        "full.test",
        "ask-allow.test",
        "eio.test",
        "after.test",
    ] {
        dns.set(name, &[ip(127, 0, 0, 1)]);
    }
    let fault_env = fault.to_str().unwrap().to_string();
    let env = [(
        "PORTCULLIS_FAULT_RULES_WRITE_ERROR_FILE",
        fault_env.as_str(),
    )];
    let control = ControlProcess::start_spec(ControlSpec {
        bin,
        dir: tmp.path(),
        rules: &rules,
        config: "[network]\nallow_local_binding = true\n[approvals]\nask_timeout_secs = 60\n",
        env: &env,
    });
    let proxy = ProxyProcess::start(
        &[
            "--control",
            &control.url(),
            "--control-token-file",
            control.token_file.to_str().unwrap(),
        ],
        Some(&format!(
            "[network]\ndns_servers = [\"{}\"]\n",
            dns.addr_string()
        )),
    );
    IoFault {
        control,
        proxy,
        fault,
        origin_port: origin.port(),
        _dns: dns,
        _origin: origin,
        _tmp: tmp,
    }
}

/// network-rules.md §5.5 and control.md §4/§8.4 under I/O errors: with the disk full (ENOSPC
/// after a partial write) or a read-only file system (EROFS creating the temp file), AddRule fails
/// with a status naming the cause, the old file is intact byte for byte, no temp file is left,
/// no policy version is taken and GetStatus still reports the file's rules (no error: the file
/// itself is fine). A DENY ALWAYS / ALLOW ALWAYS answer is applied in memory only (deny_once /
/// allow_session) and the RPC says so. A failing directory fsync (after the rename) is reported
/// too, and memory then matches the disk. Once the disk recovers, writes work again.
#[test]
fn rule_persist_io_errors_keep_the_file_intact_and_report() {
    let initial =
        "# hand-written\nnetwork_rule(host=\"ok.test\", protocol=\"http\", decision=\"allow\")";
    let s = io_fault_setup(initial);
    let path = s.control.rules.clone();
    assert_eq!(s.request("ok.test").join().unwrap().status, 200);
    let before = s.control.status();
    assert_eq!(before.rules_count, 1);

    // Disk full in the middle of writing the temp file.
    s.set_fault("write:ENOSPC");
    let e = s.add("full.test").unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message()
            .contains(&format!("cannot write rules file {}", path.display()))
            && e.message().contains("No space left on device"),
        "names the file and the cause: {e:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        initial,
        "old file intact"
    );
    assert!(s.temps().is_empty(), "no temp file left: {:?}", s.temps());
    let st = s.control.status();
    assert_eq!(
        (st.version, st.rules_count, st.rules_error.as_str()),
        (before.version, 1, ""),
        "no version taken, rules unchanged"
    );

    // The unpersisted rule is not enforced: the host still asks. DENY ALWAYS while the disk is
    // full → applied as deny_once and reported.
    let held = s.request("full.test");
    let ask = s.wait_pending("full.test");
    let e = runtime()
        .block_on(async {
            s.control
                .client()
                .await
                .deny(v1::DenyRequest {
                    pending_id: ask.id.clone(),
                    scope: v1::ApprovalScope::Always as i32,
                    ..Default::default()
                })
                .await
        })
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Internal, "{e:?}");
    assert!(
        e.message().starts_with("could not persist rule: ")
            && e.message().contains("No space left on device")
            && e.message().contains("applied as deny_once only"),
        "{e:?}"
    );
    let r = held.join().unwrap();
    assert_eq!(r.status, 403);
    assert!(
        r.text().contains(r#""reason":"approval_denied""#),
        "{}",
        r.text()
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), initial);

    // Read-only file system: the temp file cannot even be created. ALLOW ALWAYS → session.
    s.set_fault("temp_create:EROFS");
    let e = s.add("ro.test").unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("Read-only file system"), "{e:?}");
    let held = s.request("ask-allow.test");
    let ask = s.wait_pending("ask-allow.test");
    let e = runtime()
        .block_on(async {
            s.control
                .client()
                .await
                .approve(v1::ApproveRequest {
                    pending_id: ask.id.clone(),
                    scope: v1::ApprovalScope::Always as i32,
                    ..Default::default()
                })
                .await
        })
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Internal, "{e:?}");
    assert!(
        e.message().contains("Read-only file system")
            && e.message().contains("applied as allow_session only"),
        "{e:?}"
    );
    assert_eq!(held.join().unwrap().status, 200, "the waiter is released");
    assert_eq!(
        s.request("ask-allow.test").join().unwrap().status,
        200,
        "later requests of the session pass"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        initial,
        "still intact"
    );
    assert!(s.temps().is_empty(), "{:?}", s.temps());
    assert_eq!(s.control.status().rules_count, 1);

    // The directory fsync fails after the rename: the error is returned, and memory matches
    // the disk (the rule is in the file, listed and enforced).
    s.set_fault("dir_fsync:EIO");
    let e = s.add("eio.test").unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("cannot sync"), "{e:?}");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        text,
        format!(
            "{initial}\nnetwork_rule(host=\"eio.test\", protocol=\"http\", decision=\"allow\")\n"
        )
    );
    assert_eq!(s.control.status().rules_count, 2, "memory matches the disk");
    s.wait_in_sync();
    assert_eq!(
        s.request("eio.test").join().unwrap().status,
        200,
        "and is enforced"
    );

    // The disk recovers: writes work again.
    std::fs::remove_file(&s.fault).unwrap();
    let r = s.add("after.test").expect("AddRule after recovery");
    assert!(r.added && r.enforced, "{r:?}");
    assert_eq!(s.request("after.test").join().unwrap().status, 200);
    assert!(s.temps().is_empty(), "{:?}", s.temps());
    assert_eq!(s.control.status().rules_count, 3);
}

// ---------------------------------------------------------------------------------------------
// 6. Stalled OTLP collector behind the control plane

/// The control plane exports to a collector that accepts TCP and never answers. Approve and
/// Deny still answer (generous liveness deadline, no speed assertion), rule writes too, drops
/// are counted in GetStatus with the WARN line, the counter identity holds once idle, and the
/// process still shuts down (the flush is bounded by `shutdown_timeout_ms`).
#[test]
fn control_audit_stall_keeps_answers_flowing_and_counts_drops() {
    let stall = never_answer("127.0.0.1");
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("portcullis.rules");
    let config = format!(
        "[network]\nallow_local_binding = true\n[approvals]\nask_timeout_secs = 60\n\
         [audit]\nendpoint = \"http://127.0.0.1:{}\"\nmax_queue_size = 4\nmax_export_batch_size = 2\n\
         scheduled_delay_ms = 100\ntimeout_ms = 1000\nshutdown_timeout_ms = 1000\n",
        stall.port()
    );
    let mut control = ControlProcess::start(tmp.path(), &rules, &config);
    let origin = http_echo("127.0.0.1");
    let dns = DnsServer::start();
    let proxy = ProxyProcess::start(
        &[
            "--control",
            &control.url(),
            "--control-token-file",
            control.token_file.to_str().unwrap(),
        ],
        Some(&format!(
            "[network]\ndns_servers = [\"{}\"]\n",
            dns.addr_string()
        )),
    );
    let asks: u32 = 8;
    for i in 0..asks {
        let host = format!("a{i}.test");
        dns.set(&host, &[ip(127, 0, 0, 1)]);
        let px = proxy.http_url();
        let url = format!("http://{host}:{}/", origin.port());
        let held = std::thread::spawn(move || curl(&["-x", &px, &url]));
        let mut ask = None;
        eventually("the ask is pending", || {
            let list = runtime().block_on(async {
                control
                    .client()
                    .await
                    .list_pending(v1::ListPendingRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
                    .asks
            });
            ask = list.into_iter().find(|a| a.host == host && a.waiters > 0);
            ask.is_some()
        });
        let id = ask.unwrap().id;
        let approve = i % 2 == 0;
        let answered = runtime().block_on(async {
            let mut c = control.client().await;
            let call = async {
                if approve {
                    c.approve(v1::ApproveRequest {
                        pending_id: id.clone(),
                        scope: v1::ApprovalScope::Once as i32,
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner().outcome)
                } else {
                    c.deny(v1::DenyRequest {
                        pending_id: id.clone(),
                        scope: v1::ApprovalScope::Once as i32,
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner().outcome)
                }
            };
            tokio::time::timeout(WAIT, call).await
        });
        let outcome = answered
            .unwrap_or_else(|_| {
                panic!("ask {i}: no answer within {WAIT:?} with the collector stalled")
            })
            .unwrap_or_else(|e| panic!("ask {i}: {e:?}"));
        let want = if approve {
            v1::Outcome::AllowOnce
        } else {
            v1::Outcome::DenyOnce
        };
        assert_eq!(outcome, want as i32, "ask {i}");
        let r = held.join().unwrap();
        assert_eq!(r.status, if approve { 200 } else { 403 }, "ask {i}");
    }
    let adds: u32 = 20;
    for i in 0..adds {
        let r = runtime().block_on(async {
            let mut c = control.client().await;
            tokio::time::timeout(WAIT, c.add_rule(allow_rule(&format!("r{i}.test")))).await
        });
        let r = r
            .unwrap_or_else(|_| panic!("AddRule {i}: no answer with the collector stalled"))
            .unwrap_or_else(|e| panic!("AddRule {i}: {e:?}"));
        assert!(r.into_inner().added);
    }
    // One `portcullis.approval` per answered ask, one `portcullis.rule_change` per added rule.
    let st = control.status();
    assert!(st.audit_events_total >= u64::from(asks + adds), "{st:?}");
    eventually(
        "idle: every record dropped and counted (total = exported + dropped)",
        || {
            let st = control.status();
            st.audit_events_exported == 0
                && st.audit_events_dropped > 0
                && st.audit_events_total == st.audit_events_dropped
        },
    );
    eventually("the drop WARN line", || {
        control.stderr_text().contains("audit events dropped:")
    });
    control.signal(libc::SIGTERM);
    let exit = control
        .wait_exit(WAIT)
        .expect("the control plane exits despite the stalled collector");
    assert!(exit.success(), "{exit:?}\n{}", control.stderr_text());
}
