//! Writing the rules file (`network-rules.md` §5): under an exclusive lock on `PATH.lock`,
//! re-read and parse, then replace the file atomically (temp file, fsync, rename, fsync dir).
//! Blocking I/O: call from `spawn_blocking`.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::parse::{Rule, parse_file};

/// The file to write: a symlink is followed (link by link, so a dangling link names the file
/// to create) to its final target.
pub fn target(path: &Path) -> PathBuf {
    let mut cur = path.to_path_buf();
    // Bounded like the kernel's ELOOP limit.
    for _ in 0..40 {
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => match std::fs::read_link(&cur) {
                Ok(next) if next.is_absolute() => cur = next,
                Ok(next) => {
                    cur = cur.parent().map(|d| d.join(&next)).unwrap_or(next);
                }
                Err(_) => break,
            },
            _ => break,
        }
    }
    cur
}

/// Whether the test-only `fault-injection` hook asks to abort at `step`:
/// `PORTCULLIS_FAULT_RULES_WRITE` = `after_temp_create`, `after_partial_write`, `after_fsync`,
/// `after_rename` or `after_dir_fsync` (network-rules.md test 10).
#[cfg(any(test, feature = "fault-injection"))]
fn fault_at(step: &str) -> bool {
    std::env::var("PORTCULLIS_FAULT_RULES_WRITE").is_ok_and(|s| s == step)
}

#[cfg(not(any(test, feature = "fault-injection")))]
fn fault_at(_: &str) -> bool {
    false
}

/// The test-only `fault-injection` hook for I/O errors (disk full, read-only file system):
/// `PORTCULLIS_FAULT_RULES_WRITE_ERROR_FILE` names a file holding `STEP:ERRNO`, with `STEP` one
/// of `temp_create`, `write`, `fsync`, `rename`, `dir_fsync` and `ERRNO` one of `ENOSPC`,
/// `EROFS`, `EIO`; that step then fails with that OS error. The file is read at every write, so
/// a test can turn the fault on and off while the process runs; missing or empty = no fault.
#[cfg(any(test, feature = "fault-injection"))]
fn injected_error(step: &str) -> std::io::Result<()> {
    let Some(path) = std::env::var_os("PORTCULLIS_FAULT_RULES_WRITE_ERROR_FILE") else {
        return Ok(());
    };
    let Ok(spec) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let Some((at, errno)) = spec.trim().split_once(':') else {
        return Ok(());
    };
    let code = match errno {
        "ENOSPC" => libc::ENOSPC,
        "EROFS" => libc::EROFS,
        "EIO" => libc::EIO,
        _ => return Ok(()),
    };
    if at == step {
        Err(std::io::Error::from_raw_os_error(code))
    } else {
        Ok(())
    }
}

#[cfg(not(any(test, feature = "fault-injection")))]
fn injected_error(_: &str) -> std::io::Result<()> {
    Ok(())
}

/// Aborts the process (no unwinding, no destructors: like a crash) when the hook names `step`.
fn fault(step: &str) {
    if fault_at(step) {
        std::process::abort();
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
        injected_error("temp_create")?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the creation mode: set it exactly.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        fault("after_temp_create");
        if fault_at("after_partial_write") {
            f.write_all(&bytes[..bytes.len() / 2])?;
            std::process::abort();
        }
        if let Err(e) = injected_error("write") {
            // A full disk: part of the data lands, then the write fails.
            f.write_all(&bytes[..bytes.len() / 2])?;
            return Err(e);
        }
        f.write_all(bytes)?;
        injected_error("fsync")?;
        f.sync_all()?;
        fault("after_fsync");
        injected_error("rename")?;
        std::fs::rename(&tmp, target)?;
        fault("after_rename");
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot write rules file {}: {e}", target.display()));
    }
    injected_error("dir_fsync")
        .and_then(|()| std::fs::File::open(dir))
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot sync {}: {e}", dir.display()))?;
    fault("after_dir_fsync");
    Ok(())
}

/// Deletes `.NAME.tmp-*` files next to the rules file (symlink resolved) that are older than one
/// hour: leftovers of a writer that crashed between creating and renaming its temp file
/// (network-rules.md §5.5). Fresh ones may belong to a writer in another process. Returns how
/// many were deleted; errors are ignored (a leftover never affects reading the rules).
pub fn remove_stale_temps(path: &Path) -> usize {
    let target = target(path);
    let dir = target
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Some(name) = target.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return 0;
    };
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let hour = Duration::from_secs(3600);
    let mut removed = 0;
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > hour);
        if old && std::fs::remove_file(entry.path()).is_ok() {
            tracing::info!(path = %entry.path().display(), "removed a stale rules temp file");
            removed += 1;
        }
    }
    removed
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

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            let dir = std::env::temp_dir().join(format!("pc-rules-{}", random_hex()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const A: &str = "network_rule(host=\"a.com\", protocol=\"https\", decision=\"allow\")\n";

    #[test]
    fn append_creates_file_and_parent_dir() {
        let dir = TempDir::new();
        let path = dir.0.join("sub").join("portcullis.rules");
        let (added, rules) = append(&path, &rule("a.com", "allow", None)).unwrap();
        assert!(added && rules.len() == 1);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), A);
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let sub = std::fs::metadata(dir.0.join("sub")).unwrap();
        assert_eq!(sub.mode() & 0o777, 0o700);
        let lock = std::fs::metadata(dir.0.join("sub").join("portcullis.rules.lock")).unwrap();
        assert_eq!(lock.mode() & 0o777, 0o600);
    }

    #[test]
    fn append_adds_missing_final_newline() {
        let dir = TempDir::new();
        let path = dir.0.join("portcullis.rules");
        std::fs::write(&path, "# no final newline").unwrap();
        let (added, _) = append(&path, &rule("a.com", "allow", None)).unwrap();
        assert!(added);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("# no final newline\n{A}")
        );
    }

    #[test]
    fn append_identical_rule_is_not_duplicated() {
        let dir = TempDir::new();
        let path = dir.0.join("portcullis.rules");
        let text = "# keep me\nnetwork_rule( decision=\"allow\", protocol=\"https_connect\", host=\"B.com.\" , )\n";
        std::fs::write(&path, text).unwrap();
        let (added, rules) = append(&path, &rule("b.com", "allow", None)).unwrap();
        assert!(!added, "identical canonical line is not duplicated");
        assert_eq!(rules.len(), 1);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        let (added, rules) = append(&path, &rule("b.com", "allow", Some(22))).unwrap();
        assert!(added, "a different port is a different line");
        assert_eq!(rules.len(), 2);
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .ends_with("port=22)\n")
        );
    }

    #[test]
    fn append_refuses_when_file_no_longer_parses() {
        let dir = TempDir::new();
        let path = dir.0.join("portcullis.rules");
        std::fs::write(&path, "# ok\ngarbage\n").unwrap();
        let e = append(&path, &rule("d.com", "allow", None)).unwrap_err();
        assert!(
            e.starts_with(&format!("{}:2:1: ", path.display())),
            "the parse error with its position: {e}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "# ok\ngarbage\n");
        assert!(remove(&path, "d.com", None).is_err());
    }

    #[test]
    fn remove_drops_only_matching_key_and_keeps_comments_byte_for_byte() {
        let dir = TempDir::new();
        let path = dir.0.join("portcullis.rules");
        let text = concat!(
            "# header\r\n",
            "network_rule(host=\"a.com\", protocol=\"http\", decision=\"allow\")  # one\n",
            "\n",
            "network_rule(host=\"a.com\", protocol=\"https\", decision=\"deny\", port=443)\n",
            "\t# indented comment\n",
            "network_rule(host=\"A.com\", protocol=\"https\", decision=\"deny\")\n",
            "network_rule(host=\"b.com\",protocol=\"http\",decision=\"allow\")"
        );
        std::fs::write(&path, text).unwrap();
        let (removed, rules) = remove(&path, "a.com", None).unwrap();
        assert_eq!((removed, rules.len()), (2, 2));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            concat!(
                "# header\r\n",
                "\n",
                "network_rule(host=\"a.com\", protocol=\"https\", decision=\"deny\", port=443)\n",
                "\t# indented comment\n",
                "network_rule(host=\"b.com\",protocol=\"http\",decision=\"allow\")"
            )
        );
    }

    #[test]
    fn remove_unknown_key_is_not_found() {
        let dir = TempDir::new();
        let path = dir.0.join("portcullis.rules");
        std::fs::write(&path, A).unwrap();
        let before = std::fs::metadata(&path).unwrap().ino();
        assert_eq!(remove(&path, "nope.com", None).unwrap().0, 0);
        assert_eq!(remove(&path, "a.com", Some(443)).unwrap().0, 0);
        assert_eq!(
            std::fs::metadata(&path).unwrap().ino(),
            before,
            "no write: the file was not replaced"
        );
        // A missing file has nothing to remove and is not created.
        let missing = dir.0.join("missing.rules");
        assert_eq!(remove(&missing, "a.com", None).unwrap().0, 0);
        assert!(!missing.exists());
    }

    #[test]
    fn write_preserves_mode_and_follows_symlink() {
        let dir = TempDir::new();
        let real_dir = dir.0.join("real");
        std::fs::create_dir(&real_dir).unwrap();
        let real = real_dir.join("portcullis.rules");
        std::fs::write(&real, A).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o664)).unwrap();
        // A relative link to a relative link to the file.
        let link1 = dir.0.join("link1.rules");
        std::os::unix::fs::symlink("real/portcullis.rules", &link1).unwrap();
        let link2 = dir.0.join("link2.rules");
        std::os::unix::fs::symlink("link1.rules", &link2).unwrap();
        let (added, rules) = append(&link2, &rule("b.com", "deny", None)).unwrap();
        assert!(added && rules.len() == 2);
        for link in [&link1, &link2] {
            assert!(
                std::fs::symlink_metadata(link)
                    .unwrap()
                    .file_type()
                    .is_symlink(),
                "{} is still a symlink",
                link.display()
            );
        }
        let text = std::fs::read_to_string(&real).unwrap();
        assert!(text.starts_with(A) && text.contains("b.com"), "{text}");
        assert_eq!(
            std::fs::metadata(&real).unwrap().mode() & 0o7777,
            0o664,
            "mode kept exactly (not narrowed by the umask)"
        );
        assert!(
            real_dir.join("portcullis.rules.lock").exists(),
            "lock next to the target"
        );
        let (removed, _) = remove(&link2, "a.com", None).unwrap();
        assert_eq!(removed, 1);
        assert_eq!(std::fs::metadata(&real).unwrap().mode() & 0o7777, 0o664);
        assert!(
            std::fs::symlink_metadata(&link2)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        // A dangling link names the file to create.
        let dangling = dir.0.join("dangling.rules");
        std::os::unix::fs::symlink("real/new.rules", &dangling).unwrap();
        append(&dangling, &rule("c.com", "allow", None)).unwrap();
        assert!(
            std::fs::symlink_metadata(&dangling)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(
            std::fs::read_to_string(real_dir.join("new.rules"))
                .unwrap()
                .contains("c.com")
        );
        // No temp file is left behind.
        let leftovers: Vec<_> = std::fs::read_dir(&real_dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn stale_temp_files_older_than_an_hour_are_removed() {
        let dir = TempDir::new();
        let path = dir.0.join("portcullis.rules");
        let old = dir.0.join(".portcullis.rules.tmp-1-deadbeef");
        let fresh = dir.0.join(".portcullis.rules.tmp-2-cafef00d");
        let other = dir.0.join(".other.rules.tmp-1-deadbeef");
        for p in [&old, &fresh, &other] {
            std::fs::write(p, "partial").unwrap();
        }
        let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
        for p in [&old, &other] {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(two_hours_ago)
                .unwrap();
        }
        assert_eq!(remove_stale_temps(&path), 1);
        assert!(!old.exists() && fresh.exists() && other.exists());
    }
}
