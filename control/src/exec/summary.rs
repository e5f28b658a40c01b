//! The exit summary of `exec` (control.md §10.6): one line per (target, protocol, reason) of the
//! session's deny Decisions, in first-seen order, with a count.

use portcullis::proto::v1;
use tokio::sync::{broadcast, oneshot};

/// Deny counts in first-seen order.
#[derive(Debug, Default)]
pub struct Summary {
    rows: Vec<((String, String, String), u64)>,
    missed: u64,
}

impl Summary {
    /// Counts one Decision when it is a deny of `session`.
    pub fn add(&mut self, d: &v1::Decision, session: &str) {
        if d.decision != "deny" || d.session_id != session {
            return;
        }
        let target = if d.socket_path.is_empty() {
            crate::exec::prompt::destination(&d.host, d.port)
        } else {
            format!("unix socket {}", d.socket_path)
        };
        let key = (target, d.protocol.clone(), d.reason.clone());
        match self.rows.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => self.rows.push((key, 1)),
        }
    }

    /// The lines printed on stderr at exit (empty when nothing was denied).
    pub fn lines(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .rows
            .iter()
            .map(|((target, protocol, reason), n)| {
                format!("portcullis: blocked {target} ({protocol}): {reason} x{n}")
            })
            .collect();
        if self.missed > 0 {
            out.push(format!(
                "portcullis: {} more decisions arrived too fast to be counted",
                self.missed
            ));
        }
        out
    }
}

/// Collects the session's denies until told to finish.
pub struct Collector {
    finish: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Summary>,
}

impl Collector {
    /// Starts counting from `decisions` (subscribe before the sidecar starts).
    pub fn start(mut decisions: broadcast::Receiver<v1::Decision>, session: String) -> Collector {
        let (finish, mut finished) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut summary = Summary::default();
            loop {
                tokio::select! {
                    d = decisions.recv() => match d {
                        Ok(d) => summary.add(&d, &session),
                        Err(broadcast::error::RecvError::Lagged(n)) => summary.missed += n,
                        Err(broadcast::error::RecvError::Closed) => return summary,
                    },
                    _ = &mut finished => break,
                }
            }
            // Count what is already queued.
            loop {
                match decisions.try_recv() {
                    Ok(d) => summary.add(&d, &session),
                    Err(broadcast::error::TryRecvError::Lagged(n)) => summary.missed += n,
                    Err(_) => return summary,
                }
            }
        });
        Collector { finish, task }
    }

    /// Stops counting and returns the summary.
    pub async fn finish(self) -> Summary {
        let _ = self.finish.send(());
        self.task.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deny(host: &str, reason: &str) -> v1::Decision {
        v1::Decision {
            decision: "deny".into(),
            reason: reason.into(),
            protocol: "http".into(),
            host: host.into(),
            port: 80,
            session_id: "s".into(),
            ..Default::default()
        }
    }

    #[test]
    fn rows_in_first_seen_order_with_counts() {
        let mut s = Summary::default();
        s.add(&deny("b.test", "denied"), "s");
        s.add(&deny("a.test", "not_allowed"), "s");
        s.add(&deny("b.test", "denied"), "s");
        s.add(&deny("c.test", "denied"), "other");
        let mut allow = deny("d.test", "allow");
        allow.decision = "allow".into();
        s.add(&allow, "s");
        assert_eq!(
            s.lines(),
            vec![
                "portcullis: blocked b.test:80 (http): denied x2",
                "portcullis: blocked a.test:80 (http): not_allowed x1"
            ]
        );
    }
}
