//! COMMAND itself (control.md §10.5, §10.7): spawned with the proxy environment, signals
//! forwarded, exit status mapped like a shell's.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;

use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};

/// Why COMMAND could not start: exit code (127 not found, 126 not executable) and message.
pub struct SpawnFailure {
    /// 127 or 126, like a shell.
    pub code: u8,
    /// `portcullis: ...` message.
    pub message: String,
}

/// Starts COMMAND in exec's process group with exactly `env`.
pub fn spawn(
    command: &[String],
    env: &BTreeMap<OsString, OsString>,
) -> Result<Child, SpawnFailure> {
    let Some((program, args)) = command.split_first() else {
        return Err(SpawnFailure {
            code: 2,
            message: "portcullis: exec: missing COMMAND".into(),
        });
    };
    let mut cmd = Command::new(program);
    cmd.args(args).env_clear().envs(env);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // COMMAND must not outlive exec (and with it, its proxy).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| {
        let code = match e.kind() {
            std::io::ErrorKind::NotFound => 127,
            _ => 126,
        };
        let what = if code == 127 {
            "command not found".to_string()
        } else {
            e.to_string()
        };
        SpawnFailure {
            code,
            message: format!("portcullis: {program}: {what}"),
        }
    })
}

/// The exit code exec reports for COMMAND's status: its code, or 128 + the signal number.
pub fn exit_code(status: std::process::ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(sig)) => (128 + sig) as u8,
        (None, None) => 1,
    }
}

/// Program name of COMMAND for prompts: the last path component of its first word.
pub fn program_name(command: &[String]) -> String {
    command
        .first()
        .map(|p| p.rsplit('/').next().unwrap_or(p).to_string())
        .unwrap_or_default()
}

/// Signal handlers installed before COMMAND starts, so no signal between spawn and forwarding
/// kills exec with the default action.
pub struct Forwarder(Vec<(tokio::signal::unix::Signal, libc::c_int, bool)>);

impl Forwarder {
    /// Watches SIGTERM, SIGHUP, SIGUSR1, SIGUSR2, SIGINT and SIGQUIT.
    pub fn install() -> std::io::Result<Forwarder> {
        let kinds = [
            (SignalKind::terminate(), libc::SIGTERM, false),
            (SignalKind::hangup(), libc::SIGHUP, false),
            (SignalKind::user_defined1(), libc::SIGUSR1, false),
            (SignalKind::user_defined2(), libc::SIGUSR2, false),
            (SignalKind::interrupt(), libc::SIGINT, true),
            (SignalKind::quit(), libc::SIGQUIT, true),
        ];
        let mut streams = Vec::with_capacity(kinds.len());
        for (kind, number, terminal) in kinds {
            streams.push((signal(kind)?, number, terminal));
        }
        Ok(Forwarder(streams))
    }

    /// Forwards every watched signal to `pid`; SIGINT/SIGQUIT only when the terminal did not
    /// already deliver them (exec's group is not its foreground group). Runs until dropped.
    pub async fn forward(self, pid: u32) {
        let mut tasks = Vec::new();
        for (mut stream, number, terminal) in self.0 {
            tasks.push(tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    if terminal && in_foreground() {
                        continue;
                    }
                    // SAFETY: plain kill(2) on our child's pid, which is reaped only after
                    // this forwarder is dropped.
                    unsafe {
                        libc::kill(pid as libc::pid_t, number);
                    }
                }
            }));
        }
        let _guard = AbortAll(tasks);
        std::future::pending::<()>().await;
    }
}

/// Aborts the per-signal tasks when the forwarding future is dropped.
struct AbortAll(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortAll {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Whether exec's process group is the foreground group of its controlling terminal.
fn in_foreground() -> bool {
    use std::os::fd::AsRawFd;
    let Ok(tty) = std::fs::File::open("/dev/tty") else {
        return false;
    };
    // SAFETY: tcgetpgrp and getpgrp only read process state; the fd is valid while `tty` lives.
    unsafe { libc::tcgetpgrp(tty.as_raw_fd()) == libc::getpgrp() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_names() {
        assert_eq!(program_name(&["/usr/bin/curl".into(), "-s".into()]), "curl");
        assert_eq!(program_name(&["git".into()]), "git");
    }
}
