//! The pattern language of allow and deny entries (`policy.md` §2).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::normalize::{check_name, is_numeric_label, valid_zone, zone_text};

/// Which list an entry belongs to (the global wildcard is allowlist-only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    /// Allowlist.
    Allow,
    /// Denylist.
    Deny,
}

/// The host part of an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`: every host, names and IP literals.
    Global,
    /// `example.com`.
    Exact(Box<str>),
    /// `*.example.com` (`apex = false`) or `**.example.com` (`apex = true`).
    Suffix {
        /// The name after the wildcard label.
        base: Box<str>,
        /// Whether the base name itself matches.
        apex: bool,
    },
    /// Labels with `*` / `?` inside them; matched label by label.
    Glob {
        /// Every label of the pattern.
        labels: Vec<Box<str>>,
        /// The longest wildcard-free label suffix (the index bucket).
        anchor: Box<str>,
    },
    /// One IP address, with an optional zone (IPv6).
    Ip {
        /// The address.
        addr: IpAddr,
        /// Zone: when set, only that exact zone matches.
        zone: Option<Box<str>>,
    },
    /// A CIDR block (no host bits, not `/0`).
    Cidr {
        /// Network address.
        net: IpAddr,
        /// Prefix length.
        prefix: u8,
    },
}

/// One parsed entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// The host part.
    pub host: HostPattern,
    /// `None` = every port.
    pub port: Option<u16>,
    /// Normalised text (for the Decision's `rule` and for dedupe).
    pub text: String,
}

impl Pattern {
    /// An exact entry (`policy.md` §3): exact name or single IP (never CIDR or wildcard).
    pub fn is_exact(&self) -> bool {
        matches!(self.host, HostPattern::Exact(_) | HostPattern::Ip { .. })
    }
}

/// Why an entry is invalid. Displays as `invalid pattern "…": why`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// Generic invalid pattern with a reason.
    #[error("invalid pattern \"{text}\": {why}")]
    Invalid {
        /// The entry as written (truncated for display).
        text: String,
        /// Why.
        why: &'static str,
    },
    /// `*` in the denylist.
    #[error("the denylist cannot contain the global wildcard \"*\"")]
    GlobalInDenylist,
}

fn bad(text: &str, why: &'static str) -> PatternError {
    let mut shown: String = text.chars().take(200).collect();
    shown = shown.escape_default().to_string();
    PatternError::Invalid { text: shown, why }
}

/// Parses one allow or deny entry.
pub fn parse_pattern(raw: &str, list: ListKind) -> Result<Pattern, PatternError> {
    let err = |why| bad(raw, why);
    if raw.is_empty() {
        return Err(err("empty pattern"));
    }
    if raw.len() > 1000 {
        return Err(err("longer than 1000 characters"));
    }
    if !raw.is_ascii() {
        return Err(err(
            "non-ASCII characters; write internationalised names as punycode (xn--…)",
        ));
    }
    if !raw.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(err("contains blanks or control characters"));
    }
    // Bracketed IPv6, optionally with a port or a prefix.
    if let Some(rest) = raw.strip_prefix('[') {
        let end = rest.find(']').ok_or_else(|| err("missing ]"))?;
        let (inside, after) = (&rest[..end], &rest[end + 1..]);
        if inside.contains('*') || inside.contains('?') {
            return Err(err("wildcards are not allowed in IP entries"));
        }
        if let Some(prefix) = after.strip_prefix('/') {
            return cidr(raw, inside, prefix);
        }
        let port = match after {
            "" => None,
            _ => Some(parse_entry_port(
                raw,
                after.strip_prefix(':').ok_or_else(|| err("junk after ]"))?,
            )?),
        };
        let (addr, zone) = ipv6_with_zone(raw, inside)?;
        return Ok(ip_pattern(addr, zone, port));
    }
    if raw.contains('/') {
        let (addr, prefix) = raw.split_once('/').ok_or_else(|| err("invalid CIDR"))?;
        return cidr(raw, addr, prefix);
    }
    let colons = raw.matches(':').count();
    if colons >= 2 {
        // An unbracketed IPv6 entry never carries a port.
        let (addr, zone) = ipv6_with_zone(raw, raw)?;
        return Ok(ip_pattern(addr, zone, None));
    }
    let (host, port) = match raw.split_once(':') {
        Some((h, p)) => (h, Some(parse_entry_port(raw, p)?)),
        None => (raw, None),
    };
    let host_pattern = parse_host_part(raw, host, list)?;
    Ok(finish(host_pattern, port))
}

fn parse_host_part(raw: &str, host: &str, list: ListKind) -> Result<HostPattern, PatternError> {
    let err = |why| bad(raw, why);
    if host == "*" {
        // `*:PORT` is fine in both lists; bare `*` only in the allowlist.
        if list == ListKind::Deny && !raw.contains(':') {
            return Err(PatternError::GlobalInDenylist);
        }
        return Ok(HostPattern::Global);
    }
    if host.bytes().all(|b| matches!(b, b'*' | b'?' | b'.')) {
        return Err(err("a pattern made only of wildcards and dots"));
    }
    if host.contains(['/', '\\', '@', '#', '%', '[', ']']) {
        return Err(err("invalid character"));
    }
    // Snapshot and config entries are normalised already: copy only when there is a capital.
    let lower: std::borrow::Cow<'_, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        host.to_ascii_lowercase().into()
    } else {
        host.into()
    };
    let text = lower.strip_suffix('.').unwrap_or(&lower);
    if text.is_empty() {
        return Err(err("empty label"));
    }
    for (prefix, apex) in [("**.", true), ("*.", false)] {
        if let Some(base) = text.strip_prefix(prefix) {
            if base.contains(['*', '?']) {
                return Err(err(
                    "a leading wildcard label must be followed by a name without wildcards",
                ));
            }
            check_pattern_name(raw, base)?;
            return Ok(HostPattern::Suffix {
                base: base.into(),
                apex,
            });
        }
    }
    if text.contains("**") {
        return Err(err("** is only valid as the leading **."));
    }
    if text.split('.').any(str::is_empty) {
        return Err(err("empty label"));
    }
    let last = text.rsplit('.').next().unwrap_or_default();
    if last.contains(['*', '?']) {
        return Err(err("the last label cannot contain a wildcard"));
    }
    if text.contains(['*', '?']) {
        let labels: Vec<&str> = text.split('.').collect();
        if is_numeric_label(last) {
            return Err(err("the last label cannot be numeric"));
        }
        // Glob labels: name characters plus * and ?.
        for l in &labels {
            if l.len() > 63
                || !l.bytes().all(|b| {
                    b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || matches!(b, b'_' | b'-' | b'*' | b'?')
                })
            {
                return Err(err("invalid label"));
            }
        }
        if text.len() > 253 {
            return Err(err("name longer than 253 characters"));
        }
        let first_literal = labels
            .iter()
            .rposition(|l| l.contains(['*', '?']))
            .map_or(0, |i| i + 1);
        let anchor = labels[first_literal..].join(".");
        return Ok(HostPattern::Glob {
            labels: labels.iter().map(|l| Box::<str>::from(*l)).collect(),
            anchor: anchor.into(),
        });
    }
    if is_numeric_label(last) {
        // Entries take only the plain dotted quad, no leading zeros.
        return parse_plain_v4(text)
            .map(|v4| HostPattern::Ip {
                addr: IpAddr::V4(v4),
                zone: None,
            })
            .ok_or_else(|| err("IPv4 entries must be a plain dotted quad without leading zeros"));
    }
    check_pattern_name(raw, text)?;
    Ok(HostPattern::Exact(text.into()))
}

fn check_pattern_name(raw: &str, name: &str) -> Result<(), PatternError> {
    check_name(name).map_err(|e| {
        bad(
            raw,
            match e {
                super::HostError::EmptyLabel => "empty label",
                super::HostError::TooLong => "name or label too long",
                _ => "invalid character in name",
            },
        )
    })?;
    let last = name.rsplit('.').next().unwrap_or(name);
    if is_numeric_label(last) {
        return Err(bad(raw, "the last label cannot be numeric"));
    }
    Ok(())
}

fn parse_plain_v4(text: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = text.split('.').collect();
    if parts.len() != 4 {
        return None;
    }
    let mut octets = [0u8; 4];
    for (i, p) in parts.iter().enumerate() {
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if p.len() > 1 && p.starts_with('0') {
            return None;
        }
        octets[i] = p.parse().ok()?;
    }
    Some(Ipv4Addr::from(octets))
}

fn ipv6_with_zone(raw: &str, text: &str) -> Result<(IpAddr, Option<Box<str>>), PatternError> {
    let (addr_text, zone) = match text.split_once('%') {
        Some((a, z)) => {
            let z = z.strip_prefix("25").filter(|z| !z.is_empty()).unwrap_or(z);
            if !valid_zone(z) {
                return Err(bad(raw, "invalid zone"));
            }
            (a, Some(Box::<str>::from(z)))
        }
        None => (text, None),
    };
    let v6: Ipv6Addr = addr_text
        .parse()
        .map_err(|_| bad(raw, "invalid IPv6 address"))?;
    match v6.to_ipv4_mapped() {
        Some(_) if zone.is_some() => Err(bad(raw, "a zone on an IPv4-mapped address")),
        Some(v4) => Ok((IpAddr::V4(v4), None)),
        None => Ok((IpAddr::V6(v6), zone)),
    }
}

fn cidr(raw: &str, addr: &str, prefix: &str) -> Result<Pattern, PatternError> {
    let err = |why| bad(raw, why);
    if prefix.is_empty()
        || prefix.len() > 3
        || !prefix.bytes().all(|b| b.is_ascii_digit())
        || (prefix.len() > 1 && prefix.starts_with('0'))
    {
        return Err(err(
            "invalid prefix length (a CIDR entry cannot carry a port)",
        ));
    }
    let len: u8 = prefix.parse().map_err(|_| err("invalid prefix length"))?;
    let addr = addr
        .strip_prefix('[')
        .and_then(|a| a.strip_suffix(']'))
        .unwrap_or(addr);
    let net: IpAddr = if addr.contains(':') {
        let v6: Ipv6Addr = addr.parse().map_err(|_| err("invalid IPv6 network"))?;
        IpAddr::V6(v6)
    } else {
        IpAddr::V4(parse_plain_v4(addr).ok_or_else(|| err("invalid IPv4 network"))?)
    };
    let max = if net.is_ipv4() { 32 } else { 128 };
    if len == 0 {
        return Err(err("/0 blocks are not allowed"));
    }
    if len > max {
        return Err(err("prefix length too long"));
    }
    let host_bits_zero = match net {
        IpAddr::V4(v4) => len == 32 || u32::from(v4) & (u32::MAX >> len) == 0,
        IpAddr::V6(v6) => len == 128 || u128::from(v6) & (u128::MAX >> len) == 0,
    };
    if !host_bits_zero {
        return Err(err("host bits set in a CIDR entry"));
    }
    let text = format!("{net}/{len}");
    Ok(Pattern {
        host: HostPattern::Cidr { net, prefix: len },
        port: None,
        text,
    })
}

fn parse_entry_port(raw: &str, p: &str) -> Result<u16, PatternError> {
    let err = || bad(raw, "ports are 1-65535 without leading zeros");
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) || p.starts_with('0') {
        return Err(err());
    }
    match p.parse::<u32>() {
        Ok(v) if (1..=65535).contains(&v) => Ok(v as u16),
        _ => Err(err()),
    }
}

fn ip_pattern(addr: IpAddr, zone: Option<Box<str>>, port: Option<u16>) -> Pattern {
    finish(HostPattern::Ip { addr, zone }, port)
}

fn finish(host: HostPattern, port: Option<u16>) -> Pattern {
    let host_text = match &host {
        HostPattern::Global => "*".to_string(),
        HostPattern::Exact(n) => n.to_string(),
        HostPattern::Suffix { base, apex: true } => format!("**.{base}"),
        HostPattern::Suffix { base, apex: false } => format!("*.{base}"),
        HostPattern::Glob { labels, .. } => labels.join("."),
        HostPattern::Ip {
            addr: IpAddr::V4(v4),
            ..
        } => v4.to_string(),
        HostPattern::Ip {
            addr: IpAddr::V6(v6),
            zone,
        } => {
            let z = zone
                .as_ref()
                .map(|z| format!("%{}", zone_text(z)))
                .unwrap_or_default();
            if port.is_some() {
                format!("[{v6}{z}]")
            } else {
                format!("{v6}{z}")
            }
        }
        HostPattern::Cidr { net, prefix } => format!("{net}/{prefix}"),
    };
    let text = match port {
        Some(p) => format!("{host_text}:{p}"),
        None => host_text,
    };
    Pattern { host, port, text }
}

/// Matches one label against a glob label (`*` = any run, `?` = one character).
pub fn glob_label_matches(pattern: &[u8], label: &[u8]) -> bool {
    let (mut p, mut l) = (0usize, 0usize);
    let (mut star, mut mark) = (usize::MAX, 0usize);
    while l < label.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == label[l]) {
            p += 1;
            l += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = p;
            mark = l;
            p += 1;
        } else if star != usize::MAX {
            p = star + 1;
            mark += 1;
            l = mark;
        } else {
            return false;
        }
    }
    while p < pattern.len() && pattern[p] == b'*' {
        p += 1;
    }
    p == pattern.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> String {
        parse_pattern(s, ListKind::Allow)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .text
    }

    #[test]
    fn zone_entries_starting_with_25_reparse_to_themselves() {
        // Regression (fuzz `policy_decision`): the normalised text is itself a valid spelling
        // of the same entry.
        for raw in [
            "fe80::1%2525eth0",
            "[fe80::1%2525eth0]:22",
            "fe80::1%25",
            "fe80::1%25eth0",
        ] {
            let p = parse_pattern(raw, ListKind::Allow).unwrap();
            assert_eq!(
                parse_pattern(&p.text, ListKind::Allow),
                Ok(p.clone()),
                "{raw}"
            );
        }
        assert_eq!(ok("fe80::1%2525eth0"), "fe80::1%2525eth0");
        assert_eq!(ok("[fe80::1%25eth0]:22"), "[fe80::1%eth0]:22");
    }

    #[test]
    fn valid_forms() {
        assert_eq!(ok("Example.COM."), "example.com");
        assert_eq!(ok("*.example.com"), "*.example.com");
        assert_eq!(ok("**.example.com"), "**.example.com");
        assert_eq!(ok("region*.v2.tunnel.example"), "region*.v2.tunnel.example");
        assert_eq!(ok("api-?.example.com"), "api-?.example.com");
        assert_eq!(ok("api.*.example.com"), "api.*.example.com");
        assert_eq!(ok("*"), "*");
        assert_eq!(ok("203.0.113.7"), "203.0.113.7");
        assert_eq!(ok("[2001:db8::1]"), "2001:db8::1");
        assert_eq!(ok("2001:db8::1"), "2001:db8::1");
        assert_eq!(ok("[fe80::1%25eth0]"), "fe80::1%eth0");
        assert_eq!(ok("10.0.0.0/8"), "10.0.0.0/8");
        assert_eq!(ok("2001:db8::/32"), "2001:db8::/32");
        assert_eq!(ok("[2001:db8::]/32"), "2001:db8::/32");
        assert_eq!(ok("api.example.com:443"), "api.example.com:443");
        assert_eq!(ok("*.example.com:8443"), "*.example.com:8443");
        assert_eq!(ok("[::1]:8080"), "[::1]:8080");
        assert_eq!(ok("127.0.0.1:8000"), "127.0.0.1:8000");
        assert_eq!(ok("*:22"), "*:22");
        assert_eq!(ok("::ffff:10.0.0.1"), "10.0.0.1");
        // An unbracketed IPv6 entry never carries a port.
        assert_eq!(ok("2001:db8::1:80"), "2001:db8::1:80");
        assert!(parse_pattern("*:22", ListKind::Deny).is_ok());
    }

    #[test]
    fn invalid_forms() {
        assert_eq!(
            parse_pattern("*", ListKind::Deny),
            Err(PatternError::GlobalInDenylist)
        );
        for s in [
            "**",
            "*.*",
            "**.*",
            "*.",
            "[*]",
            "example.*",
            "*.0.0.1",
            "a.**.b",
            "*.*.example.com",
            "10.1.0.0/8",
            "0.0.0.0/0",
            "example.com:0443",
            "example.com:0",
            "example.com:65536",
            "example.com:https",
            "example.com:",
            "[::1",
            "2001:db8::/32:443",
            "bücher.de",
            "127.1",
            "010.0.0.1",
            "a..b",
            "",
            "ex ample.com",
            "a/b",
            "::/0",
        ] {
            assert!(
                parse_pattern(s, ListKind::Allow).is_err(),
                "{s:?} must be rejected"
            );
        }
        let e = parse_pattern("a..b", ListKind::Allow).unwrap_err();
        assert_eq!(e.to_string(), "invalid pattern \"a..b\": empty label");
    }

    #[test]
    fn glob_labels() {
        assert!(glob_label_matches(b"region*", b"region"));
        assert!(glob_label_matches(b"region*", b"region1"));
        assert!(!glob_label_matches(b"region*", b"xregion1"));
        assert!(glob_label_matches(b"api-?", b"api-1"));
        assert!(!glob_label_matches(b"api-?", b"api-10"));
        assert!(glob_label_matches(b"*a*b", b"xxaxxb"));
    }
}
