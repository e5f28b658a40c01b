//! Runs a tunnel with its bookkeeping: active-tunnel gauge, byte counters, idle timeout, and
//! the shutdown grace period. Every tunnel kind goes through here into [`crate::tunnel::relay`].

use std::sync::Arc;

use portcullis::decision::Protocol;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::report::metrics::Metrics;
use crate::state::Shared;
use crate::tunnel::{self, ByteSink};

struct TunnelBytes {
    metrics: Arc<Metrics>,
    protocol: Protocol,
}

impl ByteSink for TunnelBytes {
    fn upstream(&self, n: u64) {
        self.metrics.bytes(self.protocol, true, n);
    }
    fn downstream(&self, n: u64) {
        self.metrics.bytes(self.protocol, false, n);
    }
}

/// Relays between `client` and `upstream` until done, idle, or the shutdown grace ends; two
/// plain TCP sockets take the zero-copy path of [`crate::splice`].
pub async fn run<C, U>(shared: &Arc<Shared>, protocol: Protocol, client: &mut C, upstream: &mut U)
where
    C: AsyncRead + AsyncWrite + Unpin + 'static,
    U: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let idle = shared.settings().tunnel_idle_timeout;
    #[cfg(target_os = "linux")]
    if let (Some(c), Some(u)) = (
        (&*client as &dyn std::any::Any).downcast_ref::<TcpStream>(),
        (&*upstream as &dyn std::any::Any).downcast_ref::<TcpStream>(),
    ) {
        supervise(shared, protocol, |sink| {
            crate::splice::relay(c, u, idle, sink)
        })
        .await;
        return;
    }
    supervise(shared, protocol, |sink| {
        tunnel::relay(client, upstream, idle, sink)
    })
    .await;
}

/// Runs one relay with the bookkeeping every tunnel shares.
async fn supervise<'a, F, Fut>(shared: &Arc<Shared>, protocol: Protocol, start: F)
where
    F: FnOnce(Arc<dyn ByteSink>) -> Fut,
    Fut: std::future::Future<Output = (tunnel::Transferred, std::io::Result<()>)> + 'a,
{
    let metrics = shared.metrics_arc();
    let _active = metrics.tunnel_opened(protocol);
    let settings = shared.settings();
    let sink = Arc::new(TunnelBytes {
        metrics: metrics.clone(),
        protocol,
    });
    let mut shutdown = shared.shutdown_signal();
    let mut limited = shared.limited_signal();
    let relay = start(sink);
    tokio::pin!(relay);
    tokio::select! {
        (moved, result) = &mut relay => {
            if let Err(e) = result {
                tracing::debug!(?protocol, error = %e, up = moved.upstream, down = moved.downstream, "tunnel closed");
            }
        }
        _ = limited.changed() => {
            tracing::debug!(?protocol, "tunnel closed: the proxy switched to limited mode");
        }
        _ = async {
            shutdown.wait().await;
            tokio::time::sleep(settings.shutdown_grace).await;
        } => {
            tracing::debug!(?protocol, "tunnel closed at the end of the shutdown grace period");
        }
    }
}
