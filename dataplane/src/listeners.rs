//! Listener reservation, the ready line, and the accept loops with the connection limit.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::state::Shared;

/// The addresses actually bound (reported in the ready line and `/config`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Bound {
    /// HTTP proxy listener.
    pub http: Option<SocketAddr>,
    /// SOCKS5 listener.
    pub socks5: Option<SocketAddr>,
    /// Admin API listener.
    pub admin: Option<SocketAddr>,
}

impl Bound {
    /// Every address this proxy listens on (`policy.md` §5.3 refuses them as destinations).
    pub fn all(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        [self.http, self.socks5, self.admin].into_iter().flatten()
    }

    /// The one-line JSON ready message.
    pub fn ready_line(&self) -> String {
        let fmt = |a: Option<SocketAddr>| match a {
            Some(a) => format!("\"{a}\""),
            None => "null".to_string(),
        };
        format!(
            "{{\"event\":\"ready\",\"component\":\"proxy\",\"http\":{},\"socks5\":{},\"admin\":{}}}",
            fmt(self.http),
            fmt(self.socks5),
            fmt(self.admin)
        )
    }
}

/// Binds one listener (done for all of them before anything else starts).
pub async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, String> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(|e| format!("{what}: cannot create socket: {e}"))?;
    socket
        .set_reuseaddr(true)
        .map_err(|e| format!("{what}: {e}"))?;
    socket
        .bind(addr)
        .map_err(|e| format!("{what}: cannot bind {addr}: {e}"))?;
    socket
        .listen(4096)
        .map_err(|e| format!("{what}: cannot listen on {addr}: {e}"))
}

pub use crate::report::metrics::Listener as ListenerKind;

/// Holds one client connection's place under `limits.max_connections` and its gauge; tunnels
/// that outlive the HTTP exchange keep a clone, so the slot is freed only when the client
/// connection really ends.
pub struct ConnSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _active: crate::report::metrics::ActiveGuard,
}

/// Shared handle to a [`ConnSlot`].
pub type ConnGuard = Arc<ConnSlot>;

/// Accepts connections until shutdown, handing each to `serve` while the connection limit
/// allows; beyond it, `reject` gets the stream (best-effort answer) and it is closed.
pub async fn accept_loop<S, F, R, RF>(
    shared: Arc<Shared>,
    listener: TcpListener,
    kind: ListenerKind,
    gate: Arc<Semaphore>,
    serve: S,
    reject: R,
) where
    S: Fn(Arc<Shared>, TcpStream, SocketAddr, ConnGuard) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
    R: Fn(TcpStream) -> RF + Send + Sync + 'static,
    RF: Future<Output = ()> + Send + 'static,
{
    let mut shutdown = shared.shutdown_signal();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait() => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                if is_resource_error(&e) {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                continue;
            }
        };
        let metrics = shared.metrics_arc();
        match gate.clone().try_acquire_owned() {
            Ok(permit) => {
                let guard = Arc::new(ConnSlot {
                    _permit: permit,
                    _active: metrics.connection_opened(kind),
                });
                let conn = serve(shared.clone(), stream, peer, guard);
                match crate::telemetry::connection_span(&shared, kind, peer) {
                    Some(span) => tokio::spawn(tracing::Instrument::instrument(conn, span)),
                    None => tokio::spawn(conn),
                };
            }
            Err(_) => {
                metrics.connection_rejected(kind);
                tokio::spawn(reject(stream));
            }
        }
    }
}

fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the resulting soft limit.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                return wanted.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}
