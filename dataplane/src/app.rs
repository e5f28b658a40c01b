//! The running proxy as the admin API and signals see it: reload, mode, effective config.

use std::path::PathBuf;
use std::sync::Arc;

use portcullis::config::{Config, ProxyOverrides};

use crate::state::{Runtime, Settings, Shared};

/// Why a reload did not happen.
#[derive(Debug)]
pub enum ReloadError {
    /// Another reload is running.
    InProgress,
    /// The file is invalid or changes an immutable key; the message says which.
    Invalid(String),
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::InProgress => f.write_str("reload in progress"),
            ReloadError::Invalid(m) => f.write_str(m),
        }
    }
}

/// Reload and runtime-mode control over the shared state.
pub struct App {
    shared: Arc<Shared>,
    config_path: Option<PathBuf>,
    overrides: ProxyOverrides,
    reload_lock: tokio::sync::Mutex<()>,
    admin_token: Option<String>,
}

impl App {
    /// Wraps the shared state.
    pub fn new(
        shared: Arc<Shared>,
        config_path: Option<PathBuf>,
        overrides: ProxyOverrides,
        admin_token: Option<String>,
    ) -> App {
        App {
            shared,
            config_path,
            overrides,
            reload_lock: tokio::sync::Mutex::new(()),
            admin_token,
        }
    }

    /// The shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Checks `Authorization: Bearer <token>` when an admin token is configured.
    pub fn admin_authorized(&self, headers: &http::HeaderMap) -> bool {
        let Some(token) = &self.admin_token else {
            return true;
        };
        let Some(value) = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let Some((scheme, given)) = value.split_once(' ') else {
            return false;
        };
        scheme.eq_ignore_ascii_case("bearer")
            && portcullis::secret::constant_time_eq(given.as_bytes(), token.as_bytes())
    }

    /// Re-reads the config file (or the embedded defaults), re-applies the flags, and swaps
    /// the result in atomically; on any error the running configuration stays.
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let Ok(_guard) = self.reload_lock.try_lock() else {
            return Err(ReloadError::InProgress);
        };
        let config = load_config(self.config_path.as_deref(), &self.overrides)
            .map_err(ReloadError::Invalid)?;
        let current = self.shared.runtime();
        Config::reload_check(&current.config, &config).map_err(ReloadError::Invalid)?;
        let mut runtime = build_runtime(config).map_err(ReloadError::Invalid)?;
        if current.snapshot_version.is_some() {
            // Attached: the policy keys come from the snapshot, not from the file (config.md §4).
            runtime.policy = current.policy.clone();
            runtime.unix = current.unix.clone();
            runtime.snapshot_version = current.snapshot_version;
            let (n, c) = (&mut runtime.config.network, &current.config.network);
            n.mode = c.mode;
            n.allow_local_binding = c.allow_local_binding;
            n.dangerously_allow_all_unix_sockets = c.dangerously_allow_all_unix_sockets;
            n.allow_upstream_proxy &= c.allow_upstream_proxy;
        }
        self.shared
            .reporter()
            .resize_blocked_log(runtime.config.limits.blocked_log_size as usize);
        self.shared.swap_runtime(runtime);
        tracing::info!("configuration reloaded");
        Ok(())
    }

    /// `POST /mode`: switches full/limited until the next reload.
    pub fn set_mode(&self, limited: bool) -> Result<(), String> {
        let current = self.shared.runtime();
        if current.snapshot_version.is_some() {
            return Err("mode is managed by the control plane".into());
        }
        let mut config = current.config.clone();
        config.network.mode = if limited {
            portcullis::config::Mode::Limited
        } else {
            portcullis::config::Mode::Full
        };
        let runtime = build_runtime(config)?;
        self.shared.swap_runtime(runtime);
        Ok(())
    }

    /// `GET /config`.
    pub fn config_json(&self) -> String {
        let rt = self.shared.runtime();
        let bound = self.shared.bound();
        let mut value = rt.config.to_json();
        if let serde_json::Value::Object(map) = &mut value {
            if let Some(serde_json::Value::Object(network)) = map.get_mut("network") {
                // Lists as enforced: normalised and de-duplicated.
                network.insert(
                    "allowed_domains".into(),
                    rt.policy.allowed_patterns().into(),
                );
                network.insert("denied_domains".into(), rt.policy.denied_patterns().into());
            }
            if let (Some(serde_json::Value::Object(m)), Some(prepared)) =
                (map.get_mut("mitm"), self.shared.mitm())
            {
                let path = |p: &std::path::Path| p.display().to_string();
                m.insert("ca_cert_path".into(), path(prepared.ca_cert_path()).into());
                m.insert(
                    "ca_bundle_path".into(),
                    path(prepared.ca_bundle_path()).into(),
                );
            }
            if let Some(serde_json::Value::Object(control)) = map.get_mut("control") {
                control.insert(
                    "attached".into(),
                    serde_json::Value::Bool(rt.snapshot_version.is_some()),
                );
                control.insert("policy_version".into(), rt.snapshot_version.into());
            }
            map.insert(
                "listeners".into(),
                serde_json::json!({
                    "http": bound.http.map(|a| a.to_string()),
                    "socks5": bound.socks5.map(|a| a.to_string()),
                    "admin": bound.admin.map(|a| a.to_string()),
                }),
            );
        }
        value.to_string()
    }

    /// `GET /patterns`.
    pub fn patterns_json(&self) -> String {
        let rt = self.shared.runtime();
        let mut allowed = rt.policy.allowed_patterns();
        let mut denied = rt.policy.denied_patterns();
        allowed.sort();
        denied.sort();
        serde_json::json!({
            "source": if rt.snapshot_version.is_some() { "control" } else { "config" },
            "version": rt.snapshot_version,
            "allowed": allowed,
            "denied": denied,
            "unix_sockets": {"allow": [], "deny": []},
            "session_allows": [],
        })
        .to_string()
    }
}

/// Loads the file (or the embedded defaults) and applies the flags; the message is the one
/// to print (`config error: …` / `usage error: …`).
pub fn load_config(
    path: Option<&std::path::Path>,
    overrides: &ProxyOverrides,
) -> Result<Config, String> {
    let mut config = match path {
        Some(p) => Config::load(p).map_err(|e| e.to_string())?,
        None => Config::embedded().map_err(|e| e.to_string())?,
    };
    config
        .apply_proxy_overrides(overrides)
        .map_err(|e| e.to_string())?;
    Ok(config)
}

/// Compiles a validated config into a runtime (policy, resolver, settings).
pub fn build_runtime(config: Config) -> Result<Runtime, String> {
    let policy = crate::policy_build::compile(&config)?;
    let resolver = crate::resolve::Resolver::new(&config.network.dns_servers);
    let n = &config.network;
    let unix = crate::unix_socket::UnixPolicy {
        allow_all: n.dangerously_allow_all_unix_sockets,
        allow: n
            .allow_unix_sockets
            .iter()
            .map(|e| PathBuf::from(&e.value))
            .collect(),
        deny: n
            .deny_unix_sockets
            .iter()
            .map(|e| PathBuf::from(&e.value))
            .collect(),
    };
    Ok(Runtime {
        snapshot_version: None,
        unix,
        settings: Settings::from_config(&config),
        policy,
        resolver,
        config,
    })
}
