//! The `portcullis-proxy` sidecar of `exec` (control.md §10.1, §10.6): located, started with
//! ephemeral loopback listeners attached to the private endpoint, its ready line read, stopped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long the sidecar may take to print its ready line.
const READY_LIMIT: Duration = Duration::from_secs(10);

/// The sidecar's listeners, from its ready line.
#[derive(Debug, Clone)]
pub struct Addresses {
    /// HTTP proxy listener.
    pub http: SocketAddr,
    /// SOCKS5 listener, unless disabled.
    pub socks5: Option<SocketAddr>,
}

/// What the sidecar is started with.
pub struct Launch<'a> {
    /// The `portcullis-proxy` binary.
    pub binary: &'a Path,
    /// exec's `--config`, passed on unchanged.
    pub config: Option<&'a Path>,
    /// `unix:<dir>/control.sock`.
    pub control: String,
    /// The private token file.
    pub token_file: &'a Path,
    /// The session id.
    pub session_id: &'a str,
    /// SOCKS5 enabled in the config.
    pub socks5: bool,
    /// Admin API enabled in the config.
    pub admin: bool,
    /// `--mitm-dir`, when `network.mitm = true`.
    pub mitm_dir: Option<&'a Path>,
    /// The log filter.
    pub log: &'a str,
}

/// A started sidecar.
pub struct Sidecar {
    child: Child,
}

/// Finds `portcullis-proxy`: `--proxy-bin`/`PORTCULLIS_PROXY_BIN`, else next to this executable,
/// else on `PATH`.
pub fn locate(flag: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    if let Ok(me) = std::env::current_exe()
        && let Some(dir) = me.parent()
    {
        let beside = dir.join("portcullis-proxy");
        if beside.is_file() {
            return Ok(beside);
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("portcullis-proxy"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "cannot find portcullis-proxy next to portcullis-control or on PATH (use --proxy-bin)"
                .to_string()
        })
}

impl Sidecar {
    /// Starts the sidecar with exec's original environment and waits for its ready line.
    pub async fn start(launch: Launch<'_>) -> Result<(Sidecar, Addresses), String> {
        let mut cmd = Command::new(launch.binary);
        cmd.arg("--http").arg("127.0.0.1:0");
        if launch.socks5 {
            cmd.arg("--socks5").arg("127.0.0.1:0");
        }
        if launch.admin {
            cmd.arg("--admin").arg("127.0.0.1:0");
        }
        if let Some(c) = launch.config {
            cmd.arg("--config").arg(c);
        }
        if let Some(d) = launch.mitm_dir {
            cmd.arg("--mitm-dir").arg(d);
        }
        cmd.arg("--control")
            .arg(&launch.control)
            .arg("--control-token-file")
            .arg(launch.token_file)
            .arg("--session-id")
            .arg(launch.session_id)
            .arg("--log")
            .arg(launch.log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // The sidecar must not outlive exec, whatever kills exec.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", launch.binary.display()))?;
        let Some(stdout) = child.stdout.take() else {
            return Err("the sidecar has no stdout".into());
        };
        let mut lines = BufReader::new(stdout).lines();
        let line = match tokio::time::timeout(READY_LIMIT, lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) | Ok(Err(_)) => {
                let status = child.wait().await.ok();
                return Err(format!(
                    "the proxy sidecar exited before it was ready ({})",
                    status.map(|s| s.to_string()).unwrap_or_default()
                ));
            }
            Err(_) => {
                let _ = child.kill().await;
                return Err(format!(
                    "the proxy sidecar printed no ready line within {} s",
                    READY_LIMIT.as_secs()
                ));
            }
        };
        let addresses = parse_ready(&line)?;
        // Keep draining stdout so the sidecar never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok((Sidecar { child }, addresses))
    }

    /// Waits for the sidecar to exit on its own.
    pub async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait().await
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Some(pid) = self.child.id() {
            // SAFETY: plain kill(2) on our own child's pid, which has not been reaped yet.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// `{"event":"ready","component":"proxy","http":"A","socks5":"B"|null,"admin":"C"|null}`.
fn parse_ready(line: &str) -> Result<Addresses, String> {
    let bad = || format!("the proxy sidecar printed an unexpected ready line: {line}");
    let v: serde_json::Value = serde_json::from_str(line).map_err(|_| bad())?;
    if v.get("event").and_then(|e| e.as_str()) != Some("ready") {
        return Err(bad());
    }
    let addr = |key: &str| -> Result<Option<SocketAddr>, String> {
        match v.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => s.parse().map(Some).map_err(|_| bad()),
            Some(_) => Err(bad()),
        }
    };
    Ok(Addresses {
        http: addr("http")?.ok_or_else(bad)?,
        socks5: addr("socks5")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_parses() {
        let a = parse_ready(
            r#"{"event":"ready","component":"proxy","http":"127.0.0.1:1","socks5":null,"admin":"127.0.0.1:3"}"#,
        )
        .unwrap();
        assert_eq!(a.http, "127.0.0.1:1".parse().unwrap());
        assert!(a.socks5.is_none());
        assert!(parse_ready("garbage").is_err());
        assert!(parse_ready(r#"{"event":"ready","http":5}"#).is_err());
    }
}
