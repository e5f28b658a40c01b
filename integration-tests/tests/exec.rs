//! `portcullis-control exec` (control.md §10, env.md): exit statuses, signals, the sidecar's
//! lifetime, the child environment and asks answered through the API — with the real binaries.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use portcullis_integration_tests::DnsServer;
use portcullis_integration_tests::origin::http_echo;
use portcullis_integration_tests::proxy::control_bin;

/// A config for exec in a private state dir; names resolve via `dns` to loopback.
fn config(dir: &Path, dns: Option<&DnsServer>, network: &str, extra: &str) -> std::path::PathBuf {
    let dns_line = dns
        .map(|d| format!("dns_servers = [\"{}\"]\n", d.addr_string()))
        .unwrap_or_default();
    let text = format!(
        "state_dir = \"{}\"\n[network]\nallow_local_binding = true\n{dns_line}{network}\n{extra}\n",
        dir.join("state").display()
    );
    let path = dir.join("portcullis.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn exec_command(config: &Path, flags: &[&str], command: &[&str]) -> Command {
    let mut cmd = Command::new(control_bin());
    cmd.arg("exec").arg("--config").arg(config);
    cmd.args(flags).arg("--").args(command);
    cmd.env_remove("PORTCULLIS_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Waits for `child` with a deadline (killing it past the deadline fails the test).
fn finish(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait().unwrap() {
            Some(_) => return child.wait_with_output().unwrap(),
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "exec did not finish within {limit:?}; stderr:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn run(config: &Path, flags: &[&str], command: &[&str]) -> Output {
    let child = exec_command(config, flags, command).spawn().unwrap();
    finish(child, Duration::from_secs(60))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn exec_returns_child_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), None, "", "");
    assert_eq!(run(&cfg, &[], &["true"]).status.code(), Some(0));
    assert_eq!(
        run(&cfg, &[], &["sh", "-c", "exit 3"]).status.code(),
        Some(3)
    );
    assert_eq!(
        run(&cfg, &[], &["sh", "-c", "kill -TERM $$"]).status.code(),
        Some(128 + 15)
    );
    let missing = run(&cfg, &[], &["/nonexistent/portcullis-no-such-command"]);
    assert_eq!(
        missing.status.code(),
        Some(127),
        "{}",
        text(&missing.stderr)
    );
    assert!(
        text(&missing.stderr)
            .contains("portcullis: /nonexistent/portcullis-no-such-command: command not found"),
        "{}",
        text(&missing.stderr)
    );
    let not_exec = dir.path().join("data.txt");
    std::fs::write(&not_exec, "x").unwrap();
    let denied = run(&cfg, &[], &[not_exec.to_str().unwrap()]);
    assert_eq!(denied.status.code(), Some(126), "{}", text(&denied.stderr));
    // exec writes nothing to stdout itself.
    assert!(run(&cfg, &[], &["true"]).stdout.is_empty());
}

#[test]
fn exec_bad_input_fails_before_the_command_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let touch = format!("touch {}", marker.display());
    // Unreadable config → exit 2, command never runs.
    let out = run(&dir.path().join("missing.toml"), &[], &["sh", "-c", &touch]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    // A broken rules file → exit 2 naming the line.
    let cfg = config(dir.path(), None, "", "");
    let rules = dir.path().join("bad.rules");
    std::fs::write(&rules, "network_rule(host=\n").unwrap();
    let out = run(
        &cfg,
        &["--rules", rules.to_str().unwrap()],
        &["sh", "-c", &touch],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("bad.rules:1:"),
        "{}",
        text(&out.stderr)
    );
    // A sidecar that cannot start → exit 1, command never runs.
    let out = run(&cfg, &["--proxy-bin", "/bin/false"], &["sh", "-c", &touch]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("sidecar"),
        "{}",
        text(&out.stderr)
    );
    assert!(!marker.exists(), "the command ran without its proxy");
    // A missing command is a usage error.
    let out = Command::new(control_bin())
        .args(["exec", "--"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Children of `pid` (all threads), from /proc.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

fn exe_name(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default()
}

/// A pid is gone when /proc has no entry or it is a zombie nobody will reap... which exec
/// always reaps, so "no entry" is what we wait for.
fn wait_gone(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Starts exec with a long-running child, returns (exec child, sidecar pid, command pid).
fn start_long(cfg: &Path, script: &str) -> (Child, u32, u32, BufReader<std::process::ChildStdout>) {
    let mut child = exec_command(cfg, &[], &["sh", "-c", script])
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "started");
    let kids = children(child.id());
    let sidecar = kids
        .iter()
        .copied()
        .find(|p| exe_name(*p) == "portcullis-proxy")
        .unwrap_or_else(|| panic!("no sidecar among {kids:?}"));
    let command = kids
        .iter()
        .copied()
        .find(|p| *p != sidecar)
        .unwrap_or_else(|| panic!("no command among {kids:?}"));
    (child, sidecar, command, stdout)
}

#[test]
fn exec_forwards_sigterm_to_child_and_stops_the_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), None, "", "");
    let script = "trap 'echo got-term; exit 7' TERM; echo started; i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done";
    let (child, sidecar, _command, mut stdout) = start_long(&cfg, script);
    // SAFETY: kill(2) on a child this test spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = finish(child, Duration::from_secs(30));
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert!(rest.contains("got-term"), "{rest}");
    assert!(
        wait_gone(sidecar, Duration::from_secs(5)),
        "sidecar {sidecar} still running"
    );
}

#[test]
fn exec_stops_sidecar_when_the_command_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), None, "", "");
    let (child, sidecar, command, _stdout) = start_long(&cfg, "echo started; exec sleep 60");
    // SAFETY: kill(2) on a grandchild this test spawned through exec.
    unsafe { libc::kill(command as i32, libc::SIGKILL) };
    let out = finish(child, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(128 + 9), "{}", text(&out.stderr));
    assert!(
        wait_gone(sidecar, Duration::from_secs(5)),
        "sidecar {sidecar} still running"
    );
}

#[test]
fn exec_sidecar_dies_with_exec() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), None, "", "");
    let (mut child, sidecar, command, _stdout) = start_long(&cfg, "echo started; exec sleep 60");
    // exec killed outright: the parent-death signals take the sidecar and COMMAND with it.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        wait_gone(sidecar, Duration::from_secs(10)),
        "sidecar {sidecar} orphaned"
    );
    assert!(
        wait_gone(command, Duration::from_secs(10)),
        "command {command} orphaned"
    );
}

fn env_map(out: &[u8]) -> BTreeMap<String, String> {
    out.split(|b| *b == 0)
        .filter(|e| !e.is_empty())
        .filter_map(|e| {
            let s = String::from_utf8_lossy(e).into_owned();
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

#[test]
fn child_env_exact_set_and_no_control_token() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), None, "", "");
    let mut cmd = exec_command(&cfg, &[], &["env", "-0"]);
    cmd.env("PORTCULLIS_TOKEN", "secret-token")
        .env("PORTCULLIS_CONTROL", "unix:/tmp/x.sock")
        .env("YARN_NO_PROXY", "*")
        .env("NO_PROXY", ".corp.example")
        .env("PORTCULLIS_TEST_MARKER", "kept");
    let out = finish(cmd.spawn().unwrap(), Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let env = env_map(&out.stdout);
    for k in [
        "PORTCULLIS_TOKEN",
        "PORTCULLIS_CONTROL",
        "YARN_NO_PROXY",
        "npm_config_http_proxy",
    ] {
        assert!(!env.contains_key(k), "{k} leaked into the child");
    }
    assert_eq!(env["PORTCULLIS_TEST_MARKER"], "kept");
    let http = env["HTTP_PROXY"].clone();
    assert!(http.starts_with("http://127.0.0.1:"), "{http}");
    let socks = env["ALL_PROXY"].clone();
    assert!(socks.starts_with("socks5h://127.0.0.1:"), "{socks}");
    for (k, v) in &env {
        if k.to_ascii_uppercase().ends_with("_PROXY")
            && !k.to_ascii_uppercase().contains("NO_PROXY")
            && k != "ELECTRON_GET_USE_PROXY"
            && k != "NODE_USE_ENV_PROXY"
        {
            if ["ALL_PROXY", "all_proxy", "FTP_PROXY", "ftp_proxy"].contains(&k.as_str()) {
                assert_eq!(v, &socks, "{k}");
            } else {
                assert_eq!(v, &http, "{k} must carry the http:// URL");
            }
        }
    }
    for k in [
        "NO_PROXY",
        "no_proxy",
        "npm_config_noproxy",
        "NPM_CONFIG_NOPROXY",
        "GLOBAL_AGENT_NO_PROXY",
    ] {
        assert_eq!(env[k], "localhost,127.0.0.1,::1", "{k}");
    }
    assert_eq!(env["PORTCULLIS_PROXY_ACTIVE"], "1");
    assert_eq!(env["PORTCULLIS_ALLOW_LOCAL_BINDING"], "1");
    assert_eq!(env["NODE_USE_ENV_PROXY"], "1");
    assert!(env["GIT_SSH_COMMAND"].starts_with("PORTCULLIS_GIT_SSH=1 ssh -o ProxyCommand="));
    // No CA variables without MITM: inherited ones pass through untouched.
    assert_eq!(
        env.get("SSL_CERT_FILE"),
        std::env::var("SSL_CERT_FILE").ok().as_ref()
    );
    assert!(!env.contains_key("PORTCULLIS_CA_CERTIFICATE"));
    // Nothing else differs from exec's own environment.
    let ours: BTreeMap<String, String> = std::env::vars().collect();
    for (k, v) in &ours {
        if env.get(k) != Some(v) {
            let expected_change = k.to_ascii_uppercase().contains("PROXY")
                || k.starts_with("PORTCULLIS_")
                || k == "GIT_SSH_COMMAND"
                || k == "YARN_NO_PROXY";
            assert!(expected_change, "{k} changed in the child");
        }
    }
}

#[test]
fn all_proxy_http_when_socks_disabled_and_local_binding_exported() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{}\"\n[network]\nenable_socks5 = false\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(control_bin());
    cmd.args(["exec", "--config"])
        .arg(&cfg)
        .args(["--", "env", "-0"]);
    let out = finish(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        Duration::from_secs(60),
    );
    let env = env_map(&out.stdout);
    assert!(
        env["ALL_PROXY"].starts_with("http://127.0.0.1:"),
        "{}",
        env["ALL_PROXY"]
    );
    assert!(!env.contains_key("GIT_SSH_COMMAND"));
    assert_eq!(env["PORTCULLIS_ALLOW_LOCAL_BINDING"], "0");
}

#[test]
fn curl_through_exec_allowed_and_blocked_with_summary() {
    let dir = tempfile::tempdir().unwrap();
    let origin = http_echo("127.0.0.1");
    let dns = DnsServer::start();
    for name in ["allowed.test", "denied.test"] {
        dns.set(name, &["127.0.0.1".parse().unwrap()]);
    }
    let cfg = config(
        dir.path(),
        Some(&dns),
        "allowed_domains = [\"allowed.test\"]\ndenied_domains = [\"denied.test\"]",
        "",
    );
    let port = origin.port();
    let script = format!(
        "curl -sS -o /dev/null -w '%{{http_code}}\\n' http://allowed.test:{port}/ok; curl -sS http://denied.test:{port}/no; curl -sS http://denied.test:{port}/again >/dev/null"
    );
    let out = run(&cfg, &["--no-prompt"], &["sh", "-c", &script]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.starts_with("200\n"), "{stdout}");
    assert!(
        stdout.contains("PORTCULLIS_POLICY_DECISION {\"decision\":\"deny\",\"reason\":\"denied\""),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!(
            "portcullis: blocked denied.test:{port} (http): denied x2"
        )),
        "{stderr}"
    );
}

#[test]
fn exec_non_tty_ask_approved_via_api_and_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let origin = http_echo("127.0.0.1");
    let dns = DnsServer::start();
    for name in ["ask.test", "late.test"] {
        dns.set(name, &["127.0.0.1".parse().unwrap()]);
    }
    let cfg = config(
        dir.path(),
        Some(&dns),
        "",
        "[approvals]\nask_timeout_secs = 30\n",
    );
    let endpoint_file = dir.path().join("endpoint");
    let port = origin.port();
    let script = format!("curl -sS -m 40 http://ask.test:{port}/first");
    let child = exec_command(
        &cfg,
        &[
            "--no-prompt",
            "--control-endpoint-file",
            endpoint_file.to_str().unwrap(),
        ],
        &["sh", "-c", &script],
    )
    .spawn()
    .unwrap();
    let endpoint = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(e) = std::fs::read_to_string(&endpoint_file) {
                break e.trim().to_string();
            }
            assert!(Instant::now() < deadline, "no endpoint file");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert!(endpoint.starts_with("unix:/"), "{endpoint}");
    // The host approves through the API: the unix socket needs no token.
    let id = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = Command::new(control_bin())
                .args(["pending", "--json", "--endpoint", &endpoint])
                .env_remove("PORTCULLIS_TOKEN")
                .env("HOME", dir.path())
                .env("XDG_STATE_HOME", dir.path())
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", text(&out.stderr));
            if let Some(line) = text(&out.stdout).lines().next() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(v["host"], "ask.test");
                break v["id"].as_str().unwrap().to_string();
            }
            assert!(Instant::now() < deadline, "no pending ask");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let out = Command::new(control_bin())
        .args(["approve", &id, "--for", "once", "--endpoint", &endpoint])
        .env("HOME", dir.path())
        .env("XDG_STATE_HOME", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = finish(child, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&format!(
            "portcullis: waiting for approval of ask.test:{port} (http) [{id}]"
        )),
        "{}",
        text(&out.stderr)
    );
    // The private directory is gone with exec.
    let socket = endpoint.trim_start_matches("unix:");
    assert!(!Path::new(socket).exists());

    // Nobody answers: the ask times out with approval_timeout.
    let script = format!("curl -sS -m 30 http://late.test:{port}/");
    let out = run(
        &cfg,
        &["--no-prompt", "--ask-timeout", "1"],
        &["sh", "-c", &script],
    );
    assert!(
        text(&out.stdout).contains("\"reason\":\"approval_timeout\""),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains(&format!(
            "portcullis: blocked late.test:{port} (http): approval_timeout x1"
        )),
        "{}",
        text(&out.stderr)
    );
}

/// A pseudo-terminal whose output is collected on a thread.
struct Pty {
    master: std::fs::File,
    output: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Pty {
    /// Opens a pty and returns it with the slave side for the child.
    fn open() -> (Pty, std::os::fd::OwnedFd) {
        use std::os::fd::FromRawFd;
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two valid descriptors on success; names/termios/winsize unused.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty failed");
        // SAFETY: both descriptors were just returned by openpty and are owned by nobody else.
        let (master, slave) = unsafe {
            (
                std::fs::File::from_raw_fd(master),
                std::os::fd::OwnedFd::from_raw_fd(slave),
            )
        };
        let output = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut reader = master.try_clone().unwrap();
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once every slave descriptor is closed.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        (Pty { master, output }, slave)
    }

    /// Waits until the output holds `needle` `count` times.
    fn wait_for(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.output.lock().unwrap().matches(needle).count() >= count {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "terminal never showed {needle:?} x{count}; it shows:\n{}",
            self.output.lock().unwrap()
        );
    }

    fn type_line(&mut self, line: &str) {
        use std::io::Write;
        self.master
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
    }

    fn text(&self) -> String {
        self.output.lock().unwrap().clone()
    }
}

#[test]
fn exec_tty_prompt_choices() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let origin = http_echo("127.0.0.1");
    let dns = DnsServer::start();
    for name in ["ask.test", "nope.test"] {
        dns.set(name, &["127.0.0.1".parse().unwrap()]);
    }
    let cfg = config(
        dir.path(),
        Some(&dns),
        "",
        "[approvals]\nask_timeout_secs = 60\n",
    );
    let port = origin.port();
    let script = format!(
        "curl -sS -o /dev/null -w 'first=%{{http_code}}\\n' http://ask.test:{port}/1; \
         curl -sS -o /dev/null -w 'second=%{{http_code}}\\n' http://ask.test:{port}/2; \
         curl -sS http://nope.test:{port}/; echo; echo all-done"
    );
    let (mut pty, slave) = Pty::open();
    let mut cmd = Command::new(control_bin());
    cmd.arg("exec")
        .arg("--config")
        .arg(&cfg)
        .args(["--", "sh", "-c", &script])
        .env_remove("PORTCULLIS_LOG")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    // SAFETY: setsid and ioctl are async-signal-safe; the new session takes the pty as its
    // controlling terminal so /dev/tty opens.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    pty.wait_for(
        &format!("portcullis: allow sh network access to ask.test:{port} (http)? [ask_"),
        1,
    );
    pty.wait_for("auto-deny in ", 1);
    pty.wait_for(
        "  o = allow once, s = allow for this session, a = always allow, d = deny, n = never allow",
        1,
    );
    pty.wait_for("choice [o/s/a/d/n] (default d): ", 1);
    pty.type_line("maybe");
    pty.wait_for("please answer o, s, a, d or n", 1);
    pty.type_line("s");
    pty.wait_for(
        &format!("portcullis: allowed ask.test:{port} for this session"),
        1,
    );
    pty.wait_for("first=200", 1);
    // The second request passes without a prompt.
    pty.wait_for("second=200", 1);
    pty.wait_for(
        &format!("portcullis: allow sh network access to nope.test:{port} (http)?"),
        1,
    );
    assert_eq!(
        pty.text()
            .matches("allow sh network access to ask.test")
            .count(),
        1,
        "asked twice for a session-allowed destination"
    );
    pty.type_line("");
    pty.wait_for(&format!("portcullis: denied nope.test:{port}"), 1);
    pty.wait_for("PORTCULLIS_POLICY_DECISION {\"decision\":\"deny\"", 1);
    pty.wait_for("all-done", 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "exec did not exit:\n{}",
            pty.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{}", pty.text());
}

#[test]
fn socks_connect_helper_half_close_and_refusal() {
    use std::io::Write;
    let origin = portcullis_integration_tests::origin::tcp_echo("127.0.0.1");
    let proxy = portcullis_integration_tests::ProxyProcess::start(
        &["--allow", "127.0.0.1", "--deny", "denied.test"],
        Some("[network]\nallow_local_binding = true\n"),
    );
    let mut child = Command::new(control_bin())
        .args(["socks-connect", proxy.socks5_addr(), "127.0.0.1"])
        .arg(origin.port().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // stdin's EOF reaches the origin, which then ends its side; the echo still arrives.
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"ping through socks\n").unwrap();
    drop(stdin);
    let out = finish(child, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "ping through socks\n");

    let out = Command::new(control_bin())
        .args(["socks-connect", proxy.socks5_addr(), "denied.test", "22"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).trim(),
        "portcullis: SOCKS5 proxy refused denied.test:22 (reply 0x02: blocked by network policy)"
    );
}

#[test]
fn curl_https_through_exec_allowed_and_blocked() {
    let dir = tempfile::tempdir().unwrap();
    let origin = portcullis_integration_tests::tls_origin::https_echo_at(
        "127.0.0.1",
        0,
        &["secure.test", "blocked-secure.test"],
    )
    .unwrap();
    let dns = DnsServer::start();
    for name in ["secure.test", "blocked-secure.test"] {
        dns.set(name, &["127.0.0.1".parse().unwrap()]);
    }
    let cfg = config(
        dir.path(),
        Some(&dns),
        "allowed_domains = [\"secure.test\"]\ndenied_domains = [\"blocked-secure.test\"]",
        "",
    );
    let port = origin.port();
    let ca = origin.ca.pem_path.display().to_string();
    let script = format!(
        "curl -sS --cacert {ca} -o /dev/null -w 'ok=%{{http_code}}\\n' https://secure.test:{port}/; \
         curl -sS --cacert {ca} https://blocked-secure.test:{port}/ 2>&1; echo"
    );
    let out = run(&cfg, &["--no-prompt"], &["sh", "-c", &script]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("ok=200"), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("CONNECT tunnel failed, response 403"),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!(
            "portcullis: blocked blocked-secure.test:{port} (https_connect): denied x1"
        )),
        "{stderr}"
    );
}

#[test]
fn ca_vars_only_with_mitm() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), None, "mitm = true", "");
    let out = run(&cfg, &[], &["env", "-0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let env = env_map(&out.stdout);
    let bundle = env["SSL_CERT_FILE"].clone();
    let ca = env["PORTCULLIS_CA_CERTIFICATE"].clone();
    assert!(bundle.ends_with("/mitm/ca-bundle.pem"), "{bundle}");
    assert_eq!(env["NODE_EXTRA_CA_CERTS"], ca);
    for k in [
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "GIT_SSL_CAINFO",
        "PIP_CERT",
    ] {
        assert_eq!(env[k], bundle, "{k}");
    }
    // The files lived in exec's private directory, which is gone now; check them while the
    // command runs instead.
    let script = "cat \"$SSL_CERT_FILE\" > bundle.pem; cat \"$PORTCULLIS_CA_CERTIFICATE\" > ca.pem";
    let mut cmd = exec_command(&cfg, &[], &["sh", "-c", script]);
    cmd.current_dir(dir.path());
    let out = finish(cmd.spawn().unwrap(), Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let bundle = std::fs::read_to_string(dir.path().join("bundle.pem")).unwrap();
    let ca = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
    assert!(ca.contains("BEGIN CERTIFICATE"), "{ca}");
    assert!(
        bundle.contains(ca.trim()),
        "the bundle holds the interception CA"
    );
    assert!(!bundle.contains("PRIVATE KEY") && !ca.contains("PRIVATE KEY"));
    assert!(
        !Path::new(&env["SSL_CERT_FILE"]).exists(),
        "private directory removed"
    );
}

#[test]
fn sidecar_gets_original_env() {
    let dir = tempfile::tempdir().unwrap();
    let origin = http_echo("127.0.0.1");
    let dns = DnsServer::start();
    dns.set("chained.test", &["127.0.0.1".parse().unwrap()]);
    let dns_cfg = format!(
        "[network]\nallow_local_binding = true\ndns_servers = [\"{}\"]\n",
        dns.addr_string()
    );
    // The outer proxy stands for a corporate proxy in exec's own environment.
    let outer = portcullis_integration_tests::ProxyProcess::start(
        &["--allow", "chained.test"],
        Some(&dns_cfg),
    );
    let outer_url = format!("http://{}", outer.http);
    let cfg = config(
        dir.path(),
        Some(&dns),
        "allowed_domains = [\"chained.test\"]",
        "",
    );
    let port = origin.port();
    let script = format!(
        "echo \"child=$HTTP_PROXY\"; curl -sS -o /dev/null -w 'code=%{{http_code}}\\n' http://chained.test:{port}/via-outer"
    );
    let mut cmd = exec_command(&cfg, &["--no-prompt"], &["sh", "-c", &script]);
    cmd.env("HTTP_PROXY", &outer_url)
        .env("http_proxy", &outer_url)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy");
    let out = finish(cmd.spawn().unwrap(), Duration::from_secs(60));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(stdout.contains("code=200"), "{stdout}");
    let child_proxy = stdout
        .lines()
        .find_map(|l| l.strip_prefix("child="))
        .unwrap_or_default()
        .to_string();
    assert!(
        child_proxy.starts_with("http://127.0.0.1:"),
        "{child_proxy}"
    );
    assert_ne!(child_proxy, outer_url, "the child talks to the sidecar");
    assert!(
        outer.wait_for_stderr("route=direct", Duration::from_secs(5)),
        "the sidecar did not use the outer proxy: {}",
        outer.stderr_text()
    );
}
