//! Turns a Decision or a non-policy error into an HTTP response. No handler builds one by hand.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use portcullis::decision::{Decision, ProxyError, accepts_json, error_body};

/// The body type every proxy response uses.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// A body with fixed contents.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Whether the request asked for JSON (`decisions.md` §3).
pub fn wants_json(headers: &HeaderMap) -> bool {
    accepts_json(headers.get_all(header::ACCEPT).iter().map(|v| v.as_bytes()))
}

/// How the response should be framed for this request.
#[derive(Clone, Copy, Debug)]
pub struct RenderOpts {
    /// `Accept: application/json` seen.
    pub json: bool,
    /// HEAD request: headers only.
    pub head: bool,
    /// The request body was not fully received: close the connection after answering.
    pub close: bool,
}

/// The Decision response (403, or 503 for `proxy_disabled`) of `decisions.md` §3.
pub fn decision_response(d: &Decision, opts: RenderOpts) -> Response<Body> {
    let body = if opts.json {
        d.json_body()
    } else {
        d.text_body()
    };
    let id = d.id.hyphenated().to_string();
    framed(
        d.reason.http_status(),
        d.reason.proxy_error(),
        Some(&id),
        body,
        opts,
    )
}

/// A response that is not a Decision (`decisions.md` §4): no decision id, no prefix line.
pub fn error_response(err: ProxyError, detail: &str, opts: RenderOpts) -> Response<Body> {
    let body = error_body(err.as_str(), detail, opts.json);
    framed(err.status(), err.as_str(), None, body, opts)
}

/// The headers both kinds of answer share (`decisions.md` §3).
fn framed(
    status: u16,
    proxy_error: &str,
    decision_id: Option<&str>,
    body: String,
    opts: RenderOpts,
) -> Response<Body> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
    let mut builder = Response::builder()
        .status(status)
        .header("x-proxy-error", proxy_error);
    if let Some(id) = decision_id {
        builder = builder.header("x-portcullis-decision-id", id);
    }
    builder = builder
        .header(header::CONTENT_TYPE, content_type(opts.json))
        .header(header::CONTENT_LENGTH, body.len())
        .header(header::CACHE_CONTROL, "no-store");
    if opts.close {
        builder = builder.header(header::CONNECTION, "close");
    }
    let body = if opts.head { empty() } else { full(body) };
    builder.body(body).unwrap_or_else(|_| fallback())
}

/// A bare status with no body (e.g. 408, 505), closing the connection.
pub fn bare(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(empty());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn content_type(json: bool) -> &'static str {
    if json {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    }
}

/// Only reached if a header value failed to build, which our fixed values cannot do.
fn fallback() -> Response<Body> {
    let mut r = Response::new(empty());
    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    r
}
