//! SOCKS5 greeting, request, and TCP CONNECT.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use fast_socks5::server::{NoAuthentication, Socks5ServerProtocol, SocksServerError};
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::{ReplyError, Socks5Command};
use portcullis::decision::{Protocol, ResolveFailure};
use tokio::net::TcpStream;

use super::wire::destination;
use crate::dial;
use crate::pipeline::{self, Outcome};
use crate::state::Shared;

type Proto = Socks5ServerProtocol<TcpStream, fast_socks5::server::states::CommandRead>;

/// Serves one SOCKS5 client connection.
pub async fn serve_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    guard: crate::listeners::ConnGuard,
) {
    let _ = stream.set_nodelay(true);
    let local_ip = stream
        .local_addr()
        .map(|a| a.ip())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let settings = shared.settings();
    let creds = shared.socks_credentials();
    let handshake = async {
        let authenticated = match &creds {
            None => {
                let auth = Socks5ServerProtocol::start(stream)
                    .negotiate_auth(&[NoAuthentication])
                    .await?;
                Socks5ServerProtocol::finish_auth(auth)
            }
            Some(c) => {
                let method = super::auth::PasswordMethod(c);
                let started = Socks5ServerProtocol::start(stream)
                    .negotiate_auth(&[&method])
                    .await?;
                let done = started
                    .verify()
                    .await
                    .map_err(|()| SocksServerError::AuthenticationRejected)?;
                Socks5ServerProtocol::finish_auth(done)
            }
        };
        authenticated.read_command().await
    };
    let (proto, cmd, target) =
        match tokio::time::timeout(settings.header_read_timeout, handshake).await {
            Err(_) => {
                shared.metrics().bad_request("socks_timeout");
                return;
            }
            Ok(Err(e)) => {
                // fast-socks5 already sent the reply the error calls for (or none, for a bad version).
                let kind = match e {
                    SocksServerError::AuthenticationRejected => "socks_auth_failed",
                    _ => "socks_protocol",
                };
                tracing::debug!(%peer, error = %e, "SOCKS5 handshake failed");
                shared.metrics().bad_request(kind);
                return;
            }
            Ok(Ok(x)) => x,
        };
    shared.metrics().request(Protocol::Socks5Tcp);
    match cmd {
        Socks5Command::TCPConnect => connect(shared, proto, target, peer, guard).await,
        Socks5Command::UDPAssociate if shared.runtime().config.network.enable_socks5_udp => {
            associate(shared, proto, target, peer, local_ip).await
        }
        Socks5Command::UDPAssociate | Socks5Command::TCPBind => {
            let _ = proto.reply_error(&ReplyError::CommandNotSupported).await;
        }
    }
}

async fn connect(
    shared: Arc<Shared>,
    proto: Proto,
    target: TargetAddr,
    peer: SocketAddr,
    guard: crate::listeners::ConnGuard,
) {
    let Some((host, port)) = destination(&target) else {
        shared.metrics().bad_request("invalid_host");
        let _ = proto.reply_error(&ReplyError::GeneralFailure).await;
        return;
    };
    let query = pipeline::Query {
        protocol: Protocol::Socks5Tcp,
        host: &host,
        port,
        method: None,
        upgrade: false,
        client: peer,
    };
    let addrs = match pipeline::decide(&shared, &query).await {
        Outcome::Refuse(_) => {
            let _ = proto.reply_error(&ReplyError::ConnectionNotAllowed).await;
            return;
        }
        Outcome::Unresolvable(failure) => {
            let code = match failure {
                ResolveFailure::TimedOut => ReplyError::TtlExpired,
                _ => ReplyError::HostUnreachable,
            };
            let _ = proto.reply_error(&code).await;
            return;
        }
        Outcome::Allow(d, addrs) => {
            tracing::debug!(decision_id = %d.id, "allowed");
            addrs
        }
    };
    if let Some(mitm) = crate::mitm::required(&shared) {
        // Limited mode, port 443: the stream is TLS-terminated (`socks5.md` §5). No outbound
        // socket exists yet, so BND is 0.0.0.0:0.
        let Ok(client) = proto
            .reply_success(SocketAddr::from(([0, 0, 0, 0], 0)))
            .await
        else {
            return;
        };
        tracing::info!(%host, port, "SOCKS5 stream intercepted");
        let target = crate::mitm::serve::Target {
            dest: crate::http::target::Destination {
                host,
                port,
                scheme: Some(crate::http::target::Scheme::Https),
            },
            addrs,
            protocol: Protocol::Socks5Tcp,
        };
        let client_info = crate::mitm::serve::Client { peer, guard };
        crate::mitm::serve::intercept(mitm, shared, client_info, target, Box::new(client)).await;
        return;
    }
    let _guard = guard;
    let settings = shared.settings();
    if let Some(via) = shared.upstream_proxy(true, &host, port) {
        let authority = format!("{}:{}", crate::http::target::bracketed(&host), port);
        let mut upstream =
            match crate::upstream_proxy::connect_via(&via, &authority, settings.connect_timeout)
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    let code = match e {
                        crate::upstream_proxy::ViaError::Timeout(_) => ReplyError::TtlExpired,
                        _ => ReplyError::HostUnreachable,
                    };
                    let _ = proto.reply_error(&code).await;
                    return;
                }
            };
        tracing::info!(%host, port, route = %"upstream_proxy", "SOCKS5 tunnel open");
        let Ok(mut client) = proto
            .reply_success(SocketAddr::from(([0, 0, 0, 0], 0)))
            .await
        else {
            return;
        };
        crate::tunnel_run::run(&shared, Protocol::Socks5Tcp, &mut client, &mut upstream).await;
        return;
    }
    let mut upstream = match dial::dial(&addrs, port, settings.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            shared
                .metrics()
                .upstream_error(if matches!(e, dial::DialError::Timeout(_)) {
                    "timeout"
                } else {
                    "connect"
                });
            let _ = proto.reply_error(&reply_for(e.socks_code())).await;
            return;
        }
    };
    let bnd = upstream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let Ok(mut client) = proto.reply_success(bnd).await else {
        return;
    };
    crate::tunnel_run::run(&shared, Protocol::Socks5Tcp, &mut client, &mut upstream).await;
}

fn reply_for(code: u8) -> ReplyError {
    match code {
        0x03 => ReplyError::NetworkUnreachable,
        0x04 => ReplyError::HostUnreachable,
        0x05 => ReplyError::ConnectionRefused,
        0x06 => ReplyError::TtlExpired,
        _ => ReplyError::GeneralFailure,
    }
}

/// `UDP ASSOCIATE`: reserve a place, bind the relay next to the TCP listener, reply, relay.
async fn associate(
    shared: Arc<Shared>,
    proto: Proto,
    target: TargetAddr,
    peer: SocketAddr,
    local_ip: IpAddr,
) {
    let Some(_slot) = shared.udp_association_slot() else {
        let _ = proto.reply_error(&ReplyError::GeneralFailure).await;
        return;
    };
    let relay = match tokio::net::UdpSocket::bind(SocketAddr::new(local_ip, 0)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot bind a UDP relay socket");
            let _ = proto.reply_error(&ReplyError::GeneralFailure).await;
            return;
        }
    };
    let Ok(relay_addr) = relay.local_addr() else {
        let _ = proto.reply_error(&ReplyError::GeneralFailure).await;
        return;
    };
    // The request's DST.ADDR is not trusted; only its port may fix the client's source port.
    let declared_port = match &target {
        TargetAddr::Ip(sa) => sa.port(),
        TargetAddr::Domain(_, p) => *p,
    };
    let Ok(control) = proto.reply_success(relay_addr).await else {
        return;
    };
    super::udp::run(shared, control, relay, peer, declared_port).await;
}
