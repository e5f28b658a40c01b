//! The control plane's state: the effective policy (from the config for now), its version,
//! the attached data planes, and the Decision fan-out to watchers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use portcullis::config::{Config, Mode};
use portcullis::policy::CompiledPolicy;
use portcullis::proto::v1;
use tokio::sync::broadcast;

/// One session's allows: (host, protocol label, port).
type SessionAllows = std::collections::BTreeSet<(String, String, u32)>;

/// The outbound half of an Attach stream.
pub type Outbound = tokio::sync::mpsc::Sender<Result<v1::ControlMessage, tonic::Status>>;

/// One attached data plane.
#[derive(Debug, Clone)]
pub struct Attached {
    /// What it said in its Hello, plus the stream's bookkeeping.
    pub info: v1::ProxyInfo,
    /// Bumped per stream so a superseded stream does not unregister its successor.
    pub stream_no: u64,
    /// The stream's outbound half (snapshots, ask answers).
    pub tx: Outbound,
}

/// Shared control-plane state.
pub struct ControlState {
    /// 32 lowercase hex, new at every start.
    pub instance_id: String,
    /// When this instance started.
    pub started_at: SystemTime,
    snapshot: Mutex<v1::PolicySnapshot>,
    session_allows: Mutex<HashMap<String, SessionAllows>>,
    proxies: Mutex<HashMap<String, Attached>>,
    next_stream: std::sync::atomic::AtomicU64,
    /// Every Decision reported by attached proxies.
    pub decisions: broadcast::Sender<v1::Decision>,
    /// The effective entries with their provenance (`GetPolicy`).
    pub entries: Vec<v1::PolicyEntry>,
}

impl ControlState {
    /// Builds the state from a validated config (the policy keys become snapshot version 1).
    pub fn new(
        config: &Config,
        instance_id: String,
        rules: &crate::rules::Compiled,
    ) -> Result<ControlState, String> {
        let policy = CompiledPolicy::from_config(config).map_err(|e| e.to_string())?;
        let n = &config.network;
        // Merge (control.md §8.1): config ∪ rules per list; deny wins at evaluation time.
        let mut allowed = policy.allowed_patterns();
        let mut denied = policy.denied_patterns();
        for (host, _) in &rules.allowed {
            if !allowed.contains(host) {
                allowed.push(host.clone());
            }
        }
        for (host, _) in &rules.denied {
            if !denied.contains(host) {
                denied.push(host.clone());
            }
        }
        let port_rules = rules
            .port_rules
            .iter()
            .map(|(host, port, allow, _)| v1::PortRule {
                host: host.clone(),
                port: u32::from(*port),
                decision: if *allow { "allow" } else { "deny" }.into(),
            })
            .collect();
        let snapshot = v1::PolicySnapshot {
            control_instance_id: instance_id.clone(),
            version: 1,
            issued_at: Some(timestamp(SystemTime::now())),
            allowed_domains: allowed,
            denied_domains: denied,
            port_rules,
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
            asks_enabled: config.approvals.enabled,
            ask_timeout_ms: (config.approvals.ask_timeout_secs * 1000).min(u64::from(u32::MAX))
                as u32,
            report_allows: config.approvals.report_allows,
        };
        let (decisions, _) =
            broadcast::channel(config.control.watch_buffer.clamp(1, 1 << 20) as usize);
        let provenance = policy
            .allowed_patterns()
            .into_iter()
            .map(|p| ("allow", p, 0u32, v1::PolicySource::Config, 0usize))
            .chain(
                policy
                    .denied_patterns()
                    .into_iter()
                    .map(|p| ("deny", p, 0, v1::PolicySource::Config, 0)),
            )
            .chain(
                rules
                    .allowed
                    .iter()
                    .map(|(h, l)| ("allow", h.clone(), 0, v1::PolicySource::Rules, *l)),
            )
            .chain(
                rules
                    .denied
                    .iter()
                    .map(|(h, l)| ("deny", h.clone(), 0, v1::PolicySource::Rules, *l)),
            )
            .chain(rules.port_rules.iter().map(|(h, p, allow, l)| {
                (
                    if *allow { "allow" } else { "deny" },
                    h.clone(),
                    u32::from(*p),
                    v1::PolicySource::Rules,
                    *l,
                )
            }))
            .map(|(decision, pattern, port, source, line)| v1::PolicyEntry {
                decision: decision.into(),
                pattern,
                port,
                source: source as i32,
                rule_line: line as u32,
                ignored: false,
                ignored_reason: String::new(),
            })
            .collect();
        Ok(ControlState {
            entries: provenance,
            instance_id,
            started_at: SystemTime::now(),
            snapshot: Mutex::new(snapshot),
            session_allows: Mutex::new(HashMap::new()),
            proxies: Mutex::new(HashMap::new()),
            next_stream: std::sync::atomic::AtomicU64::new(1),
            decisions,
        })
    }

    /// The snapshot a proxy of `session_id` receives now.
    pub fn snapshot_for(&self, session_id: &str) -> v1::PolicySnapshot {
        let mut snap = self.snapshot.lock().map(|s| s.clone()).unwrap_or_default();
        if let Ok(allows) = self.session_allows.lock()
            && let Some(set) = allows.get(session_id)
        {
            snap.session_allows = set
                .iter()
                .map(|(host, protocol, port)| v1::SessionAllow {
                    host: host.clone(),
                    protocol: protocol.clone(),
                    port: *port,
                })
                .collect();
        }
        snap
    }

    /// Adds a session allow; returns the new policy version (after pushing the new snapshot
    /// to that session's proxies), or `None` when it was already there.
    pub async fn add_session_allow(
        &self,
        session: &str,
        host: &str,
        protocol: &str,
        port: u32,
    ) -> Option<u64> {
        let inserted = self
            .session_allows
            .lock()
            .map(|mut m| {
                m.entry(session.to_string()).or_default().insert((
                    host.to_string(),
                    protocol.to_string(),
                    port,
                ))
            })
            .unwrap_or(false);
        if !inserted {
            return None;
        }
        Some(self.bump_and_push(Some(session)).await)
    }

    /// Removes every session allow of `session`; returns how many and the new version (if any
    /// changed).
    pub async fn end_session(&self, session: &str) -> (usize, Option<u64>) {
        let removed = self
            .session_allows
            .lock()
            .ok()
            .and_then(|mut m| m.remove(session))
            .map_or(0, |set| set.len());
        if removed == 0 {
            return (0, None);
        }
        (removed, Some(self.bump_and_push(Some(session)).await))
    }

    /// Takes the next version and sends the new full snapshot to the affected proxies
    /// (`session`: only that session's; `None`: every attached proxy).
    pub async fn bump_and_push(&self, session: Option<&str>) -> u64 {
        let version = match self.snapshot.lock() {
            Ok(mut s) => {
                s.version += 1;
                s.issued_at = Some(timestamp(SystemTime::now()));
                s.version
            }
            Err(_) => return 0,
        };
        let targets: Vec<(String, String, Outbound)> = self
            .proxies
            .lock()
            .map(|p| {
                p.values()
                    .filter(|a| session.is_none_or(|s| a.info.session_id == s))
                    .map(|a| {
                        (
                            a.info.proxy_id.clone(),
                            a.info.session_id.clone(),
                            a.tx.clone(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        for (proxy_id, session_id, tx) in targets {
            let snap = self.snapshot_for(&session_id);
            if let Ok(mut p) = self.proxies.lock()
                && let Some(a) = p.get_mut(&proxy_id)
            {
                a.info.sent_version = snap.version;
                a.info.in_sync = false;
            }
            let _ = tx
                .send(Ok(v1::ControlMessage {
                    msg: Some(v1::control_message::Msg::Snapshot(snap)),
                }))
                .await;
        }
        version
    }

    /// Current policy version.
    pub fn version(&self) -> u64 {
        self.snapshot.lock().map(|s| s.version).unwrap_or(0)
    }

    /// Registers a stream; returns its number and whether it replaced an older one.
    pub fn attach(&self, info: v1::ProxyInfo, tx: Outbound) -> (u64, bool) {
        let stream_no = self
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let replaced = self
            .proxies
            .lock()
            .map(|mut p| {
                p.insert(
                    info.proxy_id.clone(),
                    Attached {
                        info,
                        stream_no,
                        tx,
                    },
                )
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
