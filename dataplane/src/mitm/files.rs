//! The exported trust files (`http.md` §9 rule 1, `env.md` §3): `ca.pem` (the interception CA
//! alone) and `ca-bundle.pem` (system roots, inherited CA files, the CA) in a private directory.
//! Only `CERTIFICATE` blocks are ever written; the CA key never goes here.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::ca::write_atomic;

/// Where the system's trusted roots usually live (the first readable one is used).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
];

/// The files written at startup; removed again at clean shutdown.
#[derive(Debug)]
pub struct Exported {
    /// The directory holding both files.
    pub dir: PathBuf,
    /// `<dir>/ca.pem`.
    pub ca_cert_path: PathBuf,
    /// `<dir>/ca-bundle.pem`.
    pub ca_bundle_path: PathBuf,
    created_dir: bool,
}

impl Exported {
    /// Removes the generated files and, when the proxy created it, the directory.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.ca_cert_path);
        let _ = std::fs::remove_file(&self.ca_bundle_path);
        if self.created_dir {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

/// The default output directory: `<runtime>/portcullis-proxy-<pid>`.
pub fn default_dir(env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    let runtime = env("XDG_RUNTIME_DIR")
        .filter(|v| !v.is_empty() && Path::new(v).is_absolute())
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    runtime.join(format!("portcullis-proxy-{}", std::process::id()))
}

/// Creates (0700) or checks the directory and writes both files atomically, mode 0644.
pub fn export(
    out_dir: Option<&Path>,
    ca_pem: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Exported, String> {
    let dir = out_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| default_dir(env));
    let created_dir = prepare_dir(&dir)?;
    let exported = Exported {
        ca_cert_path: dir.join("ca.pem"),
        ca_bundle_path: dir.join("ca-bundle.pem"),
        dir,
        created_dir,
    };
    let bundle = bundle(ca_pem, env);
    let write = || -> Result<(), String> {
        write_atomic(&exported.ca_cert_path, ca_pem.as_bytes(), 0o644).map_err(|e| {
            format!(
                "mitm.out_dir: cannot write {}: {e}",
                exported.ca_cert_path.display()
            )
        })?;
        write_atomic(&exported.ca_bundle_path, bundle.as_bytes(), 0o644).map_err(|e| {
            format!(
                "mitm.out_dir: cannot write {}: {e}",
                exported.ca_bundle_path.display()
            )
        })
    };
    if let Err(e) = write() {
        exported.remove();
        return Err(e);
    }
    Ok(exported)
}

/// Creates the directory 0700 (returns true), or accepts an existing one only when it is a
/// real directory owned by this user and closed to group and others.
fn prepare_dir(dir: &Path) -> Result<bool, String> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(format!(
                "mitm.out_dir: cannot create {}: {e}",
                dir.display()
            ));
        }
    }
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| format!("mitm.out_dir: cannot inspect {}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!(
            "mitm.out_dir: {} exists and is not a directory",
            dir.display()
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid {
        return Err(format!(
            "mitm.out_dir: {} is owned by another user (uid {})",
            dir.display(),
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "mitm.out_dir: {} is open to other users (mode {mode:04o}); run chmod 700 {}",
            dir.display(),
            dir.display()
        ));
    }
    Ok(false)
}

/// System roots + the certificates of every file a CA variable names + the CA, PEM.
fn bundle(ca_pem: &str, env: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::new();
    if let Some(system) = SYSTEM_BUNDLES.iter().find_map(|p| std::fs::read(p).ok()) {
        out.push_str(&certificates_only(&system));
    } else {
        tracing::warn!(
            "no system CA bundle found; ca-bundle.pem holds only inherited and interception CAs"
        );
    }
    let vars = portcullis::config::CA_BUNDLE_VARS
        .iter()
        .chain(portcullis::config::CA_ALONE_VARS.iter());
    for var in vars {
        let Some(path) = env(var).filter(|v| !v.is_empty()) else {
            continue;
        };
        match std::fs::read(&path) {
            Ok(bytes) => out.push_str(&certificates_only(&bytes)),
            Err(e) => {
                tracing::warn!(variable = var, %path, error = %e, "skipping unreadable CA file")
            }
        }
    }
    out.push_str(ca_pem);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// The `CERTIFICATE` blocks of a PEM file, re-encoded (private keys and anything else dropped).
fn certificates_only(bytes: &[u8]) -> String {
    match pem::parse_many(bytes) {
        Ok(blocks) => {
            let certs: Vec<pem::Pem> = blocks
                .into_iter()
                .filter(|p| p.tag() == "CERTIFICATE")
                .collect();
            pem::encode_many(&certs)
        }
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_certificate_blocks_are_copied() {
        let ca = super::super::ca::Ca::generate("px-t").unwrap();
        let key = ca.issuer.key().serialize_pem();
        let mixed = format!("{key}{}", ca.cert_pem);
        let out = certificates_only(mixed.as_bytes());
        assert!(out.contains("BEGIN CERTIFICATE"));
        assert!(!out.contains("PRIVATE KEY"));
    }

    #[test]
    fn export_writes_and_removes_private_dir() {
        use std::os::unix::fs::PermissionsExt;
        let ca = super::super::ca::Ca::generate("px-t").unwrap();
        let base = std::env::temp_dir().join(format!("pc-export-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let e = export(Some(&base), &ca.cert_pem, &|_| None).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&base), 0o700);
        assert_eq!(mode(&e.ca_cert_path), 0o644);
        let bundle = std::fs::read_to_string(&e.ca_bundle_path).unwrap();
        assert!(bundle.contains(ca.cert_pem.trim()));
        assert!(!bundle.contains("PRIVATE KEY"));
        e.remove();
        assert!(!base.exists());
        // An existing directory open to others is refused.
        std::fs::create_dir(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = export(Some(&base), &ca.cert_pem, &|_| None).unwrap_err();
        assert!(err.contains("open to other users"), "{err}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
