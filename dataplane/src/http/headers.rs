//! Hop-by-hop and proxy header handling (`http.md` §4 rule 3 and 5).

use http::HeaderMap;
use http::header::{self, HeaderName};

/// Headers that never cross the proxy, beyond those named by `Connection`. Names, not strings:
/// removing by `&str` parses and hashes the text on every request.
static HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static(UNIX_SOCKET_HEADER),
];

const UNIX_SOCKET_HEADER: &str = "x-unix-socket";

/// The header that asks for unix-socket forwarding (`unix-sockets.md`); never forwarded.
pub static X_UNIX_SOCKET: HeaderName = HeaderName::from_static(UNIX_SOCKET_HEADER);

/// Set by the proxy on its own refusals; an origin must not be able to forge it.
static X_PROXY_ERROR: HeaderName = HeaderName::from_static("x-proxy-error");

/// Whether `Connection` names `upgrade` and `Upgrade` lists `websocket`.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    connection_has(headers, "upgrade")
        && headers.get_all(header::UPGRADE).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
            })
        })
}

/// Whether the request carries any `Upgrade` header (limited mode refuses it).
pub fn has_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Removes hop-by-hop headers, the headers `Connection` names, and `x-portcullis-*`.
/// With `keep_websocket`, the upgrade pair is re-added as `Connection: upgrade`,
/// `Upgrade: websocket`.
pub fn strip_request(headers: &mut HeaderMap, keep_websocket: bool) {
    strip_common(headers);
    if keep_websocket {
        headers.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("upgrade"),
        );
        headers.insert(
            header::UPGRADE,
            header::HeaderValue::from_static("websocket"),
        );
    }
}

/// Removes hop-by-hop headers and every header an origin could use to forge a block.
pub fn strip_response(headers: &mut HeaderMap) {
    strip_common(headers);
    headers.remove(&X_PROXY_ERROR);
}

fn strip_common(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    let portcullis: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-portcullis-"))
        .cloned()
        .collect();
    for name in portcullis {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn strips_hop_by_hop_and_named() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("x-portcullis-decision-id", HeaderValue::from_static("x"));
        h.insert("authorization", HeaderValue::from_static("Bearer y"));
        strip_request(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("authorization"));
    }

    #[test]
    fn response_cannot_forge_block() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-proxy-error",
            HeaderValue::from_static("blocked-by-denylist"),
        );
        h.insert("x-portcullis-decision-id", HeaderValue::from_static("x"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        strip_response(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn websocket_detection() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert("upgrade", HeaderValue::from_static("WebSocket"));
        assert!(is_websocket_upgrade(&h));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        assert!(!is_websocket_upgrade(&h));
    }
}
