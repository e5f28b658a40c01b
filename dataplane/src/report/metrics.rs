//! The metrics registry (`http.md` §10, `decisions.md` §7.5, `audit.md` §7.3).
//!
//! Lock-free: every series is an atomic in a fixed array indexed by enum label values, so
//! recording is one relaxed `fetch_add` (histograms: two) and never allocates. Every family is
//! rendered from start-up, and every labelled family is pre-initialised with a zero series for
//! each label value the proxy knows, so a dashboard never sees a series appear out of nothing.
//!
//! ## Label values
//!
//! | label | values |
//! |---|---|
//! | `protocol` | `http`, `https_connect`, `socks5_tcp`, `socks5_udp`, `unix_socket` |
//! | `decision` | `allow`, `deny`, `ask` |
//! | `reason` (blocks) | every refusal reason of `decisions.md` §2 (not `allow`) plus `other` for reason strings a control plane sent that we do not know |
//! | `listener` | `http`, `socks5`, `admin` |
//! | `direction` | `upstream` (client → destination), `downstream` |
//! | `kind` (bad requests) | [`BadRequestKind`] |
//! | `kind` (upstream errors) | [`UpstreamErrorKind`] |
//! | `kind` (MITM errors) | [`MitmErrorKind`] |
//! | `sink` | `control`, `audit` |
//! | `reason` (UDP drops) | [`UdpDropReason`] (`socks5.md` §6) |
//! | `list` | [`PolicyList`] |
//! | `reason` (audit drops) | `queue_full`, `export_failed`, `shutdown` |
//!
//! `portcullis_blocks_total` counts every `deny` **and** `ask` Decision, exactly the Decisions that
//! enter the blocked log, so its sum equals `portcullis_blocked_log_total`.
//!
//! ## Histogram buckets (upper bounds, seconds)
//!
//! * `portcullis_decision_duration_seconds`: 0.000001, 0.0000025, 0.000005, 0.00001, 0.000025,
//!   0.00005, 0.0001, 0.00025, 0.001, 0.01 (as given by `http.md` §10).
//! * `portcullis_dns_duration_seconds`: 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
//!   0.25, 0.5, 1, 2.5, 5 — the 1-2.5-5 series from 0.5 ms (cached answers) to 5 s (the
//!   default resolver timeout range).
//! * `portcullis_ask_wait_seconds`: 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600 —
//!   asks are answered by people; the default ask timeout is 60 s and the maximum 3600 s
//!   (`control.md` §7).
//!
//! Every histogram also has the `+Inf` bucket, `_sum` and `_count`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use portcullis::decision::{Decision, Protocol, Reason, Verdict};

/// Defines a metrics label enum: its variants, their label strings, `ALL` in rendering order.
macro_rules! label_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $var:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $var),+
        }

        impl $name {
            /// Every value, in rendering order.
            pub const ALL: &'static [$name] = &[$($name::$var),+];
            const COUNT: usize = [$($s),+].len();

            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$var => $s),+
                }
            }

            /// Parses a label value.
            pub fn from_label(label: &str) -> Option<$name> {
                match label {
                    $($s => Some($name::$var),)+
                    _ => None,
                }
            }

            #[inline]
            fn idx(self) -> usize {
                self as usize
            }
        }
    };
}

label_enum! {
    /// Which listener a connection came from (`listener` label).
    Listener {
        /// The HTTP proxy listener.
        Http => "http",
        /// The SOCKS5 listener.
        Socks5 => "socks5",
        /// The admin API listener.
        Admin => "admin",
    }
}

label_enum! {
    /// Byte and datagram direction (`direction` label).
    Direction {
        /// Client → destination.
        Upstream => "upstream",
        /// Destination → client.
        Downstream => "downstream",
    }
}

label_enum! {
    /// `portcullis_bad_requests_total{kind}`: input that is not policy and produces no Decision.
    BadRequestKind {
        /// Unusable request target, bad port, userinfo, origin/asterisk form, Host mismatch (400).
        InvalidTarget => "invalid_target",
        /// Invalid host (`policy.md` §1).
        InvalidHost => "invalid_host",
        /// Malformed request head (`http.md` §1.5).
        Malformed => "malformed",
        /// Head not complete in time (408).
        HeadTimeout => "head_timeout",
        /// Request target too long (414).
        UriTooLong => "uri_too_long",
        /// Head too large or too many fields (431).
        HeaderTooLarge => "header_too_large",
        /// HTTP/2 preface or other unsupported version (505).
        UnsupportedVersion => "unsupported_version",
        /// `CONNECT` inside an intercepted tunnel (405).
        ConnectInMitm => "connect_in_mitm",
        /// Bad `x-unix-socket` header, or unix sockets unsupported.
        UnixSocket => "unix_socket",
        /// Admin request body too large (413).
        BodyTooLarge => "body_too_large",
        /// SOCKS5 handshake not complete in time (`socks5.md` §1.2).
        SocksTimeout => "socks_timeout",
        /// SOCKS5 protocol violation (`socks5.md` §1.3).
        SocksProtocol => "socks_protocol",
        /// SOCKS5 authentication failed.
        SocksAuthFailed => "socks_auth_failed",
        /// Anything else.
        Other => "other",
    }
}

impl From<&str> for BadRequestKind {
    /// Unknown labels count as `other`.
    fn from(label: &str) -> Self {
        BadRequestKind::from_label(label).unwrap_or(BadRequestKind::Other)
    }
}

label_enum! {
    /// `portcullis_upstream_errors_total{kind}` (`decisions.md` §4).
    UpstreamErrorKind {
        /// Connect refused / unreachable / reset, no address, upstream proxy refused (502).
        Connect => "connect",
        /// TLS handshake or certificate verification with the origin failed (502).
        Tls => "tls",
        /// Connected, but no valid response head (502).
        Failed => "failed",
        /// Connect budget, DNS or response-header timeout (504).
        Timeout => "timeout",
        /// The upstream aborted mid-response.
        Aborted => "aborted",
        /// Anything else.
        Other => "other",
    }
}

impl From<&str> for UpstreamErrorKind {
    /// Unknown labels count as `other`.
    fn from(label: &str) -> Self {
        UpstreamErrorKind::from_label(label).unwrap_or(UpstreamErrorKind::Other)
    }
}

label_enum! {
    /// `portcullis_mitm_errors_total{kind}` (`http.md` §9).
    MitmErrorKind {
        /// Client SNI differs from the CONNECT host.
        SniMismatch => "sni_mismatch",
        /// Any other client-side handshake failure.
        ClientHandshake => "client_handshake",
        /// Leaf certificate could not be made.
        LeafGeneration => "leaf_generation",
        /// Anything else.
        Other => "other",
    }
}

impl From<&str> for MitmErrorKind {
    /// Unknown labels count as `other`.
    fn from(label: &str) -> Self {
        MitmErrorKind::from_label(label).unwrap_or(MitmErrorKind::Other)
    }
}

label_enum! {
    /// `portcullis_events_dropped_total{sink}`: Decision sinks that drop instead of blocking.
    Sink {
        /// The gRPC report stream (`control.event_buffer` overflow).
        Control => "control",
        /// The audit pipeline's hand-off.
        Audit => "audit",
    }
}

label_enum! {
    /// `portcullis_udp_datagrams_dropped_total{reason}` (`socks5.md` §6).
    UdpDropReason {
        /// The destination was refused by policy.
        Policy => "policy",
        /// A datagram from a source the client never sent to.
        Unsolicited => "unsolicited",
        /// More destinations than `limits.max_udp_destinations`.
        TooManyDestinations => "too_many_destinations",
        /// A client datagram from a foreign source address.
        ForeignSource => "foreign_source",
        /// `FRAG` ≠ 0.
        Fragmented => "fragmented",
        /// Unparsable datagram header.
        Malformed => "malformed",
    }
}

label_enum! {
    /// `portcullis_policy_entries{list}`: entries in each policy list in force.
    PolicyList {
        /// `network.allowed_domains` (or the snapshot's allow list).
        Allowed => "allowed",
        /// `network.denied_domains`.
        Denied => "denied",
        /// Unix-socket allow list.
        UnixSocketsAllow => "unix_sockets_allow",
        /// Unix-socket deny list.
        UnixSocketsDeny => "unix_sockets_deny",
        /// Session allows granted by approvals.
        SessionAllows => "session_allows",
    }
}

label_enum! {
    /// `portcullis_audit_events_dropped_total{reason}` (`audit.md` §7).
    AuditDropReason {
        /// `audit.max_queue_size` records already in flight.
        QueueFull => "queue_full",
        /// The batch export failed.
        ExportFailed => "export_failed",
        /// Still in flight when shutdown ended.
        Shutdown => "shutdown",
    }
}

const PROTOCOLS: [Protocol; 5] = [
    Protocol::Http,
    Protocol::HttpsConnect,
    Protocol::Socks5Tcp,
    Protocol::Socks5Udp,
    Protocol::UnixSocket,
];
const NP: usize = PROTOCOLS.len();

#[inline]
fn proto_idx(p: Protocol) -> usize {
    match p {
        Protocol::Http => 0,
        Protocol::HttpsConnect => 1,
        Protocol::Socks5Tcp => 2,
        Protocol::Socks5Udp => 3,
        Protocol::UnixSocket => 4,
    }
}

const VERDICTS: [Verdict; 3] = [Verdict::Allow, Verdict::Deny, Verdict::Ask];
const NV: usize = VERDICTS.len();

#[inline]
fn verdict_idx(v: Verdict) -> usize {
    match v {
        Verdict::Allow => 0,
        Verdict::Deny => 1,
        Verdict::Ask => 2,
    }
}

/// The `reason` label values of `portcullis_blocks_total`: the refusal reasons of
/// `decisions.md` §2, then `other`.
pub const BLOCK_REASONS: [&str; 13] = [
    "not_allowed",
    "not_allowed_local",
    "denied",
    "method_not_allowed",
    "mitm_required",
    "proxy_disabled",
    "approval_denied",
    "approval_timeout",
    "approvals_full",
    "control_unavailable",
    "session_ended",
    "policy_denied",
    "other",
];
const NR: usize = BLOCK_REASONS.len();
const OTHER_REASON: usize = NR - 1;

#[inline]
fn reason_idx(r: &Reason) -> usize {
    match r {
        Reason::NotAllowed => 0,
        Reason::NotAllowedLocal => 1,
        Reason::Denied => 2,
        Reason::MethodNotAllowed => 3,
        Reason::MitmRequired => 4,
        Reason::ProxyDisabled => 5,
        Reason::ApprovalDenied => 6,
        Reason::ApprovalTimeout => 7,
        Reason::ApprovalsFull => 8,
        Reason::ControlUnavailable => 9,
        Reason::SessionEnded => 10,
        Reason::PolicyDenied => 11,
        // `allow` never refuses; unknown control-plane reasons share one slot.
        Reason::Allow | Reason::Other(_) => OTHER_REASON,
    }
}

/// Bucket bounds: (upper bound in nanoseconds, `le` label).
type Bounds = &'static [(u64, &'static str)];

const DECISION_BUCKETS: Bounds = &[
    (1_000, "0.000001"),
    (2_500, "0.0000025"),
    (5_000, "0.000005"),
    (10_000, "0.00001"),
    (25_000, "0.000025"),
    (50_000, "0.00005"),
    (100_000, "0.0001"),
    (250_000, "0.00025"),
    (1_000_000, "0.001"),
    (10_000_000, "0.01"),
];

const DNS_BUCKETS: Bounds = &[
    (500_000, "0.0005"),
    (1_000_000, "0.001"),
    (2_500_000, "0.0025"),
    (5_000_000, "0.005"),
    (10_000_000, "0.01"),
    (25_000_000, "0.025"),
    (50_000_000, "0.05"),
    (100_000_000, "0.1"),
    (250_000_000, "0.25"),
    (500_000_000, "0.5"),
    (1_000_000_000, "1"),
    (2_500_000_000, "2.5"),
    (5_000_000_000, "5"),
];

const ASK_WAIT_BUCKETS: Bounds = &[
    (100_000_000, "0.1"),
    (500_000_000, "0.5"),
    (1_000_000_000, "1"),
    (2_500_000_000, "2.5"),
    (5_000_000_000, "5"),
    (10_000_000_000, "10"),
    (30_000_000_000, "30"),
    (60_000_000_000, "60"),
    (120_000_000_000, "120"),
    (300_000_000_000, "300"),
    (600_000_000_000, "600"),
    (1_800_000_000_000, "1800"),
    (3_600_000_000_000, "3600"),
];

/// Room for up to 15 finite bounds plus `+Inf`.
const MAX_BUCKETS: usize = 16;

/// A fixed-bucket histogram of durations. Buckets are stored non-cumulatively (one slot per
/// bound plus the `+Inf` overflow slot) and made cumulative when rendered; `_count` is the sum
/// of all slots, so an observation is two relaxed adds (its slot and `_sum`).
pub struct Histogram {
    bounds: Bounds,
    slots: [AtomicU64; MAX_BUCKETS],
    sum_ns: AtomicU64,
}

/// A point-in-time copy of a [`Histogram`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// `(le label, cumulative count)` for each finite bound, in order.
    pub buckets: Vec<(&'static str, u64)>,
    /// Observations (the `+Inf` bucket).
    pub count: u64,
    /// Sum of observations in nanoseconds.
    pub sum_ns: u64,
}

impl Histogram {
    fn new(bounds: Bounds) -> Histogram {
        assert!(bounds.len() < MAX_BUCKETS);
        Histogram {
            bounds,
            slots: [const { AtomicU64::new(0) }; MAX_BUCKETS],
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    #[inline]
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let slot = self
            .bounds
            .iter()
            .position(|&(b, _)| ns <= b)
            .unwrap_or(self.bounds.len());
        self.slots[slot].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// Cumulative buckets, count and sum.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut acc = 0u64;
        let mut buckets = Vec::with_capacity(self.bounds.len());
        for (i, &(_, le)) in self.bounds.iter().enumerate() {
            acc += self.slots[i].load(Relaxed);
            buckets.push((le, acc));
        }
        acc += self.slots[self.bounds.len()].load(Relaxed);
        HistogramSnapshot {
            buckets,
            count: acc,
            sum_ns: self.sum_ns.load(Relaxed),
        }
    }
}

/// The audit counters of `audit.md` §7.3, read together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuditCounts {
    /// Records emitted.
    pub total: u64,
    /// Records exported.
    pub exported: u64,
    /// Dropped, `queue_full`.
    pub dropped_queue_full: u64,
    /// Dropped, `export_failed`.
    pub dropped_export_failed: u64,
    /// Dropped, `shutdown`.
    pub dropped_shutdown: u64,
}

impl AuditCounts {
    /// Sum of the dropped counters.
    pub fn dropped(&self) -> u64 {
        self.dropped_queue_full + self.dropped_export_failed + self.dropped_shutdown
    }
}

/// Every metric the data plane exports.
pub struct Metrics {
    version: &'static str,
    requests: [AtomicU64; NP],
    decisions: [[AtomicU64; NV]; NP],
    blocks: [[AtomicU64; NR]; NP],
    bad_requests: [AtomicU64; BadRequestKind::COUNT],
    active_connections: [AtomicI64; Listener::COUNT],
    connections_rejected: [AtomicU64; Listener::COUNT],
    active_tunnels: [AtomicI64; NP],
    bytes: [[AtomicU64; Direction::COUNT]; NP],
    upstream_errors: [AtomicU64; UpstreamErrorKind::COUNT],
    decision_duration: Histogram,
    dns_duration: Histogram,
    ask_wait: Histogram,
    pending_approvals: AtomicI64,
    blocked_log_total: AtomicU64,
    blocked_log_dropped: AtomicU64,
    events_dropped: [AtomicU64; Sink::COUNT],
    udp_datagrams: [AtomicU64; Direction::COUNT],
    udp_dropped: [AtomicU64; UdpDropReason::COUNT],
    mitm_errors: [AtomicU64; MitmErrorKind::COUNT],
    control_connected: AtomicI64,
    policy_version: AtomicU64,
    policy_entries: [AtomicU64; PolicyList::COUNT],
    audit_total: AtomicU64,
    audit_exported: AtomicU64,
    audit_dropped: [AtomicU64; AuditDropReason::COUNT],
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Decrements an active gauge when dropped (see [`Metrics::connection_opened`],
/// [`Metrics::tunnel_opened`]). Owns an `Arc<Metrics>` so it can move into a spawned task.
#[must_use = "the gauge is decremented when the guard is dropped"]
pub struct ActiveGuard {
    metrics: Arc<Metrics>,
    slot: ActiveSlot,
}

#[derive(Clone, Copy)]
enum ActiveSlot {
    Connection(Listener),
    Tunnel(Protocol),
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        match self.slot {
            ActiveSlot::Connection(l) => {
                self.metrics.active_connections[l.idx()].fetch_sub(1, Relaxed);
            }
            ActiveSlot::Tunnel(p) => {
                self.metrics.active_tunnels[proto_idx(p)].fetch_sub(1, Relaxed);
            }
        }
    }
}

impl Metrics {
    /// A registry with every series at zero and `build_info{version}` set to this crate's
    /// version.
    pub fn new() -> Metrics {
        Metrics {
            version: env!("CARGO_PKG_VERSION"),
            requests: [const { AtomicU64::new(0) }; NP],
            decisions: [const { [const { AtomicU64::new(0) }; NV] }; NP],
            blocks: [const { [const { AtomicU64::new(0) }; NR] }; NP],
            bad_requests: [const { AtomicU64::new(0) }; BadRequestKind::COUNT],
            active_connections: [const { AtomicI64::new(0) }; Listener::COUNT],
            connections_rejected: [const { AtomicU64::new(0) }; Listener::COUNT],
            active_tunnels: [const { AtomicI64::new(0) }; NP],
            bytes: [const { [const { AtomicU64::new(0) }; Direction::COUNT] }; NP],
            upstream_errors: [const { AtomicU64::new(0) }; UpstreamErrorKind::COUNT],
            decision_duration: Histogram::new(DECISION_BUCKETS),
            dns_duration: Histogram::new(DNS_BUCKETS),
            ask_wait: Histogram::new(ASK_WAIT_BUCKETS),
            pending_approvals: AtomicI64::new(0),
            blocked_log_total: AtomicU64::new(0),
            blocked_log_dropped: AtomicU64::new(0),
            events_dropped: [const { AtomicU64::new(0) }; Sink::COUNT],
            udp_datagrams: [const { AtomicU64::new(0) }; Direction::COUNT],
            udp_dropped: [const { AtomicU64::new(0) }; UdpDropReason::COUNT],
            mitm_errors: [const { AtomicU64::new(0) }; MitmErrorKind::COUNT],
            control_connected: AtomicI64::new(0),
            policy_version: AtomicU64::new(0),
            policy_entries: [const { AtomicU64::new(0) }; PolicyList::COUNT],
            audit_total: AtomicU64::new(0),
            audit_exported: AtomicU64::new(0),
            audit_dropped: [const { AtomicU64::new(0) }; AuditDropReason::COUNT],
        }
    }

    // ---- recording -------------------------------------------------------------------------

    /// `portcullis_decisions_total{protocol,decision}` for every Decision, and
    /// `portcullis_blocks_total{protocol,reason}` for `deny` and `ask`.
    #[inline]
    pub fn record_decision(&self, d: &Decision) {
        let p = proto_idx(d.protocol);
        self.decisions[p][verdict_idx(d.decision)].fetch_add(1, Relaxed);
        if d.decision != Verdict::Allow {
            self.blocks[p][reason_idx(&d.reason)].fetch_add(1, Relaxed);
        }
    }

    /// `portcullis_requests_total{protocol}`: HTTP requests, CONNECTs, inner MITM requests,
    /// SOCKS5 commands, UDP datagrams received.
    #[inline]
    pub fn request(&self, p: Protocol) {
        self.requests[proto_idx(p)].fetch_add(1, Relaxed);
    }

    /// `portcullis_bad_requests_total{kind}`. Accepts a [`BadRequestKind`] or its label
    /// (unknown labels count as `other`).
    #[inline]
    pub fn bad_request(&self, kind: impl Into<BadRequestKind>) {
        self.bad_requests[kind.into().idx()].fetch_add(1, Relaxed);
    }

    /// Increments `portcullis_active_connections{listener}`; the guard decrements it.
    pub fn connection_opened(self: &Arc<Self>, l: impl Into<Listener>) -> ActiveGuard {
        let l = l.into();
        self.active_connections[l.idx()].fetch_add(1, Relaxed);
        ActiveGuard {
            metrics: self.clone(),
            slot: ActiveSlot::Connection(l),
        }
    }

    /// `portcullis_connections_rejected_total{listener}` (`limits.max_connections`).
    #[inline]
    pub fn connection_rejected(&self, l: impl Into<Listener>) {
        self.connections_rejected[l.into().idx()].fetch_add(1, Relaxed);
    }

    /// Increments `portcullis_active_tunnels{protocol}`; the guard decrements it.
    pub fn tunnel_opened(self: &Arc<Self>, p: Protocol) -> ActiveGuard {
        self.active_tunnels[proto_idx(p)].fetch_add(1, Relaxed);
        ActiveGuard {
            metrics: self.clone(),
            slot: ActiveSlot::Tunnel(p),
        }
    }

    /// `portcullis_bytes_total{protocol,direction}`; `upstream` = client → destination.
    #[inline]
    pub fn bytes(&self, p: Protocol, upstream: bool, n: u64) {
        let dir = if upstream {
            Direction::Upstream
        } else {
            Direction::Downstream
        };
        self.bytes[proto_idx(p)][dir.idx()].fetch_add(n, Relaxed);
    }

    /// `portcullis_upstream_errors_total{kind}`. Accepts an [`UpstreamErrorKind`] or its label.
    #[inline]
    pub fn upstream_error(&self, kind: impl Into<UpstreamErrorKind>) {
        self.upstream_errors[kind.into().idx()].fetch_add(1, Relaxed);
    }

    /// `portcullis_decision_duration_seconds`: pipeline time excluding DNS and ask waits.
    #[inline]
    pub fn decision_time(&self, d: Duration) {
        self.decision_duration.observe(d);
    }

    /// `portcullis_dns_duration_seconds`.
    #[inline]
    pub fn dns_time(&self, d: Duration) {
        self.dns_duration.observe(d);
    }

    /// `portcullis_ask_wait_seconds`: how long a held request waited for its ask.
    #[inline]
    pub fn ask_wait(&self, d: Duration) {
        self.ask_wait.observe(d);
    }

    /// Sets `portcullis_pending_approvals`.
    #[inline]
    pub fn set_pending_approvals(&self, n: i64) {
        self.pending_approvals.store(n, Relaxed);
    }

    /// Adds to `portcullis_pending_approvals` (negative to subtract).
    #[inline]
    pub fn add_pending_approvals(&self, delta: i64) {
        self.pending_approvals.fetch_add(delta, Relaxed);
    }

    /// `portcullis_blocked_log_total` += `appended`, `portcullis_blocked_log_dropped_total` +=
    /// `dropped`. Called by the [`super::Reporter`], which owns the blocked log.
    #[inline]
    pub fn record_blocked_log(&self, appended: u64, dropped: u64) {
        if appended > 0 {
            self.blocked_log_total.fetch_add(appended, Relaxed);
        }
        if dropped > 0 {
            self.blocked_log_dropped.fetch_add(dropped, Relaxed);
        }
    }

    /// `portcullis_events_dropped_total{sink}`.
    #[inline]
    pub fn event_dropped(&self, sink: Sink) {
        self.events_dropped[sink.idx()].fetch_add(1, Relaxed);
    }

    /// `portcullis_udp_datagrams_total{direction}`.
    #[inline]
    pub fn udp_datagram(&self, dir: Direction) {
        self.udp_datagrams[dir.idx()].fetch_add(1, Relaxed);
    }

    /// `portcullis_udp_datagrams_dropped_total{reason}`.
    #[inline]
    pub fn udp_dropped(&self, reason: UdpDropReason) {
        self.udp_dropped[reason.idx()].fetch_add(1, Relaxed);
    }

    /// `portcullis_mitm_errors_total{kind}`. Accepts a [`MitmErrorKind`] or its label.
    #[inline]
    pub fn mitm_error(&self, kind: impl Into<MitmErrorKind>) {
        self.mitm_errors[kind.into().idx()].fetch_add(1, Relaxed);
    }

    /// Sets `portcullis_control_connected` (1 attached, 0 not).
    #[inline]
    pub fn set_control_connected(&self, connected: bool) {
        self.control_connected.store(i64::from(connected), Relaxed);
    }

    /// Sets `portcullis_policy_version`.
    #[inline]
    pub fn set_policy_version(&self, version: u64) {
        self.policy_version.store(version, Relaxed);
    }

    /// Sets `portcullis_policy_entries{list}`.
    #[inline]
    pub fn set_policy_entries(&self, list: PolicyList, n: u64) {
        self.policy_entries[list.idx()].store(n, Relaxed);
    }

    /// `portcullis_audit_events_total`: one audit record emitted.
    #[inline]
    pub fn audit_event(&self) {
        self.audit_total.fetch_add(1, Relaxed);
    }

    /// `portcullis_audit_events_exported_total` += `n`.
    #[inline]
    pub fn audit_exported(&self, n: u64) {
        self.audit_exported.fetch_add(n, Relaxed);
    }

    /// `portcullis_audit_events_dropped_total{reason}` += `n`.
    #[inline]
    pub fn audit_dropped(&self, reason: AuditDropReason, n: u64) {
        self.audit_dropped[reason.idx()].fetch_add(n, Relaxed);
    }

    // ---- reading ---------------------------------------------------------------------------

    /// Current `portcullis_decisions_total{protocol,decision}`.
    pub fn decisions_count(&self, p: Protocol, v: Verdict) -> u64 {
        self.decisions[proto_idx(p)][verdict_idx(v)].load(Relaxed)
    }

    /// Current `portcullis_blocks_total{protocol,reason}` (unknown reasons read the `other`
    /// series).
    pub fn blocks_count(&self, p: Protocol, r: &Reason) -> u64 {
        self.blocks[proto_idx(p)][reason_idx(r)].load(Relaxed)
    }

    /// Current `portcullis_events_dropped_total{sink}`.
    pub fn events_dropped_count(&self, sink: Sink) -> u64 {
        self.events_dropped[sink.idx()].load(Relaxed)
    }

    /// Current `(portcullis_blocked_log_total, portcullis_blocked_log_dropped_total)`.
    pub fn blocked_log_counts(&self) -> (u64, u64) {
        (
            self.blocked_log_total.load(Relaxed),
            self.blocked_log_dropped.load(Relaxed),
        )
    }

    /// The audit counters (for `GetStatus` and the drop WARN line).
    pub fn audit_counts(&self) -> AuditCounts {
        AuditCounts {
            total: self.audit_total.load(Relaxed),
            exported: self.audit_exported.load(Relaxed),
            dropped_queue_full: self.audit_dropped[AuditDropReason::QueueFull.idx()].load(Relaxed),
            dropped_export_failed: self.audit_dropped[AuditDropReason::ExportFailed.idx()]
                .load(Relaxed),
            dropped_shutdown: self.audit_dropped[AuditDropReason::Shutdown.idx()].load(Relaxed),
        }
    }

    /// `portcullis_decision_duration_seconds` now.
    pub fn decision_duration(&self) -> HistogramSnapshot {
        self.decision_duration.snapshot()
    }

    /// `portcullis_dns_duration_seconds` now.
    pub fn dns_duration(&self) -> HistogramSnapshot {
        self.dns_duration.snapshot()
    }

    /// `portcullis_ask_wait_seconds` now.
    pub fn ask_wait_duration(&self) -> HistogramSnapshot {
        self.ask_wait.snapshot()
    }

    // ---- rendering -------------------------------------------------------------------------

    /// Prometheus text exposition format 0.0.4: `# HELP` and `# TYPE` for every family, every
    /// known label combination present (zero until recorded).
    pub fn render_prometheus(&self) -> String {
        let mut w = Writer(String::with_capacity(24 * 1024));

        w.family(
            "portcullis_requests_total",
            "counter",
            "Requests received (HTTP, CONNECT, inner MITM, SOCKS5 commands, UDP datagrams).",
        );
        for (i, p) in PROTOCOLS.iter().enumerate() {
            w.sample1(
                "portcullis_requests_total",
                "protocol",
                p.as_str(),
                load(&self.requests[i]),
            );
        }

        w.family(
            "portcullis_decisions_total",
            "counter",
            "Policy Decisions by protocol and decision.",
        );
        for (i, p) in PROTOCOLS.iter().enumerate() {
            for (j, v) in VERDICTS.iter().enumerate() {
                w.sample2(
                    "portcullis_decisions_total",
                    ("protocol", p.as_str()),
                    ("decision", v.as_str()),
                    load(&self.decisions[i][j]),
                );
            }
        }

        w.family(
            "portcullis_blocks_total",
            "counter",
            "Deny and ask Decisions by protocol and reason.",
        );
        for (i, p) in PROTOCOLS.iter().enumerate() {
            for (j, r) in BLOCK_REASONS.iter().enumerate() {
                w.sample2(
                    "portcullis_blocks_total",
                    ("protocol", p.as_str()),
                    ("reason", r),
                    load(&self.blocks[i][j]),
                );
            }
        }

        w.family(
            "portcullis_bad_requests_total",
            "counter",
            "Malformed or invalid input that produced no Decision.",
        );
        for k in BadRequestKind::ALL {
            w.sample1(
                "portcullis_bad_requests_total",
                "kind",
                k.as_str(),
                load(&self.bad_requests[k.idx()]),
            );
        }

        w.family(
            "portcullis_active_connections",
            "gauge",
            "Open client connections by listener.",
        );
        for l in Listener::ALL {
            w.sample1i(
                "portcullis_active_connections",
                "listener",
                l.as_str(),
                self.active_connections[l.idx()].load(Relaxed),
            );
        }

        w.family(
            "portcullis_connections_rejected_total",
            "counter",
            "Client connections refused at the connection limit.",
        );
        for l in Listener::ALL {
            w.sample1(
                "portcullis_connections_rejected_total",
                "listener",
                l.as_str(),
                load(&self.connections_rejected[l.idx()]),
            );
        }

        w.family(
            "portcullis_active_tunnels",
            "gauge",
            "Open tunnels (CONNECT, SOCKS5, upgrades, UDP associations) by protocol.",
        );
        for (i, p) in PROTOCOLS.iter().enumerate() {
            w.sample1i(
                "portcullis_active_tunnels",
                "protocol",
                p.as_str(),
                self.active_tunnels[i].load(Relaxed),
            );
        }

        w.family(
            "portcullis_bytes_total",
            "counter",
            "Bytes relayed by protocol and direction (upstream = client to destination).",
        );
        for (i, p) in PROTOCOLS.iter().enumerate() {
            for d in Direction::ALL {
                w.sample2(
                    "portcullis_bytes_total",
                    ("protocol", p.as_str()),
                    ("direction", d.as_str()),
                    load(&self.bytes[i][d.idx()]),
                );
            }
        }

        w.family(
            "portcullis_upstream_errors_total",
            "counter",
            "Upstream failures answered 502 or 504, by kind.",
        );
        for k in UpstreamErrorKind::ALL {
            w.sample1(
                "portcullis_upstream_errors_total",
                "kind",
                k.as_str(),
                load(&self.upstream_errors[k.idx()]),
            );
        }

        w.histogram(
            "portcullis_decision_duration_seconds",
            "Policy pipeline time excluding DNS and ask waits.",
            &self.decision_duration,
        );
        w.histogram(
            "portcullis_dns_duration_seconds",
            "DNS lookup time.",
            &self.dns_duration,
        );
        w.histogram(
            "portcullis_ask_wait_seconds",
            "Time requests were held waiting for an ask to be answered.",
            &self.ask_wait,
        );

        w.family(
            "portcullis_pending_approvals",
            "gauge",
            "Requests held waiting for an approval.",
        );
        w.sample0i(
            "portcullis_pending_approvals",
            self.pending_approvals.load(Relaxed),
        );

        w.family(
            "portcullis_blocked_log_total",
            "counter",
            "Entries ever appended to the blocked log.",
        );
        w.sample0(
            "portcullis_blocked_log_total",
            load(&self.blocked_log_total),
        );

        w.family(
            "portcullis_blocked_log_dropped_total",
            "counter",
            "Entries evicted from the blocked log.",
        );
        w.sample0(
            "portcullis_blocked_log_dropped_total",
            load(&self.blocked_log_dropped),
        );

        w.family(
            "portcullis_events_dropped_total",
            "counter",
            "Decision reports dropped by a full sink queue.",
        );
        for s in Sink::ALL {
            w.sample1(
                "portcullis_events_dropped_total",
                "sink",
                s.as_str(),
                load(&self.events_dropped[s.idx()]),
            );
        }

        w.family(
            "portcullis_udp_datagrams_total",
            "counter",
            "SOCKS5 UDP datagrams relayed by direction.",
        );
        for d in Direction::ALL {
            w.sample1(
                "portcullis_udp_datagrams_total",
                "direction",
                d.as_str(),
                load(&self.udp_datagrams[d.idx()]),
            );
        }

        w.family(
            "portcullis_udp_datagrams_dropped_total",
            "counter",
            "SOCKS5 UDP datagrams dropped by reason.",
        );
        for r in UdpDropReason::ALL {
            w.sample1(
                "portcullis_udp_datagrams_dropped_total",
                "reason",
                r.as_str(),
                load(&self.udp_dropped[r.idx()]),
            );
        }

        w.family(
            "portcullis_mitm_errors_total",
            "counter",
            "HTTPS interception failures by kind.",
        );
        for k in MitmErrorKind::ALL {
            w.sample1(
                "portcullis_mitm_errors_total",
                "kind",
                k.as_str(),
                load(&self.mitm_errors[k.idx()]),
            );
        }

        w.family(
            "portcullis_control_connected",
            "gauge",
            "1 while attached to the control plane, else 0.",
        );
        w.sample0i(
            "portcullis_control_connected",
            self.control_connected.load(Relaxed),
        );

        w.family(
            "portcullis_policy_version",
            "gauge",
            "Version of the policy in force (0 when standalone).",
        );
        w.sample0("portcullis_policy_version", load(&self.policy_version));

        w.family(
            "portcullis_policy_entries",
            "gauge",
            "Entries in each policy list in force.",
        );
        for l in PolicyList::ALL {
            w.sample1(
                "portcullis_policy_entries",
                "list",
                l.as_str(),
                load(&self.policy_entries[l.idx()]),
            );
        }

        w.family(
            "portcullis_build_info",
            "gauge",
            "Build information; always 1.",
        );
        w.sample1("portcullis_build_info", "version", self.version, 1);

        w.family(
            "portcullis_audit_events_total",
            "counter",
            "Audit records emitted.",
        );
        w.sample0("portcullis_audit_events_total", load(&self.audit_total));

        w.family(
            "portcullis_audit_events_exported_total",
            "counter",
            "Audit records exported to the collector.",
        );
        w.sample0(
            "portcullis_audit_events_exported_total",
            load(&self.audit_exported),
        );

        w.family(
            "portcullis_audit_events_dropped_total",
            "counter",
            "Audit records dropped by reason.",
        );
        for r in AuditDropReason::ALL {
            w.sample1(
                "portcullis_audit_events_dropped_total",
                "reason",
                r.as_str(),
                load(&self.audit_dropped[r.idx()]),
            );
        }

        w.0
    }
}

#[inline]
fn load(a: &AtomicU64) -> u64 {
    a.load(Relaxed)
}

/// Text-format writer. Label values here are all static identifiers, so no escaping is needed.
struct Writer(String);

impl Writer {
    fn family(&mut self, name: &str, ty: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {ty}");
    }

    fn sample0(&mut self, name: &str, v: u64) {
        let _ = writeln!(self.0, "{name} {v}");
    }

    fn sample0i(&mut self, name: &str, v: i64) {
        let _ = writeln!(self.0, "{name} {v}");
    }

    fn sample1(&mut self, name: &str, k: &str, lv: &str, v: u64) {
        let _ = writeln!(self.0, "{name}{{{k}=\"{lv}\"}} {v}");
    }

    fn sample1i(&mut self, name: &str, k: &str, lv: &str, v: i64) {
        let _ = writeln!(self.0, "{name}{{{k}=\"{lv}\"}} {v}");
    }

    fn sample2(&mut self, name: &str, a: (&str, &str), b: (&str, &str), v: u64) {
        let _ = writeln!(
            self.0,
            "{name}{{{}=\"{}\",{}=\"{}\"}} {v}",
            a.0, a.1, b.0, b.1
        );
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.family(name, "histogram", help);
        let s = h.snapshot();
        for (le, c) in &s.buckets {
            let _ = writeln!(self.0, "{name}_bucket{{le=\"{le}\"}} {c}");
        }
        let _ = writeln!(self.0, "{name}_bucket{{le=\"+Inf\"}} {}", s.count);
        let _ = writeln!(self.0, "{name}_sum {}", s.sum_ns as f64 / 1e9);
        let _ = writeln!(self.0, "{name}_count {}", s.count);
    }
}
