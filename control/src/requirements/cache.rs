//! The verified requirements cache (`requirements.md` §5): a JSON record authenticated with
//! HMAC-SHA256 under `<state_dir>/requirements.key`, written atomically (temp file, fsync,
//! rename, fsync the directory), mode 0600. Blocking I/O.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The MAC's domain-separation tag.
const TAG: &[u8] = b"portcullis-requirements-cache-v1";

/// One cache file, fields in the order of §5.1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Always 1.
    pub format: u32,
    /// Hex SHA-256 of `url + "\n" + token`.
    pub identity: String,
    /// The requirements URL.
    pub url: String,
    /// RFC 3339 UTC with milliseconds and `Z`.
    pub fetched_at: String,
    /// The answer's ETag.
    pub etag: Option<String>,
    /// The answer's content type.
    pub content_type: String,
    /// The document text.
    pub body: String,
    /// Hex HMAC-SHA256 (§5.2).
    #[serde(default)]
    pub mac: String,
}

/// Hex SHA-256 of `url + "\n" + token` (the token itself is never stored).
pub fn identity(url: &str, token: Option<&str>) -> String {
    let mut h = Sha256::new();
    h.update(url.as_bytes());
    h.update(b"\n");
    h.update(token.unwrap_or("").as_bytes());
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The MAC of a record's fields (everything but `mac`).
pub fn compute_mac(key: &[u8], r: &Record) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(TAG);
    mac.update(&[0]);
    let format = r.format.to_string();
    for field in [
        format.as_str(),
        &r.identity,
        &r.url,
        &r.fetched_at,
        r.etag.as_deref().unwrap_or(""),
        &r.content_type,
        &r.body,
    ] {
        mac.update(&(field.len() as u64).to_be_bytes());
        mac.update(field.as_bytes());
    }
    hex(&mac.finalize().into_bytes())
}

/// Why a cache was not used (the `<reason>` of the WARN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// No cache file at all (no WARN).
    Missing,
    /// `unreadable`.
    Unreadable,
    /// `malformed`.
    Malformed,
    /// `integrity check failed`.
    Integrity,
    /// `different identity`.
    Identity,
    /// `invalid document`.
    InvalidDocument,
}

impl Rejected {
    /// The reason text of §5.3.
    pub fn reason(self) -> &'static str {
        match self {
            Rejected::Missing => "missing",
            Rejected::Unreadable => "unreadable",
            Rejected::Malformed => "malformed",
            Rejected::Integrity => "integrity check failed",
            Rejected::Identity => "different identity",
            Rejected::InvalidDocument => "invalid document",
        }
    }
}

/// Where the cache and its key live.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The cache file.
    pub cache: PathBuf,
    /// `<state_dir>/requirements.key`.
    pub key: PathBuf,
}

/// Reads the key file (32 bytes) if it exists.
fn read_key(path: &Path) -> Option<Vec<u8>> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut key = Vec::with_capacity(32);
    Read::by_ref(&mut f).take(33).read_to_end(&mut key).ok()?;
    (key.len() == 32).then_some(key)
}

/// Reads the key, creating it (0600, `O_EXCL`) on first use.
fn key_for_write(path: &Path) -> std::io::Result<Vec<u8>> {
    if let Some(k) = read_key(path) {
        return Ok(k);
    }
    if let Some(dir) = path.parent() {
        create_dir(dir)?;
    }
    let mut key = vec![0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut f) => {
            f.write_all(&key)?;
            f.sync_all()?;
            Ok(key)
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_key(path)
            .ok_or_else(|| std::io::Error::other(format!("{} is not 32 bytes", path.display()))),
        Err(e) => Err(e),
    }
}

fn create_dir(dir: &Path) -> std::io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Loads the cache and checks it: parses, format 1, key present, MAC, identity. The document
/// check is the caller's (it owns the parser). Bodies above 4 MiB are malformed.
pub fn load(paths: &Paths, identity: &str) -> Result<Record, Rejected> {
    let bytes = match std::fs::File::open(&paths.cache) {
        Ok(f) => {
            let mut buf = Vec::new();
            f.take(4 << 20)
                .read_to_end(&mut buf)
                .map_err(|_| Rejected::Unreadable)?;
            buf
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Rejected::Missing),
        Err(_) => return Err(Rejected::Unreadable),
    };
    let record: Record = serde_json::from_slice(&bytes).map_err(|_| Rejected::Malformed)?;
    if record.format != 1 {
        return Err(Rejected::Malformed);
    }
    let key = read_key(&paths.key).ok_or(Rejected::Integrity)?;
    let expected = compute_mac(&key, &record);
    if expected.is_empty()
        || !portcullis::secret::constant_time_eq(expected.as_bytes(), record.mac.as_bytes())
    {
        return Err(Rejected::Integrity);
    }
    if record.identity != identity {
        return Err(Rejected::Identity);
    }
    Ok(record)
}

/// Writes `record` (its `mac` recomputed) atomically with mode 0600.
pub fn store(paths: &Paths, record: &Record) -> std::io::Result<()> {
    let key = key_for_write(&paths.key)?;
    let mut record = record.clone();
    record.mac = compute_mac(&key, &record);
    let text = serde_json::to_vec_pretty(&record).map_err(std::io::Error::other)?;
    let dir = match paths.cache.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    create_dir(&dir)?;
    let name = paths
        .cache
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "requirements.cache.json".into());
    let suffix = portcullis::secret::random_hex(6)?;
    let tmp = dir.join(format!(".{name}.{suffix}.tmp"));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&text)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &paths.cache)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::File::open(&dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            format: 1,
            identity: identity("https://r.example/p", Some("t")),
            url: "https://r.example/p".into(),
            fetched_at: "2025-01-01T00:00:00.000Z".into(),
            etag: Some("\"e1\"".into()),
            content_type: "application/toml".into(),
            body: "[network]\n".into(),
            mac: String::new(),
        }
    }

    #[test]
    fn round_trip_and_tamper_detection() {
        let dir = std::env::temp_dir().join(format!(
            "pc-req-cache-{}",
            portcullis::secret::random_hex(6).unwrap()
        ));
        let paths = Paths {
            cache: dir.join("c.json"),
            key: dir.join("requirements.key"),
        };
        let id = identity("https://r.example/p", Some("t"));
        assert_eq!(load(&paths, &id), Err(Rejected::Missing));
        store(&paths, &record()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&paths.cache)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let key_mode = std::fs::metadata(&paths.key).unwrap().permissions().mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let got = load(&paths, &id).unwrap();
        assert_eq!(got.body, "[network]\n");
        assert_eq!(
            load(&paths, &identity("https://r.example/p", None)),
            Err(Rejected::Identity)
        );
        let text = std::fs::read_to_string(&paths.cache).unwrap();
        std::fs::write(&paths.cache, text.replace("[network]", "[netwerk]")).unwrap();
        assert_eq!(load(&paths, &id), Err(Rejected::Integrity));
        std::fs::write(&paths.cache, "{").unwrap();
        assert_eq!(load(&paths, &id), Err(Rejected::Malformed));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn identity_hides_the_token() {
        let a = identity("https://x/", Some("secret"));
        assert_eq!(a.len(), 64);
        assert!(!a.contains("secret"));
        assert_ne!(a, identity("https://x/", None));
    }
}
