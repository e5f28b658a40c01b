//! audit.md §2 (asks) and §3 (`portcullis.approval`): a proxy attached to a control plane, both
//! exporting to one in-process OTLP receiver.

use std::time::Duration;

use portcullis::proto::v1;
use portcullis_integration_tests::control::ControlProcess;
use portcullis_integration_tests::origin::{http_echo, runtime};
use portcullis_integration_tests::otlp::{OtlpReceiver, Record, Val};
use portcullis_integration_tests::{DnsServer, ProxyProcess, curl};

const WAIT: Duration = Duration::from_secs(20);

/// A control plane in its own state directory (kept alive with it).
fn start_control(config: &str) -> (tempfile::TempDir, ControlProcess) {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("portcullis.rules");
    let control = ControlProcess::start(dir.path(), &rules, config);
    (dir, control)
}

fn pending(c: &ControlProcess, n: usize) -> Vec<v1::PendingAsk> {
    for _ in 0..400 {
        let asks = runtime().block_on(async {
            let mut cl = c.client().await;
            cl.list_pending(v1::ListPendingRequest::default())
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
    panic!("no pending ask with {n} waiters");
}

fn s(v: &str) -> Val {
    Val::Str(v.to_string())
}

/// The first record named `event` whose attribute `key` is `value` (waits up to `WAIT`).
fn record_where(recv: &OtlpReceiver, event: &str, key: &str, value: &str) -> Record {
    recv.wait_for(WAIT, |r| r.event_name == event && r.s(key) == Some(value))
        .unwrap_or_else(|| panic!("no {event} record with {key}={value}: {:?}", recv.records()))
}

fn approval_for(recv: &OtlpReceiver, ask_id: &str) -> Record {
    record_where(recv, "portcullis.approval", "portcullis.ask.id", ask_id)
}

#[test]
fn ask_then_override_allow_produce_two_events_and_approval_records() {
    let recv = OtlpReceiver::grpc();
    let audit = format!(
        "[audit]\nendpoint = \"{}\"\nscheduled_delay_ms = 100\n",
        recv.endpoint()
    );
    let origin = http_echo("127.0.0.1");
    let dns = DnsServer::start();
    for name in ["app.test", "late.test", "always.test"] {
        dns.set(name, &["127.0.0.1".parse().unwrap()]);
    }
    let (_dir, control) = start_control(&format!(
        "[network]\nallow_local_binding = true\n[approvals]\nask_timeout_secs = 2\n{audit}"
    ));
    let token_file = control.token_file.clone();
    let proxy = ProxyProcess::start(
        &[
            "--control",
            &format!("http://{}", control.grpc),
            "--control-token-file",
            token_file.to_str().unwrap(),
        ],
        Some(&format!(
            "[network]\ndns_servers = [\"{}\"]\n{audit}",
            dns.addr_string()
        )),
    );
    // 1. Held request, approved once.
    let px = proxy.http_url();
    let url = format!("http://app.test:{}/", origin.port());
    let held = std::thread::spawn(move || curl(&["-x", &px, &url]));
    let asks = pending(&control, 1);
    let ask = asks[0].clone();
    runtime().block_on(async {
        let mut c = control.client().await;
        c.approve(v1::ApproveRequest {
            pending_id: ask.id.clone(),
            scope: v1::ApprovalScope::Once as i32,
            justification: Some("needed for the build".into()),
            ..Default::default()
        })
        .await
        .expect("Approve");
    });
    assert_eq!(held.join().unwrap().status, 200);

    // Data plane: the `ask`, then the final allow carrying the ask id.
    // The control plane's `portcullis.approval` record carries the same decision id and may
    // arrive first: wait for the data plane's record by name.
    let first = record_where(
        &recv,
        "portcullis.policy_decision",
        "portcullis.decision.id",
        &ask.decision_id,
    );
    assert_eq!(first.attrs["network.policy.decision"], s("ask"));
    assert_eq!(first.attrs["network.policy.scope"], s("domain"));
    assert!(!first.attrs.contains_key("portcullis.ask.id"));
    let second = record_where(
        &recv,
        "portcullis.policy_decision",
        "portcullis.ask.id",
        &ask.id,
    );
    assert_eq!(second.attrs["network.policy.decision"], s("allow"));
    assert_eq!(second.attrs["network.policy.override"], Val::Bool(true));
    assert_eq!(second.attrs["network.policy.source"], s("decider"));
    assert_eq!(second.attrs["network.policy.reason"], s("not_allowed"));
    assert_ne!(
        second.s("portcullis.decision.id"),
        first.s("portcullis.decision.id")
    );

    // Control plane: one approval record.
    let a = approval_for(&recv, &ask.id);
    assert_eq!(a.resource["service.name"], s("portcullis-control"));
    assert_eq!(a.severity_number, 9);
    assert_eq!(a.attrs["event.name"], s("portcullis.approval"));
    assert_eq!(a.attrs["portcullis.approval.outcome"], s("allow_once"));
    assert_eq!(a.attrs["portcullis.approval.scope"], s("once"));
    assert_eq!(a.attrs["portcullis.approval.waiters"], Val::Int(1));
    assert_eq!(a.attrs["portcullis.rule.persisted"], Val::Bool(false));
    assert_eq!(a.attrs["portcullis.decision.id"], s(&ask.decision_id));
    assert_eq!(a.attrs["server.address"], s("app.test"));
    assert_eq!(a.attrs["server.port"], Val::Int(i64::from(origin.port())));
    assert_eq!(a.attrs["network.transport.protocol"], s("http"));
    assert!(matches!(a.attrs["portcullis.approval.wait_ms"], Val::Int(ms) if ms >= 0));
    assert_eq!(a.attrs["portcullis.approval.actor"], s("api"));
    assert_eq!(a.attrs["client.address"], s("127.0.0.1"));
    assert_eq!(
        a.attrs["portcullis.approval.justification"],
        s("needed for the build")
    );
    assert!(
        a.body
            .starts_with(&format!("allow_once app.test:{} (http) by ", origin.port()))
    );

    // 2. Nobody answers: expired, by system.
    let px = proxy.http_url();
    let url = format!("http://late.test:{}/", origin.port());
    let held = std::thread::spawn(move || curl(&["-x", &px, &url]));
    let asks = pending(&control, 1);
    let late = asks
        .iter()
        .find(|a| a.host == "late.test")
        .expect("late ask")
        .clone();
    assert_eq!(held.join().unwrap().status, 403);
    let e = approval_for(&recv, &late.id);
    assert_eq!(e.attrs["portcullis.approval.outcome"], s("expired"));
    assert_eq!(e.attrs["portcullis.approval.scope"], s("none"));
    assert_eq!(e.attrs["portcullis.approval.actor"], s("system"));
    assert_eq!(e.attrs["client.address"], s("unknown"));
    assert!(!e.attrs.contains_key("portcullis.approval.justification"));

    // 3. Allowed always: the approval says the rule was persisted, and the rules file change
    // has its own record, origin `approval`.
    let px = proxy.http_url();
    let url = format!("http://always.test:{}/", origin.port());
    let held = std::thread::spawn(move || curl(&["-x", &px, &url]));
    let always = pending(&control, 1)
        .into_iter()
        .find(|a| a.host == "always.test")
        .expect("always ask");
    runtime().block_on(async {
        let mut c = control.client().await;
        c.approve(v1::ApproveRequest {
            pending_id: always.id.clone(),
            scope: v1::ApprovalScope::Always as i32,
            actor: Some("reviewer".into()),
            ..Default::default()
        })
        .await
        .expect("Approve always");
    });
    assert_eq!(held.join().unwrap().status, 200);
    let a = approval_for(&recv, &always.id);
    assert_eq!(a.attrs["portcullis.approval.outcome"], s("allow_always"));
    assert_eq!(a.attrs["portcullis.rule.persisted"], Val::Bool(true));
    let rc = recv
        .wait_for(WAIT, |r| r.event_name == "portcullis.rule_change")
        .expect("rule_change record");
    assert_eq!(rc.attrs["portcullis.rule.action"], s("add"));
    assert_eq!(rc.attrs["portcullis.rule.origin"], s("approval"));
    assert_eq!(rc.attrs["server.address"], s("always.test"));
    assert_eq!(rc.attrs["server.port"], Val::Int(i64::from(origin.port())));
    assert_eq!(rc.attrs["portcullis.rule.decision"], s("allow"));
    assert_eq!(rc.attrs["portcullis.approval.actor"], s("reviewer"));
    assert_eq!(
        rc.attrs["portcullis.policy.version"],
        a.attrs["portcullis.policy.version"]
    );

    // GetStatus counts the control plane's records: four emitted, all exported.
    let mut status = v1::ControlStatus::default();
    for _ in 0..200 {
        status = control.status();
        if status.audit_events_exported == 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        (
            status.audit_events_total,
            status.audit_events_exported,
            status.audit_events_dropped
        ),
        (4, 4, 0)
    );
}

#[test]
fn decision_id_is_the_same_on_every_surface() {
    let recv = OtlpReceiver::grpc();
    let (_dir, control) = start_control("[approvals]\nenabled = false\n");
    let token_file = control.token_file.clone();
    let proxy = ProxyProcess::start(
        &[
            "--control",
            &format!("http://{}", control.grpc),
            "--control-token-file",
            token_file.to_str().unwrap(),
        ],
        Some(&format!(
            "[audit]\nendpoint = \"{}\"\nscheduled_delay_ms = 100\n",
            recv.endpoint()
        )),
    );
    let mut watch = runtime().block_on(async {
        let mut c = control.client().await;
        c.watch_decisions(v1::WatchDecisionsRequest::default())
            .await
            .expect("WatchDecisions")
            .into_inner()
    });
    let r = curl(&["-x", &proxy.http_url(), "http://nowhere.test/"]);
    assert_eq!(r.status, 403);
    let id = r.header("x-portcullis-decision-id").unwrap().to_string();
    // HTTP body line 1.
    let text = r.text();
    let line1 = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("PORTCULLIS_POLICY_DECISION "))
        .unwrap_or_else(|| panic!("line 1: {text}"));
    let line1: serde_json::Value = serde_json::from_str(line1).unwrap();
    assert_eq!(line1["id"], serde_json::json!(id));
    // WatchDecisions.
    let event = runtime()
        .block_on(async { tokio::time::timeout(WAIT, watch.message()).await })
        .expect("a Decision event in time")
        .expect("stream ok")
        .expect("an event");
    let Some(v1::decision_event::Event::Decision(d)) = event.event else {
        panic!("expected a Decision, got {event:?}")
    };
    assert_eq!(d.id, id);
    // Blocked log.
    let b = portcullis_integration_tests::blocked(proxy.admin_addr());
    assert_eq!(b["blocked"][0]["id"], serde_json::json!(id));
    // Audit record.
    let rec = recv.wait_for_decision(&id, WAIT).expect("audit record");
    assert_eq!(rec.attrs["network.policy.reason"], s("not_allowed"));
    assert_eq!(rec.s("portcullis.proxy.id"), Some(d.proxy_id.as_str()));
}

fn rule_changes(recv: &OtlpReceiver) -> Vec<Record> {
    recv.records()
        .into_iter()
        .filter(|r| r.event_name == "portcullis.rule_change")
        .collect()
}

fn rule_change(recv: &OtlpReceiver, action: &str) -> Record {
    record_where(
        recv,
        "portcullis.rule_change",
        "portcullis.rule.action",
        action,
    )
}

/// audit.md §3 `portcullis.rule_change`: one record per change of the rules file — `add` and
/// `remove` through the API (a duplicate add writes nothing and emits nothing), `reload` after
/// a hand edit, each with the version that carries it.
#[test]
fn rule_change_event_on_add_remove_and_reload() {
    let recv = OtlpReceiver::grpc();
    let (dir, control) = start_control(&format!(
        "[audit]\nendpoint = \"{}\"\nscheduled_delay_ms = 100\n",
        recv.endpoint()
    ));
    let add = || {
        runtime().block_on(async {
            control
                .client()
                .await
                .add_rule(v1::AddRuleRequest {
                    host: "added.test".into(),
                    protocol: "http".into(),
                    decision: "allow".into(),
                    port: 8080,
                    actor: Some("ci-bot".into()),
                    ..Default::default()
                })
                .await
                .expect("AddRule")
                .into_inner()
        })
    };
    let first = add();
    assert!(first.added);
    let rec = rule_change(&recv, "add");
    assert_eq!(rec.s("portcullis.rule.origin"), Some("api"));
    assert_eq!(rec.s("server.address"), Some("added.test"));
    assert_eq!(rec.attrs["server.port"], Val::Int(8080));
    assert_eq!(rec.s("portcullis.rule.protocol"), Some("http"));
    assert_eq!(rec.s("portcullis.rule.decision"), Some("allow"));
    assert_eq!(rec.attrs["portcullis.rule.count"], Val::Int(1));
    assert_eq!(rec.s("portcullis.approval.actor"), Some("ci-bot"));
    assert_eq!(rec.s("client.address"), Some("127.0.0.1"));
    assert_eq!(
        rec.attrs["portcullis.policy.version"],
        Val::Int(first.policy_version as i64)
    );
    assert!(!add().added, "the same line is not written twice");

    let removed = runtime().block_on(async {
        control
            .client()
            .await
            .remove_rule(v1::RemoveRuleRequest {
                host: "added.test".into(),
                port: 8080,
                ..Default::default()
            })
            .await
            .expect("RemoveRule")
            .into_inner()
    });
    let rec = rule_change(&recv, "remove");
    assert_eq!(rec.s("server.address"), Some("added.test"));
    assert_eq!(rec.attrs["server.port"], Val::Int(8080));
    assert_eq!(rec.attrs["portcullis.rule.count"], Val::Int(1));
    assert_eq!(rec.s("portcullis.approval.actor"), Some("api"));
    assert!(!rec.attrs.contains_key("portcullis.rule.protocol"));
    assert_eq!(
        rec.attrs["portcullis.policy.version"],
        Val::Int(removed.policy_version as i64)
    );

    // A hand edit, picked up on SIGHUP: two lines added.
    let path = dir.path().join("portcullis.rules");
    let mut text = std::fs::read_to_string(&path).unwrap_or_default();
    text.push_str("network_rule(host=\"one.test\", protocol=\"http\", decision=\"allow\")\n");
    text.push_str("network_rule(host=\"two.test\", protocol=\"https\", decision=\"deny\")\n");
    // Replaced in one step, so the file watcher never sees a half-written file.
    let tmp = dir.path().join("edit.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    control.signal(libc::SIGHUP);
    let rec = rule_change(&recv, "reload");
    assert_eq!(rec.s("portcullis.rule.origin"), Some("file"));
    assert_eq!(rec.attrs["portcullis.rule.count"], Val::Int(2));
    assert_eq!(rec.s("portcullis.approval.actor"), Some("system"));
    assert_eq!(rec.s("client.address"), Some("unknown"));
    assert!(!rec.attrs.contains_key("server.address"));
    assert_eq!(
        rec.attrs["portcullis.policy.version"],
        Val::Int(control.status().version as i64)
    );
    let actions: Vec<String> = rule_changes(&recv)
        .iter()
        .filter_map(|r| r.s("portcullis.rule.action").map(str::to_string))
        .collect();
    assert_eq!(
        actions,
        ["add", "remove", "reload"],
        "one record per change"
    );
}
