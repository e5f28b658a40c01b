//! Admin API on the loopback admin listener (`http.md` §10).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::app::App;
use crate::http::respond::{Body, full};

/// Request bodies larger than this are refused with 413.
const MAX_BODY: usize = 8 * 1024;

/// Serves one admin connection.
pub async fn serve_connection(
    app: Arc<App>,
    stream: TcpStream,
    _peer: SocketAddr,
    _guard: crate::listeners::ConnGuard,
) {
    let settings = app.shared().settings();
    let service = service_fn(move |req| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(route(&app, req).await) }
    });
    let _ = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes.max(8192))
        .max_header_size(settings.max_header_bytes)
        .max_headers(settings.max_headers)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn route(app: &App, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let allowed: &str = match path.as_str() {
        "/health" | "/config" | "/patterns" | "/blocked" | "/metrics" => "GET, HEAD",
        "/mode" | "/reload" => "POST",
        _ => return error(StatusCode::NOT_FOUND, "not found"),
    };
    if !allowed.split(", ").any(|m| m == method.as_str()) {
        let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        if let Ok(v) = header::HeaderValue::from_str(allowed) {
            r.headers_mut().insert(header::ALLOW, v);
        }
        return r;
    }
    if path != "/health" && !app.admin_authorized(req.headers()) {
        let mut r = error(StatusCode::UNAUTHORIZED, "unauthorized");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    match (method, path.as_str()) {
        (_, "/health") => text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into()),
        (_, "/config") => json(StatusCode::OK, app.config_json()),
        (_, "/patterns") => json(StatusCode::OK, app.patterns_json()),
        (_, "/blocked") => json(StatusCode::OK, app.shared().reporter().blocked_json()),
        (_, "/metrics") => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            app.shared().metrics().render_prometheus(),
        ),
        (_, "/mode") => {
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            set_mode(app, &body)
        }
        (_, "/reload") => match app.reload().await {
            Ok(()) => json(StatusCode::OK, "{\"status\":\"reloaded\"}".into()),
            Err(crate::app::ReloadError::InProgress) => {
                error(StatusCode::CONFLICT, "reload in progress")
            }
            Err(crate::app::ReloadError::Invalid(msg)) => {
                error(StatusCode::UNPROCESSABLE_ENTITY, &msg)
            }
        },
        _ => error(StatusCode::NOT_FOUND, "not found"),
    }
}

fn set_mode(app: &App, body: &[u8]) -> Response<Body> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return error(StatusCode::BAD_REQUEST, "missing body");
    }
    let Ok(serde_json::Value::Object(obj)) = serde_json::from_slice::<serde_json::Value>(body)
    else {
        return error(StatusCode::BAD_REQUEST, "invalid json");
    };
    let Some(mode) = obj.get("mode").and_then(|m| m.as_str()) else {
        return error(StatusCode::BAD_REQUEST, "invalid json");
    };
    let limited = match mode {
        "full" => false,
        "limited" => true,
        _ => return error(StatusCode::BAD_REQUEST, "invalid mode"),
    };
    match app.set_mode(limited) {
        Ok(()) => json(
            StatusCode::OK,
            format!("{{\"status\":\"ok\",\"mode\":\"{mode}\"}}"),
        ),
        Err(msg) => error(StatusCode::CONFLICT, &msg),
    }
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(error(StatusCode::PAYLOAD_TOO_LARGE, "body too large"))
        }
        Err(_) => Err(error(StatusCode::BAD_REQUEST, "invalid body")),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    text(status, "application/json", body)
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({"status": "error", "error": message}).to_string();
    json(status, body)
}
