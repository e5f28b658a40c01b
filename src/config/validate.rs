//! Value checks shared by the file parser and the flag overrides. Each returns the PROBLEM text.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use super::error::quoted;
use super::model::ControlEndpoint;

/// Longest pattern accepted (characters), rule 6.
pub const MAX_PATTERN_CHARS: usize = 1000;
/// Longest unix-socket path (bytes): the smallest `sun_path` limit, rule 9.
pub const MAX_UNIX_PATH_BYTES: usize = 103;

/// Rule 6 (length only) and rule 7 (no global wildcard in the denylist).
pub fn check_pattern(s: &str, deny: bool) -> Result<(), String> {
    if s.chars().count() > MAX_PATTERN_CHARS {
        return Err(format!(
            "pattern is longer than {MAX_PATTERN_CHARS} characters"
        ));
    }
    if deny && s.trim() == "*" {
        return Err("the denylist cannot contain the global wildcard \"*\"".to_string());
    }
    Ok(())
}

/// Rule 9: starts with `/`, no NUL, at most 103 bytes.
pub fn check_unix_path(s: &str) -> Result<(), String> {
    if s.contains('\0') {
        return Err("must not contain NUL".to_string());
    }
    if !s.starts_with('/') {
        return Err("must be an absolute path".to_string());
    }
    if s.len() > MAX_UNIX_PATH_BYTES {
        return Err(format!(
            "must be at most {MAX_UNIX_PATH_BYTES} bytes (found {})",
            s.len()
        ));
    }
    Ok(())
}

/// A file path value: non-empty, no NUL.
pub fn check_path_text(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".to_string());
    }
    if s.contains('\0') {
        return Err("must not contain NUL".to_string());
    }
    Ok(())
}

/// Rule 15: `IP`, `IP:port`, `[IPv6]:port`, port 1–65535 (default 53).
pub fn check_dns_server(s: &str) -> Result<SocketAddr, String> {
    const MSG: &str = "expected IP or IP:port";
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']'))
        && let Ok(ip) = inner.parse::<std::net::Ipv6Addr>()
    {
        return Ok(SocketAddr::new(IpAddr::V6(ip), 53));
    }
    match s.parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 => {
            // Reject scope ids / flow info that SocketAddr may carry for IPv6.
            Ok(SocketAddr::new(a.ip(), a.port()))
        }
        Ok(_) => Err(format!("{MSG}; port must be between 1 and 65535")),
        Err(_) => Err(MSG.to_string()),
    }
}

/// `control.session_id` / `--session-id`: `[A-Za-z0-9][A-Za-z0-9._:-]{0,127}`.
pub fn check_session_id(s: &str) -> Result<(), String> {
    let mut bytes = s.bytes();
    let ok = s.len() <= 128
        && bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err("must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}".to_string())
    }
}

/// Rule 16 (`control.md` §1.6): `http://HOST:PORT`, `unix:/abs/path`, `unix:///abs/path`.
pub fn check_control_endpoint(s: &str) -> Result<ControlEndpoint, String> {
    const MSG: &str = "expected http://HOST:PORT or unix:/absolute/path";
    if let Some(rest) = strip_prefix_ci(s, "http://") {
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority
            .bytes()
            .any(|b| matches!(b, b'/' | b'?' | b'#' | b'@') || !b.is_ascii_graphic())
        {
            return Err(MSG.to_string());
        }
        let (host, port) = if let Some(after) = authority.strip_prefix('[') {
            let (inner, tail) = after.split_once(']').ok_or_else(|| MSG.to_string())?;
            inner
                .parse::<std::net::Ipv6Addr>()
                .map_err(|_| MSG.to_string())?;
            let port = tail.strip_prefix(':').ok_or_else(|| MSG.to_string())?;
            (inner, port)
        } else {
            let (h, p) = authority.split_once(':').ok_or_else(|| MSG.to_string())?;
            if h.is_empty()
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            {
                return Err(MSG.to_string());
            }
            (h, p)
        };
        let port = parse_port_1(port).ok_or_else(|| MSG.to_string())?;
        return Ok(ControlEndpoint::Http {
            host: host.to_string(),
            port,
        });
    }
    if let Some(rest) = strip_prefix_ci(s, "unix:") {
        let path = if let Some(r) = rest.strip_prefix("//") {
            if !r.starts_with('/') {
                return Err(MSG.to_string());
            }
            r
        } else {
            rest
        };
        if !path.starts_with('/') {
            return Err(MSG.to_string());
        }
        check_unix_path(path)?;
        return Ok(ControlEndpoint::Unix(PathBuf::from(path)));
    }
    Err(MSG.to_string())
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix) {
        s.get(prefix.len()..)
    } else {
        None
    }
}

fn parse_port_1(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse::<u16>().ok().filter(|n| *n != 0)
}

/// A URL with one of `schemes`, a host, no userinfo, an optional port 1–65535, no blanks or
/// control characters (`requirements.url`, `audit.endpoint`).
pub fn check_url(s: &str, schemes: &[&str]) -> Result<(), String> {
    let expected = schemes
        .iter()
        .map(|s| format!("{s}://"))
        .collect::<Vec<_>>()
        .join(" or ");
    let Some((scheme, rest)) = s.split_once("://") else {
        return Err(format!("expected an {expected} URL"));
    };
    if !schemes.iter().any(|x| x.eq_ignore_ascii_case(scheme)) {
        return Err(format!(
            "unsupported scheme {}; expected an {expected} URL",
            quoted(scheme)
        ));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("URL must not contain blanks or control characters".to_string());
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = rest.get(..end).unwrap_or("");
    if authority.contains('@') {
        return Err("URL must not contain userinfo".to_string());
    }
    let (host, port) = if let Some(after) = authority.strip_prefix('[') {
        let Some((inner, tail)) = after.split_once(']') else {
            return Err("URL has an unterminated [".to_string());
        };
        if inner.parse::<std::net::Ipv6Addr>().is_err() {
            return Err("URL has an invalid IPv6 host".to_string());
        }
        match tail {
            "" => (inner, None),
            t => match t.strip_prefix(':') {
                Some(p) => (inner, Some(p)),
                None => return Err("URL has an invalid host".to_string()),
            },
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("URL must have a host".to_string());
    }
    if let Some(p) = port
        && parse_port_1(p).is_none()
    {
        return Err("URL port must be between 1 and 65535".to_string());
    }
    Ok(())
}

/// `requirements.token_env`: a plausible environment variable name.
pub fn check_token_env(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 256 {
        return Err("must be 1 to 256 bytes".to_string());
    }
    if !s.bytes().all(|b| b.is_ascii_graphic() && b != b'=') {
        return Err("must be an environment variable name (printable ASCII, no =)".to_string());
    }
    Ok(())
}

/// `audit.headers` names: an HTTP token.
pub fn check_header_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if ok {
        Ok(())
    } else {
        Err("invalid header name".to_string())
    }
}
