//! The control plane's state: the effective policy (from the config for now), its version,
//! the attached data planes, and the Decision fan-out to watchers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use portcullis::config::{Config, Mode};
use portcullis::policy::CompiledPolicy;
use portcullis::proto::v1;
use tokio::sync::broadcast;

/// One attached data plane.
#[derive(Debug, Clone)]
pub struct Attached {
    /// What it said in its Hello, plus the stream's bookkeeping.
    pub info: v1::ProxyInfo,
    /// Bumped per stream so a superseded stream does not unregister its successor.
    pub stream_no: u64,
}

/// Shared control-plane state.
pub struct ControlState {
    /// 32 lowercase hex, new at every start.
    pub instance_id: String,
    /// When this instance started.
    pub started_at: SystemTime,
    snapshot: Mutex<v1::PolicySnapshot>,
    proxies: Mutex<HashMap<String, Attached>>,
    next_stream: std::sync::atomic::AtomicU64,
    /// Every Decision reported by attached proxies.
    pub decisions: broadcast::Sender<v1::Decision>,
}

impl ControlState {
    /// Builds the state from a validated config (the policy keys become snapshot version 1).
    pub fn new(config: &Config, instance_id: String) -> Result<ControlState, String> {
        let policy = CompiledPolicy::from_config(config).map_err(|e| e.to_string())?;
        let n = &config.network;
        let snapshot = v1::PolicySnapshot {
            control_instance_id: instance_id.clone(),
            version: 1,
            issued_at: Some(timestamp(SystemTime::now())),
            allowed_domains: policy.allowed_patterns(),
            denied_domains: policy.denied_patterns(),
            port_rules: Vec::new(),
            allow_unix_sockets: n
                .allow_unix_sockets
                .iter()
                .map(|e| e.value.clone())
                .collect(),
            dangerously_allow_all_unix_sockets: n.dangerously_allow_all_unix_sockets,
            denied_unix_sockets: n
                .deny_unix_sockets
                .iter()
                .map(|e| e.value.clone())
                .collect(),
            mode: match n.mode {
                Mode::Full => "full".into(),
                Mode::Limited => "limited".into(),
            },
            allow_local_binding: n.allow_local_binding,
            allow_upstream_proxy: n.allow_upstream_proxy,
            session_allows: Vec::new(),
            // Asks are not served yet: misses are plain `not_allowed` denies.
            asks_enabled: false,
            ask_timeout_ms: (config.approvals.ask_timeout_secs * 1000).min(u64::from(u32::MAX))
                as u32,
            report_allows: config.approvals.report_allows,
        };
        let (decisions, _) =
            broadcast::channel(config.control.watch_buffer.clamp(1, 1 << 20) as usize);
        Ok(ControlState {
            instance_id,
            started_at: SystemTime::now(),
            snapshot: Mutex::new(snapshot),
            proxies: Mutex::new(HashMap::new()),
            next_stream: std::sync::atomic::AtomicU64::new(1),
            decisions,
        })
    }

    /// The snapshot a proxy of `session_id` receives now.
    pub fn snapshot_for(&self, _session_id: &str) -> v1::PolicySnapshot {
        self.snapshot.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Current policy version.
    pub fn version(&self) -> u64 {
        self.snapshot.lock().map(|s| s.version).unwrap_or(0)
    }

    /// Registers a stream; returns its number and whether it replaced an older one.
    pub fn attach(&self, info: v1::ProxyInfo) -> (u64, bool) {
        let stream_no = self
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let replaced = self
            .proxies
            .lock()
            .map(|mut p| {
                p.insert(info.proxy_id.clone(), Attached { info, stream_no })
                    .is_some()
            })
            .unwrap_or(false);
        (stream_no, replaced)
    }

    /// Whether `stream_no` is still the current stream of `proxy_id`.
    pub fn is_current(&self, proxy_id: &str, stream_no: u64) -> bool {
        self.proxies
            .lock()
            .map(|p| p.get(proxy_id).is_some_and(|a| a.stream_no == stream_no))
            .unwrap_or(false)
    }

    /// Records a snapshot ack.
    pub fn acked(&self, proxy_id: &str, stream_no: u64, version: u64, applied: bool) {
        if let Ok(mut p) = self.proxies.lock()
            && let Some(a) = p.get_mut(proxy_id).filter(|a| a.stream_no == stream_no)
        {
            if applied {
                a.info.acked_version = version;
            }
            a.info.in_sync = applied && a.info.acked_version == a.info.sent_version;
        }
    }

    /// Forgets a stream (only if it is still the current one for its proxy).
    pub fn detach(&self, proxy_id: &str, stream_no: u64) {
        if let Ok(mut p) = self.proxies.lock()
            && p.get(proxy_id).is_some_and(|a| a.stream_no == stream_no)
        {
            p.remove(proxy_id);
        }
    }

    /// The attached proxies.
    pub fn proxies(&self) -> Vec<v1::ProxyInfo> {
        let mut v: Vec<v1::ProxyInfo> = self
            .proxies
            .lock()
            .map(|p| p.values().map(|a| a.info.clone()).collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.proxy_id.cmp(&b.proxy_id));
        v
    }
}

/// A protobuf timestamp.
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}
