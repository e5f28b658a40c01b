//! Dial only the addresses policy checked, in resolver order, within one overall budget.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

/// Why no connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The connect budget ran out.
    #[error("connect timed out after {0} ms")]
    Timeout(u64),
    /// Every address refused or failed; the last error is kept.
    #[error("{0}")]
    Failed(io::Error),
    /// No address to dial (cannot happen after a successful resolution; kept for safety).
    #[error("no address to connect to")]
    NoAddress,
}

impl DialError {
    /// The SOCKS5 reply code this failure maps to (`decisions.md` §6).
    pub fn socks_code(&self) -> u8 {
        match self {
            DialError::Timeout(_) => 0x06,
            DialError::NoAddress => 0x04,
            DialError::Failed(e) => match e.kind() {
                io::ErrorKind::ConnectionRefused => 0x05,
                io::ErrorKind::NetworkUnreachable => 0x03,
                io::ErrorKind::HostUnreachable => 0x04,
                _ => 0x01,
            },
        }
    }
}

/// Connects to the first of `addrs` (with `port`) that accepts, all attempts sharing `budget`.
pub async fn dial(addrs: &[IpAddr], port: u16, budget: Duration) -> Result<TcpStream, DialError> {
    let attempt = async {
        let mut last = None;
        for ip in addrs {
            match TcpStream::connect(SocketAddr::new(*ip, port)).await {
                Ok(stream) => {
                    // Interactive protocols through the proxy must not wait on Nagle.
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) => DialError::Failed(e),
            None => DialError::NoAddress,
        })
    };
    match tokio::time::timeout(budget, attempt).await {
        Ok(r) => r,
        Err(_) => Err(DialError::Timeout(budget.as_millis() as u64)),
    }
}
