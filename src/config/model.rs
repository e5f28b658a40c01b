//! The typed configuration model. Every default is the value of the tables in `config.md` §1,
//! `control.md` §12, `requirements.md` §1 and `audit.md` §6.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use serde::{Serialize, Serializer};

use super::error::Position;

/// `network.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every method allowed.
    #[default]
    Full,
    /// Read-only methods only.
    Limited,
}

impl Mode {
    /// `"full"` or `"limited"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Limited => "limited",
        }
    }

    /// Parses `full` / `limited` (exact spelling).
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "full" => Some(Mode::Full),
            "limited" => Some(Mode::Limited),
            _ => None,
        }
    }
}

/// Where a list entry (pattern or socket path) came from, for error attribution.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EntrySource {
    /// The configuration file: full key path (`network.allowed_domains[3]`,
    /// `network.domains."*.x"`) and the position of the value (or map key) when known.
    File {
        /// Full key path.
        key: String,
        /// Position in the file.
        position: Option<Position>,
    },
    /// A command-line flag (`--allow`, `--deny`).
    Flag(&'static str),
}

/// One pattern or unix-socket path, as written, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListEntry {
    /// The text as given (not normalised).
    pub value: String,
    /// Origin for error messages.
    pub source: EntrySource,
}

impl ListEntry {
    /// The key path for messages (`network.allowed_domains[3]`) or the flag (`--allow`).
    pub fn key(&self) -> &str {
        match &self.source {
            EntrySource::File { key, .. } => key,
            EntrySource::Flag(f) => f,
        }
    }
}

impl Serialize for ListEntry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.value)
    }
}

/// Which syntax supplied a policy family's entries in the file (rule 5: never both; the mixing
/// check itself happens while parsing, where an empty list still counts). An empty list leaves
/// the form `Absent`, so a file spelling out the defaults equals [`NetworkConfig::default`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Form {
    /// Neither key present.
    #[default]
    Absent,
    /// `allowed_domains` / `denied_domains` (or `allow_unix_sockets`).
    List,
    /// `[network.domains]` (or `[network.unix_sockets]`).
    Map,
}

/// `[network]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkConfig {
    /// `enabled` (true).
    pub enabled: bool,
    /// `mode` (full).
    pub mode: Mode,
    /// Allowlist after merging list and map forms (and `--allow`).
    pub allowed_domains: Vec<ListEntry>,
    /// Denylist after merging list and map forms (and `--deny`).
    pub denied_domains: Vec<ListEntry>,
    /// Which form the domain lists used in the file.
    #[serde(skip)]
    pub domains_form: Form,
    /// Allowed unix-socket paths (`allow_unix_sockets` or `allow` map entries).
    pub allow_unix_sockets: Vec<ListEntry>,
    /// Denied unix-socket paths (`deny` entries of `[network.unix_sockets]`).
    pub deny_unix_sockets: Vec<ListEntry>,
    /// Which form the unix-socket list used in the file.
    #[serde(skip)]
    pub unix_sockets_form: Form,
    /// `dangerously_allow_all_unix_sockets` (false).
    pub dangerously_allow_all_unix_sockets: bool,
    /// `allow_local_binding` (false).
    pub allow_local_binding: bool,
    /// `enable_socks5` (true).
    pub enable_socks5: bool,
    /// `enable_socks5_udp` (true).
    pub enable_socks5_udp: bool,
    /// `allow_upstream_proxy` (true).
    pub allow_upstream_proxy: bool,
    /// `dangerously_allow_non_loopback_proxy` (false).
    pub dangerously_allow_non_loopback_proxy: bool,
    /// `proxy_url` (127.0.0.1:3128), parsed, not clamped.
    pub proxy_url: SocketAddr,
    /// `socks_url` (127.0.0.1:8081), parsed, not clamped.
    pub socks_url: SocketAddr,
    /// `admin_url` (127.0.0.1:8080), parsed, not clamped.
    pub admin_url: SocketAddr,
    /// `enable_admin` (true).
    pub enable_admin: bool,
    /// `admin_token_file` (none).
    #[serde(serialize_with = "super::ser::opt_path")]
    pub admin_token_file: Option<PathBuf>,
    /// `mitm` (false).
    pub mitm: bool,
    /// `dns_servers` ([] = system resolver); port 53 filled in when absent.
    pub dns_servers: Vec<SocketAddr>,
    /// `socks_username` (none).
    pub socks_username: Option<String>,
    /// `socks_password_file` (none).
    #[serde(serialize_with = "super::ser::opt_path")]
    pub socks_password_file: Option<PathBuf>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        NetworkConfig {
            enabled: true,
            mode: Mode::Full,
            allowed_domains: Vec::new(),
            denied_domains: Vec::new(),
            domains_form: Form::Absent,
            allow_unix_sockets: Vec::new(),
            deny_unix_sockets: Vec::new(),
            unix_sockets_form: Form::Absent,
            dangerously_allow_all_unix_sockets: false,
            allow_local_binding: false,
            enable_socks5: true,
            enable_socks5_udp: true,
            allow_upstream_proxy: true,
            dangerously_allow_non_loopback_proxy: false,
            proxy_url: SocketAddr::new(lo, 3128),
            socks_url: SocketAddr::new(lo, 8081),
            admin_url: SocketAddr::new(lo, 8080),
            enable_admin: true,
            admin_token_file: None,
            mitm: false,
            dns_servers: Vec::new(),
            socks_username: None,
            socks_password_file: None,
        }
    }
}

impl NetworkConfig {
    /// Whether any unix socket is allowed (list entry, `allow` map entry, or allow-all); this
    /// forces the HTTP and SOCKS listeners to loopback (`config.md` §3).
    pub fn any_unix_socket_allowed(&self) -> bool {
        self.dangerously_allow_all_unix_sockets || !self.allow_unix_sockets.is_empty()
    }
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitsConfig {
    /// 65536, 1024–1048576.
    pub max_header_bytes: u64,
    /// 100, 8–1000.
    pub max_headers: u64,
    /// 16384, 1–1000000.
    pub max_connections: u64,
    /// 30000, 100–600000.
    pub header_read_timeout_ms: u64,
    /// 60000, 100–86400000.
    pub client_idle_timeout_ms: u64,
    /// 10000, 100–300000.
    pub connect_timeout_ms: u64,
    /// 2000, 100–60000.
    pub dns_timeout_ms: u64,
    /// 300000, 0 or 1000–86400000 (0 = no limit).
    pub response_header_timeout_ms: u64,
    /// 3600000, 0 or 1000–604800000 (0 = no limit).
    pub tunnel_idle_timeout_ms: u64,
    /// 300000, 1000–86400000.
    pub udp_idle_timeout_ms: u64,
    /// 1024, 1–65536.
    pub max_udp_associations: u64,
    /// 1024, 1–65536.
    pub max_udp_destinations: u64,
    /// 200, 1–100000.
    pub blocked_log_size: u64,
    /// 4096, 1–1000000.
    pub max_pending_approvals: u64,
    /// 10000, 0–600000.
    pub shutdown_grace_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_header_bytes: 65536,
            max_headers: 100,
            max_connections: 16384,
            header_read_timeout_ms: 30000,
            client_idle_timeout_ms: 60000,
            connect_timeout_ms: 10000,
            dns_timeout_ms: 2000,
            response_header_timeout_ms: 300000,
            tunnel_idle_timeout_ms: 3600000,
            udp_idle_timeout_ms: 300000,
            max_udp_associations: 1024,
            max_udp_destinations: 1024,
            blocked_log_size: 200,
            max_pending_approvals: 4096,
            shutdown_grace_ms: 10000,
        }
    }
}

/// `[mitm]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MitmConfig {
    /// `ca_cert_file` (none); set together with `ca_key_file`.
    #[serde(serialize_with = "super::ser::opt_path")]
    pub ca_cert_file: Option<PathBuf>,
    /// `ca_key_file` (none).
    #[serde(serialize_with = "super::ser::opt_path")]
    pub ca_key_file: Option<PathBuf>,
    /// `create_ca_files` (false).
    pub create_ca_files: bool,
    /// `out_dir` (none = `<runtime>/portcullis-proxy-<pid>`, decided at startup).
    #[serde(serialize_with = "super::ser::opt_path")]
    pub out_dir: Option<PathBuf>,
    /// `leaf_cache_size` (1024, 1–100000).
    pub leaf_cache_size: u64,
    /// `extra_upstream_ca_files` ([]).
    #[serde(serialize_with = "super::ser::path_vec")]
    pub extra_upstream_ca_files: Vec<PathBuf>,
}

impl Default for MitmConfig {
    fn default() -> Self {
        MitmConfig {
            ca_cert_file: None,
            ca_key_file: None,
            create_ca_files: false,
            out_dir: None,
            leaf_cache_size: 1024,
            extra_upstream_ca_files: Vec::new(),
        }
    }
}

/// `control.endpoint`: how a data plane or CLI reaches the control plane (`control.md` §1.6).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ControlEndpoint {
    /// `http://HOST:PORT`.
    Http {
        /// Host name or IP literal (IPv6 without brackets).
        host: String,
        /// Port 1–65535.
        port: u16,
    },
    /// `unix:/abs/path` or `unix:///abs/path`.
    Unix(PathBuf),
}

impl fmt::Display for ControlEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlEndpoint::Http { host, port } if host.contains(':') => {
                write!(f, "http://[{host}]:{port}")
            }
            ControlEndpoint::Http { host, port } => write!(f, "http://{host}:{port}"),
            ControlEndpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Serialize for ControlEndpoint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `[control]` (both binaries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ControlConfig {
    /// `endpoint` (none = standalone).
    pub endpoint: Option<ControlEndpoint>,
    /// `token_file` (none = `<state_dir>/control.token`, see [`super::Config::control_token_file`]).
    #[serde(serialize_with = "super::ser::opt_path")]
    pub token_file: Option<PathBuf>,
    /// `session_id` ("default").
    pub session_id: String,
    /// `attach_timeout_secs` (10, 1–600).
    pub attach_timeout_secs: u64,
    /// `reconnect_initial_ms` (250, 10–60000).
    pub reconnect_initial_ms: u64,
    /// `reconnect_max_ms` (10000, ≥ `reconnect_initial_ms`, ≤ 600000).
    pub reconnect_max_ms: u64,
    /// `event_buffer` (4096, 16–1000000).
    pub event_buffer: u64,
    /// `listen` (127.0.0.1:50051), control plane only; parsed, not clamped.
    pub listen: SocketAddr,
    /// `unix_socket` (none), control plane only.
    #[serde(serialize_with = "super::ser::opt_path")]
    pub unix_socket: Option<PathBuf>,
    /// `rules` (none = `<state_dir>/portcullis.rules`), control plane only.
    #[serde(serialize_with = "super::ser::opt_path")]
    pub rules: Option<PathBuf>,
    /// `dangerously_allow_non_loopback` (false), control plane only.
    pub dangerously_allow_non_loopback: bool,
    /// `watch_buffer` (1024, 1–1000000), control plane only.
    pub watch_buffer: u64,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            endpoint: None,
            token_file: None,
            session_id: "default".to_string(),
            attach_timeout_secs: 10,
            reconnect_initial_ms: 250,
            reconnect_max_ms: 10000,
            event_buffer: 4096,
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 50051),
            unix_socket: None,
            rules: None,
            dangerously_allow_non_loopback: false,
            watch_buffer: 1024,
        }
    }
}

/// `[approvals]` (`control.md` §12).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApprovalsConfig {
    /// `enabled` (true).
    pub enabled: bool,
    /// `ask_timeout_secs` (60, 1–3600).
    pub ask_timeout_secs: u64,
    /// `max_pending` (1024, 1–1000000).
    pub max_pending: u64,
    /// `max_waiters_per_ask` (1024, 1–1000000).
    pub max_waiters_per_ask: u64,
    /// `max_session_allows` (4096, 1–1000000).
    pub max_session_allows: u64,
    /// `report_allows` (false).
    pub report_allows: bool,
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        ApprovalsConfig {
            enabled: true,
            ask_timeout_secs: 60,
            max_pending: 1024,
            max_waiters_per_ask: 1024,
            max_session_allows: 4096,
            report_allows: false,
        }
    }
}

/// Default of `requirements.token_env`.
pub const DEFAULT_REQUIREMENTS_TOKEN_ENV: &str = "PORTCULLIS_REQUIREMENTS_TOKEN";

/// `[requirements]` (`requirements.md` §1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequirementsConfig {
    /// `url` (none = no requirements); `https://` with a host, no userinfo.
    pub url: Option<String>,
    /// `token_file` (none).
    #[serde(serialize_with = "super::ser::opt_path")]
    pub token_file: Option<PathBuf>,
    /// `token_env` as written (none = [`DEFAULT_REQUIREMENTS_TOKEN_ENV`]); see
    /// [`RequirementsConfig::token_env_name`].
    pub token_env: Option<String>,
    /// `ca_file` (none).
    #[serde(serialize_with = "super::ser::opt_path")]
    pub ca_file: Option<PathBuf>,
    /// `timeout_secs` (15, 1–300).
    pub timeout_secs: u64,
    /// `max_attempts` (5, 1–10).
    pub max_attempts: u64,
    /// `cache_file` (none = `<state_dir>/requirements.cache.json`).
    #[serde(serialize_with = "super::ser::opt_path")]
    pub cache_file: Option<PathBuf>,
    /// `cache_max_age_secs` (900; 0 = never fresh; at most 31536000 here).
    pub cache_max_age_secs: u64,
    /// `refresh_interval_secs` (900, 1–86400).
    pub refresh_interval_secs: u64,
    /// `optional` (false).
    pub optional: bool,
}

impl Default for RequirementsConfig {
    fn default() -> Self {
        RequirementsConfig {
            url: None,
            token_file: None,
            token_env: None,
            ca_file: None,
            timeout_secs: 15,
            max_attempts: 5,
            cache_file: None,
            cache_max_age_secs: 900,
            refresh_interval_secs: 900,
            optional: false,
        }
    }
}

impl RequirementsConfig {
    /// The environment variable holding the token (explicit value or the default).
    pub fn token_env_name(&self) -> &str {
        self.token_env
            .as_deref()
            .unwrap_or(DEFAULT_REQUIREMENTS_TOKEN_ENV)
    }
}

/// `audit.exporter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditExporter {
    /// `otlp`.
    Otlp,
    /// `none`.
    None,
}

/// `audit.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum AuditProtocol {
    /// `grpc`.
    #[serde(rename = "grpc")]
    Grpc,
    /// `http/protobuf`.
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// `[audit]` (`audit.md` §6). Keys that fall back to the environment are `Option`s: `None`
/// means "not in the file", and the audit module applies the environment, then the default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditConfig {
    /// `exporter` (none → env → `otlp` if an endpoint is known, else `none`).
    pub exporter: Option<AuditExporter>,
    /// `protocol` (none → env → `grpc`).
    pub protocol: Option<AuditProtocol>,
    /// `endpoint` (none → env → `http://localhost:4317` / `http://localhost:4318/v1/logs`).
    pub endpoint: Option<String>,
    /// `headers` map (values are secrets: redacted in the JSON view).
    #[serde(serialize_with = "serialize_redacted_map")]
    pub headers: BTreeMap<String, String>,
    /// `timeout_ms` (none → env → 10000; 1–600000 here).
    pub timeout_ms: Option<u64>,
    /// `ca_file` (none → env → platform roots).
    #[serde(serialize_with = "super::ser::opt_path")]
    pub ca_file: Option<PathBuf>,
    /// `max_queue_size` (none → env → 2048; 1–1000000 here).
    pub max_queue_size: Option<u64>,
    /// `max_export_batch_size` (none → env → 512; 1–1000000 here, ≤ `max_queue_size`).
    pub max_export_batch_size: Option<u64>,
    /// `scheduled_delay_ms` (none → env → 1000; 1–600000 here).
    pub scheduled_delay_ms: Option<u64>,
    /// `shutdown_timeout_ms` (5000; 0–600000 here).
    pub shutdown_timeout_ms: u64,
    /// `traces` (none → env `OTEL_TRACES_EXPORTER=otlp` → false).
    pub traces: Option<bool>,
    /// `resource` map (empty).
    pub resource: BTreeMap<String, String>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            exporter: None,
            protocol: None,
            endpoint: None,
            headers: BTreeMap::new(),
            timeout_ms: None,
            ca_file: None,
            max_queue_size: None,
            max_export_batch_size: None,
            scheduled_delay_ms: None,
            shutdown_timeout_ms: 5000,
            traces: None,
            resource: BTreeMap::new(),
        }
    }
}

/// Audit defaults used when neither the file nor the environment sets a key (`audit.md` §6).
pub mod audit_defaults {
    /// `audit.timeout_ms`.
    pub const TIMEOUT_MS: u64 = 10000;
    /// `audit.max_queue_size`.
    pub const MAX_QUEUE_SIZE: u64 = 2048;
    /// `audit.max_export_batch_size`.
    pub const MAX_EXPORT_BATCH_SIZE: u64 = 512;
    /// `audit.scheduled_delay_ms`.
    pub const SCHEDULED_DELAY_MS: u64 = 1000;
    /// `audit.endpoint` for gRPC.
    pub const GRPC_ENDPOINT: &str = "http://localhost:4317";
    /// `audit.endpoint` for HTTP.
    pub const HTTP_ENDPOINT: &str = "http://localhost:4318/v1/logs";
}

fn serialize_redacted_map<S: Serializer>(
    map: &BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(map.keys().map(|k| (k, "<redacted>")))
}
