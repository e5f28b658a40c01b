//! Listener addresses (`config.md` §3): one parser for `proxy_url`, `socks_url`, `admin_url`,
//! `control.listen` and the flags `--http`, `--socks5`, `--admin`, `--listen`; the clamping rules
//! as a pure function; the listener conflict check (§2 rule 11).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::error::quoted;

/// Which listener an address is for (decides the accepted schemes and the default port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// HTTP proxy listener (`network.proxy_url`, `--http`); default port 3128.
    Http,
    /// SOCKS5 listener (`network.socks_url`, `--socks5`); default port 8081; also accepts
    /// `socks5://` and `socks5h://`.
    Socks5,
    /// Admin API listener (`network.admin_url`, `--admin`); default port 8080.
    Admin,
    /// Control-plane gRPC listener (`control.listen`, `--listen`); default port 50051.
    Control,
}

impl ListenerKind {
    /// Port used when the address has none.
    pub fn default_port(self) -> u16 {
        match self {
            ListenerKind::Http => 3128,
            ListenerKind::Socks5 => 8081,
            ListenerKind::Admin => 8080,
            ListenerKind::Control => 50051,
        }
    }
}

/// Parses a listener address per `config.md` §3 steps 1–4 (no clamping).
///
/// The error is the PROBLEM part of a config or usage error.
pub fn parse_listener_addr(input: &str, kind: ListenerKind) -> Result<SocketAddr, String> {
    let s = input.trim_matches(|c: char| c == ' ' || c == '\t');
    if s.is_empty() {
        return Err("listener address must not be empty".to_string());
    }
    // Step 2: optional scheme.
    let rest = match s.find("://") {
        Some(i) => {
            let scheme = s.get(..i).unwrap_or("").to_ascii_lowercase();
            let ok = scheme == "http"
                || (kind == ListenerKind::Socks5 && (scheme == "socks5" || scheme == "socks5h"));
            if !ok {
                let expected = if kind == ListenerKind::Socks5 {
                    "http://, socks5:// or socks5h://"
                } else {
                    "http://"
                };
                return Err(format!(
                    "unsupported scheme {}; expected {expected} or no scheme",
                    quoted(s.get(..i).unwrap_or(""))
                ));
            }
            s.get(i + 3..).unwrap_or("")
        }
        None => s,
    };
    if rest.contains('?') {
        return Err("listener address must not contain a query".to_string());
    }
    if rest.contains('#') {
        return Err("listener address must not contain a fragment".to_string());
    }
    let authority = match rest.find('/') {
        Some(i) => {
            if rest.get(i..) != Some("/") {
                return Err("listener address must not contain a path".to_string());
            }
            rest.get(..i).unwrap_or("")
        }
        None => rest,
    };
    if authority.contains('@') {
        return Err("listener address must not contain userinfo".to_string());
    }
    if authority.is_empty() {
        return Err("listener address has no host".to_string());
    }
    // Step 3: host, step 4: port.
    let (ip, port): (IpAddr, Option<&str>) = if let Some(after) = authority.strip_prefix('[') {
        let Some(close) = after.find(']') else {
            return Err("unterminated [ in IPv6 address".to_string());
        };
        let inner = after.get(..close).unwrap_or("");
        let ip: Ipv6Addr = inner
            .parse()
            .map_err(|_| format!("invalid IPv6 address {}", quoted(inner)))?;
        let tail = after.get(close + 1..).unwrap_or("");
        let port = if tail.is_empty() {
            None
        } else if let Some(p) = tail.strip_prefix(':') {
            Some(p)
        } else {
            return Err("unexpected text after ]".to_string());
        };
        (IpAddr::V6(ip), port)
    } else if authority.matches(':').count() >= 2 {
        let ip: Ipv6Addr = authority
            .parse()
            .map_err(|_| format!("invalid IPv6 address {}", quoted(authority)))?;
        (IpAddr::V6(ip), None)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        let ip = if let Ok(v4) = host.parse::<Ipv4Addr>() {
            IpAddr::V4(v4)
        } else if is_localhost(host) {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            return Err("listener host must be an IP address or localhost".to_string());
        };
        (ip, port)
    };
    let port = match port {
        None => kind.default_port(),
        Some(p) => parse_port(p)?,
    };
    Ok(SocketAddr::new(ip, port))
}

fn is_localhost(host: &str) -> bool {
    let h = host.strip_suffix('.').unwrap_or(host);
    h.eq_ignore_ascii_case("localhost")
}

/// Decimal port 0–65535.
fn parse_port(p: &str) -> Result<u16, String> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "invalid port {}; expected a number between 0 and 65535",
            quoted(p)
        ));
    }
    p.parse::<u16>()
        .map_err(|_| format!("port {p} is out of range; expected a number between 0 and 65535"))
}

/// The loopback address of the same family as `ip`.
fn loopback_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

/// Input of [`clamp_listeners`]: the parsed (unclamped) data-plane listener addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerRequest {
    /// HTTP listener (always enabled).
    pub http: SocketAddr,
    /// SOCKS5 listener, `None` when disabled.
    pub socks5: Option<SocketAddr>,
    /// Admin listener, `None` when disabled.
    pub admin: Option<SocketAddr>,
    /// `network.dangerously_allow_non_loopback_proxy`.
    pub dangerously_allow_non_loopback_proxy: bool,
    /// Whether any unix socket is allowed (list entry, `allow` map entry, or allow-all).
    pub unix_sockets_allowed: bool,
}

/// Output of [`clamp_listeners`]: the addresses to bind and the WARN lines to log (in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClampedListeners {
    /// HTTP listener address to bind.
    pub http: SocketAddr,
    /// SOCKS5 listener address to bind, `None` when disabled.
    pub socks5: Option<SocketAddr>,
    /// Admin listener address to bind, `None` when disabled.
    pub admin: Option<SocketAddr>,
    /// WARN messages, each one line.
    pub warnings: Vec<String>,
}

/// Applies the clamping rules of `config.md` §3 step 5 (pure; nothing is logged here).
pub fn clamp_listeners(req: &ListenerRequest) -> ClampedListeners {
    let mut warnings = Vec::new();
    let admin = req.admin.map(|a| {
        if a.ip().is_loopback() {
            a
        } else {
            let b = SocketAddr::new(loopback_like(a.ip()), a.port());
            warnings.push(format!(
                "network.admin_url: admin API is loopback-only; binding {b}"
            ));
            b
        }
    });
    let mut clamp_proxy = |key: &str, a: SocketAddr| -> SocketAddr {
        if a.ip().is_loopback() {
            return a;
        }
        let b = SocketAddr::new(loopback_like(a.ip()), a.port());
        if req.unix_sockets_allowed {
            warnings.push(format!(
                "network.{key}: binding {b} instead of {a} because unix sockets are allowed; \
                 remote clients must never reach local sockets (this overrides \
                 network.dangerously_allow_non_loopback_proxy)"
            ));
            b
        } else if req.dangerously_allow_non_loopback_proxy {
            warnings.push(format!(
                "network.{key}: DANGEROUS: listening on non-loopback address {a} because \
                 network.dangerously_allow_non_loopback_proxy = true; anyone who can reach it \
                 can use this proxy"
            ));
            a
        } else {
            warnings.push(format!(
                "network.{key}: {a} is not a loopback address; binding {b} (set \
                 network.dangerously_allow_non_loopback_proxy = true to keep it)"
            ));
            b
        }
    };
    let http = clamp_proxy("proxy_url", req.http);
    let socks5 = req.socks5.map(|s| clamp_proxy("socks_url", s));
    ClampedListeners {
        http,
        socks5,
        admin,
        warnings,
    }
}

/// Clamps the control plane's gRPC listener (`control.md` §1.1): a non-loopback address becomes
/// loopback unless `control.dangerously_allow_non_loopback` is set. Returns the address and the
/// WARN line, if any.
pub fn clamp_control_listener(addr: SocketAddr, dangerous: bool) -> (SocketAddr, Option<String>) {
    if addr.ip().is_loopback() {
        return (addr, None);
    }
    if dangerous {
        return (
            addr,
            Some(format!(
                "control.listen: DANGEROUS: listening on non-loopback address {addr} because \
                 control.dangerously_allow_non_loopback = true"
            )),
        );
    }
    let b = SocketAddr::new(loopback_like(addr.ip()), addr.port());
    (
        b,
        Some(format!(
            "control.listen: {addr} is not a loopback address; binding {b} (set \
             control.dangerously_allow_non_loopback = true to keep it)"
        )),
    )
}

/// Two listener addresses that cannot both be bound: same non-zero port and the same IP, or
/// one side the unspecified address of the same family.
pub fn listeners_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() == 0 || a.port() != b.port() {
        return false;
    }
    if a.ip() == b.ip() {
        return true;
    }
    a.is_ipv4() == b.is_ipv4() && (a.ip().is_unspecified() || b.ip().is_unspecified())
}
