//! The tonic services: `DataPlane.Attach` (Hello → snapshot → decisions and acks) and the
//! host-facing `Control` service. RPCs that need approvals or rules answer `UNIMPLEMENTED`
//! until those land.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use portcullis::proto::v1;
use portcullis::proto::v1::control_server::Control;
use portcullis::proto::v1::data_plane_server::DataPlane;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::approvals::{Approvals, AskIn};
use crate::state::{ControlState, timestamp};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Both services share the state.
#[derive(Clone)]
pub struct Services {
    /// The shared state.
    pub state: Arc<ControlState>,
    /// Pending asks.
    pub approvals: Arc<Approvals>,
    /// `approvals.ask_timeout_secs` (or `--ask-timeout`).
    pub ask_timeout: Duration,
    /// The rules file's rules, in file order (the parsed content of the last write).
    pub rules: Arc<std::sync::Mutex<Vec<crate::rules::Rule>>>,
    /// The rules file.
    pub rules_path: std::path::PathBuf,
    /// Why the rules file on disk is not in force (its last reload failed: `PATH:LINE:COLUMN:
    /// MESSAGE` or a read error); empty when the file and memory agree. `GetStatus.rules_error`.
    pub rules_error: Arc<std::sync::Mutex<String>>,
    /// `approvals.max_session_allows`.
    pub max_session_allows: usize,
}

fn check_pending_id(id: &str) -> Result<(), Status> {
    if valid_ask_id(id) {
        Ok(())
    } else {
        Err(Status::invalid_argument(
            "pending_id: must be ask_ followed by 16 lowercase hex digits",
        ))
    }
}

/// The rule an `always` answer writes (control.md §7.4): a port-scoped allow, or a host-level
/// deny (all ports), with the default justification unless one was given.
fn always_rule(
    ask: &v1::PendingAsk,
    allow: bool,
    justification: Option<String>,
    actor: &str,
) -> crate::rules::Rule {
    let verb = if allow { "Allow" } else { "Deny" };
    crate::rules::Rule {
        line: 0,
        host: ask.host.clone(),
        protocol: rule_protocol(&ask.protocol).into(),
        decision: if allow { "allow" } else { "deny" }.into(),
        port: if allow {
            u16::try_from(ask.port).ok()
        } else {
            None
        },
        justification: Some(justification.unwrap_or_else(|| {
            format!(
                "{verb} {} access to {}:{} (ask {}, by {actor})",
                ask.protocol, ask.host, ask.port, ask.id
            )
        })),
    }
}

/// The rule protocol of an ask's protocol label (network-rules.md §5.1).
fn rule_protocol(label: &str) -> &str {
    match label {
        "https_connect" => "https",
        other => other,
    }
}

/// Validates AddRule arguments with the rules file's checks (same messages, no position).
fn rule_from_request(r: &v1::AddRuleRequest) -> Result<crate::rules::Rule, Status> {
    let bad = |m: String| Status::invalid_argument(m);
    let host = crate::rules::host::parse_host(&r.host).map_err(|m| bad(format!("host: {m}")))?;
    let protocol = match r.protocol.as_str() {
        "http" => "http",
        "https" | "https_connect" | "http-connect" => "https",
        "socks5_tcp" => "socks5_tcp",
        "socks5_udp" => "socks5_udp",
        other => {
            return Err(bad(format!(
                "protocol: protocol must be one of http, https, socks5_tcp, socks5_udp (got \"{other}\")"
            )));
        }
    };
    let decision = match r.decision.as_str() {
        "allow" => "allow",
        "deny" | "forbidden" => "deny",
        "prompt" => return Err(bad("decision: prompt rules are parse-only".into())),
        other => {
            return Err(bad(format!(
                "decision: decision must be one of allow, deny, prompt (got \"{other}\")"
            )));
        }
    };
    let port = match r.port {
        0 => None,
        p @ 1..=65535 => Some(p as u16),
        _ => return Err(bad("port: must be between 1 and 65535".into())),
    };
    let port = match (host.port, port) {
        (Some(a), Some(b)) if a != b => {
            return Err(bad(format!("port: host port :{a} conflicts with port={b}")));
        }
        (a, b) => a.or(b),
    };
    if let Some(j) = &r.justification
        && (j.trim().is_empty() || j.chars().any(char::is_control) || j.chars().count() > 1024)
    {
        return Err(bad(
            "justification: must be 1-1024 characters, not blank, without control characters"
                .into(),
        ));
    }
    Ok(crate::rules::Rule {
        line: 0,
        host: host.host,
        protocol: protocol.into(),
        decision: decision.into(),
        port,
        justification: r.justification.clone(),
    })
}

impl Services {
    /// Re-reads the rules file (SIGHUP, or a change seen on disk). A bad file keeps the last
    /// good rules in force and logs the position (network-rules.md §6.2).
    pub async fn reload_rules(&self) {
        let path = self.rules_path.clone();
        let loaded = tokio::task::spawn_blocking(move || crate::rules::load(&path)).await;
        let error = match &loaded {
            Ok(Ok(_)) => String::new(),
            Ok(Err((_, msg))) => msg.clone(),
            Err(e) => format!("rules reload failed: {e}"),
        };
        self.set_rules_error(error);
        match loaded {
            Ok(Ok(rules)) => {
                // Lines changed, `None` when the file says what memory holds (our own writes
                // are seen here too). Compared under the lock: no copy of the rules.
                let changed = self
                    .rules
                    .lock()
                    .map(|cur| (*cur != rules).then(|| lines_changed(&cur, &rules)))
                    .unwrap_or_else(|_| Some(lines_changed(&[], &rules)));
                if let Some(count) = changed {
                    let version = self.state.set_rules(&crate::rules::compile(&rules)).await;
                    tracing::info!(rules = rules.len(), version, "rules file reloaded");
                    crate::audit::rule_change(&crate::audit::RuleChange {
                        action: "reload",
                        origin: "file",
                        target: None,
                        rule: None,
                        count,
                        actor: "system",
                        client_address: "unknown",
                        policy_version: version,
                    });
                    if let Ok(mut cur) = self.rules.lock() {
                        *cur = rules;
                    }
                    self.resolve_asks_by_policy().await;
                }
            }
            Ok(Err((_, msg))) => {
                tracing::error!("rules file not reloaded, keeping the last good rules: {msg}")
            }
            Err(e) => tracing::error!("rules reload failed: {e}"),
        }
    }

    fn set_rules_error(&self, error: String) {
        if let Ok(mut cur) = self.rules_error.lock() {
            *cur = error;
        }
    }

    /// Appends a rule under the file lock; on success the new rules are enforced and pushed.
    /// On failure (the file no longer parses, write or lock error) nothing is written; the file
    /// is re-read so memory and `rules_error` match the disk (network-rules.md §5.5, §6.2).
    async fn persist(
        &self,
        rule: crate::rules::Rule,
        by: ChangeSource<'_>,
    ) -> Result<(bool, u64, Vec<crate::rules::Rule>), String> {
        let path = self.rules_path.clone();
        let line = rule.clone();
        let written =
            tokio::task::spawn_blocking(move || crate::rules::store::append(&path, &line))
                .await
                .map_err(|e| format!("rules writer failed: {e}"))
                .and_then(|r| r);
        let (added, rules) = match written {
            Ok(w) => w,
            Err(e) => {
                tracing::error!("rules file not written: {e}");
                self.reload_rules().await;
                return Err(e);
            }
        };
        self.set_rules_error(String::new());
        // The file may also hold lines other processes wrote since the last read.
        let changed = self.rules.lock().map(|cur| *cur != rules).unwrap_or(true);
        let version = if added || changed {
            self.state.set_rules(&crate::rules::compile(&rules)).await
        } else {
            self.state.version()
        };
        if let Ok(mut r) = self.rules.lock() {
            r.clone_from(&rules);
        }
        if added {
            crate::audit::rule_change(&crate::audit::RuleChange {
                action: "add",
                origin: by.origin,
                target: Some((&rule.host, rule.port.unwrap_or(0))),
                rule: Some((&rule.protocol, &rule.decision)),
                count: 1,
                actor: by.actor,
                client_address: by.client,
                policy_version: version,
            });
        }
        Ok((added, version, rules))
    }
}

/// Who asked for a rules-file change, for its `portcullis.rule_change` record.
#[derive(Clone, Copy)]
struct ChangeSource<'a> {
    /// `api` or `approval`.
    origin: &'static str,
    actor: &'a str,
    client: &'a str,
}

/// Lines in one rule list and not the other: what a reload changed.
fn lines_changed(old: &[crate::rules::Rule], new: &[crate::rules::Rule]) -> usize {
    let text = |rules: &[crate::rules::Rule]| -> std::collections::HashSet<String> {
        rules.iter().map(crate::rules::Rule::canonical).collect()
    };
    let (a, b) = (text(old), text(new));
    a.symmetric_difference(&b).count()
}

/// `ask_` + 16 lowercase hex.
fn valid_ask_id(s: &str) -> bool {
    s.strip_prefix("ask_").is_some_and(|h| {
        h.len() == 16
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Validates an AskRequest's fields (control.md §2, §6 rule 6).
fn check_ask(req: &v1::AskRequest) -> Result<(), String> {
    if req.ask_ref == 0 {
        return Err("ask_ref: must be greater than 0".into());
    }
    if !matches!(
        req.protocol.as_str(),
        "http" | "https_connect" | "socks5_tcp" | "socks5_udp"
    ) {
        return Err(format!("protocol: invalid label {:?}", req.protocol));
    }
    if !(1..=65535).contains(&req.port) {
        return Err("port: must be between 1 and 65535".into());
    }
    match portcullis::policy::normalize_host(&req.host) {
        Ok(h) if h.to_string() == req.host => Ok(()),
        Ok(_) => Err("host: not normalised".into()),
        Err(e) => Err(format!("host: {e}")),
    }
}

/// The approver's address for audit records: the gRPC peer IP, `unix` without one.
fn peer_label<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map_or_else(|| "unix".to_string(), |a| a.ip().to_string())
}

fn actor_of(a: Option<String>) -> Result<String, Status> {
    let actor = a.unwrap_or_else(|| "api".into());
    if actor.is_empty() || actor.chars().count() > 128 || actor.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "actor: must be 1-128 characters without control characters",
        ));
    }
    Ok(actor)
}

/// `[A-Za-z0-9][A-Za-z0-9._:-]{0,127}` (control.md §2).
fn valid_session_id(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
}

#[tonic::async_trait]
impl DataPlane for Services {
    type AttachStream = BoxStream<v1::ControlMessage>;

    async fn attach(
        &self,
        request: Request<Streaming<v1::ProxyMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut inbound = request.into_inner();
        let first = match tokio::time::timeout(Duration::from_secs(5), inbound.message()).await {
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 5 s")),
            Ok(Err(e)) => {
                return Err(Status::invalid_argument(format!(
                    "undecodable message: {e}"
                )));
            }
            Ok(Ok(None)) => return Err(Status::invalid_argument("stream ended before Hello")),
            Ok(Ok(Some(m))) => m,
        };
        let Some(v1::proxy_message::Msg::Hello(hello)) = first.msg else {
            return Err(Status::invalid_argument("the first message must be Hello"));
        };
        if hello.protocol_version != 1 {
            return Err(Status::failed_precondition(format!(
                "unsupported data-plane protocol version {} (this control plane speaks 1)",
                hello.protocol_version
            )));
        }
        if !valid_session_id(&hello.session_id) {
            return Err(Status::invalid_argument("session_id: invalid"));
        }
        if !hello.proxy_id.starts_with("px-") || hello.proxy_id.len() != 15 {
            return Err(Status::invalid_argument(
                "proxy_id: must be px- followed by 12 hex digits",
            ));
        }
        if !self.state.requirements().listeners_permitted(&[
            &hello.http_addr,
            &hello.socks5_addr,
            &hello.admin_addr,
        ]) {
            return Err(Status::failed_precondition(
                "a listener is not on loopback and enterprise requirements forbid non-loopback proxies",
            ));
        }
        let state = self.state.clone();
        let snapshot = state.snapshot_for(&hello.session_id);
        let info = v1::ProxyInfo {
            proxy_id: hello.proxy_id.clone(),
            session_id: hello.session_id.clone(),
            version: hello.version.clone(),
            http_addr: hello.http_addr.clone(),
            socks5_addr: hello.socks5_addr.clone(),
            admin_addr: hello.admin_addr.clone(),
            peer,
            connected_at: Some(timestamp(SystemTime::now())),
            sent_version: snapshot.version,
            acked_version: 0,
            in_sync: false,
        };
        let (tx, rx) = mpsc::channel::<Result<v1::ControlMessage, Status>>(64);
        let (stream_no, replaced) = state.attach(info, tx.clone());
        if replaced {
            tracing::info!(proxy_id = %hello.proxy_id, "a newer stream superseded the previous one");
        }
        let _ = tx
            .send(Ok(v1::ControlMessage {
                msg: Some(v1::control_message::Msg::Snapshot(snapshot)),
            }))
            .await;
        tracing::info!(proxy_id = %hello.proxy_id, session_id = %hello.session_id, "data plane attached");
        let approvals = self.approvals.clone();
        let ask_timeout = self.ask_timeout;
        tokio::spawn(async move {
            let mut open_refs: std::collections::HashSet<u64> = std::collections::HashSet::new();
            loop {
                let next = tokio::select! {
                    m = inbound.message() => m,
                    _ = tx.closed() => break,
                };
                if !state.is_current(&hello.proxy_id, stream_no) {
                    let _ = tx
                        .send(Err(Status::aborted("superseded by a newer stream")))
                        .await;
                    break;
                }
                let msg = match next {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "attach stream ended");
                        break;
                    }
                };
                match msg.msg {
                    Some(v1::proxy_message::Msg::Decision(mut d)) => {
                        // Identity comes from the Hello, never from the report.
                        d.proxy_id = hello.proxy_id.clone();
                        d.session_id = hello.session_id.clone();
                        let _ = state.decisions.send(d);
                    }
                    Some(v1::proxy_message::Msg::SnapshotAck(ack)) => {
                        if !ack.applied {
                            tracing::error!(proxy_id = %hello.proxy_id, error = %ack.error, "proxy could not apply snapshot");
                        }
                        state.acked(&hello.proxy_id, stream_no, ack.version, ack.applied);
                    }
                    Some(v1::proxy_message::Msg::Hello(_)) => {
                        let _ = tx
                            .send(Err(Status::invalid_argument("a second Hello")))
                            .await;
                        break;
                    }
                    Some(v1::proxy_message::Msg::Ask(req)) => {
                        if let Err(e) = check_ask(&req) {
                            let _ = tx.send(Err(Status::invalid_argument(e))).await;
                            break;
                        }
                        if req.hold && !open_refs.insert(req.ask_ref) {
                            let _ = tx
                                .send(Err(Status::invalid_argument(
                                    "ask_ref: already open on this stream",
                                )))
                                .await;
                            break;
                        }
                        let ask_ref = req.ask_ref;
                        let hold = req.hold;
                        let a = AskIn {
                            proxy_id: hello.proxy_id.clone(),
                            session_id: hello.session_id.clone(),
                            stream_no,
                            req,
                            tx: tx.clone(),
                        };
                        match approvals.ask(a).await {
                            Ok((id, true)) => {
                                let approvals = approvals.clone();
                                tokio::spawn(async move {
                                    tokio::time::sleep(ask_timeout).await;
                                    approvals.expire(&id).await;
                                });
                            }
                            Ok((_, false)) => {}
                            Err(reason) if hold => {
                                let msg = v1::ControlMessage {
                                    msg: Some(v1::control_message::Msg::AskAnswer(v1::AskAnswer {
                                        ask_ref,
                                        ask_id: String::new(),
                                        verdict: "deny".into(),
                                        reason: reason.into(),
                                        outcome: v1::Outcome::Unspecified as i32,
                                        actor: String::new(),
                                    })),
                                };
                                let _ = tx.send(Ok(msg)).await;
                            }
                            Err(_) => {}
                        }
                    }
                    Some(v1::proxy_message::Msg::AskCancel(c)) => {
                        // An unknown ask_ref is ignored (answer/cancel race).
                        open_refs.remove(&c.ask_ref);
                        approvals.cancel(&hello.proxy_id, stream_no, c.ask_ref);
                    }
                    None => {
                        let _ = tx
                            .send(Err(Status::invalid_argument("empty message")))
                            .await;
                        break;
                    }
                }
            }
            approvals.stream_gone(&hello.proxy_id, stream_no);
            state.detach(&hello.proxy_id, stream_no);
            tracing::info!(proxy_id = %hello.proxy_id, "data plane detached");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl Control for Services {
    async fn approve(
        &self,
        request: Request<v1::ApproveRequest>,
    ) -> Result<Response<v1::ApproveResponse>, Status> {
        let peer = peer_label(&request);
        let deadline = crate::reevaluate::request_deadline(&request);
        let r = request.into_inner();
        check_pending_id(&r.pending_id)?;
        let actor = actor_of(r.actor)?;
        // No approval outside what the enterprise requirements permit (requirements.md §6).
        if let Ok(ask) = self.approvals.get(&r.pending_id) {
            self.state
                .requirements()
                .check_allow(&ask.host, u16::try_from(ask.port).unwrap_or(0))
                .map_err(Status::failed_precondition)?;
        }
        let (outcome, persist_failed) = match v1::ApprovalScope::try_from(r.scope) {
            Ok(v1::ApprovalScope::Once) => (v1::Outcome::AllowOnce, None),
            Ok(v1::ApprovalScope::Session) => {
                let ask = self.approvals.get(&r.pending_id)?;
                if self.state.session_allow_count(&ask.session_id) >= self.max_session_allows {
                    // The ask stays pending (control.md §7.12).
                    return Err(Status::resource_exhausted(format!(
                        "session {} already has {} session allows (approvals.max_session_allows)",
                        ask.session_id, self.max_session_allows
                    )));
                }
                (v1::Outcome::AllowSession, None)
            }
            Ok(v1::ApprovalScope::Always) => {
                // Persist first: the new snapshot reaches the proxies before the answer.
                let ask = self.approvals.get(&r.pending_id)?;
                let rule = always_rule(&ask, true, r.justification.clone(), &actor);
                let by = ChangeSource {
                    origin: "approval",
                    actor: &actor,
                    client: &peer,
                };
                match self.persist(rule, by).await {
                    Ok(_) => (v1::Outcome::AllowAlways, None),
                    Err(e) => {
                        tracing::error!(
                            "could not persist rule: {e}; applying as allow_session only"
                        );
                        (v1::Outcome::AllowSession, Some(e))
                    }
                }
            }
            _ => {
                return Err(Status::invalid_argument(
                    "scope: must be ONCE, SESSION or ALWAYS",
                ));
            }
        };
        let (ask, mut policy_version) = self
            .approvals
            .resolve_by(
                &self.state,
                &r.pending_id,
                outcome,
                &actor,
                "approval_denied",
                &peer,
                r.justification.as_deref(),
            )
            .await?;
        if outcome == v1::Outcome::AllowAlways {
            policy_version = self.state.version();
            // The new rule may decide other pending asks too.
            self.resolve_asks_by_policy().await;
        }
        if let Some(e) = persist_failed {
            return Err(Status::internal(format!(
                "could not persist rule: {e}; applied as allow_session only (ask {})",
                ask.id
            )));
        }
        let session = (outcome == v1::Outcome::AllowSession).then_some(ask.session_id.as_str());
        let (enforced, lagging_proxies) = self
            .enforcement(r.wait_for_enforcement, policy_version, session, deadline)
            .await;
        Ok(Response::new(v1::ApproveResponse {
            ask: Some(ask),
            outcome: outcome as i32,
            policy_version,
            enforced,
            lagging_proxies,
        }))
    }

    async fn deny(
        &self,
        request: Request<v1::DenyRequest>,
    ) -> Result<Response<v1::DenyResponse>, Status> {
        let peer = peer_label(&request);
        let deadline = crate::reevaluate::request_deadline(&request);
        let r = request.into_inner();
        check_pending_id(&r.pending_id)?;
        let actor = actor_of(r.actor)?;
        let (outcome, persist_failed) = match v1::ApprovalScope::try_from(r.scope) {
            Ok(v1::ApprovalScope::Once) => (v1::Outcome::DenyOnce, None),
            Ok(v1::ApprovalScope::Always) => {
                let ask = self.approvals.get(&r.pending_id)?;
                let rule = always_rule(&ask, false, r.justification.clone(), &actor);
                let by = ChangeSource {
                    origin: "approval",
                    actor: &actor,
                    client: &peer,
                };
                match self.persist(rule, by).await {
                    Ok(_) => (v1::Outcome::DenyAlways, None),
                    Err(e) => {
                        tracing::error!("could not persist rule: {e}; applying as deny_once only");
                        (v1::Outcome::DenyOnce, Some(e))
                    }
                }
            }
            _ => return Err(Status::invalid_argument("scope: must be ONCE or ALWAYS")),
        };
        let (ask, _) = self
            .approvals
            .resolve_by(
                &self.state,
                &r.pending_id,
                outcome,
                &actor,
                "approval_denied",
                &peer,
                r.justification.as_deref(),
            )
            .await?;
        if let Some(e) = persist_failed {
            return Err(Status::internal(format!(
                "could not persist rule: {e}; applied as deny_once only (ask {})",
                ask.id
            )));
        }
        let policy_version = if outcome == v1::Outcome::DenyAlways {
            self.resolve_asks_by_policy().await;
            self.state.version()
        } else {
            0
        };
        let (enforced, lagging_proxies) = self
            .enforcement(r.wait_for_enforcement, policy_version, None, deadline)
            .await;
        Ok(Response::new(v1::DenyResponse {
            ask: Some(ask),
            outcome: outcome as i32,
            policy_version,
            enforced,
            lagging_proxies,
        }))
    }

    async fn list_pending(
        &self,
        request: Request<v1::ListPendingRequest>,
    ) -> Result<Response<v1::ListPendingResponse>, Status> {
        let session = request.into_inner().session_id;
        Ok(Response::new(v1::ListPendingResponse {
            asks: self.approvals.list(session.as_deref()),
        }))
    }

    type WatchPendingStream = BoxStream<v1::PendingEvent>;

    async fn watch_pending(
        &self,
        request: Request<v1::WatchPendingRequest>,
    ) -> Result<Response<Self::WatchPendingStream>, Status> {
        let session = request.into_inner().session_id;
        // Subscribe before listing, so no event falls between the listing and the live stream.
        let mut live = self.approvals.events.subscribe();
        let approvals = self.approvals.clone();
        let (tx, rx) = mpsc::channel::<Result<v1::PendingEvent, Status>>(64);
        tokio::spawn(async move {
            let listing = |approvals: &Approvals| {
                let mut v: Vec<v1::PendingEvent> = approvals
                    .list(session.as_deref())
                    .into_iter()
                    .map(|ask| v1::PendingEvent {
                        event: Some(v1::pending_event::Event::Created(
                            v1::pending_event::Created {
                                ask: Some(ask),
                                initial: true,
                            },
                        )),
                    })
                    .collect();
                v.push(v1::PendingEvent {
                    event: Some(v1::pending_event::Event::Synced(
                        v1::pending_event::Synced {},
                    )),
                });
                v
            };
            for e in listing(&approvals) {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            loop {
                let e = match live.recv().await {
                    Ok(e) => e,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        // A slow watcher learns how much it missed, then gets the state again.
                        let lagged = v1::PendingEvent {
                            event: Some(v1::pending_event::Event::Lagged(
                                v1::pending_event::Lagged { missed },
                            )),
                        };
                        if tx.send(Ok(lagged)).await.is_err() {
                            return;
                        }
                        for e in listing(&approvals) {
                            if tx.send(Ok(e)).await.is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let ask_session = match &e.event {
                    Some(v1::pending_event::Event::Created(c)) => {
                        c.ask.as_ref().map(|a| a.session_id.clone())
                    }
                    Some(v1::pending_event::Event::Resolved(r)) => {
                        r.ask.as_ref().map(|a| a.session_id.clone())
                    }
                    Some(v1::pending_event::Event::Expired(x)) => {
                        x.ask.as_ref().map(|a| a.session_id.clone())
                    }
                    _ => None,
                };
                if session
                    .as_ref()
                    .is_some_and(|s| ask_session.as_ref() != Some(s))
                {
                    continue;
                }
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_policy(
        &self,
        request: Request<v1::GetPolicyRequest>,
    ) -> Result<Response<v1::PolicyView>, Status> {
        let session = request
            .into_inner()
            .session_id
            .unwrap_or_else(|| "default".into());
        let snapshot = self.state.snapshot_for(&session);
        let entries = self.state.entries();
        let requirements = self.state.requirements();
        Ok(Response::new(v1::PolicyView {
            version: snapshot.version,
            control_instance_id: self.state.instance_id.clone(),
            snapshot: Some(snapshot),
            entries,
            managed_allowed_domains_only: requirements.managed_only(),
            requirements: Some(requirements.status),
            proxies: self.state.proxies(),
        }))
    }

    type WatchDecisionsStream = BoxStream<v1::DecisionEvent>;

    async fn watch_decisions(
        &self,
        request: Request<v1::WatchDecisionsRequest>,
    ) -> Result<Response<Self::WatchDecisionsStream>, Status> {
        let filter = request.into_inner();
        let rx = self.state.decisions.subscribe();
        let stream =
            tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |item| match item {
                Ok(d) => {
                    let wanted = (filter.include_allows || d.decision != "allow")
                        && filter
                            .session_id
                            .as_ref()
                            .is_none_or(|s| *s == d.session_id)
                        && filter.proxy_id.as_ref().is_none_or(|p| *p == d.proxy_id);
                    wanted.then(|| {
                        Ok(v1::DecisionEvent {
                            event: Some(v1::decision_event::Event::Decision(d)),
                        })
                    })
                }
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(missed)) => {
                    Some(Ok(v1::DecisionEvent {
                        event: Some(v1::decision_event::Event::Lagged(
                            v1::decision_event::Lagged { missed },
                        )),
                    }))
                }
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn add_rule(
        &self,
        request: Request<v1::AddRuleRequest>,
    ) -> Result<Response<v1::AddRuleResponse>, Status> {
        let deadline = crate::reevaluate::request_deadline(&request);
        let peer = peer_label(&request);
        let r = request.into_inner();
        let rule = rule_from_request(&r)?;
        let actor = actor_of(r.actor.clone())?;
        // Deny rules are always accepted; allows must respect the requirements.
        if rule.decision == "allow" {
            self.state
                .requirements()
                .check_allow(&rule.host, rule.port.unwrap_or(0))
                .map_err(Status::failed_precondition)?;
        }
        let line = rule.canonical();
        let by = ChangeSource {
            origin: "api",
            actor: &actor,
            client: &peer,
        };
        let (added, version, rules) = self
            .persist(rule, by)
            .await
            .map_err(Status::failed_precondition)?;
        if added {
            self.resolve_asks_by_policy().await;
        }
        let (enforced, lagging_proxies) = self
            .enforcement(r.wait_for_enforcement, version, None, deadline)
            .await;
        let entry = rules
            .iter()
            .find(|r| r.canonical() == line)
            .map(|r| v1::RuleEntry {
                line: r.line as u32,
                text: line.clone(),
                host: r.host.clone(),
                protocol: r.protocol.clone(),
                decision: r.decision.clone(),
                port: r.port.map_or(0, u32::from),
                justification: r.justification.clone().unwrap_or_default(),
                effective: true,
                ignored_reason: String::new(),
            });
        Ok(Response::new(v1::AddRuleResponse {
            rule: entry,
            added,
            policy_version: version,
            enforced,
            lagging_proxies,
        }))
    }

    async fn remove_rule(
        &self,
        request: Request<v1::RemoveRuleRequest>,
    ) -> Result<Response<v1::RemoveRuleResponse>, Status> {
        let deadline = crate::reevaluate::request_deadline(&request);
        let peer = peer_label(&request);
        let r = request.into_inner();
        let actor = actor_of(r.actor.clone())?;
        let host = crate::rules::host::parse_host(&r.host)
            .map_err(|m| Status::invalid_argument(format!("host: {m}")))?;
        let port = match r.port {
            0 => host.port,
            p @ 1..=65535 => Some(p as u16),
            _ => {
                return Err(Status::invalid_argument(
                    "port: must be between 1 and 65535",
                ));
            }
        };
        let path = self.rules_path.clone();
        let name = host.host.clone();
        let written =
            tokio::task::spawn_blocking(move || crate::rules::store::remove(&path, &name, port))
                .await
                .map_err(|e| Status::internal(format!("rules writer failed: {e}")))?;
        let (removed, rules) = match written {
            Ok(w) => w,
            Err(e) => {
                tracing::error!("rules file not written: {e}");
                self.reload_rules().await;
                return Err(Status::failed_precondition(e));
            }
        };
        self.set_rules_error(String::new());
        if removed == 0 {
            return Err(Status::not_found(format!(
                "no rule for {}{}",
                host.host,
                port.map(|p| format!(":{p}")).unwrap_or_default()
            )));
        }
        let version = self.state.set_rules(&crate::rules::compile(&rules)).await;
        if let Ok(mut cur) = self.rules.lock() {
            *cur = rules;
        }
        crate::audit::rule_change(&crate::audit::RuleChange {
            action: "remove",
            origin: "api",
            target: Some((&host.host, port.unwrap_or(0))),
            rule: None,
            count: removed,
            actor: &actor,
            client_address: &peer,
            policy_version: version,
        });
        self.resolve_asks_by_policy().await;
        let (enforced, lagging_proxies) = self
            .enforcement(r.wait_for_enforcement, version, None, deadline)
            .await;
        Ok(Response::new(v1::RemoveRuleResponse {
            removed: removed as u32,
            policy_version: version,
            enforced,
            lagging_proxies,
        }))
    }

    async fn list_rules(
        &self,
        _: Request<v1::ListRulesRequest>,
    ) -> Result<Response<v1::ListRulesResponse>, Status> {
        // Effective = the last allow/deny line of its (host, port) key.
        let rules = self.rules.lock().map(|r| r.clone()).unwrap_or_default();
        let entries = rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let later = rules[i + 1..]
                    .iter()
                    .any(|o| o.decision != "prompt" && o.host == r.host && o.port == r.port);
                v1::RuleEntry {
                    line: r.line as u32,
                    text: r.canonical(),
                    host: r.host.clone(),
                    protocol: r.protocol.clone(),
                    decision: r.decision.clone(),
                    port: r.port.map_or(0, u32::from),
                    justification: r.justification.clone().unwrap_or_default(),
                    effective: r.decision != "prompt" && !later,
                    ignored_reason: String::new(),
                }
            })
            .collect();
        Ok(Response::new(v1::ListRulesResponse { rules: entries }))
    }

    async fn list_proxies(
        &self,
        _: Request<v1::ListProxiesRequest>,
    ) -> Result<Response<v1::ListProxiesResponse>, Status> {
        Ok(Response::new(v1::ListProxiesResponse {
            proxies: self.state.proxies(),
        }))
    }

    async fn end_session(
        &self,
        request: Request<v1::EndSessionRequest>,
    ) -> Result<Response<v1::EndSessionResponse>, Status> {
        let session = request.into_inner().session_id;
        if !valid_session_id(&session) {
            return Err(Status::invalid_argument("session_id: invalid"));
        }
        let cancelled = self.approvals.end_session(&session).await;
        let (removed, version) = self.state.end_session(&session).await;
        Ok(Response::new(v1::EndSessionResponse {
            cancelled_asks: cancelled as u32,
            removed_session_allows: removed as u32,
            policy_version: version.unwrap_or_else(|| self.state.version()),
        }))
    }

    async fn get_status(
        &self,
        _: Request<v1::GetStatusRequest>,
    ) -> Result<Response<v1::ControlStatus>, Status> {
        Ok(Response::new(v1::ControlStatus {
            control_instance_id: self.state.instance_id.clone(),
            version: self.state.version(),
            started_at: Some(timestamp(self.state.started_at)),
            requirements: Some(self.state.requirements().status),
            attached_proxies: self.state.proxies().len() as u32,
            pending_asks: self.approvals.list(None).len() as u32,
            rules_path: self.rules_path.display().to_string(),
            rules_count: self.rules.lock().map(|r| r.len() as u32).unwrap_or(0),
            audit_events_total: crate::audit::counts().total,
            audit_events_exported: crate::audit::counts().exported,
            audit_events_dropped: crate::audit::counts().dropped(),
            rules_error: self
                .rules_error
                .lock()
                .map(|e| e.clone())
                .unwrap_or_default(),
        }))
    }
}
