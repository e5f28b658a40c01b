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
    /// Woken on every ack and detach (`wait_for_enforcement`).
    ack_notify: tokio::sync::Notify,
    /// Every Decision reported by attached proxies.
    pub decisions: broadcast::Sender<v1::Decision>,
    /// The effective entries with their provenance (`GetPolicy`).
    entries: Mutex<Vec<v1::PolicyEntry>>,
    config_allowed: Vec<String>,
    config_denied: Vec<String>,
    /// The snapshot fields from the config alone (requirements are applied on top).
    local_base: v1::PolicySnapshot,
    /// The compiled rules in force.
    rules: Mutex<crate::rules::Compiled>,
    /// Enterprise requirements in force and their status.
    requirements: Mutex<crate::requirements::Active>,
}

/// The policy lists after merging config and rules (control.md §8.1).
struct Merged {
    allowed: Vec<String>,
    denied: Vec<String>,
    port_rules: Vec<v1::PortRule>,
    entries: Vec<v1::PolicyEntry>,
}

fn entry(
    decision: &str,
    pattern: &str,
    port: u32,
    source: v1::PolicySource,
    line: usize,
) -> v1::PolicyEntry {
    v1::PolicyEntry {
        decision: decision.into(),
        pattern: pattern.into(),
        port,
        source: source as i32,
        rule_line: line as u32,
        ignored: false,
        ignored_reason: String::new(),
    }
}

/// Config ∪ rules per list (deny wins at evaluation time); entries keep their provenance.
fn merge(
    config_allowed: &[String],
    config_denied: &[String],
    rules: &crate::rules::Compiled,
) -> Merged {
    let mut m = Merged {
        allowed: config_allowed.to_vec(),
        denied: config_denied.to_vec(),
        port_rules: Vec::new(),
        entries: Vec::new(),
    };
    for p in config_allowed {
        m.entries
            .push(entry("allow", p, 0, v1::PolicySource::Config, 0));
    }
    for p in config_denied {
        m.entries
            .push(entry("deny", p, 0, v1::PolicySource::Config, 0));
    }
    for (host, line) in &rules.allowed {
        if !m.allowed.contains(host) {
            m.allowed.push(host.clone());
        }
        m.entries
            .push(entry("allow", host, 0, v1::PolicySource::Rules, *line));
    }
    for (host, line) in &rules.denied {
        if !m.denied.contains(host) {
            m.denied.push(host.clone());
        }
        m.entries
            .push(entry("deny", host, 0, v1::PolicySource::Rules, *line));
    }
    for (host, port, allow, line) in &rules.port_rules {
        let decision = if *allow { "allow" } else { "deny" };
        m.port_rules.push(v1::PortRule {
            host: host.clone(),
            port: u32::from(*port),
            decision: decision.into(),
        });
        m.entries.push(entry(
            decision,
            host,
            u32::from(*port),
            v1::PolicySource::Rules,
            *line,
        ));
    }
    m
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
        let config_allowed = policy.allowed_patterns();
        let config_denied = policy.denied_patterns();
        let merged = merge(&config_allowed, &config_denied, rules);
        let snapshot = v1::PolicySnapshot {
            control_instance_id: instance_id.clone(),
            version: 1,
            issued_at: Some(timestamp(SystemTime::now())),
            allowed_domains: merged.allowed,
            denied_domains: merged.denied,
            port_rules: merged.port_rules,
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
        Ok(ControlState {
            local_base: snapshot.clone(),
            rules: Mutex::new(rules.clone()),
            requirements: Mutex::new(crate::requirements::Active::default()),
            entries: Mutex::new(merged.entries),
            config_allowed,
            config_denied,
            instance_id,
            started_at: SystemTime::now(),
            snapshot: Mutex::new(snapshot),
            session_allows: Mutex::new(HashMap::new()),
            proxies: Mutex::new(HashMap::new()),
            next_stream: std::sync::atomic::AtomicU64::new(1),
            ack_notify: tokio::sync::Notify::new(),
            decisions,
        })
    }

    /// The snapshot a proxy of `session_id` receives now.
    pub fn snapshot_for(&self, session_id: &str) -> v1::PolicySnapshot {
        let mut snap = self.snapshot.lock().map(|s| s.clone()).unwrap_or_default();
        let active = self.requirements();
        if let Ok(allows) = self.session_allows.lock()
            && let Some(set) = allows.get(session_id)
        {
            snap.session_allows = set
                .iter()
                .filter(|(host, _, port)| active.session_allow_permitted(host, *port))
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

    /// How many session allows `session` has.
    pub fn session_allow_count(&self, session: &str) -> usize {
        self.session_allows
            .lock()
            .map(|m| m.get(session).map_or(0, |s| s.len()))
            .unwrap_or(0)
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
        // One snapshot per session, cloned per proxy (most proxies share a session).
        let mut per_session: HashMap<String, v1::PolicySnapshot> = HashMap::new();
        for (proxy_id, session_id, tx) in targets {
            let snap = per_session
                .entry(session_id)
                .or_insert_with_key(|s| self.snapshot_for(s))
                .clone();
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

    /// The effective entries with provenance.
    pub fn entries(&self) -> Vec<v1::PolicyEntry> {
        self.entries.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// New rules file content: recompute the lists, take the next version and push it to every
    /// attached proxy. Returns the new version.
    pub async fn set_rules(&self, rules: &crate::rules::Compiled) -> u64 {
        if let Ok(mut r) = self.rules.lock() {
            r.clone_from(rules);
        }
        self.recompute();
        self.bump_and_push(None).await
    }

    /// Rebuilds the snapshot content (keeping version and issue time) and the entries from
    /// config, rules and requirements. Returns whether the content changed and the WARNs of
    /// local settings narrowed by the requirements.
    fn recompute(&self) -> (bool, Vec<String>) {
        let rules = self.rules.lock().map(|r| r.clone()).unwrap_or_default();
        let m = merge(&self.config_allowed, &self.config_denied, &rules);
        let mut next = self.local_base.clone();
        next.allowed_domains = m.allowed;
        next.denied_domains = m.denied;
        next.port_rules = m.port_rules;
        let mut entries = m.entries;
        let active = self.requirements();
        let warnings = match &active.doc {
            Some(doc) => crate::requirements::merge::apply(doc, &mut next, &mut entries),
            None => Vec::new(),
        };
        let changed = match self.snapshot.lock() {
            Ok(mut s) => {
                next.control_instance_id = s.control_instance_id.clone();
                next.version = s.version;
                next.issued_at = s.issued_at;
                let changed = *s != next;
                *s = next;
                changed
            }
            Err(_) => false,
        };
        if let Ok(mut e) = self.entries.lock() {
            *e = entries;
        }
        (changed, warnings)
    }

    /// The requirements in force (startup: before the first snapshot is served, so the
    /// version stays 1). Logs one WARN per narrowed local setting.
    pub fn init_requirements(&self, active: crate::requirements::Active) {
        if let Ok(mut r) = self.requirements.lock() {
            *r = active;
        }
        for w in self.recompute().1 {
            tracing::warn!("{w}");
        }
    }

    /// New requirements from a refresh: recompute; if the policy changed, take the next
    /// version and push it to every proxy (returned).
    pub async fn set_requirements(&self, active: crate::requirements::Active) -> Option<u64> {
        if let Ok(mut r) = self.requirements.lock() {
            *r = active;
        }
        let (changed, warnings) = self.recompute();
        for w in warnings {
            tracing::warn!("{w}");
        }
        if changed {
            Some(self.bump_and_push(None).await)
        } else {
            None
        }
    }

    /// Updates only the requirements status (identical document, 304, or a failed refresh).
    pub fn set_requirements_status(&self, status: v1::RequirementsStatus) {
        if let Ok(mut r) = self.requirements.lock() {
            r.status = status;
        }
    }

    /// The requirements in force and their status.
    pub fn requirements(&self) -> crate::requirements::Active {
        self.requirements
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
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
        self.ack_notify.notify_waiters();
    }

    /// Forgets a stream (only if it is still the current one for its proxy).
    pub fn detach(&self, proxy_id: &str, stream_no: u64) {
        if let Ok(mut p) = self.proxies.lock()
            && p.get(proxy_id).is_some_and(|a| a.stream_no == stream_no)
        {
            p.remove(proxy_id);
        }
        self.ack_notify.notify_waiters();
    }

    /// Proxies (of `session`, or all) that were sent `version` or later and have not acked it.
    fn lagging(&self, version: u64, session: Option<&str>) -> Vec<String> {
        let mut v: Vec<String> = self
            .proxies
            .lock()
            .map(|p| {
                p.values()
                    .filter(|a| session.is_none_or(|s| a.info.session_id == s))
                    .filter(|a| a.info.acked_version < version)
                    .map(|a| a.info.proxy_id.clone())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Waits until every proxy concerned has acked `version` (an acked version is enforced,
    /// control.md §8.3) or `limit` passes; returns whether it was enforced and who lags.
    pub async fn wait_enforced(
        &self,
        version: u64,
        session: Option<&str>,
        limit: std::time::Duration,
    ) -> (bool, Vec<String>) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.ack_notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so an ack between check and wait is not missed.
            notified.as_mut().enable();
            let lagging = self.lagging(version, session);
            if lagging.is_empty() {
                return (true, lagging);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return (false, self.lagging(version, session));
            }
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
