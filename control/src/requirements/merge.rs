//! Merging requirements with the local layers (`requirements.md` §6). [`apply`] takes a
//! snapshot built from config and rules, plus its provenance entries, and narrows it: requirement
//! denies are added, allows are restricted under `managed_allowed_domains_only`, local literals
//! are closed, and the booleans, mode and sockets can only go down.

use portcullis::policy::{Host, HostPattern, ListKind, PatternIndex, parse_pattern};
use portcullis::proto::v1;

use super::document::Requirements;

/// `ignored_reason` of a local literal closed by `allow_local_binding = false`.
pub const LOCAL_CLOSED: &str = "local addresses are closed by enterprise requirements";
/// `ignored_reason` of a local allow outside the managed allowlist.
pub const NOT_COVERED: &str =
    "managed_allowed_domains_only is set and no managed allow pattern covers it";

/// Narrows `snap` and `entries` (built from config, rules) by `req`. Returns the WARN lines
/// for local settings that were lowered.
pub fn apply(
    req: &Requirements,
    snap: &mut v1::PolicySnapshot,
    entries: &mut Vec<v1::PolicyEntry>,
) -> Vec<String> {
    let mut warnings = Vec::new();
    let mut narrow = |key: &str, local: &mut bool, required: Option<bool>| {
        if let Some(r) = required
            && *local
            && !r
        {
            warnings.push(format!(
                "network.{key} = true in config is overridden by enterprise requirements (false)"
            ));
            *local = false;
        }
    };
    narrow(
        "allow_local_binding",
        &mut snap.allow_local_binding,
        req.allow_local_binding,
    );
    narrow(
        "allow_upstream_proxy",
        &mut snap.allow_upstream_proxy,
        req.allow_upstream_proxy,
    );
    let all_sockets_permitted = match req.dangerously_allow_all_unix_sockets {
        Some(v) => v,
        None => req.socket_allow.is_none(),
    };
    narrow(
        "dangerously_allow_all_unix_sockets",
        &mut snap.dangerously_allow_all_unix_sockets,
        Some(all_sockets_permitted),
    );
    if req.limited == Some(true) && snap.mode == "full" {
        warnings.push(
            "network.mode = full in config is overridden by enterprise requirements (limited)"
                .into(),
        );
        snap.mode = "limited".into();
    }
    if let Some(allow) = &req.socket_allow {
        snap.allow_unix_sockets = allow.clone();
    }
    for d in &req.socket_deny {
        if !snap.denied_unix_sockets.contains(d) {
            snap.denied_unix_sockets.push(d.clone());
        }
    }
    let managed = Managed::new(req);
    let closed = req.allow_local_binding == Some(false);
    // Judge the local allows.
    for e in entries.iter_mut() {
        if e.decision != "allow" || e.source == v1::PolicySource::Requirements as i32 {
            continue;
        }
        let text = entry_text(e);
        if closed && is_local_literal(&text) {
            e.ignored = true;
            e.ignored_reason = LOCAL_CLOSED.into();
        } else if req.managed_allowed_domains_only && !managed.covers(&text) {
            e.ignored = true;
            e.ignored_reason = NOT_COVERED.into();
        }
    }
    // Rebuild the lists from the judged entries, requirement entries first.
    let mut new_entries: Vec<v1::PolicyEntry> = Vec::new();
    for p in &req.allowed {
        new_entries.push(requirement_entry("allow", p));
    }
    for p in &req.denied {
        new_entries.push(requirement_entry("deny", p));
    }
    new_entries.append(entries);
    *entries = new_entries;
    let mut allowed: Vec<String> = Vec::new();
    let mut denied: Vec<String> = Vec::new();
    for e in entries.iter().filter(|e| !e.ignored && e.port == 0) {
        let list = if e.decision == "allow" {
            &mut allowed
        } else {
            &mut denied
        };
        if !list.contains(&e.pattern) {
            list.push(e.pattern.clone());
        }
    }
    snap.allowed_domains = allowed;
    snap.denied_domains = denied;
    snap.port_rules.retain(|r| {
        r.decision != "allow"
            || !entries.iter().any(|e| {
                e.ignored && e.decision == "allow" && e.port == r.port && e.pattern == r.host
            })
    });
    if req.managed_allowed_domains_only {
        snap.asks_enabled = false;
    }
    warnings
}

fn requirement_entry(decision: &str, pattern: &str) -> v1::PolicyEntry {
    v1::PolicyEntry {
        decision: decision.into(),
        pattern: pattern.into(),
        port: 0,
        source: v1::PolicySource::Requirements as i32,
        rule_line: 0,
        ignored: false,
        ignored_reason: String::new(),
    }
}

/// The entry as one pattern text (`host:port` for port-scoped rules).
fn entry_text(e: &v1::PolicyEntry) -> String {
    if e.port == 0 {
        e.pattern.clone()
    } else if e.pattern.contains(':') && !e.pattern.starts_with('[') {
        format!("[{}]:{}", e.pattern, e.port)
    } else {
        format!("{}:{}", e.pattern, e.port)
    }
}

/// An exact allow of `localhost`, `*.localhost`, or a loopback / non-public IP (`policy.md`).
pub fn is_local_literal(text: &str) -> bool {
    match parse_pattern(text, ListKind::Allow).map(|p| p.host) {
        Ok(HostPattern::Exact(name)) => &*name == "localhost" || name.ends_with(".localhost"),
        Ok(HostPattern::Ip { addr, .. }) => portcullis::policy::address::is_non_public(addr),
        _ => false,
    }
}

/// The managed allow and deny lists, parsed once.
#[derive(Debug)]
pub struct Managed {
    allow: Vec<portcullis::policy::Pattern>,
    deny: Vec<portcullis::policy::Pattern>,
}

impl Managed {
    /// Parses the requirement lists (already validated).
    pub fn new(req: &Requirements) -> Managed {
        let parse = |list: &[String], kind| {
            list.iter()
                .filter_map(|p| parse_pattern(p, kind).ok())
                .collect()
        };
        Managed {
            allow: parse(&req.allowed, ListKind::Allow),
            deny: parse(&req.denied, ListKind::Deny),
        }
    }

    /// Whether some managed allow pattern covers `text` (§6 rule 3).
    pub fn covers(&self, text: &str) -> bool {
        let Ok(q) = parse_pattern(text, ListKind::Allow) else {
            return false;
        };
        self.allow.iter().any(|p| covered_by(&q, p))
    }

    /// The managed deny pattern matching `host` on `port` (0 = any port: a pattern without
    /// port, or a port pattern, matching the host).
    pub fn denying(&self, host: &Host, port: u16) -> Option<&str> {
        self.deny.iter().find_map(|p| {
            let probe = if port == 0 { p.port.unwrap_or(1) } else { port };
            matches(p, host, probe).then_some(p.text.as_str())
        })
    }
}

/// Whether pattern `p` matches `host` on `port`.
fn matches(p: &portcullis::policy::Pattern, host: &Host, port: u16) -> bool {
    PatternIndex::build([p.clone()])
        .lookup(host, port)
        .is_some()
}

/// §6 rule 3: `q` is covered by `p`.
pub fn covered_by(q: &portcullis::policy::Pattern, p: &portcullis::policy::Pattern) -> bool {
    if q.text == p.text {
        return true;
    }
    // A pattern with a port is covered only by a pattern for every port or the same port.
    if p.port.is_some() && p.port != q.port {
        return false;
    }
    match (&q.host, &p.host) {
        (HostPattern::Exact(name), _) => matches(p, &Host::Name(name.clone()), q.port.unwrap_or(1)),
        (HostPattern::Ip { addr, zone }, _) => matches(
            p,
            &Host::Ip {
                addr: *addr,
                zone: zone.clone(),
            },
            q.port.unwrap_or(1),
        ),
        (HostPattern::Suffix { base: s, apex: qa }, HostPattern::Suffix { base: t, apex: pa }) => {
            if s == t {
                // `**.s` includes the apex `s`, which `*.s` does not match.
                *pa || !*qa
            } else {
                s.ends_with(&format!(".{t}"))
            }
        }
        _ => false,
    }
}

/// Whether a Hello listener address is acceptable when the requirements forbid non-loopback
/// proxies (empty = listener disabled).
pub fn loopback_listener(addr: &str) -> bool {
    addr.is_empty()
        || addr
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(s: &str) -> portcullis::policy::Pattern {
        parse_pattern(s, ListKind::Allow).unwrap()
    }

    fn req(body: &str) -> Requirements {
        super::super::document::parse("", body).unwrap().0
    }

    fn local(
        source: v1::PolicySource,
        decision: &str,
        pattern: &str,
        port: u32,
    ) -> v1::PolicyEntry {
        v1::PolicyEntry {
            decision: decision.into(),
            pattern: pattern.into(),
            port,
            source: source as i32,
            rule_line: if source == v1::PolicySource::Rules {
                1
            } else {
                0
            },
            ignored: false,
            ignored_reason: String::new(),
        }
    }

    /// A snapshot of config allows/denies (port 0) and rules (port rules), as state.rs builds it.
    fn base(entries: &[v1::PolicyEntry]) -> v1::PolicySnapshot {
        let mut s = v1::PolicySnapshot {
            mode: "full".into(),
            allow_local_binding: true,
            allow_upstream_proxy: true,
            asks_enabled: true,
            ..Default::default()
        };
        for e in entries {
            if e.port != 0 {
                s.port_rules.push(v1::PortRule {
                    host: e.pattern.clone(),
                    port: e.port,
                    decision: e.decision.clone(),
                });
            } else if e.decision == "allow" {
                s.allowed_domains.push(e.pattern.clone());
            } else {
                s.denied_domains.push(e.pattern.clone());
            }
        }
        s
    }

    fn run(
        r: &Requirements,
        local: Vec<v1::PolicyEntry>,
    ) -> (v1::PolicySnapshot, Vec<v1::PolicyEntry>, Vec<String>) {
        let mut snap = base(&local);
        let mut entries = local;
        let w = apply(r, &mut snap, &mut entries);
        (snap, entries, w)
    }

    use v1::PolicySource::{Config, Rules};

    #[test]
    fn denied_domains_are_the_union_and_requirement_denies_lead() {
        let r = req("[network]\ndenied_domains = [\"pastebin.com\"]\n");
        let (s, e, _) = run(
            &r,
            vec![
                local(Config, "deny", "evil.example", 0),
                local(Config, "allow", "pastebin.com", 0),
            ],
        );
        assert_eq!(s.denied_domains, ["pastebin.com", "evil.example"]);
        assert_eq!(e[0].source, v1::PolicySource::Requirements as i32);
        // The local allow stays listed, but the deny wins at evaluation (deny before allow).
        assert!(s.allowed_domains.contains(&"pastebin.com".to_string()));
        assert!(s.asks_enabled);
    }

    #[test]
    fn allowed_domains_without_managed_only_are_the_union() {
        let r = req("[network]\nallowed_domains = [\"**.corp.example\"]\n");
        let (s, _, _) = run(&r, vec![local(Config, "allow", "github.com", 0)]);
        assert_eq!(s.allowed_domains, ["**.corp.example", "github.com"]);
        assert!(s.asks_enabled);
    }

    #[test]
    fn managed_only_ignores_uncovered_local_allows_and_disables_asks() {
        let r = req(
            "[network]\nmanaged_allowed_domains_only = true\nallowed_domains = [\"*.corp.example\"]\n",
        );
        let (s, e, _) = run(
            &r,
            vec![
                local(Config, "allow", "github.com", 0),
                local(Config, "allow", "api.corp.example", 0),
                local(Rules, "allow", "git.corp.example", 22),
                local(Rules, "allow", "other.example", 443),
            ],
        );
        assert_eq!(s.allowed_domains, ["*.corp.example", "api.corp.example"]);
        assert_eq!(s.port_rules.len(), 1);
        assert_eq!(s.port_rules[0].host, "git.corp.example");
        assert!(!s.asks_enabled);
        let gh = e.iter().find(|e| e.pattern == "github.com").unwrap();
        assert!(gh.ignored);
        assert_eq!(gh.ignored_reason, NOT_COVERED);
    }

    #[test]
    fn managed_only_without_allows_blocks_everything() {
        let r = req("[network]\nmanaged_allowed_domains_only = true\n");
        let (s, _, _) = run(&r, vec![local(Config, "allow", "github.com", 0)]);
        assert!(s.allowed_domains.is_empty());
        assert!(!s.asks_enabled);
    }

    #[test]
    fn mode_is_the_narrower() {
        let (s, _, w) = run(&req("[network]\nmode = \"limited\"\n"), vec![]);
        assert_eq!(s.mode, "limited");
        assert_eq!(w.len(), 1);
        // A requirement of full never widens a local limited.
        let mut snap = base(&[]);
        snap.mode = "limited".into();
        apply(
            &req("[network]\nmode = \"full\"\n"),
            &mut snap,
            &mut Vec::new(),
        );
        assert_eq!(snap.mode, "limited");
    }

    #[test]
    fn local_true_is_narrowed_with_warning() {
        let (s, _, w) = run(
            &req("[network]\nallow_local_binding = false\nallow_upstream_proxy = false\n"),
            vec![],
        );
        assert!(!s.allow_local_binding && !s.allow_upstream_proxy);
        assert!(w.contains(&"network.allow_local_binding = true in config is overridden by enterprise requirements (false)".to_string()), "{w:?}");
        // Absent requirement → local value; a requirement true never widens a local false.
        let (s, _, w) = run(&req(""), vec![]);
        assert!(s.allow_local_binding && w.is_empty());
        let mut snap = base(&[]);
        snap.allow_upstream_proxy = false;
        apply(
            &req("[network]\nallow_upstream_proxy = true\n"),
            &mut snap,
            &mut Vec::new(),
        );
        assert!(!snap.allow_upstream_proxy);
    }

    #[test]
    fn unix_sockets_and_allow_all() {
        let mut snap = base(&[]);
        snap.allow_unix_sockets = vec!["/local.sock".into()];
        snap.dangerously_allow_all_unix_sockets = true;
        apply(
            &req("[network.unix_sockets]\n\"/corp.sock\" = \"allow\"\n\"/bad.sock\" = \"deny\"\n"),
            &mut snap,
            &mut Vec::new(),
        );
        assert_eq!(snap.allow_unix_sockets, ["/corp.sock"]);
        assert_eq!(snap.denied_unix_sockets, ["/bad.sock"]);
        assert!(
            !snap.dangerously_allow_all_unix_sockets,
            "a socket list closes allow-all"
        );
        let mut snap = base(&[]);
        snap.allow_unix_sockets = vec!["/local.sock".into()];
        snap.dangerously_allow_all_unix_sockets = true;
        apply(&req(""), &mut snap, &mut Vec::new());
        assert_eq!(snap.allow_unix_sockets, ["/local.sock"]);
        assert!(snap.dangerously_allow_all_unix_sockets);
        let mut snap = base(&[]);
        snap.dangerously_allow_all_unix_sockets = true;
        apply(
            &req("[network]\ndangerously_allow_all_unix_sockets = false\n"),
            &mut snap,
            &mut Vec::new(),
        );
        assert!(!snap.dangerously_allow_all_unix_sockets);
        let mut snap = base(&[]);
        apply(
            &req("[network]\ndangerously_allow_all_unix_sockets = true\n"),
            &mut snap,
            &mut Vec::new(),
        );
        assert!(
            !snap.dangerously_allow_all_unix_sockets,
            "local false stays false"
        );
    }

    #[test]
    fn local_literal_allow_closed_by_requirements() {
        let r = req("[network]\nallow_local_binding = false\nallowed_domains = [\"127.0.0.1\"]\n");
        let (s, e, _) = run(
            &r,
            vec![
                local(Config, "allow", "localhost", 0),
                local(Config, "allow", "10.0.0.5", 0),
                local(Rules, "allow", "127.0.0.1", 8080),
                local(Config, "allow", "example.com", 0),
            ],
        );
        assert_eq!(s.allowed_domains, ["127.0.0.1", "example.com"]);
        assert!(s.port_rules.is_empty());
        assert!(
            e.iter()
                .filter(|e| e.ignored)
                .all(|e| e.ignored_reason == LOCAL_CLOSED)
        );
        assert_eq!(e.iter().filter(|e| e.ignored).count(), 3);
    }

    #[test]
    fn coverage_table() {
        let c = |q: &str, p: &str| covered_by(&pat(q), &pat(p));
        assert!(c("api.x", "*.x"));
        assert!(c("*.a.x", "**.x"));
        assert!(!c("**.x", "*.x"));
        assert!(!c("*.x", "*.a.x"));
        assert!(c("*.x", "**.x"));
        assert!(c("**.a.x", "*.x"));
        assert!(c("x", "**.x"));
        assert!(!c("x", "*.x"));
        assert!(c("api.x:443", "*.x"));
        assert!(!c("api.x", "*.x:443"));
        assert!(c("api.x:443", "*.x:443"));
        assert!(c("10.0.0.1", "10.0.0.0/8"));
        assert!(
            !c("api-*.x", "*.x"),
            "other shapes need an identical pattern"
        );
        assert!(c("api-*.x", "api-*.x"));
    }

    #[test]
    fn managed_deny_lookup() {
        let m = Managed::new(&req(
            "[network]\ndenied_domains = [\"**.evil.example\", \"db.example:5432\"]\n",
        ));
        let host = |s: &str| portcullis::policy::normalize_host(s).unwrap();
        assert_eq!(
            m.denying(&host("a.evil.example"), 0),
            Some("**.evil.example")
        );
        assert_eq!(
            m.denying(&host("db.example"), 5432),
            Some("db.example:5432")
        );
        assert_eq!(m.denying(&host("db.example"), 0), Some("db.example:5432"));
        assert_eq!(m.denying(&host("db.example"), 443), None);
        assert_eq!(m.denying(&host("good.example"), 0), None);
    }

    #[test]
    fn listener_addresses() {
        assert!(loopback_listener("127.0.0.1:8080"));
        assert!(loopback_listener("[::1]:1"));
        assert!(loopback_listener(""));
        assert!(!loopback_listener("0.0.0.0:8080"));
        assert!(!loopback_listener("192.168.1.2:80"));
    }
}
