//! Zero-copy relay for TCP↔TCP tunnels on Linux: bytes move socket → pipe → socket with
//! `splice(2)` and never enter user space. Used by [`crate::tunnel_run`] whenever both ends are
//! plain TCP sockets (CONNECT, SOCKS5 CONNECT); everything else uses the copy loop of
//! [`crate::tunnel`], with the same half-close, error and idle-timeout behaviour.
//!
//! Pipes are taken from a small shared pool when a burst starts and returned when the burst
//! ends (pipe empty, source has nothing more), so an idle tunnel holds no pipe and costs only
//! its two sockets — the descriptor budget of 10,000 idle tunnels stays at two per tunnel.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::tunnel::{ByteSink, Transferred};

/// Bytes asked per splice; the pipe is sized to hold it.
const PIPE_SIZE: usize = 256 * 1024;
/// Idle pipes kept for reuse (each is two descriptors and no memory while empty).
const POOL_MAX: usize = 64;
/// Bytes per user-space copy when no pipe can be had (allocated for that burst only).
const FALLBACK_CHUNK: usize = 16 * 1024;

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// One kernel pipe: the buffer between the two sockets.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn take() -> io::Result<Pipe> {
        if let Some(p) = POOL.lock().ok().and_then(|mut pool| pool.pop()) {
            return Ok(p);
        }
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into `fds` on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let pipe = unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // A larger pipe means fewer splices per megabyte; failure keeps the default size.
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            libc::fcntl(
                pipe.write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            );
        }
        Ok(pipe)
    }

    /// Returns an empty pipe to the pool (a pipe holding bytes is closed instead).
    fn give_back(self) {
        if let Ok(mut pool) = POOL.lock()
            && pool.len() < POOL_MAX
        {
            pool.push(self);
        }
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain splice(2) between descriptors that stay open for the call; null offsets
    // because neither end is a file.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// When bytes last moved, in milliseconds since the relay started (for the idle timeout).
struct Activity {
    start: tokio::time::Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Where a direction gets a pipe: the pool, or a test's failing source.
type PipeSource = fn() -> io::Result<Pipe>;

/// One direction: `src` → pipe → `dst`, then a write-side shutdown of `dst` on EOF. When no
/// pipe can be had (descriptor limit), the burst moves through user space instead.
async fn direction(
    src: &TcpStream,
    dst: &TcpStream,
    count: &(dyn Fn(u64) + Send + Sync),
    activity: &Activity,
    take_pipe: PipeSource,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut pipe: Option<Pipe> = None;
    loop {
        src.readable().await?;
        let p = match pipe.take().map_or_else(take_pipe, Ok) {
            Ok(p) => p,
            Err(_) => {
                if copy_burst(src, dst, count, activity, &mut total).await? {
                    continue;
                }
                break;
            }
        };
        let filled = src.try_io(Interest::READABLE, || {
            splice(src.as_raw_fd(), p.write.as_raw_fd(), PIPE_SIZE)
        });
        let mut pending = match filled {
            Ok(0) => {
                p.give_back();
                break;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Burst over: the tunnel idles without holding a pipe.
                p.give_back();
                continue;
            }
            Err(e) => return Err(e),
        };
        activity.touch();
        while pending > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(p.read.as_raw_fd(), dst.as_raw_fd(), pending)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    pending -= n;
                    total += n as u64;
                    count(n as u64);
                    activity.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        pipe = Some(p);
    }
    // Half-close: the other direction keeps flowing.
    // SAFETY: shutdown(2) on a socket descriptor that `dst` keeps open.
    if unsafe { libc::shutdown(dst.as_raw_fd(), libc::SHUT_WR) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOTCONN) {
            return Err(e);
        }
    }
    Ok(total)
}

/// Moves what `src` has now (up to one buffer) to `dst` through user space; false at EOF.
async fn copy_burst(
    src: &TcpStream,
    dst: &TcpStream,
    count: &(dyn Fn(u64) + Send + Sync),
    activity: &Activity,
    total: &mut u64,
) -> io::Result<bool> {
    // On the heap, not in the future: every tunnel's task would otherwise carry it.
    let mut buf = vec![0u8; FALLBACK_CHUNK];
    let n = match src.try_read(&mut buf) {
        Ok(0) => return Ok(false),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
        Err(e) => return Err(e),
    };
    activity.touch();
    let mut sent = 0;
    while sent < n {
        dst.writable().await?;
        match dst.try_write(&buf[sent..n]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(w) => {
                sent += w;
                *total += w as u64;
                count(w as u64);
                activity.touch();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Relays between two TCP sockets until both directions finish, one fails, or nothing moves
/// for `idle`. Same contract as [`crate::tunnel::relay`].
pub async fn relay(
    client: &TcpStream,
    server: &TcpStream,
    idle: Option<Duration>,
    sink: Arc<dyn ByteSink>,
) -> (Transferred, io::Result<()>) {
    relay_with(client, server, idle, sink, Pipe::take).await
}

async fn relay_with(
    client: &TcpStream,
    server: &TcpStream,
    idle: Option<Duration>,
    sink: Arc<dyn ByteSink>,
    take_pipe: PipeSource,
) -> (Transferred, io::Result<()>) {
    let activity = Activity {
        start: tokio::time::Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let up_sink = sink.clone();
    let up_count = move |n| up_sink.upstream(n);
    let down_count = move |n| sink.downstream(n);
    let up = direction(client, server, &up_count, &activity, take_pipe);
    let down = direction(server, client, &down_count, &activity, take_pipe);
    tokio::pin!(up, down);
    let mut moved = Transferred::default();
    let (mut up_done, mut down_done) = (false, false);
    // Without an idle limit the timer just never fires in practice.
    let limit = idle.unwrap_or(Duration::from_secs(365 * 24 * 3600));
    let mut timer = Box::pin(tokio::time::sleep(limit));
    loop {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(n) => { moved.upstream = n; up_done = true; }
                Err(e) => return (moved, Err(e)),
            },
            r = &mut down, if !down_done => match r {
                Ok(n) => { moved.downstream = n; down_done = true; }
                Err(e) => return (moved, Err(e)),
            },
            _ = &mut timer => {
                let due = activity.last() + limit;
                if due <= tokio::time::Instant::now() {
                    return (moved, Err(io::Error::new(io::ErrorKind::TimedOut, "tunnel idle timeout")));
                }
                timer.as_mut().reset(due);
            }
        }
        if up_done && down_done {
            return (moved, Ok(()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::NoCount;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    fn no_pipe() -> io::Result<Pipe> {
        Err(io::Error::from_raw_os_error(libc::EMFILE))
    }

    #[tokio::test]
    async fn moves_bytes_both_ways_with_half_close() {
        half_close_round_trip(Pipe::take).await;
    }

    #[tokio::test]
    async fn without_pipes_falls_back_to_copying() {
        // Descriptor limit reached: the tunnel still works, through user space.
        half_close_round_trip(no_pipe).await;
    }

    async fn half_close_round_trip(take_pipe: PipeSource) {
        // user ⇄ (client | proxy | server) ⇄ origin
        let (mut user, client) = pair().await;
        let (server, mut origin) = pair().await;
        let relay = tokio::spawn(async move {
            relay_with(
                &client,
                &server,
                Some(Duration::from_secs(30)),
                Arc::new(NoCount),
                take_pipe,
            )
            .await
        });
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            user.write_all(&sent).await.unwrap();
            user.shutdown().await.unwrap();
            let mut back = Vec::new();
            user.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        origin.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
        origin.write_all(b"after half-close").await.unwrap();
        origin.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"after half-close");
        let (moved, result) = relay.await.unwrap();
        result.unwrap();
        assert_eq!(moved.upstream, data.len() as u64);
        assert_eq!(moved.downstream, 16);
    }

    #[tokio::test]
    async fn the_relay_future_carries_no_copy_buffer() {
        // Every tunnel task holds this future for its whole life: a buffer in it is paid by
        // every idle tunnel (a 16 KiB array here once cost 32 KiB per tunnel).
        let (_user, client) = pair().await;
        let (server, _origin) = pair().await;
        let fut = relay(&client, &server, None, Arc::new(NoCount));
        let size = std::mem::size_of_val(&fut);
        assert!(size < 2048, "relay future is {size} bytes");
    }

    #[tokio::test]
    async fn idle_timeout_ends_the_tunnel() {
        let (_user, client) = pair().await;
        let (server, _origin) = pair().await;
        let (_, result) = relay(
            &client,
            &server,
            Some(Duration::from_millis(100)),
            Arc::new(NoCount),
        )
        .await;
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }
}
