//! Upstream HTTP/1.1 connections: dial a checked address, optional TLS, keep-alive reuse.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use crate::dial::{self, DialError};

/// An upstream connection kept by a client connection for reuse.
pub struct Pooled {
    /// The origin address the connection goes to.
    pub peer: SocketAddr,
    /// The TLS server name, when the connection is TLS.
    pub tls_name: Option<String>,
    /// Request sender of the connection.
    pub sender: SendRequest<Incoming>,
}

impl Pooled {
    /// Whether this connection may carry a request to `port` on one of `addrs` (`policy.md` §4:
    /// reuse only when the peer is among the addresses checked for the current request).
    pub fn fits(&self, addrs: &[IpAddr], port: u16, tls_name: Option<&str>) -> bool {
        self.peer.port() == port
            && addrs.contains(&self.peer.ip())
            && self.tls_name.as_deref() == tls_name
            && !self.sender.is_closed()
    }
}

/// Why an upstream connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TCP connect failed.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// TLS handshake or verification failed.
    #[error("TLS with the origin failed: {0}")]
    Tls(std::io::Error),
    /// The upstream (parent) proxy failed.
    #[error(transparent)]
    Via(#[from] crate::upstream_proxy::ViaError),
    /// HTTP handshake failed.
    #[error("HTTP handshake with the origin failed: {0}")]
    Handshake(hyper::Error),
}

/// Dials one of `addrs` and performs the HTTP/1.1 handshake (TLS first when `tls_name` is set).
pub async fn connect(
    addrs: &[IpAddr],
    port: u16,
    tls_name: Option<&str>,
    tls: &Arc<tokio_rustls::TlsConnector>,
    budget: Duration,
) -> Result<Pooled, UpstreamError> {
    let stream = dial::dial(addrs, port, budget).await?;
    establish(stream, tls_name, tls, budget).await
}

/// TLS (when `tls_name` is set) and the HTTP/1.1 handshake over a connected stream.
pub async fn establish(
    stream: tokio::net::TcpStream,
    tls_name: Option<&str>,
    tls: &Arc<tokio_rustls::TlsConnector>,
    budget: Duration,
) -> Result<Pooled, UpstreamError> {
    let peer = stream
        .peer_addr()
        .map_err(|e| UpstreamError::Dial(DialError::Failed(e)))?;
    let sender = match tls_name {
        None => handshake(TokioIo::new(stream)).await?,
        Some(name) => {
            let server_name = rustls::pki_types::ServerName::try_from(name.to_string())
                .map_err(|e| UpstreamError::Tls(std::io::Error::other(e)))?;
            let tls_stream = tokio::time::timeout(budget, tls.connect(server_name, stream))
                .await
                .map_err(|_| UpstreamError::Tls(std::io::Error::other("TLS handshake timed out")))?
                .map_err(UpstreamError::Tls)?;
            handshake(TokioIo::new(tls_stream)).await?
        }
    };
    Ok(Pooled {
        peer,
        tls_name: tls_name.map(str::to_string),
        sender,
    })
}

async fn handshake<T>(io: T) -> Result<SendRequest<Incoming>, UpstreamError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(UpstreamError::Handshake)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}
