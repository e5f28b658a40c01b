//! The compiled lookup structure for one list (`policy.md` §6). Lookup cost depends on the
//! number of labels of the host (or bits of the address), never on the number of entries.

use std::collections::HashMap;
use std::net::IpAddr;

use super::address::nat64_embedded;
use super::normalize::Host;
use super::pattern::{HostPattern, Pattern, glob_label_matches};

/// Entries sharing one host key, split by port. Port-specific entries win over any-port ones.
#[derive(Debug, Default, Clone)]
struct Slot {
    any: Option<u32>,
    ports: Vec<(u16, u32)>,
}

impl Slot {
    /// Records `idx` for `port`; false when the slot already has an entry for it (a duplicate).
    fn insert(&mut self, port: Option<u16>, idx: u32) -> bool {
        match port {
            None if self.any.is_some() => false,
            None => {
                self.any = Some(idx);
                true
            }
            Some(p) if self.ports.iter().any(|(q, _)| *q == p) => false,
            Some(p) => {
                self.ports.push((p, idx));
                true
            }
        }
    }

    /// The entry for `port` and whether it is port-specific.
    fn get_ranked(&self, port: u16) -> Option<(u32, bool)> {
        self.ports
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, i)| (*i, true))
            .or(self.any.map(|i| (i, false)))
    }

    fn get(&self, port: u16) -> Option<u32> {
        self.ports
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, i)| *i)
            .or(self.any)
    }
}

#[derive(Debug, Clone)]
struct GlobEntry {
    labels: Box<[Box<str>]>,
    port: Option<u16>,
    idx: u32,
}

#[derive(Debug, Clone)]
struct IpEntry {
    zone: Option<Box<str>>,
    port: Option<u16>,
    idx: u32,
}

/// One compiled list (allow or deny).
#[derive(Debug, Default, Clone)]
pub struct PatternIndex {
    patterns: Vec<Pattern>,
    exact: HashMap<Box<str>, Slot>,
    sub: HashMap<Box<str>, Slot>,
    apex: HashMap<Box<str>, Slot>,
    globs: HashMap<Box<str>, Vec<GlobEntry>>,
    ips: HashMap<IpAddr, Vec<IpEntry>>,
    cidr_v4: Vec<(u8, HashMap<u32, Slot>)>,
    cidr_v6: Vec<(u8, HashMap<u128, Slot>)>,
    global: Slot,
}

impl PatternIndex {
    /// Builds the index; duplicate entries (same host and port) collapse, the first one wins.
    pub fn build(patterns: impl IntoIterator<Item = Pattern>) -> PatternIndex {
        let patterns = patterns.into_iter();
        let mut ix = PatternIndex {
            patterns: Vec::with_capacity(patterns.size_hint().0),
            ..PatternIndex::default()
        };
        for p in patterns {
            ix.insert(p);
        }
        ix.cidr_v4.sort_by_key(|l| std::cmp::Reverse(l.0));
        ix.cidr_v6.sort_by_key(|l| std::cmp::Reverse(l.0));
        ix
    }

    /// Adds `p` unless an entry with the same host and port is already there: the slot that
    /// finds the duplicate is the dedupe, so building hashes each entry once.
    fn insert(&mut self, p: Pattern) {
        let idx = self.patterns.len() as u32;
        let port = p.port;
        let added = match &p.host {
            HostPattern::Global => self.global.insert(port, idx),
            HostPattern::Exact(n) => self.exact.entry(n.clone()).or_default().insert(port, idx),
            HostPattern::Suffix { base, apex: false } => {
                self.sub.entry(base.clone()).or_default().insert(port, idx)
            }
            HostPattern::Suffix { base, apex: true } => {
                self.apex.entry(base.clone()).or_default().insert(port, idx)
            }
            HostPattern::Glob { labels, anchor } => {
                let bucket = self.globs.entry(anchor.clone()).or_default();
                let dup = bucket
                    .iter()
                    .any(|g| g.port == port && g.labels[..] == labels[..]);
                if !dup {
                    bucket.push(GlobEntry {
                        labels: labels.clone().into_boxed_slice(),
                        port,
                        idx,
                    });
                }
                !dup
            }
            HostPattern::Ip { addr, zone } => {
                let bucket = self.ips.entry(*addr).or_default();
                let dup = bucket.iter().any(|e| e.port == port && e.zone == *zone);
                if !dup {
                    bucket.push(IpEntry {
                        zone: zone.clone(),
                        port,
                        idx,
                    });
                }
                !dup
            }
            HostPattern::Cidr { net, prefix } => match net {
                IpAddr::V4(v4) => level_mut(&mut self.cidr_v4, *prefix)
                    .entry(u32::from(*v4))
                    .or_default()
                    .insert(port, idx),
                IpAddr::V6(v6) => level_mut(&mut self.cidr_v6, *prefix)
                    .entry(u128::from(*v6))
                    .or_default()
                    .insert(port, idx),
            },
        };
        if added {
            self.patterns.push(p);
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.patterns.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The entries, in insertion order.
    pub fn patterns(&self) -> &[Pattern] {
        &self.patterns
    }

    /// The entry an index refers to.
    pub fn pattern(&self, idx: u32) -> &Pattern {
        &self.patterns[idx as usize]
    }

    /// The most specific entry matching `host` on `port` (`policy.md` §2 rule 9).
    pub fn lookup(&self, host: &Host, port: u16) -> Option<&Pattern> {
        let idx = match host {
            Host::Name(name) => self.lookup_name(name, port),
            Host::Ip { addr, zone } => self.lookup_ip(*addr, zone.as_deref(), port),
        };
        idx.or_else(|| self.global.get(port))
            .map(|i| self.pattern(i))
    }

    /// An exact entry (exact name or single IP) equal to `host` on `port` (`policy.md` §3).
    pub fn lookup_exact(&self, host: &Host, port: u16) -> Option<&Pattern> {
        let idx = match host {
            Host::Name(name) => self.exact.get(&**name).and_then(|s| s.get(port)),
            Host::Ip { addr, zone } => self.ip_exact(*addr, zone.as_deref(), port),
        };
        idx.map(|i| self.pattern(i))
    }

    /// IP and CIDR entries matching a resolved address (deny entries apply to these).
    pub fn lookup_address(&self, addr: IpAddr, port: u16) -> Option<&Pattern> {
        self.lookup_ip(addr, None, port).map(|i| self.pattern(i))
    }

    fn lookup_name(&self, name: &str, port: u16) -> Option<u32> {
        if let Some(i) = self.exact.get(name).and_then(|s| s.get(port)) {
            return Some(i);
        }
        if let Some(i) = self.apex.get(name).and_then(|s| s.get(port)) {
            return Some(i);
        }
        // Proper suffixes, longest first: `b.example.com`, `example.com`, `com`.
        let mut glob_hit = None;
        for (dot, _) in name.match_indices('.') {
            let suffix = &name[dot + 1..];
            // `*.suffix` and `**.suffix` are equally specific here; a port-scoped one wins.
            let sub = self.sub.get(suffix).and_then(|s| s.get_ranked(port));
            let apex = self.apex.get(suffix).and_then(|s| s.get_ranked(port));
            match (sub, apex) {
                (Some((_, false)), Some((i, true))) => return Some(i),
                (Some((i, _)), _) | (None, Some((i, _))) => return Some(i),
                (None, None) => {}
            }
            if glob_hit.is_none()
                && !self.globs.is_empty()
                && let Some(bucket) = self.globs.get(suffix)
            {
                glob_hit = match_globs(bucket, name, port);
            }
        }
        glob_hit
    }

    fn ip_exact(&self, addr: IpAddr, zone: Option<&str>, port: u16) -> Option<u32> {
        let entries = self.ips.get(&addr)?;
        let fits = |e: &&IpEntry| e.zone.is_none() || e.zone.as_deref() == zone;
        entries
            .iter()
            .filter(fits)
            .find(|e| e.port == Some(port))
            .or_else(|| entries.iter().filter(fits).find(|e| e.port.is_none()))
            .map(|e| e.idx)
    }

    fn lookup_ip(&self, addr: IpAddr, zone: Option<&str>, port: u16) -> Option<u32> {
        if let Some(i) = self.ip_exact(addr, zone, port) {
            return Some(i);
        }
        if let Some(i) = self.cidr(addr, port) {
            return Some(i);
        }
        // NAT64: also matched as the embedded IPv4 address.
        if let IpAddr::V6(v6) = addr
            && let Some(v4) = nat64_embedded(v6)
        {
            let v4 = IpAddr::V4(v4);
            return self
                .ip_exact(v4, None, port)
                .or_else(|| self.cidr(v4, port));
        }
        None
    }

    fn cidr(&self, addr: IpAddr, port: u16) -> Option<u32> {
        match addr {
            IpAddr::V4(v4) => {
                let a = u32::from(v4);
                self.cidr_v4.iter().find_map(|(len, map)| {
                    let net = a & (u32::MAX << (32 - *len as u32));
                    map.get(&net).and_then(|s| s.get(port))
                })
            }
            IpAddr::V6(v6) => {
                let a = u128::from(v6);
                self.cidr_v6.iter().find_map(|(len, map)| {
                    let net = a & (u128::MAX << (128 - *len as u32));
                    map.get(&net).and_then(|s| s.get(port))
                })
            }
        }
    }
}

fn level_mut<K>(levels: &mut Vec<(u8, HashMap<K, Slot>)>, prefix: u8) -> &mut HashMap<K, Slot> {
    let pos = match levels.iter().position(|(l, _)| *l == prefix) {
        Some(p) => p,
        None => {
            levels.push((prefix, HashMap::new()));
            levels.len() - 1
        }
    };
    &mut levels[pos].1
}

fn match_globs(bucket: &[GlobEntry], name: &str, port: u16) -> Option<u32> {
    let mut any_port = None;
    for g in bucket {
        if g.port.is_some_and(|p| p != port) {
            continue;
        }
        if g.labels.len() != name.split('.').count() {
            continue;
        }
        if g.labels
            .iter()
            .zip(name.split('.'))
            .all(|(p, l)| glob_label_matches(p.as_bytes(), l.as_bytes()))
        {
            if g.port.is_some() {
                return Some(g.idx);
            }
            any_port.get_or_insert(g.idx);
        }
    }
    any_port
}
