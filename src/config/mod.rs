//! Configuration (`config.md`): the typed model with every default, TOML parsing with
//! `PATH:LINE:COLUMN` errors, listener addresses and clamping, flag overrides, reload checks and
//! the JSON view served by the admin `GET /config`.
//!
//! Pattern *syntax* belongs to the policy compiler; this module stores every pattern with its key
//! path and offers [`Config::validate_with`] so the compiler's parser and normaliser can be
//! plugged in and its errors attributed to the key (`network.allowed_domains[3]`).

mod address;
mod error;
mod model;
mod overrides;
mod parse;
mod validate;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use address::{
    ClampedListeners, ListenerKind, ListenerRequest, clamp_control_listener, clamp_listeners,
    listeners_conflict, parse_listener_addr,
};
pub use error::{ConfigError, Position, SettingsError, UsageError};
pub use model::*;
pub use overrides::ProxyOverrides;
pub use parse::IntRange;
pub use validate::{
    MAX_PATTERN_CHARS, MAX_UNIX_PATH_BYTES, check_control_endpoint, check_dns_server,
    check_pattern, check_session_id, check_unix_path, check_url,
};

/// The embedded default configuration: exactly the defaults of the tables (`config.md` §1).
pub const DEFAULT_CONFIG_TOML: &str = include_str!("default.toml");

/// Label used in messages for the embedded defaults.
pub const EMBEDDED_LABEL: &str = "<embedded defaults>";

/// Largest configuration file accepted (rule 1).
pub const MAX_CONFIG_BYTES: u64 = 64 * 1024 * 1024;

/// The whole configuration. Equality ignores where values came from.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// `state_dir` as configured (none = from the environment, see [`Config::state_dir`]).
    #[serde(serialize_with = "ser::opt_path")]
    pub state_dir: Option<PathBuf>,
    /// `[network]`.
    pub network: NetworkConfig,
    /// `[limits]`.
    pub limits: LimitsConfig,
    /// `[mitm]`.
    pub mitm: MitmConfig,
    /// `[control]`.
    pub control: ControlConfig,
    /// `[approvals]`.
    pub approvals: ApprovalsConfig,
    /// `[requirements]`.
    pub requirements: RequirementsConfig,
    /// `[audit]`.
    pub audit: AuditConfig,
    /// File label for messages.
    #[serde(skip)]
    origin: String,
    /// Positions of the scalar keys read from the file.
    #[serde(skip)]
    positions: BTreeMap<String, Position>,
    /// Keys set by a flag, with the flag (errors about them are usage errors).
    #[serde(skip)]
    flags: BTreeMap<String, &'static str>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: None,
            network: NetworkConfig::default(),
            limits: LimitsConfig::default(),
            mitm: MitmConfig::default(),
            control: ControlConfig::default(),
            approvals: ApprovalsConfig::default(),
            requirements: RequirementsConfig::default(),
            audit: AuditConfig::default(),
            origin: EMBEDDED_LABEL.to_string(),
            positions: BTreeMap::new(),
            flags: BTreeMap::new(),
        }
    }
}

impl PartialEq for Config {
    fn eq(&self, o: &Config) -> bool {
        self.state_dir == o.state_dir
            && self.network == o.network
            && self.limits == o.limits
            && self.mitm == o.mitm
            && self.control == o.control
            && self.approvals == o.approvals
            && self.requirements == o.requirements
            && self.audit == o.audit
    }
}

impl Eq for Config {}

/// Which policy list a hook call is about (see [`Config::validate_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PatternList {
    /// `allowed_domains` / `allow` entries of `[network.domains]` / `--allow`.
    AllowedDomains,
    /// `denied_domains` / `deny` entries of `[network.domains]` / `--deny`.
    DeniedDomains,
    /// `allow_unix_sockets` / `allow` entries of `[network.unix_sockets]`.
    AllowUnixSockets,
    /// `deny` entries of `[network.unix_sockets]`.
    DenyUnixSockets,
}

/// One entry after the hook: its normalised text and the original entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedEntry {
    /// What the hook returned (the canonical spelling).
    pub normalized: String,
    /// The entry as configured.
    pub entry: ListEntry,
}

/// The policy lists after [`Config::validate_with`]: validated, normalised, de-duplicated
/// (rule 8), with the WARN lines to log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NormalizedLists {
    /// Allowlist.
    pub allowed_domains: Vec<NormalizedEntry>,
    /// Denylist.
    pub denied_domains: Vec<NormalizedEntry>,
    /// Allowed unix-socket paths.
    pub allow_unix_sockets: Vec<NormalizedEntry>,
    /// Denied unix-socket paths.
    pub deny_unix_sockets: Vec<NormalizedEntry>,
    /// WARN lines (map-form conflicts resolved as deny).
    pub warnings: Vec<String>,
}

impl Config {
    /// The embedded defaults, parsed (equal to [`Config::default`]).
    pub fn embedded() -> Result<Config, ConfigError> {
        Config::from_toml_str(DEFAULT_CONFIG_TOML, EMBEDDED_LABEL)
    }

    /// Parses and validates TOML text; `path_label` names the file in messages.
    pub fn from_toml_str(text: &str, path_label: &str) -> Result<Config, ConfigError> {
        let cfg = parse::parse_document(text, path_label)?;
        match cfg.validate() {
            Ok(()) => Ok(cfg),
            Err(SettingsError::Config(e)) => Err(e),
            Err(SettingsError::Usage(u)) => Err(ConfigError::file(path_label, None, u.problem)),
        }
    }

    /// Like [`Config::from_toml_str`] for raw bytes (rule 1: must be UTF-8).
    pub fn from_toml_bytes(bytes: &[u8], path_label: &str) -> Result<Config, ConfigError> {
        match std::str::from_utf8(bytes) {
            Ok(text) => Config::from_toml_str(text, path_label),
            Err(e) => {
                let valid = bytes.get(..e.valid_up_to()).unwrap_or(&[]);
                let prefix = std::str::from_utf8(valid).unwrap_or("");
                let pos = Position::from_offset(prefix, prefix.len());
                Err(ConfigError::file(
                    path_label,
                    Some(pos),
                    "config file is not valid UTF-8",
                ))
            }
        }
    }

    /// Reads and validates a file (at most 64 MiB, UTF-8).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let label = path.display().to_string();
        let read_err = |e: std::io::Error| {
            ConfigError::file(
                &label,
                None,
                format!("cannot read config file: {}", io_message(&e)),
            )
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        if meta.is_dir() {
            return Err(ConfigError::file(
                &label,
                None,
                "cannot read config file: Is a directory",
            ));
        }
        let mut bytes = Vec::new();
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::file(
                &label,
                None,
                "config file is larger than 64 MiB",
            ));
        }
        Config::from_toml_bytes(&bytes, &label)
    }

    /// The label of the file this configuration came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// An error about `key`: a usage error naming the flag when a flag set it, else a config
    /// error with the key's position when known.
    fn key_error(&self, key: &str, problem: impl Into<String>) -> SettingsError {
        match self.flags.get(key) {
            Some(flag) => UsageError::new(*flag, problem).into(),
            None => ConfigError::new(
                self.origin.clone(),
                self.positions.get(key).copied(),
                key,
                problem,
            )
            .into(),
        }
    }

    fn entry_error(&self, entry: &ListEntry, problem: impl Into<String>) -> SettingsError {
        match &entry.source {
            EntrySource::File { key, position } => {
                ConfigError::new(self.origin.clone(), *position, key.clone(), problem).into()
            }
            EntrySource::Flag(f) => UsageError::new(*f, problem).into(),
        }
    }

    /// Cross-key checks (pairs, listener conflicts, related limits). Per-key checks happen
    /// while parsing and while applying flags.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let n = &self.network;
        // Rule 13: pairs.
        let pairs: [(&str, bool, &str, bool); 2] = [
            (
                "network.socks_username",
                n.socks_username.is_some(),
                "network.socks_password_file",
                n.socks_password_file.is_some(),
            ),
            (
                "mitm.ca_cert_file",
                self.mitm.ca_cert_file.is_some(),
                "mitm.ca_key_file",
                self.mitm.ca_key_file.is_some(),
            ),
        ];
        for (a, a_set, b, b_set) in pairs {
            if a_set && !b_set {
                return Err(self.key_error(a, format!("set together with {b}")));
            }
            if b_set && !a_set {
                return Err(self.key_error(b, format!("set together with {a}")));
            }
        }
        // Rule 11: listener conflicts, on the addresses actually bound.
        let l = self.listeners();
        let mut bound = vec![("network.proxy_url", l.http)];
        if let Some(s) = l.socks5 {
            bound.push(("network.socks_url", s));
        }
        if let Some(a) = l.admin {
            bound.push(("network.admin_url", a));
        }
        for (j, (kj, aj)) in bound.iter().enumerate() {
            for (ki, ai) in bound.iter().take(j) {
                if listeners_conflict(*ai, *aj) {
                    return Err(self.key_error(kj, format!("conflicts with {ki} ({ai})")));
                }
            }
        }
        let c = &self.control;
        if c.reconnect_max_ms < c.reconnect_initial_ms {
            return Err(self.key_error(
                "control.reconnect_max_ms",
                format!(
                    "must be at least control.reconnect_initial_ms ({})",
                    c.reconnect_initial_ms
                ),
            ));
        }
        let r = &self.requirements;
        if r.token_file.is_some() && r.token_env.is_some() {
            return Err(self.key_error(
                "requirements.token_env",
                "cannot be combined with requirements.token_file; set one",
            ));
        }
        let a = &self.audit;
        if let (Some(batch), Some(queue)) = (a.max_export_batch_size, a.max_queue_size)
            && batch > queue
        {
            return Err(self.key_error(
                "audit.max_export_batch_size",
                format!("must not exceed audit.max_queue_size ({queue})"),
            ));
        }
        Ok(())
    }

    /// Checks that need the environment: an explicit `requirements.token_env` must name a set
    /// variable (`requirements.md` §1). `lookup` reads a variable.
    pub fn check_environment(
        &self,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        if let Some(var) = &self.requirements.token_env
            && lookup(var).is_none()
        {
            return Err(ConfigError::new(
                self.origin.clone(),
                self.positions.get("requirements.token_env").copied(),
                "requirements.token_env",
                format!("requirements.token_env names {var}, which is not set"),
            ));
        }
        Ok(())
    }

    /// Runs every pattern and socket path through `hook(list, key, text)`, which returns the
    /// normalised spelling or the PROBLEM text (`invalid pattern "a..b": empty label`); the
    /// error is attributed to the entry's key (or flag). Then applies rule 8: normalised
    /// duplicates within a list collapse silently (first kept); in the map forms a pattern
    /// allowed and denied under two spellings is denied, with one WARN naming both.
    pub fn validate_with(
        &self,
        hook: &dyn Fn(PatternList, &str, &str) -> Result<String, String>,
    ) -> Result<NormalizedLists, SettingsError> {
        let n = &self.network;
        let run = |list: PatternList,
                   entries: &[ListEntry]|
         -> Result<Vec<NormalizedEntry>, SettingsError> {
            let mut seen = std::collections::HashSet::new();
            let mut out = Vec::with_capacity(entries.len());
            for e in entries {
                let normalized =
                    hook(list, e.key(), &e.value).map_err(|p| self.entry_error(e, p))?;
                if seen.insert(normalized.clone()) {
                    out.push(NormalizedEntry {
                        normalized,
                        entry: e.clone(),
                    });
                }
            }
            Ok(out)
        };
        let mut lists = NormalizedLists {
            allowed_domains: run(PatternList::AllowedDomains, &n.allowed_domains)?,
            denied_domains: run(PatternList::DeniedDomains, &n.denied_domains)?,
            allow_unix_sockets: run(PatternList::AllowUnixSockets, &n.allow_unix_sockets)?,
            deny_unix_sockets: run(PatternList::DenyUnixSockets, &n.deny_unix_sockets)?,
            warnings: Vec::new(),
        };
        if n.domains_form == Form::Map {
            resolve_map_conflicts(
                "network.domains",
                &mut lists.allowed_domains,
                &lists.denied_domains,
                &mut lists.warnings,
            );
        }
        if n.unix_sockets_form == Form::Map {
            resolve_map_conflicts(
                "network.unix_sockets",
                &mut lists.allow_unix_sockets,
                &lists.deny_unix_sockets,
                &mut lists.warnings,
            );
        }
        Ok(lists)
    }

    /// The data-plane listener addresses after clamping (`config.md` §3 step 5), with the WARN
    /// lines to log.
    pub fn listeners(&self) -> ClampedListeners {
        let n = &self.network;
        clamp_listeners(&ListenerRequest {
            http: n.proxy_url,
            socks5: n.enable_socks5.then_some(n.socks_url),
            admin: n.enable_admin.then_some(n.admin_url),
            dangerously_allow_non_loopback_proxy: n.dangerously_allow_non_loopback_proxy,
            unix_sockets_allowed: n.any_unix_socket_allowed(),
        })
    }

    /// The state directory: `state_dir`, else `$XDG_STATE_HOME/portcullis`, else
    /// `$HOME/.local/state/portcullis`; an error only when none is available.
    pub fn state_dir(&self) -> Result<PathBuf, ConfigError> {
        self.state_dir_from(&|v| std::env::var_os(v).map(PathBuf::from))
    }

    /// [`Config::state_dir`] with an explicit environment lookup (testable).
    pub fn state_dir_from(
        &self,
        env: &dyn Fn(&str) -> Option<PathBuf>,
    ) -> Result<PathBuf, ConfigError> {
        if let Some(d) = &self.state_dir {
            return Ok(d.clone());
        }
        let nonempty = |v: &str| env(v).filter(|p| !p.as_os_str().is_empty());
        if let Some(x) = nonempty("XDG_STATE_HOME").filter(|p| p.is_absolute()) {
            return Ok(x.join("portcullis"));
        }
        if let Some(h) = nonempty("HOME") {
            return Ok(h.join(".local/state/portcullis"));
        }
        Err(ConfigError::new(
            self.origin.clone(),
            None,
            "state_dir",
            "no state directory: set state_dir, XDG_STATE_HOME or HOME",
        ))
    }

    /// `control.token_file`, default `<state_dir>/control.token`.
    pub fn control_token_file(&self) -> Result<PathBuf, ConfigError> {
        match &self.control.token_file {
            Some(p) => Ok(p.clone()),
            None => Ok(self.state_dir()?.join("control.token")),
        }
    }

    /// `control.rules`, default `<state_dir>/portcullis.rules`.
    pub fn rules_file(&self) -> Result<PathBuf, ConfigError> {
        match &self.control.rules {
            Some(p) => Ok(p.clone()),
            None => Ok(self.state_dir()?.join("portcullis.rules")),
        }
    }

    /// `requirements.cache_file`, default `<state_dir>/requirements.cache.json`.
    pub fn requirements_cache_file(&self) -> Result<PathBuf, ConfigError> {
        match &self.requirements.cache_file {
            Some(p) => Ok(p.clone()),
            None => Ok(self.state_dir()?.join("requirements.cache.json")),
        }
    }

    /// Applies `portcullis-proxy` flags (`config.md` §4) and re-validates the whole result.
    /// Errors about a flag value are usage errors naming the flag.
    pub fn apply_proxy_overrides(&mut self, o: &ProxyOverrides) -> Result<(), SettingsError> {
        overrides::apply(self, o)?;
        self.validate()
    }

    /// `config.md` §5.3: the first key that cannot change on a running proxy, as the message
    /// `network.proxy_url cannot change on a running proxy; restart it`.
    pub fn reload_check(old: &Config, new: &Config) -> Result<(), String> {
        let (a, b) = (&old.network, &new.network);
        let (m, n) = (&old.mitm, &new.mitm);
        let (c, d) = (&old.control, &new.control);
        let (x, y) = (&old.audit, &new.audit);
        let changes: [(&str, bool); 37] = [
            ("network.proxy_url", a.proxy_url != b.proxy_url),
            ("network.socks_url", a.socks_url != b.socks_url),
            ("network.admin_url", a.admin_url != b.admin_url),
            ("network.enable_socks5", a.enable_socks5 != b.enable_socks5),
            ("network.enable_admin", a.enable_admin != b.enable_admin),
            (
                "network.dangerously_allow_non_loopback_proxy",
                a.dangerously_allow_non_loopback_proxy != b.dangerously_allow_non_loopback_proxy,
            ),
            ("network.mitm", a.mitm != b.mitm),
            ("mitm.ca_cert_file", m.ca_cert_file != n.ca_cert_file),
            ("mitm.ca_key_file", m.ca_key_file != n.ca_key_file),
            (
                "mitm.create_ca_files",
                m.create_ca_files != n.create_ca_files,
            ),
            ("mitm.out_dir", m.out_dir != n.out_dir),
            (
                "mitm.leaf_cache_size",
                m.leaf_cache_size != n.leaf_cache_size,
            ),
            (
                "mitm.extra_upstream_ca_files",
                m.extra_upstream_ca_files != n.extra_upstream_ca_files,
            ),
            ("control.endpoint", c.endpoint != d.endpoint),
            ("control.token_file", c.token_file != d.token_file),
            ("control.session_id", c.session_id != d.session_id),
            (
                "control.attach_timeout_secs",
                c.attach_timeout_secs != d.attach_timeout_secs,
            ),
            (
                "control.reconnect_initial_ms",
                c.reconnect_initial_ms != d.reconnect_initial_ms,
            ),
            (
                "control.reconnect_max_ms",
                c.reconnect_max_ms != d.reconnect_max_ms,
            ),
            ("control.event_buffer", c.event_buffer != d.event_buffer),
            ("control.listen", c.listen != d.listen),
            ("control.unix_socket", c.unix_socket != d.unix_socket),
            ("control.rules", c.rules != d.rules),
            (
                "control.dangerously_allow_non_loopback",
                c.dangerously_allow_non_loopback != d.dangerously_allow_non_loopback,
            ),
            ("control.watch_buffer", c.watch_buffer != d.watch_buffer),
            ("audit.exporter", x.exporter != y.exporter),
            ("audit.protocol", x.protocol != y.protocol),
            ("audit.endpoint", x.endpoint != y.endpoint),
            ("audit.headers", x.headers != y.headers),
            ("audit.timeout_ms", x.timeout_ms != y.timeout_ms),
            ("audit.ca_file", x.ca_file != y.ca_file),
            ("audit.max_queue_size", x.max_queue_size != y.max_queue_size),
            (
                "audit.max_export_batch_size",
                x.max_export_batch_size != y.max_export_batch_size,
            ),
            (
                "audit.scheduled_delay_ms",
                x.scheduled_delay_ms != y.scheduled_delay_ms,
            ),
            (
                "audit.shutdown_timeout_ms",
                x.shutdown_timeout_ms != y.shutdown_timeout_ms,
            ),
            ("audit.traces", x.traces != y.traces),
            ("audit.resource", x.resource != y.resource),
        ];
        if let Some((key, _)) = changes.iter().find(|(_, changed)| *changed) {
            return Err(format!(
                "{key} cannot change on a running proxy; restart it"
            ));
        }
        // Adding an allowed unix socket while a listener is non-loopback.
        let running = old.listeners();
        let non_loopback = !running.http.ip().is_loopback()
            || running.socks5.is_some_and(|s| !s.ip().is_loopback());
        if non_loopback && !a.any_unix_socket_allowed() && b.any_unix_socket_allowed() {
            let key = if b.dangerously_allow_all_unix_sockets {
                "network.dangerously_allow_all_unix_sockets"
            } else if b.unix_sockets_form == Form::Map {
                "network.unix_sockets"
            } else {
                "network.allow_unix_sockets"
            };
            return Err(format!(
                "{key} cannot allow unix sockets on a running proxy with a non-loopback \
                 listener; restart it"
            ));
        }
        Ok(())
    }

    /// The effective configuration as JSON for the admin `GET /config`: policy lists in list
    /// form, file paths only, secrets (audit header values) redacted.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// Map form, rule 8: an allow entry whose normalised form is also denied is dropped (deny
/// wins) with one WARN naming both spellings.
fn resolve_map_conflicts(
    table: &str,
    allow: &mut Vec<NormalizedEntry>,
    deny: &[NormalizedEntry],
    warnings: &mut Vec<String>,
) {
    let denied: HashMap<&str, &str> = deny
        .iter()
        .map(|d| (d.normalized.as_str(), d.entry.value.as_str()))
        .collect();
    allow.retain(|a| match denied.get(a.normalized.as_str()) {
        Some(d) if matches!(a.entry.source, EntrySource::File { .. }) => {
            warnings.push(error::sanitize(
                &format!(
                    "{table}: {} = \"allow\" and {} = \"deny\" are the same pattern; deny wins",
                    error::quoted(&a.entry.value),
                    error::quoted(d)
                ),
                4096,
            ));
            false
        }
        _ => true,
    });
}

/// `io::Error` text without the ` (os error N)` suffix.
fn io_message(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s.get(..i).unwrap_or(&s).to_string(),
        None => s,
    }
}

/// Serde helpers: paths as (lossy) strings so the JSON view never fails.
pub(crate) mod ser {
    use std::path::PathBuf;

    use serde::Serializer;

    pub fn opt_path<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        match p {
            Some(p) => s.serialize_str(&p.to_string_lossy()),
            None => s.serialize_none(),
        }
    }

    pub fn path_vec<S: Serializer>(v: &[PathBuf], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|p| p.to_string_lossy()))
    }
}

/// Variables that name a full trust bundle (env.md §3): `exec` points them at the MITM bundle,
/// and the sidecar merges the files they named into that bundle.
pub const CA_BUNDLE_VARS: [&str; 11] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "PIP_CERT",
    "BUNDLE_SSL_CA_CERT",
    "npm_config_cafile",
    "NPM_CONFIG_CAFILE",
    "AWS_CA_BUNDLE",
    "CARGO_HTTP_CAINFO",
    "DENO_CERT",
];

/// Variables that name the interception CA alone (env.md §3).
pub const CA_ALONE_VARS: [&str; 2] = ["NODE_EXTRA_CA_CERTS", "PORTCULLIS_CA_CERTIFICATE"];
