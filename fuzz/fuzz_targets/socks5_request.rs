//! The SOCKS5 request path as the proxy runs it: greeting (and RFC 1929 username/password when
//! byte 0 has bit 0 set), the command through fast-socks5's server protocol with our own
//! password method, the destination as policy sees it, the decision; then a UDP datagram
//! header through the relay's parser.
//!
//! Input: `FLAGS LEN_HI LEN_LO STREAM[LEN] DATAGRAM…`.
//!
//! Invariants: never panics; the password method succeeds only on the exact configured
//! credentials; a destination is a normalised host (idempotent) with a port ≠ 0, equal to the
//! normalised target; the decision obeys the policy invariants (no non-public address without
//! an exact allow entry for it; deny wins); a parsed datagram re-encodes to a header that parses
//! to the same destination and payload, and a reply wrapped for an address parses back to it.
#![no_main]

mod common;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use common::{Scenario, assert_normalisation_idempotent, checked_pattern, decide_and_check};
use fast_socks5::Socks5Command;
use fast_socks5::server::{NoAuthentication, Socks5ServerProtocol, SocksServerError};
use fast_socks5::util::target_addr::TargetAddr;
use libfuzzer_sys::fuzz_target;
use portcullis::decision::Protocol;
use portcullis::policy::{AskMode, Host, ListKind, canonical_ip, normalize_host};
use portcullis_dataplane::socks5_auth::{Credentials, PasswordMethod};
use portcullis_dataplane::socks5_wire::{destination, parse_datagram, wrap_reply};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client side of the connection: the fuzz bytes, then EOF; writes are swallowed.
struct Client {
    input: Vec<u8>,
    at: usize,
}

impl AsyncRead for Client {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let rest = &self.input[self.at..];
        let n = rest.len().min(buf.remaining()).min(7);
        buf.put_slice(&rest[..n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Client {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}

fn scenario() -> Scenario {
    let allow = [
        "example.com",
        "**.example.org",
        "127.0.0.1:8080",
        "[::1]:53",
        "10.0.0.0/8",
    ];
    let deny = ["evil.example.org", "192.168.0.0/16", "*:25"];
    Scenario {
        enabled: true,
        limited: false,
        mitm: false,
        allow_local_binding: false,
        asks: AskMode::Standalone,
        allowed: allow
            .iter()
            .filter_map(|e| checked_pattern(e, ListKind::Allow))
            .collect(),
        denied: deny
            .iter()
            .filter_map(|e| checked_pattern(e, ListKind::Deny))
            .collect(),
        session_allows: Vec::new(),
    }
}

const USER: &str = "user";
const PASS: &str = "pass";

async fn handshake(
    client: Client,
    password: bool,
) -> Result<(Socks5Command, TargetAddr), SocksServerError> {
    let authenticated = if password {
        let creds = Credentials {
            username: USER.into(),
            password: PASS.into(),
        };
        let method = PasswordMethod(&creds);
        let started = Socks5ServerProtocol::start(client)
            .negotiate_auth(&[&method])
            .await?;
        let done = started
            .verify()
            .await
            .map_err(|()| SocksServerError::AuthenticationRejected)?;
        Socks5ServerProtocol::finish_auth(done)
    } else {
        let auth = Socks5ServerProtocol::start(client)
            .negotiate_auth(&[NoAuthentication])
            .await?;
        Socks5ServerProtocol::finish_auth(auth)
    };
    let (_proto, cmd, target) = authenticated.read_command().await?;
    Ok((cmd, target))
}

fn check_destination(sc: &Scenario, target: &TargetAddr, protocol: Protocol, resolved: &[IpAddr]) {
    let Some((host, port)) = destination(target) else {
        return;
    };
    assert_ne!(port, 0);
    assert_normalisation_idempotent(&host);
    match target {
        TargetAddr::Ip(sa) => assert_eq!(host, Host::ip(canonical_ip(sa.ip()))),
        TargetAddr::Domain(name, _) => {
            let text = name
                .strip_prefix('[')
                .and_then(|n| n.strip_suffix(']'))
                .unwrap_or(name);
            assert_eq!(Ok(&host), normalize_host(text).as_ref(), "{name:?}");
        }
    }
    let policy = sc.compile();
    decide_and_check(sc, &policy, protocol, &host, port, None, false, resolved);
}

fn encode(host: &Host, port: u16, data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0];
    match host {
        Host::Ip {
            addr: IpAddr::V4(v4),
            zone: None,
        } => {
            out.push(1);
            out.extend_from_slice(&v4.octets());
        }
        Host::Ip {
            addr: IpAddr::V6(v6),
            zone: None,
        } => {
            out.push(4);
            out.extend_from_slice(&v6.octets());
        }
        other => {
            let text = other.to_string();
            out.push(3);
            out.push(u8::try_from(text.len()).expect("normalised names are ≤ 253 bytes"));
            out.extend_from_slice(text.as_bytes());
        }
    }
    out.extend_from_slice(&port.to_be_bytes());
    out.extend_from_slice(data);
    out
}

fuzz_target!(|data: &[u8]| {
    let [flags, hi, lo, rest @ ..] = data else {
        return;
    };
    let len = (usize::from(*hi) << 8 | usize::from(*lo)).min(rest.len());
    let (stream, datagram) = rest.split_at(len);
    let password = flags & 1 == 1;
    let sc = scenario();
    // A DNS answer for names, from the flags: public, loopback, private, or both.
    let resolved: Vec<IpAddr> = match (flags >> 1) & 3 {
        0 => vec!["93.184.216.34".parse().unwrap()],
        1 => vec!["127.0.0.1".parse().unwrap()],
        2 => vec!["10.1.2.3".parse().unwrap()],
        _ => vec!["93.184.216.34".parse().unwrap(), "::1".parse().unwrap()],
    };

    let client = Client {
        input: stream.to_vec(),
        at: 0,
    };
    let result = runtime().block_on(handshake(client, password));
    if password {
        let good = [&[1u8, 4][..], USER.as_bytes(), &[4], PASS.as_bytes()].concat();
        if result.is_ok() {
            assert!(
                stream.windows(good.len()).any(|w| w == good),
                "password method accepted without the credentials: {stream:?}"
            );
        }
    }
    if let Ok((cmd, target)) = &result {
        let protocol = match cmd {
            Socks5Command::UDPAssociate => Protocol::Socks5Udp,
            _ => Protocol::Socks5Tcp,
        };
        check_destination(&sc, target, protocol, &resolved);
    }

    if let Ok(d) = parse_datagram(datagram) {
        assert_ne!(d.port, 0);
        assert!(
            datagram.ends_with(d.data),
            "payload is not the tail of the datagram"
        );
        assert_normalisation_idempotent(&d.host);
        let again = encode(&d.host, d.port, d.data);
        assert_eq!(
            parse_datagram(&again),
            Ok(d.clone_parts()),
            "re-encoded header differs"
        );
        if let Some(ip) = d.host.as_ip() {
            let mut out = Vec::new();
            wrap_reply(SocketAddr::new(ip, d.port), d.data, &mut out);
            let back = parse_datagram(&out).expect("a wrapped reply parses");
            assert_eq!(
                (back.host.as_ip(), back.port, back.data),
                (Some(ip), d.port, d.data)
            );
        }
        let policy = sc.compile();
        decide_and_check(
            &sc,
            &policy,
            Protocol::Socks5Udp,
            &d.host,
            d.port,
            None,
            false,
            &resolved,
        );
    }
});

trait CloneParts<'a> {
    fn clone_parts(&self) -> portcullis_dataplane::socks5_wire::ClientDatagram<'a>;
}

impl<'a> CloneParts<'a> for portcullis_dataplane::socks5_wire::ClientDatagram<'a> {
    fn clone_parts(&self) -> portcullis_dataplane::socks5_wire::ClientDatagram<'a> {
        portcullis_dataplane::socks5_wire::ClientDatagram {
            host: self.host.clone(),
            port: self.port,
            data: self.data,
        }
    }
}
