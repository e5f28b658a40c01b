//! Pending asks (control.md §7): one PendingAsk per (session, host, protocol, port) shared by
//! every waiting request, one deadline set by the first, answers fanned out to every waiter.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use portcullis::proto::v1;
use tokio::sync::mpsc;
use tonic::Status;

use crate::state::{ControlState, timestamp};

type Outbound = mpsc::Sender<Result<v1::ControlMessage, Status>>;

/// (session, host, protocol label, port).
type Key = (String, String, String, u32);

struct Waiter {
    proxy_id: String,
    stream_no: u64,
    ask_ref: u64,
    tx: Outbound,
}

struct Pending {
    ask: v1::PendingAsk,
    key: Key,
    waiters: Vec<Waiter>,
}

/// How an ask ended, remembered for `FAILED_PRECONDITION` answers.
struct Ended {
    id: String,
    summary: String,
}

/// Limits from `[approvals]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `approvals.ask_timeout_secs`.
    pub timeout: Duration,
    /// `approvals.max_pending`.
    pub max_pending: usize,
    /// `approvals.max_waiters_per_ask`.
    pub max_waiters: usize,
}

/// The pending asks.
pub struct Approvals {
    limits: Limits,
    inner: Mutex<Inner>,
    /// Live `PendingEvent`s for `WatchPending`.
    pub events: tokio::sync::broadcast::Sender<v1::PendingEvent>,
}

fn event(e: v1::pending_event::Event) -> v1::PendingEvent {
    v1::PendingEvent { event: Some(e) }
}

#[derive(Default)]
struct Inner {
    pending: HashMap<String, Pending>,
    by_key: HashMap<Key, String>,
    ended: VecDeque<Ended>,
}

/// A request to ask, as the stream received it.
pub struct AskIn {
    /// Stream identity.
    pub proxy_id: String,
    /// Session of the stream.
    pub session_id: String,
    /// Which stream (a superseded one's waiters are released).
    pub stream_no: u64,
    /// The request.
    pub req: v1::AskRequest,
    /// Where answers go.
    pub tx: Outbound,
}

/// An ask ended by the system (expiry, cancel): actor `system`, address `unknown`.
fn system_end(outcome: Option<v1::Outcome>, waiters: usize) -> crate::audit::Resolution<'static> {
    crate::audit::Resolution {
        outcome,
        actor: "system",
        client_address: "unknown",
        waiters,
        persisted: false,
        policy_version: 0,
        justification: None,
    }
}

fn new_ask_id() -> String {
    // Kept as before: an unreadable /dev/urandom yields zeros (noted as a follow-up).
    let hex = portcullis::secret::random_hex(8).unwrap_or_else(|_| "0".repeat(16));
    format!("ask_{hex}")
}

fn answer(
    ask_ref: u64,
    ask_id: &str,
    allow: bool,
    reason: &str,
    outcome: v1::Outcome,
    actor: &str,
) -> v1::ControlMessage {
    v1::ControlMessage {
        msg: Some(v1::control_message::Msg::AskAnswer(v1::AskAnswer {
            ask_ref,
            ask_id: ask_id.to_string(),
            verdict: if allow { "allow" } else { "deny" }.into(),
            reason: if allow {
                String::new()
            } else {
                reason.to_string()
            },
            outcome: outcome as i32,
            actor: actor.to_string(),
        })),
    }
}

impl Approvals {
    /// An empty set of asks.
    pub fn new(limits: Limits, watch_buffer: usize) -> Approvals {
        Approvals {
            limits,
            inner: Mutex::new(Inner::default()),
            events: tokio::sync::broadcast::channel(watch_buffer.max(1)).0,
        }
    }

    /// Registers a waiter (creating the ask if new). Returns the ask id and whether it is new
    /// (the caller schedules the expiry of new asks), or the deny reason when over a cap.
    pub async fn ask(&self, a: AskIn) -> Result<(String, bool), &'static str> {
        let key: Key = (
            a.session_id.clone(),
            a.req.host.clone(),
            a.req.protocol.clone(),
            a.req.port,
        );
        let mut inner = self.inner.lock().map_err(|_| "approvals_full")?;
        let waiter = Waiter {
            proxy_id: a.proxy_id.clone(),
            stream_no: a.stream_no,
            ask_ref: a.req.ask_ref,
            tx: a.tx,
        };
        if let Some(id) = inner.by_key.get(&key).cloned() {
            let max = self.limits.max_waiters;
            let p = inner.pending.get_mut(&id).ok_or("approvals_full")?;
            if p.waiters.len() >= max {
                return Err("approvals_full");
            }
            if a.req.hold {
                p.waiters.push(waiter);
                p.ask.waiters = p.waiters.len() as u32;
            }
            if !p.ask.proxy_ids.contains(&a.proxy_id) {
                p.ask.proxy_ids.push(a.proxy_id);
            }
            return Ok((id, false));
        }
        if inner.pending.len() >= self.limits.max_pending {
            return Err("approvals_full");
        }
        let id = new_ask_id();
        let now = SystemTime::now();
        let ask = v1::PendingAsk {
            id: id.clone(),
            session_id: a.session_id,
            host: a.req.host,
            port: a.req.port,
            protocol: a.req.protocol,
            method: a.req.method,
            client_address: a.req.client_address,
            proxy_ids: vec![a.proxy_id],
            waiters: u32::from(a.req.hold),
            decision_id: a.req.decision_id,
            created_at: Some(timestamp(now)),
            expires_at: Some(timestamp(now + self.limits.timeout)),
        };
        let waiters = if a.req.hold { vec![waiter] } else { Vec::new() };
        let _ = self.events.send(event(v1::pending_event::Event::Created(
            v1::pending_event::Created {
                ask: Some(ask.clone()),
                initial: false,
            },
        )));
        inner.by_key.insert(key.clone(), id.clone());
        inner
            .pending
            .insert(id.clone(), Pending { ask, key, waiters });
        Ok((id, true))
    }

    /// A client gave up waiting: the waiter goes, the ask stays (its answer helps retries).
    pub fn cancel(&self, proxy_id: &str, stream_no: u64, ask_ref: u64) {
        if let Ok(mut inner) = self.inner.lock() {
            for p in inner.pending.values_mut() {
                p.waiters.retain(|w| {
                    !(w.proxy_id == proxy_id && w.stream_no == stream_no && w.ask_ref == ask_ref)
                });
                p.ask.waiters = p.waiters.len() as u32;
            }
        }
    }

    /// A stream ended: its waiters are gone.
    pub fn stream_gone(&self, proxy_id: &str, stream_no: u64) {
        if let Ok(mut inner) = self.inner.lock() {
            for p in inner.pending.values_mut() {
                p.waiters
                    .retain(|w| !(w.proxy_id == proxy_id && w.stream_no == stream_no));
                p.ask.waiters = p.waiters.len() as u32;
            }
        }
    }

    /// Pending asks, oldest first, optionally of one session.
    pub fn list(&self, session: Option<&str>) -> Vec<v1::PendingAsk> {
        let mut v: Vec<v1::PendingAsk> = self
            .inner
            .lock()
            .map(|i| {
                i.pending
                    .values()
                    .filter(|p| session.is_none_or(|s| p.ask.session_id == s))
                    .map(|p| p.ask.clone())
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by_key(|a| a.created_at.map(|t| (t.seconds, t.nanos)));
        v
    }

    /// The pending ask `id` (not removed), or the same errors `resolve` would give.
    pub fn get(&self, id: &str) -> Result<v1::PendingAsk, Status> {
        let inner = self
            .inner
            .lock()
            .map_err(|_| Status::internal("approvals state poisoned"))?;
        if let Some(p) = inner.pending.get(id) {
            return Ok(p.ask.clone());
        }
        match inner.ended.iter().find(|e| e.id == id) {
            Some(e) => Err(Status::failed_precondition(format!(
                "ask {id} is no longer pending: {}",
                e.summary
            ))),
            None => Err(Status::not_found(format!("pending_id: no ask {id}"))),
        }
    }

    fn take(&self, id: &str) -> Result<Pending, Status> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| Status::internal("approvals state poisoned"))?;
        match inner.pending.remove(id) {
            Some(p) => {
                inner.by_key.remove(&p.key);
                Ok(p)
            }
            None => match inner.ended.iter().find(|e| e.id == id) {
                Some(e) => Err(Status::failed_precondition(format!(
                    "ask {id} is no longer pending: {}",
                    e.summary
                ))),
                None => Err(Status::not_found(format!("pending_id: no ask {id}"))),
            },
        }
    }

    fn remember(&self, id: &str, summary: String) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.ended.push_back(Ended {
                id: id.to_string(),
                summary,
            });
            while inner.ended.len() > 4096 {
                inner.ended.pop_front();
            }
        }
    }

    /// Resolves an ask and answers every waiter; session allows are pushed first so released
    /// requests and later ones see the same policy (control.md §6 rule 7).
    /// (Kept for callers without an approver address.)
    #[allow(dead_code)]
    pub async fn resolve(
        &self,
        state: &Arc<ControlState>,
        id: &str,
        outcome: v1::Outcome,
        actor: &str,
    ) -> Result<(v1::PendingAsk, u64), Status> {
        self.resolve_with_reason(state, id, outcome, actor, "approval_denied")
            .await
    }

    /// [`Approvals::resolve`] with the reason denied waiters get (`denied` or `not_allowed`
    /// when a policy change resolved the ask, control.md §7 rule 10).
    pub async fn resolve_with_reason(
        &self,
        state: &Arc<ControlState>,
        id: &str,
        outcome: v1::Outcome,
        actor: &str,
        deny_reason: &str,
    ) -> Result<(v1::PendingAsk, u64), Status> {
        self.resolve_by(state, id, outcome, actor, deny_reason, "unknown", None)
            .await
    }

    /// [`Approvals::resolve_with_reason`], naming the approver's address (`client.address` of
    /// the `portcullis.approval` audit record) and the justification, if any.
    #[allow(clippy::too_many_arguments)]
    pub async fn resolve_by(
        &self,
        state: &Arc<ControlState>,
        id: &str,
        outcome: v1::Outcome,
        actor: &str,
        deny_reason: &str,
        client_address: &str,
        justification: Option<&str>,
    ) -> Result<(v1::PendingAsk, u64), Status> {
        let p = self.take(id)?;
        let allow = matches!(
            outcome,
            v1::Outcome::AllowOnce
                | v1::Outcome::AllowSession
                | v1::Outcome::AllowAlways
                | v1::Outcome::PolicyAllow
        );
        let mut version = 0;
        if outcome == v1::Outcome::AllowSession {
            version = state
                .add_session_allow(&p.ask.session_id, &p.ask.host, &p.ask.protocol, p.ask.port)
                .await
                .unwrap_or_else(|| state.version());
        }
        let label = portcullis::proto::outcome_label(outcome as i32);
        for w in &p.waiters {
            let _ =
                w.tx.send(Ok(answer(
                    w.ask_ref,
                    id,
                    allow,
                    deny_reason,
                    outcome,
                    actor,
                )))
                .await;
        }
        self.remember(id, format!("{label} by {actor}"));
        let persisted = matches!(outcome, v1::Outcome::AllowAlways | v1::Outcome::DenyAlways);
        // Policy changes are the system's doing (audit.md §3).
        let by_policy = matches!(outcome, v1::Outcome::PolicyAllow | v1::Outcome::PolicyDeny);
        crate::audit::approval(
            &p.ask,
            &crate::audit::Resolution {
                outcome: Some(outcome),
                actor: if by_policy { "system" } else { actor },
                client_address: if by_policy { "unknown" } else { client_address },
                waiters: p.waiters.len(),
                persisted,
                policy_version: if persisted { state.version() } else { version },
                justification,
            },
        );
        let _ = self.events.send(event(v1::pending_event::Event::Resolved(
            v1::pending_event::Resolved {
                ask: Some(p.ask.clone()),
                outcome: outcome as i32,
                actor: actor.to_string(),
                justification: String::new(),
                resolved_at: Some(timestamp(SystemTime::now())),
                policy_version: version,
            },
        )));
        Ok((p.ask, version))
    }

    /// The deadline passed: every waiter is denied `approval_timeout`.
    pub async fn expire(&self, id: &str) {
        let Ok(p) = self.take(id) else { return };
        for w in &p.waiters {
            let _ =
                w.tx.send(Ok(answer(
                    w.ask_ref,
                    id,
                    false,
                    "approval_timeout",
                    v1::Outcome::Unspecified,
                    "",
                )))
                .await;
        }
        self.remember(id, "expired".into());
        crate::audit::approval(&p.ask, &system_end(None, p.waiters.len()));
        let _ = self.events.send(event(v1::pending_event::Event::Expired(
            v1::pending_event::Expired { ask: Some(p.ask) },
        )));
    }

    /// `EndSession`: every pending ask of `session` is cancelled; its waiters are denied
    /// `session_ended`. Returns how many asks were cancelled.
    pub async fn end_session(&self, session: &str) -> usize {
        let ended: Vec<Pending> = match self.inner.lock() {
            Ok(mut i) => {
                let ids: Vec<String> = i
                    .pending
                    .iter()
                    .filter(|(_, p)| p.ask.session_id == session)
                    .map(|(id, _)| id.clone())
                    .collect();
                ids.iter()
                    .filter_map(|id| {
                        let p = i.pending.remove(id)?;
                        i.by_key.remove(&p.key);
                        Some(p)
                    })
                    .collect()
            }
            Err(_) => return 0,
        };
        for p in &ended {
            for w in &p.waiters {
                let _ =
                    w.tx.send(Ok(answer(
                        w.ask_ref,
                        &p.ask.id,
                        false,
                        "session_ended",
                        v1::Outcome::Cancelled,
                        "",
                    )))
                    .await;
            }
            self.remember(&p.ask.id, "cancelled (session ended)".into());
            crate::audit::approval(
                &p.ask,
                &system_end(Some(v1::Outcome::Cancelled), p.waiters.len()),
            );
        }
        ended.len()
    }

    /// Shutdown: every pending ask is answered `control_unavailable`.
    pub async fn shutdown(&self) {
        let all: Vec<Pending> = match self.inner.lock() {
            Ok(mut i) => {
                i.by_key.clear();
                i.pending.drain().map(|(_, p)| p).collect()
            }
            Err(_) => return,
        };
        for p in all {
            crate::audit::approval(
                &p.ask,
                &system_end(Some(v1::Outcome::Cancelled), p.waiters.len()),
            );
            for w in &p.waiters {
                let _ =
                    w.tx.send(Ok(answer(
                        w.ask_ref,
                        &p.ask.id,
                        false,
                        "control_unavailable",
                        v1::Outcome::Cancelled,
                        "",
                    )))
                    .await;
            }
        }
    }
}
