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
/// Prefix of the violation line's message.
pub const VIOLATION_PREFIX: &str = "PORTCULLIS_POLICY_VIOLATION ";

/// The canonical JSON of `decisions.md` §1. The one place this module renders a Decision.
fn canonical(d: &Decision) -> String {
    // TEMPORARY: replace this line with `d.canonical_json()` once `Decision::canonical_json`
    // lands in the shared library, then delete `temporary_canonical` below.
    temporary::temporary_canonical(d)
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
    let json = canonical(d);
    let mut line = String::with_capacity(VIOLATION_PREFIX.len() + json.len());
    line.push_str(VIOLATION_PREFIX);
    line.push_str(&json);
    line
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

/// TEMPORARY stand-in for `Decision::canonical_json` (being written in the shared library).
/// Delete this module once that lands; only [`canonical`] uses it.
mod temporary {
    use std::fmt::Write as _;
    use std::time::{SystemTime, UNIX_EPOCH};

    use portcullis::decision::Decision;

    fn string(out: &mut String, s: &str) {
        // serde_json's string escaping; serialising a &str cannot fail.
        out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned()));
    }

    fn opt_string(out: &mut String, s: Option<&str>) {
        match s {
            Some(s) => string(out, s),
            None => out.push_str("null"),
        }
    }

    /// RFC 3339 UTC with milliseconds and `Z` (24 characters).
    pub(super) fn rfc3339_millis(t: SystemTime) -> String {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = d.as_secs();
        let millis = d.subsec_millis();
        let days = (secs / 86_400) as i64;
        let sod = secs % 86_400;
        // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
            sod / 3600,
            (sod / 60) % 60,
            sod % 60
        )
    }

    pub(super) fn temporary_canonical(d: &Decision) -> String {
        let mut o = String::with_capacity(512);
        o.push_str("{\"decision\":");
        string(&mut o, d.decision.as_str());
        o.push_str(",\"reason\":");
        string(&mut o, d.reason.as_str());
        o.push_str(",\"source\":");
        string(&mut o, d.source.as_str());
        o.push_str(",\"protocol\":");
        string(&mut o, d.protocol.as_str());
        o.push_str(",\"host\":");
        string(&mut o, &d.host);
        let _ = write!(o, ",\"port\":{}", d.port);
        let _ = write!(o, ",\"id\":\"{}\"", d.id);
        let _ = write!(o, ",\"timestamp\":\"{}\"", rfc3339_millis(d.timestamp));
        o.push_str(",\"method\":");
        opt_string(&mut o, d.method.as_deref());
        o.push_str(",\"client_address\":");
        opt_string(&mut o, d.client_address.map(|a| a.to_string()).as_deref());
        o.push_str(",\"client_port\":");
        match d.client_port {
            Some(p) => {
                let _ = write!(o, "{p}");
            }
            None => o.push_str("null"),
        }
        let _ = write!(o, ",\"override\":{}", d.override_);
        o.push_str(",\"ask_id\":");
        opt_string(&mut o, d.ask_id.as_deref());
        o.push_str(",\"rule\":");
        opt_string(&mut o, d.rule.as_deref());
        o.push_str(",\"address\":");
        opt_string(&mut o, d.address.map(|a| a.to_string()).as_deref());
        o.push_str(",\"socket_path\":");
        opt_string(&mut o, d.socket_path.as_deref());
        o.push_str(",\"message\":");
        opt_string(&mut o, d.message.as_deref());
        o.push_str(",\"proxy_id\":");
        string(&mut o, &d.origin.proxy_id);
        o.push_str(",\"session_id\":");
        string(&mut o, &d.origin.session_id);
        o.push('}');
        o
    }

    #[cfg(test)]
    mod tests {
        use std::time::{Duration, UNIX_EPOCH};

        #[test]
        fn timestamp_is_24_chars_utc_millis() {
            let t = UNIX_EPOCH + Duration::from_millis(1_795_857_302_117);
            assert_eq!(super::rfc3339_millis(t), "2026-11-28T09:15:02.117Z");
            assert_eq!(
                super::rfc3339_millis(UNIX_EPOCH),
                "1970-01-01T00:00:00.000Z"
            );
            let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
            assert_eq!(super::rfc3339_millis(leap), "2000-02-29T00:00:00.000Z");
        }
    }
}
