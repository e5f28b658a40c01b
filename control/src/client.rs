//! The thin gRPC clients of the CLI (control.md §11): `pending`, `approve`, `deny`, `policy`.

use std::process::ExitCode;
use std::time::Duration;

use portcullis::config::Config;
use portcullis::proto::v1;
use portcullis::proto::v1::control_client::ControlClient;

use crate::cli::{ApproveArgs, ClientArgs, DenyArgs, PendingArgs, PolicyArgs, Scope};
use crate::exec::destination;

/// Adds the bearer token to every call.
type Auth = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;

type Client =
    ControlClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Auth>>;

/// A failure with its exit code and message.
struct Failure(u8, String);

fn code_name(code: tonic::Code) -> String {
    // `FailedPrecondition` → `FAILED_PRECONDITION`.
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn rpc_error(s: tonic::Status) -> Failure {
    Failure(
        1,
        format!("error: {}: {}", code_name(s.code()), s.message()),
    )
}

fn token(args: &ClientArgs) -> Result<String, Failure> {
    let path = match &args.token_file {
        Some(p) => p.clone(),
        None => {
            if let Ok(t) = std::env::var("PORTCULLIS_TOKEN")
                && !t.trim().is_empty()
            {
                return Ok(t.trim().to_string());
            }
            let config = match &args.config {
                Some(p) => Config::load(p).map_err(|e| Failure(2, e.to_string()))?,
                None => Config::embedded().map_err(|e| Failure(2, e.to_string()))?,
            };
            config
                .control_token_file()
                .map_err(|e| Failure(2, e.to_string()))?
        }
    };
    crate::token::read(&path).map_err(|e| Failure(1, format!("error: {e}")))
}

/// Connects; `streaming` drops the per-RPC deadline (a watch runs until interrupted).
async fn connect(args: &ClientArgs, streaming: bool) -> Result<Client, Failure> {
    let endpoint = portcullis::config::check_control_endpoint(&args.endpoint).map_err(|e| {
        Failure(
            2,
            format!("usage error: --endpoint: {e}, got {}", args.endpoint),
        )
    })?;
    // On the unix socket (limited to this user) the token is optional (control.md §1.3): a
    // missing default token file is not an error there, an explicit one still is.
    let unix = matches!(endpoint, portcullis::config::ControlEndpoint::Unix(_));
    let value: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> = match token(args) {
        Ok(token) => Some(
            format!("Bearer {token}")
                .parse()
                .map_err(|_| Failure(1, "error: the token is not a valid header value".into()))?,
        ),
        Err(_) if unix && args.token_file.is_none() => None,
        Err(e) => return Err(e),
    };
    let options = portcullis::endpoint::ChannelOptions {
        connect_timeout: Duration::from_secs(args.timeout),
        request_timeout: (!streaming).then(|| Duration::from_secs(args.timeout)),
    };
    let channel = portcullis::endpoint::connect(&endpoint, options)
        .await
        .map_err(|e| {
            Failure(
                1,
                format!(
                    "error: UNAVAILABLE: cannot connect to {}: {e}",
                    args.endpoint
                ),
            )
        })?;
    let interceptor: Auth = Box::new(move |mut req: tonic::Request<()>| {
        if let Some(v) = &value {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    });
    Ok(ControlClient::with_interceptor(channel, interceptor))
}

fn actor() -> String {
    let login = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    format!("cli:{login}")
}

fn finish(r: Result<(), Failure>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, msg)) => {
            eprintln!("{msg}");
            ExitCode::from(code)
        }
    }
}

/// `pending`.
pub async fn pending(args: PendingArgs) -> ExitCode {
    finish(
        async {
            let mut c = connect(&args.client, args.watch).await?;
            if args.watch {
                return watch(&mut c, args.client.json).await;
            }
            let asks = c
                .list_pending(v1::ListPendingRequest::default())
                .await
                .map_err(rpc_error)?
                .into_inner()
                .asks;
            if args.client.json {
                for a in &asks {
                    let line = serde_json::json!({
                        "id": a.id, "session_id": a.session_id, "host": a.host, "port": a.port,
                        "protocol": a.protocol, "waiters": a.waiters,
                    });
                    println!("{line}");
                }
            } else if asks.is_empty() {
                println!("no pending asks");
            } else {
                println!("ID  SESSION  DESTINATION  PROTOCOL  WAITERS");
                for a in &asks {
                    println!(
                        "{}  {}  {}  {}  {}",
                        a.id,
                        a.session_id,
                        destination(&a.host, a.port),
                        a.protocol,
                        a.waiters
                    );
                }
            }
            Ok(())
        }
        .await,
    )
}

/// `pending --watch`: one line per event until the stream ends.
async fn watch(c: &mut Client, json: bool) -> Result<(), Failure> {
    use v1::pending_event::Event;
    let mut stream = c
        .watch_pending(v1::WatchPendingRequest::default())
        .await
        .map_err(rpc_error)?
        .into_inner();
    while let Some(e) = stream.message().await.map_err(rpc_error)? {
        let Some(event) = e.event else { continue };
        let (human, machine) = match event {
            Event::Created(c) => {
                let a = c.ask.unwrap_or_default();
                (
                    format!(
                        "created {} {} {} session {}",
                        a.id,
                        destination(&a.host, a.port),
                        a.protocol,
                        a.session_id
                    ),
                    serde_json::json!({"event": "created", "id": a.id, "session_id": a.session_id, "host": a.host,
                        "port": a.port, "protocol": a.protocol, "waiters": a.waiters}),
                )
            }
            Event::Resolved(r) => {
                let id = r.ask.map(|a| a.id).unwrap_or_default();
                let outcome = portcullis::proto::outcome_label(r.outcome);
                (
                    format!("resolved {id} {outcome} by {}", r.actor),
                    serde_json::json!({"event": "resolved", "id": id, "outcome": outcome, "actor": r.actor,
                        "policy_version": r.policy_version}),
                )
            }
            Event::Expired(x) => {
                let id = x.ask.map(|a| a.id).unwrap_or_default();
                (
                    format!("expired {id}"),
                    serde_json::json!({"event": "expired", "id": id}),
                )
            }
            Event::Synced(_) => ("synced".to_string(), serde_json::json!({"event": "synced"})),
            Event::Lagged(l) => (
                format!("lagged {}", l.missed),
                serde_json::json!({"event": "lagged", "missed": l.missed}),
            ),
        };
        if json {
            println!("{machine}");
        } else {
            println!("{human}");
        }
    }
    Ok(())
}

/// `approve`.
pub async fn approve(args: ApproveArgs) -> ExitCode {
    finish(
        async {
            let mut c = connect(&args.client, false).await?;
            let scope = match args.scope {
                Scope::Once => v1::ApprovalScope::Once,
                Scope::Session => v1::ApprovalScope::Session,
                Scope::Always => v1::ApprovalScope::Always,
            };
            let r = c
                .approve(v1::ApproveRequest {
                    pending_id: args.id.clone(),
                    scope: scope as i32,
                    justification: args.justification.clone(),
                    actor: Some(actor()),
                    wait_for_enforcement: false,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let ask = r.ask.unwrap_or_default();
            let outcome = match args.scope {
                Scope::Once => "allow_once",
                Scope::Session => "allow_session",
                Scope::Always => "allow_always",
            };
            if args.client.json {
                println!(
                    "{}",
                    serde_json::json!({"id": args.id, "outcome": outcome, "policy_version": r.policy_version})
                );
            } else {
                let how = match args.scope {
                    Scope::Once => "once".to_string(),
                    Scope::Session => "for this session".to_string(),
                    Scope::Always => format!("always; policy version {}", r.policy_version),
                };
                println!(
                    "allowed {} ({} {}) {how}",
                    args.id,
                    destination(&ask.host, ask.port),
                    ask.protocol
                );
            }
            Ok(())
        }
        .await,
    )
}

/// `deny`.
pub async fn deny(args: DenyArgs) -> ExitCode {
    finish(
        async {
            let mut c = connect(&args.client, false).await?;
            let scope = if args.always {
                v1::ApprovalScope::Always
            } else {
                v1::ApprovalScope::Once
            };
            let r = c
                .deny(v1::DenyRequest {
                    pending_id: args.id.clone(),
                    scope: scope as i32,
                    justification: args.justification.clone(),
                    actor: Some(actor()),
                    wait_for_enforcement: false,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let ask = r.ask.unwrap_or_default();
            if args.client.json {
                let outcome = if args.always { "deny_always" } else { "deny_once" };
                println!(
                    "{}",
                    serde_json::json!({"id": args.id, "outcome": outcome, "policy_version": r.policy_version})
                );
            } else {
                println!(
                    "denied {} ({} {})",
                    args.id,
                    destination(&ask.host, ask.port),
                    ask.protocol
                );
            }
            Ok(())
        }
        .await,
    )
}

/// `policy`.
pub async fn policy(args: PolicyArgs) -> ExitCode {
    finish(
        async {
            let mut c = connect(&args.client, false).await?;
            let view = c
                .get_policy(v1::GetPolicyRequest::default())
                .await
                .map_err(rpc_error)?
                .into_inner();
            let snap = view.snapshot.clone().unwrap_or_default();
            let source = |s: i32| {
                v1::PolicySource::try_from(s)
                    .map(|s| s.as_str_name().trim_start_matches("POLICY_SOURCE_").to_ascii_lowercase())
                    .unwrap_or_else(|_| "unknown".into())
            };
            if args.client.json {
                println!(
                    "{}",
                    serde_json::json!({"kind": "summary", "version": view.version, "instance": view.control_instance_id,
                        "mode": snap.mode, "allow_local_binding": snap.allow_local_binding,
                        "managed_allowed_domains_only": view.managed_allowed_domains_only,
                        "requirements": requirements_json(view.requirements.as_ref())})
                );
                for e in &view.entries {
                    println!(
                        "{}",
                        serde_json::json!({"kind": "entry", "decision": e.decision, "pattern": e.pattern, "port": e.port,
                            "source": source(e.source), "rule_line": e.rule_line, "ignored": e.ignored})
                    );
                }
            } else {
                println!("policy version {} (instance {})", view.version, view.control_instance_id);
                println!(
                    "mode: {}  allow_local_binding: {}  managed_allowed_domains_only: {}",
                    snap.mode, snap.allow_local_binding, view.managed_allowed_domains_only
                );
                for e in &view.entries {
                    let port = if e.port == 0 { String::new() } else { format!(":{}", e.port) };
                    let line = if e.rule_line == 0 { String::new() } else { format!(" (line {})", e.rule_line) };
                    let ignored = if e.ignored { format!("  ignored: {}", e.ignored_reason) } else { String::new() };
                    println!("{}  {}{port}  {}{line}{ignored}", e.decision.to_ascii_uppercase(), e.pattern, source(e.source));
                }
                for p in &snap.allow_unix_sockets {
                    println!("UNIX  {p}");
                }
            }
            Ok(())
        }
        .await,
    )
}

/// The `requirements` object of the `policy --json` summary.
fn requirements_json(r: Option<&v1::RequirementsStatus>) -> serde_json::Value {
    let Some(r) = r else {
        return serde_json::Value::Null;
    };
    let state = v1::RequirementsState::try_from(r.state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("REQUIREMENTS_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into());
    let fetched_at = r.fetched_at.as_ref().map(|t| {
        portcullis::decision::format_timestamp(
            std::time::UNIX_EPOCH
                + std::time::Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32),
        )
    });
    serde_json::json!({"state": state, "url": r.url, "fetched_at": fetched_at, "last_error": r.last_error})
}
