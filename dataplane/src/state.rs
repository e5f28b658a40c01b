//! State shared by every listener: the current runtime (config + compiled policy, swapped
//! atomically), the reporter, identity, and the shutdown signal.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use portcullis::config::Config;
use portcullis::decision::Origin;
use portcullis::policy::CompiledPolicy;
use tokio::sync::watch;

use crate::listeners::Bound;
use crate::report::Reporter;
use crate::report::metrics::Metrics;
use crate::resolve::Resolver;

/// Timeouts and limits the data path reads, precomputed from `[limits]`.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// `limits.max_header_bytes`.
    pub max_header_bytes: usize,
    /// `limits.max_headers`.
    pub max_headers: usize,
    /// `limits.header_read_timeout_ms`.
    pub header_read_timeout: Duration,
    /// `limits.client_idle_timeout_ms`.
    pub client_idle_timeout: Duration,
    /// `limits.connect_timeout_ms`.
    pub connect_timeout: Duration,
    /// `limits.dns_timeout_ms`.
    pub dns_timeout: Duration,
    /// `limits.response_header_timeout_ms` (0 = none).
    pub response_header_timeout: Option<Duration>,
    /// `limits.tunnel_idle_timeout_ms` (0 = none).
    pub tunnel_idle_timeout: Option<Duration>,
    /// `limits.shutdown_grace_ms`.
    pub shutdown_grace: Duration,
}

impl Settings {
    /// Reads the settings out of a validated config.
    pub fn from_config(c: &Config) -> Settings {
        let l = &c.limits;
        let ms = |v: u64| Duration::from_millis(v);
        let opt = |v: u64| (v > 0).then(|| Duration::from_millis(v));
        Settings {
            max_header_bytes: l.max_header_bytes as usize,
            max_headers: l.max_headers as usize,
            header_read_timeout: ms(l.header_read_timeout_ms),
            client_idle_timeout: ms(l.client_idle_timeout_ms),
            connect_timeout: ms(l.connect_timeout_ms),
            dns_timeout: ms(l.dns_timeout_ms),
            response_header_timeout: opt(l.response_header_timeout_ms),
            tunnel_idle_timeout: opt(l.tunnel_idle_timeout_ms),
            shutdown_grace: ms(l.shutdown_grace_ms),
        }
    }
}

/// One consistent version of everything a request is judged against.
pub struct Runtime {
    /// The validated configuration (file + flags).
    pub config: Config,
    /// Limits and timeouts.
    pub settings: Settings,
    /// The compiled policy.
    pub policy: CompiledPolicy,
    /// The resolver for `dns_servers`.
    pub resolver: Resolver,
    /// The unix-socket lists.
    pub unix: crate::unix_socket::UnixPolicy,
    /// The control plane's snapshot version this policy came from (`None`: standalone).
    pub snapshot_version: Option<u64>,
}

impl Runtime {
    /// Full or limited.
    pub fn mode(&self) -> portcullis::config::Mode {
        self.config.network.mode
    }
}

/// Shared proxy state.
pub struct Shared {
    runtime: ArcSwap<Runtime>,
    reporter: Reporter,
    origin: Origin,
    bound: Bound,
    own_addrs: Vec<std::net::SocketAddr>,
    tls: Arc<tokio_rustls::TlsConnector>,
    upstream_proxies: crate::upstream_proxy::UpstreamProxies,
    shutdown: watch::Receiver<bool>,
    version: std::sync::atomic::AtomicU64,
    /// Bumped whenever the mode turns limited: tunnels opened under full mode close.
    limited_epoch: watch::Sender<u64>,
    socks_credentials: Option<crate::socks5::auth::Credentials>,
    asker: std::sync::OnceLock<Arc<crate::asker::Asker>>,
    udp_associations: Arc<tokio::sync::Semaphore>,
    mitm: std::sync::OnceLock<Arc<crate::mitm::Mitm>>,
}

impl Shared {
    /// Builds the shared state.
    pub fn new(
        runtime: Runtime,
        reporter: Reporter,
        origin: Origin,
        bound: Bound,
        tls: tokio_rustls::TlsConnector,
        shutdown: watch::Receiver<bool>,
        socks_credentials: Option<crate::socks5::auth::Credentials>,
    ) -> Shared {
        let udp_max = runtime.config.limits.max_udp_associations as usize;
        Shared {
            runtime: ArcSwap::from_pointee(runtime),
            reporter,
            origin,
            own_addrs: bound.all().collect(),
            upstream_proxies: crate::upstream_proxy::UpstreamProxies::from_env(
                &|k| std::env::var(k).ok(),
                &bound.all().collect::<Vec<_>>(),
            ),
            bound,
            udp_associations: Arc::new(tokio::sync::Semaphore::new(udp_max)),
            tls: Arc::new(tls),
            shutdown,
            version: std::sync::atomic::AtomicU64::new(1),
            limited_epoch: watch::Sender::new(0),
            socks_credentials,
            asker: std::sync::OnceLock::new(),
            mitm: std::sync::OnceLock::new(),
        }
    }

    /// The current runtime; hold it for the whole of one decision.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Swaps in a new runtime atomically.
    pub fn swap_runtime(&self, r: Runtime) {
        let turned_limited = r.policy.limited() && !self.runtime.load().policy.limited();
        self.runtime.store(Arc::new(r));
        if turned_limited {
            // `http.md` §8 rule 4: raw tunnels and upgraded streams allowed under full mode end.
            self.limited_epoch.send_modify(|e| *e += 1);
        }
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// The asker, when attached to a control plane.
    pub fn asker(&self) -> Option<&Arc<crate::asker::Asker>> {
        self.asker.get()
    }

    /// Installs the asker (once, at attach).
    pub fn set_asker(&self, asker: Arc<crate::asker::Asker>) {
        let _ = self.asker.set(asker);
    }

    /// HTTPS interception, when `network.mitm = true` prepared it.
    pub fn mitm(&self) -> Option<&Arc<crate::mitm::Mitm>> {
        self.mitm.get()
    }

    /// Installs the prepared interception (once, before the ready line).
    pub fn set_mitm(&self, mitm: Arc<crate::mitm::Mitm>) {
        let _ = self.mitm.set(mitm);
    }

    /// SOCKS5 username/password, when configured.
    pub fn socks_credentials(&self) -> Option<crate::socks5::auth::Credentials> {
        self.socks_credentials.clone()
    }

    /// A number that changes whenever the runtime (policy) is swapped.
    pub fn policy_version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A place under `limits.max_udp_associations`, if one is free.
    pub fn udp_association_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.udp_associations.clone().try_acquire_owned().ok()
    }

    /// Current limits and timeouts.
    pub fn settings(&self) -> Settings {
        self.runtime.load().settings
    }

    /// The reporter every Decision goes through.
    pub fn reporter(&self) -> &Reporter {
        &self.reporter
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        self.reporter.metrics()
    }

    /// The metrics registry, shared.
    pub fn metrics_arc(&self) -> Arc<Metrics> {
        self.reporter.metrics_arc()
    }

    /// This proxy's identity.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The addresses this proxy listens on.
    pub fn bound(&self) -> &Bound {
        &self.bound
    }

    /// Every address this proxy listens on.
    pub fn own_addrs(&self) -> &[std::net::SocketAddr] {
        &self.own_addrs
    }

    /// The upstream proxy for a target, when `allow_upstream_proxy` and the environment say so.
    pub fn upstream_proxy(
        &self,
        secure: bool,
        host: &portcullis::policy::Host,
        port: u16,
    ) -> Option<crate::upstream_proxy::ProxyTarget> {
        if !self.runtime.load().config.network.allow_upstream_proxy {
            return None;
        }
        self.upstream_proxies.route(secure, host, port).cloned()
    }

    /// TLS client for `https://` origins.
    pub fn tls_connector(&self) -> Arc<tokio_rustls::TlsConnector> {
        self.tls.clone()
    }

    /// A receiver that changes when the mode turns limited.
    pub fn limited_signal(&self) -> watch::Receiver<u64> {
        self.limited_epoch.subscribe()
    }

    /// A handle that resolves once shutdown starts.
    pub fn shutdown_signal(&self) -> ShutdownSignal {
        ShutdownSignal(self.shutdown.clone())
    }
}

/// Resolves when graceful shutdown begins.
pub struct ShutdownSignal(watch::Receiver<bool>);

impl ShutdownSignal {
    /// Waits for shutdown; returns at once if it already began.
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|v| *v).await;
    }
}
