//! Renderers of a [`Decision`](super::Decision): canonical JSON, prefix line, bodies, log line.

use std::fmt::Write as _;
use std::net::IpAddr;

use super::message::{MessageKind, MessageTarget, render_message};
use super::timestamp::{parse_timestamp, push_timestamp};
use super::{Decision, Origin, Protocol, Reason, Source, Verdict};

/// `content-type` of a text refusal body.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; charset=utf-8";
/// `content-type` of a JSON refusal body.
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// Literal that starts line 1 of a text refusal body.
pub const DECISION_LINE_PREFIX: &str = "PORTCULLIS_POLICY_DECISION ";
/// Literal that starts the violation log message.
pub const VIOLATION_LINE_PREFIX: &str = "PORTCULLIS_POLICY_VIOLATION ";

/// The canonical JSON keys, in order (`decisions.md` §1).
pub const CANONICAL_KEYS: [&str; 19] = [
    "decision",
    "reason",
    "source",
    "protocol",
    "host",
    "port",
    "id",
    "timestamp",
    "method",
    "client_address",
    "client_port",
    "override",
    "ask_id",
    "rule",
    "address",
    "socket_path",
    "message",
    "proxy_id",
    "session_id",
];

/// Appends `s` as a JSON string literal (quotes included), escaping like `serde_json`.
pub(crate) fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if esc.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(esc);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

fn push_key(out: &mut String, key: &str) {
    out.push(',');
    out.push('"');
    out.push_str(key);
    out.push_str("\":");
}

fn push_opt_str(out: &mut String, key: &str, v: Option<&str>) {
    push_key(out, key);
    match v {
        Some(s) => push_json_str(out, s),
        None => out.push_str("null"),
    }
}

fn push_opt_ip(out: &mut String, key: &str, v: Option<IpAddr>) {
    push_key(out, key);
    match v {
        Some(ip) => {
            let _ = write!(out, "\"{ip}\"");
        }
        None => out.push_str("null"),
    }
}

fn push_id(out: &mut String, id: &uuid::Uuid) {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    out.push('"');
    out.push_str(id.hyphenated().encode_lower(&mut buf));
    out.push('"');
}

/// Why [`Decision::from_canonical_json`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON.
    #[error("invalid JSON: {0}")]
    Json(String),
    /// JSON, but not an object.
    #[error("not a JSON object")]
    NotAnObject,
    /// A canonical key is missing.
    #[error("missing key `{0}`")]
    MissingKey(&'static str),
    /// A key that is not canonical.
    #[error("unknown key `{0}`")]
    UnknownKey(String),
    /// A key has the wrong type or an invalid value.
    #[error("invalid value for `{0}`")]
    InvalidValue(&'static str),
}

impl Decision {
    /// True for `deny` and `ask` (everything the blocked log records).
    pub fn is_block(&self) -> bool {
        self.decision != Verdict::Allow
    }

    /// `x-proxy-error` value of this refusal (`""` for a plain allow).
    pub fn proxy_error(&self) -> &'static str {
        self.reason.proxy_error()
    }

    /// HTTP status of this refusal (403, or 503 for `proxy_disabled`).
    pub fn http_status(&self) -> u16 {
        self.reason.http_status()
    }

    /// The id, lower-case hyphenated (36 characters).
    pub fn id_string(&self) -> String {
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        self.id.hyphenated().encode_lower(&mut buf).to_owned()
    }

    /// What a §5 message about this Decision talks about.
    pub fn target(&self) -> MessageTarget<'_> {
        MessageTarget {
            host: &self.host,
            port: self.port,
            method: self.method.as_deref(),
            address: self.address,
            socket_path: self.socket_path.as_deref(),
        }
    }

    /// Renders the §5 message `kind` for this Decision and stores it in `message`.
    pub fn set_message(&mut self, kind: MessageKind) {
        self.message = Some(render_message(kind, &self.target()));
    }

    fn push_prefix_fields(&self, out: &mut String) {
        out.push_str("{\"decision\":\"");
        out.push_str(self.decision.as_str());
        out.push_str("\",\"reason\":");
        push_json_str(out, self.reason.as_str());
        out.push_str(",\"source\":\"");
        out.push_str(self.source.as_str());
        out.push_str("\",\"protocol\":\"");
        out.push_str(self.protocol.as_str());
        out.push_str("\",\"host\":");
        push_json_str(out, &self.host);
        let _ = write!(out, ",\"port\":{},\"id\":", self.port);
        push_id(out, &self.id);
    }

    fn capacity_hint(&self) -> usize {
        480 + self.host.len()
            + self.reason.as_str().len()
            + self.message.as_deref().map_or(0, str::len)
            + self.rule.as_deref().map_or(0, str::len)
            + self.socket_path.as_deref().map_or(0, str::len)
            + self.ask_id.as_deref().map_or(0, str::len)
            + self.origin.session_id.len()
    }

    /// Appends the canonical JSON (`decisions.md` §1) to `out`.
    pub fn write_canonical_json(&self, out: &mut String) {
        self.push_prefix_fields(out);
        out.push_str(",\"timestamp\":\"");
        push_timestamp(out, self.timestamp);
        out.push('"');
        push_opt_str(out, "method", self.method.as_deref());
        push_opt_ip(out, "client_address", self.client_address);
        push_key(out, "client_port");
        match self.client_port {
            Some(p) => {
                let _ = write!(out, "{p}");
            }
            None => out.push_str("null"),
        }
        push_key(out, "override");
        out.push_str(if self.override_ { "true" } else { "false" });
        push_opt_str(out, "ask_id", self.ask_id.as_deref());
        push_opt_str(out, "rule", self.rule.as_deref());
        push_opt_ip(out, "address", self.address);
        push_opt_str(out, "socket_path", self.socket_path.as_deref());
        push_opt_str(out, "message", self.message.as_deref());
        push_opt_str(out, "proxy_id", Some(&self.origin.proxy_id));
        push_opt_str(out, "session_id", Some(&self.origin.session_id));
        out.push('}');
    }

    /// Canonical JSON: all 19 keys in table order, nulls present, no whitespace.
    pub fn canonical_json(&self) -> String {
        let mut out = String::with_capacity(self.capacity_hint());
        self.write_canonical_json(&mut out);
        out
    }

    /// `PORTCULLIS_POLICY_DECISION {json}` with keys decision, reason, source, protocol, host,
    /// port, id (no trailing newline).
    pub fn prefix_line(&self) -> String {
        let mut out = String::with_capacity(200 + self.host.len());
        out.push_str(DECISION_LINE_PREFIX);
        self.push_prefix_fields(&mut out);
        out.push('}');
        out
    }

    /// Text refusal body: prefix line, `\n`, message, `\n` (message empty when absent).
    pub fn text_body(&self) -> String {
        let mut out = String::with_capacity(self.capacity_hint());
        out.push_str(DECISION_LINE_PREFIX);
        self.push_prefix_fields(&mut out);
        out.push_str("}\n");
        out.push_str(self.message.as_deref().unwrap_or(""));
        out.push('\n');
        out
    }

    /// JSON refusal body: keys status (`blocked`), host, port, protocol, reason, decision,
    /// source, message (null when absent), id; then `\n`.
    pub fn json_body(&self) -> String {
        let mut out = String::with_capacity(self.capacity_hint());
        out.push_str("{\"status\":\"blocked\",\"host\":");
        push_json_str(&mut out, &self.host);
        let _ = write!(out, ",\"port\":{},\"protocol\":\"", self.port);
        out.push_str(self.protocol.as_str());
        out.push_str("\",\"reason\":");
        push_json_str(&mut out, self.reason.as_str());
        out.push_str(",\"decision\":\"");
        out.push_str(self.decision.as_str());
        out.push_str("\",\"source\":\"");
        out.push_str(self.source.as_str());
        out.push('"');
        push_opt_str(&mut out, "message", self.message.as_deref());
        out.push_str(",\"id\":");
        push_id(&mut out, &self.id);
        out.push_str("}\n");
        out
    }

    /// The refusal body for the negotiated form ([`text_body`](Self::text_body) or
    /// [`json_body`](Self::json_body)) and its `content-type`.
    pub fn body(&self, json: bool) -> (String, &'static str) {
        if json {
            (self.json_body(), CONTENT_TYPE_JSON)
        } else {
            (self.text_body(), CONTENT_TYPE_TEXT)
        }
    }

    /// `PORTCULLIS_POLICY_VIOLATION ` + canonical JSON (the WARN log message, §7).
    pub fn violation_line(&self) -> String {
        let mut out = String::with_capacity(self.capacity_hint() + VIOLATION_LINE_PREFIX.len());
        out.push_str(VIOLATION_LINE_PREFIX);
        self.write_canonical_json(&mut out);
        out
    }

    /// Parses canonical JSON back. Strict: every canonical key must be present, no others.
    pub fn from_canonical_json(s: &str) -> Result<Decision, DecodeError> {
        use serde_json::Value;
        let v: Value = serde_json::from_str(s).map_err(|e| DecodeError::Json(e.to_string()))?;
        let Value::Object(map) = v else {
            return Err(DecodeError::NotAnObject);
        };
        if let Some(k) = map.keys().find(|k| !CANONICAL_KEYS.contains(&k.as_str())) {
            return Err(DecodeError::UnknownKey(k.clone()));
        }
        let get = |k: &'static str| map.get(k).ok_or(DecodeError::MissingKey(k));
        let string = |k: &'static str| -> Result<&str, DecodeError> {
            get(k)?.as_str().ok_or(DecodeError::InvalidValue(k))
        };
        let opt_string = |k: &'static str| -> Result<Option<String>, DecodeError> {
            match get(k)? {
                Value::Null => Ok(None),
                Value::String(s) => Ok(Some(s.clone())),
                _ => Err(DecodeError::InvalidValue(k)),
            }
        };
        let opt_ip = |k: &'static str| -> Result<Option<IpAddr>, DecodeError> {
            opt_string(k)?
                .map(|s| s.parse().map_err(|_| DecodeError::InvalidValue(k)))
                .transpose()
        };
        let port = |k: &'static str| -> Result<Option<u16>, DecodeError> {
            match get(k)? {
                Value::Null => Ok(None),
                v => v
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .map(Some)
                    .ok_or(DecodeError::InvalidValue(k)),
            }
        };
        let decision = match string("decision")? {
            "allow" => Verdict::Allow,
            "deny" => Verdict::Deny,
            "ask" => Verdict::Ask,
            _ => return Err(DecodeError::InvalidValue("decision")),
        };
        let source = match string("source")? {
            "baseline_policy" => Source::BaselinePolicy,
            "mode_guard" => Source::ModeGuard,
            "proxy_state" => Source::ProxyState,
            "decider" => Source::Decider,
            _ => return Err(DecodeError::InvalidValue("source")),
        };
        let protocol =
            Protocol::parse(string("protocol")?).ok_or(DecodeError::InvalidValue("protocol"))?;
        let id_text = string("id")?;
        let id = uuid::Uuid::try_parse(id_text).map_err(|_| DecodeError::InvalidValue("id"))?;
        if id_text.len() != uuid::fmt::Hyphenated::LENGTH
            || id_text.bytes().any(|b| b.is_ascii_uppercase())
        {
            return Err(DecodeError::InvalidValue("id"));
        }
        Ok(Decision {
            decision,
            reason: Reason::parse(string("reason")?),
            source,
            protocol,
            host: string("host")?.to_owned(),
            port: port("port")?.ok_or(DecodeError::InvalidValue("port"))?,
            id,
            timestamp: parse_timestamp(string("timestamp")?)
                .ok_or(DecodeError::InvalidValue("timestamp"))?,
            method: opt_string("method")?,
            client_address: opt_ip("client_address")?,
            client_port: port("client_port")?,
            override_: get("override")?
                .as_bool()
                .ok_or(DecodeError::InvalidValue("override"))?,
            ask_id: opt_string("ask_id")?,
            rule: opt_string("rule")?,
            address: opt_ip("address")?,
            socket_path: opt_string("socket_path")?,
            message: opt_string("message")?,
            origin: Origin {
                proxy_id: string("proxy_id")?.into(),
                session_id: string("session_id")?.into(),
            },
        })
    }
}
