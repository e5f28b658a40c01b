//! Host normalisation + pattern parsing + the two decision stages.
//!
//! Input (text, one item per line): line 1 the request host, line 2 the port, line 3 flags,
//! then entries: `+PATTERN` allow, `-PATTERN` deny, `=IP` a DNS answer, `~HOST PORT` a
//! session allow. Flags: `B` allow_local_binding, `L` limited, `M` mitm, `U` Upgrade,
//! `X` proxy disabled, `a`/`e` asks disabled/enabled, `0`–`4` protocol, `G`/`P`/`C` method.
//!
//! Invariants: normalisation is idempotent; every valid pattern re-parses from its
//! normalised text; with allow_local_binding = false an allowed request never carries a
//! non-public address unless an exact allow entry names that literal; deny wins; nothing
//! always-refused is ever allowed; unresolvable names fail closed.
#![no_main]

mod common;

use std::net::IpAddr;

use common::{Scenario, assert_normalisation_idempotent, checked_pattern, decide_and_check};
use libfuzzer_sys::fuzz_target;
use portcullis::policy::{AskMode, ListKind, normalize_host};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let raw_host = lines.next().unwrap_or_default();
    let port: u16 = lines
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(443);
    let flags = lines.next().unwrap_or_default();

    let mut sc = Scenario {
        enabled: !flags.contains('X'),
        limited: flags.contains('L'),
        mitm: flags.contains('M'),
        allow_local_binding: flags.contains('B'),
        asks: if flags.contains('e') {
            AskMode::Enabled
        } else if flags.contains('a') {
            AskMode::Disabled
        } else {
            AskMode::Standalone
        },
        allowed: Vec::new(),
        denied: Vec::new(),
        session_allows: Vec::new(),
    };
    let protocol = common::protocol_of(
        flags
            .bytes()
            .find(u8::is_ascii_digit)
            .map_or(0, |b| b - b'0'),
    );
    let method = if flags.contains('C') {
        Some("CONNECT")
    } else if flags.contains('P') {
        Some("POST")
    } else if flags.contains('G') {
        Some("GET")
    } else {
        None
    };
    let mut resolved: Vec<IpAddr> = Vec::new();
    for line in lines.take(64) {
        if let Some(e) = line.strip_prefix('+') {
            sc.allowed.extend(checked_pattern(e, ListKind::Allow));
        } else if let Some(e) = line.strip_prefix('-') {
            sc.denied.extend(checked_pattern(e, ListKind::Deny));
        } else if let Some(a) = line.strip_prefix('=') {
            if let Ok(ip) = a.parse() {
                resolved.push(ip);
            }
        } else if let Some(s) = line.strip_prefix('~') {
            let (h, p) = s.split_once(' ').unwrap_or((s, "443"));
            if let (Ok(h), Ok(p)) = (normalize_host(h), p.parse::<u16>()) {
                sc.session_allows.push((h.to_string(), protocol, p));
            }
        }
    }

    let Ok(host) = normalize_host(raw_host) else {
        return;
    };
    assert_normalisation_idempotent(&host);
    let policy = sc.compile();
    decide_and_check(
        &sc,
        &policy,
        protocol,
        &host,
        port,
        method,
        flags.contains('U'),
        &resolved,
    );
});
