//! Raw-socket HTTP helpers.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

/// Connects with generous timeouts.
pub fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// A parsed response head plus the body read so far.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// Header fields (names lower-cased).
    pub headers: Vec<(String, String)>,
    /// Body (by Content-Length when present).
    pub body: Vec<u8>,
}

impl RawResponse {
    /// First value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
    /// Body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response (head plus `Content-Length` body) from `s`; `None` when the connection
/// closes before a complete head. Bounded by 20 s.
pub fn read_response(s: &mut TcpStream) -> Option<RawResponse> {
    read_response_opts(s, false)
}

/// As [`read_response`]; with `head_only` no body is read (HEAD, CONNECT 200, 101).
pub fn read_response_opts(s: &mut TcpStream, head_only: bool) -> Option<RawResponse> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if Instant::now() > deadline || buf.len() > 1 << 20 {
            return None;
        }
        match s.read(&mut byte) {
            Ok(0) | Err(_) => return None,
            Ok(_) => buf.push(byte[0]),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    let mut resp = RawResponse {
        status,
        headers,
        body: Vec::new(),
    };
    if !head_only
        && let Some(len) = resp
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
    {
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).ok()?;
        resp.body = body;
    }
    Some(resp)
}

/// Sends `request` bytes on a new connection to `addr` and reads one response.
pub fn raw_request(addr: &str, request: &[u8]) -> Option<RawResponse> {
    let mut s = connect(addr);
    s.write_all(request).ok()?;
    read_response(&mut s)
}

/// Reads until EOF (bounded by 20 s and 256 MiB).
pub fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    while Instant::now() < deadline && out.len() < 256 << 20 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

/// Half-closes the write side.
pub fn shutdown_write(s: &TcpStream) {
    let _ = s.shutdown(Shutdown::Write);
}
