//! Enterprise requirements (`requirements.md`): fetched from an HTTPS backend at startup
//! (fail closed), cached with an integrity check, refreshed in the background, and merged
//! into the policy so that they can only narrow it.
//!
//! `serve` and `exec` call [`load_at_startup`] before any listener serves, hand the result's
//! [`Active`] to the state, and start [`spawn_refresh`] once the state is shared.

pub mod cache;
pub mod document;
pub mod fetch;
pub mod merge;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use portcullis::config::Config;
use portcullis::decision::{format_timestamp, parse_timestamp};
use portcullis::proto::v1;

use crate::cli::PolicySourceArgs;
use crate::state::{ControlState, timestamp};
pub use document::Requirements;

/// A startup failure: exit code (2 usage/configuration, 1 otherwise) and the message.
#[derive(Debug)]
pub struct StartupError {
    /// Process exit code.
    pub code: u8,
    /// What to print on stderr.
    pub message: String,
}

fn fail(code: u8, message: impl Into<String>) -> StartupError {
    StartupError {
        code,
        message: message.into(),
    }
}

/// The requirements in force and their status (`GetPolicy`, `GetStatus`).
#[derive(Debug, Clone)]
pub struct Active {
    /// The document in force (`None`: no requirements).
    pub doc: Option<Requirements>,
    /// Its managed lists, parsed once.
    pub managed: Option<Arc<merge::Managed>>,
    /// State, URL, fetch time, last error.
    pub status: v1::RequirementsStatus,
}

impl Default for Active {
    fn default() -> Self {
        Active::new(None, status(v1::RequirementsState::None, "", None, ""))
    }
}

impl Active {
    /// Wraps a document and its status.
    pub fn new(doc: Option<Requirements>, status: v1::RequirementsStatus) -> Active {
        let managed = doc.as_ref().map(|d| Arc::new(merge::Managed::new(d)));
        Active {
            doc,
            managed,
            status,
        }
    }

    /// Whether `managed_allowed_domains_only` is in force.
    pub fn managed_only(&self) -> bool {
        self.doc
            .as_ref()
            .is_some_and(|d| d.managed_allowed_domains_only)
    }

    /// Whether an allow of `host` on `port` (0 = any) may be added or approved (§6 rule 4):
    /// the FAILED_PRECONDITION message when not.
    pub fn check_allow(&self, host: &str, port: u16) -> Result<(), String> {
        let Some(managed) = &self.managed else {
            return Ok(());
        };
        let Ok(h) = portcullis::policy::normalize_host(host) else {
            return Ok(());
        };
        if let Some(p) = managed.denying(&h, port) {
            return Err(format!(
                "host is denied by enterprise requirements (pattern \"{p}\")"
            ));
        }
        if self.managed_only() {
            let text = match (port, &h) {
                (0, _) => h.to_string(),
                (p, portcullis::policy::Host::Ip { addr, .. }) if addr.is_ipv6() => {
                    format!("[{h}]:{p}")
                }
                (p, _) => format!("{h}:{p}"),
            };
            if !managed.covers(&text) {
                return Err(format!(
                    "managed_allowed_domains_only is set and no managed allow pattern covers {h}"
                ));
            }
        }
        Ok(())
    }

    /// Whether a session allow may stay in a snapshot (not outside the managed allowlist).
    pub fn session_allow_permitted(&self, host: &str, port: u32) -> bool {
        !self.managed_only() || u16::try_from(port).is_ok_and(|p| self.check_allow(host, p).is_ok())
    }

    /// Whether a proxy whose Hello lists these listeners may attach (§6, control.md §6).
    pub fn listeners_permitted(&self, addrs: &[&str]) -> bool {
        let forbidden = self
            .doc
            .as_ref()
            .is_some_and(|d| d.dangerously_allow_non_loopback_proxy == Some(false));
        !forbidden || addrs.iter().all(|a| merge::loopback_listener(a))
    }
}

fn status(
    state: v1::RequirementsState,
    url: &str,
    fetched_at: Option<SystemTime>,
    last_error: &str,
) -> v1::RequirementsStatus {
    v1::RequirementsStatus {
        state: state as i32,
        url: url.to_string(),
        fetched_at: fetched_at.map(timestamp),
        last_error: last_error.to_string(),
    }
}

/// What startup produced.
pub struct Loaded {
    /// The requirements to enforce from version 1 on.
    pub active: Active,
    /// The background refresher (`None` without a URL).
    pub refresher: Option<Refresher>,
}

/// Everything the background refresh needs.
pub struct Refresher {
    fetcher: fetch::Fetcher,
    paths: cache::Paths,
    identity: String,
    interval: Duration,
    max_age: Duration,
    record: Option<cache::Record>,
    first_due: SystemTime,
}

/// Startup (§4): no URL → none; a fresh intact cache → `CACHED`; else fetch → `FRESH`; failure
/// → exit 1 unless optional (then a stale cache → `STALE`, or none). Runs before any listener.
pub async fn load_at_startup(
    config: &Config,
    flags: &PolicySourceArgs,
) -> Result<Loaded, StartupError> {
    let rc = &config.requirements;
    let (url, from_flag) = match (&flags.requirements_url, &rc.url) {
        (Some(u), _) => (u.clone(), true),
        (None, Some(u)) => (u.clone(), false),
        (None, None) => {
            return Ok(Loaded {
                active: Active::default(),
                refresher: None,
            });
        }
    };
    if let Err(e) = portcullis::config::check_url(&url, &["https"]) {
        let key = if from_flag {
            "usage error: --requirements-url"
        } else {
            "requirements.url"
        };
        return Err(fail(2, format!("{key}: {e}")));
    }
    let optional = flags.requirements_optional || rc.optional;
    config
        .check_environment(&|k| std::env::var(k).ok())
        .map_err(|e| fail(2, e.to_string()))?;
    let token = match &rc.token_file {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| {
                fail(
                    1,
                    format!("requirements.token_file: cannot read {}: {e}", p.display()),
                )
            })?;
            let t = text.trim().to_string();
            if t.is_empty() {
                return Err(fail(
                    1,
                    format!("requirements.token_file: {} is empty", p.display()),
                ));
            }
            Some(t)
        }
        None => std::env::var(rc.token_env_name())
            .ok()
            .filter(|t| !t.trim().is_empty())
            .map(|t| t.trim().to_string()),
    };
    let ca = match &rc.ca_file {
        Some(p) => Some(std::fs::read(p).map_err(|e| {
            fail(
                1,
                format!("requirements.ca_file: cannot read {}: {e}", p.display()),
            )
        })?),
        None => None,
    };
    let cache_file = config
        .requirements_cache_file()
        .map_err(|e| fail(2, e.to_string()))?;
    let key = match config.state_dir() {
        Ok(d) => d.join("requirements.key"),
        Err(_) => cache_file
            .parent()
            .map(|d| d.join("requirements.key"))
            .unwrap_or_else(|| "requirements.key".into()),
    };
    let paths = cache::Paths {
        cache: cache_file,
        key,
    };
    let identity = cache::identity(&url, token.as_deref());
    let fetcher = fetch::Fetcher::new(
        url.clone(),
        token,
        ca.as_deref(),
        Duration::from_secs(rc.timeout_secs),
        rc.max_attempts.clamp(1, 10) as u32,
    )
    .map_err(|e| fail(1, e))?;
    let shown = fetcher.shown_url().to_string();
    let interval = Duration::from_secs(rc.refresh_interval_secs.max(1));
    let max_age = Duration::from_secs(rc.cache_max_age_secs);
    let cached = read_cache(&paths, &identity);
    let now = SystemTime::now();
    // A fresh intact cache is used without fetching.
    if let Some((record, doc, fetched_at)) = &cached
        && is_fresh(*fetched_at, max_age, now)
    {
        log_state("cached", &shown, *fetched_at);
        return Ok(Loaded {
            active: Active::new(
                Some(doc.clone()),
                status(v1::RequirementsState::Cached, &shown, Some(*fetched_at), ""),
            ),
            refresher: Some(Refresher {
                fetcher,
                paths,
                identity,
                interval,
                max_age,
                record: Some(record.clone()),
                first_due: *fetched_at + interval,
            }),
        });
    }
    let etag = cached.as_ref().and_then(|(r, _, _)| r.etag.clone());
    let outcome = fetcher.fetch(etag.as_deref()).await;
    let mut refresher = Refresher {
        fetcher,
        paths,
        identity,
        interval,
        max_age,
        record: None,
        first_due: now + interval,
    };
    match outcome {
        Ok(fetched) => {
            let fallback = cached.map(|(r, d, _)| (r, d));
            let Some((record, doc)) = refresher.accept(fetched, fallback).await else {
                return Err(fail(
                    1,
                    format!(
                        "cannot load enterprise requirements from {shown}: the backend answered 304 but no cached document exists"
                    ),
                ));
            };
            let fetched_at = parse_timestamp(&record.fetched_at).unwrap_or(now);
            refresher.record = Some(record);
            refresher.first_due = fetched_at + interval;
            log_state("fresh", &shown, fetched_at);
            Ok(Loaded {
                active: Active::new(
                    Some(doc),
                    status(v1::RequirementsState::Fresh, &shown, Some(fetched_at), ""),
                ),
                refresher: Some(refresher),
            })
        }
        Err(message) if !optional => Err(fail(
            1,
            format!(
                "{message} (no fresh cache at {}; start with --requirements-optional to run without requirements)",
                refresher.paths.cache.display()
            ),
        )),
        Err(message) => match cached {
            Some((record, doc, fetched_at)) => {
                tracing::warn!(
                    "{message}; requirements are optional: using the stale cache fetched at {}",
                    format_timestamp(fetched_at)
                );
                log_state("stale", &shown, fetched_at);
                refresher.record = Some(record);
                Ok(Loaded {
                    active: Active::new(
                        Some(doc),
                        status(
                            v1::RequirementsState::Stale,
                            &shown,
                            Some(fetched_at),
                            &message,
                        ),
                    ),
                    refresher: Some(refresher),
                })
            }
            None => {
                tracing::warn!(
                    "{message}; requirements are optional: running WITHOUT enterprise requirements"
                );
                tracing::info!("requirements: none from {shown} (not fetched)");
                Ok(Loaded {
                    active: Active::new(
                        None,
                        status(v1::RequirementsState::None, &shown, None, &message),
                    ),
                    refresher: Some(refresher),
                })
            }
        },
    }
}

fn log_state(state: &str, url: &str, fetched_at: SystemTime) {
    tracing::info!(
        "requirements: {state} from {url} (fetched at {})",
        format_timestamp(fetched_at)
    );
}

/// Fresh: not more than 60 s in the future and at most `max_age` old (0 = never fresh).
fn is_fresh(fetched_at: SystemTime, max_age: Duration, now: SystemTime) -> bool {
    if max_age.is_zero() {
        return false;
    }
    match now.duration_since(fetched_at) {
        Ok(age) => age <= max_age,
        Err(ahead) => ahead.duration() <= Duration::from_secs(60),
    }
}

/// An intact cache (§5.3) or `None`, with the WARN naming the reason.
fn read_cache(
    paths: &cache::Paths,
    identity: &str,
) -> Option<(cache::Record, Requirements, SystemTime)> {
    let warn = |reason: &str| {
        tracing::warn!(
            "requirements cache {} ignored: {reason}",
            paths.cache.display()
        );
    };
    let record = match cache::load(paths, identity) {
        Ok(r) => r,
        Err(cache::Rejected::Missing) => return None,
        Err(r) => {
            warn(r.reason());
            return None;
        }
    };
    let Some(fetched_at) = parse_timestamp(&record.fetched_at) else {
        warn(cache::Rejected::Malformed.reason());
        return None;
    };
    match document::parse(&record.content_type, &record.body) {
        Ok((doc, _)) => Some((record, doc, fetched_at)),
        Err(_) => {
            warn(cache::Rejected::InvalidDocument.reason());
            None
        }
    }
}

impl Refresher {
    /// Turns a successful fetch into the record to keep (written to the cache; a write failure
    /// is a WARN) and the document in force. `NotModified` renews `fallback`'s `fetched_at`.
    async fn accept(
        &self,
        fetched: fetch::Fetched,
        fallback: Option<(cache::Record, Requirements)>,
    ) -> Option<(cache::Record, Requirements)> {
        let now = format_timestamp(SystemTime::now());
        let (record, doc) = match fetched {
            fetch::Fetched::Document {
                doc,
                body,
                content_type,
                etag,
            } => (
                cache::Record {
                    format: 1,
                    identity: self.identity.clone(),
                    url: self.fetcher.url.clone(),
                    fetched_at: now,
                    etag,
                    content_type,
                    body,
                    mac: String::new(),
                },
                doc,
            ),
            fetch::Fetched::NotModified => {
                let (mut record, doc) = fallback?;
                record.fetched_at = now;
                (record, doc)
            }
        };
        let paths = self.paths.clone();
        let to_write = record.clone();
        match tokio::task::spawn_blocking(move || cache::store(&paths, &to_write)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(
                "cannot write the requirements cache {}: {e}",
                self.paths.cache.display()
            ),
            Err(e) => tracing::warn!("requirements cache writer failed: {e}"),
        }
        Some((record, doc))
    }

    /// One background refresh (§4.6).
    async fn refresh_once(&mut self, services: &crate::service::Services) {
        let state: &ControlState = &services.state;
        let etag = self.record.as_ref().and_then(|r| r.etag.clone());
        let shown = self.fetcher.shown_url().to_string();
        let current = state.requirements();
        match self.fetcher.fetch(etag.as_deref()).await {
            Ok(fetched) => {
                let fallback = self.record.clone().zip(current.doc.clone());
                let Some((record, doc)) = self.accept(fetched, fallback).await else {
                    tracing::warn!("requirements refresh: 304 without a cached document");
                    return;
                };
                let fetched_at = parse_timestamp(&record.fetched_at).unwrap_or(SystemTime::now());
                self.record = Some(record);
                let st = status(v1::RequirementsState::Fresh, &shown, Some(fetched_at), "");
                if current.doc.as_ref() != Some(&doc) {
                    let version = state.set_requirements(Active::new(Some(doc), st)).await;
                    if version.is_some() {
                        // Pending asks that became denied or un-askable resolve POLICY_DENY.
                        services.resolve_asks_by_policy().await;
                    }
                    tracing::info!(
                        version = ?version,
                        "requirements: changed, fresh from {shown} (fetched at {})",
                        format_timestamp(fetched_at)
                    );
                } else {
                    state.set_requirements_status(st);
                }
            }
            Err(message) => {
                let fetched_at = current.status.fetched_at.as_ref().map(|t| {
                    SystemTime::UNIX_EPOCH
                        + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32)
                });
                let mut st = current.status.clone();
                st.last_error = message.clone();
                match fetched_at {
                    Some(at) if current.doc.is_some() => {
                        tracing::warn!(
                            "requirements refresh failed: {message}; keeping requirements fetched at {}",
                            format_timestamp(at)
                        );
                        if !is_fresh(at, self.max_age, SystemTime::now()) {
                            st.state = v1::RequirementsState::Stale as i32;
                        }
                    }
                    _ => tracing::warn!(
                        "requirements refresh failed: {message}; no requirements in force"
                    ),
                }
                state.set_requirements_status(st);
            }
        }
    }
}

/// Refreshes every `refresh_interval_secs` (±10 % jitter) and at once on SIGHUP, one fetch at
/// a time; a changed document is pushed to every attached proxy and re-judges pending asks.
pub fn spawn_refresh(
    mut refresher: Refresher,
    services: crate::service::Services,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let first = refresher
            .first_due
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let mut due = tokio::time::Instant::now() + first;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                Some(()) = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
            refresher.refresh_once(&services).await;
            due = tokio::time::Instant::now() + jitter(refresher.interval);
        }
    })
}

/// `d` ± 10 %.
fn jitter(d: Duration) -> Duration {
    let r = portcullis::secret::random_hex(2)
        .ok()
        .and_then(|h| u16::from_str_radix(&h, 16).ok())
        .unwrap_or(u16::MAX / 2);
    let factor = 0.9 + 0.2 * (f64::from(r) / f64::from(u16::MAX));
    d.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freshness_window() {
        let now = SystemTime::now();
        let max = Duration::from_secs(900);
        assert!(is_fresh(now - Duration::from_secs(899), max, now));
        assert!(!is_fresh(now - Duration::from_secs(901), max, now));
        assert!(is_fresh(now + Duration::from_secs(59), max, now));
        assert!(!is_fresh(now + Duration::from_secs(61), max, now));
        assert!(!is_fresh(now, Duration::ZERO, now));
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..20 {
            let j = jitter(Duration::from_secs(100)).as_secs_f64();
            assert!((90.0..=110.0).contains(&j), "{j}");
        }
    }

    #[test]
    fn runtime_checks() {
        let doc = document::parse(
            "",
            "[network]\nmanaged_allowed_domains_only = true\ndangerously_allow_non_loopback_proxy = false\nallowed_domains = [\"*.corp.example\"]\ndenied_domains = [\"bad.corp.example\"]\n",
        )
        .unwrap()
        .0;
        let a = Active::new(Some(doc), v1::RequirementsStatus::default());
        assert_eq!(
            a.check_allow("bad.corp.example", 443).unwrap_err(),
            "host is denied by enterprise requirements (pattern \"bad.corp.example\")"
        );
        assert_eq!(
            a.check_allow("github.com", 443).unwrap_err(),
            "managed_allowed_domains_only is set and no managed allow pattern covers github.com"
        );
        assert!(a.check_allow("api.corp.example", 0).is_ok());
        assert!(a.session_allow_permitted("api.corp.example", 443));
        assert!(!a.session_allow_permitted("github.com", 443));
        assert!(a.listeners_permitted(&["127.0.0.1:1", ""]));
        assert!(!a.listeners_permitted(&["0.0.0.0:1"]));
        assert!(Active::default().check_allow("anything.example", 0).is_ok());
    }
}
