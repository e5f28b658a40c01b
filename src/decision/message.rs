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
