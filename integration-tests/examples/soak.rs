//! Soak run (issue 12 item 3, not a test): a bounded mixed load against the real release
//! binaries, then a report of whether memory stayed flat and every request got exactly one
//! Decision on every surface.
//!
//! `cargo run --release -p portcullis-integration-tests --example soak -- [--secs N] [--pace-ms M]`
//! (default 180 s, 5 ms pause between two requests of one client task; `scripts/soak` wraps it).
//!
//! Set-up, all on 127.0.0.1: one `portcullis-control serve` (`report_allows = true`, ask timeout
//! 10 s) and one attached `portcullis-proxy` (HTTP, SOCKS5 and admin listeners, `--log warn`,
//! stderr to a file so its `PORTCULLIS_POLICY_VIOLATION` lines can be counted), an HTTP echo
//! origin, a TCP echo origin and the test DNS server.
//!
//! Load, from a fixed set of client tasks until the time is up:
//! * 3 × absolute-form `GET http://allowed.soak/…` on keep-alive connections (200, echo checked);
//! * 2 × `CONNECT allowed.soak` + a 1–16 KiB echo; 2 × SOCKS5 CONNECT + the same echo;
//! * 2 × requests to `denied.soak` rotating HTTP / CONNECT / SOCKS5 (403 `blocked-by-denylist`,
//!   SOCKS5 REP 2);
//! * 3 × allowlist misses (one per protocol) that become asks; an approver task watching
//!   `WatchPending` answers each with `Approve ONCE` (2 of 3) or `Deny ONCE` (1 of 3);
//! * a rule pusher: every second `AddRule` allow `push-K.soak` (wait for enforcement), one GET
//!   through the proxy that must now be allowed, then `RemoveRule` (wait for enforcement).
//!
//! Checks (exit status 1 when one fails):
//! * proxy and control RSS (`/proc/PID/status` `VmRSS`, every second): the mean of the last
//!   quarter of the run is within max(+10 %, +2 MiB) of the mean of the second quarter;
//! * per (protocol, decision), the Decisions the clients observed equal the proxy's
//!   `portcullis_decisions_total` delta and the Decision events on one `WatchDecisions` stream
//!   (`include_allows`); the blocked Decisions (deny + ask) equal `portcullis_blocks_total`,
//!   `portcullis_blocked_log_total`, the `/blocked` `total` delta and the violation lines; every
//!   decision id a client saw in a 403 appears exactly once in the events and in the violation
//!   lines; no id repeats on either;
//! * the approver's answers equal the asks the clients saw end in allow / deny;
//! * no unexpected client outcome, no unexpected WARN/ERROR log line, zero deltas of
//!   `portcullis_upstream_errors_total`, `portcullis_bad_requests_total`,
//!   `portcullis_connections_rejected_total`, `portcullis_events_dropped_total`, no `lagged`
//!   event, and at the end no active client connection, tunnel or pending approval.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, Write as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portcullis::proto::v1;
use portcullis_integration_tests::control::{Client, ControlSpec};
use portcullis_integration_tests::origin::{Origin, http_echo, tcp_echo};
use portcullis_integration_tests::proxy::release_bins;
use portcullis_integration_tests::{ControlProcess, DnsServer, admin_get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PROTOCOLS: [&str; 3] = ["http", "https_connect", "socks5_tcp"];
const VERDICTS: [&str; 3] = ["allow", "deny", "ask"];
/// One request (including a held ask) never takes longer than this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proto {
    Http = 0,
    Connect = 1,
    Socks = 2,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Verdict {
    Allow = 0,
    Deny = 1,
    Ask = 2,
}

/// What the clients observed.
#[derive(Default)]
struct Tally {
    /// Decisions per [protocol][verdict] as the clients can infer them (an ask = `ask` + final).
    decisions: [[AtomicU64; 3]; 3],
    /// Requests per client kind.
    requests: Mutex<BTreeMap<&'static str, u64>>,
    /// Asks that ended in allow / deny, as the clients saw them.
    asked_allowed: AtomicU64,
    asked_denied: AtomicU64,
    /// Decision ids from `x-portcullis-decision-id` of every 403 a client got.
    block_ids: Mutex<Vec<String>>,
    /// Unexpected outcomes: kind → (count, first details).
    unexpected: Mutex<BTreeMap<String, (u64, Vec<String>)>>,
}

impl Tally {
    fn decision(&self, p: Proto, v: Verdict) {
        self.decisions[p as usize][v as usize].fetch_add(1, Relaxed);
    }
    fn request(&self, kind: &'static str) {
        *self.requests.lock().unwrap().entry(kind).or_default() += 1;
    }
    fn unexpected(&self, kind: &str, detail: String) {
        let mut u = self.unexpected.lock().unwrap();
        let e = u.entry(kind.to_string()).or_default();
        e.0 += 1;
        if e.1.len() < 3 {
            e.1.push(detail);
        }
    }
    fn block_id(&self, id: Option<String>) {
        match id {
            Some(id) => self.block_ids.lock().unwrap().push(id),
            None => self.unexpected("403 without x-portcullis-decision-id", String::new()),
        }
    }
}

struct Proxy {
    child: Child,
    http: String,
    socks5: String,
    admin: String,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_proxy(bin: &Path, control: &ControlProcess, config: &Path, stderr: &Path) -> Proxy {
    let err = File::create(stderr).expect("proxy stderr file");
    let mut child = Command::new(bin)
        .args([
            "--http",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--socks5",
            "127.0.0.1:0",
            "--log",
            "warn",
        ])
        .arg("--config")
        .arg(config)
        .arg("--control")
        .arg(control.url())
        .arg("--control-token-file")
        .arg(&control.token_file)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(err))
        .spawn()
        .expect("spawn portcullis-proxy");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let Some(Ok(line)) = lines.next() else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "proxy printed no ready line: {}",
            std::fs::read_to_string(stderr).unwrap_or_default()
        );
    };
    std::thread::spawn(move || for _ in lines {});
    let ready: serde_json::Value = serde_json::from_str(&line).expect("ready JSON");
    let addr = |k: &str| ready[k].as_str().expect("listener address").to_string();
    Proxy {
        http: addr("http"),
        socks5: addr("socks5"),
        admin: addr("admin"),
        child,
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 + SOCKS5 client over one TCP stream.

struct Conn {
    s: TcpStream,
    /// Bytes read past the last parsed item.
    buf: Vec<u8>,
}

struct Head {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Conn {
    async fn open(addr: &str) -> std::io::Result<Conn> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Conn { s, buf: Vec::new() })
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    async fn take(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        while self.buf.len() < n {
            self.fill().await?;
        }
        let rest = self.buf.split_off(n);
        Ok(std::mem::replace(&mut self.buf, rest))
    }

    async fn head(&mut self) -> std::io::Result<Head> {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if self.buf.len() > 64 * 1024 {
                return Err(std::io::Error::other("response head too large"));
            }
            self.fill().await?;
        };
        let raw = self.take(end).await?;
        let text = String::from_utf8_lossy(&raw);
        let mut lines = text.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other("bad status line"))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Ok(Head { status, headers })
    }

    /// Reads a response head and its `content-length` body.
    async fn response(&mut self) -> std::io::Result<(Head, Vec<u8>)> {
        let head = self.head().await?;
        let len = head
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let body = self.take(len).await?;
        Ok((head, body))
    }

    /// Sends `payload`, half-closes, reads to EOF; whether the echo matched.
    async fn echo(&mut self, payload: &[u8]) -> std::io::Result<bool> {
        self.s.write_all(payload).await?;
        self.s.shutdown().await?;
        let mut got = std::mem::take(&mut self.buf);
        self.s.read_to_end(&mut got).await?;
        Ok(got == payload)
    }

    /// SOCKS5 no-auth greeting + CONNECT to a domain name; returns REP.
    async fn socks_connect(&mut self, host: &str, port: u16) -> std::io::Result<u8> {
        self.s.write_all(&[5, 1, 0]).await?;
        if self.take(2).await? != [5, 0] {
            return Err(std::io::Error::other("SOCKS5 greeting refused"));
        }
        let mut req = vec![5, 1, 0, 3, host.len() as u8];
        req.extend_from_slice(host.as_bytes());
        req.extend_from_slice(&port.to_be_bytes());
        self.s.write_all(&req).await?;
        let r = self.take(4).await?;
        let addr_len = match r[3] {
            1 => 4,
            4 => 16,
            3 => self.take(1).await?[0] as usize,
            t => return Err(std::io::Error::other(format!("reply ATYP {t}"))),
        };
        self.take(addr_len + 2).await?;
        Ok(r[1])
    }
}

/// `(reason, id)` of a Decision response body's first line.
fn decision_line(body: &[u8]) -> Option<(String, String)> {
    let text = String::from_utf8_lossy(body);
    let json = text
        .lines()
        .next()?
        .strip_prefix("PORTCULLIS_POLICY_DECISION ")?;
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    Some((v["reason"].as_str()?.into(), v["id"].as_str()?.into()))
}

fn payload(seed: u64) -> Vec<u8> {
    let len = 1024 + (seed.wrapping_mul(2654435761) % (15 * 1024)) as usize;
    (0..len).map(|i| (i as u64 ^ seed) as u8).collect()
}

// ---------------------------------------------------------------------------------------------
// Client tasks.

struct Env {
    proxy_http: String,
    proxy_socks: String,
    http_port: u16,
    tcp_port: u16,
    tally: Tally,
    stop: AtomicBool,
    pace: Duration,
}

/// The final outcome a client saw for one request.
enum Seen {
    /// Allowed and the origin answered correctly.
    Allowed,
    /// Refused with a Decision (reason when visible).
    Refused(Option<String>),
}

/// Absolute-form GETs on keep-alive connections to an allowed host.
async fn http_allowed(env: Arc<Env>, task: u64) {
    let mut n = 0u64;
    'conn: while !env.stop.load(Relaxed) {
        let mut c = match Conn::open(&env.proxy_http).await {
            Ok(c) => c,
            Err(e) => {
                env.tally.unexpected("connect to proxy", e.to_string());
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        for _ in 0..50 {
            if env.stop.load(Relaxed) {
                break 'conn;
            }
            n += 1;
            let path = format!("/t{task}/r{n}");
            let req = format!(
                "GET http://allowed.soak:{p}{path} HTTP/1.1\r\nHost: allowed.soak:{p}\r\n\r\n",
                p = env.http_port
            );
            env.tally.request("http allowed");
            let r = tokio::time::timeout(REQUEST_TIMEOUT, async {
                c.s.write_all(req.as_bytes()).await?;
                c.response().await
            })
            .await;
            match r {
                Ok(Ok((h, body))) if h.status == 200 => {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    if v["path"] != path {
                        env.tally
                            .unexpected("http allowed: wrong echo", format!("{v}"));
                    }
                    env.tally.decision(Proto::Http, Verdict::Allow);
                    if h.get("connection")
                        .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                    {
                        continue 'conn;
                    }
                }
                Ok(Ok((h, body))) => {
                    env.tally.unexpected(
                        &format!("http allowed: status {}", h.status),
                        String::from_utf8_lossy(&body).into(),
                    );
                    continue 'conn;
                }
                Ok(Err(e)) => {
                    env.tally.unexpected("http allowed: io", e.to_string());
                    continue 'conn;
                }
                Err(_) => {
                    env.tally.unexpected("http allowed: timeout", String::new());
                    continue 'conn;
                }
            }
            tokio::time::sleep(env.pace).await;
        }
    }
}

/// One CONNECT to `host:port`; on 200, an echo.
async fn connect_once(env: &Env, host: &str, seed: u64) -> std::io::Result<Result<Seen, String>> {
    let mut c = Conn::open(&env.proxy_http).await?;
    let port = env.tcp_port;
    let req = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n");
    c.s.write_all(req.as_bytes()).await?;
    let h = c.head().await?;
    if h.status == 200 {
        let data = payload(seed);
        return Ok(if c.echo(&data).await? {
            Ok(Seen::Allowed)
        } else {
            Err("CONNECT echo mismatch".into())
        });
    }
    let len = h
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let body = c.take(len).await?;
    Ok(blocked_response(env, &h, &body))
}

/// A 403 Decision response: records its id; `Refused(reason)`.
fn blocked_response(env: &Env, h: &Head, body: &[u8]) -> Result<Seen, String> {
    if h.status != 403 {
        return Err(format!(
            "status {} {}",
            h.status,
            String::from_utf8_lossy(body).trim()
        ));
    }
    env.tally
        .block_id(h.get("x-portcullis-decision-id").map(str::to_string));
    let reason = decision_line(body).map(|(r, _)| r);
    Ok(Seen::Refused(reason))
}

/// One SOCKS5 CONNECT to `host:port`; on REP 0, an echo.
async fn socks_once(env: &Env, host: &str, seed: u64) -> std::io::Result<Result<Seen, String>> {
    let mut c = Conn::open(&env.proxy_socks).await?;
    match c.socks_connect(host, env.tcp_port).await? {
        0 => {
            let data = payload(seed);
            Ok(if c.echo(&data).await? {
                Ok(Seen::Allowed)
            } else {
                Err("SOCKS5 echo mismatch".into())
            })
        }
        2 => Ok(Ok(Seen::Refused(None))),
        rep => Ok(Err(format!("SOCKS5 REP {rep}"))),
    }
}

/// One absolute-form GET on a fresh connection.
async fn http_once(env: &Env, host: &str, n: u64) -> std::io::Result<Result<Seen, String>> {
    let mut c = Conn::open(&env.proxy_http).await?;
    let p = env.http_port;
    let req = format!(
        "GET http://{host}:{p}/n{n} HTTP/1.1\r\nHost: {host}:{p}\r\nConnection: close\r\n\r\n"
    );
    c.s.write_all(req.as_bytes()).await?;
    let (h, body) = c.response().await?;
    if h.status == 200 {
        return Ok(Ok(Seen::Allowed));
    }
    Ok(blocked_response(env, &h, &body))
}

async fn one(env: &Env, proto: Proto, host: &str, n: u64) -> Result<Seen, String> {
    let fut = async {
        match proto {
            Proto::Http => http_once(env, host, n).await,
            Proto::Connect => connect_once(env, host, n).await,
            Proto::Socks => socks_once(env, host, n).await,
        }
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(format!("io: {e}")),
        Err(_) => Err("timeout".into()),
    }
}

/// Tunnels (CONNECT or SOCKS5) with an echo to an allowed host.
async fn tunnel_allowed(env: Arc<Env>, proto: Proto, task: u64) {
    let kind = if proto == Proto::Connect {
        "CONNECT allowed"
    } else {
        "SOCKS5 allowed"
    };
    let mut n = task << 32;
    while !env.stop.load(Relaxed) {
        n += 1;
        env.tally.request(kind);
        match one(&env, proto, "allowed.soak", n).await {
            Ok(Seen::Allowed) => env.tally.decision(proto, Verdict::Allow),
            Ok(Seen::Refused(r)) => env
                .tally
                .unexpected(&format!("{kind}: refused"), format!("{r:?}")),
            Err(e) => env.tally.unexpected(&format!("{kind}: {e}"), String::new()),
        }
        tokio::time::sleep(env.pace).await;
    }
}

/// Requests to the denied host, rotating the three protocols.
async fn denied(env: Arc<Env>, task: u64) {
    let mut n = task;
    while !env.stop.load(Relaxed) {
        n += 1;
        let proto = [Proto::Http, Proto::Connect, Proto::Socks][(n % 3) as usize];
        env.tally.request("denied");
        match one(&env, proto, "denied.soak", n).await {
            Ok(Seen::Refused(r)) if r.is_none() || r.as_deref() == Some("denied") => {
                env.tally.decision(proto, Verdict::Deny)
            }
            Ok(Seen::Refused(r)) => env
                .tally
                .unexpected(&format!("denied {proto:?}: reason {r:?}"), String::new()),
            Ok(Seen::Allowed) => env
                .tally
                .unexpected(&format!("denied {proto:?}: allowed"), String::new()),
            Err(e) => env
                .tally
                .unexpected(&format!("denied {proto:?}: {e}"), String::new()),
        }
        tokio::time::sleep(env.pace).await;
    }
}

/// Allowlist misses that are held as asks until the approver answers.
async fn asker(env: Arc<Env>, proto: Proto) {
    let host = format!("ask-{}.soak", PROTOCOLS[proto as usize].replace('_', "-"));
    let mut n = 0u64;
    while !env.stop.load(Relaxed) {
        n += 1;
        env.tally.request("ask");
        match one(&env, proto, &host, n).await {
            Ok(Seen::Allowed) => {
                env.tally.decision(proto, Verdict::Ask);
                env.tally.decision(proto, Verdict::Allow);
                env.tally.asked_allowed.fetch_add(1, Relaxed);
            }
            Ok(Seen::Refused(r)) if r.is_none() || r.as_deref() == Some("approval_denied") => {
                env.tally.decision(proto, Verdict::Ask);
                env.tally.decision(proto, Verdict::Deny);
                env.tally.asked_denied.fetch_add(1, Relaxed);
            }
            Ok(Seen::Refused(r)) => env
                .tally
                .unexpected(&format!("ask {proto:?}: reason {r:?}"), String::new()),
            Err(e) => env
                .tally
                .unexpected(&format!("ask {proto:?}: {e}"), String::new()),
        }
        tokio::time::sleep(env.pace).await;
    }
}

#[derive(Default)]
struct ApproverStats {
    approved: AtomicU64,
    denied: AtomicU64,
    errors: Mutex<Vec<String>>,
}

/// Answers every ask: `Approve ONCE` two times in three, else `Deny ONCE`.
async fn approver(client: Client, stats: Arc<ApproverStats>) {
    let mut watch = client.clone();
    let mut stream = watch
        .watch_pending(v1::WatchPendingRequest::default())
        .await
        .expect("WatchPending")
        .into_inner();
    let mut k = 0u64;
    while let Ok(Some(ev)) = stream.message().await {
        match ev.event {
            Some(v1::pending_event::Event::Created(c)) => {
                let Some(ask) = c.ask else { continue };
                k += 1;
                let mut client = client.clone();
                let stats = stats.clone();
                let approve = !k.is_multiple_of(3);
                tokio::spawn(async move {
                    let r = if approve {
                        client
                            .approve(v1::ApproveRequest {
                                pending_id: ask.id.clone(),
                                scope: v1::ApprovalScope::Once as i32,
                                actor: Some("soak".into()),
                                ..Default::default()
                            })
                            .await
                            .map(|_| ())
                    } else {
                        client
                            .deny(v1::DenyRequest {
                                pending_id: ask.id.clone(),
                                scope: v1::ApprovalScope::Once as i32,
                                actor: Some("soak".into()),
                                ..Default::default()
                            })
                            .await
                            .map(|_| ())
                    };
                    match r {
                        Ok(()) if approve => stats.approved.fetch_add(1, Relaxed),
                        Ok(()) => stats.denied.fetch_add(1, Relaxed),
                        Err(e) => {
                            stats.errors.lock().unwrap().push(format!(
                                "{} {}: {}",
                                ask.id,
                                e.code(),
                                e.message()
                            ));
                            0
                        }
                    };
                });
            }
            Some(v1::pending_event::Event::Lagged(l)) => stats
                .errors
                .lock()
                .unwrap()
                .push(format!("WatchPending lagged {}", l.missed)),
            Some(v1::pending_event::Event::Expired(e)) => stats.errors.lock().unwrap().push(
                format!("ask {} expired", e.ask.map(|a| a.id).unwrap_or_default()),
            ),
            _ => {}
        }
    }
}

#[derive(Default)]
struct PushStats {
    adds: u64,
    removes: u64,
    not_enforced: u64,
    add_ms: Vec<f64>,
    remove_ms: Vec<f64>,
    errors: Vec<String>,
}

/// Every second: `AddRule` allow `push-K.soak`, one GET through the proxy (must be allowed),
/// `RemoveRule`. Each change is a new snapshot swapped into the proxy.
async fn pusher(env: Arc<Env>, mut client: Client) -> PushStats {
    let mut st = PushStats::default();
    let mut k = 0u64;
    while !env.stop.load(Relaxed) {
        let host = format!("push-{}.soak", k % 8);
        k += 1;
        let t0 = Instant::now();
        let r = client
            .add_rule(v1::AddRuleRequest {
                host: host.clone(),
                protocol: "http".into(),
                decision: "allow".into(),
                wait_for_enforcement: true,
                ..Default::default()
            })
            .await;
        match r {
            Ok(r) => {
                st.adds += 1;
                st.add_ms.push(t0.elapsed().as_secs_f64() * 1e3);
                if !r.into_inner().enforced {
                    st.not_enforced += 1;
                }
            }
            Err(e) => {
                st.errors.push(format!("AddRule {host}: {e}"));
                continue;
            }
        }
        env.tally.request("pushed rule check");
        match one(&env, Proto::Http, &host, k).await {
            Ok(Seen::Allowed) => env.tally.decision(Proto::Http, Verdict::Allow),
            Ok(Seen::Refused(r)) => env
                .tally
                .unexpected("pushed rule check: refused", format!("{r:?}")),
            Err(e) => env
                .tally
                .unexpected(&format!("pushed rule check: {e}"), String::new()),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t0 = Instant::now();
        match client
            .remove_rule(v1::RemoveRuleRequest {
                host: host.clone(),
                port: 0,
                wait_for_enforcement: true,
                ..Default::default()
            })
            .await
        {
            Ok(r) => {
                st.removes += 1;
                st.remove_ms.push(t0.elapsed().as_secs_f64() * 1e3);
                if !r.into_inner().enforced {
                    st.not_enforced += 1;
                }
            }
            Err(e) => st.errors.push(format!("RemoveRule {host}: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    st
}

/// What one `WatchDecisions` stream received.
#[derive(Default)]
struct Events {
    decisions: [[u64; 3]; 3],
    other: BTreeMap<String, u64>,
    lagged: u64,
    ids: Vec<String>,
}

async fn watcher(
    mut client: Client,
    events: Arc<Mutex<Events>>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut stream = client
        .watch_decisions(v1::WatchDecisionsRequest {
            include_allows: true,
            ..Default::default()
        })
        .await
        .expect("WatchDecisions")
        .into_inner();
    let _ = ready.send(());
    while let Ok(Some(e)) = stream.message().await {
        let mut ev = events.lock().unwrap();
        match e.event {
            Some(v1::decision_event::Event::Decision(d)) => {
                let p = PROTOCOLS.iter().position(|p| *p == d.protocol);
                let v = VERDICTS.iter().position(|v| *v == d.decision);
                match (p, v) {
                    (Some(p), Some(v)) => ev.decisions[p][v] += 1,
                    _ => {
                        *ev.other
                            .entry(format!("{}/{}", d.protocol, d.decision))
                            .or_default() += 1
                    }
                }
                ev.ids.push(d.id);
            }
            Some(v1::decision_event::Event::Lagged(l)) => ev.lagged += l.missed,
            None => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements.

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn metrics(admin: &str) -> HashMap<String, f64> {
    let r = admin_get(admin, "/metrics");
    assert_eq!(r.status, 200, "/metrics");
    r.text()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

fn blocked_total(admin: &str) -> u64 {
    portcullis_integration_tests::blocked(admin)["total"]
        .as_u64()
        .expect("/blocked total")
}

/// Sum of the deltas of every series of `family` (optionally only those containing `filter`).
fn delta_sum(
    before: &HashMap<String, f64>,
    after: &HashMap<String, f64>,
    family: &str,
    filter: &str,
) -> i64 {
    after
        .iter()
        .filter(|(k, _)| {
            (k.as_str() == family || k.starts_with(&format!("{family}{{"))) && k.contains(filter)
        })
        .map(|(k, v)| (*v - before.get(k).copied().unwrap_or(0.0)) as i64)
        .sum()
}

fn series(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("metric series {key} missing from /metrics"))
}

/// The proxy's stderr: violation-line ids and other WARN/ERROR lines.
struct LogScan {
    violation_ids: Vec<String>,
    other: Vec<String>,
}

fn scan_log(path: &Path) -> LogScan {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut scan = LogScan {
        violation_ids: Vec::new(),
        other: Vec::new(),
    };
    for l in text.lines() {
        if let Some(i) = l.find("PORTCULLIS_POLICY_VIOLATION ") {
            let json = &l[i + "PORTCULLIS_POLICY_VIOLATION ".len()..];
            match serde_json::from_str::<serde_json::Value>(json.trim()) {
                Ok(v) => scan
                    .violation_ids
                    .push(v["id"].as_str().unwrap_or_default().to_string()),
                Err(_) => scan.other.push(format!("unparsable violation line: {l}")),
            }
        } else if !l.trim().is_empty() {
            scan.other.push(l.to_string());
        }
    }
    scan
}

/// Ids that occur more than once.
fn duplicates(ids: &[String]) -> usize {
    let mut v: Vec<&String> = ids.iter().collect();
    v.sort();
    v.windows(2).filter(|w| w[0] == w[1]).count()
}

fn mean(xs: &[u64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.iter().sum::<u64>() as f64 / xs.len() as f64
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

struct Report {
    out: String,
    failures: Vec<String>,
}

impl Report {
    fn line(&mut self, s: impl AsRef<str>) {
        self.out.push_str(s.as_ref());
        self.out.push('\n');
    }
    fn check(&mut self, ok: bool, what: impl AsRef<str>) {
        let tag = if ok { "PASS" } else { "FAIL" };
        self.line(format!("[{tag}] {}", what.as_ref()));
        if !ok {
            self.failures.push(what.as_ref().to_string());
        }
    }
}

/// RSS of one process over the run: start / after warm-up / end / max and the flatness check.
fn rss_section(r: &mut Report, name: &str, samples: &[(f64, u64)], secs: f64, warm: f64) {
    let at = |t: f64| {
        samples
            .iter()
            .find(|(s, _)| *s >= t)
            .or(samples.last())
            .map(|x| x.1)
            .unwrap_or(0)
    };
    let quarter = |q: f64| -> Vec<u64> {
        samples
            .iter()
            .filter(|(t, _)| *t >= secs * q / 4.0 && *t < secs * (q + 1.0) / 4.0)
            .map(|x| x.1)
            .collect()
    };
    let max = samples.iter().map(|x| x.1).max().unwrap_or(0);
    let end = samples.last().map(|x| x.1).unwrap_or(0);
    let (q2, q4) = (mean(&quarter(1.0)), mean(&quarter(3.0)));
    let tol = (q2 * 0.10).max(2048.0);
    let mib = |k: f64| format!("{:.1} MiB", k / 1024.0);
    r.line(format!(
        "{name} RSS: start {}, after warm-up ({warm:.0} s) {}, end {}, max {}; mean 2nd quarter {}, last quarter {} ({:+.1} MiB, tolerance +{})",
        mib(at(0.0) as f64),
        mib(at(warm) as f64),
        mib(end as f64),
        mib(max as f64),
        mib(q2),
        mib(q4),
        (q4 - q2) / 1024.0,
        mib(tol),
    ));
    r.check(
        q2 > 0.0 && q4 <= q2 + tol,
        format!("{name} RSS flat: last-quarter mean ≤ second-quarter mean + max(10 %, 2 MiB)"),
    );
}

fn main() {
    let mut secs: u64 = 180;
    let mut pace_ms: u64 = 5;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || -> u64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{a} needs a number"))
        };
        match a.as_str() {
            "--secs" => secs = val(),
            "--pace-ms" => pace_ms = val(),
            other => panic!("unknown argument {other} (use --secs N, --pace-ms M)"),
        }
    }
    let secs_f = secs as f64;
    let warm = (secs_f / 10.0).clamp(1.0, 15.0);

    let (proxy_bin, control_bin) = release_bins();
    let http_origin: Origin = http_echo("127.0.0.1");
    let tcp_origin: Origin = tcp_echo("127.0.0.1");
    let dns = DnsServer::start();
    let lo: std::net::IpAddr = "127.0.0.1".parse().expect("ip");
    for name in [
        "allowed.soak",
        "denied.soak",
        "ask-http.soak",
        "ask-https-connect.soak",
        "ask-socks5-tcp.soak",
    ] {
        dns.set(name, &[lo]);
    }
    for k in 0..8 {
        dns.set(&format!("push-{k}.soak"), &[lo]);
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let rules = tmp.path().join("portcullis.rules");
    let control = ControlProcess::start_spec(ControlSpec {
        bin: control_bin,
        dir: tmp.path(),
        rules: &rules,
        config: "[network]\nallow_local_binding = true\n\
                 allowed_domains = [\"allowed.soak\"]\ndenied_domains = [\"denied.soak\"]\n\
                 [control]\nwatch_buffer = 16384\n\
                 [approvals]\nreport_allows = true\nask_timeout_secs = 10\n",
        env: &[("PORTCULLIS_LOG", "warn")],
    });
    let proxy_config = tmp.path().join("proxy.toml");
    std::fs::write(
        &proxy_config,
        format!("[network]\ndns_servers = [\"{}\"]\n", dns.addr_string()),
    )
    .expect("proxy config");
    let proxy_log = tmp.path().join("proxy.stderr");
    let proxy = start_proxy(&proxy_bin, &control, &proxy_config, &proxy_log);
    let proxy_pid = proxy.child.id();
    let control_pid = control.pid();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let env = Arc::new(Env {
        proxy_http: proxy.http.clone(),
        proxy_socks: proxy.socks5.clone(),
        http_port: http_origin.port(),
        tcp_port: tcp_origin.port(),
        tally: Tally::default(),
        stop: AtomicBool::new(false),
        pace: Duration::from_millis(pace_ms),
    });
    let events = Arc::new(Mutex::new(Events::default()));
    let approvals = Arc::new(ApproverStats::default());
    let client = rt.block_on(control.client());
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    rt.spawn(watcher(client.clone(), events.clone(), ready_tx));
    rt.block_on(ready_rx).expect("WatchDecisions subscribed");
    let approver_task = rt.spawn(approver(client.clone(), approvals.clone()));

    let m0 = metrics(&proxy.admin);
    let b0 = blocked_total(&proxy.admin);
    let v0 = scan_log(&proxy_log);
    println!(
        "soak: {secs} s, proxy pid {proxy_pid} ({}), control pid {control_pid} ({}), 15 client tasks + approver + rule pusher",
        proxy.http, control.grpc
    );

    // Load.
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..3 {
        tasks.push(rt.spawn(http_allowed(env.clone(), t)));
    }
    for t in 0..2 {
        tasks.push(rt.spawn(tunnel_allowed(env.clone(), Proto::Connect, t)));
        tasks.push(rt.spawn(tunnel_allowed(env.clone(), Proto::Socks, t)));
        tasks.push(rt.spawn(denied(env.clone(), t << 40)));
    }
    for p in [Proto::Http, Proto::Connect, Proto::Socks] {
        tasks.push(rt.spawn(asker(env.clone(), p)));
    }
    let push_task = rt.spawn(pusher(env.clone(), client.clone()));

    let mut proxy_rss: Vec<(f64, u64)> = Vec::new();
    let mut control_rss: Vec<(f64, u64)> = Vec::new();
    let mut served = 0usize;
    let mut next = Duration::ZERO;
    while t0.elapsed() < Duration::from_secs(secs) {
        let t = t0.elapsed().as_secs_f64();
        if let Some(k) = rss_kib(proxy_pid) {
            proxy_rss.push((t, k));
        }
        if let Some(k) = rss_kib(control_pid) {
            control_rss.push((t, k));
        }
        served += http_origin.take_request_count();
        if next.as_secs().is_multiple_of(30) {
            let done: u64 = env.tally.requests.lock().unwrap().values().sum();
            eprintln!(
                "  {:>4.0} s: {done} requests, proxy RSS {} KiB, control RSS {} KiB",
                t,
                proxy_rss.last().map(|x| x.1).unwrap_or(0),
                control_rss.last().map(|x| x.1).unwrap_or(0)
            );
        }
        next += Duration::from_secs(1);
        if let Some(d) = next.checked_sub(t0.elapsed()) {
            std::thread::sleep(d);
        }
    }
    env.stop.store(true, Relaxed);
    let elapsed = t0.elapsed();
    let push = rt.block_on(async {
        for t in tasks {
            let _ = t.await;
        }
        push_task.await.expect("pusher")
    });
    served += http_origin.take_request_count();

    // Let the last reports arrive: events, metrics and the log must settle.
    let tally = &env.tally;
    let client_total: u64 = tally
        .decisions
        .iter()
        .flat_map(|r| r.iter())
        .map(|c| c.load(Relaxed))
        .sum();
    let settle = Instant::now();
    loop {
        let got: u64 = events.lock().unwrap().decisions.iter().flatten().sum();
        if got >= client_total || settle.elapsed() > Duration::from_secs(15) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    let m1 = metrics(&proxy.admin);
    let b1 = blocked_total(&proxy.admin);
    let v1s = scan_log(&proxy_log);
    let pending = rt.block_on(async {
        let mut c = client.clone();
        c.list_pending(v1::ListPendingRequest::default())
            .await
            .map(|r| r.into_inner().asks.len())
            .unwrap_or(usize::MAX)
    });
    approver_task.abort();
    let proxy_rss_end = rss_kib(proxy_pid).unwrap_or(0);
    let control_rss_end = rss_kib(control_pid).unwrap_or(0);

    // ------------------------------------------------------------------------------------------
    let mut r = Report {
        out: String::new(),
        failures: Vec::new(),
    };
    let req = tally.requests.lock().unwrap().clone();
    let total_req: u64 = req.values().sum();
    r.line(format!(
        "== soak report: {:.1} s of load, {total_req} requests ({:.0}/s), pace {pace_ms} ms ==",
        elapsed.as_secs_f64(),
        total_req as f64 / elapsed.as_secs_f64()
    ));
    r.line(format!(
        "requests by client kind: {}",
        req.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    r.line(format!("HTTP echo origin answered {served} requests"));

    // Decisions: clients vs metrics vs events.
    let ev = events.lock().unwrap();
    r.line("decisions (protocol/decision): clients | /metrics Δ | WatchDecisions");
    let mut all_agree = true;
    for (p, proto) in PROTOCOLS.iter().enumerate() {
        for (v, verdict) in VERDICTS.iter().enumerate() {
            let c = tally.decisions[p][v].load(Relaxed) as i64;
            let key = format!(
                "portcullis_decisions_total{{protocol=\"{proto}\",decision=\"{verdict}\"}}"
            );
            let m = (series(&m1, &key) - series(&m0, &key)) as i64;
            let e = ev.decisions[p][v] as i64;
            let ok = c == m && m == e;
            all_agree &= ok;
            r.line(format!(
                "  {proto:>14}/{verdict:<5} {c:>8} | {m:>8} | {e:>8}{}",
                if ok { "" } else { "   <-- MISMATCH" }
            ));
        }
    }
    let metrics_all = delta_sum(&m0, &m1, "portcullis_decisions_total", "");
    let client_sum: i64 = client_total as i64;
    r.line(format!(
        "  all protocols: clients {client_sum}, /metrics Δ {metrics_all}, events {}{}",
        ev.decisions.iter().flatten().sum::<u64>(),
        if ev.other.is_empty() {
            String::new()
        } else {
            format!(", other events {:?}", ev.other)
        }
    ));
    r.check(
        all_agree && metrics_all == client_sum && ev.other.is_empty(),
        "every request got exactly one Decision per outcome: clients = /metrics decisions_total Δ = WatchDecisions events, per protocol and decision",
    );

    // Blocked decisions: deny + ask.
    let client_blocked: i64 = (0..3)
        .map(|p| (tally.decisions[p][1].load(Relaxed) + tally.decisions[p][2].load(Relaxed)) as i64)
        .sum();
    let blocks = delta_sum(&m0, &m1, "portcullis_blocks_total", "");
    let blog = delta_sum(&m0, &m1, "portcullis_blocked_log_total", "");
    let ring = b1 as i64 - b0 as i64;
    let lines = v1s.violation_ids.len() as i64 - v0.violation_ids.len() as i64;
    let ev_blocked: i64 = ev.decisions.iter().map(|d| (d[1] + d[2]) as i64).sum();
    r.line(format!(
        "blocked (deny + ask): clients {client_blocked} | blocks_total Δ {blocks} | blocked_log_total Δ {blog} | /blocked total Δ {ring} | violation lines {lines} | events {ev_blocked}"
    ));
    r.check(
        [blocks, blog, ring, lines, ev_blocked]
            .iter()
            .all(|x| *x == client_blocked),
        "blocked log agrees: clients = blocks_total = blocked_log_total = /blocked total = violation lines = deny+ask events",
    );

    // Decision ids.
    let ids = tally.block_ids.lock().unwrap();
    let mut ev_count: HashMap<&str, u32> = HashMap::with_capacity(ev.ids.len());
    for id in &ev.ids {
        *ev_count.entry(id.as_str()).or_default() += 1;
    }
    let mut line_count: HashMap<&str, u32> = HashMap::with_capacity(v1s.violation_ids.len());
    for id in &v1s.violation_ids {
        *line_count.entry(id.as_str()).or_default() += 1;
    }
    let bad_ev = ids
        .iter()
        .filter(|i| ev_count.get(i.as_str()) != Some(&1))
        .count();
    let bad_line = ids
        .iter()
        .filter(|i| line_count.get(i.as_str()) != Some(&1))
        .count();
    let (dup_ev, dup_line) = (duplicates(&ev.ids), duplicates(&v1s.violation_ids));
    r.line(format!(
        "decision ids: {} ids from 403 responses; not exactly once in events {bad_ev}, in violation lines {bad_line}; repeated ids among events {dup_ev}, among violation lines {dup_line}",
        ids.len()
    ));
    r.check(
        bad_ev == 0 && bad_line == 0 && dup_ev == 0 && dup_line == 0,
        "decision ids: every 403's id exactly once in events and violation lines, no id repeated",
    );
    r.check(
        ev.lagged == 0,
        format!("WatchDecisions never lagged (missed {})", ev.lagged),
    );
    drop(ev);

    // Approvals.
    let (ap, dn) = (
        approvals.approved.load(Relaxed),
        approvals.denied.load(Relaxed),
    );
    let (ca, cd) = (
        tally.asked_allowed.load(Relaxed),
        tally.asked_denied.load(Relaxed),
    );
    let aerr = approvals.errors.lock().unwrap().clone();
    r.line(format!(
        "asks: approver approved {ap} / denied {dn}; clients saw {ca} allowed / {cd} denied after an ask; approver errors {}{}; pending at the end {pending}",
        aerr.len(),
        aerr.first().map(|e| format!(" (first: {e})")).unwrap_or_default()
    ));
    r.check(
        ap == ca && dn == cd && aerr.is_empty() && pending == 0,
        "asks: approver answers = ask outcomes the clients saw, no approver error, nothing pending",
    );

    // Rule pushes.
    let (mut am, mut rm) = (push.add_ms.clone(), push.remove_ms.clone());
    am.sort_by(f64::total_cmp);
    rm.sort_by(f64::total_cmp);
    r.line(format!(
        "rule pushes: {} AddRule, {} RemoveRule (wait_for_enforcement); AddRule p50 {:.1} ms p99 {:.1} ms; RemoveRule p50 {:.1} ms p99 {:.1} ms; not enforced {}; errors {}{}",
        push.adds,
        push.removes,
        pct(&am, 0.5),
        pct(&am, 0.99),
        pct(&rm, 0.5),
        pct(&rm, 0.99),
        push.not_enforced,
        push.errors.len(),
        push.errors.first().map(|e| format!(" (first: {e})")).unwrap_or_default()
    ));
    r.check(
        push.adds > 0 && push.not_enforced == 0 && push.errors.is_empty(),
        "rule pushes: every AddRule/RemoveRule succeeded and was enforced",
    );

    // Errors.
    let unexpected = tally.unexpected.lock().unwrap().clone();
    let n_unexpected: u64 = unexpected.values().map(|x| x.0).sum();
    r.line(format!("unexpected client outcomes: {n_unexpected}"));
    for (k, (n, details)) in &unexpected {
        r.line(format!("  {k}: {n} {details:?}"));
    }
    r.check(n_unexpected == 0, "no unexpected client outcome");
    let mut zero = Vec::new();
    for fam in [
        "portcullis_upstream_errors_total",
        "portcullis_bad_requests_total",
        "portcullis_connections_rejected_total",
        "portcullis_events_dropped_total",
        "portcullis_mitm_errors_total",
    ] {
        zero.push((fam, delta_sum(&m0, &m1, fam, "")));
    }
    r.line(format!(
        "error counters Δ: {}",
        zero.iter()
            .map(|(f, d)| format!("{f} {d}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    r.check(
        zero.iter().all(|(_, d)| *d == 0),
        "error counters did not move",
    );
    let gauges = [
        "portcullis_active_connections{listener=\"http\"}",
        "portcullis_active_connections{listener=\"socks5\"}",
        "portcullis_active_tunnels",
        "portcullis_pending_approvals",
    ];
    let gauge_vals: Vec<(&str, f64)> = gauges
        .iter()
        .map(|g| (*g, delta_sum(&HashMap::new(), &m1, g, "") as f64))
        .collect();
    r.line(format!(
        "gauges at the end: {}",
        gauge_vals
            .iter()
            .map(|(g, v)| format!("{g} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    r.check(
        gauge_vals.iter().all(|(_, v)| *v == 0.0),
        "no client connection, tunnel or pending approval left at the end",
    );
    let new_other: Vec<&String> = v1s.other.iter().skip(v0.other.len()).collect();
    let control_log = control.stderr_text();
    let control_lines: Vec<&str> = control_log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    r.line(format!(
        "log lines other than violation lines: proxy {} during the load (at start-up {}: {:?}), control {}",
        new_other.len(),
        v0.other.len(),
        v0.other,
        control_lines.len()
    ));
    for l in new_other.iter().take(5) {
        r.line(format!("  proxy: {l}"));
    }
    for l in control_lines.iter().take(5) {
        r.line(format!("  control: {l}"));
    }
    r.check(
        new_other.is_empty() && control_lines.is_empty(),
        "no WARN/ERROR log line other than violation lines (proxy --log warn, control PORTCULLIS_LOG=warn)",
    );

    // Memory.
    rss_section(&mut r, "proxy", &proxy_rss, secs_f, warm);
    r.line(format!(
        "  proxy RSS after the load drained: {:.1} MiB",
        proxy_rss_end as f64 / 1024.0
    ));
    rss_section(&mut r, "control", &control_rss, secs_f, warm);
    r.line(format!(
        "  control RSS after the load drained: {:.1} MiB",
        control_rss_end as f64 / 1024.0
    ));

    r.line(if r.failures.is_empty() {
        "RESULT: PASS".to_string()
    } else {
        format!("RESULT: FAIL ({} checks failed)", r.failures.len())
    });
    print!("{}", r.out);
    let _ = std::io::stdout().flush();
    let failed = !r.failures.is_empty();
    drop(proxy);
    drop(control);
    drop(http_origin);
    drop(tcp_origin);
    drop(dns);
    if failed {
        std::process::exit(1);
    }
}
