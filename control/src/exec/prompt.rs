//! Answering asks for `exec` (control.md §10.3–§10.4): on a terminal, one prompt at a time in
//! creation order; without one, a line per new ask while a host answers through the API.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::time::SystemTime;

use portcullis::proto::v1::{self, control_server::Control, pending_event::Event};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::service::Services;

/// The choices of the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// `o` / `once`.
    Once,
    /// `s` / `session`.
    Session,
    /// `a` / `always`.
    Always,
    /// `d` / `deny` / empty line.
    Deny,
    /// `n` / `never`.
    Never,
}

/// Parses one answer line (case-insensitive); `None` asks again.
pub fn parse_choice(line: &str) -> Option<Choice> {
    match line.trim().to_ascii_lowercase().as_str() {
        "o" | "once" => Some(Choice::Once),
        "s" | "session" => Some(Choice::Session),
        "a" | "always" => Some(Choice::Always),
        "" | "d" | "deny" => Some(Choice::Deny),
        "n" | "never" => Some(Choice::Never),
        _ => None,
    }
}

/// `host:port`, `[v6]:port` for IPv6.
pub fn destination(host: &str, port: u32) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Who answered on the terminal: `tty:<login name>`.
fn actor() -> String {
    let login = std::env::var("LOGNAME")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".into());
    format!("tty:{login}")
}

/// Terminal input, read on a plain thread (blocking reads) and handed over line by line;
/// `None` is end of file.
fn tty_lines() -> Option<(mpsc::Receiver<Option<String>>, std::fs::File)> {
    let input = std::fs::File::open("/dev/tty").ok()?;
    let output = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/tty")
        .ok()?;
    let (tx, rx) = mpsc::channel(16);
    std::thread::Builder::new()
        .name("exec-tty".into())
        .spawn(move || {
            let mut reader = std::io::BufReader::new(input);
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => {
                        let _ = tx.blocking_send(None);
                        return;
                    }
                    Ok(_) => {
                        if tx.blocking_send(Some(line)).is_err() {
                            return;
                        }
                    }
                }
            }
        })
        .ok()?;
    Some((rx, output))
}

/// Runs until aborted: prompts on the terminal when `interactive`, else logs waiting asks.
pub async fn run(services: Services, session: String, program: String, interactive: bool) {
    let request = tonic::Request::new(v1::WatchPendingRequest {
        session_id: Some(session),
    });
    let mut events = match services.watch_pending(request).await {
        Ok(r) => r.into_inner(),
        Err(e) => {
            eprintln!("portcullis: cannot watch asks: {}", e.message());
            return;
        }
    };
    let mut tty = if interactive { tty_lines() } else { None };
    let mut queue: VecDeque<v1::PendingAsk> = VecDeque::new();
    let mut shown: Option<v1::PendingAsk> = None;
    loop {
        if shown.is_none()
            && let Some((_, out)) = tty.as_mut()
            && let Some(ask) = queue.pop_front()
        {
            show_prompt(out, &ask, &program);
            shown = Some(ask);
        }
        let line = async {
            match tty.as_mut() {
                Some((rx, _)) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = events.next() => {
                let Some(Ok(event)) = event else { return };
                match event.event {
                    Some(Event::Created(c)) => {
                        let Some(ask) = c.ask else { continue };
                        if tty.is_some() {
                            queue.push_back(ask);
                        } else {
                            eprintln!(
                                "portcullis: waiting for approval of {} ({}) [{}]",
                                destination(&ask.host, ask.port),
                                ask.protocol,
                                ask.id
                            );
                        }
                    }
                    Some(Event::Resolved(r)) => {
                        let id = r.ask.map(|a| a.id).unwrap_or_default();
                        gone(&mut queue, &mut shown, &mut tty, &id, &format!(
                            "was resolved elsewhere ({})",
                            portcullis::proto::outcome_label(r.outcome)
                        ));
                    }
                    Some(Event::Expired(x)) => {
                        let id = x.ask.map(|a| a.id).unwrap_or_default();
                        gone(&mut queue, &mut shown, &mut tty, &id, "expired");
                    }
                    Some(Event::Lagged(_)) | Some(Event::Synced(_)) | None => {}
                }
            }
            line = line => {
                let Some(ask) = shown.clone() else { continue };
                let choice = match line.flatten() {
                    Some(text) => match parse_choice(&text) {
                        Some(c) => c,
                        None => {
                            if let Some((_, out)) = tty.as_mut() {
                                let _ = write!(out, "please answer o, s, a, d or n\nchoice [o/s/a/d/n] (default d): ");
                                let _ = out.flush();
                            }
                            continue;
                        }
                    },
                    None => {
                        // End of file on the terminal: deny, and stop prompting.
                        if let Some((_, out)) = tty.as_mut() {
                            let _ = writeln!(out);
                        }
                        tty = None;
                        for a in queue.drain(..) {
                            eprintln!(
                                "portcullis: waiting for approval of {} ({}) [{}]",
                                destination(&a.host, a.port),
                                a.protocol,
                                a.id
                            );
                        }
                        Choice::Deny
                    }
                };
                shown = None;
                let confirmation = answer(&services, &ask, choice).await;
                match tty.as_mut() {
                    Some((_, out)) => {
                        let _ = writeln!(out, "portcullis: {confirmation}");
                    }
                    None => eprintln!("portcullis: {confirmation}"),
                }
            }
        }
    }
}

/// An ask that left the queue or the screen without our answer.
fn gone(
    queue: &mut VecDeque<v1::PendingAsk>,
    shown: &mut Option<v1::PendingAsk>,
    tty: &mut Option<(mpsc::Receiver<Option<String>>, std::fs::File)>,
    id: &str,
    what: &str,
) {
    queue.retain(|a| a.id != id);
    if shown.as_ref().is_some_and(|a| a.id == id) {
        *shown = None;
        if let Some((_, out)) = tty.as_mut() {
            let _ = writeln!(out, "\nportcullis: ask {id} {what}");
        }
    }
}

fn show_prompt(out: &mut std::fs::File, ask: &v1::PendingAsk, program: &str) {
    let left = ask
        .expires_at
        .as_ref()
        .and_then(|t| {
            let at = SystemTime::UNIX_EPOCH
                + std::time::Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32);
            at.duration_since(SystemTime::now()).ok()
        })
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let _ = write!(
        out,
        "portcullis: allow {program} network access to {} ({})? [{}, auto-deny in {left}s]\n  o = allow once, s = allow for this session, a = always allow, d = deny, n = never allow\nchoice [o/s/a/d/n] (default d): ",
        destination(&ask.host, ask.port),
        ask.protocol,
        ask.id
    );
    let _ = out.flush();
}

/// Sends the answer through the same RPCs a host would use; returns the confirmation line.
async fn answer(services: &Services, ask: &v1::PendingAsk, choice: Choice) -> String {
    let dest = destination(&ask.host, ask.port);
    let (result, done) = match choice {
        Choice::Once | Choice::Session | Choice::Always => {
            let (scope, done) = match choice {
                Choice::Once => (v1::ApprovalScope::Once, format!("allowed {dest} once")),
                Choice::Session => (
                    v1::ApprovalScope::Session,
                    format!("allowed {dest} for this session"),
                ),
                _ => (
                    v1::ApprovalScope::Always,
                    format!("always allowed {dest} (saved as a rule)"),
                ),
            };
            let req = v1::ApproveRequest {
                pending_id: ask.id.clone(),
                scope: scope as i32,
                actor: Some(actor()),
                ..Default::default()
            };
            (
                services.approve(tonic::Request::new(req)).await.map(|_| ()),
                done,
            )
        }
        Choice::Deny | Choice::Never => {
            let (scope, done) = if choice == Choice::Never {
                (
                    v1::ApprovalScope::Always,
                    format!("never allowing {dest} (saved as a rule)"),
                )
            } else {
                (v1::ApprovalScope::Once, format!("denied {dest}"))
            };
            let req = v1::DenyRequest {
                pending_id: ask.id.clone(),
                scope: scope as i32,
                actor: Some(actor()),
                ..Default::default()
            };
            (
                services.deny(tonic::Request::new(req)).await.map(|_| ()),
                done,
            )
        }
    };
    match result {
        Ok(()) => done,
        Err(status) => format!("could not answer ask {}: {}", ask.id, status.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices() {
        assert_eq!(parse_choice("O\n"), Some(Choice::Once));
        assert_eq!(parse_choice("session"), Some(Choice::Session));
        assert_eq!(parse_choice("A"), Some(Choice::Always));
        assert_eq!(parse_choice("\n"), Some(Choice::Deny));
        assert_eq!(parse_choice("never"), Some(Choice::Never));
        assert_eq!(parse_choice("yes"), None);
        assert_eq!(destination("::1", 443), "[::1]:443");
    }
}
