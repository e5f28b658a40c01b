//! Checks of the test support itself: the DNS server survives garbage and answers by table.

use portcullis_integration_tests::DnsServer;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream, UdpSocket};
use std::time::Duration;

fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, (qtype >> 8) as u8, qtype as u8, 0, 1]);
    q
}

fn udp_ask(dns: &DnsServer, msg: &[u8]) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.send_to(msg, dns.addr).unwrap();
    let mut buf = [0u8; 1500];
    s.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

#[test]
fn dns_server_survives_garbage_and_answers_table() {
    let dns = DnsServer::start();
    dns.set("a.test", &[IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))]);
    dns.set_nxdomain("nx.test");
    dns.set_drop("drop.test");
    for garbage in [
        &b""[..],
        b"\x00",
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
    ] {
        assert!(udp_ask(&dns, garbage).is_none());
    }
    let r = udp_ask(&dns, &query(7, "a.test", 1)).expect("answer");
    assert_eq!(&r[..2], &7u16.to_be_bytes());
    assert_eq!(r[3] & 0x0f, 0, "NOERROR");
    assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1, "one answer");
    assert_eq!(&r[r.len() - 4..], &[127, 0, 0, 2]);
    let r = udp_ask(&dns, &query(8, "nx.test", 1)).expect("answer");
    assert_eq!(r[3] & 0x0f, 3, "NXDOMAIN");
    assert!(udp_ask(&dns, &query(9, "drop.test", 1)).is_none());
    assert_eq!(dns.query_count("a.test"), 1);
    assert_eq!(dns.query_count("drop.test"), 1);
    // TCP: garbage closes, a fresh connection still works.
    let mut t = TcpStream::connect(dns.addr).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    t.write_all(&[0, 3, 1, 2, 3]).unwrap();
    let mut b = [0u8; 2];
    assert!(matches!(t.read(&mut b), Ok(0) | Err(_)));
    let mut t = TcpStream::connect(dns.addr).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let q = query(10, "a.test", 1);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    t.write_all(&framed).unwrap();
    t.read_exact(&mut b).unwrap();
    let mut resp = vec![0u8; u16::from_be_bytes(b) as usize];
    t.read_exact(&mut resp).unwrap();
    assert_eq!(&resp[resp.len() - 4..], &[127, 0, 0, 2]);
    assert_eq!(dns.query_count_type("a.test", 1), 2);
}
