//! Resolve a name once: the system resolver (with `/etc/hosts`) or the configured `dns_servers`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::xfer::Protocol as DnsTransport;
use portcullis::decision::ResolveFailure;

/// The resolver the data plane uses for policy step 5.
pub enum Resolver {
    /// `getaddrinfo` through tokio's blocking pool (honours `/etc/hosts` and nsswitch).
    System,
    /// Only the configured servers (UDP, falling back to TCP), no hosts file.
    Servers(Box<TokioResolver>),
}

impl Resolver {
    /// Builds the resolver for `dns_servers` (empty = system).
    pub fn new(servers: &[SocketAddr]) -> Resolver {
        if servers.is_empty() {
            return Resolver::System;
        }
        let mut config = ResolverConfig::new();
        for addr in servers {
            config.add_name_server(NameServerConfig::new(*addr, DnsTransport::Udp));
            config.add_name_server(NameServerConfig::new(*addr, DnsTransport::Tcp));
        }
        let mut opts = ResolverOpts::default();
        // The caller bounds the whole lookup; hickory's own retries stay inside that budget.
        opts.attempts = 2;
        opts.timeout = Duration::from_secs(1);
        opts.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
        opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
        opts.cache_size = 1024;
        opts.positive_max_ttl = Some(Duration::from_secs(300));
        let resolver =
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
                .with_options(opts)
                .build();
        Resolver::Servers(Box::new(resolver))
    }

    /// Resolves `name` (A and AAAA) within `budget`. IPv4-mapped answers are rewritten to IPv4;
    /// duplicates removed; resolver order kept.
    pub async fn resolve(
        &self,
        name: &str,
        budget: Duration,
    ) -> Result<Vec<IpAddr>, ResolveFailure> {
        let lookup = async {
            match self {
                Resolver::System => match tokio::net::lookup_host((name, 0)).await {
                    Ok(iter) => Ok(iter.map(|sa| sa.ip()).collect::<Vec<_>>()),
                    Err(_) => Err(ResolveFailure::LookupFailed),
                },
                Resolver::Servers(r) => match r.lookup_ip(fqdn(name)).await {
                    Ok(lookup) => Ok(lookup.iter().collect()),
                    Err(e) if no_addresses(&e) => Err(ResolveFailure::NoAddresses),
                    Err(_) => Err(ResolveFailure::LookupFailed),
                },
            }
        };
        let mut addrs = match tokio::time::timeout(budget, lookup).await {
            Ok(r) => r?,
            Err(_) => return Err(ResolveFailure::TimedOut),
        };
        let mut seen = Vec::with_capacity(addrs.len());
        addrs.retain(|a| {
            let a = canonical(*a);
            if seen.contains(&a) {
                false
            } else {
                seen.push(a);
                true
            }
        });
        if seen.is_empty() {
            return Err(ResolveFailure::NoAddresses);
        }
        Ok(seen)
    }
}

/// Whether a failed lookup means the name has no addresses (NOERROR without A/AAAA records, or
/// NXDOMAIN). hickory reports a SERVFAIL or REFUSED answer as "no records found" too, but that is
/// a failed lookup: `decisions.md` §5 names the cause `lookup failed`, not `no addresses`
/// (issue 12, found by faults.rs `dns_servfail_fails_closed_and_dials_nothing`).
fn no_addresses(e: &hickory_resolver::ResolveError) -> bool {
    matches!(
        e.proto().map(|p| p.kind()),
        Some(ProtoErrorKind::NoRecordsFound {
            response_code: ResponseCode::NoError | ResponseCode::NXDomain,
            ..
        })
    )
}

/// IPv4-mapped IPv6 addresses are IPv4 addresses.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Names are absolute: no search-domain expansion may turn `foo` into `foo.corp`.
fn fqdn(name: &str) -> String {
    let mut s = String::with_capacity(name.len() + 1);
    s.push_str(name);
    s.push('.');
    s
}
