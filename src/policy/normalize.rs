//! Host normalisation (`policy.md` §1): one spelling per destination, or invalid.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A normalised request host.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name: lower case, no trailing dot, labels of `[a-z0-9_-]`.
    Name(Box<str>),
    /// An IP literal (IPv4-mapped IPv6 already rewritten to IPv4), with an optional IPv6 zone.
    Ip {
        /// The address.
        addr: IpAddr,
        /// IPv6 zone (`eth0` of `fe80::1%eth0`).
        zone: Option<Box<str>>,
    },
}

impl Host {
    /// An IP host without zone.
    pub fn ip(addr: IpAddr) -> Host {
        Host::Ip {
            addr: canonical_ip(addr),
            zone: None,
        }
    }

    /// `localhost` and `*.localhost` (RFC 6761): loopback, never sent to DNS.
    pub fn is_loopback_name(&self) -> bool {
        match self {
            Host::Name(n) => &**n == "localhost" || n.ends_with(".localhost"),
            Host::Ip { .. } => false,
        }
    }

    /// The IP address of an IP literal.
    pub fn as_ip(&self) -> Option<IpAddr> {
        match self {
            Host::Ip { addr, .. } => Some(*addr),
            Host::Name(_) => None,
        }
    }

    /// The name of a name host.
    pub fn as_name(&self) -> Option<&str> {
        match self {
            Host::Name(n) => Some(n),
            Host::Ip { .. } => None,
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip { addr, zone: None } => write!(f, "{addr}"),
            Host::Ip {
                addr,
                zone: Some(z),
            } => write!(f, "{addr}%{}", zone_text(z)),
        }
    }
}

/// Why a host or authority is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// Empty host.
    #[error("empty host")]
    Empty,
    /// A byte outside printable ASCII.
    #[error("host contains a byte outside printable ASCII")]
    NotPrintable,
    /// A character that never belongs in a host.
    #[error("host contains {0:?}")]
    Forbidden(char),
    /// Not a valid IPv6 literal (or zone).
    #[error("invalid IPv6 address")]
    BadIpv6,
    /// Numeric last label but not a valid IPv4 spelling.
    #[error("invalid IPv4 address")]
    BadIpv4,
    /// Empty label (`a..b`, two trailing dots).
    #[error("empty label")]
    EmptyLabel,
    /// Label longer than 63 or name longer than 253 characters.
    #[error("name or label too long")]
    TooLong,
    /// A label character outside `[a-z0-9_-]`.
    #[error("invalid character in name")]
    BadNameChar,
    /// Port missing, zero, too large or not decimal.
    #[error("invalid port")]
    BadPort,
    /// Unbracketed IPv6 in an authority, or junk after `]`.
    #[error("invalid authority")]
    BadAuthority,
}

/// Splits an authority into host text and optional port (`policy.md` §1, first paragraph).
/// `[v6]` keeps its brackets in the host text.
pub fn split_authority(authority: &str) -> Result<(&str, Option<u16>), HostError> {
    if authority.starts_with('[') {
        let end = authority.find(']').ok_or(HostError::BadAuthority)?;
        let (host, rest) = authority.split_at(end + 1);
        return match rest {
            "" => Ok((host, None)),
            _ => match rest.strip_prefix(':') {
                Some(p) => Ok((host, Some(parse_request_port(p)?))),
                None => Err(HostError::BadAuthority),
            },
        };
    }
    match authority.matches(':').count() {
        0 => Ok((authority, None)),
        1 => {
            let (host, port) = authority.split_once(':').ok_or(HostError::BadAuthority)?;
            Ok((host, Some(parse_request_port(port)?)))
        }
        _ => Err(HostError::BadAuthority),
    }
}

/// A request port: 1–5 digits (leading zeros tolerated), value 1–65535.
pub fn parse_request_port(p: &str) -> Result<u16, HostError> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HostError::BadPort);
    }
    match p.parse::<u32>() {
        Ok(v) if (1..=65535).contains(&v) => Ok(v as u16),
        _ => Err(HostError::BadPort),
    }
}

/// Normalises a host (`policy.md` §1 rules 1–6).
pub fn normalize_host(raw: &str) -> Result<Host, HostError> {
    if raw.is_empty() {
        return Err(HostError::Empty);
    }
    if !raw.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(HostError::NotPrintable);
    }
    if let Some(inner) = raw.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or(HostError::BadIpv6)?;
        return parse_ipv6_host(inner);
    }
    if raw.contains(':') {
        // SOCKS5 domain targets may carry a bare IPv6 text.
        return parse_ipv6_host(raw);
    }
    if let Some(c) = raw
        .chars()
        .find(|c| matches!(c, '/' | '\\' | '@' | '?' | '#' | '[' | ']' | '%'))
    {
        return Err(HostError::Forbidden(c));
    }
    let lower = raw.to_ascii_lowercase();
    let text = lower.strip_suffix('.').unwrap_or(&lower);
    if text.is_empty() {
        return Err(HostError::EmptyLabel);
    }
    let last = text.rsplit('.').next().unwrap_or(text);
    if is_numeric_label(last) {
        return parse_inet_aton(text)
            .map(|v4| Host::ip(IpAddr::V4(v4)))
            .ok_or(HostError::BadIpv4);
    }
    check_name(text)?;
    Ok(Host::Name(text.into()))
}

/// All decimal digits, or `0x`/`0X` followed by hex digits (possibly none: `0x` is invalid).
pub(crate) fn is_numeric_label(label: &str) -> bool {
    if !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    match label
        .strip_prefix("0x")
        .or_else(|| label.strip_prefix("0X"))
    {
        Some(hex) => hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => false,
    }
}

/// Labels of 1–63 characters from `[a-z0-9_-]`, total ≤ 253.
pub(crate) fn check_name(name: &str) -> Result<(), HostError> {
    if name.len() > 253 {
        return Err(HostError::TooLong);
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(HostError::EmptyLabel);
        }
        if label.len() > 63 {
            return Err(HostError::TooLong);
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(HostError::BadNameChar);
        }
    }
    Ok(())
}

/// The classic `inet_aton` spellings: 1–4 parts, decimal / octal / hex.
fn parse_inet_aton(text: &str) -> Option<Ipv4Addr> {
    let mut parts = [0u64; 4];
    let mut n = 0;
    for part in text.split('.') {
        if n == 4 {
            return None;
        }
        parts[n] = parse_aton_part(part)?;
        n += 1;
    }
    let (head, last) = (&parts[..n - 1], parts[n - 1]);
    if head.iter().any(|&p| p > 255) {
        return None;
    }
    let last_max: u64 = match n {
        1 => 0xffff_ffff,
        2 => 0xff_ffff,
        3 => 0xffff,
        _ => 0xff,
    };
    if last > last_max {
        return None;
    }
    let mut value: u64 = 0;
    for (i, p) in head.iter().enumerate() {
        value |= p << (24 - 8 * i);
    }
    value |= last;
    Some(Ipv4Addr::from(value as u32))
}

fn parse_aton_part(part: &str) -> Option<u64> {
    if part.is_empty() || part.len() > 32 {
        return None;
    }
    if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        return u64::from_str_radix(hex, 16).ok();
    }
    if !part.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if part.len() > 1 && part.starts_with('0') {
        if !part.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return None;
        }
        return u64::from_str_radix(&part[1..], 8).ok();
    }
    part.parse::<u64>().ok()
}

/// IPv6 text with an optional `%zone` / `%25zone`.
fn parse_ipv6_host(text: &str) -> Result<Host, HostError> {
    let (addr_text, zone) = match text.split_once('%') {
        Some((a, z)) => {
            let z = z.strip_prefix("25").filter(|z| !z.is_empty()).unwrap_or(z);
            if !valid_zone(z) {
                return Err(HostError::BadIpv6);
            }
            (a, Some(z))
        }
        None => (text, None),
    };
    let v6: Ipv6Addr = addr_text.parse().map_err(|_| HostError::BadIpv6)?;
    if let Some(v4) = v6.to_ipv4_mapped() {
        if zone.is_some() {
            return Err(HostError::BadIpv6);
        }
        return Ok(Host::ip(IpAddr::V4(v4)));
    }
    Ok(Host::Ip {
        addr: IpAddr::V6(v6),
        zone: zone.map(Into::into),
    })
}

/// How a zone is written after `%` so that it reads back as itself: `%25…` is read as the
/// encoded `%`, so a zone that itself begins with `25` (and is longer) is written `%25` + zone.
/// Found by the `policy_decision` fuzz target: `fe80::1%2525eth0` (zone `25eth0`) was shown as
/// `fe80::1%25eth0`, which reads back as zone `eth0`.
pub fn zone_text(z: &str) -> std::borrow::Cow<'_, str> {
    if z.len() > 2 && z.starts_with("25") {
        format!("25{z}").into()
    } else {
        z.into()
    }
}

/// Zone: `[A-Za-z0-9._-]{1,64}`.
pub(crate) fn valid_zone(z: &str) -> bool {
    !z.is_empty()
        && z.len() <= 64
        && z.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// IPv4-mapped IPv6 addresses are IPv4 addresses.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> Option<String> {
        normalize_host(s).ok().map(|h| h.to_string())
    }

    #[test]
    fn table_of_section_1() {
        assert_eq!(norm("API.Example.COM.").as_deref(), Some("api.example.com"));
        for s in [
            "2130706433",
            "127.1",
            "127.0.1",
            "0x7f.0.0.1",
            "0177.0.0.1",
            "0x7F000001",
        ] {
            assert_eq!(norm(s).as_deref(), Some("127.0.0.1"), "{s}");
        }
        assert_eq!(norm("10.1").as_deref(), Some("10.0.0.1"));
        assert_eq!(norm("2852039166").as_deref(), Some("169.254.169.254"));
        assert_eq!(norm("[::FFFF:127.0.0.1]").as_deref(), Some("127.0.0.1"));
        assert_eq!(norm("[2001:0DB8::0001]").as_deref(), Some("2001:db8::1"));
        assert_eq!(norm("[fe80::1%25eth0]").as_deref(), Some("fe80::1%eth0"));
        assert_eq!(norm("[fe80::1%eth0]").as_deref(), Some("fe80::1%eth0"));
        let long_name = format!("{}.com", vec!["a".repeat(62); 4].join("."));
        assert!(long_name.len() >= 254);
        let long_label = format!("{}.com", "a".repeat(64));
        for s in [
            "1.2.3.4.5",
            "256.0.0.1",
            "08.0.0.1",
            "4294967296",
            "0x",
            "example.com..",
            "a..b",
            "ex ample.com",
            "bücher.de",
            "a%2eb.com",
            "x@y.com",
            "",
            &long_name,
            &long_label,
            "[::ffff:127.0.0.1%25x.allowed.com]",
        ] {
            assert_eq!(norm(s), None, "{s:?} must be invalid");
        }
        assert_eq!(
            norm("[fe80::1%25x.allowed.com]").as_deref(),
            Some("fe80::1%x.allowed.com")
        );
        for s in ["1e3.example", "xn--bcher-kva.de", "_acme.example.com"] {
            assert_eq!(norm(s).as_deref(), Some(s));
        }
    }

    #[test]
    fn zones_starting_with_25_read_back_as_themselves() {
        // Regression (fuzz `policy_decision`): the shown host must normalise to itself.
        for (raw, zone) in [
            ("[fe80::1%2525eth0]", "25eth0"),
            ("fe80::1%252525", "2525"),
            ("fe80::1%25", "25"),
            ("fe80::1%2525", "25"),
            ("[fe80::1%25eth0]", "eth0"),
        ] {
            let host = normalize_host(raw).unwrap();
            assert!(
                matches!(&host, Host::Ip { zone: Some(z), .. } if &**z == zone),
                "{raw}"
            );
            assert_eq!(normalize_host(&host.to_string()), Ok(host.clone()), "{raw}");
            assert_eq!(normalize_host(&format!("[{host}]")), Ok(host), "{raw}");
        }
        assert_eq!(
            norm("[fe80::1%2525eth0]").as_deref(),
            Some("fe80::1%2525eth0")
        );
        assert_eq!(norm("[fe80::1%25eth0]").as_deref(), Some("fe80::1%eth0"));
    }

    #[test]
    fn control_characters_are_invalid() {
        for s in ["a\r\nb.com", "a\0b", "a\tb", "a\x7fb"] {
            assert_eq!(norm(s), None);
        }
    }

    #[test]
    fn authority_split() {
        assert_eq!(split_authority("a.com:80"), Ok(("a.com", Some(80))));
        assert_eq!(split_authority("a.com:0080"), Ok(("a.com", Some(80))));
        assert_eq!(split_authority("[::1]:8080"), Ok(("[::1]", Some(8080))));
        assert_eq!(split_authority("[::1]"), Ok(("[::1]", None)));
        assert_eq!(split_authority("a.com"), Ok(("a.com", None)));
        for bad in [
            "::1",
            "a.com:0",
            "a.com:65536",
            "a.com:",
            "a.com:x",
            "[::1]x",
            "a.com:123456",
        ] {
            assert!(split_authority(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn loopback_names() {
        assert!(normalize_host("LOCALHOST.").unwrap().is_loopback_name());
        assert!(normalize_host("foo.localhost").unwrap().is_loopback_name());
        assert!(!normalize_host("localhost.com").unwrap().is_loopback_name());
    }
}
