//! A small hand-written DNS server on loopback (UDP and TCP on one port) answering A/AAAA from a
//! table. Malformed packets are ignored.

use crate::origin::runtime;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;

#[derive(Clone, Debug)]
enum Entry {
    /// i-th query (per type) gets the i-th answer; the last repeats.
    Sequence(Vec<Vec<IpAddr>>),
    NxDomain,
    /// RCODE 2 (SERVFAIL), no answers.
    ServFail,
    Drop,
}

#[derive(Default)]
struct State {
    table: HashMap<String, Entry>,
    /// (name, qtype) → queries seen.
    counts: HashMap<(String, u16), usize>,
    /// TTL of every answer record (`None` = 1 s).
    ttl: Option<u32>,
}

/// The running DNS server; stops on drop.
pub struct DnsServer {
    /// UDP and TCP address.
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    tasks: Vec<JoinHandle<()>>,
}

fn norm(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl DnsServer {
    /// Starts on 127.0.0.1 with an ephemeral port shared by UDP and TCP.
    pub fn start() -> DnsServer {
        let rt = runtime();
        let (udp, tcp) = rt.block_on(async {
            for _ in 0..50 {
                let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns udp");
                let port = udp.local_addr().unwrap().port();
                if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
                    return (udp, tcp);
                }
            }
            panic!("could not bind DNS server UDP+TCP on one port");
        });
        let addr = udp.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let udp_task = rt.spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                    continue;
                };
                if let Some(resp) = answer(&st, &buf[..n]) {
                    let _ = udp.send_to(&resp, peer).await;
                }
            }
        });
        let st = state.clone();
        let tcp_task = rt.spawn(async move {
            loop {
                let Ok((mut s, _)) = tcp.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    for _ in 0..100 {
                        let mut len = [0u8; 2];
                        let ok =
                            tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut len))
                                .await;
                        if !matches!(ok, Ok(Ok(_))) {
                            return;
                        }
                        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
                        if s.read_exact(&mut msg).await.is_err() {
                            return;
                        }
                        match answer(&st, &msg) {
                            Some(resp) => {
                                let mut out = (resp.len() as u16).to_be_bytes().to_vec();
                                out.extend_from_slice(&resp);
                                if s.write_all(&out).await.is_err() {
                                    return;
                                }
                            }
                            None => {
                                // Garbage closes; dropped names keep the connection silent.
                                if parse_query(&msg).is_none() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        DnsServer {
            addr,
            state,
            tasks: vec![udp_task, tcp_task],
        }
    }

    /// `"127.0.0.1:PORT"` for `dns_servers`.
    pub fn addr_string(&self) -> String {
        self.addr.to_string()
    }

    /// Answers `name` with `addrs` (A for IPv4, AAAA for IPv6) on every query.
    pub fn set(&self, name: &str, addrs: &[IpAddr]) {
        self.set_sequence(name, &[addrs.to_vec()]);
    }

    /// The i-th query of each type for `name` gets `answers[i]`; the last repeats.
    pub fn set_sequence(&self, name: &str, answers: &[Vec<IpAddr>]) {
        assert!(!answers.is_empty());
        self.state
            .lock()
            .unwrap()
            .table
            .insert(norm(name), Entry::Sequence(answers.to_vec()));
    }

    /// `name` answers NXDOMAIN.
    pub fn set_nxdomain(&self, name: &str) {
        self.state
            .lock()
            .unwrap()
            .table
            .insert(norm(name), Entry::NxDomain);
    }

    /// `name` answers SERVFAIL (RCODE 2) to every query.
    pub fn set_servfail(&self, name: &str) {
        self.state
            .lock()
            .unwrap()
            .table
            .insert(norm(name), Entry::ServFail);
    }

    /// TTL of every answer record from now on (default 1 s). `0` makes a caching resolver look
    /// the name up again for every request.
    pub fn set_ttl(&self, secs: u32) {
        self.state.lock().unwrap().ttl = Some(secs);
    }

    /// Queries for `name` are never answered.
    pub fn set_drop(&self, name: &str) {
        self.state
            .lock()
            .unwrap()
            .table
            .insert(norm(name), Entry::Drop);
    }

    /// Queries (any type) received for `name`.
    pub fn query_count(&self, name: &str) -> usize {
        let n = norm(name);
        self.state
            .lock()
            .unwrap()
            .counts
            .iter()
            .filter(|((k, _), _)| *k == n)
            .map(|(_, v)| *v)
            .sum()
    }

    /// Queries of type A (1) or AAAA (28) received for `name`.
    pub fn query_count_type(&self, name: &str, qtype: u16) -> usize {
        *self
            .state
            .lock()
            .unwrap()
            .counts
            .get(&(norm(name), qtype))
            .unwrap_or(&0)
    }

    /// Total queries received for any name.
    pub fn total_queries(&self) -> usize {
        self.state.lock().unwrap().counts.values().sum()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Query {
    id: u16,
    flags: u16,
    name: String,
    qtype: u16,
    /// Bytes of the question section (name + type + class).
    question: Vec<u8>,
}

fn parse_query(msg: &[u8]) -> Option<Query> {
    if msg.len() < 12 {
        return None;
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    let qdcount = u16::from_be_bytes([msg[4], msg[5]]);
    if flags & 0x8000 != 0 || qdcount == 0 {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    for _ in 0..128 {
        let len = *msg.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        let label = msg.get(i..i + len)?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        i += len;
    }
    let tail = msg.get(i..i + 4)?;
    let qtype = u16::from_be_bytes([tail[0], tail[1]]);
    Some(Query {
        id,
        flags,
        name: labels.join("."),
        qtype,
        question: msg[12..i + 4].to_vec(),
    })
}

fn answer(state: &Mutex<State>, msg: &[u8]) -> Option<Vec<u8>> {
    let q = parse_query(msg)?;
    let (rcode, addrs, ttl) = {
        let mut st = state.lock().unwrap();
        let ttl = st.ttl.unwrap_or(1);
        let count = st.counts.entry((q.name.clone(), q.qtype)).or_insert(0);
        let index = *count;
        *count += 1;
        match st.table.get(&q.name) {
            None => (3u16, Vec::new(), ttl),
            Some(Entry::NxDomain) => (3, Vec::new(), ttl),
            Some(Entry::ServFail) => (2, Vec::new(), ttl),
            Some(Entry::Drop) => return None,
            Some(Entry::Sequence(seq)) => {
                let set = &seq[index.min(seq.len() - 1)];
                let wanted: Vec<IpAddr> = set
                    .iter()
                    .copied()
                    .filter(|a| match q.qtype {
                        TYPE_A => a.is_ipv4(),
                        TYPE_AAAA => a.is_ipv6(),
                        _ => false,
                    })
                    .collect();
                (0, wanted, ttl)
            }
        }
    };
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&q.id.to_be_bytes());
    let flags = 0x8000 | (q.flags & 0x7900) | 0x0080 | rcode;
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&q.question);
    for a in addrs {
        out.extend_from_slice(&[0xc0, 0x0c]);
        let (t, rdata) = match a {
            IpAddr::V4(v4) => (TYPE_A, v4.octets().to_vec()),
            IpAddr::V6(v6) => (TYPE_AAAA, v6.octets().to_vec()),
        };
        out.extend_from_slice(&t.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(&rdata);
    }
    Some(out)
}
