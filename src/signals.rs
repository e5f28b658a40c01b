//! The process signals both binaries handle the same way: SIGINT/SIGTERM end the process
//! gracefully, SIGHUP reloads (config for the proxy, rules for the control plane).

use tokio::signal::unix::{Signal, SignalKind, signal};

/// SIGINT, SIGTERM (shutdown) and SIGHUP (reload) streams, installed before the ready line so
/// a signal sent right after it is never lost to the default action.
pub struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    /// Installs the three handlers.
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Returns on SIGINT or SIGTERM; runs `on_hup` for every SIGHUP meanwhile.
    pub async fn wait_for_shutdown<F, Fut>(mut self, mut on_hup: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        loop {
            tokio::select! {
                _ = self.int.recv() => return,
                _ = self.term.recv() => return,
                _ = self.hup.recv() => on_hup().await,
            }
        }
    }
}
