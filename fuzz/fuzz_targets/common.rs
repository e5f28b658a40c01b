//! Shared helpers of the fuzz targets: the policy invariant every decision must satisfy.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use portcullis::decision::{Protocol, ResolveFailure};
use portcullis::policy::{
    AddressClass, AddressPlan, AskMode, CompiledPolicy, Host, HostPattern, ListKind, NameStage,
    Pattern, PolicySpec, RequestContext, canonical_ip, classify, normalize_host, parse_pattern,
};

/// `policy.md` §1: normalising a normalised host gives the same host (both spellings the
/// proxy writes: the plain display and the bracketed IPv6 authority form).
pub fn assert_normalisation_idempotent(host: &Host) {
    let text = host.to_string();
    let again = normalize_host(&text);
    assert_eq!(
        again.as_ref(),
        Ok(host),
        "normalise({text:?}) is not idempotent"
    );
    if text.contains(':') {
        let bracketed = format!("[{text}]");
        assert_eq!(
            normalize_host(&bracketed).as_ref(),
            Ok(host),
            "normalise({bracketed:?}) differs from the unbracketed spelling"
        );
    }
}

/// Parses one entry; if it is valid, its normalised text parses to the same pattern.
pub fn checked_pattern(raw: &str, list: ListKind) -> Option<Pattern> {
    let p = parse_pattern(raw, list).ok()?;
    let again = parse_pattern(&p.text, list);
    assert_eq!(
        again.as_ref(),
        Ok(&p),
        "pattern {raw:?} → {:?} does not re-parse to itself",
        p.text
    );
    Some(p)
}

fn port_matches(p: &Pattern, port: u16) -> bool {
    p.port.is_none_or(|pp| pp == port)
}

/// The entry covers the address: same IP (an entry with a zone only covers that zone, §3
/// rule 6; a resolved address has none), or inside the CIDR block.
fn covers(p: &Pattern, ip: IpAddr, zone: Option<&str>) -> bool {
    match &p.host {
        HostPattern::Ip { addr, zone: z } => {
            canonical_ip(*addr) == ip && z.as_deref().is_none_or(|z| Some(z) == zone)
        }
        HostPattern::Cidr { net, prefix } => match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(*prefix)).unwrap_or(0);
                u32::from(*n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(*prefix)).unwrap_or(0);
                u128::from(*n) & mask == u128::from(a) & mask
            }
            _ => false,
        },
        _ => false,
    }
}

/// An exact allow entry naming the host itself (exact name, or the same IP literal).
fn exact_entry_names(p: &Pattern, host: &Host, port: u16) -> bool {
    if !p.is_exact() || !port_matches(p, port) {
        return false;
    }
    match (&p.host, host) {
        (HostPattern::Exact(n), Host::Name(h)) => n == h,
        (HostPattern::Ip { addr, zone: z }, Host::Ip { addr: h, zone: hz }) => {
            canonical_ip(*addr) == *h && z.as_deref().is_none_or(|z| Some(z) == hz.as_deref())
        }
        _ => false,
    }
}

/// The address is the literal the host names (the IP itself, or loopback for `localhost`).
fn literal_of(host: &Host, ip: IpAddr) -> bool {
    match host {
        Host::Ip { addr, .. } => *addr == ip,
        h if h.is_loopback_name() => {
            ip == IpAddr::V4(Ipv4Addr::LOCALHOST) || ip == IpAddr::V6(Ipv6Addr::LOCALHOST)
        }
        _ => false,
    }
}

pub struct Scenario {
    pub enabled: bool,
    pub limited: bool,
    pub mitm: bool,
    pub allow_local_binding: bool,
    pub asks: AskMode,
    pub allowed: Vec<Pattern>,
    pub denied: Vec<Pattern>,
    pub session_allows: Vec<(String, Protocol, u16)>,
}

impl Scenario {
    pub fn compile(&self) -> CompiledPolicy {
        let spec = PolicySpec {
            enabled: self.enabled,
            limited: self.limited,
            mitm: self.mitm,
            allow_local_binding: self.allow_local_binding,
            allowed: self.allowed.iter().map(|p| p.text.clone()).collect(),
            denied: self.denied.iter().map(|p| p.text.clone()).collect(),
            session_allows: self.session_allows.clone(),
            asks: self.asks,
        };
        match CompiledPolicy::compile(&spec) {
            Ok(c) => c,
            Err(e) => panic!("entries that parsed one by one failed to compile: {e:?}"),
        }
    }
}

/// Runs both stages of the decision and checks the invariants of `policy.md` §4–§5 on the
/// outcome. Returns whether the request was allowed (with the addresses to dial).
pub fn decide_and_check(
    sc: &Scenario,
    policy: &CompiledPolicy,
    protocol: Protocol,
    host: &Host,
    port: u16,
    method: Option<&str>,
    upgrade: bool,
    resolved: &[IpAddr],
) -> Option<Vec<IpAddr>> {
    let ctx = RequestContext {
        protocol,
        host,
        port,
        method,
        upgrade,
        own_addrs: &[],
    };
    let proceed = match policy.check_name(&ctx) {
        NameStage::Refuse(_) => return None,
        NameStage::Proceed(p) => p,
    };
    assert!(
        sc.enabled,
        "a disabled proxy let {host} through the name stage"
    );
    // Deny wins: an exact deny entry for the host, or one covering the literal, never passes.
    for d in &sc.denied {
        if exact_entry_names(d, host, port) {
            panic!(
                "deny entry {:?} names {host}:{port} but the name stage passed",
                d.text
            );
        }
        if let Host::Ip { addr: ip, zone } = host
            && port_matches(d, port)
            && covers(d, *ip, zone.as_deref())
        {
            panic!(
                "deny entry {:?} covers {ip} but the name stage passed",
                d.text
            );
        }
    }
    let addrs: Vec<IpAddr> = match &proceed.plan {
        AddressPlan::Addresses(a) => a.clone(),
        AddressPlan::Resolve(name) => {
            assert_eq!(
                Some(name.as_str()),
                host.as_name(),
                "resolving another name"
            );
            assert!(
                !host.is_loopback_name(),
                "loopback names are never sent to DNS"
            );
            if resolved.is_empty() {
                let r = policy.resolution_failed(&ctx, &proceed, ResolveFailure::NoAddresses);
                assert_eq!(
                    r.is_none(),
                    sc.allow_local_binding,
                    "unresolvable name must fail closed unless allow_local_binding"
                );
                return None;
            }
            resolved.to_vec()
        }
    };
    if policy.check_addresses(&ctx, &proceed, &addrs).is_err() {
        return None;
    }
    // Allowed: every address the data plane may dial is checked here.
    for &raw in &addrs {
        let ip = canonical_ip(raw);
        let class = classify(ip);
        assert_ne!(
            class,
            AddressClass::AlwaysRefused,
            "always-refused {ip} allowed for {host}:{port}"
        );
        for d in &sc.denied {
            assert!(
                !(port_matches(d, port) && covers(d, ip, None)),
                "deny entry {:?} covers {ip} but {host}:{port} was allowed",
                d.text
            );
        }
        if class != AddressClass::Public && !sc.allow_local_binding {
            assert!(
                proceed.opened_local
                    && literal_of(host, ip)
                    && sc.allowed.iter().any(|p| exact_entry_names(p, host, port)),
                "non-public {ip} allowed for {host}:{port} without an exact allow entry \
                 naming that literal (allowed = {:?}, session = {:?})",
                sc.allowed.iter().map(|p| &p.text).collect::<Vec<_>>(),
                sc.session_allows
            );
        }
    }
    Some(addrs)
}

pub fn protocol_of(b: u8) -> Protocol {
    match b % 5 {
        0 => Protocol::Http,
        1 => Protocol::HttpsConnect,
        2 => Protocol::Socks5Tcp,
        3 => Protocol::Socks5Udp,
        _ => Protocol::UnixSocket,
    }
}
