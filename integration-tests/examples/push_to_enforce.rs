//! Benchmark (control.md §8.5 and test 24, not a test): push-to-enforce time and Decision-event
//! throughput with the real release binaries.
//!
//! `cargo run --release -p portcullis-integration-tests --example push_to_enforce [-- ROUNDS [E2E_ROUNDS]]`
//!
//! One `portcullis-control serve` (approvals off, so a miss is an immediate 403).
//!
//! 1. **Spec method** (default 200 rounds): 1, 10 and 100 bare data-plane policy clients attach
//!    over `DataPlane.Attach` from this process, each on its own connection. A client does what
//!    the proxy's attach loop does with a snapshot — convert it with the shared
//!    `SnapshotLists::policy_spec`, compile it with the real policy engine, swap it in, then ack —
//!    but has no listeners. Each round adds `network_rule(host="rN-K.bench", protocol="http",
//!    decision="allow")` with `AddRule(wait_for_enforcement = true)`; push-to-enforce is the time
//!    from just before the RPC to the last client's ack of that version (an acked version is
//!    enforced, control.md §8.3). Also prints the RPC time (it returns after the last ack) and
//!    checks every response says `enforced`.
//! 2. **End to end** (default 20 rounds): 1, 10 and 100 `portcullis-proxy` processes (one
//!    worker thread each). From just before `AddRule` (without waiting), the time until every
//!    proxy has answered a raw `GET http://rN-K.bench:PORT/` with 200 from the loopback origin
//!    (names resolve through the test DNS server; each proxy is polled from its own task, 1 ms
//!    between attempts, starting when `AddRule` returns).
//! 3. With the 100 proxies, 64 client tasks send requests to a host with no rule for a few
//!    seconds while one `WatchDecisions` stream counts the deny events it receives; prints
//!    events/s and any `lagged` (counted, dropped) events.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use portcullis::policy::CompiledPolicy;
use portcullis::proto::v1;
use portcullis::proto::v1::data_plane_client::DataPlaneClient;
use portcullis_integration_tests::control::ControlSpec;
use portcullis_integration_tests::proxy::release_bins;
use portcullis_integration_tests::{ControlProcess, DnsServer, origin::http_echo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const COUNTS: [usize; 3] = [1, 10, 100];

struct Proxy {
    child: Child,
    http: String,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_proxy(bin: &std::path::Path, control: &ControlProcess, config: &std::path::Path) -> Proxy {
    use std::io::BufRead;
    let mut child = Command::new(bin)
        .args([
            "--http",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--socks5",
            "127.0.0.1:0",
            "--worker-threads",
            "1",
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
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn portcullis-proxy");
    let mut stderr = child.stderr.take().expect("stderr");
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let Some(Ok(line)) = lines.next() else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "proxy printed no ready line: {}",
            errors.join().unwrap_or_default()
        );
    };
    std::thread::spawn(move || for _ in lines {});
    let ready: serde_json::Value = serde_json::from_str(&line).expect("ready JSON");
    let http = ready["http"].as_str().expect("http address").to_string();
    Proxy { child, http }
}

/// One request through the proxy; the response's status (0 on a connection error).
async fn status_of(proxy: &str, host: &str, port: u16) -> u16 {
    let Ok(mut s) = tokio::net::TcpStream::connect(proxy).await else {
        return 0;
    };
    let req = format!(
        "GET http://{host}:{port}/ HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return 0;
    }
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return 0,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&buf)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

async fn wait_in_sync(c: &ControlProcess, n: usize) {
    let mut client = c.client().await;
    for _ in 0..600 {
        let proxies = client
            .list_proxies(v1::ListProxiesRequest {})
            .await
            .expect("ListProxies")
            .into_inner()
            .proxies;
        if proxies.len() == n && proxies.iter().all(|p| p.in_sync) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{n} proxies never attached and in sync");
}

/// Per snapshot version: how many clients acked it, the first and last ack, and the time the
/// clients spent converting and compiling it (summed).
type AckLog = Arc<Mutex<HashMap<u64, Acks>>>;

#[derive(Clone, Copy)]
struct Acks {
    count: usize,
    first: Instant,
    last: Instant,
    compile: Duration,
}

/// One bare policy client: attach, compile and swap every snapshot, ack it. Runs until the
/// stream ends (the bench aborts it).
async fn policy_client(url: String, token: String, n: usize, acks: AckLog) {
    let channel = tonic::transport::Endpoint::from_shared(url)
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to control");
    let auth: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
        format!("Bearer {token}").parse().expect("token is ASCII");
    let mut client =
        DataPlaneClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", auth.clone());
            Ok(req)
        })
        .max_decoding_message_size(16 * 1024 * 1024);
    let (tx, rx) = tokio::sync::mpsc::channel::<v1::ProxyMessage>(16);
    let hello = v1::Hello {
        protocol_version: 1,
        proxy_id: format!("px-{n:012x}"),
        session_id: "bench".into(),
        version: "bench".into(),
        pid: std::process::id(),
        ..Default::default()
    };
    tx.send(v1::ProxyMessage {
        msg: Some(v1::proxy_message::Msg::Hello(hello)),
    })
    .await
    .expect("queue Hello");
    let mut inbound = client
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("Attach")
        .into_inner();
    let enforced: RwLock<Option<Arc<CompiledPolicy>>> = RwLock::new(None);
    while let Ok(Some(msg)) = inbound.message().await {
        let Some(v1::control_message::Msg::Snapshot(snap)) = msg.msg else {
            continue;
        };
        let started = Instant::now();
        let spec = portcullis::proto::SnapshotLists::policy_spec(&snap, true, false)
            .expect("snapshot converts");
        let policy = CompiledPolicy::compile(&spec).expect("snapshot compiles");
        if let Ok(mut e) = enforced.write() {
            *e = Some(Arc::new(policy));
        }
        let compile = started.elapsed();
        let ack = v1::SnapshotAck {
            control_instance_id: snap.control_instance_id,
            version: snap.version,
            applied: true,
            error: String::new(),
        };
        if tx
            .send(v1::ProxyMessage {
                msg: Some(v1::proxy_message::Msg::SnapshotAck(ack)),
            })
            .await
            .is_err()
        {
            return;
        }
        let now = Instant::now();
        if let Ok(mut log) = acks.lock() {
            let e = log.entry(snap.version).or_insert(Acks {
                count: 0,
                first: now,
                last: now,
                compile: Duration::ZERO,
            });
            e.count += 1;
            e.first = e.first.min(now);
            e.last = e.last.max(now);
            e.compile += compile;
        }
    }
}

/// Part 1: the spec's method with bare policy clients.
fn spec_method(rt: &tokio::runtime::Runtime, control: &ControlProcess, rounds: usize) {
    println!(
        "push-to-enforce (control.md §8.5): AddRule → last ack, bare policy clients, {rounds} rounds"
    );
    println!(
        "| policy clients | to last ack p50 | p99 | max | AddRule (wait_for_enforcement) p50 | p99 | max | to first ack p50 | compile CPU per round p50 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let acks: AckLog = Arc::new(Mutex::new(HashMap::new()));
    let mut clients = Vec::new();
    for n in COUNTS {
        while clients.len() < n {
            let i = clients.len();
            clients.push(rt.spawn(policy_client(
                control.url(),
                control.token.clone(),
                i,
                acks.clone(),
            )));
        }
        rt.block_on(wait_in_sync(control, n));
        let mut to_ack = Vec::new();
        let mut rpc = Vec::new();
        let mut to_first = Vec::new();
        let mut compile = Vec::new();
        for k in 0..rounds {
            let host = format!("c{n}-{k}.bench");
            let (t0, call, version) = rt.block_on(async {
                let mut client = control.client().await;
                let t0 = Instant::now();
                let r = client
                    .add_rule(v1::AddRuleRequest {
                        host,
                        protocol: "http".into(),
                        decision: "allow".into(),
                        wait_for_enforcement: true,
                        ..Default::default()
                    })
                    .await
                    .expect("AddRule")
                    .into_inner();
                assert!(
                    r.enforced && r.lagging_proxies.is_empty(),
                    "version {} not enforced; lagging: {:?}",
                    r.policy_version,
                    r.lagging_proxies
                );
                (t0, t0.elapsed(), r.policy_version)
            });
            let a = acks
                .lock()
                .ok()
                .and_then(|log| log.get(&version).copied())
                .expect("acks of the version");
            assert_eq!(a.count, n, "every client acked version {version}");
            to_ack.push(a.last.saturating_duration_since(t0));
            to_first.push(a.first.saturating_duration_since(t0));
            compile.push(a.compile);
            rpc.push(call);
        }
        to_ack.sort();
        rpc.sort();
        to_first.sort();
        compile.sort();
        println!(
            "| {n} | {} | {} | {} | {} | {} | {} | {} | {} |",
            ms(pct(&to_ack, 0.5)),
            ms(pct(&to_ack, 0.99)),
            ms(*to_ack.last().expect("rounds")),
            ms(pct(&rpc, 0.5)),
            ms(pct(&rpc, 0.99)),
            ms(*rpc.last().expect("rounds")),
            ms(pct(&to_first, 0.5)),
            ms(pct(&compile, 0.5)),
        );
    }
    for c in clients {
        c.abort();
    }
    // Let the control plane see the streams go before proxies attach.
    rt.block_on(wait_in_sync(control, 0));
    println!();
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let e2e_rounds: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let (proxy_bin, control_bin) = release_bins();
    let origin = http_echo("127.0.0.1");
    let port = origin.port();
    let dns = DnsServer::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let rules = tmp.path().join("portcullis.rules");
    let control = ControlProcess::start_spec(ControlSpec {
        bin: control_bin,
        dir: tmp.path(),
        rules: &rules,
        config: "[network]\nallow_local_binding = true\n[approvals]\nenabled = false\n",
        env: &[("PORTCULLIS_LOG", "warn")],
    });
    let proxy_config = tmp.path().join("proxy.toml");
    std::fs::write(
        &proxy_config,
        format!("[network]\ndns_servers = [\"{}\"]\n", dns.addr_string()),
    )
    .expect("proxy config");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    spec_method(&rt, &control, rounds);
    if e2e_rounds == 0 {
        return;
    }
    let mut proxies: Vec<Proxy> = Vec::new();
    println!("end to end: AddRule → every proxy answers 200, {e2e_rounds} rounds");
    println!(
        "| proxies | all allow p50 | p99 | max | AddRule RPC p50 | p99 | after the RPC p50 | p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for n in COUNTS {
        while proxies.len() < n {
            proxies.push(start_proxy(&proxy_bin, &control, &proxy_config));
        }
        rt.block_on(wait_in_sync(&control, n));
        let addrs: Arc<Vec<String>> = Arc::new(proxies.iter().map(|p| p.http.clone()).collect());
        let mut all = Vec::new();
        let mut rpc = Vec::new();
        let mut push = Vec::new();
        for k in 0..e2e_rounds {
            let host = format!("r{n}-{k}.bench");
            dns.set(&host, &["127.0.0.1".parse().expect("ip")]);
            let (total, call) = rt.block_on(async {
                let mut client = control.client().await;
                let t0 = Instant::now();
                client
                    .add_rule(v1::AddRuleRequest {
                        host: host.clone(),
                        protocol: "http".into(),
                        decision: "allow".into(),
                        ..Default::default()
                    })
                    .await
                    .expect("AddRule");
                let call = t0.elapsed();
                let mut tasks = Vec::new();
                for a in addrs.iter() {
                    let (a, host) = (a.clone(), host.clone());
                    tasks.push(tokio::spawn(async move {
                        for _ in 0..10_000 {
                            if status_of(&a, &host, port).await == 200 {
                                return t0.elapsed();
                            }
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        panic!("proxy {a} never allowed {host}");
                    }));
                }
                let mut last = Duration::ZERO;
                for t in tasks {
                    last = last.max(t.await.expect("poller"));
                }
                (last, call)
            });
            all.push(total);
            rpc.push(call);
            push.push(total.saturating_sub(call));
        }
        all.sort();
        rpc.sort();
        push.sort();
        println!(
            "| {n} | {} | {} | {} | {} | {} | {} | {} |",
            ms(pct(&all, 0.5)),
            ms(pct(&all, 0.99)),
            ms(*all.last().expect("rounds")),
            ms(pct(&rpc, 0.5)),
            ms(pct(&rpc, 0.99)),
            ms(pct(&push, 0.5)),
            ms(pct(&push, 0.99)),
        );
    }

    // Decision-event throughput over WatchDecisions while every proxy answers denies.
    let secs = 5;
    let denied = "nobody.bench";
    dns.set(denied, &["127.0.0.1".parse().expect("ip")]);
    let addrs: Arc<Vec<String>> = Arc::new(proxies.iter().map(|p| p.http.clone()).collect());
    rt.block_on(async {
        let mut client = control.client().await;
        let mut stream = client
            .watch_decisions(v1::WatchDecisionsRequest::default())
            .await
            .expect("WatchDecisions")
            .into_inner();
        let received = Arc::new(AtomicU64::new(0));
        let lagged = Arc::new(AtomicU64::new(0));
        let (r, l) = (received.clone(), lagged.clone());
        let watcher = tokio::spawn(async move {
            while let Ok(Some(e)) = stream.message().await {
                match e.event {
                    Some(v1::decision_event::Event::Decision(_)) => {
                        r.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(v1::decision_event::Event::Lagged(x)) => {
                        l.fetch_add(x.missed, Ordering::Relaxed);
                    }
                    None => {}
                }
            }
        });
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let mut gens = Vec::new();
        for g in 0..64usize {
            let (addrs, stop, sent) = (addrs.clone(), stop.clone(), sent.clone());
            gens.push(tokio::spawn(async move {
                let mut i = g;
                while !stop.load(Ordering::Relaxed) {
                    if status_of(&addrs[i % addrs.len()], denied, port).await == 403 {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 64;
                }
            }));
        }
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        stop.store(true, Ordering::Relaxed);
        for g in gens {
            let _ = g.await;
        }
        let elapsed = t0.elapsed();
        // Let the last reports arrive.
        let mut last = u64::MAX;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = received.load(Ordering::Relaxed);
            if now == last {
                break;
            }
            last = now;
        }
        watcher.abort();
        let (s, r, l) = (
            sent.load(Ordering::Relaxed),
            received.load(Ordering::Relaxed),
            lagged.load(Ordering::Relaxed),
        );
        println!();
        println!(
            "decision events: {} proxies, 64 client tasks, {:.1} s: {s} denied requests, {r} deny events received ({:.0} events/s), {l} reported lagged, {} unaccounted",
            addrs.len(),
            elapsed.as_secs_f64(),
            r as f64 / elapsed.as_secs_f64(),
            s.saturating_sub(r + l)
        );
    });
    drop(proxies);
    drop(control);
    drop(origin);
}
