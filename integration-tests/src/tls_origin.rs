//! Loopback HTTPS origins with their own rcgen CA, for interception tests.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::origin::{Origin, read_head, try_spawn};

/// A test CA: its PEM on disk (for `extra_upstream_ca_files` or `curl --cacert`) and an issuer.
pub struct TestCa {
    /// `ca.pem` of this CA.
    pub pem_path: PathBuf,
    /// The certificate PEM text.
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    _dir: tempfile::TempDir,
}

impl TestCa {
    /// A fresh CA named `name`.
    pub fn new(name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).expect("CA cert");
        let dir = tempfile::tempdir().expect("tempdir");
        let pem_path = dir.path().join("origin-ca.pem");
        std::fs::write(&pem_path, cert.pem()).expect("write CA");
        TestCa {
            pem_path,
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
            _dir: dir,
        }
    }

    /// A server configuration with a leaf for `names` (DNS names or IP texts) signed by this CA.
    pub fn server_config(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).expect("leaf params");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
        let chain = vec![cert.der().clone()];
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .expect("server config");
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(cfg)
    }
}

/// An HTTPS echo origin: answers every request with JSON `{"method","path","body_len"}`.
pub struct HttpsOrigin {
    /// The running origin (connections, recorded requests).
    pub origin: Origin,
    /// The CA that signed its certificate.
    pub ca: TestCa,
}

impl HttpsOrigin {
    /// Port.
    pub fn port(&self) -> u16 {
        self.origin.port()
    }
}

/// Starts an HTTPS echo origin on `ip:port` (0 = any) with a certificate for `names`.
pub fn https_echo_at(ip: &str, port: u16, names: &[&str]) -> std::io::Result<HttpsOrigin> {
    let ca = TestCa::new("Portcullis test origin CA");
    let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config(names));
    let origin = try_spawn(
        ip,
        port,
        Arc::new(move |s, log| {
            let acceptor = acceptor.clone();
            Box::pin(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                for _ in 0..1000 {
                    let Some((head, rest)) = read_head(&mut tls).await else {
                        return;
                    };
                    let len: usize = head
                        .headers
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                        .and_then(|(_, v)| v.parse().ok())
                        .unwrap_or(0);
                    // Bodies are small in these tests; read exactly what was announced.
                    let mut body = rest;
                    while body.len() < len {
                        let mut chunk = vec![0u8; len - body.len()];
                        match tls.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => body.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let v = serde_json::json!({
                        "method": head.method,
                        "path": head.target,
                        "body_len": len,
                    });
                    log.lock().unwrap().push(v.clone());
                    let body = v.to_string();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
                        body.len(),
                        body
                    );
                    if tls.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            })
        }),
    )?;
    Ok(HttpsOrigin { origin, ca })
}

/// [`https_echo_at`] on any port of `ip`, certificate for that IP.
pub fn https_echo(ip: &str) -> HttpsOrigin {
    https_echo_at(ip, 0, &[ip]).unwrap_or_else(|e| panic!("bind HTTPS origin on {ip}: {e}"))
}

/// An HTTPS echo origin on port 443 of some loopback address `127.0.x.y` (SOCKS5 limited mode
/// intercepts only port 443). Tries a bounded number of addresses; returns the IP text too.
pub fn https_echo_443() -> (HttpsOrigin, String) {
    let base = std::process::id();
    let mut last = None;
    for i in 0..64u32 {
        let n = base.wrapping_add(i.wrapping_mul(7919));
        let ip = format!(
            "127.{}.{}.{}",
            100 + (n % 100),
            (n / 100) % 250 + 1,
            i % 250 + 2
        );
        match https_echo_at(&ip, 443, &[&ip]) {
            Ok(o) => return (o, ip),
            Err(e) => last = Some(e),
        }
    }
    panic!("cannot bind an HTTPS origin on port 443 of any loopback address: {last:?}");
}
