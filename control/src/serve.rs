//! `portcullis-control serve`: load config and token, bind, serve both gRPC services, print
//! the ready line, shut down on SIGINT/SIGTERM.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use portcullis::config::Config;
use portcullis::proto::v1::control_server::ControlServer;
use portcullis::proto::v1::data_plane_server::DataPlaneServer;
use tokio_stream::wrappers::TcpListenerStream;

use crate::cli::ServeArgs;
use crate::service::Services;
use crate::state::ControlState;
use crate::token;

/// Services reported by `grpc.health.v1.Health` (control.md §1.7).
const HEALTH_NAMES: [&str; 3] = ["", "portcullis.v1.Control", "portcullis.v1.DataPlane"];

/// Largest decoded message: a snapshot with 100 000 patterns must fit (control.md §1.9).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Runs `serve` to completion.
pub async fn run(args: ServeArgs) -> ExitCode {
    let config = match &args.policy.config {
        Some(p) => Config::load(p),
        None => Config::embedded(),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let listen = match &args.listen {
        None => config.control.listen,
        Some(text) => match text.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                eprintln!("usage error: --listen: expected IP:PORT");
                return ExitCode::from(2);
            }
        },
    };
    let listen = clamp(listen, config.control.dangerously_allow_non_loopback);
    // Enterprise requirements: before any listener serves; fail closed (requirements.md §4).
    let requirements = match crate::requirements::load_at_startup(&config, &args.policy).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}", e.message);
            return ExitCode::from(e.code);
        }
    };
    let token_path = match args
        .token_file
        .clone()
        .map(Ok)
        .unwrap_or_else(|| config.control_token_file())
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let token = match token::load_or_create(&token_path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("startup error: {e}");
            return ExitCode::from(1);
        }
    };
    let rules_path = match args
        .policy
        .rules
        .clone()
        .map(Ok)
        .unwrap_or_else(|| config.rules_file())
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // A rules file that cannot be read or parsed is never ignored (network-rules.md §6.1).
    let rules = match crate::rules::load(&rules_path) {
        Ok(r) => r,
        Err((code, msg)) => {
            eprintln!("{msg}");
            return ExitCode::from(code);
        }
    };
    tracing::info!(path = %rules_path.display(), rules = rules.len(), "rules loaded");
    let compiled = crate::rules::compile(&rules);
    let state = match ControlState::new(&config, instance_id(), &compiled) {
        Ok(s) => {
            s.init_requirements(requirements.active);
            Arc::new(s)
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("startup error: control.listen: cannot bind {listen}: {e}");
            return ExitCode::from(1);
        }
    };
    let bound = listener.local_addr().unwrap_or(listen);
    let ask_timeout = Duration::from_secs(
        args.policy
            .ask_timeout
            .unwrap_or(config.approvals.ask_timeout_secs),
    );
    let approvals = Arc::new(crate::approvals::Approvals::new(
        crate::approvals::Limits {
            timeout: ask_timeout,
            max_pending: config.approvals.max_pending as usize,
            max_waiters: config.approvals.max_waiters_per_ask as usize,
        },
        config.control.watch_buffer as usize,
    ));
    let services = Services {
        state,
        approvals: approvals.clone(),
        ask_timeout,
        rules: Arc::new(std::sync::Mutex::new(rules)),
        rules_path,
        max_session_allows: config.approvals.max_session_allows as usize,
    };
    let auth = move |req: tonic::Request<()>| {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match token::check(header, &token) {
            Ok(()) => Ok(req),
            Err(msg) => Err(tonic::Status::unauthenticated(msg)),
        }
    };
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(portcullis::proto::FILE_DESCRIPTOR_SET)
        .build_v1();
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(portcullis::proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha();
    let (Ok(reflection_v1), Ok(reflection_v1alpha)) = (reflection_v1, reflection_v1alpha) else {
        eprintln!("startup error: cannot build the reflection service");
        return ExitCode::from(1);
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            ControlServer::new(services.clone()).max_decoding_message_size(MAX_MESSAGE),
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            DataPlaneServer::new(services.clone()).max_decoding_message_size(MAX_MESSAGE),
            auth.clone(),
        ))
        // Reflection needs the token; health does not (control.md §1.3, §1.8).
        .add_service(tonic::service::interceptor::InterceptedService::new(
            reflection_v1,
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            reflection_v1alpha,
            auth,
        ))
        .add_service(health)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = rx.await;
        });
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("startup error: cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    for name in HEALTH_NAMES {
        health_reporter
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    println!("{{\"event\":\"ready\",\"component\":\"control\",\"grpc\":\"{bound}\"}}");
    tracing::info!(grpc = %bound, "portcullis-control ready");
    let serving = tokio::spawn(server);
    let refresh = requirements
        .refresher
        .map(|r| crate::requirements::spawn_refresh(r, services.state.clone()));
    // Rules edited by hand are picked up within 2 s (inode, size, mtime) and on SIGHUP.
    let watcher = {
        let services = services.clone();
        tokio::spawn(async move {
            let stamp = |p: &std::path::Path| {
                std::fs::metadata(p).ok().map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    (m.ino(), m.size(), m.mtime(), m.mtime_nsec())
                })
            };
            let mut last = stamp(&services.rules_path);
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tick.tick().await;
                let now = stamp(&services.rules_path);
                if now != last {
                    last = now;
                    services.reload_rules().await;
                }
            }
        })
    };
    signals.wait(&services).await;
    watcher.abort();
    if let Some(r) = refresh {
        r.abort();
    }
    tracing::info!("shutting down");
    for name in HEALTH_NAMES {
        health_reporter
            .set_service_status(name, tonic_health::ServingStatus::NotServing)
            .await;
    }
    // Every held request gets a clear answer before the streams end.
    approvals.shutdown().await;
    let _ = tx.send(());
    // Open Attach streams are ended with the server; do not wait for clients longer than 1 s.
    let _ = tokio::time::timeout(Duration::from_secs(1), serving).await;
    ExitCode::SUCCESS
}

/// A non-loopback listen address becomes loopback unless the dangerous key says otherwise.
fn clamp(addr: SocketAddr, dangerous: bool) -> SocketAddr {
    if addr.ip().is_loopback() {
        return addr;
    }
    if dangerous {
        tracing::warn!("DANGEROUS: control API listening on non-loopback {addr}");
        return addr;
    }
    let ip = match addr.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    };
    let clamped = SocketAddr::new(ip, addr.port());
    tracing::warn!(
        "control.listen: non-loopback address; binding {clamped} (set control.dangerously_allow_non_loopback to keep it)"
    );
    clamped
}

fn instance_id() -> String {
    portcullis::secret::random_hex(16).unwrap_or_else(|_| "0".repeat(32))
}

struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for SIGINT/SIGTERM; SIGHUP re-reads the rules file meanwhile.
    async fn wait(mut self, services: &Services) {
        loop {
            tokio::select! {
                _ = self.int.recv() => return,
                _ = self.term.recv() => return,
                _ = self.hup.recv() => services.reload_rules().await,
            }
        }
    }
}
