//! Spawning the real `portcullis-control serve` and talking to it over gRPC.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portcullis::proto::v1::control_client::ControlClient;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::interceptor::InterceptedService;

/// Adds `authorization: Bearer TOKEN` to every request.
#[derive(Clone)]
pub struct Bearer(pub AsciiMetadataValue);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// A token-authenticated `Control` client.
pub type Client = ControlClient<InterceptedService<tonic::transport::Channel, Bearer>>;

/// A running `portcullis-control serve`; killed on drop.
pub struct ControlProcess {
    child: Child,
    stderr: Arc<Mutex<String>>,
    /// `HOST:PORT` of the gRPC listener (from the ready line).
    pub grpc: String,
    /// The bearer token.
    pub token: String,
    /// The token file (pass to proxies with `--control-token-file`).
    pub token_file: PathBuf,
    /// The rules file given with `--rules`.
    pub rules: PathBuf,
    exited: Option<ExitStatus>,
}

/// What to start: binary, state directory (config and token go there), rules file, config TOML
/// and extra environment variables.
pub struct ControlSpec<'a> {
    /// The `portcullis-control` binary.
    pub bin: PathBuf,
    /// Directory for `control.toml` and `control.token` (shared token when shared directory).
    pub dir: &'a Path,
    /// `--rules PATH`.
    pub rules: &'a Path,
    /// The config file's content.
    pub config: &'a str,
    /// Extra environment.
    pub env: &'a [(&'a str, &'a str)],
}

impl ControlProcess {
    /// Starts the debug `portcullis-control` (built first if needed) and waits for its ready line.
    pub fn start(dir: &Path, rules: &Path, config: &str) -> ControlProcess {
        Self::start_spec(ControlSpec {
            bin: crate::proxy::control_bin(),
            dir,
            rules,
            config,
            env: &[],
        })
    }

    /// Starts `serve --listen 127.0.0.1:0` as described and waits up to 30 s for the ready line.
    pub fn start_spec(spec: ControlSpec<'_>) -> ControlProcess {
        Self::start_spec_at(spec, "127.0.0.1:0")
    }

    /// As [`ControlProcess::start_spec`] on a fixed `--listen` address, e.g. to restart a
    /// control plane where its proxies will reconnect.
    pub fn start_spec_at(spec: ControlSpec<'_>, listen: &str) -> ControlProcess {
        let cfg = spec.dir.join("control.toml");
        std::fs::write(&cfg, spec.config).expect("write control config");
        let token_file = spec.dir.join("control.token");
        let mut cmd = Command::new(&spec.bin);
        cmd.args(["serve", "--listen", listen, "--config"])
            .arg(&cfg)
            .arg("--rules")
            .arg(spec.rules)
            .arg("--token-file")
            .arg(&token_file)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in spec.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn portcullis-control");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().expect("stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match err_pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let text = crate::proxy::strip_ansi(&String::from_utf8_lossy(&buf[..n]));
                        sink.lock().unwrap().push_str(&text);
                    }
                }
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "control plane printed no ready line; stderr:\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        let ready: serde_json::Value = serde_json::from_str(&line).expect("ready line JSON");
        let grpc = ready["grpc"].as_str().expect("grpc address").to_string();
        let token = std::fs::read_to_string(&token_file)
            .expect("token file")
            .trim()
            .to_string();
        ControlProcess {
            child,
            stderr,
            grpc,
            token,
            token_file,
            rules: spec.rules.to_path_buf(),
            exited: None,
        }
    }

    /// `http://HOST:PORT`, for `portcullis-proxy --control`.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote to stderr so far (ANSI escapes removed).
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety implications.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exited.is_some() {
            return self.exited;
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.exited = Some(s);
                return self.exited;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// A connected, authenticated client.
    pub async fn client(&self) -> Client {
        let channel = tonic::transport::Endpoint::from_shared(self.url())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to control");
        let value: AsciiMetadataValue =
            MetadataValue::try_from(format!("Bearer {}", self.token)).expect("token is ASCII");
        ControlClient::with_interceptor(channel, Bearer(value))
    }

    /// `GetStatus`, from a synchronous test.
    pub fn status(&self) -> portcullis::proto::v1::ControlStatus {
        crate::origin::runtime().block_on(async {
            self.client()
                .await
                .get_status(portcullis::proto::v1::GetStatusRequest {})
                .await
                .expect("GetStatus")
                .into_inner()
        })
    }
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
