//! Writing the rules file (`network-rules.md` §5): under an exclusive lock on `PATH.lock`,
//! re-read and parse, then replace the file atomically (temp file, fsync, rename, fsync dir).
//! Blocking I/O: call from `spawn_blocking`.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::parse::{Rule, parse_file};

/// The file to write: a symlink is followed to its final target.
fn target(path: &Path) -> PathBuf {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
        }
        _ => path.to_path_buf(),
    }
}

/// Holds the exclusive advisory lock until dropped (closing the file releases it).
struct Lock {
    _file: std::fs::File,
}

fn lock(target: &Path) -> Result<Lock, String> {
    let mut name = target.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(Lock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(format!(
                    "timed out waiting for the rules file lock {}",
                    lock_path.display()
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(format!("cannot lock {}: {e}", lock_path.display()));
            }
        }
    }
}

fn read(target: &Path) -> Result<Vec<u8>, String> {
    match std::fs::read(target) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("cannot read rules file {}: {e}", target.display())),
    }
}

fn random_hex() -> String {
    portcullis::secret::random_hex(4).unwrap_or_else(|_| "0".repeat(8))
}

/// Replaces `target` with `bytes`: the file is always either entirely old or entirely new.
fn atomic_write(target: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = target
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "rules".into());
    let mode = std::fs::metadata(target)
        .map(|m| m.mode() & 0o7777)
        .unwrap_or(0o600);
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        random_hex()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, target)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot write rules file {}: {e}", target.display()));
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot sync {}: {e}", dir.display()))
}

/// Appends `rule` unless an identical canonical line exists; returns whether it was added and
/// the rules now in the file.
pub fn append(path: &Path, rule: &Rule) -> Result<(bool, Vec<Rule>), String> {
    let target = target(path);
    let _lock = lock(&target)?;
    let mut bytes = read(&target)?;
    let rules = parse_file(&bytes).map_err(|e| e.render(&target.display().to_string()))?;
    let line = rule.canonical();
    if rules.iter().any(|r| r.canonical() == line) {
        return Ok((false, rules));
    }
    if !bytes.is_empty() && !bytes.ends_with(b"\n") {
        bytes.push(b'\n');
    }
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    atomic_write(&target, &bytes)?;
    let rules = parse_file(&bytes).map_err(|e| e.render(&target.display().to_string()))?;
    Ok((true, rules))
}

/// Drops every rule line with the key (host, port), keeping every other byte; returns how many
/// and the rules now in the file. Nothing matched → `Ok((0, …))` and no write.
pub fn remove(path: &Path, host: &str, port: Option<u16>) -> Result<(usize, Vec<Rule>), String> {
    let target = target(path);
    let _lock = lock(&target)?;
    let bytes = read(&target)?;
    let rules = parse_file(&bytes).map_err(|e| e.render(&target.display().to_string()))?;
    let drop_lines: Vec<usize> = rules
        .iter()
        .filter(|r| r.host == host && r.port == port)
        .map(|r| r.line)
        .collect();
    if drop_lines.is_empty() {
        return Ok((0, rules));
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut out = String::with_capacity(text.len());
    for (i, piece) in text.split_inclusive('\n').enumerate() {
        if !drop_lines.contains(&(i + 1)) {
            out.push_str(piece);
        }
    }
    atomic_write(&target, out.as_bytes())?;
    let rules = parse_file(out.as_bytes()).map_err(|e| e.render(&target.display().to_string()))?;
    Ok((drop_lines.len(), rules))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(host: &str, decision: &str, port: Option<u16>) -> Rule {
        Rule {
            line: 0,
            host: host.into(),
            protocol: "https".into(),
            decision: decision.into(),
            port,
            justification: None,
        }
    }

    #[test]
    fn append_creates_dedupes_and_remove_keeps_comments() {
        let dir = std::env::temp_dir().join(format!("pc-rules-{}", random_hex()));
        let path = dir.join("sub").join("portcullis.rules");
        let (added, rules) = append(&path, &rule("a.com", "allow", None)).unwrap();
        assert!(added && rules.len() == 1);
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        // A hand edit without a final newline, then an identical rule spelled differently.
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(
            "# keep me\nnetwork_rule( decision=\"allow\", protocol=\"https\", host=\"b.com\" )",
        );
        std::fs::write(&path, &text).unwrap();
        let (added, _) = append(&path, &rule("b.com", "allow", None)).unwrap();
        assert!(!added, "identical canonical line is not duplicated");
        let (added, rules) = append(&path, &rule("c.com", "deny", Some(22))).unwrap();
        assert!(added);
        assert_eq!(rules.len(), 3);
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .ends_with("port=22)\n")
        );
        let (removed, rules) = remove(&path, "a.com", None).unwrap();
        assert_eq!((removed, rules.len()), (1, 2));
        let after = std::fs::read_to_string(&path).unwrap();
        assert!(after.starts_with("# keep me\n"), "{after}");
        assert_eq!(remove(&path, "nope.com", None).unwrap().0, 0);
        // A file that no longer parses refuses writes.
        std::fs::write(&path, "garbage\n").unwrap();
        assert!(append(&path, &rule("d.com", "allow", None)).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "garbage\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
