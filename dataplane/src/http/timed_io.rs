//! The client side of an HTTP connection with the listener's own timers (`http.md` §1 rule 4):
//! a request head that started but is not complete within `header_read_timeout_ms` gets
//! `408` and the connection closes; a keep-alive connection idle between requests longer than
//! `client_idle_timeout_ms` is closed silently.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Between requests: the idle timer runs.
    Idle,
    /// Bytes of a head arrived, the head is not complete: the header timer runs.
    Head,
    /// The service has the request; no timer here (body and response have their own).
    Busy,
}

/// Requests started and responses finished on one connection, counted by the service side
/// (the connection is busy while they differ).
#[derive(Clone, Default)]
pub struct Activity(Arc<Counters>);

#[derive(Default)]
struct Counters {
    started: AtomicU64,
    finished: AtomicU64,
    /// The reader parked while busy; woken when the response finishes so the idle timer starts.
    reader: Mutex<Option<Waker>>,
}

impl Activity {
    /// A request head reached the service.
    pub fn started(&self) {
        self.0.started.fetch_add(1, Ordering::AcqRel);
    }

    /// A response body was fully written or dropped.
    pub fn finished(&self) {
        self.0.finished.fetch_add(1, Ordering::AcqRel);
        let waker = self.0.reader.lock().ok().and_then(|mut w| w.take());
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn busy(&self) -> bool {
        self.0.started.load(Ordering::Acquire) != self.0.finished.load(Ordering::Acquire)
    }

    fn park(&self, waker: &Waker) {
        if let Ok(mut slot) = self.0.reader.lock()
            && !slot.as_ref().is_some_and(|w| w.will_wake(waker))
        {
            *slot = Some(waker.clone());
        }
    }
}

/// A response body that reports when hyper is done with it.
pub struct TrackedBody {
    inner: super::respond::Body,
    activity: Activity,
}

impl TrackedBody {
    /// Wraps a response body.
    pub fn new(inner: super::respond::Body, activity: Activity) -> TrackedBody {
        TrackedBody { inner, activity }
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.activity.finished();
    }
}

impl hyper::body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A `TcpStream` with the head and idle timers.
pub struct TimedIo {
    inner: TcpStream,
    phase: Phase,
    header_timeout: Duration,
    idle_timeout: Duration,
    timer: Pin<Box<Sleep>>,
    activity: Activity,
    timed_out_head: bool,
}

impl TimedIo {
    /// Wraps an accepted client stream.
    pub fn new(
        inner: TcpStream,
        header_timeout: Duration,
        idle_timeout: Duration,
    ) -> (TimedIo, Activity) {
        let activity = Activity::default();
        let io = TimedIo {
            inner,
            // A fresh connection owes us a head as soon as it is accepted.
            phase: Phase::Head,
            header_timeout,
            idle_timeout,
            timer: Box::pin(tokio::time::sleep(header_timeout)),
            activity: activity.clone(),
            timed_out_head: false,
        };
        (io, activity)
    }

    /// The underlying stream (for tunnels after an upgrade).
    pub fn into_inner(self) -> TcpStream {
        self.inner
    }

    fn enter(&mut self, phase: Phase) {
        self.phase = phase;
        let d = match phase {
            Phase::Idle => self.idle_timeout,
            Phase::Head => self.header_timeout,
            Phase::Busy => return,
        };
        self.timer.as_mut().reset(Instant::now() + d);
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match (this.activity.busy(), this.phase) {
            (true, _) => this.phase = Phase::Busy,
            // The response went out: the next bytes start a new head after an idle wait.
            (false, Phase::Busy) => this.enter(Phase::Idle),
            (false, _) => {}
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before && this.phase == Phase::Idle {
                    this.enter(Phase::Head);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.phase == Phase::Busy {
                    this.activity.park(cx.waker());
                    return Poll::Pending;
                }
                if this.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if this.phase == Phase::Head && !this.timed_out_head {
                    // Best effort: the 408 is tiny and the socket buffer is empty.
                    this.timed_out_head = true;
                    let _ = this.inner.try_write(REQUEST_TIMEOUT);
                }
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client timed out",
                )))
            }
        }
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
