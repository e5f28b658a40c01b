//! control.md §1 and §6 with the real binaries: `portcullis-control serve` (token, auth, ready
//! line) and a `portcullis-proxy --control` that applies the snapshot and reports Decisions.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use portcullis::proto::v1;
use portcullis::proto::v1::control_client::ControlClient;
use portcullis_integration_tests::origin::{http_echo, runtime};
use portcullis_integration_tests::proxy::control_bin;
use portcullis_integration_tests::{ProxyProcess, curl, run_to_exit};

struct Control {
    child: Child,
    grpc: String,
    token: String,
    dir: tempfile::TempDir,
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_control(config: &str) -> Control {
    start_control_at(config, "127.0.0.1:0", tempfile::tempdir().unwrap())
}

fn start_control_at(config: &str, listen: &str, dir: tempfile::TempDir) -> Control {
    let cfg = dir.path().join("control.toml");
    std::fs::write(&cfg, config).unwrap();
    let token_file = dir.path().join("control.token");
    let mut child = Command::new(control_bin())
        .args(["serve", "--listen", listen, "--config"])
        .arg(&cfg)
        .arg("--rules")
        .arg(dir.path().join("portcullis.rules"))
        .arg("--token-file")
        .arg(&token_file)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn portcullis-control");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        for _ in lines {}
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("control ready line");
    let ready: serde_json::Value = serde_json::from_str(&line).expect("ready line JSON");
    assert_eq!(ready["component"], "control");
    let grpc = ready["grpc"].as_str().unwrap().to_string();
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(token.len(), 64, "a fresh 64-hex token is created");
    let mode = std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(&token_file).unwrap());
    assert_eq!(mode & 0o777, 0o600);
    Control {
        child,
        grpc,
        token,
        dir,
    }
}

async fn client(
    c: &Control,
    token: Option<&str>,
) -> ControlClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        impl tonic::service::Interceptor,
    >,
> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", c.grpc))
        .unwrap()
        .connect()
        .await
        .expect("connect to control");
    let value = token.map(|t| {
        format!("Bearer {t}")
            .parse::<tonic::metadata::MetadataValue<_>>()
            .unwrap()
    });
    ControlClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        if let Some(v) = &value {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    })
}

#[test]
fn attached_proxy_enforces_the_snapshot_and_reports_decisions() {
    let origin = http_echo("127.0.0.1");
    let allow = format!("127.0.0.1:{}", origin.port());
    let control = start_control(&format!(
        "[network]\nallowed_domains = [\"{allow}\"]\n[approvals]\nenabled = false\n"
    ));
    let token_file = control.dir.path().join("control.token");
    let endpoint = format!("http://{}", control.grpc);
    // The local --allow is ignored: the snapshot decides.
    let proxy = ProxyProcess::start(
        &[
            "--control",
            &endpoint,
            "--control-token-file",
            token_file.to_str().unwrap(),
            "--allow",
            "local-only.test",
        ],
        None,
    );
    assert!(proxy.stderr_text().contains("attached to a control plane"));
    let rt = runtime();
    let token = control.token.clone();
    let mut watch = rt.block_on(async {
        let mut c = client(&control, Some(&token)).await;
        c.watch_decisions(v1::WatchDecisionsRequest::default())
            .await
            .expect("WatchDecisions")
            .into_inner()
    });
    let px = proxy.http_url();
    assert_eq!(curl(&["-x", &px, &format!("http://{allow}/")]).status, 200);
    let blocked = curl(&["-x", &px, "http://local-only.test/"]);
    assert_eq!(blocked.status, 403);
    let id = blocked
        .header("x-portcullis-decision-id")
        .unwrap()
        .to_string();
    let event = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), watch.message()).await })
        .expect("a Decision event in time")
        .expect("stream ok")
        .expect("an event");
    let Some(v1::decision_event::Event::Decision(d)) = event.event else {
        panic!("expected a Decision, got {event:?}")
    };
    assert_eq!(d.id, id, "the same Decision id on every surface");
    assert_eq!(
        (d.decision.as_str(), d.reason.as_str()),
        ("deny", "not_allowed")
    );
    assert_eq!(d.session_id, "default");
    assert!(d.proxy_id.starts_with("px-"));

    // Attached: the admin API shows the control's policy, refuses POST /mode, and a reload of
    // the local file does not replace the snapshot's lists.
    let admin = proxy.admin_addr();
    let patterns: serde_json::Value =
        serde_json::from_slice(&portcullis_integration_tests::admin_get(admin, "/patterns").body)
            .unwrap();
    assert_eq!(patterns["source"], "control");
    assert_eq!(patterns["version"], 1);
    let r = portcullis_integration_tests::admin_post(admin, "/mode", r#"{"mode":"limited"}"#);
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("mode is managed by the control plane"));
    assert_eq!(
        portcullis_integration_tests::admin_post(admin, "/reload", "").status,
        200
    );
    assert_eq!(curl(&["-x", &px, &format!("http://{allow}/")]).status, 200);
    let config: serde_json::Value =
        serde_json::from_slice(&portcullis_integration_tests::admin_get(admin, "/config").body)
            .unwrap();
    assert_eq!(config["control"]["attached"], true);

    let proxies = rt.block_on(async {
        let mut c = client(&control, Some(&token)).await;
        c.list_proxies(v1::ListProxiesRequest {})
            .await
            .unwrap()
            .into_inner()
            .proxies
    });
    assert_eq!(proxies.len(), 1);
    assert_eq!(proxies[0].acked_version, 1);
    assert!(proxies[0].in_sync);
    assert_eq!(proxies[0].http_addr, proxy.http);
}

#[test]
fn every_rpc_needs_the_token() {
    let control = start_control("");
    let rt = runtime();
    rt.block_on(async {
        let mut c = client(&control, None).await;
        let e = c.get_status(v1::GetStatusRequest {}).await.unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (tonic::Code::Unauthenticated, "missing bearer token")
        );
        let wrong = "f".repeat(64);
        let mut c = client(&control, Some(&wrong)).await;
        let e = c.get_status(v1::GetStatusRequest {}).await.unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (tonic::Code::Unauthenticated, "invalid bearer token")
        );
        let mut c = client(&control, Some(&control.token)).await;
        let s = c
            .get_status(v1::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.control_instance_id.len(), 32);
        assert_eq!(s.version, 1);
    });
}

#[test]
fn proxy_without_a_control_plane_exits_1_and_wide_token_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("t");
    std::fs::write(&token, "a".repeat(64)).unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // Nothing listens on this port: the attach fails and the proxy refuses to start.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (status, out, err) = run_to_exit(
        &[
            "--control",
            &format!("http://{free}"),
            "--control-token-file",
            token.to_str().unwrap(),
            "--control-timeout",
            "3",
        ],
        None,
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(out.is_empty(), "no ready line: {out}");
    assert!(
        err.contains("could not attach to control plane at"),
        "{err}"
    );

    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = Command::new(control_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--token-file"])
        .arg(&token)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is accessible by other users (mode 0644); run chmod 600"),
        "{err}"
    );
}

/// A proxy attached to a control plane whose asks are enabled; names resolve through a
/// loopback DNS server to the loopback origin.
struct AskSetup {
    control: Control,
    proxy: ProxyProcess,
    _dns: portcullis_integration_tests::DnsServer,
    origin_port: u16,
    _origin: portcullis_integration_tests::origin::Origin,
}

fn ask_setup(timeout_secs: u64) -> AskSetup {
    ask_setup_with(timeout_secs, "")
}

fn ask_setup_with(timeout_secs: u64, approvals_extra: &str) -> AskSetup {
    let origin = http_echo("127.0.0.1");
    let dns = portcullis_integration_tests::DnsServer::start();
    for name in ["app.test", "other.test", "twice.test", "slow.test"] {
        dns.set(name, &["127.0.0.1".parse().unwrap()]);
    }
    let control = start_control(&format!(
        "[network]\nallow_local_binding = true\n[approvals]\nask_timeout_secs = {timeout_secs}\n{approvals_extra}"
    ));
    let token_file = control.dir.path().join("control.token");
    let proxy = ProxyProcess::start(
        &[
            "--control",
            &format!("http://{}", control.grpc),
            "--control-token-file",
            token_file.to_str().unwrap(),
        ],
        Some(&format!(
            "[network]\ndns_servers = [\"{}\"]\n",
            dns.addr_string()
        )),
    );
    AskSetup {
        origin_port: origin.port(),
        control,
        proxy,
        _dns: dns,
        _origin: origin,
    }
}

fn wait_pending(s: &AskSetup, n: usize) -> Vec<v1::PendingAsk> {
    let rt = runtime();
    for _ in 0..200 {
        let asks = rt.block_on(async {
            let mut c = client(&s.control, Some(&s.control.token)).await;
            c.list_pending(v1::ListPendingRequest::default())
                .await
                .unwrap()
                .into_inner()
                .asks
        });
        if asks.iter().map(|a| a.waiters as usize).sum::<usize>() >= n {
            return asks;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let asks = rt.block_on(async {
        let mut c = client(&s.control, Some(&s.control.token)).await;
        c.list_pending(v1::ListPendingRequest::default())
            .await
            .unwrap()
            .into_inner()
            .asks
    });
    panic!(
        "no pending ask with {n} waiters appeared: {asks:?}\n{}",
        s.proxy.stderr_text()
    );
}

fn held_curl(
    s: &AskSetup,
    host: &str,
) -> std::thread::JoinHandle<portcullis_integration_tests::CurlResult> {
    let px = s.proxy.http_url();
    let url = format!("http://{host}:{}/", s.origin_port);
    std::thread::spawn(move || curl(&["-x", &px, &url]))
}

#[test]
fn ask_once_shared_by_concurrent_requests_then_allowed() {
    let s = ask_setup(60);
    // 20 concurrent requests to one destination share one pending entry and one answer.
    let held: Vec<_> = (0..20).map(|_| held_curl(&s, "twice.test")).collect();
    let asks = wait_pending(&s, 20);
    assert_eq!(asks.len(), 1, "one ask for one destination: {asks:?}");
    assert_eq!(asks[0].waiters, 20);
    assert_eq!(
        (asks[0].host.as_str(), asks[0].protocol.as_str()),
        ("twice.test", "http")
    );
    let id = asks[0].id.clone();
    assert!(id.starts_with("ask_") && id.len() == 20, "{id}");
    runtime().block_on(async {
        let mut c = client(&s.control, Some(&s.control.token)).await;
        let r = c
            .approve(v1::ApproveRequest {
                pending_id: id.clone(),
                scope: v1::ApprovalScope::Once as i32,
                ..Default::default()
            })
            .await
            .expect("Approve")
            .into_inner();
        assert_eq!(r.outcome, v1::Outcome::AllowOnce as i32);
        let again = c
            .approve(v1::ApproveRequest {
                pending_id: id.clone(),
                scope: v1::ApprovalScope::Once as i32,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");
    });
    for h in held {
        assert_eq!(h.join().unwrap().status, 200);
    }
    // The ask Decision is in the blocked log with the id the PendingAsk names.
    let blocked = portcullis_integration_tests::blocked(s.proxy.admin_addr());
    let entries = blocked["blocked"].as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["decision"] == "ask" && e["id"] == asks[0].decision_id.as_str())
    );
}

#[test]
fn deny_session_and_timeout_answers() {
    let s = ask_setup(1);
    // Timeout: nobody answers within 1 s.
    let r = held_curl(&s, "slow.test").join().unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(
        r.text()
            .contains(r#""reason":"approval_timeout","source":"decider""#),
        "{}",
        r.text()
    );
    drop(s);

    let s = ask_setup(60);
    let h = held_curl(&s, "app.test");
    let id = wait_pending(&s, 1)[0].id.clone();
    runtime().block_on(async {
        let mut c = client(&s.control, Some(&s.control.token)).await;
        c.deny(v1::DenyRequest {
            pending_id: id,
            scope: v1::ApprovalScope::Once as i32,
            ..Default::default()
        })
        .await
        .expect("Deny");
    });
    let r = h.join().unwrap();
    assert_eq!(r.status, 403);
    assert!(
        r.text()
            .contains(r#""reason":"approval_denied","source":"decider""#),
        "{}",
        r.text()
    );

    // Session scope: later requests of the session pass without a new ask.
    let h = held_curl(&s, "other.test");
    let id = wait_pending(&s, 1)[0].id.clone();
    runtime().block_on(async {
        let mut c = client(&s.control, Some(&s.control.token)).await;
        let r = c
            .approve(v1::ApproveRequest {
                pending_id: id,
                scope: v1::ApprovalScope::Session as i32,
                ..Default::default()
            })
            .await
            .expect("Approve session")
            .into_inner();
        assert!(r.policy_version > 1);
    });
    assert_eq!(h.join().unwrap().status, 200);
    let again = held_curl(&s, "other.test").join().unwrap();
    assert_eq!(again.status, 200, "allowed by the pushed session allow");
}

fn cli(s: &AskSetup, args: &[&str]) -> (Option<i32>, String, String) {
    let token_file = s.control.dir.path().join("control.token");
    let endpoint = format!("http://{}", s.control.grpc);
    let out = Command::new(control_bin())
        .args(args)
        .args([
            "--endpoint",
            &endpoint,
            "--token-file",
            token_file.to_str().unwrap(),
        ])
        .output()
        .expect("run portcullis-control");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_pending_approve_deny_and_policy() {
    let s = ask_setup(60);
    let (code, out, err) = cli(&s, &["pending"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), "no pending asks");
    let h = held_curl(&s, "app.test");
    let id = wait_pending(&s, 1)[0].id.clone();
    let (code, out, _) = cli(&s, &["pending", "--json"]);
    assert_eq!(code, Some(0));
    let row: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(
        (row["id"].as_str(), row["host"].as_str()),
        (Some(id.as_str()), Some("app.test"))
    );
    let (code, out, err) = cli(&s, &["approve", &id]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out.trim(),
        format!("allowed {id} (app.test:{} http) once", s.origin_port)
    );
    assert_eq!(h.join().unwrap().status, 200);
    let (code, _, err) = cli(&s, &["approve", &id]);
    assert_eq!(code, Some(1));
    assert!(err.starts_with("error: FAILED_PRECONDITION: ask"), "{err}");
    let (code, _, err) = cli(&s, &["deny", "ask_nothexatall!!"]);
    assert_eq!(code, Some(1));
    assert!(
        err.starts_with("error: INVALID_ARGUMENT: pending_id"),
        "{err}"
    );
    // pending --watch prints the listing, then synced (killed after the first lines).
    let token_file = s.control.dir.path().join("control.token");
    let mut watcher = Command::new(control_bin())
        .args([
            "pending",
            "--watch",
            "--endpoint",
            &format!("http://{}", s.control.grpc),
        ])
        .arg("--token-file")
        .arg(&token_file)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watcher.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "synced");
    let _ = watcher.kill();
    let _ = watcher.wait();
    let (code, out, err) = cli(&s, &["policy"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("policy version "), "{out}");
    assert!(out.contains("allow_local_binding: true"), "{out}");
}

#[test]
fn control_loss_denies_held_requests_and_the_proxy_reattaches() {
    let origin = http_echo("127.0.0.1");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let config = format!(
        "[network]\nallowed_domains = [\"127.0.0.1:{}\"]\n[approvals]\nask_timeout_secs = 60\n",
        origin.port()
    );
    let control = start_control_at(&config, &listen, tempfile::tempdir().unwrap());
    let token_file = control.dir.path().join("control.token");
    let proxy = ProxyProcess::start(
        &[
            "--control",
            &format!("http://{listen}"),
            "--control-token-file",
            token_file.to_str().unwrap(),
        ],
        Some("[control]\nreconnect_initial_ms = 50\nreconnect_max_ms = 200\n"),
    );
    let px = proxy.http_url();
    // A held request (a literal the allowlist misses on another port would be local: use a name).
    let held = {
        let px = px.clone();
        std::thread::spawn(move || curl(&["-x", &px, "http://held.test/"]))
    };
    // Wait until the ask is registered, then kill the control plane.
    let rt = runtime();
    for _ in 0..200 {
        let n = rt.block_on(async {
            let mut c = client(&control, Some(&control.token)).await;
            c.list_pending(v1::ListPendingRequest::default())
                .await
                .unwrap()
                .into_inner()
                .asks
                .len()
        });
        if n == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let dir = {
        let mut control = control;
        let _ = control.child.kill();
        let _ = control.child.wait();
        // Keep the token file for the restart.
        std::mem::replace(&mut control.dir, tempfile::tempdir().unwrap())
    };
    let r = held.join().unwrap();
    assert_eq!(r.status, 403);
    assert!(
        r.text()
            .contains(r#""reason":"control_unavailable","source":"decider""#),
        "{}",
        r.text()
    );
    // The last snapshot stays in force while detached.
    assert_eq!(
        curl(&["-x", &px, &format!("http://127.0.0.1:{}/", origin.port())]).status,
        200
    );
    let r = curl(&["-x", &px, "http://other.test/"]);
    assert!(
        r.text().contains(r#""reason":"control_unavailable""#),
        "{}",
        r.text()
    );
    // A new control plane on the same address: the proxy re-attaches by itself.
    let control = start_control_at(&config, &listen, dir);
    let mut attached = false;
    for _ in 0..200 {
        let n = rt.block_on(async {
            let mut c = client(&control, Some(&control.token)).await;
            c.list_proxies(v1::ListProxiesRequest {})
                .await
                .unwrap()
                .into_inner()
                .proxies
                .len()
        });
        if n == 1 {
            attached = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(attached, "proxy re-attached: {}", proxy.stderr_text());
}

#[test]
fn end_session_cancels_asks_and_session_allows() {
    let s = ask_setup(60);
    // A session allow first.
    let h = held_curl(&s, "other.test");
    let id = wait_pending(&s, 1)[0].id.clone();
    let rt = runtime();
    rt.block_on(async {
        let mut c = client(&s.control, Some(&s.control.token)).await;
        c.approve(v1::ApproveRequest {
            pending_id: id,
            scope: v1::ApprovalScope::Session as i32,
            ..Default::default()
        })
        .await
        .expect("Approve session");
    });
    assert_eq!(h.join().unwrap().status, 200);
    // Then a held request, and the session ends.
    let h = held_curl(&s, "app.test");
    wait_pending(&s, 1);
    let r = rt.block_on(async {
        let mut c = client(&s.control, Some(&s.control.token)).await;
        c.end_session(v1::EndSessionRequest {
            session_id: "default".into(),
        })
        .await
        .expect("EndSession")
        .into_inner()
    });
    assert_eq!((r.cancelled_asks, r.removed_session_allows), (1, 1));
    let held = h.join().unwrap();
    assert_eq!(held.status, 403);
    assert!(
        held.text().contains(r#""reason":"session_ended""#),
        "{}",
        held.text()
    );
    // The session allow is gone: other.test is asked again (and times out here quickly
    // enough only with a short timeout, so just check a new ask appears).
    let again = held_curl(&s, "other.test");
    let asks = wait_pending(&s, 1);
    assert_eq!(asks[0].host, "other.test");
    rt.block_on(async {
        let mut c = client(&s.control, Some(&s.control.token)).await;
        c.deny(v1::DenyRequest {
            pending_id: asks[0].id.clone(),
            scope: v1::ApprovalScope::Once as i32,
            ..Default::default()
        })
        .await
        .expect("Deny");
    });
    assert_eq!(again.join().unwrap().status, 403);
}

#[test]
fn watch_pending_lists_then_streams_created_and_resolved() {
    let s = ask_setup(60);
    let first = held_curl(&s, "app.test");
    wait_pending(&s, 1);
    let rt = runtime();
    let mut watch = rt.block_on(async {
        let mut c = client(&s.control, Some(&s.control.token)).await;
        c.watch_pending(v1::WatchPendingRequest::default())
            .await
            .expect("WatchPending")
            .into_inner()
    });
    let mut next = || {
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), watch.message()).await })
            .expect("an event in time")
            .expect("stream ok")
            .expect("an event")
            .event
            .expect("event set")
    };
    let v1::pending_event::Event::Created(c) = next() else {
        panic!("created first")
    };
    assert!(c.initial);
    let id = c.ask.unwrap().id;
    assert!(matches!(next(), v1::pending_event::Event::Synced(_)));
    let second = held_curl(&s, "other.test");
    let v1::pending_event::Event::Created(c) = next() else {
        panic!("a live created")
    };
    assert!(!c.initial);
    assert_eq!(c.ask.as_ref().unwrap().host, "other.test");
    let other = c.ask.unwrap().id;
    rt.block_on(async {
        let mut c = client(&s.control, Some(&s.control.token)).await;
        for pending_id in [id.clone(), other.clone()] {
            c.approve(v1::ApproveRequest {
                pending_id,
                scope: v1::ApprovalScope::Once as i32,
                ..Default::default()
            })
            .await
            .expect("Approve");
        }
    });
    let v1::pending_event::Event::Resolved(r) = next() else {
        panic!("resolved")
    };
    assert_eq!(r.ask.unwrap().id, id);
    assert_eq!(r.outcome, v1::Outcome::AllowOnce as i32);
    assert_eq!(first.join().unwrap().status, 200);
    assert_eq!(second.join().unwrap().status, 200);
}

#[test]
fn rules_file_is_enforced_listed_and_fail_closed() {
    let origin = http_echo("127.0.0.1");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("portcullis.rules"),
        format!(
            "# written by hand\nnetwork_rule(host=\"127.0.0.1\", protocol=\"http\", decision=\"allow\", port={})\nnetwork_rule(host=\"bad.test\", protocol=\"https\", decision=\"forbidden\")\n",
            origin.port()
        ),
    )
    .unwrap();
    let control = start_control_at("[approvals]\nenabled = false\n", "127.0.0.1:0", dir);
    let token_file = control.dir.path().join("control.token");
    let proxy = ProxyProcess::start(
        &[
            "--control",
            &format!("http://{}", control.grpc),
            "--control-token-file",
            token_file.to_str().unwrap(),
        ],
        None,
    );
    let px = proxy.http_url();
    assert_eq!(
        curl(&["-x", &px, &format!("http://127.0.0.1:{}/", origin.port())]).status,
        200
    );
    let r = curl(&["-x", &px, "http://bad.test/"]);
    assert!(r.text().contains(r#""reason":"denied""#), "{}", r.text());
    let rules = runtime().block_on(async {
        let mut c = client(&control, Some(&control.token)).await;
        c.list_rules(v1::ListRulesRequest {})
            .await
            .unwrap()
            .into_inner()
            .rules
    });
    assert_eq!(rules.len(), 2);
    assert_eq!(rules[1].line, 3);
    assert_eq!(
        rules[1].text,
        r#"network_rule(host="bad.test", protocol="https", decision="deny")"#
    );
    assert!(rules.iter().all(|r| r.effective));

    // An external edit is picked up and pushed; an invalid one keeps the last good rules.
    let path = control.dir.path().join("portcullis.rules");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("network_rule(host=\"127.0.0.1\", protocol=\"http\", decision=\"deny\")\n");
    std::fs::write(&path, &text).unwrap();
    let url = format!("http://127.0.0.1:{}/", origin.port());
    let mut denied = false;
    for _ in 0..100 {
        if curl(&["-x", &px, &url])
            .text()
            .contains(r#""reason":"denied""#)
        {
            denied = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(denied, "external edit reloaded and enforced");
    std::fs::write(&path, "network_rule(oops\n").unwrap();
    unsafe { libc::kill(control.child.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        curl(&["-x", &px, &url])
            .text()
            .contains(r#""reason":"denied""#),
        "last good rules stay"
    );

    // A corrupt file refuses to start with its position; an unreadable one with exit 1.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.rules");
    std::fs::write(&bad, "# ok\n\nnetwork_rule(host=\"a\", protocl=\"http\")\n").unwrap();
    let out = Command::new(control_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--token-file"])
        .arg(dir.path().join("t"))
        .arg("--rules")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:3:24: unknown argument \"protocl\"",
            bad.display()
        )),
        "{err}"
    );
    let out = Command::new(control_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--token-file"])
        .arg(dir.path().join("t"))
        .arg("--rules")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read rules file"));
}

#[test]
fn always_answers_and_add_remove_rule_persist_and_push() {
    let s = ask_setup(60);
    let rules_path = s.control.dir.path().join("portcullis.rules");
    let h = held_curl(&s, "app.test");
    let id = wait_pending(&s, 1)[0].id.clone();
    let rt = runtime();
    rt.block_on(async {
        let mut c = client(&s.control, Some(&s.control.token)).await;
        let r = c
            .approve(v1::ApproveRequest {
                pending_id: id.clone(),
                scope: v1::ApprovalScope::Always as i32,
                ..Default::default()
            })
            .await
            .expect("Approve always")
            .into_inner();
        assert_eq!(r.outcome, v1::Outcome::AllowAlways as i32);
        assert!(r.policy_version > 1);
    });
    assert_eq!(h.join().unwrap().status, 200);
    let text = std::fs::read_to_string(&rules_path).unwrap();
    assert!(
        text.contains(&format!(
            r#"network_rule(host="app.test", protocol="http", decision="allow", port={}, justification="Allow http access to app.test:{} (ask {id}, by api)")"#,
            s.origin_port, s.origin_port
        )),
        "{text}"
    );
    // Enforced without a new ask.
    assert_eq!(held_curl(&s, "app.test").join().unwrap().status, 200);

    // AddRule deny wins over the allow; RemoveRule takes it back.
    rt.block_on(async {
        let mut c = client(&s.control, Some(&s.control.token)).await;
        let r = c
            .add_rule(v1::AddRuleRequest {
                host: "App.Test.".into(),
                protocol: "https".into(),
                decision: "forbidden".into(),
                ..Default::default()
            })
            .await
            .expect("AddRule")
            .into_inner();
        assert!(r.added);
        assert_eq!(
            r.rule.unwrap().text,
            r#"network_rule(host="app.test", protocol="https", decision="deny")"#
        );
        let again = c
            .add_rule(v1::AddRuleRequest {
                host: "app.test".into(),
                protocol: "https_connect".into(),
                decision: "deny".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!again.added, "identical line is not duplicated");
        let e = c
            .add_rule(v1::AddRuleRequest {
                host: "*.x.test".into(),
                protocol: "https".into(),
                decision: "allow".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    });
    // The push reaches the proxy (poll briefly: the snapshot is applied asynchronously).
    let mut denied = false;
    for _ in 0..100 {
        let r = held_curl(&s, "app.test").join().unwrap();
        if r.status == 403 && r.text().contains(r#""reason":"denied""#) {
            denied = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(denied, "AddRule deny pushed and enforced");
    rt.block_on(async {
        let mut c = client(&s.control, Some(&s.control.token)).await;
        let r = c
            .remove_rule(v1::RemoveRuleRequest {
                host: "app.test".into(),
                port: 0,
                ..Default::default()
            })
            .await
            .expect("RemoveRule")
            .into_inner();
        assert_eq!(r.removed, 1);
        let e = c
            .remove_rule(v1::RemoveRuleRequest {
                host: "app.test".into(),
                port: 0,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
    });
    let mut allowed = false;
    for _ in 0..100 {
        if held_curl(&s, "app.test").join().unwrap().status == 200 {
            allowed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        allowed,
        "the port-scoped allow applies again after RemoveRule"
    );
}

#[test]
fn session_allows_are_capped_and_status_counts() {
    let s = ask_setup_with(60, "max_session_allows = 1\n");
    let rt = runtime();
    let approve = |id: String| {
        rt.block_on(async {
            let mut c = client(&s.control, Some(&s.control.token)).await;
            c.approve(v1::ApproveRequest {
                pending_id: id,
                scope: v1::ApprovalScope::Session as i32,
                ..Default::default()
            })
            .await
        })
    };
    let h = held_curl(&s, "app.test");
    approve(wait_pending(&s, 1)[0].id.clone()).expect("first session allow");
    assert_eq!(h.join().unwrap().status, 200);
    let h = held_curl(&s, "other.test");
    let id = wait_pending(&s, 1)[0].id.clone();
    let e = approve(id.clone()).unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    let status = rt.block_on(async {
        let mut c = client(&s.control, Some(&s.control.token)).await;
        c.get_status(v1::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    });
    assert_eq!(status.pending_asks, 1, "the ask stays pending");
    assert_eq!(status.attached_proxies, 1);
    rt.block_on(async {
        let mut c = client(&s.control, Some(&s.control.token)).await;
        c.approve(v1::ApproveRequest {
            pending_id: id,
            scope: v1::ApprovalScope::Once as i32,
            ..Default::default()
        })
        .await
        .expect("once still works");
    });
    assert_eq!(h.join().unwrap().status, 200);
}

#[test]
fn policy_changes_resolve_pending_asks_and_wait_for_enforcement() {
    let s = ask_setup(60);
    let allowed = held_curl(&s, "app.test");
    let denied = held_curl(&s, "other.test");
    let asks = wait_pending(&s, 2);
    assert_eq!(asks.len(), 2, "{asks:?}");
    let proxy_ids: Vec<String> = runtime().block_on(async {
        let mut c = client(&s.control, Some(&s.control.token)).await;
        // A rule added elsewhere allows the waiting key: POLICY_ALLOW, and the response waits
        // until the proxy acked the version that carries it.
        let r = c
            .add_rule(v1::AddRuleRequest {
                host: "app.test".into(),
                protocol: "http".into(),
                decision: "allow".into(),
                wait_for_enforcement: true,
                ..Default::default()
            })
            .await
            .expect("AddRule allow")
            .into_inner();
        assert!(r.enforced, "{r:?}");
        assert!(r.lagging_proxies.is_empty(), "{r:?}");
        let r = c
            .add_rule(v1::AddRuleRequest {
                host: "other.test".into(),
                protocol: "http".into(),
                decision: "deny".into(),
                wait_for_enforcement: true,
                ..Default::default()
            })
            .await
            .expect("AddRule deny")
            .into_inner();
        assert!(r.enforced, "{r:?}");
        let left = c
            .list_pending(v1::ListPendingRequest::default())
            .await
            .unwrap()
            .into_inner()
            .asks;
        assert!(
            left.is_empty(),
            "policy changes resolved every ask: {left:?}"
        );
        c.list_proxies(v1::ListProxiesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .proxies
            .into_iter()
            .map(|p| p.proxy_id)
            .collect()
    });
    assert_eq!(proxy_ids.len(), 1);
    let a = allowed.join().unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    let d = denied.join().unwrap();
    assert_eq!(d.status, 403, "{}", d.text());
    let first = d.text().lines().next().unwrap_or_default().to_string();
    let json: serde_json::Value =
        serde_json::from_str(first.trim_start_matches("PORTCULLIS_POLICY_DECISION ")).unwrap();
    assert_eq!(json["reason"], "denied");
    assert_eq!(json["source"], "baseline_policy");
    // The final Decision names the ask it ended (the blocked log carries every key).
    let blocked = portcullis_integration_tests::blocked(s.proxy.admin_addr());
    let entry = blocked["blocked"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == json["id"])
        .cloned()
        .unwrap_or_default();
    assert!(
        entry["ask_id"]
            .as_str()
            .unwrap_or_default()
            .starts_with("ask_"),
        "{entry}"
    );
}

#[test]
fn proxy_shutdown_delivers_every_queued_decision_report() {
    let control = start_control("[approvals]\nenabled = false\n");
    let token_file = control.dir.path().join("control.token");
    let endpoint = format!("http://{}", control.grpc);
    let mut proxy = ProxyProcess::start(
        &[
            "--control",
            &endpoint,
            "--control-token-file",
            token_file.to_str().unwrap(),
        ],
        None,
    );
    let rt = runtime();
    let token = control.token.clone();
    let mut watch = rt.block_on(async {
        let mut c = client(&control, Some(&token)).await;
        c.watch_decisions(v1::WatchDecisionsRequest::default())
            .await
            .expect("WatchDecisions")
            .into_inner()
    });
    // Pipelined bursts of denies on keep-alive connections from 4 threads, then SIGTERM at
    // once: the reports still queued in the proxy must reach the control plane before it exits.
    let per_thread = 250;
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let addr = proxy.http.clone();
            std::thread::spawn(move || {
                let mut s = portcullis_integration_tests::raw::connect(&addr);
                let burst: String = (0..per_thread)
                    .map(|i| {
                        format!("GET http://n{t}-{i}.invalid/ HTTP/1.1\r\nHost: n{t}-{i}.invalid\r\n\r\n")
                    })
                    .collect();
                std::io::Write::write_all(&mut s, burst.as_bytes()).unwrap();
                for _ in 0..per_thread {
                    let r = portcullis_integration_tests::raw::read_response(&mut s).unwrap();
                    assert_eq!(r.status, 403);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    proxy.signal(libc::SIGTERM);
    assert!(
        proxy.wait_exit(Duration::from_secs(10)).is_some(),
        "proxy exits"
    );
    let want = 4 * per_thread;
    let got = rt.block_on(async {
        let mut n = 0;
        while n < want {
            match tokio::time::timeout(Duration::from_secs(5), watch.message()).await {
                Ok(Ok(Some(e))) => {
                    if let Some(v1::decision_event::Event::Decision(d)) = e.event {
                        assert_eq!(d.decision, "deny");
                        n += 1;
                    } else {
                        panic!("unexpected event {e:?}");
                    }
                }
                _ => break,
            }
        }
        n
    });
    assert_eq!(got, want, "every deny reported before the proxy exited");
}
