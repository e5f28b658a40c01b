//! The upstream (parent) proxy of `http.md` §7: taken from this process's environment at
//! startup, used only after policy allowed the request, and given the name (not an address).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::HeaderValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use portcullis::policy::Host;

/// One upstream proxy (`http://host:port`, optional userinfo → Basic credentials).
#[derive(Debug, Clone)]
pub struct ProxyTarget {
    /// Host name or IP of the upstream proxy.
    pub host: String,
    /// Port.
    pub port: u16,
    /// `Proxy-Authorization` value from userinfo.
    pub auth: Option<HeaderValue>,
}

impl ProxyTarget {
    /// `host:port` for logs.
    pub fn display(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// One `NO_PROXY` entry.
#[derive(Debug, Clone)]
enum NoProxyEntry {
    All,
    Name {
        suffix: String,
        port: Option<u16>,
    },
    Net {
        net: IpAddr,
        prefix: u8,
        port: Option<u16>,
    },
}

/// The upstream proxies this process was started with.
#[derive(Debug, Clone, Default)]
pub struct UpstreamProxies {
    http: Option<ProxyTarget>,
    secure: Option<ProxyTarget>,
    no_proxy: Vec<NoProxyEntry>,
}

impl UpstreamProxies {
    /// Reads `HTTP(S)_PROXY`, `ALL_PROXY` and `NO_PROXY` (upper case first) through `env`.
    /// Unusable values and upstreams that are this proxy itself are ignored with a WARN.
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>, own: &[SocketAddr]) -> UpstreamProxies {
        fn pick(
            env: &dyn Fn(&str) -> Option<String>,
            names: &[&'static str],
        ) -> Option<(&'static str, String)> {
            names
                .iter()
                .find_map(|n| env(n).filter(|v| !v.trim().is_empty()).map(|v| (*n, v)))
        }
        let all = ["ALL_PROXY", "all_proxy"];
        let load = |names: &[&'static str]| {
            let (name, value) = pick(env, names).or_else(|| pick(env, &all))?;
            match parse_proxy_url(value.trim()) {
                Some(t) if is_self(&t, own) => {
                    tracing::warn!("{name} points at this proxy itself; ignoring it (loop)");
                    None
                }
                Some(t) => Some(t),
                None => {
                    tracing::warn!(
                        "{name} is not an http://host:port URL; ignoring it (direct connections)"
                    );
                    None
                }
            }
        };
        let no_proxy = pick(env, &["NO_PROXY", "no_proxy"])
            .map(|(_, v)| parse_no_proxy(&v))
            .unwrap_or_default();
        UpstreamProxies {
            http: load(&["HTTP_PROXY", "http_proxy"]),
            secure: load(&["HTTPS_PROXY", "https_proxy"]),
            no_proxy,
        }
    }

    /// The upstream for a target: `secure` for https/wss, CONNECT and SOCKS5 TCP.
    pub fn route(&self, secure: bool, host: &Host, port: u16) -> Option<&ProxyTarget> {
        let target = if secure {
            self.secure.as_ref()
        } else {
            self.http.as_ref()
        }?;
        if self.bypass(host, port) {
            return None;
        }
        Some(target)
    }

    fn bypass(&self, host: &Host, port: u16) -> bool {
        self.no_proxy.iter().any(|e| match e {
            NoProxyEntry::All => true,
            NoProxyEntry::Name { suffix, port: p } => {
                p.is_none_or(|p| p == port)
                    && host
                        .as_name()
                        .is_some_and(|n| n == suffix || n.ends_with(&format!(".{suffix}")))
            }
            NoProxyEntry::Net {
                net,
                prefix,
                port: p,
            } => {
                p.is_none_or(|p| p == port)
                    && host.as_ip().is_some_and(|ip| in_net(ip, *net, *prefix))
            }
        })
    }
}

fn is_self(t: &ProxyTarget, own: &[SocketAddr]) -> bool {
    let host = t.host.trim_start_matches('[').trim_end_matches(']');
    let ip = if host.eq_ignore_ascii_case("localhost") {
        Some(IpAddr::from([127, 0, 0, 1]))
    } else {
        host.parse::<IpAddr>().ok()
    };
    own.iter().any(|a| {
        a.port() == t.port
            && ip.is_some_and(|ip| ip == a.ip() || (a.ip().is_unspecified() && ip.is_loopback()))
    })
}

fn in_net(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix.min(32))
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix.min(128))
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// `http://[user:pass@]host[:port][/]`; anything else → None.
fn parse_proxy_url(v: &str) -> Option<ProxyTarget> {
    let rest = v
        .strip_prefix("http://")
        .or_else(|| v.strip_prefix("HTTP://"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#']) {
        return None;
    }
    let (userinfo, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let (host, port) = if let Some(end) = hostport.strip_prefix('[').and_then(|h| h.find(']')) {
        let host = &hostport[..end + 2];
        let port = match &hostport[end + 2..] {
            "" => 80,
            p => p.strip_prefix(':')?.parse().ok()?,
        };
        (host.to_string(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().ok()?),
            None => (hostport.to_string(), 80),
        }
    };
    if host.is_empty() || port == 0 {
        return None;
    }
    let auth = userinfo
        .and_then(|u| HeaderValue::from_str(&format!("Basic {}", base64(u.as_bytes()))).ok());
    Some(ProxyTarget { host, port, auth })
}

fn parse_no_proxy(v: &str) -> Vec<NoProxyEntry> {
    v.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .filter_map(|e| {
            if e == "*" {
                return Some(NoProxyEntry::All);
            }
            let (body, port) = split_port(e);
            if let Some((net, prefix)) = body.split_once('/') {
                let net: IpAddr = net.trim_matches(['[', ']']).parse().ok()?;
                return Some(NoProxyEntry::Net {
                    net,
                    prefix: prefix.parse().ok()?,
                    port,
                });
            }
            if let Ok(ip) = body.trim_matches(['[', ']']).parse::<IpAddr>() {
                let prefix = if ip.is_ipv4() { 32 } else { 128 };
                return Some(NoProxyEntry::Net {
                    net: ip,
                    prefix,
                    port,
                });
            }
            let name = body.trim_start_matches("*.").trim_start_matches('.');
            Some(NoProxyEntry::Name {
                suffix: name.trim_end_matches('.').to_ascii_lowercase(),
                port,
            })
        })
        .collect()
}

fn split_port(e: &str) -> (&str, Option<u16>) {
    if e.starts_with('[') {
        if let Some(end) = e.find(']')
            && let Some(p) = e[end + 1..].strip_prefix(':')
        {
            return (&e[..=end], p.parse().ok());
        }
        return (e, None);
    }
    match e.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse().ok()),
        _ => (e, None),
    }
}

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// Why a tunnel through the upstream proxy could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ViaError {
    /// Connecting to the upstream proxy failed.
    #[error("upstream proxy {0} unreachable: {1}")]
    Connect(String, std::io::Error),
    /// The budget ran out.
    #[error("upstream proxy {0} timed out")]
    Timeout(String),
    /// The upstream proxy refused the CONNECT.
    #[error("upstream proxy {0} refused CONNECT with status {1}")]
    Refused(String, u16),
    /// The upstream answer was not HTTP.
    #[error("upstream proxy {0} sent an invalid answer")]
    Invalid(String),
}

/// Connects to the upstream proxy itself.
pub async fn connect_proxy(p: &ProxyTarget, budget: Duration) -> Result<TcpStream, ViaError> {
    let host = p.host.trim_start_matches('[').trim_end_matches(']');
    match tokio::time::timeout(budget, TcpStream::connect((host, p.port))).await {
        Err(_) => Err(ViaError::Timeout(p.display())),
        Ok(Err(e)) => Err(ViaError::Connect(p.display(), e)),
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
    }
}

/// Opens `CONNECT host:port` through the upstream proxy; the stream then carries the tunnel.
pub async fn connect_via(
    p: &ProxyTarget,
    authority: &str,
    budget: Duration,
) -> Result<TcpStream, ViaError> {
    let work = async {
        let mut s = connect_proxy(p, budget).await?;
        let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some(a) = &p.auth
            && let Ok(a) = a.to_str()
        {
            req.push_str(&format!("Proxy-Authorization: {a}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| ViaError::Connect(p.display(), e))?;
        // Read the answer head byte by byte so no tunnel byte is consumed.
        let mut head = Vec::with_capacity(256);
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() > 16 * 1024 {
                return Err(ViaError::Invalid(p.display()));
            }
            let n = s
                .read(&mut byte)
                .await
                .map_err(|e| ViaError::Connect(p.display(), e))?;
            if n == 0 {
                return Err(ViaError::Invalid(p.display()));
            }
            head.push(byte[0]);
        }
        let status = head
            .split(|b| *b == b' ')
            .nth(1)
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| ViaError::Invalid(p.display()))?;
        if !(200..300).contains(&status) {
            return Err(ViaError::Refused(p.display(), status));
        }
        Ok(s)
    };
    match tokio::time::timeout(budget, work).await {
        Ok(r) => r,
        Err(_) => Err(ViaError::Timeout(p.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis::policy::normalize_host;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn parses_environment_and_no_proxy() {
        let u = UpstreamProxies::from_env(
            &env(&[
                ("HTTP_PROXY", "http://user:pw@127.0.0.9:3128"),
                ("https_proxy", "http://127.0.0.9:3129/"),
                (
                    "NO_PROXY",
                    "internal.test, .corp.test,10.0.0.0/8,127.0.0.5:8080",
                ),
            ]),
            &[],
        );
        let h = |s| normalize_host(s).unwrap();
        let http = u.route(false, &h("example.com"), 80).unwrap();
        assert_eq!(http.port, 3128);
        assert_eq!(http.auth.as_ref().unwrap(), "Basic dXNlcjpwdw==");
        assert_eq!(u.route(true, &h("example.com"), 443).unwrap().port, 3129);
        assert!(u.route(false, &h("a.internal.test"), 80).is_none());
        assert!(u.route(false, &h("x.corp.test"), 80).is_none());
        assert!(u.route(false, &h("10.1.2.3"), 80).is_none());
        assert!(u.route(false, &h("127.0.0.5"), 8080).is_none());
        assert!(u.route(false, &h("127.0.0.5"), 8081).is_some());
    }

    #[test]
    fn ignores_bad_schemes_and_self() {
        let own: [SocketAddr; 1] = ["127.0.0.1:3128".parse().unwrap()];
        let u = UpstreamProxies::from_env(
            &env(&[
                ("HTTPS_PROXY", "socks5://127.0.0.9:1"),
                ("HTTP_PROXY", "http://127.0.0.1:3128"),
            ]),
            &own,
        );
        let h = normalize_host("example.com").unwrap();
        assert!(u.route(true, &h, 443).is_none());
        assert!(u.route(false, &h, 80).is_none());
        let u = UpstreamProxies::from_env(&env(&[("ALL_PROXY", "http://127.0.0.9:1")]), &[]);
        assert!(u.route(true, &h, 443).is_some());
    }
}
