//! Property tests of the policy engine (policy.md "Tests that must exist" 1 and 16):
//! hostile input never panics, normalisation is idempotent, and the compiled index agrees
//! with a naive linear matcher written plainly here.

use std::net::IpAddr;

use portcullis::policy::{
    Host, HostPattern, ListKind, Pattern, PatternIndex, normalize_host, parse_pattern,
    split_authority,
};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn hostile_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = split_authority(&text);
        let _ = normalize_host(&text);
        let _ = parse_pattern(&text, ListKind::Allow);
        let _ = parse_pattern(&text, ListKind::Deny);
    }

    #[test]
    fn normalisation_is_idempotent(text in "[a-zA-Z0-9.:%\\[\\]x_-]{1,40}") {
        if let Ok(h) = normalize_host(&text) {
            let again = normalize_host(&reparse_text(&h)).expect("normalised host re-parses");
            prop_assert_eq!(again, h);
        }
    }

    #[test]
    fn index_agrees_with_linear_matcher(
        entries in proptest::collection::vec(entry(), 1..24),
        hosts in proptest::collection::vec(host(), 1..24),
        port in prop_oneof![Just(80u16), Just(443u16), Just(8080u16)],
    ) {
        let patterns: Vec<Pattern> = entries
            .iter()
            .filter_map(|e| parse_pattern(e, ListKind::Allow).ok())
            .collect();
        let index = PatternIndex::build(patterns.clone());
        for h in hosts {
            let Ok(host) = normalize_host(&h) else { continue };
            let fast = index.lookup(&host, port).map(rank);
            let slow = patterns.iter().filter(|p| naive_match(p, &host, port)).map(rank).min();
            prop_assert_eq!(fast, slow, "host {} port {} entries {:?}", host, port, entries);
        }
    }
}

/// Text that `normalize_host` accepts again for a normalised host (IPv6 in brackets).
fn reparse_text(h: &Host) -> String {
    match h {
        Host::Ip {
            addr: IpAddr::V6(_),
            ..
        } => format!("[{h}]"),
        _ => h.to_string(),
    }
}

fn label() -> impl Strategy<Value = String> {
    prop_oneof![Just("a"), Just("b"), Just("api"), Just("x1"), Just("eu")].prop_map(str::to_string)
}

fn name() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(label(), 0..3),
        prop_oneof![Just("example.com"), Just("test.org")],
    )
        .prop_map(|(labels, base)| {
            let mut v = labels;
            v.push(base.to_string());
            v.join(".")
        })
}

fn entry() -> impl Strategy<Value = String> {
    let port = prop_oneof![
        Just(String::new()),
        Just(":443".to_string()),
        Just(":80".to_string())
    ];
    let host = prop_oneof![
        name(),
        name().prop_map(|n| format!("*.{n}")),
        name().prop_map(|n| format!("**.{n}")),
        name().prop_map(|n| format!("a*.{n}")),
        name().prop_map(|n| format!("?.{n}")),
        Just("8.8.8.8".to_string()),
        Just("8.8.0.0/16".to_string()),
        Just("10.0.0.0/8".to_string()),
        Just("[2001:db8::1]".to_string()),
        Just("[fe80::1%25eth0]".to_string()),
        Just("*".to_string()),
    ];
    (host, port).prop_map(|(h, p)| {
        // CIDRs and unbracketed IPv6 cannot carry a port.
        if h.contains('/') {
            h
        } else {
            format!("{h}{p}")
        }
    })
}

fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        name(),
        Just("8.8.8.8".to_string()),
        Just("8.8.4.4".to_string()),
        Just("10.1.2.3".to_string()),
        Just("[2001:db8::1]".to_string()),
        Just("[fe80::1%eth0]".to_string()),
        Just("[fe80::1%eth1]".to_string()),
    ]
}

/// Most specific first (policy.md §2 rule 9): exact with port, exact, longest suffix, glob,
/// CIDR (longest prefix), global; port-scoped before any-port within a category.
fn rank(p: &Pattern) -> (u8, i32, u8) {
    let port = if p.port.is_some() { 0 } else { 1 };
    let (cat, len) = match &p.host {
        HostPattern::Exact(_) | HostPattern::Ip { .. } => (0, 0),
        HostPattern::Suffix { base, .. } => (1, -(base.len() as i32)),
        HostPattern::Glob { .. } => (2, 0),
        HostPattern::Cidr { prefix, .. } => (3, -i32::from(*prefix)),
        HostPattern::Global => (4, 0),
    };
    // Entries of equal rank (e.g. `*.x` and `**.x` for a subdomain) are equally specific.
    (cat, len, port)
}

fn glob_label(p: &[u8], l: &[u8]) -> bool {
    match (p.first(), l.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob_label(&p[1..], l) || (!l.is_empty() && glob_label(p, &l[1..])),
        (Some(b'?'), Some(_)) => glob_label(&p[1..], &l[1..]),
        (Some(a), Some(b)) if a == b => glob_label(&p[1..], &l[1..]),
        _ => false,
    }
}

fn in_cidr(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let m = u32::MAX << (32 - u32::from(prefix));
            u32::from(a) & m == u32::from(n) & m
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let m = u128::MAX << (128 - u32::from(prefix));
            u128::from(a) & m == u128::from(n) & m
        }
        _ => false,
    }
}

/// The §2 semantics, entry by entry.
fn naive_match(p: &Pattern, host: &Host, port: u16) -> bool {
    if p.port.is_some_and(|q| q != port) {
        return false;
    }
    match (&p.host, host) {
        (HostPattern::Global, _) => true,
        (HostPattern::Exact(e), Host::Name(n)) => **e == **n,
        (HostPattern::Suffix { base, apex }, Host::Name(n)) => {
            (*apex && **n == **base) || n.ends_with(&format!(".{base}"))
        }
        (HostPattern::Glob { labels, .. }, Host::Name(n)) => {
            let parts: Vec<&str> = n.split('.').collect();
            parts.len() == labels.len()
                && labels
                    .iter()
                    .zip(&parts)
                    .all(|(p, l)| glob_label(p.as_bytes(), l.as_bytes()))
        }
        (HostPattern::Ip { addr, zone }, Host::Ip { addr: a, zone: z }) => {
            addr == a && (zone.is_none() || zone.as_deref() == z.as_deref())
        }
        (HostPattern::Cidr { net, prefix }, Host::Ip { addr, .. }) => in_cidr(*addr, *net, *prefix),
        _ => false,
    }
}
