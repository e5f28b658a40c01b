//! `portcullis-control socks-connect ADDR HOST PORT` (env.md §4.3): an ssh `ProxyCommand` that
//! opens a SOCKS5 CONNECT through the sidecar and relays stdio, half-close respected.

use std::process::ExitCode;
use std::time::Duration;

use fast_socks5::client::{Config, Socks5Stream};
use fast_socks5::{ReplyError, SocksError};
use tokio::io::{AsyncWriteExt, copy};

use crate::cli::SocksConnectArgs;

/// Runs the helper; exit 0 when both directions ended, 1 on a refusal or failure.
pub async fn run(args: SocksConnectArgs) -> ExitCode {
    let mut config = Config::default();
    config.set_connect_timeout(Duration::from_secs(30));
    let target = crate::exec::destination(&args.host, u32::from(args.port));
    let stream = match Socks5Stream::connect(
        args.socks_addr.as_str(),
        args.host.clone(),
        args.port,
        config,
    )
    .await
    {
        Ok(s) => s,
        Err(SocksError::ReplyError(reply)) => {
            eprintln!(
                "portcullis: SOCKS5 proxy refused {target} (reply 0x{:02x}: {})",
                reply.as_u8(),
                reply_text(&reply)
            );
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!(
                "portcullis: cannot connect to {target} through SOCKS5 proxy {}: {e}",
                args.socks_addr
            );
            return ExitCode::from(1);
        }
    };
    let (mut from_proxy, mut to_proxy) = stream.get_socket().into_split();
    let upstream = async {
        let mut stdin = tokio::io::stdin();
        let r = copy(&mut stdin, &mut to_proxy).await;
        // Pass stdin's end on; the other direction keeps running.
        let _ = to_proxy.shutdown().await;
        r
    };
    let downstream = async {
        let mut stdout = tokio::io::stdout();
        let r = copy(&mut from_proxy, &mut stdout).await;
        let _ = stdout.flush().await;
        r
    };
    match tokio::join!(upstream, downstream) {
        (_, Ok(_)) => ExitCode::SUCCESS,
        (_, Err(e)) => {
            eprintln!("portcullis: connection to {target} failed: {e}");
            ExitCode::from(1)
        }
    }
}

/// What each SOCKS5 reply code means for the user (0x02 is Portcullis' policy refusal).
fn reply_text(reply: &ReplyError) -> &'static str {
    match reply {
        ReplyError::ConnectionNotAllowed => "blocked by network policy",
        ReplyError::GeneralFailure => "general failure",
        ReplyError::NetworkUnreachable => "network unreachable",
        ReplyError::HostUnreachable => "host unreachable",
        ReplyError::ConnectionRefused => "connection refused",
        ReplyError::ConnectionTimeout | ReplyError::TtlExpired => "timed out",
        ReplyError::CommandNotSupported => "command not supported",
        ReplyError::AddressTypeNotSupported => "address type not supported",
        _ => "refused",
    }
}
