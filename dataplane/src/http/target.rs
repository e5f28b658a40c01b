//! Request-target validation (`http.md` §2, §3 rules 2–3, §6 rules 1–2).
//!
//! Produces the normalised destination or the 400 detail; nothing here consults policy.

use http::{HeaderMap, Method, Request, Version, header};
use portcullis::policy::{Host, normalize_host, split_authority};

/// URI scheme of an absolute-form request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `http://`
    Http,
    /// `https://`
    Https,
    /// `ws://`
    Ws,
    /// `wss://`
    Wss,
}

impl Scheme {
    fn parse(s: &str) -> Option<Scheme> {
        Some(match s.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            "ws" => Scheme::Ws,
            "wss" => Scheme::Wss,
            _ => return None,
        })
    }

    /// Default port of the scheme.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http | Scheme::Ws => 80,
            Scheme::Https | Scheme::Wss => 443,
        }
    }

    /// Whether the origin is reached over TLS.
    pub fn is_tls(self) -> bool {
        matches!(self, Scheme::Https | Scheme::Wss)
    }
}

/// A validated destination.
#[derive(Debug, Clone)]
pub struct Destination {
    /// Normalised host.
    pub host: Host,
    /// Destination port.
    pub port: u16,
    /// Scheme (absolute-form only).
    pub scheme: Option<Scheme>,
}

impl Destination {
    /// The canonical authority forwarded as `Host`: IPv6 bracketed, port only when not default.
    pub fn host_header(&self) -> String {
        let host = bracketed(&self.host);
        match self.scheme {
            Some(s) if s.default_port() == self.port => host,
            _ => format!("{host}:{}", self.port),
        }
    }
}

/// Host text with IPv6 in brackets.
pub fn bracketed(host: &Host) -> String {
    let text = host.to_string();
    if text.contains(':') {
        format!("[{text}]")
    } else {
        text
    }
}

/// Validates a CONNECT target and its optional `Host` header.
pub fn connect_target<B>(req: &Request<B>) -> Result<Destination, &'static str> {
    let authority = req
        .uri()
        .authority()
        .ok_or("CONNECT needs an authority-form target host:port")?;
    if req.uri().scheme().is_some()
        || req
            .uri()
            .path_and_query()
            .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
    {
        return Err("CONNECT needs an authority-form target host:port");
    }
    let raw = authority.as_str();
    if raw.contains('@') {
        return Err("userinfo in the request target is not allowed");
    }
    let (host, port) = split_authority(raw).map_err(|_| "invalid host or port")?;
    let port = port.ok_or("CONNECT target needs a port")?;
    let host = normalize_host(host).map_err(|_| "invalid host")?;
    let dest = Destination {
        host,
        port,
        scheme: None,
    };
    check_host_header(req.headers(), req.version(), &dest, false)?;
    Ok(dest)
}

/// Validates an absolute-form target and its `Host` header.
pub fn absolute_target<B>(req: &Request<B>) -> Result<Destination, &'static str> {
    let uri = req.uri();
    let Some(scheme) = uri.scheme_str() else {
        if *req.method() == Method::CONNECT {
            return Err("invalid CONNECT");
        }
        if uri.authority().is_some() {
            return Err("authority-form is only valid with CONNECT");
        }
        return Err("requests to the proxy itself must use an absolute URI or CONNECT");
    };
    let scheme = Scheme::parse(scheme).ok_or("unsupported scheme")?;
    let authority = uri
        .authority()
        .ok_or("missing host in the request target")?;
    let raw = authority.as_str();
    if raw.contains('@') {
        return Err("userinfo in the request target is not allowed");
    }
    if raw.is_empty() {
        return Err("missing host in the request target");
    }
    let (host, port) = split_authority(raw).map_err(|_| "invalid host or port")?;
    let host = normalize_host(host).map_err(|_| "invalid host")?;
    let dest = Destination {
        host,
        port: port.unwrap_or(scheme.default_port()),
        scheme: Some(scheme),
    };
    check_host_header(req.headers(), req.version(), &dest, true)?;
    Ok(dest)
}

/// `http.md` §3 rule 3 and §6 rule 2.
fn check_host_header(
    headers: &HeaderMap,
    version: Version,
    dest: &Destination,
    required: bool,
) -> Result<(), &'static str> {
    let mut values = headers.get_all(header::HOST).iter();
    let Some(value) = values.next() else {
        if required && version != Version::HTTP_10 {
            return Err("missing Host header");
        }
        return Ok(());
    };
    if values.next().is_some() {
        return Err("several Host headers");
    }
    const MISMATCH: &str = "Host header does not match request target";
    let text = value.to_str().map_err(|_| MISMATCH)?;
    let (host, port) = split_authority(text).map_err(|_| MISMATCH)?;
    let host = normalize_host(host).map_err(|_| MISMATCH)?;
    if host != dest.host {
        return Err(MISMATCH);
    }
    match (port, dest.scheme) {
        (Some(p), _) if p != dest.port => Err(MISMATCH),
        (None, Some(s)) if s.default_port() != dest.port => Err(MISMATCH),
        _ => Ok(()),
    }
}
