//! Test support for black-box tests of the real Portcullis binaries: process spawning, a test
//! DNS server, loopback origins, and curl / raw-socket clients.

pub mod control;
pub mod curl;
pub mod dns;
pub mod https_backend;
pub mod origin;
pub mod otlp;
pub mod proxy;
pub mod raw;
pub mod tls_origin;

pub use control::ControlProcess;
pub use curl::{CurlResult, curl};
pub use dns::DnsServer;
pub use otlp::OtlpReceiver;
pub use proxy::{ProxyProcess, run_to_exit};
pub use raw::{RawResponse, raw_request};

/// `GET path` on the admin API; returns the response.
pub fn admin_get(admin: &str, path: &str) -> RawResponse {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    raw_request(admin, req.as_bytes()).unwrap_or_else(|| panic!("admin GET {path}: no response"))
}

/// `POST path` with a JSON body on the admin API.
pub fn admin_post(admin: &str, path: &str, body: &str) -> RawResponse {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    raw_request(admin, req.as_bytes()).unwrap_or_else(|| panic!("admin POST {path}: no response"))
}

/// `GET /blocked` parsed as JSON.
pub fn blocked(admin: &str) -> serde_json::Value {
    let r = admin_get(admin, "/blocked");
    assert_eq!(r.status, 200, "/blocked: {}", r.text());
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("/blocked not JSON ({e}): {}", r.text()))
}

/// The exact §5 message endings.
pub const END_ASK: &str = "Ask the operator to approve it; do not retry through another route.";
/// "no" ending.
pub const END_NO: &str = "Approval is not possible; do not retry through another route.";
/// Message prefix.
pub const PREFIX: &str = "Portcullis blocked this request: ";
