//! The one byte-moving loop every tunnel uses (CONNECT, SOCKS5 TCP, upgrades, unix sockets).
//!
//! Both directions run concurrently. When one side finishes sending, the write half toward the
//! other side is shut down (half-close) and the opposite direction keeps flowing. Both
//! connections close when both directions are done, on any error, or after the idle timeout.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest read per step. Reads land in an uninitialised stack buffer, so an idle tunnel
/// holds no copy buffer at all; only bytes a slow writer has not taken yet are kept on the heap.
const READ_CHUNK: usize = 64 * 1024;

/// Bytes moved by a finished tunnel.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// Client → destination.
    pub upstream: u64,
    /// Destination → client.
    pub downstream: u64,
}

/// Live byte counters a tunnel updates as it goes (so metrics see long tunnels progress).
pub trait ByteSink: Send + Sync {
    /// `n` bytes moved client → destination.
    fn upstream(&self, n: u64);
    /// `n` bytes moved destination → client.
    fn downstream(&self, n: u64);
}

/// A sink that counts nothing.
#[cfg(test)]
pub struct NoCount;

#[cfg(test)]
impl ByteSink for NoCount {
    fn upstream(&self, _: u64) {}
    fn downstream(&self, _: u64) {}
}

struct Direction {
    /// Bytes read but not yet written (empty, and unallocated, while the writer keeps up).
    held: Vec<u8>,
    /// How much of `held` was already written.
    start: usize,
    read_done: bool,
    shut_done: bool,
    total: u64,
}

impl Direction {
    fn new() -> Self {
        Direction {
            held: Vec::new(),
            start: 0,
            read_done: false,
            shut_done: false,
            total: 0,
        }
    }

    fn finished(&self) -> bool {
        self.shut_done
    }

    /// Moves bytes from `r` to `w` until pending; returns Ready(Err) on failure, Ready(Ok) when
    /// this direction is finished (EOF seen, everything written, write half shut down).
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        progress: &mut bool,
        count: &dyn Fn(u64),
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.shut_done {
                return Poll::Ready(Ok(()));
            }
            while self.start < self.held.len() {
                let n = ready!(w.as_mut().poll_write(cx, &self.held[self.start..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                self.total += n as u64;
                count(n as u64);
                *progress = true;
            }
            // Drained: keep the capacity while data flows (bulk), free it once the reader idles.
            self.held.clear();
            self.start = 0;
            if self.read_done {
                ready!(w.as_mut().poll_flush(cx))?;
                ready!(w.as_mut().poll_shutdown(cx))?;
                self.shut_done = true;
                return Poll::Ready(Ok(()));
            }
            let mut storage = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut rb = ReadBuf::uninit(&mut storage);
            if r.as_mut().poll_read(cx, &mut rb)?.is_pending() {
                if self.held.capacity() > 0 {
                    self.held = Vec::new();
                }
                return Poll::Pending;
            }
            let data = rb.filled();
            if data.is_empty() {
                self.read_done = true;
                continue;
            }
            *progress = true;
            let mut off = 0;
            while off < data.len() {
                match w.as_mut().poll_write(cx, &data[off..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        off += n;
                        self.total += n as u64;
                        count(n as u64);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Keep the rest until the writer is ready again.
                        self.held.extend_from_slice(&data[off..]);
                        self.start = 0;
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

/// Relays bytes between `client` and `server` until both directions finish, an error occurs,
/// or nothing moves for `idle` (when given). Returns what was moved either way.
pub async fn relay<C, S>(
    client: &mut C,
    server: &mut S,
    idle: Option<Duration>,
    sink: Arc<dyn ByteSink>,
) -> (Transferred, io::Result<()>)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = Direction::new();
    let mut down = Direction::new();
    let up_counter = {
        let sink = sink.clone();
        move |n| sink.upstream(n)
    };
    let down_counter = move |n| sink.downstream(n);
    let mut idle_timer = idle.map(|d| Box::pin(tokio::time::sleep(d)));

    let result = std::future::poll_fn(|cx| {
        let mut progress = false;
        if !up.finished() {
            match up.poll_copy(
                cx,
                Pin::new(&mut *client),
                Pin::new(&mut *server),
                &mut progress,
                &up_counter,
            ) {
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) | Poll::Pending => {}
            }
        }
        if !down.finished() {
            match down.poll_copy(
                cx,
                Pin::new(&mut *server),
                Pin::new(&mut *client),
                &mut progress,
                &down_counter,
            ) {
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) | Poll::Pending => {}
            }
        }
        if up.finished() && down.finished() {
            return Poll::Ready(Ok(()));
        }
        if let (Some(timer), Some(idle)) = (idle_timer.as_mut(), idle) {
            if progress {
                timer.as_mut().reset(tokio::time::Instant::now() + idle);
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "tunnel idle timeout",
                )));
            }
        }
        Poll::Pending
    })
    .await;

    (
        Transferred {
            upstream: up.total,
            downstream: down.total,
        },
        result,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        let (mut client_side, mut client_proxy) = tokio::io::duplex(1024);
        let (mut server_proxy, mut server_side) = tokio::io::duplex(1024);
        let relay_task = tokio::spawn(async move {
            relay(
                &mut client_proxy,
                &mut server_proxy,
                Some(Duration::from_secs(10)),
                Arc::new(NoCount),
            )
            .await
        });
        client_side.write_all(b"hello").await.unwrap();
        client_side.shutdown().await.unwrap();
        let mut got = Vec::new();
        server_side.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        // The opposite direction still flows after the client's half-close.
        server_side.write_all(b"world!").await.unwrap();
        server_side.shutdown().await.unwrap();
        let mut back = Vec::new();
        client_side.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"world!");
        let (t, r) = relay_task.await.unwrap();
        r.unwrap();
        assert_eq!(
            t,
            Transferred {
                upstream: 5,
                downstream: 6
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_closes() {
        let (_client_side, mut client_proxy) = tokio::io::duplex(1024);
        let (mut server_proxy, _server_side) = tokio::io::duplex(1024);
        let (_, r) = relay(
            &mut client_proxy,
            &mut server_proxy,
            Some(Duration::from_secs(5)),
            Arc::new(NoCount),
        )
        .await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }
}
