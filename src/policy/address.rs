//! Local, private and reserved addresses (`policy.md` §5). Pure table lookups, no allocation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// How an address is treated by the local-address rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// Reachable destination on the public internet.
    Public,
    /// Loopback, private, link-local, documentation, … (`allow_local_binding` governs it).
    NonPublic,
    /// Unspecified, multicast, broadcast/reserved: refused whatever the settings say.
    AlwaysRefused,
}

/// IPv4 non-public blocks of §5.1 as (network, prefix length).
const V4_NON_PUBLIC: &[(u32, u8)] = &[
    (0x0000_0000, 8),  // 0.0.0.0/8
    (0x0a00_0000, 8),  // 10.0.0.0/8
    (0x6440_0000, 10), // 100.64.0.0/10
    (0x7f00_0000, 8),  // 127.0.0.0/8
    (0xa9fe_0000, 16), // 169.254.0.0/16
    (0xac10_0000, 12), // 172.16.0.0/12
    (0xc000_0000, 24), // 192.0.0.0/24
    (0xc000_0200, 24), // 192.0.2.0/24
    (0xc058_6300, 24), // 192.88.99.0/24
    (0xc0a8_0000, 16), // 192.168.0.0/16
    (0xc612_0000, 15), // 198.18.0.0/15
    (0xc633_6400, 24), // 198.51.100.0/24
    (0xcb00_7100, 24), // 203.0.113.0/24
];

fn in_v4(addr: u32, net: u32, prefix: u8) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    addr & mask == net
}

fn in_v6(addr: u128, net: u128, prefix: u8) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - prefix)
    };
    addr & mask == net
}

/// Classifies an IPv4 address.
pub fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    let a = u32::from(ip);
    // Unspecified, multicast 224/4, reserved 240/4 (incl. broadcast).
    if a == 0 || in_v4(a, 0xe000_0000, 4) || in_v4(a, 0xf000_0000, 4) {
        return AddressClass::AlwaysRefused;
    }
    if V4_NON_PUBLIC.iter().any(|&(n, p)| in_v4(a, n, p)) {
        AddressClass::NonPublic
    } else {
        AddressClass::Public
    }
}

/// The IPv4 address embedded in a NAT64 well-known-prefix address (`64:ff9b::/96`).
pub fn nat64_embedded(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let a = u128::from(ip);
    in_v6(a, 0x0064_ff9b_0000_0000_0000_0000_0000_0000, 96).then(|| Ipv4Addr::from(a as u32))
}

/// Classifies an IPv6 address.
pub fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    if let Some(v4) = nat64_embedded(ip) {
        // The translator delivers to the embedded address, so it is judged as that address
        // (an always-refused one stays always refused).
        return classify_v4(v4);
    }
    let a = u128::from(ip);
    if a == 0 || in_v6(a, 0xff00 << 112, 8) {
        return AddressClass::AlwaysRefused;
    }
    let public = in_v6(a, 0x2000 << 112, 3)
        && !in_v6(a, 0x2001 << 112, 23)
        && !in_v6(a, 0x2001_0db8 << 96, 32)
        && !in_v6(a, 0x3fff << 112, 20)
        && !in_v6(a, 0x2002 << 112, 16);
    if public {
        AddressClass::Public
    } else {
        AddressClass::NonPublic
    }
}

/// Classifies any address.
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// True for anything but a public address.
pub fn is_non_public(ip: IpAddr) -> bool {
    classify(ip) != AddressClass::Public
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_table() {
        let cases = [
            ("0.1.2.3", false),
            ("9.255.255.255", true),
            ("10.0.0.1", false),
            ("11.0.0.1", true),
            ("100.63.255.254", true),
            ("100.64.0.1", false),
            ("100.127.255.254", false),
            ("100.128.0.1", true),
            ("127.0.0.1", false),
            ("127.255.255.254", false),
            ("169.254.169.254", false),
            ("172.15.255.255", true),
            ("172.16.0.1", false),
            ("172.31.255.255", false),
            ("172.32.0.1", true),
            ("192.0.0.8", false),
            ("192.0.2.1", false),
            ("192.88.99.1", false),
            ("192.167.255.255", true),
            ("192.168.1.1", false),
            ("198.17.255.255", true),
            ("198.18.0.1", false),
            ("198.19.255.255", false),
            ("198.20.0.1", true),
            ("198.51.100.1", false),
            ("203.0.113.1", false),
            ("224.0.0.1", false),
            ("239.255.255.255", false),
            ("240.0.0.1", false),
            ("255.255.255.255", false),
            ("8.8.8.8", true),
            ("::", false),
            ("::1", false),
            ("::ffff:10.0.0.1", false),
            ("::ffff:8.8.8.8", true),
            ("::8.8.8.8", false),
            ("64:ff9b::808:808", true),
            ("64:ff9b::a00:1", false),
            ("64:ff9b::7f00:1", false),
            ("64:ff9b:1::1", false),
            ("64:ff9c::1", false),
            ("100::1", false),
            ("2001::1", false),
            ("2001:0:4136:e378::1", false),
            ("2001:2::1", false),
            ("2001:db8::1", false),
            ("2002:808:808::1", false),
            ("2002:a00:1::1", false),
            ("2606:4700::1111", true),
            ("3fff::1", false),
            ("fc00::1", false),
            ("fd00::1", false),
            ("fe80::1", false),
            ("fec0::1", false),
            ("ff02::2", false),
        ];
        for (text, public) in cases {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(classify(ip) == AddressClass::Public, public, "{text}");
        }
    }

    #[test]
    fn always_refused() {
        for text in ["0.0.0.0", "::", "224.0.0.1", "255.255.255.255", "ff02::1"] {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(classify(ip), AddressClass::AlwaysRefused, "{text}");
        }
        assert_eq!(
            classify("127.0.0.1".parse().unwrap()),
            AddressClass::NonPublic
        );
    }
}
