//! What a policy change does to pending asks and to mutating RPCs: asks the new policy decides
//! are resolved `POLICY_ALLOW` / `POLICY_DENY` (control.md §7 rule 10), and
//! `wait_for_enforcement` waits for the acks (§8.3).

use std::collections::HashMap;
use std::time::Duration;

use portcullis::decision::{Protocol, Reason, Verdict};
use portcullis::policy::{CompiledPolicy, NameStage, RequestContext};
use portcullis::proto::{SnapshotLists, v1};

use crate::service::Services;

/// Default wait of `wait_for_enforcement` when the request carries no deadline.
const ENFORCEMENT_WAIT: Duration = Duration::from_secs(5);

/// How the current policy judges a pending ask.
#[derive(Debug, PartialEq)]
enum Judgement {
    /// Now allowed by a list entry.
    Allow,
    /// Now refused; the reason waiters get.
    Deny(&'static str),
    /// Still a miss that asks.
    StillAsks,
}

/// The host policy of one session's snapshot, as the data plane would compile it.
fn compile(snap: &v1::PolicySnapshot) -> Option<CompiledPolicy> {
    let spec = SnapshotLists::policy_spec(snap, true, false).ok()?;
    CompiledPolicy::compile(&spec).ok()
}

fn judge(policy: &CompiledPolicy, ask: &v1::PendingAsk) -> Judgement {
    let (Ok(host), Some(protocol), Ok(port)) = (
        portcullis::policy::normalize_host(&ask.host),
        Protocol::parse(&ask.protocol),
        u16::try_from(ask.port),
    ) else {
        return Judgement::StillAsks;
    };
    let method = (!ask.method.is_empty()).then_some(ask.method.as_str());
    let ctx = RequestContext {
        protocol,
        host: &host,
        port,
        method,
        upgrade: false,
        own_addrs: &[],
    };
    match policy.check_name(&ctx) {
        NameStage::Proceed(_) => Judgement::Allow,
        NameStage::Refuse(r) if r.verdict == Verdict::Deny => match r.reason {
            Reason::Denied => Judgement::Deny("denied"),
            Reason::NotAllowed => Judgement::Deny("not_allowed"),
            // Local-address or mode refusals are the data plane's to render on retry.
            _ => Judgement::StillAsks,
        },
        NameStage::Refuse(_) => Judgement::StillAsks,
    }
}

impl Services {
    /// Re-judges every pending ask with the current snapshot of its session.
    pub async fn resolve_asks_by_policy(&self) {
        let mut cache: HashMap<String, Option<CompiledPolicy>> = HashMap::new();
        for ask in self.approvals.list(None) {
            let policy = cache
                .entry(ask.session_id.clone())
                .or_insert_with(|| compile(&self.state.snapshot_for(&ask.session_id)));
            let Some(policy) = policy.as_ref() else {
                continue;
            };
            let (outcome, reason) = match judge(policy, &ask) {
                Judgement::Allow => (v1::Outcome::PolicyAllow, ""),
                Judgement::Deny(reason) => (v1::Outcome::PolicyDeny, reason),
                Judgement::StillAsks => continue,
            };
            // Another resolution may have won meanwhile; that is fine.
            let _ = self
                .approvals
                .resolve_with_reason(&self.state, &ask.id, outcome, "policy", reason)
                .await;
        }
    }

    /// `wait_for_enforcement`: (enforced, lagging proxies) for `version`.
    pub async fn enforcement(
        &self,
        wait: bool,
        version: u64,
        session: Option<&str>,
        deadline: Option<Duration>,
    ) -> (bool, Vec<String>) {
        if !wait || version == 0 {
            return (false, Vec::new());
        }
        self.state
            .wait_enforced(version, session, deadline.unwrap_or(ENFORCEMENT_WAIT))
            .await
    }
}

/// The request's `grpc-timeout` (e.g. `5S`, `250m`), used as the enforcement wait.
pub fn request_deadline<T>(req: &tonic::Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    // Leave a little room to answer before the client gives up.
    Some(d.saturating_sub(Duration::from_millis(50)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(allowed: &[&str], denied: &[&str], asks: bool) -> v1::PolicySnapshot {
        v1::PolicySnapshot {
            allowed_domains: allowed.iter().map(|s| s.to_string()).collect(),
            denied_domains: denied.iter().map(|s| s.to_string()).collect(),
            asks_enabled: asks,
            mode: "full".into(),
            ..Default::default()
        }
    }

    fn ask(host: &str) -> v1::PendingAsk {
        v1::PendingAsk {
            host: host.into(),
            port: 443,
            protocol: "https_connect".into(),
            ..Default::default()
        }
    }

    #[test]
    fn judgements() {
        let p = compile(&snap(&["a.test"], &["b.test"], true)).unwrap();
        assert_eq!(judge(&p, &ask("a.test")), Judgement::Allow);
        assert_eq!(judge(&p, &ask("b.test")), Judgement::Deny("denied"));
        assert_eq!(judge(&p, &ask("c.test")), Judgement::StillAsks);
        let p = compile(&snap(&[], &[], false)).unwrap();
        assert_eq!(judge(&p, &ask("c.test")), Judgement::Deny("not_allowed"));
    }

    #[test]
    fn grpc_timeouts() {
        let mut r = tonic::Request::new(());
        r.metadata_mut()
            .insert("grpc-timeout", "2S".parse().unwrap());
        assert_eq!(request_deadline(&r), Some(Duration::from_millis(1950)));
        r.metadata_mut()
            .insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(request_deadline(&r), None);
    }
}
