//! Host rules of `network-rules.md` §2: one specific host, in the form the policy normaliser
//! produces, with an optional port.

use std::net::{IpAddr, Ipv6Addr};

/// A rule host: normalised text and the port written in it, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleHost {
    /// IPv4 dotted quad, IPv6 (RFC 5952, `%zone`, no brackets), or lower-case name.
    pub host: String,
    /// A `:port` written in the host.
    pub port: Option<u16>,
}

fn valid_zone(z: &str) -> bool {
    !z.is_empty()
        && z.len() <= 64
        && z.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn ipv6(text: &str) -> Result<String, &'static str> {
    const BAD: &str = "invalid IPv6 address in host";
    let (addr, zone) = match text.split_once('%') {
        Some((a, z)) => {
            let z = z.strip_prefix("25").filter(|z| !z.is_empty()).unwrap_or(z);
            if !valid_zone(z) {
                return Err(BAD);
            }
            (a, Some(z))
        }
        None => (text, None),
    };
    let v6: Ipv6Addr = addr.parse().map_err(|_| BAD)?;
    if let Some(v4) = v6.to_ipv4_mapped() {
        return if zone.is_some() {
            Err(BAD)
        } else {
            Ok(v4.to_string())
        };
    }
    Ok(match zone {
        // Spelled as the policy normaliser prints it (a zone beginning with `25` keeps a `%25`
        // in front, so the stored text reads back as the same zone).
        Some(z) => format!("{v6}%{}", portcullis::policy::normalize::zone_text(z)),
        None => v6.to_string(),
    })
}

fn port(text: &str) -> Result<u16, &'static str> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("invalid port in host");
    }
    match text.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err("port must be between 1 and 65535"),
    }
}

fn numeric_label(label: &str) -> bool {
    (!label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()))
        || label
            .strip_prefix("0x")
            .or_else(|| label.strip_prefix("0X"))
            .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn dotted_quad(text: &str) -> Option<String> {
    let parts: Vec<&str> = text.split('.').collect();
    if parts.len() != 4 {
        return None;
    }
    for p in &parts {
        if p.is_empty()
            || p.len() > 3
            || !p.bytes().all(|b| b.is_ascii_digit())
            || (p.len() > 1 && p.starts_with('0'))
        {
            return None;
        }
        if p.parse::<u16>().ok()? > 255 {
            return None;
        }
    }
    Some(text.to_string())
}

/// Applies §2 to a decoded `host` argument.
pub fn parse_host(raw: &str) -> Result<RuleHost, &'static str> {
    let text = raw.trim_matches(|c: char| c.is_ascii_whitespace());
    if text.is_empty() {
        return Err("host must not be empty");
    }
    if text.contains("://") {
        return Err("host must be a bare host name, not a URL");
    }
    if text.contains(['/', '?', '#', '@']) {
        return Err("host must not contain \"/\", \"?\", \"#\" or \"@\"");
    }
    if text.contains('*') {
        return Err("host must be a specific host; wildcards are not allowed");
    }
    if !text.is_ascii() {
        return Err("host must be ASCII; write internationalised names as punycode (xn--...)");
    }
    if text.chars().any(|c| c.is_whitespace()) {
        return Err("host must not contain whitespace");
    }
    if let Some(rest) = text.strip_prefix('[') {
        let end = rest.find(']').ok_or("invalid IPv6 address in host")?;
        let host = ipv6(&rest[..end])?;
        let port = match &rest[end + 1..] {
            "" => None,
            after => Some(port(
                after.strip_prefix(':').ok_or("invalid port in host")?,
            )?),
        };
        return Ok(RuleHost { host, port });
    }
    let colons = text.matches(':').count();
    if colons >= 2 {
        return Ok(RuleHost {
            host: ipv6(text)?,
            port: None,
        });
    }
    let (name, port) = match text.split_once(':') {
        Some((n, p)) => (n, Some(port(p)?)),
        None => (text, None),
    };
    let lower = name.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    let last = name.rsplit('.').next().unwrap_or(name);
    if numeric_label(last) {
        let host = dotted_quad(name)
            .ok_or("host looks like an IPv4 address but is not a valid dotted quad")?;
        // IPv4 literals are stored as the policy normaliser prints them.
        let host = host
            .parse::<IpAddr>()
            .map(|ip| ip.to_string())
            .unwrap_or(host);
        return Ok(RuleHost { host, port });
    }
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        });
    if !valid {
        return Err("host is not a valid DNS name");
    }
    Ok(RuleHost {
        host: name.to_string(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_table() {
        let ok = |s: &str| parse_host(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(ok("API.GitHub.com.").host, "api.github.com");
        assert_eq!(
            ok("[::1]:443"),
            RuleHost {
                host: "::1".into(),
                port: Some(443)
            }
        );
        assert_eq!(ok("[fe80::1%25lo0]").host, "fe80::1%lo0");
        assert_eq!(ok("2001:0db8::0001").host, "2001:db8::1");
        assert_eq!(
            ok("a.com:8443"),
            RuleHost {
                host: "a.com".into(),
                port: Some(8443)
            }
        );
        assert_eq!(ok("  10.0.0.1 ").host, "10.0.0.1");
        for bad in [
            "a.com:x",
            "[::1]x",
            "*.a.com",
            "https://a.com",
            "a.com/x",
            "a b",
            "bücher.de",
            "127.1",
            "0x7f.0.0.1",
            "-a.com",
            "",
            "010.0.0.1",
            "a.0x1",
            "2130706433",
        ] {
            assert!(parse_host(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn zones_beginning_with_25_are_stored_as_the_normaliser_prints_them() {
        // Regression (fuzz `network_rules`): `fe80::1%2525eth0` (zone `25eth0`) was stored as
        // `fe80::1%25eth0`, which reads back as zone `eth0`.
        for (raw, stored) in [
            ("[fe80::1%2525eth0]", "fe80::1%2525eth0"),
            ("fe80::1%2525eth0", "fe80::1%2525eth0"),
            ("fe80::1%25eth0", "fe80::1%eth0"),
            ("fe80::1%25", "fe80::1%25"),
        ] {
            let h = parse_host(raw).unwrap();
            assert_eq!(h.host, stored, "{raw}");
            assert_eq!(parse_host(&h.host).unwrap().host, stored, "{raw} again");
            let norm = portcullis::policy::normalize_host(raw).unwrap().to_string();
            assert_eq!(norm, stored, "{raw}: the policy normaliser agrees");
        }
    }
}
