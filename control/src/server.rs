//! What `serve` and `exec` share: loading config, rules and state into `Services`, and serving
//! them on TCP and/or a unix socket with the token, health and reflection (control.md §1).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use portcullis::config::Config;
use portcullis::proto::v1::control_server::ControlServer;
use portcullis::proto::v1::data_plane_server::DataPlaneServer;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;

use crate::cli::PolicySourceArgs;
use crate::service::Services;
use crate::state::ControlState;
use crate::token;

/// Services reported by `grpc.health.v1.Health` (control.md §1.7).
const HEALTH_NAMES: [&str; 3] = ["", "portcullis.v1.Control", "portcullis.v1.DataPlane"];

/// Largest decoded message: a snapshot with 100 000 patterns must fit (control.md §1.9).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// A startup failure: the exit code (2 usage/configuration, 1 other) and the message.
#[derive(Debug)]
pub struct Failure {
    /// Process exit code.
    pub code: u8,
    /// What went wrong, naming the key, file or address.
    pub message: String,
}

impl Failure {
    fn config(message: impl ToString) -> Failure {
        Failure {
            code: 2,
            message: message.to_string(),
        }
    }

    fn other(message: impl ToString) -> Failure {
        Failure {
            code: 1,
            message: message.to_string(),
        }
    }
}

/// Config, rules and state, loaded and ready to serve.
pub struct Loaded {
    /// The validated configuration.
    pub config: Config,
    /// The RPC implementations and their state.
    pub services: Services,
}

/// Loads config (or the embedded defaults), the rules file (a broken one refuses to start,
/// network-rules.md §6.1) and builds the state.
pub async fn load(policy: &PolicySourceArgs) -> Result<Loaded, Failure> {
    let config = match &policy.config {
        Some(p) => Config::load(p),
        None => Config::embedded(),
    }
    .map_err(Failure::config)?;
    let rules_path = match policy.rules.clone() {
        Some(p) => p,
        None => config.rules_file().map_err(Failure::config)?,
    };
    let rules =
        crate::rules::load(&rules_path).map_err(|(code, message)| Failure { code, message })?;
    tracing::info!(path = %rules_path.display(), rules = rules.len(), "rules loaded");
    let compiled = crate::rules::compile(&rules);
    // Enterprise requirements: before any listener serves; fail closed (requirements.md §4).
    let requirements = crate::requirements::load_at_startup(&config, policy)
        .await
        .map_err(|e| Failure {
            code: e.code,
            message: e.message,
        })?;
    let state = ControlState::new(&config, instance_id(), &compiled).map_err(Failure::config)?;
    state.init_requirements(requirements.active);
    let state = Arc::new(state);
    let ask_timeout = Duration::from_secs(
        policy
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
        approvals,
        ask_timeout,
        rules: Arc::new(std::sync::Mutex::new(rules)),
        rules_path,
        rules_error: Default::default(),
        max_session_allows: config.approvals.max_session_allows as usize,
    };
    if let Some(refresher) = requirements.refresher {
        // The first refresh is due one interval after the fetch; a failed start exits anyway.
        crate::requirements::spawn_refresh(refresher, services.clone());
    }
    Ok(Loaded { config, services })
}

/// Parses `--listen` (or takes `control.listen`) and applies the loopback clamp of §1.1.
pub fn listen_addr(flag: Option<&str>, config: &Config) -> Result<SocketAddr, Failure> {
    let addr = match flag {
        None => config.control.listen,
        Some(text) => text
            .parse::<SocketAddr>()
            .map_err(|_| Failure::config("usage error: --listen: expected IP:PORT"))?,
    };
    Ok(clamp(addr, config.control.dangerously_allow_non_loopback))
}

/// Binds the TCP endpoint.
pub async fn bind_tcp(addr: SocketAddr) -> Result<tokio::net::TcpListener, Failure> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Failure::other(format!(
            "startup error: control.listen: cannot bind {addr}: {e}"
        ))
    })
}

/// Binds the unix endpoint (§1.2).
pub async fn bind_unix(path: &std::path::Path) -> Result<tokio::net::UnixListener, Failure> {
    crate::unix_listener::bind(path)
        .await
        .map_err(|e| Failure::other(format!("startup error: {e}")))
}

/// Loads (or creates) the token file.
pub fn load_token(path: &std::path::Path) -> Result<Arc<str>, Failure> {
    token::load_or_create(path)
        .map(Arc::from)
        .map_err(|e| Failure::other(format!("startup error: {e}")))
}

/// The listeners one server serves.
#[derive(Default)]
pub struct Listeners {
    /// TCP (token required).
    pub tcp: Option<tokio::net::TcpListener>,
    /// Unix socket (token optional, but checked when sent) and its path, removed at shutdown.
    pub unix: Option<(tokio::net::UnixListener, PathBuf)>,
}

/// A running server: its serving tasks, the rules watcher and the health reporter.
pub struct Running {
    health: tonic_health::server::HealthReporter,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
    watcher: JoinHandle<()>,
    unix_path: Option<PathBuf>,
}

/// Starts serving `services` on `listeners`; health says NOT_SERVING until [`Running::ready`].
pub fn start(
    services: &Services,
    token: Arc<str>,
    listeners: Listeners,
) -> Result<Running, Failure> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    let unix_path = listeners.unix.as_ref().map(|(_, p)| p.clone());
    if let Some(listener) = listeners.tcp {
        let (tx, rx) = oneshot::channel::<()>();
        let router = router(services, token.clone(), health_service.clone())?;
        stops.push(tx);
        tasks.push(tokio::spawn(async move {
            // Small gRPC frames (acks, answers, responses) must not wait for Nagle: with
            // delayed ACKs a response could stall 40 ms. Our own incoming stream skips the
            // option tonic sets on the listeners it binds itself.
            let incoming = TcpListenerStream::new(listener).map(|conn| {
                conn.inspect(|s| {
                    if let Err(e) = s.set_nodelay(true) {
                        tracing::debug!("cannot set TCP_NODELAY: {e}");
                    }
                })
            });
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await
            {
                tracing::error!("control API (tcp) stopped: {e}");
            }
        }));
    }
    if let Some((listener, _)) = listeners.unix {
        let (tx, rx) = oneshot::channel::<()>();
        let router = router(services, token, health_service)?;
        stops.push(tx);
        tasks.push(tokio::spawn(async move {
            let incoming = crate::unix_listener::incoming(listener);
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await
            {
                tracing::error!("control API (unix) stopped: {e}");
            }
        }));
    }
    let watcher = tokio::spawn(watch_rules(services.clone()));
    Ok(Running {
        health,
        stops,
        tasks,
        watcher,
        unix_path,
    })
}

impl Running {
    /// Health turns SERVING (call right before printing the ready line).
    pub async fn ready(&self) {
        for name in HEALTH_NAMES {
            self.health
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        }
    }

    /// Graceful stop: NOT_SERVING, every held ask answered, streams ended within 1 s.
    pub async fn shutdown(self, services: &Services) {
        self.watcher.abort();
        for name in HEALTH_NAMES {
            self.health
                .set_service_status(name, tonic_health::ServingStatus::NotServing)
                .await;
        }
        // Every held request gets a clear answer before the streams end.
        services.approvals.shutdown().await;
        for stop in self.stops {
            let _ = stop.send(());
        }
        for task in self.tasks {
            // Open Attach streams end with the server; do not wait for clients longer than 1 s.
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        if let Some(path) = self.unix_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

type Router = tonic::transport::server::Router;

fn router(
    services: &Services,
    token: Arc<str>,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Result<Router, Failure> {
    let auth = move |req: tonic::Request<()>| {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        // On the unix socket (already limited to this user) the header is optional (§1.3).
        let unix = req
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .is_some();
        if unix && header.is_none() {
            return Ok(req);
        }
        match token::check(header, &token) {
            Ok(()) => Ok(req),
            Err(msg) => Err(tonic::Status::unauthenticated(msg)),
        }
    };
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(portcullis::proto::FILE_DESCRIPTOR_SET)
        .build_v1();
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(portcullis::proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha();
    let (Ok(reflection_v1), Ok(reflection_v1alpha)) = (reflection_v1, reflection_v1alpha) else {
        return Err(Failure::other(
            "startup error: cannot build the reflection service",
        ));
    };
    use tonic::service::interceptor::InterceptedService;
    Ok(tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(InterceptedService::new(
            ControlServer::new(services.clone()).max_decoding_message_size(MAX_MESSAGE),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            DataPlaneServer::new(services.clone()).max_decoding_message_size(MAX_MESSAGE),
            auth.clone(),
        ))
        // Reflection needs the token; health does not (control.md §1.3, §1.8).
        .add_service(InterceptedService::new(reflection_v1, auth.clone()))
        .add_service(InterceptedService::new(reflection_v1alpha, auth))
        .add_service(health))
}

/// Rules edited by hand are picked up within 2 s (inode, size, mtime).
async fn watch_rules(services: Services) {
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
