//! Opening a gRPC channel to a control-plane endpoint: `http://HOST:PORT` or `unix:/abs/path`
//! (control.md §1.6). Both the proxy's attach loop and the CLI clients use this one function.

use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::config::ControlEndpoint;

/// Channel settings shared by every client.
#[derive(Debug, Clone, Copy)]
pub struct ChannelOptions {
    /// Limit for establishing the connection.
    pub connect_timeout: Duration,
    /// Per-RPC deadline (`None` for long-lived streams such as `Attach`).
    pub request_timeout: Option<Duration>,
}

/// Connects to `endpoint` with HTTP/2 keepalive (ping every 10 s, give up after 5 s, §1.9).
pub async fn connect(
    endpoint: &ControlEndpoint,
    options: ChannelOptions,
) -> Result<Channel, tonic::transport::Error> {
    // A unix endpoint still needs a syntactically valid URI; the connector ignores it.
    let uri = match endpoint {
        ControlEndpoint::Http { .. } => endpoint.to_string(),
        ControlEndpoint::Unix(_) => "http://localhost".to_string(),
    };
    let mut builder = Endpoint::from_shared(uri)?
        .connect_timeout(options.connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if let Some(t) = options.request_timeout {
        builder = builder.timeout(t);
    }
    match endpoint {
        ControlEndpoint::Http { .. } => builder.connect().await,
        ControlEndpoint::Unix(path) => {
            let path = path.clone();
            builder
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                }))
                .await
        }
    }
}
