//! The interception CA (`http.md` §9 rule 1, `config.md` §1.4): generated per run with its
//! private key kept in memory only, or loaded from the `[mitm]` files (and, with
//! `create_ca_files`, generated once and written there).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use portcullis::config::MitmConfig;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

/// A CA able to sign leaf certificates.
pub struct Ca {
    /// Signs leaves; owns the private key (never serialised unless `create_ca_files`).
    pub issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (DER), sent after each leaf.
    pub cert_der: CertificateDer<'static>,
    /// The CA certificate (PEM), exported as `ca.pem`.
    pub cert_pem: String,
    /// End of the CA's validity: no leaf outlives it.
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// How long a generated CA is valid (from one hour ago).
const CA_LIFETIME: Duration = Duration::days(30);

impl Ca {
    /// Loads the configured CA, creates it (`create_ca_files`), or generates one in memory.
    pub fn prepare(cfg: &MitmConfig, proxy_id: &str) -> Result<Ca, String> {
        match (&cfg.ca_cert_file, &cfg.ca_key_file) {
            (Some(cert), Some(key)) => {
                if cfg.create_ca_files {
                    match (cert.exists(), key.exists()) {
                        (false, false) => return Ca::create_files(cert, key, proxy_id),
                        (true, true) => {}
                        (false, true) => {
                            return Err(format!(
                                "mitm.ca_cert_file: {} does not exist but mitm.ca_key_file does; remove the key or restore the certificate",
                                cert.display()
                            ));
                        }
                        (true, false) => {
                            return Err(format!(
                                "mitm.ca_key_file: {} does not exist but mitm.ca_cert_file does; remove the certificate or restore the key",
                                key.display()
                            ));
                        }
                    }
                }
                Ca::load(cert, key)
            }
            _ => Ca::generate(proxy_id),
        }
    }

    /// A fresh ECDSA P-256 CA; the key stays in memory.
    pub fn generate(proxy_id: &str) -> Result<Ca, String> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| format!("cannot generate the MITM CA key: {e}"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("Portcullis interception CA {proxy_id}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let not_before = OffsetDateTime::now_utc() - Duration::hours(1);
        params.not_before = not_before;
        params.not_after = not_before + CA_LIFETIME;
        let cert = params
            .self_signed(&key)
            .map_err(|e| format!("cannot sign the MITM CA certificate: {e}"))?;
        Ok(Ca {
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            not_after: params.not_after,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a PEM certificate and a private PKCS#8 key (a regular file, mode 0600 or stricter).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Ca, String> {
        let key_pem = portcullis::secret::read_secret_file("mitm.ca_key_file", key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| {
            format!(
                "mitm.ca_key_file: {} is not a usable PKCS#8 private key: {e}",
                key_path.display()
            )
        })?;
        let text = std::fs::read(cert_path).map_err(|e| {
            format!(
                "mitm.ca_cert_file: cannot read {}: {e}",
                cert_path.display()
            )
        })?;
        let der = pem::parse_many(&text)
            .map_err(|e| {
                format!(
                    "mitm.ca_cert_file: invalid PEM in {}: {e}",
                    cert_path.display()
                )
            })?
            .into_iter()
            .find(|p| p.tag() == "CERTIFICATE")
            .map(|p| CertificateDer::from(p.into_contents()))
            .ok_or_else(|| {
                format!(
                    "mitm.ca_cert_file: no certificate in {}",
                    cert_path.display()
                )
            })?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).map_err(|e| {
            format!(
                "mitm.ca_cert_file: unusable certificate in {}: {e}",
                cert_path.display()
            )
        })?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(format!(
                "mitm.ca_key_file: {} does not belong to the certificate in {}",
                key_path.display(),
                cert_path.display()
            ));
        }
        let not_after = parsed.validity().not_after.to_datetime();
        if not_after <= OffsetDateTime::now_utc() {
            return Err(format!(
                "mitm.ca_cert_file: the certificate in {} has expired",
                cert_path.display()
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| {
            format!(
                "mitm.ca_cert_file: unusable certificate in {}: {e}",
                cert_path.display()
            )
        })?;
        let cert_pem = pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()));
        Ok(Ca {
            issuer,
            cert_der: der,
            cert_pem,
            not_after,
        })
    }

    /// `create_ca_files` with both files absent: generate, write the key (0600) and the
    /// certificate (0644), each atomically.
    fn create_files(cert_path: &Path, key_path: &Path, proxy_id: &str) -> Result<Ca, String> {
        let ca = Ca::generate(proxy_id)?;
        let key_pem = ca.issuer.key().serialize_pem();
        write_atomic(key_path, key_pem.as_bytes(), 0o600)
            .map_err(|e| format!("mitm.ca_key_file: cannot write {}: {e}", key_path.display()))?;
        write_atomic(cert_path, ca.cert_pem.as_bytes(), 0o644).map_err(|e| {
            format!(
                "mitm.ca_cert_file: cannot write {}: {e}",
                cert_path.display()
            )
        })?;
        tracing::info!(cert = %cert_path.display(), key = %key_path.display(), "created the MITM CA files");
        Ok(ca)
    }
}

/// Writes `data` to a temporary file beside `path` with `mode`, then renames it into place.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        // The umask may have narrowed the mode; the spec fixes it.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ca_is_a_constrained_p256_ca() {
        let ca = Ca::generate("px-0123456789ab").unwrap();
        let (_, c) = x509_parser::parse_x509_certificate(&ca.cert_der).unwrap();
        assert!(
            c.subject()
                .to_string()
                .contains("Portcullis interception CA px-0123456789ab")
        );
        let bc = c.basic_constraints().unwrap().unwrap();
        assert!(bc.critical);
        assert!(bc.value.ca);
        assert_eq!(bc.value.path_len_constraint, Some(0));
        let ku = c.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
        let lifetime = c.validity().not_after.to_datetime() - c.validity().not_before.to_datetime();
        assert_eq!(lifetime, CA_LIFETIME);
        assert!(!ca.cert_pem.contains("PRIVATE KEY"));
    }

    #[test]
    fn created_files_load_back_as_the_same_ca() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("pc-ca-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("ca.pem");
        let key = dir.join("ca.key");
        let _ = std::fs::remove_file(&cert);
        let _ = std::fs::remove_file(&key);
        let cfg = MitmConfig {
            ca_cert_file: Some(cert.clone()),
            ca_key_file: Some(key.clone()),
            create_ca_files: true,
            ..MitmConfig::default()
        };
        let first = Ca::prepare(&cfg, "px-1").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&cert), 0o644);
        let second = Ca::prepare(&cfg, "px-2").unwrap();
        assert_eq!(first.cert_der, second.cert_der);
        // A key readable by others is refused.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Ca::prepare(&cfg, "px-3").unwrap_err();
        assert!(e.contains("mitm.ca_key_file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
