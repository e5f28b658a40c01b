//! `portcullis-proxy`: the Portcullis data plane.

mod admin;
mod app;
mod asker;
mod cli;
mod control_client;
mod dial;
mod http;
mod listeners;
mod mitm;
mod pipeline;
mod policy_build;
mod report;
mod resolve;
mod socks5;
#[cfg(target_os = "linux")]
mod splice;
mod state;
mod telemetry;
mod tunnel;
mod tunnel_run;
mod unix_socket;
mod upstream_proxy;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tokio::io::AsyncWriteExt;

use crate::app::App;
use crate::listeners::{Bound, ListenerKind};

fn main() -> ExitCode {
    let args = match cli::Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            // clap: 0 for --help/--version, 2 for usage errors.
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    let audit_slot = portcullis::telemetry::init_logging(&args.log);
    // Default: one worker per CPU this process may run on (affinity-aware). With one worker a
    // current-thread runtime serves every task on the main thread: no cross-thread wake-ups.
    let workers = args.worker_threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    );
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder.enable_all();
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run(args, audit_slot))
}

async fn run(args: cli::Args, audit_slot: portcullis::telemetry::AuditSlot) -> ExitCode {
    let overrides = policy_build::overrides_from_args(&args);
    let flag_policy = !args.allow.is_empty() || !args.deny.is_empty() || args.mode.is_some();
    let config = match app::load_config(args.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let runtime = match app::build_runtime(config) {
        Ok(r) => r,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let audit_settings = match portcullis::telemetry::AuditSettings::from_env(&runtime.config.audit)
    {
        Ok(s) => s,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let nofile = listeners::raise_nofile_limit();
    let max_conns = runtime.config.limits.max_connections as u64;
    if nofile < 2 * max_conns + 256 {
        tracing::warn!(
            nofile,
            max_connections = max_conns,
            "RLIMIT_NOFILE is below 2 × max_connections + 256; connections may fail before the limit"
        );
    }

    // Reserve every listener before anything else.
    let addrs = runtime.config.listeners();
    for w in addrs.warnings.iter() {
        tracing::warn!("{w}");
    }
    let http_listener = match listeners::bind(addrs.http, "network.proxy_url").await {
        Ok(l) => l,
        Err(e) => return startup_failure(&e),
    };
    let socks_listener = match addrs.socks5 {
        Some(a) => match listeners::bind(a, "network.socks_url").await {
            Ok(l) => Some(l),
            Err(e) => return startup_failure(&e),
        },
        None => None,
    };
    let admin_listener = match addrs.admin {
        Some(a) => match listeners::bind(a, "network.admin_url").await {
            Ok(l) => Some(l),
            Err(e) => return startup_failure(&e),
        },
        None => None,
    };
    let bound = Bound {
        http: http_listener.local_addr().ok(),
        socks5: socks_listener.as_ref().and_then(|l| l.local_addr().ok()),
        admin: admin_listener.as_ref().and_then(|l| l.local_addr().ok()),
    };
    let admin_token = match policy_build::admin_token(&runtime.config) {
        Ok(t) => t,
        Err(e) => return startup_failure(&e),
    };
    let socks_credentials = match (
        &runtime.config.network.socks_username,
        &runtime.config.network.socks_password_file,
    ) {
        (Some(user), Some(file)) => {
            match portcullis::secret::read_secret_file("network.socks_password_file", file) {
                Ok(password) => Some(socks5::auth::Credentials {
                    username: user.clone(),
                    password,
                }),
                Err(e) => return startup_failure(&e),
            }
        }
        _ => None,
    };
    let blocked_log_size = runtime.config.limits.blocked_log_size as usize;
    let attach = match control_client::AttachConfig::from_config(&runtime.config) {
        Ok(a) => a,
        Err(e) => return startup_failure(&e),
    };
    let mut reporter = report::Reporter::new(blocked_log_size);
    let mut control_events = None;
    if attach.is_some() {
        // Only flags given for this run are worth a warning; the file's lists reach the
        // control plane through its own merge when both read the same config.
        if flag_policy {
            tracing::warn!(
                "attached to a control plane: --allow/--deny/--mode are ignored; the snapshots decide"
            );
        } else {
            tracing::info!(
                "attached to a control plane: local policy keys (lists, mode, allow_local_binding, unix sockets) are ignored; the snapshots decide"
            );
        }
        let queue = report::ControlQueue::new(runtime.config.control.event_buffer as usize);
        reporter.add_sink(Box::new(report::ControlSink(queue.clone())));
        control_events = Some(queue);
    }
    let attach_timeout = std::time::Duration::from_secs(runtime.config.control.attach_timeout_secs);
    let origin = portcullis::decision::Origin {
        proxy_id: policy_build::new_proxy_id().into(),
        session_id: runtime.config.control.session_id.clone().into(),
    };
    let audit = match telemetry::start(&audit_settings, &origin, &mut reporter, &audit_slot) {
        Ok(a) => a,
        Err(e) => return startup_failure(&e),
    };
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let tls = match policy_build::tls_connector(&runtime.config) {
        Ok(t) => t,
        Err(e) => return startup_failure(&e),
    };
    let shared = Arc::new(state::Shared::new(
        runtime,
        reporter,
        origin,
        bound,
        tls,
        shutdown_rx,
        socks_credentials,
    ));
    let app = Arc::new(App::new(
        shared.clone(),
        args.config.clone(),
        overrides,
        admin_token,
    ));
    let gate = Arc::new(tokio::sync::Semaphore::new(max_conns as usize));

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(listeners::accept_loop(
        shared.clone(),
        http_listener,
        ListenerKind::Http,
        gate.clone(),
        http::serve_connection,
        |mut stream| async move {
            let _ = stream
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\nx-proxy-error: too-many-connections\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
        },
    ));
    if let Some(l) = socks_listener {
        tasks.spawn(listeners::accept_loop(
            shared.clone(),
            l,
            ListenerKind::Socks5,
            gate.clone(),
            socks5::serve_connection,
            |_stream| async {},
        ));
    }
    if let Some(l) = admin_listener {
        let admin_gate = Arc::new(tokio::sync::Semaphore::new(64));
        let app2 = app.clone();
        tasks.spawn(listeners::accept_loop(
            shared.clone(),
            l,
            ListenerKind::Admin,
            admin_gate,
            move |_shared, stream, peer, guard| {
                admin::serve_connection(app2.clone(), stream, peer, guard)
            },
            |_stream| async {},
        ));
    }

    let mut control_task = None;
    if let (Some(cfg), Some(events)) = (attach, control_events) {
        let url = cfg.endpoint.to_string();
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        shared.set_asker(std::sync::Arc::new(asker::Asker::new(
            shared.runtime().config.limits.max_pending_approvals as usize,
        )));
        let (close_tx, close_rx) = tokio::sync::watch::channel(false);
        control_task = Some((
            close_tx,
            tokio::spawn(control_client::run(
                shared.clone(),
                cfg,
                events,
                first_tx,
                close_rx,
            )),
        ));
        // The ready line waits for the first snapshot (control.md §9).
        match tokio::time::timeout(attach_timeout, first_rx).await {
            Ok(Ok(Ok(()))) => tracing::info!(%url, "attached to the control plane"),
            Ok(Ok(Err(cause))) => {
                return startup_failure(&format!(
                    "could not attach to control plane at {url}: {cause}"
                ));
            }
            _ => {
                return startup_failure(&format!(
                    "could not attach to control plane at {url}: no policy snapshot within {} s",
                    attach_timeout.as_secs()
                ));
            }
        }
    }
    // HTTPS interception: CA and exported trust files exist before the ready line (http.md §9).
    let mitm = if shared.runtime().config.network.mitm {
        let config = shared.runtime().config.clone();
        let proxy_id = shared.origin().proxy_id.to_string();
        match mitm::Mitm::prepare(&config, &proxy_id, &|k| std::env::var(k).ok()) {
            Ok(m) => {
                let m = Arc::new(m);
                shared.set_mitm(m.clone());
                Some(m)
            }
            Err(e) => return startup_failure(&e),
        }
    } else {
        None
    };
    // Signal handlers exist before anyone can learn our addresses from the ready line.
    let signals = match portcullis::signals::Signals::install() {
        Ok(s) => s,
        Err(e) => {
            if let Some(m) = &mitm {
                m.cleanup();
            }
            return startup_failure(&format!("cannot install signal handlers: {e}"));
        }
    };
    println!("{}", shared.bound().ready_line());
    tracing::info!(proxy_id = %shared.origin().proxy_id, "portcullis-proxy ready");

    // SIGHUP reloads the configuration meanwhile.
    signals
        .wait_for_shutdown(|| async {
            if let Err(e) = app.reload().await {
                tracing::error!("reload failed, keeping the running configuration: {e}");
            }
        })
        .await;
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    let grace = shared.settings().shutdown_grace;
    // In-flight connections hold permits; wait until they are all back or the grace ends.
    let all = max_conns as u32;
    let _ = tokio::time::timeout(
        grace + std::time::Duration::from_millis(200),
        gate.acquire_many(all),
    )
    .await;
    tasks.abort_all();
    // The Decisions of the requests that just ended reach the control plane before we go.
    if let Some((close, task)) = control_task {
        let _ = close.send(true);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
    }
    if let Some(m) = &mitm {
        m.cleanup();
    }
    telemetry::shutdown(audit).await;
    ExitCode::SUCCESS
}

fn startup_failure(msg: &str) -> ExitCode {
    eprintln!("startup error: {msg}");
    ExitCode::from(1)
}
