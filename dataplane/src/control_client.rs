//! The data plane's side of `DataPlane.Attach` (control.md §6, §9): Hello, apply each
//! PolicySnapshot with one atomic swap and ack it, stream Decisions, reconnect with jittered
//! backoff while keeping the last snapshot.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use portcullis::config::{Config, ControlEndpoint, Mode};
use portcullis::policy::CompiledPolicy;
use portcullis::proto::v1;
use portcullis::proto::v1::data_plane_client::DataPlaneClient;
use tokio::sync::{mpsc, oneshot, watch};

use crate::report::ControlQueue;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::state::{Runtime, Settings, Shared};

/// How the proxy reaches its control plane.
pub struct AttachConfig {
    /// `http://HOST:PORT` or `unix:/abs/path`.
    pub endpoint: ControlEndpoint,
    /// Bearer token file (re-read on every attempt: rotation needs no restart).
    pub token_file: std::path::PathBuf,
    /// First reconnect delay.
    pub initial: Duration,
    /// Delay cap.
    pub max: Duration,
}

impl AttachConfig {
    /// From the validated config; `None` when standalone.
    pub fn from_config(c: &Config) -> Result<Option<AttachConfig>, String> {
        let Some(endpoint) = &c.control.endpoint else {
            return Ok(None);
        };
        let token_file = c.control_token_file().map_err(|e| e.to_string())?;
        Ok(Some(AttachConfig {
            endpoint: endpoint.clone(),
            token_file,
            initial: Duration::from_millis(c.control.reconnect_initial_ms),
            max: Duration::from_millis(c.control.reconnect_max_ms),
        }))
    }
}

/// How long a closing proxy waits for its last reports to reach the control plane.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// Runs the attach loop until `close` turns true; `first` fires once the first snapshot was
/// applied (or with the first error, so startup can fail with a clear cause). On close the
/// queued Decision reports are sent and the stream is ended cleanly, so the control plane has
/// counted every one of them (exec's exit summary) before this returns; reports that cannot be
/// sent are counted as dropped.
pub async fn run(
    shared: Arc<Shared>,
    cfg: AttachConfig,
    decisions: Arc<ControlQueue>,
    first: oneshot::Sender<Result<(), String>>,
    mut close: watch::Receiver<bool>,
) {
    let mut first = Some(first);
    let mut attempt: u32 = 0;
    loop {
        // Closing while (re)connecting is bounded by the connect timeout and main's wait.
        let result = session(
            &shared,
            &cfg,
            &decisions,
            &mut first,
            &mut attempt,
            &mut close,
        )
        .await;
        shared.metrics().set_control_connected(false);
        let closing = *close.borrow();
        if closing {
            for _ in 0..decisions.len() {
                shared.metrics().event_dropped(crate::report::Sink::Control);
            }
            return;
        }
        match result {
            Err(e) => {
                if let Some(tx) = first.take() {
                    let _ = tx.send(Err(e));
                    return;
                }
                tracing::warn!("control plane stream lost: {e}; keeping the last snapshot");
            }
            Ok(()) => tracing::warn!("control plane ended the stream; keeping the last snapshot"),
        }
        let delay = backoff(cfg.initial, cfg.max, attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = closed(&mut close) => {}
        }
    }
}

/// Resolves once `close` is true (the watch guard is not held across later awaits).
async fn closed(close: &mut watch::Receiver<bool>) {
    let _ = close.wait_for(|c| *c).await;
}

/// `min(max, initial · 2^n)` × uniform [0.5, 1.0].
fn backoff(initial: Duration, max: Duration, n: u32) -> Duration {
    let base = initial.saturating_mul(1u32 << n.min(20)).min(max);
    let jitter = 0.5 + (uuid::Uuid::now_v7().as_u128() & 0xffff) as f64 / 131070.0;
    base.mul_f64(jitter)
}

async fn session(
    shared: &Arc<Shared>,
    cfg: &AttachConfig,
    decisions: &ControlQueue,
    first: &mut Option<oneshot::Sender<Result<(), String>>>,
    attempt: &mut u32,
    close: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let token = portcullis::secret::read_secret_file("control.token_file", &cfg.token_file)?;
    let auth: tonic::metadata::MetadataValue<tonic::metadata::Ascii> = format!("Bearer {token}")
        .parse()
        .map_err(|_| "control.token_file: the token is not a valid header value".to_string())?;
    let options = portcullis::endpoint::ChannelOptions {
        connect_timeout: Duration::from_secs(5),
        request_timeout: None,
    };
    let channel = portcullis::endpoint::connect(&cfg.endpoint, options)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut client =
        DataPlaneClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", auth.clone());
            Ok(req)
        })
        .max_decoding_message_size(16 * 1024 * 1024);
    let (tx, rx) = mpsc::channel::<v1::ProxyMessage>(256);
    // Decision reports handed to the stream but not yet taken by the transport: if the stream
    // is lost they are gone, so they are counted as dropped when this session ends. (One the
    // transport took but had not written yet cannot be seen from here.)
    let unsent = Arc::new(Unsent {
        shared: shared.clone(),
        count: AtomicU64::new(0),
    });
    let taken = unsent.clone();
    let outbound = ReceiverStream::new(rx).map(move |m| {
        if matches!(m.msg, Some(v1::proxy_message::Msg::Decision(_))) {
            taken.count.fetch_sub(1, Ordering::Relaxed);
        }
        m
    });
    let bound = shared.bound();
    let hello = v1::Hello {
        protocol_version: 1,
        proxy_id: shared.origin().proxy_id.to_string(),
        session_id: shared.origin().session_id.to_string(),
        version: env!("CARGO_PKG_VERSION").into(),
        http_addr: bound.http.map(|a| a.to_string()).unwrap_or_default(),
        socks5_addr: bound.socks5.map(|a| a.to_string()).unwrap_or_default(),
        admin_addr: bound.admin.map(|a| a.to_string()).unwrap_or_default(),
        pid: std::process::id(),
    };
    tx.send(v1::ProxyMessage {
        msg: Some(v1::proxy_message::Msg::Hello(hello)),
    })
    .await
    .map_err(|_| "stream closed".to_string())?;
    let mut inbound = client
        .attach(outbound)
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .into_inner();
    let mut last_version = 0u64;
    let mut instance = String::new();
    let asker = shared.asker().cloned();
    if let Some(a) = &asker {
        a.stream_up(tx.clone());
    }
    // Whatever ends this session, held requests are released (control_unavailable).
    struct Down(Option<Arc<crate::asker::Asker>>);
    impl Drop for Down {
        fn drop(&mut self) {
            if let Some(a) = &self.0 {
                a.stream_down();
            }
        }
    }
    let _down = Down(asker.clone());
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => return Ok(()),
                    Err(s) => return Err(format!("{}: {}", s.code(), s.message())),
                };
                let snap = match msg.msg {
                    Some(v1::control_message::Msg::Snapshot(snap)) => snap,
                    Some(v1::control_message::Msg::AskAnswer(answer)) => {
                        if let Some(a) = &asker {
                            a.deliver(answer);
                        }
                        continue;
                    }
                    None => continue,
                };
                if snap.control_instance_id == instance && snap.version <= last_version {
                    return Err(format!("snapshot version {} does not increase", snap.version));
                }
                let (applied, error) = match apply(shared, &snap) {
                    Ok(()) => (true, String::new()),
                    Err(e) => {
                        tracing::error!("cannot apply policy snapshot {}: {e}", snap.version);
                        (false, e)
                    }
                };
                instance.clone_from(&snap.control_instance_id);
                last_version = snap.version;
                decisions.set_report_allows(snap.report_allows);
                if let Some(a) = &asker {
                    a.set_ask_timeout_ms(snap.ask_timeout_ms);
                }
                let ack = v1::SnapshotAck {
                    control_instance_id: snap.control_instance_id.clone(),
                    version: snap.version,
                    applied,
                    error,
                };
                tx.send(v1::ProxyMessage { msg: Some(v1::proxy_message::Msg::SnapshotAck(ack)) })
                    .await
                    .map_err(|_| "stream closed".to_string())?;
                if applied {
                    *attempt = 0;
                    shared.metrics().set_control_connected(true);
                    shared.metrics().set_policy_version(snap.version);
                    if let Some(f) = first.take() {
                        let _ = f.send(Ok(()));
                    }
                }
            }
            _ = closed(close) => {
                return finish(decisions, tx, &mut inbound, &unsent).await;
            }
            d = decisions.pop() => {
                if !unsent.send(&tx, decisions, d).await {
                    return Err("stream closed".to_string());
                }
            }
        }
    }
}

/// Decision reports in the outbound channel of one stream; what is left when the session's
/// last handle goes is counted as dropped (`portcullis_events_dropped_total{sink="control"}`).
struct Unsent {
    shared: Arc<Shared>,
    count: AtomicU64,
}

impl Unsent {
    /// Hands one report to the stream, counted until the transport takes it. When the stream
    /// is closed the report goes back to the queue, still the oldest, for the next stream.
    async fn send(
        &self,
        tx: &mpsc::Sender<v1::ProxyMessage>,
        decisions: &ControlQueue,
        d: Arc<portcullis::decision::Decision>,
    ) -> bool {
        let msg = v1::ProxyMessage {
            msg: Some(v1::proxy_message::Msg::Decision(v1::Decision::from(&*d))),
        };
        self.count.fetch_add(1, Ordering::Relaxed);
        if tx.send(msg).await.is_err() {
            self.count.fetch_sub(1, Ordering::Relaxed);
            decisions.requeue(d);
            return false;
        }
        true
    }
}

impl Drop for Unsent {
    fn drop(&mut self) {
        for _ in 0..self.count.load(Ordering::Relaxed) {
            self.shared
                .metrics()
                .event_dropped(crate::report::Sink::Control);
        }
    }
}

/// Sends the reports still queued, ends our half of the stream and waits (bounded) for the
/// control plane to end its half, which it does only after handling every message we sent.
async fn finish(
    decisions: &ControlQueue,
    tx: mpsc::Sender<v1::ProxyMessage>,
    inbound: &mut tonic::Streaming<v1::ControlMessage>,
    unsent: &Unsent,
) -> Result<(), String> {
    let flushed = tokio::time::timeout(CLOSE_FLUSH, async {
        while let Some(d) = decisions.try_pop() {
            if !unsent.send(&tx, decisions, d).await {
                return;
            }
        }
        drop(tx);
        while let Ok(Some(_)) = inbound.message().await {}
    })
    .await;
    if flushed.is_err() {
        tracing::warn!("control plane did not confirm the last decision reports in time");
    }
    Ok(())
}

/// Compiles a snapshot off the request path and swaps it in with one atomic store.
fn apply(shared: &Shared, snap: &v1::PolicySnapshot) -> Result<(), String> {
    let current = shared.runtime();
    let mut config = current.config.clone();
    let n = &mut config.network;
    n.mode = match snap.mode.as_str() {
        "full" => Mode::Full,
        "limited" => Mode::Limited,
        other => return Err(format!("mode: invalid value {other:?}")),
    };
    n.allow_local_binding = snap.allow_local_binding;
    n.allow_upstream_proxy &= snap.allow_upstream_proxy;
    n.dangerously_allow_all_unix_sockets = snap.dangerously_allow_all_unix_sockets;
    let unix_allowed =
        snap.dangerously_allow_all_unix_sockets || !snap.allow_unix_sockets.is_empty();
    if unix_allowed && shared.bound().all().any(|a| !a.ip().is_loopback()) {
        return Err("the snapshot allows unix sockets while a listener is not loopback".into());
    }
    // Interception is prepared at startup exactly when `network.mitm = true`.
    let spec = portcullis::proto::SnapshotLists::policy_spec(
        snap,
        n.enabled,
        current.config.network.mitm,
    )?;
    let policy =
        CompiledPolicy::compile(&spec).map_err(|(list, i, e)| format!("{list:?}[{i}]: {e}"))?;
    let unix = crate::unix_socket::UnixPolicy {
        allow_all: snap.dangerously_allow_all_unix_sockets,
        allow: snap.allow_unix_sockets.iter().map(Into::into).collect(),
        deny: snap.denied_unix_sockets.iter().map(Into::into).collect(),
    };
    let resolver = crate::resolve::Resolver::new(&config.network.dns_servers);
    shared.swap_runtime(Runtime {
        snapshot_version: Some(snap.version),
        settings: Settings::from_config(&config),
        policy,
        resolver,
        unix,
        config,
    });
    Ok(())
}
