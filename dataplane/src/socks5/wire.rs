//! The pure SOCKS5 wire parsing (`socks5.md`): the destination of a request as policy sees it,
//! and the UDP datagram header. No I/O; shared by the proxy and the fuzz targets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use fast_socks5::util::target_addr::TargetAddr;
use portcullis::policy::{Host, canonical_ip, normalize_host};

/// The destination of a SOCKS5 request as policy sees it.
pub fn destination(target: &TargetAddr) -> Option<(Host, u16)> {
    let (host, port) = match target {
        TargetAddr::Ip(sa) => (
            normalize_host(&canonical_ip(sa.ip()).to_string()).ok()?,
            sa.port(),
        ),
        TargetAddr::Domain(name, port) => {
            // A bracketed or bare IPv6 text is an IP literal too; a `:port` suffix is invalid.
            let text = name
                .strip_prefix('[')
                .and_then(|n| n.strip_suffix(']'))
                .unwrap_or(name);
            if text.contains(':') && text.parse::<std::net::Ipv6Addr>().is_err() {
                return None;
            }
            (normalize_host(text).ok()?, *port)
        }
    };
    (port != 0).then_some((host, port))
}

/// A parsed client datagram header.
#[derive(Debug, PartialEq, Eq)]
pub struct ClientDatagram<'a> {
    /// Destination host (name or IP literal).
    pub host: Host,
    /// Destination port (1–65535).
    pub port: u16,
    /// Payload.
    pub data: &'a [u8],
}

/// Why a client datagram was dropped before policy.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// `FRAG` ≠ 0.
    Fragmented,
    /// Truncated, bad `ATYP`, invalid name, port 0.
    Malformed,
}

/// Parses `RSV RSV FRAG ATYP DST.ADDR DST.PORT DATA`.
pub fn parse_datagram(buf: &[u8]) -> Result<ClientDatagram<'_>, HeaderError> {
    let (frag, atyp, rest) = match buf {
        [_, _, frag, atyp, rest @ ..] => (*frag, *atyp, rest),
        _ => return Err(HeaderError::Malformed),
    };
    if frag != 0 {
        return Err(HeaderError::Fragmented);
    }
    let (host, rest) = match atyp {
        0x01 if rest.len() >= 4 => {
            let ip = Ipv4Addr::new(rest[0], rest[1], rest[2], rest[3]);
            (Host::ip(IpAddr::V4(ip)), &rest[4..])
        }
        0x04 if rest.len() >= 16 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(&rest[..16]);
            (Host::ip(IpAddr::V6(Ipv6Addr::from(b))), &rest[16..])
        }
        0x03 if !rest.is_empty() && rest.len() > rest[0] as usize && rest[0] > 0 => {
            let len = rest[0] as usize;
            let name = std::str::from_utf8(&rest[1..=len]).map_err(|_| HeaderError::Malformed)?;
            let host = normalize_host(name).map_err(|_| HeaderError::Malformed)?;
            (host, &rest[1 + len..])
        }
        _ => return Err(HeaderError::Malformed),
    };
    if rest.len() < 2 {
        return Err(HeaderError::Malformed);
    }
    let port = u16::from_be_bytes([rest[0], rest[1]]);
    if port == 0 {
        return Err(HeaderError::Malformed);
    }
    Ok(ClientDatagram {
        host,
        port,
        data: &rest[2..],
    })
}

/// Wraps a reply from `from` for the client.
pub fn wrap_reply(from: SocketAddr, data: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&[0, 0, 0]);
    match from.ip() {
        IpAddr::V4(v4) => {
            out.push(0x01);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => {
                out.push(0x01);
                out.extend_from_slice(&v4.octets());
            }
            None => {
                out.push(0x04);
                out.extend_from_slice(&v6.octets());
            }
        },
    }
    out.extend_from_slice(&from.port().to_be_bytes());
    out.extend_from_slice(data);
}
