//! The decision order of `policy.md` §4 over one compiled policy version.
//!
//! Split in two pure stages around the one DNS lookup the data plane performs: the name stage
//! (steps 0–4, no DNS for blocked names) and the address stage (step 5.3). No I/O here.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::SystemTime;

use crate::config::{Config, Mode, PatternList, SettingsError};
use crate::decision::{
    Decision, MessageKind, MessageTarget, Origin, Protocol, Reason, ResolveFailure, Source,
    Verdict, new_decision_id, render_message,
};

use super::address::{AddressClass, classify};
use super::index::PatternIndex;
use super::normalize::{Host, canonical_ip};
use super::pattern::{ListKind, Pattern, PatternError, parse_pattern};

/// How a `not_allowed` is answered (standalone, or what the control plane's snapshot says).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AskMode {
    /// No control plane: deny `not_allowed` (the message invites asking the operator).
    #[default]
    Standalone,
    /// Attached, asks disabled: deny `not_allowed`, approvals impossible.
    Disabled,
    /// Attached, asks enabled: ask (the data plane holds the request) or, with the stream
    /// down, deny `control_unavailable`.
    Enabled,
}

/// Everything policy needs besides the entry lists.
#[derive(Debug, Clone, Default)]
pub struct PolicySpec {
    /// `network.enabled`.
    pub enabled: bool,
    /// `network.mode`.
    pub limited: bool,
    /// `network.mitm`: limited-mode HTTPS can be intercepted.
    pub mitm: bool,
    /// `network.allow_local_binding`.
    pub allow_local_binding: bool,
    /// Allowlist entries (already valid patterns).
    pub allowed: Vec<String>,
    /// Denylist entries.
    pub denied: Vec<String>,
    /// Session allows `(host, protocol, port)` from the control plane.
    pub session_allows: Vec<(String, Protocol, u16)>,
    /// How misses are answered.
    pub asks: AskMode,
}

/// One compiled, immutable policy version. Cheap to share behind an `Arc`.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    enabled: bool,
    limited: bool,
    mitm: bool,
    allow_local_binding: bool,
    allow: PatternIndex,
    deny: PatternIndex,
    session_allows: HashSet<(Box<str>, Protocol, u16)>,
    asks: AskMode,
}

/// The request as policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct RequestContext<'a> {
    /// How the client reached the proxy.
    pub protocol: Protocol,
    /// Normalised destination.
    pub host: &'a Host,
    /// Destination port.
    pub port: u16,
    /// HTTP method (`CONNECT` for CONNECT), none for SOCKS5.
    pub method: Option<&'a str>,
    /// The request carries `Upgrade`.
    pub upgrade: bool,
    /// Addresses this proxy listens on (always refused as destinations).
    pub own_addrs: &'a [SocketAddr],
}

/// A refusal: everything of the Decision that policy decides.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// deny or ask.
    pub verdict: Verdict,
    /// Why.
    pub reason: Reason,
    /// Who decided.
    pub source: Source,
    /// Which message.
    pub kind: MessageKind,
    /// The deciding entry.
    pub rule: Option<String>,
    /// The address that caused it.
    pub address: Option<IpAddr>,
}

/// Where the addresses to check come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressPlan {
    /// Already known (IP literal, loopback name): no lookup.
    Addresses(Vec<IpAddr>),
    /// Resolve this name once.
    Resolve(String),
}

/// The name stage passed; the address stage decides.
#[derive(Debug, Clone, PartialEq)]
pub struct Proceed {
    /// Addresses to check.
    pub plan: AddressPlan,
    /// A local literal opened by an exact allow entry (step 2).
    pub opened_local: bool,
    /// Allowed by a session allow (override).
    pub override_: bool,
    /// The allow entry that matched.
    pub rule: Option<String>,
}

/// Outcome of the name stage.
#[derive(Debug, Clone, PartialEq)]
pub enum NameStage {
    /// Final refusal; no DNS.
    Refuse(Refusal),
    /// Continue with the address stage.
    Proceed(Proceed),
}

const LOOPBACK_SET: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::LOCALHOST),
    IpAddr::V6(Ipv6Addr::LOCALHOST),
];

fn refusal(reason: Reason, source: Source, kind: MessageKind) -> Refusal {
    Refusal {
        verdict: Verdict::Deny,
        reason,
        source,
        kind,
        rule: None,
        address: None,
    }
}

impl CompiledPolicy {
    /// Compiles a spec; the first bad entry is reported with its list and index.
    pub fn compile(spec: &PolicySpec) -> Result<CompiledPolicy, (ListKind, usize, PatternError)> {
        let parse = |list: ListKind, items: &[String]| {
            items
                .iter()
                .enumerate()
                .map(|(i, s)| parse_pattern(s, list).map_err(|e| (list, i, e)))
                .collect::<Result<Vec<Pattern>, _>>()
        };
        Ok(CompiledPolicy {
            enabled: spec.enabled,
            limited: spec.limited,
            mitm: spec.mitm,
            allow_local_binding: spec.allow_local_binding,
            allow: PatternIndex::build(parse(ListKind::Allow, &spec.allowed)?),
            deny: PatternIndex::build(parse(ListKind::Deny, &spec.denied)?),
            session_allows: spec
                .session_allows
                .iter()
                .map(|(h, p, port)| (Box::<str>::from(h.as_str()), *p, *port))
                .collect(),
            asks: spec.asks,
        })
    }

    /// Validates and compiles the policy keys of a config; errors name the key.
    pub fn from_config(config: &Config) -> Result<CompiledPolicy, SettingsError> {
        let lists = config.validate_with(&|list, _key, text| match list {
            PatternList::AllowedDomains => parse_pattern(text, ListKind::Allow)
                .map(|p| p.text)
                .map_err(|e| e.to_string()),
            PatternList::DeniedDomains => parse_pattern(text, ListKind::Deny)
                .map(|p| p.text)
                .map_err(|e| e.to_string()),
            PatternList::AllowUnixSockets | PatternList::DenyUnixSockets => Ok(text.to_string()),
        })?;
        for w in &lists.warnings {
            tracing::warn!("{w}");
        }
        let n = &config.network;
        let spec = PolicySpec {
            enabled: n.enabled,
            limited: n.mode == Mode::Limited,
            // The data plane prepares interception exactly when `network.mitm = true`
            // (`http.md` §9): limited-mode HTTPS is then intercepted, never a raw tunnel.
            mitm: n.mitm,
            allow_local_binding: n.allow_local_binding,
            allowed: lists
                .allowed_domains
                .into_iter()
                .map(|e| e.normalized)
                .collect(),
            denied: lists
                .denied_domains
                .into_iter()
                .map(|e| e.normalized)
                .collect(),
            session_allows: Vec::new(),
            asks: AskMode::Standalone,
        };
        // Entries were validated above, so compiling them cannot fail; keep it fallible anyway.
        CompiledPolicy::compile(&spec).map_err(|(_, _, e)| {
            SettingsError::from(crate::config::UsageError::new("--allow", e.to_string()))
        })
    }

    /// Normalised allowlist texts.
    pub fn allowed_patterns(&self) -> Vec<String> {
        self.allow
            .patterns()
            .iter()
            .map(|p| p.text.clone())
            .collect()
    }

    /// Normalised denylist texts.
    pub fn denied_patterns(&self) -> Vec<String> {
        self.deny
            .patterns()
            .iter()
            .map(|p| p.text.clone())
            .collect()
    }

    /// Whether limited mode is on.
    pub fn limited(&self) -> bool {
        self.limited
    }

    /// After an approval allowed what step 4 refused: continue with step 5 as an override
    /// (`control.md` §7.5). Local literals never get here (step 2 is final).
    pub fn approved(&self, ctx: &RequestContext<'_>) -> Proceed {
        let plan = match ctx.host {
            Host::Ip { addr, .. } => AddressPlan::Addresses(vec![*addr]),
            h if h.is_loopback_name() => AddressPlan::Addresses(LOOPBACK_SET.to_vec()),
            Host::Name(n) => AddressPlan::Resolve(n.to_string()),
        };
        Proceed {
            plan,
            opened_local: false,
            override_: true,
            rule: None,
        }
    }

    /// Steps 0–4 (`policy.md` §4): decided on the name alone, before any DNS.
    pub fn check_name(&self, ctx: &RequestContext<'_>) -> NameStage {
        // 0. Proxy state.
        if !self.enabled {
            return NameStage::Refuse(refusal(
                Reason::ProxyDisabled,
                Source::ProxyState,
                MessageKind::ProxyDisabled,
            ));
        }
        // 1. Deny entries: deny wins regardless of anything else.
        if let Some(p) = self.deny.lookup(ctx.host, ctx.port) {
            let mut r = refusal(Reason::Denied, Source::BaselinePolicy, MessageKind::Denied);
            r.rule = Some(p.text.clone());
            r.address = ctx.host.as_ip();
            return NameStage::Refuse(r);
        }
        // 2. Local literals, opened only by an exact allow entry.
        let literal = ctx.host.as_ip();
        let local_literal = ctx.host.is_loopback_name()
            || literal.is_some_and(|ip| classify(ip) != AddressClass::Public);
        let exact = self.allow.lookup_exact(ctx.host, ctx.port);
        let opened_local = local_literal && exact.is_some();
        if local_literal && !self.allow_local_binding && exact.is_none() {
            let mut r = refusal(
                Reason::NotAllowedLocal,
                Source::BaselinePolicy,
                MessageKind::LocalLiteral,
            );
            r.address = literal;
            return NameStage::Refuse(r);
        }
        // 2a. Always refused, whatever the settings or entries.
        if let Some(ip) = literal
            && self.always_refused(ip, ctx)
        {
            let mut r = refusal(
                Reason::NotAllowedLocal,
                Source::BaselinePolicy,
                MessageKind::AlwaysRefused,
            );
            r.address = Some(ip);
            return NameStage::Refuse(r);
        }
        // 3. Mode guards, before the allowlist, any ask and any DNS.
        if let Some(r) = self.mode_guard(ctx) {
            return NameStage::Refuse(r);
        }
        // 4. Allowlist, then session allows, else not allowed.
        let plan = match ctx.host {
            Host::Ip { addr, .. } => AddressPlan::Addresses(vec![*addr]),
            h if h.is_loopback_name() => AddressPlan::Addresses(LOOPBACK_SET.to_vec()),
            Host::Name(n) => AddressPlan::Resolve(n.to_string()),
        };
        if let Some(p) = self.allow.lookup(ctx.host, ctx.port) {
            return NameStage::Proceed(Proceed {
                plan,
                opened_local,
                override_: false,
                rule: Some(p.text.clone()),
            });
        }
        if !self.session_allows.is_empty() {
            let key = (
                Box::<str>::from(ctx.host.to_string()),
                ctx.protocol,
                ctx.port,
            );
            if self.session_allows.contains(&key) {
                return NameStage::Proceed(Proceed {
                    plan,
                    opened_local: false,
                    override_: true,
                    rule: None,
                });
            }
        }
        NameStage::Refuse(self.not_allowed())
    }

    fn not_allowed(&self) -> Refusal {
        match self.asks {
            AskMode::Standalone => refusal(
                Reason::NotAllowed,
                Source::BaselinePolicy,
                MessageKind::NotAllowed,
            ),
            AskMode::Disabled => refusal(
                Reason::NotAllowed,
                Source::BaselinePolicy,
                MessageKind::NotAllowedAsksDisabled,
            ),
            AskMode::Enabled => Refusal {
                verdict: Verdict::Ask,
                ..refusal(
                    Reason::NotAllowed,
                    Source::Decider,
                    MessageKind::NotAllowedWaiting,
                )
            },
        }
    }

    /// Step 3: limited-mode guards (`http.md` §8, `socks5.md` §5).
    fn mode_guard(&self, ctx: &RequestContext<'_>) -> Option<Refusal> {
        if !self.limited {
            return None;
        }
        let method_guard = |kind| refusal(Reason::MethodNotAllowed, Source::ModeGuard, kind);
        if ctx.is_inner_request() {
            // An inner request of an intercepted stream (`http.md` §9 rule 4): the outer
            // CONNECT already passed the interception guard; its method decides here.
            return read_only_guard(ctx);
        }
        match ctx.protocol {
            Protocol::Http | Protocol::UnixSocket => read_only_guard(ctx),
            Protocol::HttpsConnect => (!self.mitm).then(|| {
                refusal(
                    Reason::MitmRequired,
                    Source::ModeGuard,
                    MessageKind::MitmRequired,
                )
            }),
            Protocol::Socks5Tcp => {
                if ctx.port != 443 {
                    Some(method_guard(MessageKind::Socks5TcpNotAllowed))
                } else if !self.mitm {
                    Some(refusal(
                        Reason::MitmRequired,
                        Source::ModeGuard,
                        MessageKind::MitmRequired,
                    ))
                } else {
                    None
                }
            }
            Protocol::Socks5Udp => Some(method_guard(MessageKind::UdpNotAllowed)),
        }
    }

    fn always_refused(&self, ip: IpAddr, ctx: &RequestContext<'_>) -> bool {
        if classify(ip) == AddressClass::AlwaysRefused {
            return true;
        }
        ctx.own_addrs.iter().any(|own| {
            own.port() == ctx.port
                && (own.ip() == ip
                    || (own.ip().is_unspecified() && classify(ip) != AddressClass::Public))
        })
    }

    /// Step 5.2: the name had no address. `None` = allow and let it fail upstream
    /// (`allow_local_binding = true`); else the fail-closed refusal.
    pub fn resolution_failed(
        &self,
        _ctx: &RequestContext<'_>,
        _proceed: &Proceed,
        failure: ResolveFailure,
    ) -> Option<Refusal> {
        (!self.allow_local_binding).then(|| {
            refusal(
                Reason::NotAllowedLocal,
                Source::BaselinePolicy,
                MessageKind::Unresolvable(failure),
            )
        })
    }

    /// Step 5.3: every address is checked; one bad address blocks the request.
    pub fn check_addresses(
        &self,
        ctx: &RequestContext<'_>,
        proceed: &Proceed,
        addrs: &[IpAddr],
    ) -> Result<(), Refusal> {
        for &raw in addrs {
            let ip = canonical_ip(raw);
            if let Some(p) = self.deny.lookup_address(ip, ctx.port) {
                let mut r = refusal(Reason::Denied, Source::BaselinePolicy, MessageKind::Denied);
                r.rule = Some(p.text.clone());
                r.address = Some(ip);
                return Err(r);
            }
            if self.always_refused(ip, ctx) {
                let mut r = refusal(
                    Reason::NotAllowedLocal,
                    Source::BaselinePolicy,
                    MessageKind::AlwaysRefused,
                );
                r.address = Some(ip);
                return Err(r);
            }
            if !self.allow_local_binding
                && !proceed.opened_local
                && classify(ip) != AddressClass::Public
            {
                let mut r = refusal(
                    Reason::NotAllowedLocal,
                    Source::BaselinePolicy,
                    if ctx.host.as_ip().is_some() {
                        MessageKind::LocalLiteral
                    } else {
                        MessageKind::LocalResolved
                    },
                );
                r.address = Some(ip);
                return Err(r);
            }
        }
        Ok(())
    }
}

/// Limited mode for plain and inner HTTP requests: only `GET`, `HEAD`, `OPTIONS` (exact), and
/// no `Upgrade` (`http.md` §8 rule 1).
fn read_only_guard(ctx: &RequestContext<'_>) -> Option<Refusal> {
    let guard = |kind| refusal(Reason::MethodNotAllowed, Source::ModeGuard, kind);
    if !matches!(ctx.method, Some("GET" | "HEAD" | "OPTIONS")) {
        Some(guard(MessageKind::MethodNotAllowed))
    } else if ctx.upgrade {
        Some(guard(MessageKind::UpgradeNotAllowed))
    } else {
        None
    }
}

impl RequestContext<'_> {
    /// Whether this is an HTTP request inside an intercepted stream: protocol `https_connect`
    /// with a method other than `CONNECT`, or `socks5_tcp` with a method.
    pub fn is_inner_request(&self) -> bool {
        match self.protocol {
            Protocol::HttpsConnect => self.method.is_some_and(|m| m != "CONNECT"),
            Protocol::Socks5Tcp => self.method.is_some(),
            _ => false,
        }
    }
}

/// The parts of a Decision the engine decides; the request context supplies the rest.
struct Parts {
    verdict: Verdict,
    reason: Reason,
    source: Source,
    override_: bool,
    rule: Option<String>,
    address: Option<IpAddr>,
    kind: Option<MessageKind>,
}

fn build(ctx: &RequestContext<'_>, client: SocketAddr, origin: &Origin, parts: Parts) -> Decision {
    let host = ctx.host.to_string();
    let message = parts.kind.map(|k| {
        render_message(
            k,
            &MessageTarget {
                host: &host,
                port: ctx.port,
                method: ctx.method,
                address: parts.address,
                socket_path: None,
            },
        )
    });
    Decision {
        decision: parts.verdict,
        reason: parts.reason,
        source: parts.source,
        protocol: ctx.protocol,
        host,
        port: ctx.port,
        id: new_decision_id(),
        timestamp: SystemTime::now(),
        method: ctx.method.map(str::to_string),
        client_address: Some(client.ip()),
        client_port: Some(client.port()),
        override_: parts.override_,
        ask_id: None,
        rule: parts.rule,
        address: parts.address,
        socket_path: None,
        message,
        origin: origin.clone(),
    }
}

impl Refusal {
    /// The Decision of this refusal.
    pub fn into_decision(
        self,
        ctx: &RequestContext<'_>,
        client: SocketAddr,
        origin: &Origin,
    ) -> Decision {
        let parts = Parts {
            verdict: self.verdict,
            reason: self.reason,
            source: self.source,
            override_: false,
            rule: self.rule,
            address: self.address,
            kind: Some(self.kind),
        };
        build(ctx, client, origin, parts)
    }
}

impl Proceed {
    /// The allow Decision (plain, or an override by a session allow / approval).
    pub fn allow_decision(
        &self,
        ctx: &RequestContext<'_>,
        client: SocketAddr,
        origin: &Origin,
    ) -> Decision {
        let (reason, source) = if self.override_ {
            (Reason::NotAllowed, Source::Decider)
        } else {
            (Reason::Allow, Source::BaselinePolicy)
        };
        let parts = Parts {
            verdict: Verdict::Allow,
            reason,
            source,
            override_: self.override_,
            rule: self.rule.clone(),
            address: None,
            kind: None,
        };
        build(ctx, client, origin, parts)
    }
}
