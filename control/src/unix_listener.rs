//! The optional unix-socket endpoint (control.md §1.2): a private directory, a 0600 socket, stale
//! sockets replaced, live ones refused, and peers of other users turned away.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};
use tokio_stream::{Stream, StreamExt, wrappers::UnixListenerStream};

/// Binds `path` after checking (or creating) its directory.
pub async fn bind(path: &Path) -> Result<UnixListener, String> {
    let shown = path.display();
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| format!("control.unix_socket: {shown}: needs an absolute path"))?;
    private_dir(dir)?;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("control.unix_socket: {shown}: {e}")),
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(format!("another control plane is listening on {shown}"));
            }
            // Nobody accepts on it: a leftover of a process that died.
            std::fs::remove_file(path)
                .map_err(|e| format!("control.unix_socket: cannot remove stale {shown}: {e}"))?;
        }
        Ok(_) => {
            return Err(format!(
                "control.unix_socket: {shown} exists and is not a socket (not removed)"
            ));
        }
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("control.unix_socket: cannot bind {shown}: {e}"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("control.unix_socket: cannot chmod {shown}: {e}"))?;
    Ok(listener)
}

/// Creates `dir` with mode 0700, or checks that it is ours and closed to others.
pub fn private_dir(dir: &Path) -> Result<(), String> {
    let shown = dir.display();
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create directory {shown}: {e}")),
        Err(e) => Err(format!("cannot inspect directory {shown}: {e}")),
        Ok(meta) => {
            if !meta.is_dir() {
                return Err(format!("{shown} is not a directory"));
            }
            // SAFETY: getuid has no preconditions and cannot fail.
            let me = unsafe { libc::getuid() };
            if meta.uid() != me {
                return Err(format!("directory {shown} is owned by another user"));
            }
            if meta.mode() & 0o077 != 0 {
                return Err(format!(
                    "directory {shown} is accessible by other users (mode {:04o}); run chmod 700 {shown}",
                    meta.mode() & 0o777
                ));
            }
            Ok(())
        }
    }
}

/// Accepted connections, minus those whose peer is neither this user nor root.
pub fn incoming(listener: UnixListener) -> impl Stream<Item = std::io::Result<UnixStream>> {
    // SAFETY: getuid has no preconditions and cannot fail.
    let me = unsafe { libc::getuid() };
    UnixListenerStream::new(listener).filter(move |conn| match conn {
        Ok(stream) => match stream.peer_cred() {
            Ok(cred) if cred.uid() == me || cred.uid() == 0 => true,
            Ok(cred) => {
                tracing::warn!(
                    uid = cred.uid(),
                    "control unix socket: closed a connection from another user"
                );
                false
            }
            Err(_) => false,
        },
        Err(_) => true,
    })
}

/// A fresh 0700 directory for `exec`'s private endpoint, under `$XDG_RUNTIME_DIR` or the temp
/// directory.
pub fn fresh_private_dir() -> Result<PathBuf, String> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute() && p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    for _ in 0..8 {
        let suffix = portcullis::secret::random_hex(6)
            .map_err(|e| format!("cannot read random bytes: {e}"))?;
        let dir = base.join(format!("portcullis-{suffix}"));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
        }
    }
    Err(format!(
        "cannot create a private directory under {}",
        base.display()
    ))
}
