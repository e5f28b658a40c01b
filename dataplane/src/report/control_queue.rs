//! The buffer of Decisions waiting to go to the control plane (`control.md` §6 rule 5, §9):
//! bounded, and when full the *oldest* report is dropped (and counted) so that what the
//! control plane finally sees after an outage is the most recent activity.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use portcullis::decision::{Decision, Verdict};
use tokio::sync::Notify;

use super::{DecisionSink, Offer, Sink};

/// Bounded drop-oldest queue shared by the reporter (producer) and the attach loop (consumer).
#[derive(Debug)]
pub struct ControlQueue {
    items: Mutex<VecDeque<Arc<Decision>>>,
    capacity: usize,
    ready: Notify,
    /// Set from each snapshot: whether allows are reported too.
    report_allows: AtomicBool,
}

impl ControlQueue {
    /// A queue holding at most `capacity` (at least 1) reports.
    pub fn new(capacity: usize) -> Arc<ControlQueue> {
        let capacity = capacity.max(1);
        Arc::new(ControlQueue {
            items: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            capacity,
            ready: Notify::new(),
            report_allows: AtomicBool::new(false),
        })
    }

    /// Follows the snapshot's `report_allows`.
    pub fn set_report_allows(&self, on: bool) {
        self.report_allows.store(on, Ordering::Relaxed);
    }

    /// Which Decisions go to the control plane (`control.md` §6 rule 5).
    fn reportable(&self, d: &Decision) -> bool {
        d.decision != Verdict::Allow || d.override_ || self.report_allows.load(Ordering::Relaxed)
    }

    /// Appends `d`; returns whether an older report had to be dropped to make room.
    fn push(&self, d: Arc<Decision>) -> bool {
        let dropped = match self.items.lock() {
            Ok(mut q) => {
                let dropped = q.len() >= self.capacity && q.pop_front().is_some();
                q.push_back(d);
                dropped
            }
            // A poisoned lock cannot hold the report: count it as dropped, never lose silently.
            Err(_) => true,
        };
        self.ready.notify_one();
        dropped
    }

    /// Waits for the next report, oldest first.
    pub async fn pop(&self) -> Arc<Decision> {
        loop {
            // Registered before the check so a push in between is not missed.
            let notified = self.ready.notified();
            if let Some(d) = self.try_pop() {
                return d;
            }
            notified.await;
        }
    }

    /// The next report if one is waiting.
    pub fn try_pop(&self) -> Option<Arc<Decision>> {
        self.items.lock().ok().and_then(|mut q| q.pop_front())
    }

    /// Puts a report that could not be sent back at the front (it is the oldest).
    pub fn requeue(&self, d: Arc<Decision>) {
        if let Ok(mut q) = self.items.lock()
            && q.len() < self.capacity
        {
            q.push_front(d);
        }
    }

    /// Reports waiting.
    pub fn len(&self) -> usize {
        self.items.lock().map_or(0, |q| q.len())
    }
}

/// The reporter's sink feeding a [`ControlQueue`].
pub struct ControlSink(pub Arc<ControlQueue>);

impl DecisionSink for ControlSink {
    fn sink(&self) -> Sink {
        Sink::Control
    }

    fn offer(&self, d: &Arc<Decision>) -> Offer {
        if !self.0.reportable(d) {
            return Offer::Skipped;
        }
        if self.0.push(d.clone()) {
            Offer::Dropped
        } else {
            Offer::Accepted
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(verdict: Verdict, host: &str) -> Arc<Decision> {
        use portcullis::decision::{Protocol, Reason};
        Arc::new(super::super::tests::decision(
            verdict,
            Reason::NotAllowed,
            Protocol::Http,
            host,
        ))
    }

    #[tokio::test]
    async fn full_queue_drops_the_oldest_and_counts_it() {
        let q = ControlQueue::new(2);
        let sink = ControlSink(q.clone());
        assert_eq!(sink.offer(&decision(Verdict::Deny, "a")), Offer::Accepted);
        assert_eq!(sink.offer(&decision(Verdict::Deny, "b")), Offer::Accepted);
        assert_eq!(sink.offer(&decision(Verdict::Deny, "c")), Offer::Dropped);
        assert_eq!(q.len(), 2);
        assert_eq!(&*q.pop().await.host, "b");
        assert_eq!(&*q.pop().await.host, "c");
    }

    #[tokio::test]
    async fn allows_are_skipped_unless_reported() {
        let q = ControlQueue::new(4);
        let sink = ControlSink(q.clone());
        assert_eq!(sink.offer(&decision(Verdict::Allow, "a")), Offer::Skipped);
        q.set_report_allows(true);
        assert_eq!(sink.offer(&decision(Verdict::Allow, "a")), Offer::Accepted);
        assert_eq!(q.len(), 1);
    }

    #[tokio::test]
    async fn pop_waits_for_a_push_and_requeue_keeps_order() {
        let q = ControlQueue::new(4);
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.pop().await });
        tokio::task::yield_now().await;
        ControlSink(q.clone()).offer(&decision(Verdict::Deny, "x"));
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("pop returns after a push")
            .expect("task");
        assert_eq!(&*got.host, "x");
        ControlSink(q.clone()).offer(&decision(Verdict::Deny, "y"));
        q.requeue(got);
        assert_eq!(&*q.pop().await.host, "x");
        assert_eq!(&*q.pop().await.host, "y");
    }
}
