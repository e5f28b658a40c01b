//! Leaf certificates for intercepted hosts (`http.md` §9 rule 3): ECDSA P-256, SAN = the host,
//! EKU serverAuth, valid from one hour ago for at most seven days (never past the CA), cached
//! per host in a bounded LRU as ready-made TLS server configurations.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use portcullis::policy::Host;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use time::{Duration, OffsetDateTime};

use super::ca::Ca;

/// Longest validity of a leaf.
const LEAF_LIFETIME: Duration = Duration::days(7);

/// Always answers with the one leaf of the intercepted host.
#[derive(Debug)]
struct FixedLeaf(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedLeaf {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Makes the TLS server configuration (leaf + CA chain, ALPN `http/1.1`) for one host.
pub fn make_server_config(ca: &Ca, host: &Host) -> Result<Arc<ServerConfig>, String> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("cannot generate a leaf key: {e}"))?;
    let mut params = CertificateParams::default();
    let text = host.to_string();
    let mut dn = DistinguishedName::new();
    if text.len() <= 64 {
        dn.push(DnType::CommonName, text.as_str());
    }
    params.distinguished_name = dn;
    params.subject_alt_names = vec![match host {
        Host::Ip { addr, .. } => SanType::IpAddress(*addr),
        Host::Name(name) => SanType::DnsName(
            name.to_string()
                .try_into()
                .map_err(|e| format!("{name} cannot be a certificate name: {e}"))?,
        ),
    }];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = (now + LEAF_LIFETIME).min(ca.not_after);
    let cert = params
        .signed_by(&key, &ca.issuer)
        .map_err(|e| format!("cannot sign the leaf for {host}: {e}"))?;
    let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone(), ca.cert_der.clone()];
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signer = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| format!("unusable leaf key: {e}"))?;
    let certified = Arc::new(CertifiedKey::new(chain, signer));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS server configuration: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(FixedLeaf(certified)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A bounded LRU of server configurations keyed by host.
pub struct LeafCache {
    capacity: usize,
    inner: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    entries: HashMap<String, (Arc<ServerConfig>, u64)>,
    /// Use tick → host, oldest first.
    order: BTreeMap<u64, String>,
    tick: u64,
}

impl Lru {
    fn touch(&mut self, host: &str) -> Option<Arc<ServerConfig>> {
        self.tick += 1;
        let tick = self.tick;
        let (config, used) = self.entries.get_mut(host)?;
        self.order.remove(used);
        *used = tick;
        self.order.insert(tick, host.to_string());
        Some(config.clone())
    }
}

impl LeafCache {
    /// A cache holding at most `capacity` hosts (at least one).
    pub fn new(capacity: usize) -> LeafCache {
        LeafCache {
            capacity: capacity.max(1),
            inner: Mutex::new(Lru::default()),
        }
    }

    /// Number of cached hosts.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        // A panic while holding the lock cannot leave the map inconsistent enough to matter.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached configuration for `host`, or one made by `make` (outside the lock) and cached,
    /// evicting the least recently used host when full.
    pub fn get_or_make(
        &self,
        host: &str,
        make: impl FnOnce() -> Result<Arc<ServerConfig>, String>,
    ) -> Result<Arc<ServerConfig>, String> {
        if let Some(c) = self.lock().touch(host) {
            return Ok(c);
        }
        let made = make()?;
        let mut lru = self.lock();
        // Another connection may have made one meanwhile: keep the first, so a host keeps one leaf.
        if let Some(c) = lru.touch(host) {
            return Ok(c);
        }
        while lru.entries.len() >= self.capacity {
            let Some((_, oldest)) = lru.order.pop_first() else {
                break;
            };
            lru.entries.remove(&oldest);
        }
        lru.tick += 1;
        let tick = lru.tick;
        lru.entries.insert(host.to_string(), (made.clone(), tick));
        lru.order.insert(tick, host.to_string());
        Ok(made)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis::policy::normalize_host;

    #[test]
    fn lru_keeps_bound_and_recent_hosts() {
        let ca = Ca::generate("px-t").unwrap();
        let cache = LeafCache::new(2);
        let make = |h: &str| {
            let host = normalize_host(h).unwrap();
            make_server_config(&ca, &host)
        };
        let a1 = cache.get_or_make("a.test", || make("a.test")).unwrap();
        cache.get_or_make("b.test", || make("b.test")).unwrap();
        // Touch a, then add c: b is evicted.
        let a2 = cache.get_or_make("a.test", || panic!("cached")).unwrap();
        assert!(Arc::ptr_eq(&a1, &a2));
        cache.get_or_make("c.test", || make("c.test")).unwrap();
        assert_eq!(cache.len(), 2);
        let mut remade = false;
        cache
            .get_or_make("b.test", || {
                remade = true;
                make("b.test")
            })
            .unwrap();
        assert!(remade);
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn leaf_for_ip_and_name() {
        let ca = Ca::generate("px-t").unwrap();
        for h in ["127.0.0.1", "[::1]", "api.example.test"] {
            let host = normalize_host(h.trim_matches(['[', ']'])).unwrap();
            let cfg = make_server_config(&ca, &host).unwrap();
            assert_eq!(cfg.alpn_protocols, vec![b"http/1.1".to_vec()]);
        }
    }
}
