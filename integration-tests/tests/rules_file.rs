//! network-rules.md "Tests that must exist" 9, 10, 13 and control.md test 10, with the real
//! binaries: concurrent writers in two processes, a crash at every step of a write, external
//! edits (valid and invalid), and an "always" answer whose rule cannot be written.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use portcullis::proto::v1;
use portcullis_integration_tests::control::ControlSpec;
use portcullis_integration_tests::origin::{http_echo, runtime};
use portcullis_integration_tests::{ControlProcess, DnsServer, ProxyProcess, curl};

const RULE_A: &str = r#"network_rule(host="a.test", protocol="https", decision="allow")"#;

fn add(host: &str, decision: &str) -> v1::AddRuleRequest {
    v1::AddRuleRequest {
        host: host.into(),
        protocol: "http".into(),
        decision: decision.into(),
        ..Default::default()
    }
}

fn canonical(host: &str, decision: &str) -> String {
    format!(r#"network_rule(host="{host}", protocol="http", decision="{decision}")"#)
}

fn list_rules(c: &ControlProcess) -> Vec<v1::RuleEntry> {
    runtime().block_on(async {
        c.client()
            .await
            .list_rules(v1::ListRulesRequest {})
            .await
            .expect("ListRules")
            .into_inner()
            .rules
    })
}

#[test]
fn concurrent_appenders_across_processes_lose_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("shared").join("portcullis.rules");
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let a = ControlProcess::start(&da, &rules, "");
    let b = ControlProcess::start(&db, &rules, "");
    let rt = runtime();
    let (ca, cb) = rt.block_on(async { (a.client().await, b.client().await) });
    // 100 concurrent AddRule calls into each process, all in flight at once.
    let mut tasks = Vec::new();
    for i in 0..100 {
        for (c, p) in [(&ca, "a"), (&cb, "b")] {
            let mut c = c.clone();
            let host = format!("{p}{i}.test");
            tasks.push(rt.spawn(async move { c.add_rule(add(&host, "allow")).await }));
        }
    }
    for t in tasks {
        let r = rt
            .block_on(t)
            .unwrap()
            .expect("AddRule succeeds")
            .into_inner();
        assert!(r.added);
    }
    let text = std::fs::read_to_string(&rules).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 200, "{text}");
    assert!(text.ends_with('\n'));
    let mut expected: Vec<String> = (0..100)
        .flat_map(|i| {
            [
                canonical(&format!("a{i}.test"), "allow"),
                canonical(&format!("b{i}.test"), "allow"),
            ]
        })
        .collect();
    let mut got: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    expected.sort();
    got.sort();
    // Every line whole (no torn lines), none lost, none twice.
    assert_eq!(got, expected);
    drop((a, b));
    // The file parses: a fresh control plane loads all 200 rules.
    let dc = tmp.path().join("c");
    std::fs::create_dir_all(&dc).unwrap();
    let c = ControlProcess::start(&dc, &rules, "");
    assert_eq!(list_rules(&c).len(), 200);
}

fn fault_bin() -> PathBuf {
    portcullis_integration_tests::proxy::control_fault_bin()
}

#[test]
fn crash_at_each_write_step_leaves_old_or_new_file() {
    let bin = fault_bin();
    // Before the rename the old file must survive; from the rename on, the new one.
    let steps = [
        ("after_temp_create", false),
        ("after_partial_write", false),
        ("after_fsync", false),
        ("after_rename", true),
        ("after_dir_fsync", true),
    ];
    let old = format!("# hand-written, no final newline\n{RULE_A}");
    let new = format!("{old}\n{}\n", canonical("b.test", "deny"));
    for (step, renamed) in steps {
        let tmp = tempfile::tempdir().unwrap();
        let rules = tmp.path().join("portcullis.rules");
        std::fs::write(&rules, &old).unwrap();
        let env = [("PORTCULLIS_FAULT_RULES_WRITE", step)];
        let mut c = ControlProcess::start_spec(ControlSpec {
            bin: bin.clone(),
            dir: tmp.path(),
            rules: &rules,
            config: "",
            env: &env,
        });
        let r =
            runtime().block_on(async { c.client().await.add_rule(add("b.test", "deny")).await });
        assert!(r.is_err(), "{step}: the writer died mid-RPC: {r:?}");
        let exit = c.wait_exit(Duration::from_secs(20)).expect("aborted");
        assert_eq!(exit.signal(), Some(libc::SIGABRT), "{step}: {exit:?}");
        let after = std::fs::read_to_string(&rules).unwrap();
        let want = if renamed { &new } else { &old };
        assert_eq!(
            &after, want,
            "{step}: the file is entirely old or entirely new"
        );
        let temps: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".portcullis.rules.tmp-"))
            .collect();
        assert_eq!(
            temps.len(),
            usize::from(!renamed),
            "{step}: a temp file is left exactly when the crash came before the rename: {temps:?}"
        );
        // The next start (no fault) loads the file, ignores the stale temp file and writes.
        let c = ControlProcess::start(tmp.path(), &rules, "");
        assert_eq!(list_rules(&c).len(), if renamed { 2 } else { 1 }, "{step}");
        let r = runtime()
            .block_on(async { c.client().await.add_rule(add("c.test", "allow")).await })
            .unwrap_or_else(|e| panic!("{step}: write after restart: {e}"))
            .into_inner();
        assert!(r.added);
        let text = std::fs::read_to_string(&rules).unwrap();
        assert!(
            text.starts_with(want)
                && text.ends_with(&format!("{}\n", canonical("c.test", "allow"))),
            "{step}: {text}"
        );
    }
}

/// A control plane with approvals on and one attached proxy whose test names resolve to the
/// loopback origin.
struct Setup {
    control: ControlProcess,
    proxy: ProxyProcess,
    origin_port: u16,
    _dns: DnsServer,
    _origin: portcullis_integration_tests::origin::Origin,
    _tmp: tempfile::TempDir,
}

fn setup(rules_dir: Option<&Path>, initial: &str) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let origin = http_echo("127.0.0.1");
    let dns = DnsServer::start();
    for name in ["edit.test", "other.test", "app.test"] {
        dns.set(name, &["127.0.0.1".parse().unwrap()]);
    }
    let rules = rules_dir.unwrap_or(tmp.path()).join("portcullis.rules");
    if !initial.is_empty() {
        std::fs::write(&rules, initial).unwrap();
    }
    let control = ControlProcess::start(
        tmp.path(),
        &rules,
        "[network]\nallow_local_binding = true\n[approvals]\nask_timeout_secs = 60\n",
    );
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
    Setup {
        control,
        proxy,
        origin_port: origin.port(),
        _dns: dns,
        _origin: origin,
        _tmp: tmp,
    }
}

impl Setup {
    fn url(&self, host: &str) -> String {
        format!("http://{host}:{}/", self.origin_port)
    }

    /// A request in its own thread (it may be held by an ask).
    fn request(
        &self,
        host: &str,
    ) -> std::thread::JoinHandle<portcullis_integration_tests::CurlResult> {
        let px = self.proxy.http_url();
        let url = self.url(host);
        std::thread::spawn(move || curl(&["-x", &px, &url]))
    }

    fn pending(&self) -> Vec<v1::PendingAsk> {
        runtime().block_on(async {
            self.control
                .client()
                .await
                .list_pending(v1::ListPendingRequest::default())
                .await
                .unwrap()
                .into_inner()
                .asks
        })
    }

    /// Waits (bounded) for one pending ask with a waiter.
    fn wait_pending(&self) -> v1::PendingAsk {
        for _ in 0..200 {
            if let Some(a) = self.pending().into_iter().find(|a| a.waiters > 0) {
                return a;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "no pending ask; proxy stderr:\n{}",
            self.proxy.stderr_text()
        );
    }
}

/// Polls (bounded) until `f` holds.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..150 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("never happened: {what}");
}

/// Replaces the file the way an editor does (write a new file, rename it over).
fn edit(path: &Path, text: &str) {
    let tmp = path.with_extension("edit");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn external_edit_is_reloaded_and_pushed() {
    let s = setup(None, &format!("{RULE_A}\n"));
    let version = s.control.status().version;
    // Not allowed yet: the miss asks; deny it so nothing is left pending.
    let h = s.request("edit.test");
    let ask = s.wait_pending();
    runtime()
        .block_on(async {
            s.control
                .client()
                .await
                .deny(v1::DenyRequest {
                    pending_id: ask.id.clone(),
                    scope: v1::ApprovalScope::Once as i32,
                    ..Default::default()
                })
                .await
        })
        .expect("deny once");
    assert_eq!(h.join().unwrap().status, 403);
    // A hand edit appends an allow; no RPC, no signal: the watcher picks it up and pushes it.
    edit(
        &s.control.rules,
        &format!(
            "{RULE_A}\n# added by hand\n{}\n",
            canonical("edit.test", "allow")
        ),
    );
    eventually("the edited rule is enforced by the proxy", || {
        s.request("edit.test").join().unwrap().status == 200
    });
    let st = s.control.status();
    assert!(st.version > version, "a new policy version: {st:?}");
    assert_eq!((st.rules_count, st.rules_error.as_str()), (2, ""));
    let rules = list_rules(&s.control);
    assert_eq!(rules[1].line, 3);
    assert_eq!(rules[1].text, canonical("edit.test", "allow"));
    assert!(s.pending().is_empty(), "the allowed request never asked");
}

#[test]
fn invalid_external_edit_keeps_last_good_rules_and_blocks_writes() {
    let good = format!("{}\n", canonical("edit.test", "allow"));
    let s = setup(None, &good);
    let path = s.control.rules.clone();
    assert_eq!(s.request("edit.test").join().unwrap().status, 200);
    let bad = format!("{good}network_rule(host=\"x.test\", protocol=\"http\")\n");
    edit(&path, &bad);
    s.control.signal(libc::SIGHUP);
    let position = format!("{}:2:", path.display());
    let expected = format!("{position}44: missing required argument \"decision\"");
    eventually("GetStatus reports the parse error", || {
        s.control.status().rules_error == expected
    });
    // The last good rules stay in force.
    assert_eq!(s.request("edit.test").join().unwrap().status, 200);
    assert_eq!(list_rules(&s.control).len(), 1);
    // AddRule refuses to write, naming the position.
    let e = runtime()
        .block_on(async {
            s.control
                .client()
                .await
                .add_rule(add("new.test", "allow"))
                .await
        })
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&expected), "{e:?}");
    // An "always" answer is applied for the session only and reported.
    let h = s.request("other.test");
    let ask = s.wait_pending();
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
        e.message().starts_with("could not persist rule: ")
            && e.message().contains(&expected)
            && e.message().contains("applied as allow_session only"),
        "{e:?}"
    );
    assert_eq!(h.join().unwrap().status, 200);
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        bad,
        "nothing written"
    );
    // Fixed by hand: the error clears and writes work again.
    edit(&path, &good);
    eventually("the error clears", || {
        s.control.status().rules_error.is_empty()
    });
    let r = runtime()
        .block_on(async {
            s.control
                .client()
                .await
                .add_rule(add("new.test", "allow"))
                .await
        })
        .expect("AddRule after the fix")
        .into_inner();
    assert!(r.added);
}

#[test]
fn allow_always_persist_failure_applies_session_allow_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ro");
    std::fs::create_dir(&dir).unwrap();
    // A read-only directory stops other users; the lock path being a directory stops root too.
    std::fs::create_dir(dir.join("portcullis.rules.lock")).unwrap();
    let s = setup(Some(&dir), "");
    let mode = std::fs::Permissions::from_mode(0o555);
    std::fs::set_permissions(&dir, mode).unwrap();
    let a = s.request("app.test");
    let b = s.request("app.test");
    for _ in 0..200 {
        if s.pending().iter().any(|p| p.waiters == 2) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let ask = s.wait_pending();
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
        e.message().starts_with("could not persist rule: ")
            && e.message().contains("applied as allow_session only"),
        "{e:?}"
    );
    // The waiters are released, and later requests of the session pass without a new ask.
    assert_eq!(a.join().unwrap().status, 200);
    assert_eq!(b.join().unwrap().status, 200);
    assert_eq!(s.request("app.test").join().unwrap().status, 200);
    assert!(s.pending().is_empty());
    assert!(
        !s.control.rules.exists(),
        "no rule line was written anywhere"
    );
    assert!(list_rules(&s.control).is_empty());
    let restore = std::fs::Permissions::from_mode(0o755);
    std::fs::set_permissions(&dir, restore).unwrap();
}
