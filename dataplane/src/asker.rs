//! Asks from the data plane (control.md §7): a request the allowlist missed is held while the
//! control plane asks a person; the answer (or a timeout, or the stream's loss) releases it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use portcullis::proto::v1;
use tokio::sync::{mpsc, oneshot};

/// How a held request ended.
pub enum AskResult {
    /// The control plane answered.
    Answer(v1::AskAnswer),
    /// No stream, or it was lost while waiting.
    Unavailable,
    /// This proxy already holds `limits.max_pending_approvals` requests.
    Full,
    /// No answer within the ask timeout plus 5 s.
    TimedOut,
}

/// The asking side of the attach stream, shared by every handler.
pub struct Asker {
    out: Mutex<Option<mpsc::Sender<v1::ProxyMessage>>>,
    waiting: Mutex<HashMap<u64, oneshot::Sender<v1::AskAnswer>>>,
    next_ref: AtomicU64,
    held: AtomicUsize,
    max_held: usize,
    ask_timeout_ms: AtomicU32,
}

/// Sends `AskCancel` if a held request goes away before its answer (client disconnected).
struct CancelOnDrop<'a> {
    asker: &'a Asker,
    ask_ref: u64,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        self.asker.held.fetch_sub(1, Ordering::AcqRel);
        if let Ok(mut w) = self.asker.waiting.lock() {
            w.remove(&self.ask_ref);
        }
        if self.armed {
            self.asker
                .send(v1::proxy_message::Msg::AskCancel(v1::AskCancel {
                    ask_ref: self.ask_ref,
                }));
        }
    }
}

impl Asker {
    /// A new asker holding at most `max_held` requests.
    pub fn new(max_held: usize) -> Asker {
        Asker {
            out: Mutex::new(None),
            waiting: Mutex::new(HashMap::new()),
            next_ref: AtomicU64::new(1),
            held: AtomicUsize::new(0),
            max_held,
            ask_timeout_ms: AtomicU32::new(60_000),
        }
    }

    /// Whether a stream is up.
    pub fn is_up(&self) -> bool {
        self.out.lock().map(|o| o.is_some()).unwrap_or(false)
    }

    /// A stream is up: asks go to `tx`.
    pub fn stream_up(&self, tx: mpsc::Sender<v1::ProxyMessage>) {
        if let Ok(mut o) = self.out.lock() {
            *o = Some(tx);
        }
    }

    /// The stream is gone: every held request is released as `control_unavailable`.
    pub fn stream_down(&self) {
        if let Ok(mut o) = self.out.lock() {
            *o = None;
        }
        if let Ok(mut w) = self.waiting.lock() {
            // Dropping the senders wakes every waiter with an error.
            w.clear();
        }
    }

    /// The snapshot's ask timeout.
    pub fn set_ask_timeout_ms(&self, ms: u32) {
        self.ask_timeout_ms.store(ms, Ordering::Relaxed);
    }

    /// Delivers an answer to its waiter (an unknown ask_ref is a cancel/answer race).
    pub fn deliver(&self, answer: v1::AskAnswer) {
        let tx = self
            .waiting
            .lock()
            .ok()
            .and_then(|mut w| w.remove(&answer.ask_ref));
        if let Some(tx) = tx {
            let _ = tx.send(answer);
        }
    }

    fn send(&self, msg: v1::proxy_message::Msg) -> bool {
        let out = self.out.lock().ok().and_then(|o| o.clone());
        match out {
            Some(tx) => tx.try_send(v1::ProxyMessage { msg: Some(msg) }).is_ok(),
            None => false,
        }
    }

    /// Registers an ask that holds nothing (`socks5_udp`).
    pub fn ask_without_hold(&self, mut req: v1::AskRequest) {
        req.ask_ref = self.next_ref.fetch_add(1, Ordering::Relaxed);
        req.hold = false;
        self.send(v1::proxy_message::Msg::Ask(req));
    }

    /// Sends an ask and waits for its answer.
    pub async fn ask(&self, mut req: v1::AskRequest) -> AskResult {
        if self.held.fetch_add(1, Ordering::AcqRel) >= self.max_held {
            self.held.fetch_sub(1, Ordering::AcqRel);
            return AskResult::Full;
        }
        let ask_ref = self.next_ref.fetch_add(1, Ordering::Relaxed);
        let mut guard = CancelOnDrop {
            asker: self,
            ask_ref,
            armed: false,
        };
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(ask_ref, tx);
        }
        req.ask_ref = ask_ref;
        req.hold = true;
        if !self.send(v1::proxy_message::Msg::Ask(req)) {
            return AskResult::Unavailable;
        }
        guard.armed = true;
        let limit =
            Duration::from_millis(u64::from(self.ask_timeout_ms.load(Ordering::Relaxed)) + 5_000);
        let result = match tokio::time::timeout(limit, rx).await {
            Ok(Ok(answer)) => AskResult::Answer(answer),
            Ok(Err(_)) => AskResult::Unavailable,
            Err(_) => AskResult::TimedOut,
        };
        // Answered (or the stream is gone): nothing to cancel.
        guard.armed = matches!(result, AskResult::TimedOut);
        result
    }
}
