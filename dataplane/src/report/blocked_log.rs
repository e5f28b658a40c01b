//! The blocked log (`decisions.md` §7): a bounded ring of the latest `deny` and `ask` Decisions,
//! its `total`/`dropped` counters, the admin `/blocked` rendering and the violation line.
//!
//! The ring is a `Mutex<VecDeque<Arc<Decision>>>`; the lock is held only to push/pop pointers or
//! clone them for a snapshot. JSON rendering, logging and freeing evicted Decisions all happen
//! after the lock is released.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};

use portcullis::decision::{Decision, Verdict};

/// Log target of the violation line.
pub const VIOLATION_TARGET: &str = "portcullis::policy";

/// The canonical JSON of `decisions.md` §1, from the shared renderer.
fn canonical(d: &Decision) -> String {
    d.canonical_json()
}

/// The ring and its counters, always changed together under one lock.
#[derive(Debug)]
struct Ring {
    capacity: usize,
    entries: VecDeque<Arc<Decision>>,
    total: u64,
    dropped: u64,
}

/// The in-memory blocked log. Cheap to share by reference; every method takes `&self`.
#[derive(Debug)]
pub struct BlockedLog {
    ring: Mutex<Ring>,
}

/// A non-consuming copy of the blocked log.
#[derive(Debug, Clone)]
pub struct BlockedSnapshot {
    /// Ring size (`limits.blocked_log_size`).
    pub capacity: usize,
    /// Entries ever appended.
    pub total: u64,
    /// Entries evicted (by appends to a full ring, or by shrinking).
    pub dropped: u64,
    /// The entries, oldest first.
    pub entries: Vec<Arc<Decision>>,
}

impl BlockedSnapshot {
    /// The admin `GET /blocked` body:
    /// `{"capacity":C,"total":N,"dropped":M,"blocked":[canonical Decisions, oldest first]}`.
    pub fn to_admin_json(&self) -> String {
        let mut out = String::with_capacity(64 + self.entries.len() * 512);
        let _ = write!(
            out,
            "{{\"capacity\":{},\"total\":{},\"dropped\":{},\"blocked\":[",
            self.capacity, self.total, self.dropped
        );
        for (i, d) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&canonical(d));
        }
        out.push_str("]}");
        out
    }
}

impl BlockedLog {
    /// An empty log of `capacity` entries (at least 1; config validation keeps it 1–100000).
    pub fn new(capacity: usize) -> BlockedLog {
        let capacity = capacity.max(1);
        BlockedLog {
            ring: Mutex::new(Ring {
                capacity,
                entries: VecDeque::with_capacity(capacity.min(4096)),
                total: 0,
                dropped: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        // A panic while holding the lock cannot leave the ring inconsistent (each change is a
        // push/pop plus counter bump), so a poisoned lock is still usable.
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a `deny` or `ask` Decision, evicting the oldest entry when full. Returns how
    /// many entries were evicted (0 or 1). `allow` Decisions are not blocked-log entries and
    /// are ignored (returns 0, `total` unchanged).
    pub fn append(&self, d: Arc<Decision>) -> u64 {
        if d.decision == Verdict::Allow {
            return 0;
        }
        let evicted = {
            let mut ring = self.lock();
            ring.total += 1;
            let evicted = if ring.entries.len() >= ring.capacity {
                ring.dropped += 1;
                ring.entries.pop_front()
            } else {
                None
            };
            ring.entries.push_back(d);
            evicted
        };
        // The evicted Decision (possibly its last reference) is freed outside the lock.
        u64::from(evicted.is_some())
    }

    /// A non-consuming copy: capacity, counters and the entries, oldest first.
    pub fn snapshot(&self) -> BlockedSnapshot {
        let ring = self.lock();
        BlockedSnapshot {
            capacity: ring.capacity,
            total: ring.total,
            dropped: ring.dropped,
            entries: ring.entries.iter().cloned().collect(),
        }
    }

    /// Changes the ring size (reload). Shrinking evicts the oldest entries and counts them in
    /// `dropped`; returns how many were evicted. Entries and counters otherwise survive.
    pub fn resize(&self, new_capacity: usize) -> u64 {
        let new_capacity = new_capacity.max(1);
        let evicted: Vec<Arc<Decision>> = {
            let mut ring = self.lock();
            ring.capacity = new_capacity;
            let excess = ring.entries.len().saturating_sub(new_capacity);
            ring.dropped += excess as u64;
            ring.entries.drain(..excess).collect()
        };
        evicted.len() as u64
    }

    /// Current ring size.
    pub fn capacity(&self) -> usize {
        self.lock().capacity
    }

    /// The admin `GET /blocked` body (see [`BlockedSnapshot::to_admin_json`]); rendered after
    /// the lock is released.
    pub fn to_admin_json(&self) -> String {
        self.snapshot().to_admin_json()
    }
}

/// The violation line's message: `PORTCULLIS_POLICY_VIOLATION ` + canonical JSON.
pub fn violation_line(d: &Decision) -> String {
    d.violation_line()
}

/// Emits the violation line at WARN, target `portcullis::policy` (`decisions.md` §7.3). Call it
/// once per blocked-log append, never while holding the ring lock.
pub fn log_violation(d: &Decision) {
    // Skip rendering when no subscriber wants the line (it is on by default).
    if !tracing::enabled!(target: "portcullis::policy", tracing::Level::WARN) {
        return;
    }
    let line = violation_line(d);
    tracing::warn!(target: "portcullis::policy", "{}", line);
}
