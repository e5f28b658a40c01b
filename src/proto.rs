//! Generated gRPC types of `proto/portcullis/v1` and the conversions between the wire
//! `Decision` and [`crate::decision::Decision`].

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::decision::{Decision, Origin, Protocol, Reason, Source, Verdict};

/// `portcullis.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("portcullis.v1");
}

/// The encoded descriptor set of every proto file (for gRPC reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/portcullis_descriptor.bin"));

/// Why a wire Decision cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecisionWireError {
    /// A label outside its set.
    #[error("{field}: invalid value {value:?}")]
    Label {
        /// The field.
        field: &'static str,
        /// What was sent (truncated).
        value: String,
    },
    /// A port outside 0–65535.
    #[error("{0}: must be between 0 and 65535")]
    Port(&'static str),
    /// Not a UUID.
    #[error("id: not a UUID")]
    Id,
    /// Not an IP address.
    #[error("{0}: not an IP address")]
    Address(&'static str),
    /// Missing or out-of-range timestamp.
    #[error("timestamp: missing or out of range")]
    Timestamp,
}

fn label(field: &'static str, value: &str) -> DecisionWireError {
    DecisionWireError::Label {
        field,
        value: value.chars().take(64).collect(),
    }
}

fn opt(s: &Option<String>) -> String {
    s.clone().unwrap_or_default()
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn to_timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn from_timestamp(t: &prost_types::Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

impl From<&Decision> for v1::Decision {
    fn from(d: &Decision) -> v1::Decision {
        v1::Decision {
            decision: d.decision.as_str().into(),
            reason: d.reason.as_str().into(),
            source: d.source.as_str().into(),
            protocol: d.protocol.as_str().into(),
            host: d.host.clone(),
            port: u32::from(d.port),
            id: d.id.hyphenated().to_string(),
            timestamp: Some(to_timestamp(d.timestamp)),
            method: opt(&d.method),
            client_address: d.client_address.map(|a| a.to_string()).unwrap_or_default(),
            client_port: d.client_port.map(u32::from).unwrap_or_default(),
            r#override: d.override_,
            ask_id: opt(&d.ask_id),
            rule: opt(&d.rule),
            address: d.address.map(|a| a.to_string()).unwrap_or_default(),
            socket_path: opt(&d.socket_path),
            message: opt(&d.message),
            proxy_id: d.origin.proxy_id.to_string(),
            session_id: d.origin.session_id.to_string(),
        }
    }
}

impl TryFrom<&v1::Decision> for Decision {
    type Error = DecisionWireError;

    fn try_from(w: &v1::Decision) -> Result<Decision, DecisionWireError> {
        let decision = match w.decision.as_str() {
            "allow" => Verdict::Allow,
            "deny" => Verdict::Deny,
            "ask" => Verdict::Ask,
            other => return Err(label("decision", other)),
        };
        let source = match w.source.as_str() {
            "baseline_policy" => Source::BaselinePolicy,
            "mode_guard" => Source::ModeGuard,
            "proxy_state" => Source::ProxyState,
            "decider" => Source::Decider,
            other => return Err(label("source", other)),
        };
        let protocol =
            Protocol::parse(&w.protocol).ok_or_else(|| label("protocol", &w.protocol))?;
        if w.reason.is_empty() {
            return Err(label("reason", ""));
        }
        let port = u16::try_from(w.port).map_err(|_| DecisionWireError::Port("port"))?;
        let client_port = match w.client_port {
            0 => None,
            p => Some(u16::try_from(p).map_err(|_| DecisionWireError::Port("client_port"))?),
        };
        let ip = |field: &'static str, s: &str| -> Result<Option<IpAddr>, DecisionWireError> {
            if s.is_empty() {
                Ok(None)
            } else {
                s.parse()
                    .map(Some)
                    .map_err(|_| DecisionWireError::Address(field))
            }
        };
        Ok(Decision {
            decision,
            reason: Reason::parse(&w.reason),
            source,
            protocol,
            host: w.host.clone(),
            port,
            id: uuid::Uuid::parse_str(&w.id).map_err(|_| DecisionWireError::Id)?,
            timestamp: w
                .timestamp
                .as_ref()
                .and_then(from_timestamp)
                .ok_or(DecisionWireError::Timestamp)?,
            method: non_empty(&w.method),
            client_address: ip("client_address", &w.client_address)?,
            client_port,
            override_: w.r#override,
            ask_id: non_empty(&w.ask_id),
            rule: non_empty(&w.rule),
            address: ip("address", &w.address)?,
            socket_path: non_empty(&w.socket_path),
            message: non_empty(&w.message),
            origin: Origin {
                proxy_id: w.proxy_id.as_str().into(),
                session_id: w.session_id.as_str().into(),
            },
        })
    }
}

/// An `Outcome` as users see it: `allow_session`, `policy_deny`, … (`unknown` for other values).
pub fn outcome_label(outcome: i32) -> String {
    v1::Outcome::try_from(outcome)
        .map(|o| {
            o.as_str_name()
                .trim_start_matches("OUTCOME_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into())
}

/// A snapshot's host policy as the engine takes it: port rules folded into the lists as
/// `host:port` entries, session allows typed. Shared by the data plane (which applies snapshots)
/// and the control plane (which re-judges pending asks after a policy change).
#[derive(Debug, Clone, Default)]
pub struct SnapshotLists {
    /// Allow entries.
    pub allowed: Vec<String>,
    /// Deny entries.
    pub denied: Vec<String>,
    /// Session allows: (host, protocol, port).
    pub session_allows: Vec<(String, Protocol, u16)>,
}

impl SnapshotLists {
    /// The engine's input for `snap`: `enabled` and `mitm` are the proxy's own settings (a
    /// snapshot carries neither).
    pub fn policy_spec(
        snap: &v1::PolicySnapshot,
        enabled: bool,
        mitm: bool,
    ) -> Result<crate::policy::PolicySpec, String> {
        let lists = SnapshotLists::from_snapshot(snap)?;
        Ok(crate::policy::PolicySpec {
            enabled,
            limited: snap.mode == "limited",
            mitm,
            allow_local_binding: snap.allow_local_binding,
            allowed: lists.allowed,
            denied: lists.denied,
            session_allows: lists.session_allows,
            asks: if snap.asks_enabled {
                crate::policy::AskMode::Enabled
            } else {
                crate::policy::AskMode::Disabled
            },
        })
    }

    /// Flattens `snap`; an invalid decision, protocol or port names the field.
    pub fn from_snapshot(snap: &v1::PolicySnapshot) -> Result<SnapshotLists, String> {
        let mut allowed = snap.allowed_domains.clone();
        let mut denied = snap.denied_domains.clone();
        for r in &snap.port_rules {
            let host = if r.host.contains(':') {
                format!("[{}]", r.host)
            } else {
                r.host.clone()
            };
            let entry = format!("{host}:{}", r.port);
            match r.decision.as_str() {
                "allow" => allowed.push(entry),
                "deny" => denied.push(entry),
                other => return Err(format!("port_rules: invalid decision {other:?}")),
            }
        }
        let mut session_allows = Vec::with_capacity(snap.session_allows.len());
        for s in &snap.session_allows {
            let protocol = Protocol::parse(&s.protocol)
                .ok_or_else(|| format!("session_allows: invalid protocol {:?}", s.protocol))?;
            let port =
                u16::try_from(s.port).map_err(|_| "session_allows: invalid port".to_string())?;
            session_allows.push((s.host.clone(), protocol, port));
        }
        Ok(SnapshotLists {
            allowed,
            denied,
            session_allows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Decision {
        Decision {
            decision: Verdict::Deny,
            reason: Reason::NotAllowedLocal,
            source: Source::BaselinePolicy,
            protocol: Protocol::HttpsConnect,
            host: "api.example.com".into(),
            port: 443,
            id: crate::decision::new_decision_id(),
            timestamp: UNIX_EPOCH + Duration::from_millis(1_764_000_000_123),
            method: Some("CONNECT".into()),
            client_address: Some("127.0.0.1".parse().unwrap()),
            client_port: Some(40000),
            override_: true,
            ask_id: Some("ask_0123456789abcdef".into()),
            rule: Some("*.example.com:443".into()),
            address: Some("10.0.0.1".parse().unwrap()),
            socket_path: Some("/run/x.sock".into()),
            message: Some("Portcullis blocked this request: x".into()),
            origin: Origin {
                proxy_id: "px-0123456789ab".into(),
                session_id: "default".into(),
            },
        }
    }

    #[test]
    fn roundtrip_every_field_and_every_absent_one() {
        let d = full();
        let wire = v1::Decision::from(&d);
        assert_eq!(Decision::try_from(&wire).unwrap(), d);
        let mut sparse = full();
        sparse.method = None;
        sparse.client_address = None;
        sparse.client_port = None;
        sparse.ask_id = None;
        sparse.rule = None;
        sparse.address = None;
        sparse.socket_path = None;
        sparse.message = None;
        sparse.reason = Reason::Other("from_a_newer_control".into());
        let wire = v1::Decision::from(&sparse);
        assert_eq!(wire.method, "");
        assert_eq!(wire.client_port, 0);
        assert_eq!(Decision::try_from(&wire).unwrap(), sparse);
    }

    #[test]
    fn invalid_wire_values_are_errors() {
        let good = v1::Decision::from(&full());
        let cases: [fn(&mut v1::Decision); 8] = [
            |w| w.decision = "maybe".into(),
            |w| w.source = "".into(),
            |w| w.protocol = "ftp".into(),
            |w| w.port = 70000,
            |w| w.id = "x".into(),
            |w| w.timestamp = None,
            |w| w.address = "not-an-ip".into(),
            |w| w.reason = "".into(),
        ];
        for mutate in cases {
            let mut w = good.clone();
            mutate(&mut w);
            assert!(Decision::try_from(&w).is_err(), "{w:?}");
        }
    }

    #[test]
    fn descriptor_set_is_embedded() {
        assert!(FILE_DESCRIPTOR_SET.len() > 100);
    }
}
