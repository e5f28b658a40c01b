//! requirements.md with the real binaries against a real HTTPS backend on loopback
//! (hyper + tokio-rustls, rcgen CA): fetch, fail closed, cache, refresh, merge, enforcement
//! through an attached `portcullis-proxy`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use portcullis::proto::v1;
use portcullis::proto::v1::control_client::ControlClient;
use portcullis_integration_tests::https_backend::{Answer, HttpsBackend};
use portcullis_integration_tests::origin::{http_echo, runtime};
use portcullis_integration_tests::proxy::control_bin;
use portcullis_integration_tests::{ProxyProcess, curl};

/// A test directory with a config that points at `backend`.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    /// `[requirements]` extra lines and other tables are appended verbatim.
    fn new(url: &str, ca: Option<&str>, requirements_extra: &str, rest: &str) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_line = match ca {
            Some(pem) => {
                let p = dir.path().join("ca.pem");
                std::fs::write(&p, pem).expect("write CA");
                format!("ca_file = \"{}\"\n", p.display())
            }
            None => String::new(),
        };
        let text = format!(
            "state_dir = \"{state}\"\n{rest}\n[requirements]\nurl = \"{url}\"\n{ca_line}{requirements_extra}\n",
            state = dir.path().display(),
        );
        let config = dir.path().join("control.toml");
        std::fs::write(&config, text).expect("write config");
        Setup { dir, config }
    }

    fn for_backend(b: &HttpsBackend, requirements_extra: &str, rest: &str) -> Setup {
        Setup::new(
            &b.url("/portcullis"),
            Some(b.ca_pem()),
            requirements_extra,
            rest,
        )
    }

    fn cache(&self) -> PathBuf {
        self.dir.path().join("requirements.cache.json")
    }

    fn command(&self, extra: &[&str]) -> Command {
        let mut c = Command::new(control_bin());
        c.args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&self.config)
            .arg("--rules")
            .arg(self.dir.path().join("portcullis.rules"))
            .arg("--token-file")
            .arg(self.dir.path().join("control.token"))
            .args(extra)
            .env("NO_COLOR", "1")
            .env_remove("PORTCULLIS_REQUIREMENTS_TOKEN")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY");
        c
    }

    /// Runs `serve` expecting it to exit before the ready line: (status, stderr, elapsed).
    fn refused(&self, extra: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, Duration) {
        let started = Instant::now();
        let mut cmd = self.command(extra);
        cmd.envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn control");
        let deadline = Instant::now() + Duration::from_secs(40);
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("portcullis-control did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let elapsed = started.elapsed();
        let out = child.wait_with_output().expect("output");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("ready"),
            "no ready line when refusing to start"
        );
        (
            status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed,
        )
    }

    /// Starts `serve` and waits for the ready line.
    fn start(&self, extra: &[&str], env: &[(&str, &str)]) -> Control {
        let stderr_path = self.dir.path().join(format!(
            "control-{}.stderr",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut cmd = self.command(extra);
        cmd.envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"));
        let mut child = cmd.spawn().expect("spawn control");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "no ready line; stderr: {}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        };
        let ready: serde_json::Value = serde_json::from_str(&line).expect("ready line JSON");
        let token = std::fs::read_to_string(self.dir.path().join("control.token"))
            .expect("token")
            .trim()
            .to_string();
        Control {
            child,
            grpc: ready["grpc"].as_str().expect("grpc").to_string(),
            token,
            token_file: self.dir.path().join("control.token"),
            stderr_path,
        }
    }
}

struct Control {
    child: Child,
    grpc: String,
    token: String,
    token_file: PathBuf,
    stderr_path: PathBuf,
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Adds the bearer token.
type Auth = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;

type Client =
    ControlClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Auth>>;

impl Control {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn client(&self) -> Client {
        let grpc = self.grpc.clone();
        let value: tonic::metadata::MetadataValue<_> =
            format!("Bearer {}", self.token).parse().expect("metadata");
        runtime().block_on(async move {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
                .expect("endpoint")
                .connect()
                .await
                .expect("connect to control");
            let f: Auth = Box::new(move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", value.clone());
                Ok(req)
            });
            ControlClient::with_interceptor(channel, f)
        })
    }

    fn policy(&self) -> v1::PolicyView {
        let mut c = self.client();
        runtime()
            .block_on(c.get_policy(v1::GetPolicyRequest::default()))
            .expect("GetPolicy")
            .into_inner()
    }

    fn requirements_state(&self) -> v1::RequirementsState {
        let s = self
            .policy()
            .requirements
            .expect("requirements status")
            .state;
        v1::RequirementsState::try_from(s).expect("state")
    }

    fn proxy(&self) -> ProxyProcess {
        ProxyProcess::start(
            &[
                "--control",
                &format!("http://{}", self.grpc),
                "--control-token-file",
                self.token_file.to_str().expect("utf-8 path"),
            ],
            None,
        )
    }

    fn add_rule(&self, host: &str, decision: &str) -> Result<v1::AddRuleResponse, tonic::Status> {
        let mut c = self.client();
        runtime()
            .block_on(c.add_rule(v1::AddRuleRequest {
                host: host.into(),
                protocol: "http".into(),
                decision: decision.into(),
                port: 0,
                ..Default::default()
            }))
            .map(|r| r.into_inner())
    }
}

/// Polls `f` every 100 ms for up to `secs` seconds.
fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

fn deny_doc(pattern: &str) -> String {
    format!("schema_version = 1\n[network]\ndenied_domains = [\"{pattern}\"]\n")
}

#[test]
fn good_toml_document_is_enforced() {
    let allowed = http_echo("127.0.0.1");
    let denied = http_echo("127.0.0.1");
    let ok_host = format!("127.0.0.1:{}", allowed.port());
    let bad_host = format!("127.0.0.1:{}", denied.port());
    let backend = HttpsBackend::start();
    backend.push([Answer::toml(&deny_doc(&bad_host)).header("etag", "\"v1\"")]);
    let setup = Setup::for_backend(
        &backend,
        "",
        &format!("[network]\nallowed_domains = [\"{ok_host}\", \"{bad_host}\"]\n"),
    );
    let control = setup.start(&[], &[("PORTCULLIS_REQUIREMENTS_TOKEN", "s3cret")]);
    assert!(
        control.stderr().contains("requirements: fresh from"),
        "{}",
        control.stderr()
    );
    let proxy = control.proxy();
    let px = proxy.http_url();
    assert_eq!(
        curl(&["-x", &px, &format!("http://{ok_host}/")]).status,
        200
    );
    assert_eq!(
        curl(&["-x", &px, &format!("http://{bad_host}/")]).status,
        403,
        "the managed deny wins over the local allow"
    );
    let view = control.policy();
    let e = view
        .entries
        .iter()
        .find(|e| e.pattern == bad_host && e.decision == "deny")
        .expect("requirement entry");
    assert_eq!(e.source, v1::PolicySource::Requirements as i32);
    let st = view.requirements.expect("status");
    assert_eq!(st.state, v1::RequirementsState::Fresh as i32);
    assert_eq!(st.url, backend.url("/portcullis"));
    // The `policy` CLI shows the provenance.
    let out = Command::new(control_bin())
        .args(["policy", "--endpoint", &format!("http://{}", control.grpc)])
        .arg("--token-file")
        .arg(&control.token_file)
        .output()
        .expect("policy CLI");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("DENY  {bad_host}  requirements")),
        "{text}"
    );
    // request_headers: User-Agent, Accept, bearer token from token_env.
    let reqs = backend.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "GET");
    assert_eq!(r.path, "/portcullis");
    assert_eq!(
        r.header("user-agent"),
        Some(format!("portcullis/{}", env!("CARGO_PKG_VERSION")).as_str())
    );
    assert_eq!(
        r.header("accept"),
        Some("application/toml, application/json;q=0.9")
    );
    assert_eq!(r.header("authorization"), Some("Bearer s3cret"));
    assert_eq!(r.header("if-none-match"), None);
}

#[test]
fn good_json_document_by_content_type_and_token_file() {
    let backend = HttpsBackend::start();
    backend.push([Answer::json(
        r#"{"network":{"domains":{"blocked.example":"deny"},"mode":"limited"}}"#,
    )]);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("req.token");
    std::fs::write(&token_file, "  from-file\n").unwrap();
    let setup = Setup::for_backend(
        &backend,
        &format!("token_file = \"{}\"\n", token_file.display()),
        "",
    );
    let control = setup.start(&[], &[]);
    let view = control.policy();
    assert!(view.entries.iter().any(|e| e.pattern == "blocked.example"
        && e.decision == "deny"
        && e.source == v1::PolicySource::Requirements as i32));
    assert_eq!(view.snapshot.expect("snapshot").mode, "limited");
    assert_eq!(
        backend.requests()[0].header("authorization"),
        Some("Bearer from-file")
    );
}

#[test]
fn fetch_ignores_proxy_environment() {
    let backend = HttpsBackend::start();
    backend.set_default(Answer::toml(&deny_doc("x.example")));
    let setup = Setup::for_backend(&backend, "", "");
    let closed = "http://127.0.0.1:9";
    let control = setup.start(
        &[],
        &[
            ("HTTPS_PROXY", closed),
            ("https_proxy", closed),
            ("ALL_PROXY", closed),
        ],
    );
    assert_eq!(control.requirements_state(), v1::RequirementsState::Fresh);
}

#[test]
fn invalid_document_refuses_start() {
    for (body, key) in [
        (
            "[network.domains]\n\"*\" = \"allow\"\n",
            "network.domains.\"*\": managed domain patterns may not be global wildcards (got \"*\")",
        ),
        ("[network]\nbogus = true\n", "unknown key network.bogus"),
        (
            "[network]\nallowed_domains = [\"a.example\"]\n[network.domains]\n\"b.example\" = \"deny\"\n",
            "network.domains",
        ),
        ("[network]\nmode = \"wide-open\"\n", "network.mode"),
        (
            "this is not toml = = =",
            "invalid requirements document: TOML syntax",
        ),
    ] {
        let backend = HttpsBackend::start();
        backend.set_default(Answer::toml(body));
        let setup = Setup::for_backend(&backend, "", "");
        let (status, stderr, _) = setup.refused(&[], &[]);
        assert_eq!(status.code(), Some(1), "{body}: {stderr}");
        assert!(
            stderr.contains("invalid requirements document: "),
            "{stderr}"
        );
        assert!(stderr.contains(key), "{key}: {stderr}");
        assert!(stderr.contains(&backend.url("/portcullis")), "{stderr}");
        assert!(
            stderr.contains("start with --requirements-optional"),
            "{stderr}"
        );
        assert_eq!(
            backend.requests().len(),
            1,
            "an invalid document is not retried"
        );
        assert!(!setup.cache().exists(), "no cache written");
    }
}

#[test]
fn unsupported_content_type_refuses_start() {
    let backend = HttpsBackend::start();
    backend.set_default(
        Answer::status(200)
            .header("content-type", "text/html")
            .body("<html></html>"),
    );
    let setup = Setup::for_backend(&backend, "", "");
    let (status, stderr, _) = setup.refused(&[], &[]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("unsupported content type"), "{stderr}");
}

#[test]
fn slow_server_times_out_and_refuses_start() {
    let backend = HttpsBackend::start();
    backend.set_default(Answer::toml("").delayed(Duration::from_secs(10)));
    let setup = Setup::for_backend(&backend, "timeout_secs = 2\n", "");
    let (status, stderr, elapsed) = setup.refused(&[], &[]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert!(
        stderr.contains("cannot load enterprise requirements from"),
        "{stderr}"
    );
    assert!(stderr.contains("timed out"), "{stderr}");
}

#[test]
fn slow_server_with_optional_starts_without_requirements() {
    let backend = HttpsBackend::start();
    backend.set_default(Answer::toml("").delayed(Duration::from_secs(10)));
    let setup = Setup::for_backend(&backend, "timeout_secs = 1\n", "");
    let control = setup.start(&["--requirements-optional"], &[]);
    let st = control.policy().requirements.expect("status");
    assert_eq!(st.state, v1::RequirementsState::None as i32);
    assert!(st.last_error.contains("timed out"), "{st:?}");
    assert!(control.stderr().contains("WITHOUT enterprise requirements"));
}

#[test]
fn slow_loris_body_is_bounded() {
    let backend = HttpsBackend::start();
    backend.set_default(Answer::toml(&deny_doc("a.example")).trickled(Duration::from_millis(500)));
    let setup = Setup::for_backend(&backend, "timeout_secs = 2\n", "");
    let (status, stderr, elapsed) = setup.refused(&[], &[]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
}

#[test]
fn unauthorized_is_not_retried() {
    let backend = HttpsBackend::start();
    backend.set_default(Answer::status(401));
    let setup = Setup::for_backend(&backend, "", "");
    let (status, stderr, _) = setup.refused(&[], &[]);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("requirements backend rejected the credentials (401)"),
        "{stderr}"
    );
    assert!(stderr.contains("after 1 attempt"), "{stderr}");
    assert_eq!(backend.requests().len(), 1);
}

#[test]
fn server_error_is_retried_then_succeeds() {
    let backend = HttpsBackend::start();
    backend.push([
        Answer::status(500),
        Answer::status(500),
        Answer::toml(&deny_doc("a.example")),
    ]);
    let setup = Setup::for_backend(&backend, "", "");
    let control = setup.start(&[], &[]);
    assert_eq!(control.requirements_state(), v1::RequirementsState::Fresh);
    assert_eq!(backend.requests().len(), 3);
}

#[test]
fn persistent_server_error_stops_after_5_attempts() {
    let backend = HttpsBackend::start();
    backend.set_default(Answer::status(500));
    let setup = Setup::for_backend(&backend, "", "");
    let (status, stderr, _) = setup.refused(&[], &[]);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains(&format!(
            "cannot load enterprise requirements from {} after 5 attempts: HTTP 500",
            backend.url("/portcullis")
        )),
        "{stderr}"
    );
    assert_eq!(backend.requests().len(), 5);
}

#[test]
fn retry_after_is_honoured() {
    let backend = HttpsBackend::start();
    backend.push([
        Answer::status(503).header("retry-after", "2"),
        Answer::toml(&deny_doc("a.example")),
    ]);
    let setup = Setup::for_backend(&backend, "", "");
    let started = Instant::now();
    let control = setup.start(&[], &[]);
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(control.requirements_state(), v1::RequirementsState::Fresh);
    // A Retry-After past the deadline ends the fetch.
    let backend = HttpsBackend::start();
    backend.set_default(Answer::status(429).header("retry-after", "60"));
    let setup = Setup::for_backend(&backend, "timeout_secs = 3\n", "");
    let (status, stderr, elapsed) = setup.refused(&[], &[]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("HTTP 429"), "{stderr}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
}

#[test]
fn untrusted_certificate_fails_without_retry() {
    let backend = HttpsBackend::start();
    backend.set_default(Answer::toml(""));
    let other = HttpsBackend::start();
    // Only the other CA is trusted.
    let setup = Setup::new(&backend.url("/portcullis"), Some(other.ca_pem()), "", "");
    let (status, stderr, _) = setup.refused(&[], &[]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("TLS error"), "{stderr}");
    assert!(stderr.contains("after 1 attempt"), "{stderr}");
    assert!(backend.requests().is_empty());
}

#[test]
fn http_url_is_a_usage_error() {
    let backend = HttpsBackend::start();
    let setup = Setup::for_backend(&backend, "", "");
    let (status, stderr, _) = setup.refused(&["--requirements-url", "http://127.0.0.1:1/p"], &[]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--requirements-url"), "{stderr}");
}

#[test]
fn redirect_is_not_followed() {
    let backend = HttpsBackend::start();
    backend.set_default(Answer::status(302).header("location", "https://127.0.0.1:1/elsewhere"));
    let setup = Setup::for_backend(&backend, "", "");
    let (status, stderr, _) = setup.refused(&[], &[]);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("unexpected redirect (302) to https://127.0.0.1:1/elsewhere"),
        "{stderr}"
    );
    assert_eq!(backend.requests().len(), 1);
}

#[test]
fn oversized_body_is_rejected() {
    let backend = HttpsBackend::start();
    let mut big = String::from("# padding\n");
    while big.len() <= (1 << 20) {
        big.push_str("# ................................................................\n");
    }
    backend.set_default(Answer::toml(&big));
    let setup = Setup::for_backend(&backend, "", "");
    let (status, stderr, _) = setup.refused(&[], &[]);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("requirements document larger than 1 MiB"),
        "{stderr}"
    );
}

/// Starts once against a good backend so that a cache exists; returns the setup.
fn with_cache(requirements_extra: &str) -> (Setup, HttpsBackend) {
    let backend = HttpsBackend::start();
    backend.set_default(Answer::toml(&deny_doc("cached.example")).header("etag", "\"c1\""));
    let setup = Setup::for_backend(&backend, requirements_extra, "");
    drop(setup.start(&[], &[]));
    assert!(setup.cache().exists(), "cache written");
    (setup, backend)
}

#[test]
fn fresh_cache_starts_with_backend_down() {
    let (setup, backend) = with_cache("");
    let before = backend.requests().len();
    backend.set_default(Answer::status(500));
    let control = setup.start(&[], &[]);
    assert_eq!(control.requirements_state(), v1::RequirementsState::Cached);
    assert_eq!(
        backend.requests().len(),
        before,
        "a fresh cache is used without fetching"
    );
    assert!(control.stderr().contains("requirements: cached from"));
    assert!(
        control
            .policy()
            .entries
            .iter()
            .any(|e| e.pattern == "cached.example")
    );
}

#[test]
fn stale_cache_with_backend_down_refuses_start() {
    let (setup, backend) = with_cache("cache_max_age_secs = 0\nmax_attempts = 1\n");
    backend.set_default(Answer::status(500));
    let (status, stderr, _) = setup.refused(&[], &[]);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains(&format!("(no fresh cache at {}", setup.cache().display())),
        "{stderr}"
    );
}

#[test]
fn stale_cache_with_optional_starts_stale() {
    let (setup, backend) = with_cache("cache_max_age_secs = 0\nmax_attempts = 1\n");
    backend.set_default(Answer::status(500));
    let control = setup.start(&["--requirements-optional"], &[]);
    assert_eq!(control.requirements_state(), v1::RequirementsState::Stale);
    assert!(
        control
            .policy()
            .entries
            .iter()
            .any(|e| e.pattern == "cached.example")
    );
}

#[test]
fn tampered_cache_is_ignored() {
    let (setup, backend) = with_cache("");
    let text = std::fs::read_to_string(setup.cache()).unwrap();
    assert!(text.contains("cached.example"));
    std::fs::write(
        setup.cache(),
        text.replace("cached.example", "relaxed.example"),
    )
    .unwrap();
    backend.set_default(Answer::status(500));
    let (status, stderr, _) =
        setup.refused(&["--requirements-url", &backend.url("/portcullis")], &[]);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains(&format!(
            "requirements cache {} ignored: integrity check failed",
            setup.cache().display()
        )),
        "{stderr}"
    );
    // The file is left in place.
    assert!(setup.cache().exists());
}

#[test]
fn cache_of_other_identity_is_ignored() {
    let (setup, backend) = with_cache("");
    backend.set_default(Answer::status(500));
    let (status, stderr, _) = setup.refused(&[], &[("PORTCULLIS_REQUIREMENTS_TOKEN", "another")]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("ignored: different identity"), "{stderr}");
}

#[test]
fn cache_written_atomically_0600() {
    let (setup, _backend) = with_cache("");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(setup.cache())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let key = setup.dir.path().join("requirements.key");
    assert_eq!(std::fs::metadata(&key).unwrap().len(), 32);
    let leftovers: Vec<_> = std::fs::read_dir(setup.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "no temp file left behind");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(setup.cache()).unwrap()).unwrap();
    let keys: Vec<&str> = record
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    for k in [
        "format",
        "identity",
        "url",
        "fetched_at",
        "etag",
        "content_type",
        "body",
        "mac",
    ] {
        assert!(keys.contains(&k), "{k} in {keys:?}");
    }
    assert!(!record.to_string().contains("s3cret"));
}

#[test]
fn not_modified_reuses_cache_and_renews_fetched_at() {
    let (setup, backend) = with_cache("cache_max_age_secs = 0\n");
    let first: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(setup.cache()).unwrap()).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    backend.set_default(Answer::status(304));
    let control = setup.start(&[], &[]);
    assert_eq!(control.requirements_state(), v1::RequirementsState::Fresh);
    let last = backend.requests().pop().unwrap();
    assert_eq!(last.header("if-none-match"), Some("\"c1\""));
    let second: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(setup.cache()).unwrap()).unwrap();
    assert_eq!(first["body"], second["body"]);
    assert!(second["fetched_at"].as_str() > first["fetched_at"].as_str());
    assert!(
        control
            .policy()
            .entries
            .iter()
            .any(|e| e.pattern == "cached.example")
    );
}

#[test]
fn refresh_applies_new_document_and_pushes_version() {
    let origin = http_echo("127.0.0.1");
    let host = format!("127.0.0.1:{}", origin.port());
    let backend = HttpsBackend::start();
    backend.set_default(Answer::toml(&deny_doc("nothing.example")));
    let setup = Setup::for_backend(
        &backend,
        "refresh_interval_secs = 1\n",
        &format!("[network]\nallowed_domains = [\"{host}\"]\n"),
    );
    let control = setup.start(&[], &[]);
    let proxy = control.proxy();
    let px = proxy.http_url();
    assert_eq!(curl(&["-x", &px, &format!("http://{host}/")]).status, 200);
    let v1 = control.policy().version;
    backend.set_default(Answer::toml(&deny_doc(&host)));
    assert!(
        eventually(15, || curl(&["-x", &px, &format!("http://{host}/")]).status
            == 403),
        "the refreshed deny is enforced by the attached proxy without restart"
    );
    let view = control.policy();
    assert!(view.version > v1);
    assert!(eventually(5, || control
        .policy()
        .proxies
        .iter()
        .all(|p| p.acked_version == view.version)));
}

#[test]
fn refresh_failure_keeps_last_good() {
    let origin = http_echo("127.0.0.1");
    let host = format!("127.0.0.1:{}", origin.port());
    let backend = HttpsBackend::start();
    backend.push([Answer::toml(&deny_doc(&host))]);
    backend.set_default(Answer::status(500));
    let setup = Setup::for_backend(
        &backend,
        "refresh_interval_secs = 1\nmax_attempts = 1\n",
        &format!("[network]\nallowed_domains = [\"{host}\"]\n"),
    );
    let control = setup.start(&[], &[]);
    assert!(
        eventually(15, || control
            .stderr()
            .contains("requirements refresh failed: ")),
        "{}",
        control.stderr()
    );
    assert!(control.stderr().contains("keeping requirements fetched at"));
    // An invalid document does not replace the good one either.
    backend.set_default(Answer::toml("[network.domains]\n\"*\" = \"allow\"\n"));
    assert!(eventually(15, || control
        .stderr()
        .contains("invalid requirements document")));
    let proxy = control.proxy();
    assert_eq!(
        curl(&["-x", &proxy.http_url(), &format!("http://{host}/")]).status,
        403,
        "the managed deny is still enforced"
    );
    let st = control.policy().requirements.expect("status");
    assert!(!st.last_error.is_empty());
}

#[test]
fn approval_outside_managed_allowlist_is_impossible() {
    let backend = HttpsBackend::start();
    backend.set_default(Answer::toml(
        "[network]\nmanaged_allowed_domains_only = true\nallowed_domains = [\"*.corp.example\"]\ndenied_domains = [\"secret.corp.example\"]\n",
    ));
    let setup = Setup::for_backend(
        &backend,
        "",
        "[network]\nallowed_domains = [\"github.com\"]\n",
    );
    let control = setup.start(&[], &[]);
    let view = control.policy();
    assert!(view.managed_allowed_domains_only);
    let snap = view.snapshot.clone().expect("snapshot");
    assert!(
        !snap.asks_enabled,
        "no asks under managed_allowed_domains_only"
    );
    assert!(!snap.allowed_domains.contains(&"github.com".to_string()));
    let gh = view
        .entries
        .iter()
        .find(|e| e.pattern == "github.com")
        .expect("local entry listed");
    assert!(gh.ignored);
    // A miss is a hard deny, never an ask.
    let proxy = control.proxy();
    let r = curl(&["-x", &proxy.http_url(), "http://unlisted.example/"]);
    assert_eq!(r.status, 403);
    let mut c = control.client();
    let pending = runtime()
        .block_on(c.list_pending(v1::ListPendingRequest::default()))
        .expect("ListPending")
        .into_inner();
    assert!(pending.asks.is_empty());
    // Rules cannot widen it either.
    let e = control.add_rule("github.com", "allow").unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        e.message(),
        "managed_allowed_domains_only is set and no managed allow pattern covers github.com"
    );
    let e = control
        .add_rule("secret.corp.example", "allow")
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        e.message(),
        "host is denied by enterprise requirements (pattern \"secret.corp.example\")"
    );
    assert!(control.add_rule("api.corp.example", "allow").is_ok());
    assert!(
        control.add_rule("github.com", "deny").is_ok(),
        "deny rules are always accepted"
    );
    // `policy` shows the ignored entry.
    let out = Command::new(control_bin())
        .args(["policy", "--endpoint", &format!("http://{}", control.grpc)])
        .arg("--token-file")
        .arg(&control.token_file)
        .output()
        .expect("policy CLI");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ALLOW  github.com  config  ignored: "),
        "{text}"
    );
    assert!(
        text.contains("ALLOW  *.corp.example  requirements"),
        "{text}"
    );
}
