//! Spawning the real `portcullis-proxy` binary.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

static BUILD: Once = Once::new();

/// The workspace root (parent of this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let p = PathBuf::from(d);
            if p.is_absolute() {
                p
            } else {
                workspace_root().join(p)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// Builds both binaries once per test process (a no-op when they are up to date), so a test
/// never runs a stale binary left over from an earlier build.
fn build_binaries() {
    BUILD.call_once(|| {
        assert!(
            cargo_build_binaries(false),
            "cargo build of the binaries failed"
        );
    });
}

/// Runs `cargo build [--release] -p portcullis-dataplane -p portcullis-control`; whether it
/// succeeded.
///
/// `cargo test` and `cargo run` give this process the CARGO_PKG_* / CARGO_MANIFEST_* variables
/// of the test's package; build scripts that watch those names (ring:
/// `rerun-if-env-changed=CARGO_PKG_NAME`) would then see a change and rebuild half the tree on
/// every nested build, and again on the next outer one. The inner build gets the environment a
/// plain `cargo build` has.
fn cargo_build_binaries(release: bool) -> bool {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || matches!(
                k.as_str(),
                "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cmd.env_remove(k);
        }
    }
    cmd.arg("build");
    if release {
        cmd.arg("--release");
    }
    cmd.args(["-p", "portcullis-dataplane", "-p", "portcullis-control"])
        .current_dir(workspace_root())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The release `portcullis-proxy` and `portcullis-control` (built first), for the benchmark and
/// soak examples.
pub fn release_bins() -> (PathBuf, PathBuf) {
    assert!(
        cargo_build_binaries(true),
        "cargo build --release of the binaries failed"
    );
    let dir = target_dir().join("release");
    (dir.join("portcullis-proxy"), dir.join("portcullis-control"))
}

/// Path to `portcullis-proxy` (built first if needed).
pub fn proxy_bin() -> PathBuf {
    build_binaries();
    let bin = target_dir().join("debug").join("portcullis-proxy");
    assert!(bin.exists(), "proxy binary missing at {}", bin.display());
    bin
}

/// `portcullis-control` built with the test-only `fault-injection` feature (crash and I/O-error
/// hooks of the rules writer), in its own target directory `<target>/fault` so the normal
/// binaries are left alone. Built once per test process.
pub fn control_fault_bin() -> PathBuf {
    static FAULT_BUILD: Once = Once::new();
    let target = target_dir().join("fault");
    FAULT_BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "-p",
                "portcullis-control",
                "--features",
                "fault-injection",
                "--target-dir",
            ])
            .arg(&target)
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build --features fault-injection");
        assert!(status.success(), "fault-injection build failed");
    });
    let bin = target.join("debug").join("portcullis-control");
    assert!(
        bin.exists(),
        "fault-injection binary missing at {}",
        bin.display()
    );
    bin
}

/// Path to `portcullis-control` (built first if needed).
pub fn control_bin() -> PathBuf {
    build_binaries();
    let bin = target_dir().join("debug").join("portcullis-control");
    assert!(bin.exists(), "control binary missing at {}", bin.display());
    bin
}

/// Removes ANSI colour escapes from log text.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn write_config(config_toml: Option<&str>) -> Option<tempfile::NamedTempFile> {
    config_toml.map(|text| {
        let mut f = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .expect("temp config");
        f.write_all(text.as_bytes()).expect("write config");
        f.flush().expect("flush config");
        f
    })
}

fn command(
    args: &[&str],
    config: Option<&tempfile::NamedTempFile>,
    env: &[(&str, &str)],
) -> Command {
    let mut cmd = Command::new(proxy_bin());
    if let Some(f) = config {
        cmd.arg("--config").arg(f.path());
    }
    cmd.args(args);
    cmd.env("NO_COLOR", "1");
    for v in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        cmd.env_remove(v);
    }
    // Audit export is configured per test only.
    for (k, _) in std::env::vars() {
        if k.starts_with("OTEL_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// A running proxy; killed on drop.
pub struct ProxyProcess {
    child: Child,
    stderr: Arc<Mutex<String>>,
    _config: Option<tempfile::NamedTempFile>,
    /// The parsed ready line.
    pub ready: serde_json::Value,
    /// HTTP listener address.
    pub http: String,
    /// SOCKS5 listener address, if enabled.
    pub socks5: Option<String>,
    /// Admin listener address, if enabled.
    pub admin: Option<String>,
    exited: Option<ExitStatus>,
}

impl ProxyProcess {
    /// Starts the proxy with `args` (listeners default to `127.0.0.1:0` unless given) and an
    /// optional TOML config, and waits up to 20 s for the ready line.
    pub fn start(args: &[&str], config_toml: Option<&str>) -> ProxyProcess {
        let mut full: Vec<&str> = Vec::new();
        for flag in ["--http", "--admin", "--socks5"] {
            if !args.contains(&flag) {
                full.push(flag);
                full.push("127.0.0.1:0");
            }
        }
        full.extend_from_slice(args);
        Self::start_exact(&full, config_toml)
    }

    /// As [`ProxyProcess::start`], but passes exactly `args` (no default listener flags).
    pub fn start_exact(args: &[&str], config_toml: Option<&str>) -> ProxyProcess {
        Self::start_exact_env(args, config_toml, &[])
    }

    /// As [`ProxyProcess::start`], with extra environment variables (e.g. `HTTP_PROXY`).
    pub fn start_env(
        args: &[&str],
        config_toml: Option<&str>,
        env: &[(&str, &str)],
    ) -> ProxyProcess {
        let mut full: Vec<&str> = Vec::new();
        for flag in ["--http", "--admin", "--socks5"] {
            if !args.contains(&flag) {
                full.push(flag);
                full.push("127.0.0.1:0");
            }
        }
        full.extend_from_slice(args);
        Self::start_exact_env(&full, config_toml, env)
    }

    /// As [`ProxyProcess::start_exact`], with extra environment variables.
    pub fn start_exact_env(
        args: &[&str],
        config_toml: Option<&str>,
        env: &[(&str, &str)],
    ) -> ProxyProcess {
        let config = write_config(config_toml);
        let full = args;
        let mut child = command(full, config.as_ref(), env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn portcullis-proxy");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().expect("stderr");
        let sink = stderr.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match err_pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let text = strip_ansi(&String::from_utf8_lossy(&buf[..n]));
                        sink.lock().unwrap().push_str(&text);
                    }
                }
            }
        });
        let out_pipe = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(out_pipe).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the child never blocks on stdout.
            for _ in lines.by_ref() {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                thread::sleep(Duration::from_millis(100));
                panic!(
                    "proxy exited or printed no ready line within 20 s; stderr:\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        let ready: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("ready line is not JSON ({e}): {line}"));
        assert_eq!(ready["event"], "ready", "ready line: {line}");
        let http = ready["http"].as_str().expect("http address").to_string();
        let socks5 = ready["socks5"].as_str().map(str::to_string);
        let admin = ready["admin"].as_str().map(str::to_string);
        ProxyProcess {
            child,
            stderr,
            _config: config,
            ready,
            http,
            socks5,
            admin,
            exited: None,
        }
    }

    /// `http://ADDR` of the HTTP listener, for `curl -x`.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Path of the temporary config file, when one was given (rewrite it, then `POST /reload`).
    pub fn config_path(&self) -> Option<&std::path::Path> {
        self._config.as_ref().map(|f| f.path())
    }

    /// Admin address; panics when the admin listener is disabled.
    pub fn admin_addr(&self) -> &str {
        self.admin.as_deref().expect("admin listener enabled")
    }

    /// SOCKS5 address; panics when disabled.
    pub fn socks5_addr(&self) -> &str {
        self.socks5.as_deref().expect("socks5 listener enabled")
    }

    /// Everything written to stderr so far (ANSI colours removed).
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until stderr contains `needle`; returns whether it did within `timeout`.
    pub fn wait_for_stderr(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stderr.lock().unwrap().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// All `PORTCULLIS_POLICY_VIOLATION` JSON objects logged so far.
    pub fn violations(&self) -> Vec<serde_json::Value> {
        self.stderr_text()
            .lines()
            .filter_map(|l| {
                l.find("PORTCULLIS_POLICY_VIOLATION ").map(|i| {
                    let json = &l[i + "PORTCULLIS_POLICY_VIOLATION ".len()..];
                    serde_json::from_str(json.trim())
                        .unwrap_or_else(|e| panic!("violation line not JSON ({e}): {l}"))
                })
            })
            .collect()
    }

    /// Sends a signal (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety implications.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.child.id());
    }

    /// Waits for the process to exit; `None` on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited {
                return Some(s);
            }
            if let Ok(Some(s)) = self.child.try_wait() {
                self.exited = Some(s);
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the proxy to completion (≤ 20 s) and returns (status, stdout, stderr).
pub fn run_to_exit(args: &[&str], config_toml: Option<&str>) -> (ExitStatus, String, String) {
    let config = write_config(config_toml);
    let mut child = command(args, config.as_ref(), &[])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn portcullis-proxy");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("proxy {args:?} did not exit within 20 s");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap()).into_owned();
    let stderr = strip_ansi(&String::from_utf8_lossy(&t_err.join().unwrap()));
    (status, stdout, stderr)
}
