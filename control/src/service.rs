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

use crate::state::{ControlState, timestamp};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Both services share the state.
#[derive(Clone)]
pub struct Services {
    /// The shared state.
    pub state: Arc<ControlState>,
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
        let (stream_no, replaced) = state.attach(info);
        if replaced {
            tracing::info!(proxy_id = %hello.proxy_id, "a newer stream superseded the previous one");
        }
        let (tx, rx) = mpsc::channel::<Result<v1::ControlMessage, Status>>(16);
        let _ = tx
            .send(Ok(v1::ControlMessage {
                msg: Some(v1::control_message::Msg::Snapshot(snapshot)),
            }))
            .await;
        tracing::info!(proxy_id = %hello.proxy_id, session_id = %hello.session_id, "data plane attached");
        tokio::spawn(async move {
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
                    Some(v1::proxy_message::Msg::Ask(_))
                    | Some(v1::proxy_message::Msg::AskCancel(_)) => {
                        // Asks are not enabled in snapshots yet; a proxy should not send them.
                        let _ = tx
                            .send(Err(Status::invalid_argument(
                                "asks are not enabled on this control plane",
                            )))
                            .await;
                        break;
                    }
                    None => {
                        let _ = tx
                            .send(Err(Status::invalid_argument("empty message")))
                            .await;
                        break;
                    }
                }
            }
            state.detach(&hello.proxy_id, stream_no);
            tracing::info!(proxy_id = %hello.proxy_id, "data plane detached");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn unimplemented<T>(what: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!(
        "{what} is not implemented yet"
    )))
}

#[tonic::async_trait]
impl Control for Services {
    async fn approve(
        &self,
        _: Request<v1::ApproveRequest>,
    ) -> Result<Response<v1::ApproveResponse>, Status> {
        unimplemented("Approve")
    }

    async fn deny(
        &self,
        _: Request<v1::DenyRequest>,
    ) -> Result<Response<v1::DenyResponse>, Status> {
        unimplemented("Deny")
    }

    async fn list_pending(
        &self,
        _: Request<v1::ListPendingRequest>,
    ) -> Result<Response<v1::ListPendingResponse>, Status> {
        // No asks are raised yet, so none is ever pending.
        Ok(Response::new(v1::ListPendingResponse { asks: Vec::new() }))
    }

    type WatchPendingStream = BoxStream<v1::PendingEvent>;

    async fn watch_pending(
        &self,
        _: Request<v1::WatchPendingRequest>,
    ) -> Result<Response<Self::WatchPendingStream>, Status> {
        unimplemented("WatchPending")
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
        let mut entries = Vec::new();
        for (decision, list) in [
            ("allow", &snapshot.allowed_domains),
            ("deny", &snapshot.denied_domains),
        ] {
            for pattern in list {
                entries.push(v1::PolicyEntry {
                    decision: decision.into(),
                    pattern: pattern.clone(),
                    port: 0,
                    source: v1::PolicySource::Config as i32,
                    rule_line: 0,
                    ignored: false,
                    ignored_reason: String::new(),
                });
            }
        }
        Ok(Response::new(v1::PolicyView {
            version: snapshot.version,
            control_instance_id: self.state.instance_id.clone(),
            snapshot: Some(snapshot),
            entries,
            managed_allowed_domains_only: false,
            requirements: Some(v1::RequirementsStatus {
                state: v1::RequirementsState::None as i32,
                ..Default::default()
            }),
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
        _: Request<v1::AddRuleRequest>,
    ) -> Result<Response<v1::AddRuleResponse>, Status> {
        unimplemented("AddRule")
    }

    async fn remove_rule(
        &self,
        _: Request<v1::RemoveRuleRequest>,
    ) -> Result<Response<v1::RemoveRuleResponse>, Status> {
        unimplemented("RemoveRule")
    }

    async fn list_rules(
        &self,
        _: Request<v1::ListRulesRequest>,
    ) -> Result<Response<v1::ListRulesResponse>, Status> {
        unimplemented("ListRules")
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
        _: Request<v1::EndSessionRequest>,
    ) -> Result<Response<v1::EndSessionResponse>, Status> {
        unimplemented("EndSession")
    }

    async fn get_status(
        &self,
        _: Request<v1::GetStatusRequest>,
    ) -> Result<Response<v1::ControlStatus>, Status> {
        Ok(Response::new(v1::ControlStatus {
            control_instance_id: self.state.instance_id.clone(),
            version: self.state.version(),
            started_at: Some(timestamp(self.state.started_at)),
            requirements: Some(v1::RequirementsStatus {
                state: v1::RequirementsState::None as i32,
                ..Default::default()
            }),
            attached_proxies: self.state.proxies().len() as u32,
            ..Default::default()
        }))
    }
}
