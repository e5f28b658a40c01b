//! SOCKS5 `UDP ASSOCIATE` (`socks5.md` §6): a loopback relay socket per association, a
//! per-datagram policy check (cached per destination), outbound sockets per address family,
//! replies only from destinations the client sent allowed datagrams to.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis::decision::Protocol;
use portcullis::policy::Host;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UdpSocket};

use crate::pipeline::{self, Outcome};
use crate::report::metrics::{Direction, UdpDropReason};
use crate::state::Shared;

/// A cached per-destination verdict is reused this long (or until the policy changes).
const CACHE_TTL: Duration = Duration::from_secs(60);
/// Largest UDP payload we handle.
const MAX_DATAGRAM: usize = 65535;

use super::wire::{HeaderError, parse_datagram, wrap_reply};

struct CacheEntry {
    dest: Option<SocketAddr>,
    at: Instant,
    version: u64,
}

/// Runs one association until its TCP control connection ends or it idles out.
pub async fn run(
    shared: Arc<Shared>,
    mut control: TcpStream,
    relay: UdpSocket,
    client: SocketAddr,
    declared_port: u16,
) {
    let metrics = shared.metrics_arc();
    let _active = metrics.tunnel_opened(Protocol::Socks5Udp);
    let rt = shared.runtime();
    let idle = Duration::from_millis(rt.config.limits.udp_idle_timeout_ms);
    let max_dests = rt.config.limits.max_udp_destinations as usize;
    drop(rt);
    let mut client_port = (declared_port != 0).then_some(declared_port);
    let mut out_v4: Option<UdpSocket> = None;
    let mut out_v6: Option<UdpSocket> = None;
    let mut cache: HashMap<(Host, u16), CacheEntry> = HashMap::new();
    let mut sent_to: HashSet<SocketAddr> = HashSet::new();
    let mut in_buf = vec![0u8; MAX_DATAGRAM];
    let mut out_buf4 = vec![0u8; MAX_DATAGRAM];
    let mut out_buf6 = vec![0u8; MAX_DATAGRAM];
    let mut wrap = Vec::with_capacity(2048);
    let mut discard = [0u8; 512];
    let mut shutdown = shared.shutdown_signal();
    let mut limited = shared.limited_signal();
    let deadline = tokio::time::sleep(idle);
    tokio::pin!(deadline);

    loop {
        tokio::select! {
            r = control.read(&mut discard) => match r {
                Ok(0) | Err(_) => break,
                Ok(_) => {} // bytes after the reply are read and discarded
            },
            r = relay.recv_from(&mut in_buf) => {
                let Ok((n, from)) = r else { continue };
                metrics.udp_datagram(Direction::Upstream);
                deadline.as_mut().reset(tokio::time::Instant::now() + idle);
                shared.metrics().request(Protocol::Socks5Udp);
                if from.ip() != client.ip() || client_port.is_some_and(|p| p != from.port()) {
                    metrics.udp_dropped(UdpDropReason::ForeignSource);
                    continue;
                }
                client_port.get_or_insert(from.port());
                let dg = match parse_datagram(&in_buf[..n]) {
                    Ok(d) => d,
                    Err(HeaderError::Fragmented) => { metrics.udp_dropped(UdpDropReason::Fragmented); continue; }
                    Err(HeaderError::Malformed) => { metrics.udp_dropped(UdpDropReason::Malformed); continue; }
                };
                let version = shared.policy_version();
                let key = (dg.host.clone(), dg.port);
                let fresh = cache.get(&key).is_some_and(|e| e.version == version && e.at.elapsed() < CACHE_TTL);
                if !fresh {
                    if !cache.contains_key(&key) && cache.len() >= max_dests {
                        metrics.udp_dropped(UdpDropReason::TooManyDestinations);
                        continue;
                    }
                    let query = pipeline::Query {
                        protocol: Protocol::Socks5Udp,
                        host: &dg.host,
                        port: dg.port,
                        method: None,
                        upgrade: false,
                        client: from,
                    };
                    let dest = match pipeline::decide(&shared, &query).await {
                        Outcome::Allow(_, addrs) => addrs.first().map(|ip| SocketAddr::new(*ip, dg.port)),
                        Outcome::Unresolvable(_) | Outcome::Refuse(_) => None,
                    };
                    cache.insert(key.clone(), CacheEntry { dest, at: Instant::now(), version });
                }
                let Some(dest) = cache.get(&key).and_then(|e| e.dest) else {
                    metrics.udp_dropped(UdpDropReason::Policy);
                    continue;
                };
                let sock = match dest {
                    SocketAddr::V4(_) => &mut out_v4,
                    SocketAddr::V6(_) => &mut out_v6,
                };
                if sock.is_none() {
                    let bind: SocketAddr = if dest.is_ipv4() {
                        (Ipv4Addr::UNSPECIFIED, 0).into()
                    } else {
                        (Ipv6Addr::UNSPECIFIED, 0).into()
                    };
                    match UdpSocket::bind(bind).await {
                        Ok(s) => *sock = Some(s),
                        Err(e) => { tracing::debug!(error = %e, "cannot open outbound UDP socket"); continue; }
                    }
                }
                if let Some(s) = sock.as_ref() {
                    let _ = s.send_to(dg.data, dest).await;
                    sent_to.insert(dest);
                }
            }
            r = recv_opt(&out_v4, &mut out_buf4) => {
                if let Ok((n, from)) = r { reply(&relay, client, client_port, &sent_to, from, &out_buf4[..n], &mut wrap, &shared).await; }
                deadline.as_mut().reset(tokio::time::Instant::now() + idle);
            }
            r = recv_opt(&out_v6, &mut out_buf6) => {
                if let Ok((n, from)) = r { reply(&relay, client, client_port, &sent_to, from, &out_buf6[..n], &mut wrap, &shared).await; }
                deadline.as_mut().reset(tokio::time::Instant::now() + idle);
            }
            _ = &mut deadline => break,
            _ = shutdown.wait() => break,
            _ = limited.changed() => break,
        }
    }
}

async fn recv_opt(
    sock: &Option<UdpSocket>,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr)> {
    match sock {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

#[allow(clippy::too_many_arguments)]
async fn reply(
    relay: &UdpSocket,
    client: SocketAddr,
    client_port: Option<u16>,
    sent_to: &HashSet<SocketAddr>,
    from: SocketAddr,
    data: &[u8],
    wrap: &mut Vec<u8>,
    shared: &Shared,
) {
    let from = SocketAddr::new(crate::resolve::canonical(from.ip()), from.port());
    if !sent_to.contains(&from) {
        shared.metrics().udp_dropped(UdpDropReason::Unsolicited);
        return;
    }
    let Some(port) = client_port else { return };
    wrap_reply(from, data, wrap);
    shared.metrics().udp_datagram(Direction::Downstream);
    let _ = relay
        .send_to(wrap, SocketAddr::new(client.ip(), port))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_headers() {
        let d = parse_datagram(&[0, 0, 0, 1, 127, 0, 0, 1, 0, 53, b'x']).unwrap();
        assert_eq!(d.host.to_string(), "127.0.0.1");
        assert_eq!((d.port, d.data), (53, &b"x"[..]));
        let mut name = vec![0, 0, 0, 3, 9];
        name.extend_from_slice(b"Example.C");
        name.extend_from_slice(&[0x01, 0xbb]);
        let d = parse_datagram(&name).unwrap();
        assert_eq!((d.host.to_string().as_str(), d.port), ("example.c", 443));
        assert_eq!(
            parse_datagram(&[0, 0, 1, 1, 127, 0, 0, 1, 0, 53]),
            Err(HeaderError::Fragmented)
        );
        for bad in [
            &[0u8, 0, 0][..],
            &[0, 0, 0, 1, 127, 0],
            &[0, 0, 0, 5, 1, 2, 3, 4, 0, 1],
            &[0, 0, 0, 1, 127, 0, 0, 1, 0, 0],
            &[0, 0, 0, 3, 0, 0, 1],
            &[0, 0, 0, 3, 5, b'a'],
        ] {
            assert_eq!(parse_datagram(bad), Err(HeaderError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn wraps_replies() {
        let mut out = Vec::new();
        wrap_reply("127.0.0.1:53".parse().unwrap(), b"hi", &mut out);
        assert_eq!(out, [0, 0, 0, 1, 127, 0, 0, 1, 0, 53, b'h', b'i']);
    }
}
