//! The bearer token file (control.md §1.4) and the constant-time check of §1.3.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Loads the token, creating the file (0600, 64 lowercase hex + newline) when it is missing.
pub fn load_or_create(path: &Path) -> Result<String, String> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(path),
        Err(e) => Err(format!("cannot read token file {}: {e}", path.display())),
        Ok(_) => read(path),
    }
}

/// Reads and checks an existing token file.
pub fn read(path: &Path) -> Result<String, String> {
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
    if !meta.file_type().is_file() {
        return Err(format!(
            "token file {} is not a regular file",
            path.display()
        ));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "token file {p} is accessible by other users (mode {mode:04o}); run chmod 600 {p}",
            p = path.display()
        ));
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(4096).read_to_string(&mut text))
        .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
    let token = text.trim();
    if !(32..=512).contains(&token.len()) || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "token file {} must hold 32-512 printable characters without spaces",
            path.display()
        ));
    }
    Ok(token.to_string())
}

fn create(path: &Path) -> Result<String, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let token =
        portcullis::secret::random_hex(32).map_err(|e| format!("cannot read random bytes: {e}"))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create token file {}: {e}", path.display()))?;
    f.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write token file {}: {e}", path.display()))?;
    Ok(token)
}

/// `authorization: Bearer <token>` (scheme case-insensitive, one space), compared in constant
/// time.
pub fn check(header: Option<&str>, token: &str) -> Result<(), &'static str> {
    let Some(value) = header else {
        return Err("missing bearer token");
    };
    let Some((scheme, given)) = value.split_once(' ') else {
        return Err("missing bearer token");
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err("missing bearer token");
    }
    if portcullis::secret::constant_time_eq(given.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err("invalid bearer token")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_private_token_once_and_rejects_wide_permissions() {
        let dir = std::env::temp_dir().join(format!("pc-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("control.token");
        let t = load_or_create(&path).unwrap();
        assert_eq!(t.len(), 64);
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(load_or_create(&path).unwrap(), t);
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let e = load_or_create(&path).unwrap_err();
        assert!(e.contains("accessible by other users (mode 0644)"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bearer_check() {
        let t = "a".repeat(64);
        assert_eq!(check(None, &t), Err("missing bearer token"));
        assert_eq!(check(Some("Basic x"), &t), Err("missing bearer token"));
        assert_eq!(check(Some("Bearer nope"), &t), Err("invalid bearer token"));
        assert!(check(Some(&format!("bearer {t}")), &t).is_ok());
    }
}
