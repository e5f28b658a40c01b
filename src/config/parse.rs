//! TOML text → [`Config`], walking the spanned document of `toml::de::DeTable` so every error
//! carries `PATH:LINE:COLUMN` and the full key path. Unknown keys are rejected everywhere.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::error::{ConfigError, Position, quoted};
use super::model::*;
use super::validate::{
    check_control_endpoint, check_dns_server, check_header_name, check_path_text, check_pattern,
    check_session_id, check_token_env, check_unix_path, check_url,
};
use super::{Config, ListenerKind, parse_listener_addr};

type SVal<'i> = Spanned<DeValue<'i>>;
type SKey<'i> = Spanned<Cow<'i, str>>;

/// An inclusive integer range, optionally also admitting 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntRange {
    /// Smallest allowed value (other than 0 when `zero_ok`).
    pub min: u64,
    /// Largest allowed value.
    pub max: u64,
    /// 0 is allowed too ("0 = no limit").
    pub zero_ok: bool,
}

impl IntRange {
    /// `min..=max`.
    pub const fn new(min: u64, max: u64) -> IntRange {
        IntRange {
            min,
            max,
            zero_ok: false,
        }
    }

    /// `0` or `min..=max`.
    pub const fn zero_or(min: u64, max: u64) -> IntRange {
        IntRange {
            min,
            max,
            zero_ok: true,
        }
    }

    /// Whether `n` is allowed.
    pub fn contains(&self, n: i128) -> bool {
        (self.zero_ok && n == 0) || (n >= i128::from(self.min) && n <= i128::from(self.max))
    }

    /// The PROBLEM text for a value outside the range.
    pub fn message(&self) -> String {
        if self.zero_ok {
            format!("must be 0 or between {} and {}", self.min, self.max)
        } else {
            format!("must be between {} and {}", self.min, self.max)
        }
    }
}

/// A typed slot of the model that a plain key fills.
pub(crate) enum Field<'a> {
    Bool(&'a mut bool),
    OptBool(&'a mut Option<bool>),
    Int(&'a mut u64, IntRange),
    OptInt(&'a mut Option<u64>, IntRange),
    OptPath(&'a mut Option<PathBuf>),
    PathList(&'a mut Vec<PathBuf>),
}

pub(crate) const ROOT_KEYS: &[&str] = &[
    "state_dir",
    "network",
    "limits",
    "mitm",
    "control",
    "approvals",
    "requirements",
    "audit",
];

pub(crate) const NETWORK_KEYS: &[&str] = &[
    "enabled",
    "mode",
    "allowed_domains",
    "denied_domains",
    "allow_unix_sockets",
    "dangerously_allow_all_unix_sockets",
    "allow_local_binding",
    "enable_socks5",
    "enable_socks5_udp",
    "allow_upstream_proxy",
    "dangerously_allow_non_loopback_proxy",
    "proxy_url",
    "socks_url",
    "admin_url",
    "enable_admin",
    "admin_token_file",
    "mitm",
    "dns_servers",
    "socks_username",
    "socks_password_file",
    "domains",
    "unix_sockets",
];

pub(crate) const LIMITS_KEYS: &[&str] = &[
    "max_header_bytes",
    "max_headers",
    "max_connections",
    "header_read_timeout_ms",
    "client_idle_timeout_ms",
    "connect_timeout_ms",
    "dns_timeout_ms",
    "response_header_timeout_ms",
    "tunnel_idle_timeout_ms",
    "udp_idle_timeout_ms",
    "max_udp_associations",
    "max_udp_destinations",
    "blocked_log_size",
    "max_pending_approvals",
    "shutdown_grace_ms",
];

pub(crate) fn limits_field<'a>(l: &'a mut LimitsConfig, k: &str) -> Option<Field<'a>> {
    use Field::Int;
    Some(match k {
        "max_header_bytes" => Int(&mut l.max_header_bytes, IntRange::new(1024, 1_048_576)),
        "max_headers" => Int(&mut l.max_headers, IntRange::new(8, 1000)),
        "max_connections" => Int(&mut l.max_connections, IntRange::new(1, 1_000_000)),
        "header_read_timeout_ms" => Int(&mut l.header_read_timeout_ms, IntRange::new(100, 600_000)),
        "client_idle_timeout_ms" => Int(
            &mut l.client_idle_timeout_ms,
            IntRange::new(100, 86_400_000),
        ),
        "connect_timeout_ms" => Int(&mut l.connect_timeout_ms, IntRange::new(100, 300_000)),
        "dns_timeout_ms" => Int(&mut l.dns_timeout_ms, IntRange::new(100, 60_000)),
        "response_header_timeout_ms" => Int(
            &mut l.response_header_timeout_ms,
            IntRange::zero_or(1000, 86_400_000),
        ),
        "tunnel_idle_timeout_ms" => Int(
            &mut l.tunnel_idle_timeout_ms,
            IntRange::zero_or(1000, 604_800_000),
        ),
        "udp_idle_timeout_ms" => Int(&mut l.udp_idle_timeout_ms, IntRange::new(1000, 86_400_000)),
        "max_udp_associations" => Int(&mut l.max_udp_associations, IntRange::new(1, 65536)),
        "max_udp_destinations" => Int(&mut l.max_udp_destinations, IntRange::new(1, 65536)),
        "blocked_log_size" => Int(&mut l.blocked_log_size, IntRange::new(1, 100_000)),
        "max_pending_approvals" => Int(&mut l.max_pending_approvals, IntRange::new(1, 1_000_000)),
        "shutdown_grace_ms" => Int(&mut l.shutdown_grace_ms, IntRange::new(0, 600_000)),
        _ => return None,
    })
}

pub(crate) const MITM_KEYS: &[&str] = &[
    "ca_cert_file",
    "ca_key_file",
    "create_ca_files",
    "out_dir",
    "leaf_cache_size",
    "extra_upstream_ca_files",
];

fn mitm_field<'a>(m: &'a mut MitmConfig, k: &str) -> Option<Field<'a>> {
    Some(match k {
        "ca_cert_file" => Field::OptPath(&mut m.ca_cert_file),
        "ca_key_file" => Field::OptPath(&mut m.ca_key_file),
        "create_ca_files" => Field::Bool(&mut m.create_ca_files),
        "out_dir" => Field::OptPath(&mut m.out_dir),
        "leaf_cache_size" => Field::Int(&mut m.leaf_cache_size, IntRange::new(1, 100_000)),
        "extra_upstream_ca_files" => Field::PathList(&mut m.extra_upstream_ca_files),
        _ => return None,
    })
}

pub(crate) const CONTROL_KEYS: &[&str] = &[
    "endpoint",
    "token_file",
    "session_id",
    "attach_timeout_secs",
    "reconnect_initial_ms",
    "reconnect_max_ms",
    "event_buffer",
    "listen",
    "unix_socket",
    "rules",
    "dangerously_allow_non_loopback",
    "watch_buffer",
];

/// Range of `control.attach_timeout_secs` (also `--control-timeout`).
pub(crate) const ATTACH_TIMEOUT_RANGE: IntRange = IntRange::new(1, 600);

pub(crate) fn control_field<'a>(c: &'a mut ControlConfig, k: &str) -> Option<Field<'a>> {
    use Field::Int;
    Some(match k {
        "token_file" => Field::OptPath(&mut c.token_file),
        "attach_timeout_secs" => Int(&mut c.attach_timeout_secs, ATTACH_TIMEOUT_RANGE),
        "reconnect_initial_ms" => Int(&mut c.reconnect_initial_ms, IntRange::new(10, 60_000)),
        "reconnect_max_ms" => Int(&mut c.reconnect_max_ms, IntRange::new(10, 600_000)),
        "event_buffer" => Int(&mut c.event_buffer, IntRange::new(16, 1_000_000)),
        "rules" => Field::OptPath(&mut c.rules),
        "dangerously_allow_non_loopback" => Field::Bool(&mut c.dangerously_allow_non_loopback),
        "watch_buffer" => Int(&mut c.watch_buffer, IntRange::new(1, 1_000_000)),
        _ => return None,
    })
}

pub(crate) const APPROVALS_KEYS: &[&str] = &[
    "enabled",
    "ask_timeout_secs",
    "max_pending",
    "max_waiters_per_ask",
    "max_session_allows",
    "report_allows",
];

pub(crate) fn approvals_field<'a>(a: &'a mut ApprovalsConfig, k: &str) -> Option<Field<'a>> {
    use Field::Int;
    Some(match k {
        "enabled" => Field::Bool(&mut a.enabled),
        "ask_timeout_secs" => Int(&mut a.ask_timeout_secs, IntRange::new(1, 3600)),
        "max_pending" => Int(&mut a.max_pending, IntRange::new(1, 1_000_000)),
        "max_waiters_per_ask" => Int(&mut a.max_waiters_per_ask, IntRange::new(1, 1_000_000)),
        "max_session_allows" => Int(&mut a.max_session_allows, IntRange::new(1, 1_000_000)),
        "report_allows" => Field::Bool(&mut a.report_allows),
        _ => return None,
    })
}

pub(crate) const REQUIREMENTS_KEYS: &[&str] = &[
    "url",
    "token_file",
    "token_env",
    "ca_file",
    "timeout_secs",
    "max_attempts",
    "cache_file",
    "cache_max_age_secs",
    "refresh_interval_secs",
    "optional",
];

pub(crate) fn requirements_field<'a>(r: &'a mut RequirementsConfig, k: &str) -> Option<Field<'a>> {
    use Field::Int;
    Some(match k {
        "token_file" => Field::OptPath(&mut r.token_file),
        "ca_file" => Field::OptPath(&mut r.ca_file),
        "timeout_secs" => Int(&mut r.timeout_secs, IntRange::new(1, 300)),
        "max_attempts" => Int(&mut r.max_attempts, IntRange::new(1, 10)),
        "cache_file" => Field::OptPath(&mut r.cache_file),
        "cache_max_age_secs" => Int(&mut r.cache_max_age_secs, IntRange::new(0, 31_536_000)),
        "refresh_interval_secs" => Int(&mut r.refresh_interval_secs, IntRange::new(1, 86_400)),
        "optional" => Field::Bool(&mut r.optional),
        _ => return None,
    })
}

pub(crate) const AUDIT_KEYS: &[&str] = &[
    "exporter",
    "protocol",
    "endpoint",
    "headers",
    "timeout_ms",
    "ca_file",
    "max_queue_size",
    "max_export_batch_size",
    "scheduled_delay_ms",
    "shutdown_timeout_ms",
    "traces",
    "resource",
];

pub(crate) fn audit_field<'a>(a: &'a mut AuditConfig, k: &str) -> Option<Field<'a>> {
    use Field::OptInt;
    Some(match k {
        "timeout_ms" => OptInt(&mut a.timeout_ms, IntRange::new(1, 600_000)),
        "ca_file" => Field::OptPath(&mut a.ca_file),
        "max_queue_size" => OptInt(&mut a.max_queue_size, IntRange::new(1, 1_000_000)),
        "max_export_batch_size" => {
            OptInt(&mut a.max_export_batch_size, IntRange::new(1, 1_000_000))
        }
        "scheduled_delay_ms" => OptInt(&mut a.scheduled_delay_ms, IntRange::new(1, 600_000)),
        "shutdown_timeout_ms" => Field::Int(&mut a.shutdown_timeout_ms, IntRange::new(0, 600_000)),
        "traces" => Field::OptBool(&mut a.traces),
        _ => return None,
    })
}

/// Levenshtein distance over characters, or `None` when it certainly exceeds `limit`.
pub(crate) fn edit_distance(a: &str, b: &str, limit: usize) -> Option<usize> {
    let a: Vec<char> = a.chars().take(limit + 64).collect();
    let b: Vec<char> = b.chars().collect();
    if a.len().abs_diff(b.len()) > limit {
        return None;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    let d = prev[b.len()];
    (d <= limit).then_some(d)
}

/// The known key closest to `key` within edit distance 2 (first one on ties).
pub(crate) fn suggest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    let mut best: Option<(usize, &str)> = None;
    for k in known {
        if let Some(d) = edit_distance(key, k, 2)
            && best.is_none_or(|(bd, _)| d < bd)
        {
            best = Some((d, k));
        }
    }
    best.map(|(_, k)| k)
}

/// One key segment as written in a key path: bare when it is a TOML bare key, else quoted.
pub(crate) fn key_segment(k: &str) -> String {
    if !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        k.to_string()
    } else {
        quoted(k)
    }
}

fn child(parent: &str, k: &str) -> String {
    if parent.is_empty() {
        key_segment(k)
    } else {
        format!("{parent}.{}", key_segment(k))
    }
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// Entries of a table in file order.
fn entries<'t, 'i>(t: &'t DeTable<'i>) -> Vec<(&'t SKey<'i>, &'t SVal<'i>)> {
    let mut v: Vec<_> = t.iter().collect();
    v.sort_by_key(|(k, _)| k.span().start);
    v
}

/// The walker: file label, text (for positions) and the positions of the scalar keys seen.
pub(crate) struct Parser<'a> {
    path: &'a str,
    text: &'a str,
    line_starts: Vec<usize>,
    /// (byte offset, line index, column) of the last computed position.
    cache: Cell<(usize, usize, usize)>,
    pub(crate) positions: BTreeMap<String, Position>,
}

impl<'a> Parser<'a> {
    pub(crate) fn new(path: &'a str, text: &'a str) -> Parser<'a> {
        let mut line_starts = vec![0];
        line_starts.extend(
            text.bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'\n')
                .map(|(i, _)| i + 1),
        );
        Parser {
            path,
            text,
            line_starts,
            cache: Cell::new((0, 0, 1)),
            positions: BTreeMap::new(),
        }
    }

    /// Line and column of a byte offset. Amortised cheap for increasing offsets on one line.
    pub(crate) fn pos(&self, offset: usize) -> Position {
        let mut offset = offset.min(self.text.len());
        while offset > 0 && !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = match self.line_starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i.saturating_sub(1),
        };
        let (c_off, c_line, c_col) = self.cache.get();
        let column = if c_line == line && c_off <= offset {
            c_col
                + self
                    .text
                    .get(c_off..offset)
                    .map_or(0, |s| s.chars().count())
        } else {
            let start = self.line_starts.get(line).copied().unwrap_or(0);
            1 + self
                .text
                .get(start..offset)
                .map_or(0, |s| s.chars().count())
        };
        self.cache.set((offset, line, column));
        Position {
            line: line + 1,
            column,
        }
    }

    fn err(&self, span: Range<usize>, key: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::new(self.path, Some(self.pos(span.start)), key, problem)
    }

    fn remember(&mut self, key: &str, span: Range<usize>) {
        let p = self.pos(span.start);
        self.positions.insert(key.to_string(), p);
    }

    fn unknown(&self, k: &SKey<'_>, v: &SVal<'_>, parent: &str, known: &[&str]) -> ConfigError {
        let what = if matches!(v.get_ref(), DeValue::Table(_)) {
            "unknown table"
        } else {
            "unknown key"
        };
        let problem = match suggest(k.get_ref(), known) {
            Some(h) => format!("{what} (did you mean {h}?)"),
            None => what.to_string(),
        };
        self.err(k.span(), &child(parent, k.get_ref()), problem)
    }

    fn mismatch(&self, v: &SVal<'_>, key: &str, expected: &str) -> ConfigError {
        self.err(
            v.span(),
            key,
            format!("expected {expected}, found {}", type_name(v.get_ref())),
        )
    }

    fn table<'v, 'i>(&self, v: &'v SVal<'i>, key: &str) -> Result<&'v DeTable<'i>, ConfigError> {
        match v.get_ref() {
            DeValue::Table(t) => Ok(t),
            _ => Err(self.mismatch(v, key, "a table")),
        }
    }

    fn boolean(&mut self, v: &SVal<'_>, key: &str) -> Result<bool, ConfigError> {
        match v.get_ref() {
            DeValue::Boolean(b) => {
                self.remember(key, v.span());
                Ok(*b)
            }
            _ => Err(self.mismatch(v, key, "a boolean")),
        }
    }

    fn string<'v>(&mut self, v: &'v SVal<'_>, key: &str) -> Result<&'v str, ConfigError> {
        match v.get_ref() {
            DeValue::String(s) => {
                self.remember(key, v.span());
                Ok(s)
            }
            _ => Err(self.mismatch(v, key, "a string")),
        }
    }

    /// A string checked by `check` (whose error is the PROBLEM).
    fn checked<T>(
        &mut self,
        v: &SVal<'_>,
        key: &str,
        check: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let s = self.string(v, key)?;
        check(s).map_err(|p| self.err(v.span(), key, p))
    }

    fn path(&mut self, v: &SVal<'_>, key: &str) -> Result<PathBuf, ConfigError> {
        self.checked(v, key, |s| check_path_text(s).map(|()| PathBuf::from(s)))
    }

    fn integer(&mut self, v: &SVal<'_>, key: &str, range: IntRange) -> Result<u64, ConfigError> {
        let DeValue::Integer(i) = v.get_ref() else {
            return Err(self.mismatch(v, key, "an integer"));
        };
        let digits: String = i.as_str().chars().filter(|c| *c != '_').collect();
        let n = i128::from_str_radix(&digits, i.radix()).ok();
        match n {
            Some(n) if range.contains(n) => {
                self.remember(key, v.span());
                u64::try_from(n).map_err(|_| self.err(v.span(), key, range.message()))
            }
            _ => Err(self.err(v.span(), key, range.message())),
        }
    }

    /// Array items with their key paths (`parent[i]`).
    fn array<'v, 'i>(&self, v: &'v SVal<'i>, key: &str) -> Result<&'v [SVal<'i>], ConfigError> {
        match v.get_ref() {
            DeValue::Array(a) => Ok(a),
            _ => Err(self.mismatch(v, key, "an array")),
        }
    }

    fn field(&mut self, f: Field<'_>, v: &SVal<'_>, key: &str) -> Result<(), ConfigError> {
        match f {
            Field::Bool(b) => *b = self.boolean(v, key)?,
            Field::OptBool(b) => *b = Some(self.boolean(v, key)?),
            Field::Int(n, r) => *n = self.integer(v, key, r)?,
            Field::OptInt(n, r) => *n = Some(self.integer(v, key, r)?),
            Field::OptPath(p) => *p = Some(self.path(v, key)?),
            Field::PathList(list) => {
                let items = self.array(v, key)?;
                self.remember(key, v.span());
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    out.push(self.path(item, &format!("{key}[{i}]"))?);
                }
                *list = out;
            }
        }
        Ok(())
    }

    /// Walks a table whose keys are all plain fields, plus the special ones handled by
    /// `special` (which returns `Ok(false)` for keys it does not know).
    fn simple_table<T>(
        &mut self,
        v: &SVal<'_>,
        name: &str,
        known: &[&str],
        target: &mut T,
        field: for<'t> fn(&'t mut T, &str) -> Option<Field<'t>>,
        mut special: impl FnMut(&mut Self, &mut T, &str, &SVal<'_>, &str) -> Result<bool, ConfigError>,
    ) -> Result<(), ConfigError> {
        let t = self.table(v, name)?;
        for (k, v) in entries(t) {
            let key = child(name, k.get_ref());
            if special(self, target, k.get_ref(), v, &key)? {
                continue;
            }
            match field(target, k.get_ref()) {
                Some(f) => self.field(f, v, &key)?,
                None => return Err(self.unknown(k, v, name, known)),
            }
        }
        Ok(())
    }

    fn pattern_list(
        &mut self,
        v: &SVal<'_>,
        key: &str,
        deny: bool,
    ) -> Result<Vec<ListEntry>, ConfigError> {
        let items = self.array(v, key)?;
        self.remember(key, v.span());
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let ikey = format!("{key}[{i}]");
            let DeValue::String(s) = item.get_ref() else {
                return Err(self.mismatch(item, &ikey, "a string"));
            };
            check_pattern(s, deny).map_err(|p| self.err(item.span(), &ikey, p))?;
            out.push(ListEntry {
                value: s.to_string(),
                source: EntrySource::File {
                    key: ikey,
                    position: Some(self.pos(item.span().start)),
                },
            });
        }
        Ok(out)
    }

    fn unix_list(&mut self, v: &SVal<'_>, key: &str) -> Result<Vec<ListEntry>, ConfigError> {
        let items = self.array(v, key)?;
        self.remember(key, v.span());
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let ikey = format!("{key}[{i}]");
            let DeValue::String(s) = item.get_ref() else {
                return Err(self.mismatch(item, &ikey, "a string"));
            };
            check_unix_path(s).map_err(|p| self.err(item.span(), &ikey, p))?;
            out.push(ListEntry {
                value: s.to_string(),
                source: EntrySource::File {
                    key: ikey,
                    position: Some(self.pos(item.span().start)),
                },
            });
        }
        Ok(out)
    }

    /// `[network.domains]` / `[network.unix_sockets]`: returns (allow, deny) entries.
    fn allow_deny_map(
        &mut self,
        v: &SVal<'_>,
        key: &str,
        unix: bool,
    ) -> Result<(Vec<ListEntry>, Vec<ListEntry>), ConfigError> {
        let t = self.table(v, key)?;
        self.remember(key, v.span());
        let (mut allow, mut deny) = (Vec::new(), Vec::new());
        for (k, val) in entries(t) {
            let ekey = format!("{key}.{}", quoted(k.get_ref()));
            let is_deny = match val.get_ref() {
                DeValue::String(s) if s == "allow" => false,
                DeValue::String(s) if s == "deny" => true,
                DeValue::String(_) => {
                    return Err(self.err(val.span(), &ekey, "expected \"allow\" or \"deny\""));
                }
                _ => return Err(self.mismatch(val, &ekey, "\"allow\" or \"deny\"")),
            };
            let checked = if unix {
                check_unix_path(k.get_ref())
            } else {
                check_pattern(k.get_ref(), is_deny)
            };
            checked.map_err(|p| self.err(k.span(), &ekey, p))?;
            let entry = ListEntry {
                value: k.get_ref().to_string(),
                source: EntrySource::File {
                    key: ekey,
                    position: Some(self.pos(k.span().start)),
                },
            };
            if is_deny {
                deny.push(entry);
            } else {
                allow.push(entry);
            }
        }
        Ok((allow, deny))
    }

    fn network(&mut self, v: &SVal<'_>, net: &mut NetworkConfig) -> Result<(), ConfigError> {
        let t = self.table(v, "network")?;
        let items = entries(t);
        // Rule 5 first: mixing forms is reported before the entries' contents.
        let find = |name: &str| items.iter().find(|(k, _)| k.get_ref() == name);
        let lists = find("allowed_domains").or_else(|| find("denied_domains"));
        if let (Some((lk, _)), Some(_)) = (lists, find("domains")) {
            return Err(self.err(
                lk.span(),
                &child("network", lk.get_ref()),
                "cannot be combined with network.domains; use one form",
            ));
        }
        if let (Some((lk, _)), Some(_)) = (find("allow_unix_sockets"), find("unix_sockets")) {
            return Err(self.err(
                lk.span(),
                "network.allow_unix_sockets",
                "cannot be combined with network.unix_sockets; use one form",
            ));
        }
        for (k, v) in items.iter().copied() {
            let key = child("network", k.get_ref());
            match k.get_ref().as_ref() {
                "enabled" => net.enabled = self.boolean(v, &key)?,
                "mode" => {
                    net.mode = self.checked(v, &key, |s| {
                        Mode::parse(s).ok_or_else(|| "expected \"full\" or \"limited\"".to_string())
                    })?
                }
                "allowed_domains" => {
                    net.allowed_domains = self.pattern_list(v, &key, false)?;
                    if !net.allowed_domains.is_empty() {
                        net.domains_form = Form::List;
                    }
                }
                "denied_domains" => {
                    net.denied_domains = self.pattern_list(v, &key, true)?;
                    if !net.denied_domains.is_empty() {
                        net.domains_form = Form::List;
                    }
                }
                "domains" => {
                    let (a, d) = self.allow_deny_map(v, &key, false)?;
                    net.allowed_domains = a;
                    net.denied_domains = d;
                    net.domains_form = Form::Map;
                }
                "allow_unix_sockets" => {
                    net.allow_unix_sockets = self.unix_list(v, &key)?;
                    if !net.allow_unix_sockets.is_empty() {
                        net.unix_sockets_form = Form::List;
                    }
                }
                "unix_sockets" => {
                    let (a, d) = self.allow_deny_map(v, &key, true)?;
                    net.allow_unix_sockets = a;
                    net.deny_unix_sockets = d;
                    net.unix_sockets_form = Form::Map;
                }
                "dangerously_allow_all_unix_sockets" => {
                    net.dangerously_allow_all_unix_sockets = self.boolean(v, &key)?
                }
                "allow_local_binding" => net.allow_local_binding = self.boolean(v, &key)?,
                "enable_socks5" => net.enable_socks5 = self.boolean(v, &key)?,
                "enable_socks5_udp" => net.enable_socks5_udp = self.boolean(v, &key)?,
                "allow_upstream_proxy" => net.allow_upstream_proxy = self.boolean(v, &key)?,
                "dangerously_allow_non_loopback_proxy" => {
                    net.dangerously_allow_non_loopback_proxy = self.boolean(v, &key)?
                }
                "proxy_url" => {
                    net.proxy_url =
                        self.checked(v, &key, |s| parse_listener_addr(s, ListenerKind::Http))?
                }
                "socks_url" => {
                    net.socks_url =
                        self.checked(v, &key, |s| parse_listener_addr(s, ListenerKind::Socks5))?
                }
                "admin_url" => {
                    net.admin_url =
                        self.checked(v, &key, |s| parse_listener_addr(s, ListenerKind::Admin))?
                }
                "enable_admin" => net.enable_admin = self.boolean(v, &key)?,
                "admin_token_file" => net.admin_token_file = Some(self.path(v, &key)?),
                "mitm" => net.mitm = self.boolean(v, &key)?,
                "dns_servers" => {
                    let items = self.array(v, &key)?;
                    self.remember(&key, v.span());
                    let mut out = Vec::with_capacity(items.len().min(1024));
                    for (i, item) in items.iter().enumerate() {
                        out.push(self.checked(item, &format!("{key}[{i}]"), check_dns_server)?);
                    }
                    net.dns_servers = out;
                }
                "socks_username" => {
                    net.socks_username = Some(self.checked(v, &key, |s| {
                        if s.is_empty() || s.len() > 255 {
                            Err("must be 1 to 255 bytes".to_string())
                        } else {
                            Ok(s.to_string())
                        }
                    })?)
                }
                "socks_password_file" => net.socks_password_file = Some(self.path(v, &key)?),
                _ => return Err(self.unknown(k, v, "network", NETWORK_KEYS)),
            }
        }
        Ok(())
    }

    fn string_map(
        &mut self,
        v: &SVal<'_>,
        key: &str,
        check_name: fn(&str) -> Result<(), String>,
        check_value: fn(&str) -> Result<(), String>,
    ) -> Result<BTreeMap<String, String>, ConfigError> {
        let t = self.table(v, key)?;
        self.remember(key, v.span());
        let mut out = BTreeMap::new();
        for (k, val) in entries(t) {
            let ekey = child(key, k.get_ref());
            check_name(k.get_ref()).map_err(|p| self.err(k.span(), &ekey, p))?;
            let s = match val.get_ref() {
                DeValue::String(s) => s,
                _ => return Err(self.mismatch(val, &ekey, "a string")),
            };
            check_value(s).map_err(|p| self.err(val.span(), &ekey, p))?;
            out.insert(k.get_ref().to_string(), s.to_string());
        }
        Ok(out)
    }
}

/// Parses and validates a whole document (without the cross-key checks, which
/// [`Config::validate`] does).
pub(crate) fn parse_document(text: &str, path: &str) -> Result<Config, ConfigError> {
    let root = match DeTable::parse(text) {
        Ok(r) => r,
        Err(e) => {
            let p = Parser::new(path, text);
            let position = e.span().map(|s| p.pos(s.start));
            return Err(ConfigError::file(
                path,
                position,
                format!("invalid TOML: {}", e.message().trim()),
            ));
        }
    };
    let mut p = Parser::new(path, text);
    let mut cfg = Config::default();
    for (k, v) in entries(root.get_ref()) {
        match k.get_ref().as_ref() {
            "state_dir" => cfg.state_dir = Some(p.path(v, "state_dir")?),
            "network" => p.network(v, &mut cfg.network)?,
            "limits" => p.simple_table(
                v,
                "limits",
                LIMITS_KEYS,
                &mut cfg.limits,
                limits_field,
                |_, _, _, _, _| Ok(false),
            )?,
            "mitm" => p.simple_table(
                v,
                "mitm",
                MITM_KEYS,
                &mut cfg.mitm,
                mitm_field,
                |_, _, _, _, _| Ok(false),
            )?,
            "control" => p.simple_table(
                v,
                "control",
                CONTROL_KEYS,
                &mut cfg.control,
                control_field,
                |p, c, name, v, key| {
                    match name {
                        "endpoint" => c.endpoint = Some(p.checked(v, key, check_control_endpoint)?),
                        "session_id" => {
                            c.session_id =
                                p.checked(v, key, |s| check_session_id(s).map(|()| s.to_string()))?
                        }
                        "listen" => {
                            c.listen = p
                                .checked(v, key, |s| parse_listener_addr(s, ListenerKind::Control))?
                        }
                        "unix_socket" => {
                            c.unix_socket = Some(
                                p.checked(v, key, |s| check_unix_path(s).map(|()| PathBuf::from(s)))?,
                            )
                        }
                        _ => return Ok(false),
                    }
                    Ok(true)
                },
            )?,
            "approvals" => p.simple_table(
                v,
                "approvals",
                APPROVALS_KEYS,
                &mut cfg.approvals,
                approvals_field,
                |_, _, _, _, _| Ok(false),
            )?,
            "requirements" => p.simple_table(
                v,
                "requirements",
                REQUIREMENTS_KEYS,
                &mut cfg.requirements,
                requirements_field,
                |p, r, name, v, key| {
                    match name {
                        "url" => {
                            r.url = Some(p.checked(v, key, |s| {
                                check_url(s, &["https"]).map(|()| s.to_string())
                            })?)
                        }
                        "token_env" => {
                            r.token_env =
                                Some(p.checked(v, key, |s| check_token_env(s).map(|()| s.to_string()))?)
                        }
                        _ => return Ok(false),
                    }
                    Ok(true)
                },
            )?,
            "audit" => p.simple_table(
                v,
                "audit",
                AUDIT_KEYS,
                &mut cfg.audit,
                audit_field,
                |p, a, name, v, key| {
                    match name {
                        "exporter" => {
                            a.exporter = Some(p.checked(v, key, |s| match s {
                                "otlp" => Ok(AuditExporter::Otlp),
                                "none" => Ok(AuditExporter::None),
                                _ => Err("expected \"otlp\" or \"none\"".to_string()),
                            })?)
                        }
                        "protocol" => {
                            a.protocol = Some(p.checked(v, key, |s| match s {
                                "grpc" => Ok(AuditProtocol::Grpc),
                                "http/protobuf" => Ok(AuditProtocol::HttpProtobuf),
                                "http/json" => Err(
                                    "http/json is not supported; expected \"grpc\" or \"http/protobuf\""
                                        .to_string(),
                                ),
                                _ => Err("expected \"grpc\" or \"http/protobuf\"".to_string()),
                            })?)
                        }
                        "endpoint" => {
                            a.endpoint = Some(p.checked(v, key, |s| {
                                check_url(s, &["http", "https"]).map(|()| s.to_string())
                            })?)
                        }
                        "headers" => {
                            a.headers = p.string_map(v, key, check_header_name, |s| {
                                if s.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                                    Err("header value must not contain CR, LF or NUL".to_string())
                                } else {
                                    Ok(())
                                }
                            })?
                        }
                        "resource" => {
                            a.resource = p.string_map(
                                v,
                                key,
                                |k| {
                                    if k.is_empty() {
                                        Err("resource attribute name must not be empty".to_string())
                                    } else {
                                        Ok(())
                                    }
                                },
                                |_| Ok(()),
                            )?
                        }
                        _ => return Ok(false),
                    }
                    Ok(true)
                },
            )?,
            _ => return Err(p.unknown(k, v, "", ROOT_KEYS)),
        }
    }
    cfg.origin = path.to_string();
    cfg.positions = std::mem::take(&mut p.positions);
    Ok(cfg)
}
