//! Responses that are not Decisions (`decisions.md` §4).

use super::render::push_json_str;

/// The `x-proxy-error` values of non-decision error responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyError {
    /// 400 `invalid-request`.
    InvalidRequest,
    /// 405 `invalid-request`: CONNECT inside a MITM tunnel.
    ConnectInTunnel,
    /// 501 `unix-sockets-unsupported`.
    UnixSocketsUnsupported,
    /// 502 `upstream-connect-failed`.
    UpstreamConnectFailed,
    /// 502 `upstream-tls-failed`.
    UpstreamTlsFailed,
    /// 502 `upstream-failed`.
    UpstreamFailed,
    /// 503 `too-many-connections`.
    TooManyConnections,
    /// 504 `upstream-timeout`.
    UpstreamTimeout,
}

impl ProxyError {
    /// The `x-proxy-error` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyError::InvalidRequest | ProxyError::ConnectInTunnel => "invalid-request",
            ProxyError::UnixSocketsUnsupported => "unix-sockets-unsupported",
            ProxyError::UpstreamConnectFailed => "upstream-connect-failed",
            ProxyError::UpstreamTlsFailed => "upstream-tls-failed",
            ProxyError::UpstreamFailed => "upstream-failed",
            ProxyError::TooManyConnections => "too-many-connections",
            ProxyError::UpstreamTimeout => "upstream-timeout",
        }
    }

    /// HTTP status.
    pub fn status(self) -> u16 {
        match self {
            ProxyError::InvalidRequest => 400,
            ProxyError::ConnectInTunnel => 405,
            ProxyError::UnixSocketsUnsupported => 501,
            ProxyError::UpstreamConnectFailed
            | ProxyError::UpstreamTlsFailed
            | ProxyError::UpstreamFailed => 502,
            ProxyError::TooManyConnections => 503,
            ProxyError::UpstreamTimeout => 504,
        }
    }

    /// The body for this error ([`error_body`]).
    pub fn body(self, detail: &str, json: bool) -> String {
        error_body(self.as_str(), detail, json)
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Body of a non-decision error: `<x-proxy-error>: <detail>\n` (control characters in `detail`
/// become spaces so it stays one line), or with `json`
/// `{"status":"error","error":"<x-proxy-error>","message":"<detail>"}\n`.
pub fn error_body(proxy_error: &str, detail: &str, json: bool) -> String {
    let mut out = String::with_capacity(48 + proxy_error.len() + detail.len());
    if json {
        out.push_str(r#"{"status":"error","error":"#);
        push_json_str(&mut out, proxy_error);
        out.push_str(r#","message":"#);
        push_json_str(&mut out, detail);
        out.push_str("}\n");
    } else {
        out.push_str(proxy_error);
        out.push_str(": ");
        out.extend(detail.chars().map(|c| if c.is_control() { ' ' } else { c }));
        out.push('\n');
    }
    out
}
