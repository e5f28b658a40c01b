//! The client-side TLS handshake of an intercepted stream: read the ClientHello (bounded in
//! size and time), refuse an SNI that differs from the CONNECT host with `unrecognized_name`,
//! then finish the handshake with the host's leaf.

use std::sync::Arc;
use std::time::Duration;

use portcullis::policy::{Host, normalize_host};
use rustls::ServerConfig;
use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::StartHandshake;
use tokio_rustls::server::TlsStream;

/// Most bytes read before a complete ClientHello (an oversized handshake fails the connection).
pub const MAX_HELLO_BYTES: usize = 64 * 1024;

/// A fatal `unrecognized_name` alert record (TLS 1.2 record layer, level 2, description 112).
const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

/// Why the client handshake failed; each fails only this connection.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client's SNI names another host than the CONNECT target.
    #[error("client SNI {sni:?} differs from the CONNECT host {host}")]
    SniMismatch {
        /// What the client sent.
        sni: String,
        /// The CONNECT host.
        host: String,
    },
    /// More than [`MAX_HELLO_BYTES`] without a complete ClientHello.
    #[error("ClientHello larger than {MAX_HELLO_BYTES} bytes")]
    Oversized,
    /// No complete handshake in time.
    #[error("TLS handshake timed out")]
    Timeout,
    /// The client closed before the handshake completed.
    #[error("client closed the connection during the TLS handshake")]
    Closed,
    /// Not TLS, or a TLS protocol error.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// Reading or writing failed.
    #[error("I/O error during the TLS handshake: {0}")]
    Io(std::io::Error),
}

/// Performs the server side of the handshake for `host` within `limit`.
pub async fn accept<IO>(
    io: IO,
    host: &Host,
    config: Arc<ServerConfig>,
    limit: Duration,
) -> Result<TlsStream<IO>, HandshakeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::now() + limit;
    let (accepted, io) = tokio::time::timeout_at(deadline, read_hello(io))
        .await
        .map_err(|_| HandshakeError::Timeout)??;
    let mut io = io;
    if let Some(sni) = accepted.client_hello().server_name() {
        let matches = normalize_host(sni).is_ok_and(|h| &h == host);
        if !matches {
            let _ = io.write_all(&UNRECOGNIZED_NAME_ALERT).await;
            let _ = io.shutdown().await;
            return Err(HandshakeError::SniMismatch {
                sni: sni.chars().take(256).collect(),
                host: host.to_string(),
            });
        }
    }
    let start = StartHandshake::from_parts(accepted, io);
    tokio::time::timeout_at(deadline, start.into_stream(config))
        .await
        .map_err(|_| HandshakeError::Timeout)?
        .map_err(|e| HandshakeError::Tls(e.to_string()))
}

/// Feeds bytes to a rustls [`Acceptor`] until the ClientHello is complete.
async fn read_hello<IO>(mut io: IO) -> Result<(rustls::server::Accepted, IO), HandshakeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut acceptor = Acceptor::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0usize;
    loop {
        let n = io.read(&mut buf).await.map_err(HandshakeError::Io)?;
        if n == 0 {
            return Err(HandshakeError::Closed);
        }
        total += n;
        if total > MAX_HELLO_BYTES {
            return Err(HandshakeError::Oversized);
        }
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            match acceptor.read_tls(&mut rest) {
                Ok(0) => return Err(HandshakeError::Oversized),
                Ok(_) => {}
                Err(e) => return Err(HandshakeError::Tls(e.to_string())),
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return Ok((accepted, io)),
            Ok(None) => continue,
            Err((e, mut alert)) => {
                let mut out = Vec::new();
                let _ = alert.write_all(&mut out);
                let _ = io.write_all(&out).await;
                return Err(HandshakeError::Tls(e.to_string()));
            }
        }
    }
}
