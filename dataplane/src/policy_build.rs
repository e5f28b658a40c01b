//! Glue between the validated config and the data path: flag overrides, policy compilation,
//! identity, TLS client, secret files.

use std::sync::Arc;

use portcullis::config::{Config, ProxyOverrides};
use portcullis::policy::CompiledPolicy;

use crate::cli::Args;

/// The flags as config overrides (`config.md` §4).
pub fn overrides_from_args(a: &Args) -> ProxyOverrides {
    ProxyOverrides {
        http: a.http.clone(),
        socks5: a.socks5.clone(),
        admin: a.admin.clone(),
        allow: a.allow.clone(),
        deny: a.deny.clone(),
        mode: a.mode.clone(),
        control: a.control.clone(),
        control_token_file: a.control_token_file.clone(),
        session_id: a.session_id.clone(),
        control_timeout: a.control_timeout.map(|s| s.to_string()),
        mitm_dir: a.mitm_dir.clone(),
    }
}

/// Compiles the config's lists into the policy; the error is a `config error:` line.
pub fn compile(config: &Config) -> Result<CompiledPolicy, String> {
    CompiledPolicy::from_config(config).map_err(|e| e.to_string())
}

/// `px-` + 12 lowercase hex, new per process (the random tail of a UUIDv7).
pub fn new_proxy_id() -> String {
    let bytes = uuid::Uuid::now_v7().into_bytes();
    let mut id = String::from("px-");
    for b in &bytes[10..16] {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

/// TLS client for `https://` origins: the webpki roots plus `mitm.extra_upstream_ca_files`.
/// An unreadable or empty CA file is a startup failure naming the key and path.
pub fn tls_connector(config: &Config) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for (i, path) in config.mitm.extra_upstream_ca_files.iter().enumerate() {
        let key = format!("mitm.extra_upstream_ca_files[{i}]");
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{key}: invalid PEM in {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{key}: no certificate in {}", path.display()));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("{key}: unusable certificate in {}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(b) => b,
        // The ring provider always supports the default versions; keep a safe fallback anyway.
        Err(_) => rustls::ClientConfig::builder(),
    };
    let mut cfg = builder.with_root_certificates(roots).with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// The admin token, when `admin_token_file` is set.
pub fn admin_token(config: &Config) -> Result<Option<String>, String> {
    match &config.network.admin_token_file {
        Some(p) => portcullis::secret::read_secret_file("network.admin_token_file", p).map(Some),
        None => Ok(None),
    }
}
