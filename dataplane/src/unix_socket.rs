//! `x-unix-socket` forwarding (`unix-sockets.md`): its own allowlist, checked in the order of
//! §2, then the request is forwarded to the canonical path that was checked.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use portcullis::config::Mode;
use portcullis::decision::{
    Decision, MessageKind, MessageTarget, Protocol, ProxyError, Reason, Source, Verdict,
    new_decision_id, render_message,
};
use tokio::net::UnixStream;

use crate::http::ConnCtx;
use crate::http::headers;
use crate::http::respond::{self, Body, RenderOpts};

/// Longest accepted header value.
const MAX_PATH_BYTES: usize = 4096;

/// The unix-socket lists of one policy version.
#[derive(Debug, Clone, Default)]
pub struct UnixPolicy {
    /// `dangerously_allow_all_unix_sockets`.
    pub allow_all: bool,
    /// Allowed paths as configured.
    pub allow: Vec<PathBuf>,
    /// Denied paths as configured (map form).
    pub deny: Vec<PathBuf>,
}

/// What the allowlist answered.
#[derive(Debug, PartialEq, Eq)]
enum Verdict2 {
    /// Allowed: dial this canonical path (absent when canonicalisation failed).
    Allow(Option<PathBuf>, String),
    /// Matched a deny entry.
    Denied(String),
    /// Not in the allowlist.
    NotAllowed,
}

impl UnixPolicy {
    /// `unix-sockets.md` §3. `path` is absolute.
    fn check(&self, path: &Path) -> Verdict2 {
        let canonical = std::fs::canonicalize(path).ok();
        let same = |entry: &Path| {
            entry == path
                || canonical
                    .as_deref()
                    .is_some_and(|c| std::fs::canonicalize(entry).map_or(entry == c, |ec| ec == c))
        };
        if let Some(d) = self.deny.iter().find(|d| same(d)) {
            return Verdict2::Denied(d.display().to_string());
        }
        if self.allow_all {
            return Verdict2::Allow(canonical, "*".into());
        }
        if let Some(a) = self.allow.iter().find(|a| a.as_path() == path) {
            return Verdict2::Allow(canonical, a.display().to_string());
        }
        if let Some(c) = &canonical
            && let Some(a) = self
                .allow
                .iter()
                .find(|a| std::fs::canonicalize(a).is_ok_and(|ac| &ac == c))
        {
            return Verdict2::Allow(canonical.clone(), a.display().to_string());
        }
        Verdict2::NotAllowed
    }
}

/// Handles a request that carries `x-unix-socket`.
pub async fn handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
    mut opts: RenderOpts,
) -> Response<Body> {
    opts.close = !req.body().is_end_stream();
    let mut values = req
        .headers()
        .get_all(&crate::http::headers::X_UNIX_SOCKET)
        .iter();
    let path = match (values.next(), values.next()) {
        (Some(v), None) => match std::str::from_utf8(v.as_bytes()) {
            Ok(s) if !s.is_empty() && s.len() <= MAX_PATH_BYTES && !s.contains('\0') => {
                s.to_string()
            }
            _ => return invalid(&ctx, opts, "invalid x-unix-socket header"),
        },
        _ => return invalid(&ctx, opts, "invalid x-unix-socket header"),
    };
    if req.method() == Method::CONNECT {
        return invalid(&ctx, opts, "x-unix-socket cannot be used with CONNECT");
    }
    ctx.shared.metrics().request(Protocol::UnixSocket);
    let rt = ctx.shared.runtime();
    let method = req.method().as_str().to_string();
    let refuse = |reason: Reason, source: Source, kind: MessageKind, rule: Option<String>| {
        let d = unix_decision(
            &ctx,
            Verdict::Deny,
            reason,
            source,
            Some(kind),
            &method,
            &path,
            rule,
        );
        let d = ctx.shared.reporter().report(d);
        respond::decision_response(&d, opts)
    };
    if !rt.config.network.enabled {
        return refuse(
            Reason::ProxyDisabled,
            Source::ProxyState,
            MessageKind::ProxyDisabled,
            None,
        );
    }
    if rt.mode() == Mode::Limited
        && (!matches!(
            req.method(),
            &Method::GET | &Method::HEAD | &Method::OPTIONS
        ) || headers::has_upgrade(req.headers()))
    {
        let kind = if headers::has_upgrade(req.headers()) {
            MessageKind::UpgradeNotAllowed
        } else {
            MessageKind::MethodNotAllowed
        };
        return refuse(Reason::MethodNotAllowed, Source::ModeGuard, kind, None);
    }
    if !path.starts_with('/') {
        return refuse(
            Reason::NotAllowed,
            Source::BaselinePolicy,
            MessageKind::UnixRelative,
            None,
        );
    }
    let dial_path = match rt.unix.check(Path::new(&path)) {
        Verdict2::Denied(rule) => {
            return refuse(
                Reason::Denied,
                Source::BaselinePolicy,
                MessageKind::UnixDenied,
                Some(rule),
            );
        }
        Verdict2::NotAllowed => {
            return refuse(
                Reason::NotAllowed,
                Source::BaselinePolicy,
                MessageKind::UnixNotAllowed,
                None,
            );
        }
        Verdict2::Allow(canonical, rule) => {
            let d = unix_decision(
                &ctx,
                Verdict::Allow,
                Reason::Allow,
                Source::BaselinePolicy,
                None,
                &method,
                &path,
                Some(rule),
            );
            ctx.shared.reporter().report(d);
            canonical
        }
    };
    opts.close = false;
    let Some(dial_path) = dial_path else {
        return respond::error_response(
            ProxyError::UpstreamConnectFailed,
            "unix socket connect failed: No such file or directory (os error 2)",
            opts,
        );
    };
    forward(ctx, req, dial_path, opts).await
}

fn invalid(ctx: &ConnCtx, mut opts: RenderOpts, detail: &str) -> Response<Body> {
    ctx.shared.metrics().bad_request("unix_socket");
    opts.close = true;
    respond::error_response(ProxyError::InvalidRequest, detail, opts)
}

#[allow(clippy::too_many_arguments)]
fn unix_decision(
    ctx: &ConnCtx,
    verdict: Verdict,
    reason: Reason,
    source: Source,
    kind: Option<MessageKind>,
    method: &str,
    path: &str,
    rule: Option<String>,
) -> Decision {
    let message = kind.map(|k| {
        render_message(
            k,
            &MessageTarget {
                host: "unix-socket",
                port: 0,
                method: Some(method),
                address: None,
                socket_path: Some(path),
            },
        )
    });
    Decision {
        decision: verdict,
        reason,
        source,
        protocol: Protocol::UnixSocket,
        host: "unix-socket".into(),
        port: 0,
        id: new_decision_id(),
        timestamp: SystemTime::now(),
        method: Some(method.to_string()),
        client_address: Some(ctx.peer.ip()),
        client_port: Some(ctx.peer.port()),
        override_: false,
        ask_id: None,
        rule,
        address: None,
        socket_path: Some(path.to_string()),
        message,
        origin: ctx.shared.origin().clone(),
    }
}

async fn forward(
    ctx: Arc<ConnCtx>,
    mut req: Request<Incoming>,
    path: PathBuf,
    opts: RenderOpts,
) -> Response<Body> {
    let settings = ctx.shared.settings();
    let stream =
        match tokio::time::timeout(settings.connect_timeout, UnixStream::connect(&path)).await {
            Err(_) => {
                return respond::error_response(
                    ProxyError::UpstreamTimeout,
                    "unix socket connect timed out",
                    opts,
                );
            }
            Ok(Err(e)) => {
                return respond::error_response(
                    ProxyError::UpstreamConnectFailed,
                    &format!("unix socket connect failed: {e}"),
                    opts,
                );
            }
            Ok(Ok(s)) => s,
        };
    let upgrade = headers::has_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // Host: as sent; else the absolute-form URI's host; else localhost.
    if !parts.headers.contains_key(header::HOST) {
        let host = parts.uri.host().unwrap_or("localhost").to_string();
        if let Ok(v) = HeaderValue::from_str(&host) {
            parts.headers.insert(header::HOST, v);
        }
    }
    let upgrade_value = parts.headers.get(header::UPGRADE).cloned();
    headers::strip_request(&mut parts.headers, false);
    if let Some(v) = upgrade_value {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, v);
    }
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| !p.is_empty())
        .unwrap_or("/");
    parts.uri = match target.parse::<Uri>() {
        Ok(u) => u,
        Err(_) => {
            return respond::error_response(
                ProxyError::InvalidRequest,
                "invalid request target",
                opts,
            );
        }
    };
    parts.version = Version::HTTP_11;
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(x) => x,
        Err(e) => return respond::error_response(ProxyError::UpstreamFailed, &e.to_string(), opts),
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut resp = match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => {
            return respond::error_response(
                ProxyError::UpstreamFailed,
                &format!("no valid response from the unix socket: {e}"),
                opts,
            );
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        return crate::http::forward::switch_protocols(
            &ctx,
            resp,
            client_upgrade,
            Protocol::UnixSocket,
        );
    }
    headers::strip_response(resp.headers_mut());
    resp.map(|b| b.boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_beats_allow_all_and_canonical_matching() {
        let dir = std::env::temp_dir().join(format!("pc-unix-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("x")).unwrap();
        let real = dir.join("app.sock");
        std::fs::write(&real, b"").unwrap();
        let link = dir.join("link.sock");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let p = UnixPolicy {
            allow_all: false,
            allow: vec![real.clone()],
            deny: vec![],
        };
        let canon = std::fs::canonicalize(&real).ok();
        assert!(matches!(p.check(&link), Verdict2::Allow(c, _) if c == canon));
        assert!(matches!(
            p.check(&dir.join("x/../app.sock")),
            Verdict2::Allow(..)
        ));
        assert_eq!(p.check(&dir.join("other.sock")), Verdict2::NotAllowed);
        let p = UnixPolicy {
            allow_all: true,
            allow: vec![],
            deny: vec![real.clone()],
        };
        assert!(matches!(p.check(&link), Verdict2::Denied(_)));
        assert!(matches!(
            p.check(&dir.join("other.sock")),
            Verdict2::Allow(None, _)
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
