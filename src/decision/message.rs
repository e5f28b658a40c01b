//! Human messages (`decisions.md` §5).

/// Why a name could not be resolved (the `{cause}` of the no-address message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResolveFailure {
    /// `timed out`
    TimedOut,
    /// `no addresses`
    NoAddresses,
    /// `lookup failed`
    LookupFailed,
}

/// Which row of the message table of `decisions.md` §5 a refusal renders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// `not_allowed`, standalone: `{target} is not in the allowlist.` (ask)
    NotAllowed,
    /// `not_allowed` with asks disabled by the control plane (no)
    NotAllowedAsksDisabled,
    /// `not_allowed` on an `ask` Decision (ask)
    NotAllowedWaiting,
    /// `not_allowed_local`, literal (no)
    LocalLiteral,
    /// `not_allowed_local`, resolved to `{address}` (no)
    LocalResolved,
    /// `not_allowed_local`, the name could not be resolved (no)
    Unresolvable(ResolveFailure),
    /// `not_allowed_local`, always refused (no)
    AlwaysRefused,
    /// `denied` (no)
    Denied,
    /// `method_not_allowed`, method (no)
    MethodNotAllowed,
    /// `method_not_allowed`, upgrade (no)
    UpgradeNotAllowed,
    /// `method_not_allowed`, SOCKS5 TCP (no)
    Socks5TcpNotAllowed,
    /// `method_not_allowed`, UDP (no)
    UdpNotAllowed,
    /// `mitm_required` (no)
    MitmRequired,
    /// `proxy_disabled` (no)
    ProxyDisabled,
    /// `approval_denied` (no)
    ApprovalDenied,
    /// `approval_timeout` (later)
    ApprovalTimeout,
    /// `approvals_full` (later)
    ApprovalsFull,
    /// `control_unavailable` (later)
    ControlUnavailable,
    /// `session_ended` (no)
    SessionEnded,
    /// `policy_denied` and any unknown reason (no)
    PolicyDenied,
    /// unix socket `not_allowed` (ask)
    UnixNotAllowed,
    /// unix socket `not_allowed`, relative path (no)
    UnixRelative,
    /// unix socket `denied` (no)
    UnixDenied,
}

use std::fmt::Write as _;
use std::net::IpAddr;

/// Every message starts with this.
pub const MESSAGE_PREFIX: &str = "Portcullis blocked this request: ";

/// The three endings of §5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ending {
    /// `Approval is not possible; do not retry through another route.`
    No,
    /// `Ask the operator to approve it; do not retry through another route.`
    Ask,
    /// `Retry later.`
    Later,
}

impl Ending {
    /// The sentence.
    pub fn as_str(self) -> &'static str {
        match self {
            Ending::No => "Approval is not possible; do not retry through another route.",
            Ending::Ask => "Ask the operator to approve it; do not retry through another route.",
            Ending::Later => "Retry later.",
        }
    }
}

impl ResolveFailure {
    /// The `{cause}` text.
    pub fn as_str(self) -> &'static str {
        match self {
            ResolveFailure::TimedOut => "timed out",
            ResolveFailure::NoAddresses => "no addresses",
            ResolveFailure::LookupFailed => "lookup failed",
        }
    }
}

impl MessageKind {
    /// Which ending this row uses.
    pub fn ending(self) -> Ending {
        use MessageKind::*;
        match self {
            NotAllowed | NotAllowedWaiting | UnixNotAllowed => Ending::Ask,
            ApprovalTimeout | ApprovalsFull | ControlUnavailable => Ending::Later,
            _ => Ending::No,
        }
    }

    /// The reason this row belongs to (`PolicyDenied` for the catch-all row).
    pub fn reason(self) -> super::Reason {
        use super::Reason;
        use MessageKind::*;
        match self {
            NotAllowed
            | NotAllowedAsksDisabled
            | NotAllowedWaiting
            | UnixNotAllowed
            | UnixRelative => Reason::NotAllowed,
            LocalLiteral | LocalResolved | Unresolvable(_) | AlwaysRefused => {
                Reason::NotAllowedLocal
            }
            Denied | UnixDenied => Reason::Denied,
            MethodNotAllowed | UpgradeNotAllowed | Socks5TcpNotAllowed | UdpNotAllowed => {
                Reason::MethodNotAllowed
            }
            MitmRequired => Reason::MitmRequired,
            ProxyDisabled => Reason::ProxyDisabled,
            ApprovalDenied => Reason::ApprovalDenied,
            ApprovalTimeout => Reason::ApprovalTimeout,
            ApprovalsFull => Reason::ApprovalsFull,
            ControlUnavailable => Reason::ControlUnavailable,
            SessionEnded => Reason::SessionEnded,
            PolicyDenied => Reason::PolicyDenied,
        }
    }

    fn is_unix(self) -> bool {
        matches!(
            self,
            MessageKind::UnixNotAllowed | MessageKind::UnixRelative | MessageKind::UnixDenied
        )
    }
}

/// What a message talks about. Borrowed from a [`Decision`](super::Decision) or from the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageTarget<'a> {
    /// Normalised host, IPv6 without brackets.
    pub host: &'a str,
    /// Destination port.
    pub port: u16,
    /// HTTP method token (used by [`MessageKind::MethodNotAllowed`]).
    pub method: Option<&'a str>,
    /// Offending address (used by [`MessageKind::LocalResolved`]).
    pub address: Option<IpAddr>,
    /// Unix-socket path; when set, `{target}` is `unix socket {socket_path}`.
    pub socket_path: Option<&'a str>,
}

/// Appends `{target}`: `host:port`, `[v6]:port`, or `unix socket {path}`.
fn push_target(out: &mut String, kind: MessageKind, t: &MessageTarget<'_>) {
    if let Some(path) = t.socket_path {
        out.push_str("unix socket ");
        out.push_str(path);
    } else if kind.is_unix() {
        // A unix-socket row without a path: say so rather than print `unix-socket:0`.
        out.push_str("unix socket ");
        out.push_str(t.host);
    } else {
        push_host_port(out, t.host, t.port);
    }
}

/// Appends `host:port`, bracketing IPv6 hosts (any host containing `:`; zones stay inside).
pub(crate) fn push_host_port(out: &mut String, host: &str, port: u16) {
    if host.contains(':') && !host.starts_with('[') {
        out.push('[');
        out.push_str(host);
        out.push(']');
    } else {
        out.push_str(host);
    }
    out.push(':');
    let _ = write!(out, "{port}");
}

/// Renders the human message of `decisions.md` §5 for one row.
///
/// Fallbacks for missing inputs (which policy never produces): `LocalResolved` without an
/// address prints `unknown`; `MethodNotAllowed` without a method prints `a request`.
pub fn render_message(kind: MessageKind, target: &MessageTarget<'_>) -> String {
    use MessageKind::*;
    let mut out = String::with_capacity(160 + target.host.len());
    out.push_str(MESSAGE_PREFIX);
    let t = |out: &mut String| push_target(out, kind, target);
    match kind {
        NotAllowed => {
            t(&mut out);
            out.push_str(" is not in the allowlist.");
        }
        NotAllowedAsksDisabled => {
            t(&mut out);
            out.push_str(" is not in the allowlist and approvals are disabled.");
        }
        NotAllowedWaiting => {
            t(&mut out);
            out.push_str(" is not in the allowlist and is waiting for approval.");
        }
        LocalLiteral => {
            t(&mut out);
            out.push_str(" is a local or private address.");
        }
        LocalResolved => {
            t(&mut out);
            out.push_str(" resolves to the local or private address ");
            match target.address {
                Some(a) => {
                    let _ = write!(out, "{a}");
                }
                None => out.push_str("unknown"),
            }
            out.push('.');
        }
        Unresolvable(cause) => {
            out.push_str(target.host);
            out.push_str(" could not be resolved (");
            out.push_str(cause.as_str());
            out.push_str("), so its addresses cannot be checked.");
        }
        AlwaysRefused => {
            t(&mut out);
            out.push_str(" is a reserved address or this proxy itself.");
        }
        Denied | UnixDenied => {
            t(&mut out);
            out.push_str(" is explicitly denied.");
        }
        MethodNotAllowed => {
            out.push_str(target.method.unwrap_or("a request"));
            out.push_str(" to ");
            t(&mut out);
            out.push_str(
                " is not allowed in limited mode, which permits only GET, HEAD and OPTIONS.",
            );
        }
        UpgradeNotAllowed => {
            out.push_str("protocol upgrades to ");
            t(&mut out);
            out.push_str(" are not allowed in limited mode.");
        }
        Socks5TcpNotAllowed => {
            out.push_str("SOCKS5 connections to ");
            t(&mut out);
            out.push_str(" are not allowed in limited mode, which permits only HTTPS on port 443.");
        }
        UdpNotAllowed => {
            out.push_str("UDP to ");
            t(&mut out);
            out.push_str(" is not allowed in limited mode.");
        }
        MitmRequired => {
            out.push_str("HTTPS to ");
            t(&mut out);
            out.push_str(" must be inspected in limited mode, but interception is off.");
        }
        ProxyDisabled => out.push_str("the proxy is disabled, so no traffic is allowed."),
        ApprovalDenied => {
            out.push_str("the operator refused access to ");
            t(&mut out);
            out.push('.');
        }
        ApprovalTimeout => {
            out.push_str("no one answered the approval request for ");
            t(&mut out);
            out.push_str(" in time.");
        }
        ApprovalsFull => out.push_str("too many requests are waiting for approval."),
        ControlUnavailable => {
            t(&mut out);
            out.push_str(" needs approval, but the control plane is unavailable.");
        }
        SessionEnded => {
            out.push_str("the session ended before access to ");
            t(&mut out);
            out.push_str(" was approved.");
        }
        PolicyDenied => {
            t(&mut out);
            out.push_str(" is blocked by network policy.");
        }
        UnixNotAllowed => {
            t(&mut out);
            out.push_str(" is not in the unix-socket allowlist.");
        }
        UnixRelative => {
            t(&mut out);
            out.push_str(" is not an absolute path.");
        }
    }
    out.push(' ');
    out.push_str(kind.ending().as_str());
    out
}
