//! `portcullis-proxy` flags over the file (`config.md` §4).

use std::path::PathBuf;

use super::error::{SettingsError, UsageError};
use super::model::{EntrySource, ListEntry, Mode};
use super::parse::ATTACH_TIMEOUT_RANGE;
use super::validate::{check_control_endpoint, check_path_text, check_pattern, check_session_id};
use super::{Config, ListenerKind, parse_listener_addr};

/// Flag values as given on the command line (validated here, so errors name the flag).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyOverrides {
    /// `--http ADDR` → `network.proxy_url`.
    pub http: Option<String>,
    /// `--socks5 ADDR` → `network.socks_url` and `enable_socks5 = true`.
    pub socks5: Option<String>,
    /// `--admin ADDR` → `network.admin_url` and `enable_admin = true`.
    pub admin: Option<String>,
    /// `--allow PATTERN` (repeatable): added to the allowlist.
    pub allow: Vec<String>,
    /// `--deny PATTERN` (repeatable): added to the denylist.
    pub deny: Vec<String>,
    /// `--mode full|limited` → `network.mode`.
    pub mode: Option<String>,
    /// `--control URL` → `control.endpoint`.
    pub control: Option<String>,
    /// `--control-token-file PATH` → `control.token_file`.
    pub control_token_file: Option<PathBuf>,
    /// `--session-id ID` → `control.session_id`.
    pub session_id: Option<String>,
    /// `--control-timeout SECS` → `control.attach_timeout_secs`.
    pub control_timeout: Option<String>,
    /// `--mitm-dir DIR` → `mitm.out_dir`.
    pub mitm_dir: Option<PathBuf>,
}

fn usage(flag: &str, problem: String) -> SettingsError {
    UsageError::new(flag, problem).into()
}

fn check_flag_path(flag: &str, p: &std::path::Path) -> Result<(), SettingsError> {
    let s = p.as_os_str();
    if s.is_empty() {
        return Err(usage(flag, "must not be empty".to_string()));
    }
    if s.as_encoded_bytes().contains(&0) {
        return Err(usage(flag, "must not contain NUL".to_string()));
    }
    if let Some(t) = s.to_str() {
        check_path_text(t).map_err(|e| usage(flag, e))?;
    }
    Ok(())
}

pub(crate) fn apply(cfg: &mut Config, o: &ProxyOverrides) -> Result<(), SettingsError> {
    if let Some(a) = &o.http {
        cfg.network.proxy_url =
            parse_listener_addr(a, ListenerKind::Http).map_err(|e| usage("--http", e))?;
        cfg.flags.insert("network.proxy_url".into(), "--http");
    }
    if let Some(a) = &o.socks5 {
        cfg.network.socks_url =
            parse_listener_addr(a, ListenerKind::Socks5).map_err(|e| usage("--socks5", e))?;
        cfg.network.enable_socks5 = true;
        cfg.flags.insert("network.socks_url".into(), "--socks5");
        cfg.flags.insert("network.enable_socks5".into(), "--socks5");
    }
    if let Some(a) = &o.admin {
        cfg.network.admin_url =
            parse_listener_addr(a, ListenerKind::Admin).map_err(|e| usage("--admin", e))?;
        cfg.network.enable_admin = true;
        cfg.flags.insert("network.admin_url".into(), "--admin");
        cfg.flags.insert("network.enable_admin".into(), "--admin");
    }
    for p in &o.allow {
        check_pattern(p, false).map_err(|e| usage("--allow", e))?;
        cfg.network.allowed_domains.push(ListEntry {
            value: p.clone(),
            source: EntrySource::Flag("--allow"),
        });
    }
    for p in &o.deny {
        check_pattern(p, true).map_err(|e| usage("--deny", e))?;
        cfg.network.denied_domains.push(ListEntry {
            value: p.clone(),
            source: EntrySource::Flag("--deny"),
        });
    }
    if let Some(m) = &o.mode {
        cfg.network.mode = Mode::parse(m)
            .ok_or_else(|| usage("--mode", "expected \"full\" or \"limited\"".to_string()))?;
        cfg.flags.insert("network.mode".into(), "--mode");
    }
    if let Some(c) = &o.control {
        cfg.control.endpoint = Some(check_control_endpoint(c).map_err(|e| usage("--control", e))?);
        cfg.flags.insert("control.endpoint".into(), "--control");
    }
    if let Some(p) = &o.control_token_file {
        check_flag_path("--control-token-file", p)?;
        cfg.control.token_file = Some(p.clone());
        cfg.flags
            .insert("control.token_file".into(), "--control-token-file");
    }
    if let Some(s) = &o.session_id {
        check_session_id(s).map_err(|e| usage("--session-id", e))?;
        cfg.control.session_id = s.clone();
        cfg.flags
            .insert("control.session_id".into(), "--session-id");
    }
    if let Some(t) = &o.control_timeout {
        let t = t.trim();
        let n = if !t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit()) {
            t.parse::<u64>().ok()
        } else {
            None
        };
        match n {
            Some(n) if ATTACH_TIMEOUT_RANGE.contains(i128::from(n)) => {
                cfg.control.attach_timeout_secs = n;
            }
            _ => return Err(usage("--control-timeout", ATTACH_TIMEOUT_RANGE.message())),
        }
        cfg.flags
            .insert("control.attach_timeout_secs".into(), "--control-timeout");
    }
    if let Some(d) = &o.mitm_dir {
        check_flag_path("--mitm-dir", d)?;
        cfg.mitm.out_dir = Some(d.clone());
        cfg.flags.insert("mitm.out_dir".into(), "--mitm-dir");
    }
    Ok(())
}
