//! The one `Decision` value (`decisions.md` §1) and its renderers.
//!
//! Policy produces a [`Decision`]; every surface (HTTP response, SOCKS reply, blocked log,
//! violation line, gRPC report, audit record) renders this value and never re-derives a field.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

mod message;
mod render;

mod accept;
mod errors;
mod timestamp;

pub use accept::accepts_json;
pub use errors::{ProxyError, error_body};
pub use message::{
    Ending, MESSAGE_PREFIX, MessageKind, MessageTarget, ResolveFailure, render_message,
};
pub use render::*;
pub use timestamp::{format_timestamp, parse_timestamp};

/// What the policy answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The request may proceed.
    Allow,
    /// The request is refused.
    Deny,
    /// Refused for now and held while an operator is asked (`control.md` §7).
    Ask,
}

impl Verdict {
    /// Wire label (`allow`, `deny`, `ask`).
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Ask => "ask",
        }
    }
}

/// Which part of the system decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The allow/deny lists and address rules.
    BaselinePolicy,
    /// Limited-mode guards.
    ModeGuard,
    /// `network.enabled = false`.
    ProxyState,
    /// The control plane (asks, approvals, session allows).
    Decider,
}

impl Source {
    /// Wire label.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::BaselinePolicy => "baseline_policy",
            Source::ModeGuard => "mode_guard",
            Source::ProxyState => "proxy_state",
            Source::Decider => "decider",
        }
    }
}

/// How the client reached the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Absolute-form HTTP request.
    Http,
    /// HTTP `CONNECT` tunnel (and the inner requests of an intercepted one).
    HttpsConnect,
    /// SOCKS5 `CONNECT`.
    Socks5Tcp,
    /// SOCKS5 `UDP ASSOCIATE` datagrams.
    Socks5Udp,
    /// `x-unix-socket` forwarding.
    UnixSocket,
}

impl Protocol {
    /// Wire label.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::HttpsConnect => "https_connect",
            Protocol::Socks5Tcp => "socks5_tcp",
            Protocol::Socks5Udp => "socks5_udp",
            Protocol::UnixSocket => "unix_socket",
        }
    }

    /// Parses a wire label.
    pub fn parse(label: &str) -> Option<Protocol> {
        Some(match label {
            "http" => Protocol::Http,
            "https_connect" => Protocol::HttpsConnect,
            "socks5_tcp" => Protocol::Socks5Tcp,
            "socks5_udp" => Protocol::Socks5Udp,
            "unix_socket" => Protocol::UnixSocket,
            _ => return None,
        })
    }
}

/// Why (`decisions.md` §2). Reasons a control plane sends that we do not know are kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Plain allow.
    Allow,
    /// Not in the allowlist.
    NotAllowed,
    /// Local, private, reserved or unresolvable destination.
    NotAllowedLocal,
    /// Matched a deny entry.
    Denied,
    /// Limited mode refused the method, upgrade or protocol.
    MethodNotAllowed,
    /// Limited mode needs interception, which is off.
    MitmRequired,
    /// `network.enabled = false`.
    ProxyDisabled,
    /// The operator refused.
    ApprovalDenied,
    /// Nobody answered the ask in time.
    ApprovalTimeout,
    /// Too many asks pending.
    ApprovalsFull,
    /// The control plane stream is down.
    ControlUnavailable,
    /// The session ended while the ask was pending.
    SessionEnded,
    /// A control-plane policy deny.
    PolicyDenied,
    /// Any other reason string a control plane sent (rendered like `policy_denied`).
    Other(Arc<str>),
}

impl Reason {
    /// Wire label.
    pub fn as_str(&self) -> &str {
        match self {
            Reason::Allow => "allow",
            Reason::NotAllowed => "not_allowed",
            Reason::NotAllowedLocal => "not_allowed_local",
            Reason::Denied => "denied",
            Reason::MethodNotAllowed => "method_not_allowed",
            Reason::MitmRequired => "mitm_required",
            Reason::ProxyDisabled => "proxy_disabled",
            Reason::ApprovalDenied => "approval_denied",
            Reason::ApprovalTimeout => "approval_timeout",
            Reason::ApprovalsFull => "approvals_full",
            Reason::ControlUnavailable => "control_unavailable",
            Reason::SessionEnded => "session_ended",
            Reason::PolicyDenied => "policy_denied",
            Reason::Other(s) => s,
        }
    }

    /// Parses a wire label; unknown labels become [`Reason::Other`].
    pub fn parse(label: &str) -> Reason {
        match label {
            "allow" => Reason::Allow,
            "not_allowed" => Reason::NotAllowed,
            "not_allowed_local" => Reason::NotAllowedLocal,
            "denied" => Reason::Denied,
            "method_not_allowed" => Reason::MethodNotAllowed,
            "mitm_required" => Reason::MitmRequired,
            "proxy_disabled" => Reason::ProxyDisabled,
            "approval_denied" => Reason::ApprovalDenied,
            "approval_timeout" => Reason::ApprovalTimeout,
            "approvals_full" => Reason::ApprovalsFull,
            "control_unavailable" => Reason::ControlUnavailable,
            "session_ended" => Reason::SessionEnded,
            "policy_denied" => Reason::PolicyDenied,
            other => Reason::Other(Arc::from(other)),
        }
    }

    /// The `x-proxy-error` header value for a refusal with this reason (`decisions.md` §2).
    pub fn proxy_error(&self) -> &'static str {
        match self {
            Reason::Allow => "",
            Reason::NotAllowed | Reason::NotAllowedLocal => "blocked-by-allowlist",
            Reason::Denied => "blocked-by-denylist",
            Reason::MethodNotAllowed => "blocked-by-method-policy",
            Reason::MitmRequired => "blocked-by-mitm-required",
            Reason::ProxyDisabled => "proxy-disabled",
            _ => "blocked-by-policy",
        }
    }

    /// HTTP status of a refusal with this reason.
    pub fn http_status(&self) -> u16 {
        match self {
            Reason::ProxyDisabled => 503,
            _ => 403,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who asked: identity of the data plane that made the Decision. Shared, cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// `px-` + 12 lowercase hex, new per process.
    pub proxy_id: Arc<str>,
    /// Session id (`default` when standalone).
    pub session_id: Arc<str>,
}

/// The one Decision (`decisions.md` §1). Field order is the canonical JSON key order.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// allow / deny / ask.
    pub decision: Verdict,
    /// Why.
    pub reason: Reason,
    /// Which part decided.
    pub source: Source,
    /// How the client reached the proxy.
    pub protocol: Protocol,
    /// Normalised host (IPv6 without brackets); `unix-socket` for unix sockets.
    pub host: String,
    /// Destination port; 0 for unix sockets.
    pub port: u16,
    /// UUIDv7, lower-case hyphenated.
    pub id: uuid::Uuid,
    /// When it was made.
    pub timestamp: SystemTime,
    /// HTTP method token, if any.
    pub method: Option<String>,
    /// Client peer address.
    pub client_address: Option<IpAddr>,
    /// Client peer port.
    pub client_port: Option<u16>,
    /// True when an approval or session allow allowed a `not_allowed`.
    pub override_: bool,
    /// Ask id on the final Decision of a held request.
    pub ask_id: Option<String>,
    /// The entry that decided, normalised text.
    pub rule: Option<String>,
    /// Resolved or literal address that caused `denied` / `not_allowed_local`.
    pub address: Option<IpAddr>,
    /// Requested unix-socket path (unix sockets only).
    pub socket_path: Option<String>,
    /// Human message (`decisions.md` §5); `None` for allows.
    pub message: Option<String>,
    /// Proxy and session identity.
    pub origin: Origin,
}

/// A fresh Decision id: UUIDv7.
pub fn new_decision_id() -> uuid::Uuid {
    uuid::Uuid::now_v7()
}

#[cfg(test)]
mod tests;
