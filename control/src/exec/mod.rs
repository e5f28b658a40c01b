//! `portcullis-control exec -- COMMAND` (control.md §10): a private control plane, a proxy
//! sidecar attached to it, and COMMAND run with the proxy environment of env.md.

mod child;
mod env;
mod prompt;
mod sidecar;
mod summary;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::cli::ExecArgs;
use crate::server::{self, Failure, Listeners};

pub use prompt::destination;

/// Removes exec's private directory (socket, token, MITM files) however exec ends.
struct PrivateDir(PathBuf);

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `exec` to completion; the exit code is COMMAND's (control.md §10.7).
pub async fn run(args: ExecArgs, log: &str) -> ExitCode {
    match exec(args, log).await {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("portcullis: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn other(message: impl ToString) -> Failure {
    Failure {
        code: 1,
        message: message.to_string(),
    }
}

async fn exec(args: ExecArgs, log: &str) -> Result<u8, Failure> {
    if args.command.is_empty() {
        return Err(Failure {
            code: 2,
            message: "usage error: exec needs a COMMAND after --".into(),
        });
    }
    let server::Loaded { config, services } = server::load(&args.policy).await?;
    let audit = crate::audit::start(&config, &services.state.instance_id)
        .map_err(|message| Failure { code: 2, message })?;
    let session = match &args.session_id {
        Some(s) => s.clone(),
        None => format!(
            "exec-{}",
            portcullis::secret::random_hex(6)
                .map_err(|e| other(format!("cannot read random bytes: {e}")))?
        ),
    };
    let proxy_bin = sidecar::locate(args.proxy_bin.as_deref()).map_err(other)?;
    let dir = PrivateDir(crate::unix_listener::fresh_private_dir().map_err(other)?);
    let socket = dir.0.join("control.sock");
    let token_file = dir.0.join("control.token");
    let token = server::load_token(&token_file)?;
    let unix = server::bind_unix(&socket).await?;
    let tcp = match args.listen.as_deref() {
        Some(flag) => Some(server::bind_tcp(server::listen_addr(Some(flag), &config)?).await?),
        None => None,
    };
    let running = server::start(
        &services,
        token,
        Listeners {
            tcp,
            unix: Some((unix, socket.clone())),
        },
    )?;
    running.ready().await;
    let endpoint = format!("unix:{}", socket.display());
    if let Some(path) = &args.control_endpoint_file {
        write_endpoint_file(path, &endpoint).map_err(other)?;
    }
    let collector =
        summary::Collector::start(services.state.decisions.subscribe(), session.clone());
    let mitm_dir = config.network.mitm.then(|| dir.0.join("mitm"));
    let launch = sidecar::Launch {
        binary: &proxy_bin,
        config: args.policy.config.as_deref(),
        control: endpoint,
        token_file: &token_file,
        session_id: &session,
        socks5: config.network.enable_socks5,
        admin: config.network.enable_admin,
        mitm_dir: mitm_dir.as_deref(),
        log,
    };
    // The sidecar's own shutdown: connection grace, its last decision reports (at most 1 s,
    // so the exit summary counts them), the audit flush, and a margin.
    let grace = Duration::from_millis(
        config.limits.shutdown_grace_ms + config.audit.shutdown_timeout_ms + 2000,
    );
    let (mut sidecar, addresses) = match sidecar::Sidecar::start(launch).await {
        Ok(s) => s,
        Err(e) => {
            running.shutdown(&services).await;
            return Err(other(e));
        }
    };
    let socks_auth = match (
        &config.network.socks_username,
        &config.network.socks_password_file,
    ) {
        (Some(user), Some(file)) => {
            match portcullis::secret::read_secret_file("network.socks_password_file", file) {
                Ok(pass) => Some((user.clone(), pass)),
                Err(e) => {
                    sidecar.stop(grace).await;
                    running.shutdown(&services).await;
                    return Err(other(e));
                }
            }
        }
        _ => None,
    };
    let endpoints = env::ProxyEndpoints {
        http: addresses.http,
        socks5: addresses.socks5,
        socks_auth,
        mitm_dir,
        allow_local_binding: services.state.snapshot_for(&session).allow_local_binding,
        control_exe: std::env::current_exe().ok(),
    };
    let (child_env, warnings) = env::child_env(std::env::vars_os(), &endpoints);
    for w in warnings {
        eprintln!("portcullis: {w}");
    }
    let forwarder = match child::Forwarder::install() {
        Ok(f) => f,
        Err(e) => {
            sidecar.stop(grace).await;
            running.shutdown(&services).await;
            return Err(other(format!("cannot install signal handlers: {e}")));
        }
    };
    let mut command = match child::spawn(&args.command, &child_env) {
        Ok(c) => c,
        Err(f) => {
            sidecar.stop(grace).await;
            running.shutdown(&services).await;
            eprintln!("{}", f.message);
            return Ok(f.code);
        }
    };
    let forwarding = command.id().map(|pid| tokio::spawn(forwarder.forward(pid)));
    let interactive = !args.no_prompt
        && std::io::stdin().is_terminal()
        && std::fs::File::open("/dev/tty").is_ok();
    let prompting = tokio::spawn(prompt::run(
        services.clone(),
        session.clone(),
        child::program_name(&args.command),
        interactive,
    ));
    let mut sidecar_alive = true;
    let status = loop {
        tokio::select! {
            status = command.wait() => break status,
            status = sidecar.wait(), if sidecar_alive => {
                sidecar_alive = false;
                let shown = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                eprintln!(
                    "portcullis: proxy sidecar exited unexpectedly ({shown}); network access for COMMAND is now refused"
                );
            }
        }
    };
    if let Some(f) = forwarding {
        f.abort();
    }
    prompting.abort();
    // Held requests get their answer before the sidecar goes.
    services.approvals.shutdown().await;
    sidecar.stop(grace).await;
    running.shutdown(&services).await;
    crate::audit::shutdown(audit).await;
    drop(dir);
    for line in collector.finish().await.lines() {
        eprintln!("{line}");
    }
    match status {
        Ok(s) => Ok(child::exit_code(s)),
        Err(e) => Err(other(format!("cannot wait for COMMAND: {e}"))),
    }
}

/// Writes `unix:<socket>` atomically (temp, fsync, rename), readable by this user only.
fn write_endpoint_file(path: &Path, endpoint: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!(
        "tmp-{}",
        portcullis::secret::random_hex(4).map_err(|e| e.to_string())?
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{endpoint}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("--control-endpoint-file {}: {e}", path.display())
    })
}
