//! HTTPS interception (`http.md` §9): the CA, the exported trust files, per-host leaves, and
//! the TLS-terminating inner HTTP server that judges every request like a plain one.
//!
//! Interception happens only where the Decision calls for it: limited mode with
//! `network.mitm = true` (CONNECT, and SOCKS5 TCP to port 443). Everything else stays a raw
//! tunnel.

pub mod ca;
pub mod files;
pub mod handshake;
pub mod leaf;
pub mod serve;

use std::sync::Arc;

use portcullis::config::Config;
use portcullis::policy::Host;
use rustls::ServerConfig;

use crate::state::Shared;

/// Everything interception needs, prepared once at startup.
pub struct Mitm {
    ca: ca::Ca,
    leaves: leaf::LeafCache,
    exported: files::Exported,
}

impl Mitm {
    /// Loads or generates the CA and writes `ca.pem` / `ca-bundle.pem` (before the ready line).
    pub fn prepare(
        config: &Config,
        proxy_id: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Mitm, String> {
        let ca = ca::Ca::prepare(&config.mitm, proxy_id)?;
        let exported = files::export(config.mitm.out_dir.as_deref(), &ca.cert_pem, env)?;
        tracing::info!(
            ca = %exported.ca_cert_path.display(),
            bundle = %exported.ca_bundle_path.display(),
            "HTTPS interception prepared"
        );
        Ok(Mitm {
            ca,
            leaves: leaf::LeafCache::new(config.mitm.leaf_cache_size as usize),
            exported,
        })
    }

    /// Path of the exported CA certificate.
    pub fn ca_cert_path(&self) -> &std::path::Path {
        &self.exported.ca_cert_path
    }

    /// Path of the exported bundle.
    pub fn ca_bundle_path(&self) -> &std::path::Path {
        &self.exported.ca_bundle_path
    }

    /// The TLS server configuration (cached leaf) for `host`.
    pub fn server_config(&self, host: &Host) -> Result<Arc<ServerConfig>, String> {
        let key = host.to_string();
        self.leaves
            .get_or_make(&key, || leaf::make_server_config(&self.ca, host))
    }

    /// Removes the generated files (clean shutdown).
    pub fn cleanup(&self) {
        self.exported.remove();
    }
}

/// Whether a request the pipeline just allowed must be intercepted: limited mode with MITM
/// prepared (`http.md` §9 rule 2). `None` = raw tunnel.
pub fn required(shared: &Shared) -> Option<Arc<Mitm>> {
    let mitm = shared.mitm()?;
    let rt = shared.runtime();
    (rt.policy.limited() && rt.config.network.mitm).then(|| mitm.clone())
}
