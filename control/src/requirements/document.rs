//! The requirements document (`requirements.md` §3): TOML or JSON by content type, validated
//! into [`Requirements`]. Every error names the key path.

use portcullis::policy::{ListKind, parse_pattern};
use serde_json::Value;

/// Most entries in one managed list (§3.1 rule 5).
const MAX_ENTRIES: usize = 10_000;

/// The validated requirements. `None` = the document does not set it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requirements {
    /// `network.mode`: `Some(true)` = `limited`, `Some(false)` = `full`.
    pub limited: Option<bool>,
    /// `network.allow_local_binding`.
    pub allow_local_binding: Option<bool>,
    /// `network.allow_upstream_proxy`.
    pub allow_upstream_proxy: Option<bool>,
    /// `network.dangerously_allow_non_loopback_proxy`.
    pub dangerously_allow_non_loopback_proxy: Option<bool>,
    /// `network.dangerously_allow_all_unix_sockets`.
    pub dangerously_allow_all_unix_sockets: Option<bool>,
    /// `network.managed_allowed_domains_only`.
    pub managed_allowed_domains_only: bool,
    /// Managed allow patterns, normalised, deduplicated (a pattern also denied stays here;
    /// deny wins at evaluation time).
    pub allowed: Vec<String>,
    /// Managed deny patterns, normalised, deduplicated.
    pub denied: Vec<String>,
    /// Socket allow paths; `None` when the document lists no sockets.
    pub socket_allow: Option<Vec<String>>,
    /// Socket deny paths (map form `"deny"`).
    pub socket_deny: Vec<String>,
}

/// The format a content type selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// TOML (the primary format).
    Toml,
    /// JSON with the same structure.
    Json,
}

/// The format of a `Content-Type` value (`None` header = TOML), or why it is unsupported.
pub fn format_of(content_type: &str) -> Result<Format, String> {
    let mut parts = content_type.split(';');
    let mime = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    for param in parts {
        let Some((k, v)) = param.split_once('=') else {
            continue;
        };
        if k.trim().eq_ignore_ascii_case("charset") {
            let v = v.trim().trim_matches('"');
            if !v.eq_ignore_ascii_case("utf-8") {
                return Err(format!("unsupported charset \"{v}\""));
            }
        }
    }
    match mime.as_str() {
        "" | "application/toml" | "text/toml" | "text/plain" => Ok(Format::Toml),
        "application/json" => Ok(Format::Json),
        m if m.ends_with("+json") && m.contains('/') => Ok(Format::Json),
        m => Err(format!("unsupported content type \"{m}\"")),
    }
}

/// Parses and validates a document; `Err` is the detail after `invalid requirements document: `.
/// Unknown top-level keys are returned as the second value (the caller WARNs once).
pub fn parse(content_type: &str, body: &str) -> Result<(Requirements, Vec<String>), String> {
    let value: Value = match format_of(content_type)? {
        Format::Toml => toml::from_str::<toml::Table>(body)
            .map_err(|e| format!("TOML syntax: {}", e.message()))
            .and_then(|t| serde_json::to_value(t).map_err(|e| format!("TOML value: {e}")))?,
        Format::Json => serde_json::from_str(body).map_err(|e| format!("JSON syntax: {e}"))?,
    };
    let Value::Object(top) = value else {
        return Err("the document must be a table/object".into());
    };
    let mut unknown = Vec::new();
    let mut req = Requirements::default();
    for (key, v) in &top {
        match key.as_str() {
            "schema_version" => match v.as_i64() {
                Some(1) => {}
                Some(n) => return Err(format!("schema_version: unsupported version {n}")),
                None => return Err("schema_version: expected an integer".into()),
            },
            "network" => network(v, &mut req)?,
            other => unknown.push(other.to_string()),
        }
    }
    Ok((req, unknown))
}

fn boolean(v: &Value, key: &str) -> Result<Option<bool>, String> {
    v.as_bool()
        .map(Some)
        .ok_or_else(|| format!("network.{key}: expected a boolean"))
}

fn network(v: &Value, req: &mut Requirements) -> Result<(), String> {
    let Value::Object(n) = v else {
        return Err("network: expected a table".into());
    };
    let has = |k: &str| n.get(k).is_some_and(|v| !is_empty_list(v));
    if n.contains_key("domains") && (has("allowed_domains") || has("denied_domains")) {
        return Err(
            "network.domains: cannot be combined with network.allowed_domains/denied_domains"
                .into(),
        );
    }
    if n.contains_key("unix_sockets") && has("allow_unix_sockets") {
        return Err(
            "network.unix_sockets: cannot be combined with network.allow_unix_sockets".into(),
        );
    }
    for (key, v) in n {
        match key.as_str() {
            "mode" => {
                req.limited = match v.as_str() {
                    Some("limited") => Some(true),
                    Some("full") => Some(false),
                    Some(other) => {
                        return Err(format!(
                            "network.mode: must be \"full\" or \"limited\" (got \"{other}\")"
                        ));
                    }
                    None => return Err("network.mode: expected a string".into()),
                }
            }
            "allow_local_binding" => req.allow_local_binding = boolean(v, key)?,
            "allow_upstream_proxy" => req.allow_upstream_proxy = boolean(v, key)?,
            "dangerously_allow_non_loopback_proxy" => {
                req.dangerously_allow_non_loopback_proxy = boolean(v, key)?
            }
            "dangerously_allow_all_unix_sockets" => {
                req.dangerously_allow_all_unix_sockets = boolean(v, key)?
            }
            "managed_allowed_domains_only" => {
                req.managed_allowed_domains_only = boolean(v, key)?.unwrap_or(false)
            }
            "domains" => {
                for (pattern, d) in map(v, "network.domains")? {
                    let path = format!("network.domains.{}", quote(&pattern));
                    match d.as_str() {
                        Some("allow") => {
                            push_pattern(&mut req.allowed, &pattern, ListKind::Allow, &path)?
                        }
                        Some("deny") => {
                            push_pattern(&mut req.denied, &pattern, ListKind::Deny, &path)?
                        }
                        _ => return Err(format!("{path}: must be \"allow\" or \"deny\"")),
                    }
                }
                check_count(req.allowed.len().max(req.denied.len()), "network.domains")?;
            }
            "allowed_domains" | "denied_domains" => {
                let (list, kind) = if key == "allowed_domains" {
                    (&mut req.allowed, ListKind::Allow)
                } else {
                    (&mut req.denied, ListKind::Deny)
                };
                let items = list_of(v, &format!("network.{key}"))?;
                for (i, pattern) in items.iter().enumerate() {
                    push_pattern(list, pattern, kind, &format!("network.{key}[{i}]"))?;
                }
            }
            "unix_sockets" => {
                let mut allow = Vec::new();
                for (path, d) in map(v, "network.unix_sockets")? {
                    let key_path = format!("network.unix_sockets.{}", quote(&path));
                    portcullis::config::check_unix_path(&path)
                        .map_err(|e| format!("{key_path}: {e}"))?;
                    match d.as_str() {
                        Some("allow") => push_unique(&mut allow, path),
                        Some("deny") => push_unique(&mut req.socket_deny, path),
                        _ => return Err(format!("{key_path}: must be \"allow\" or \"deny\"")),
                    }
                }
                check_count(
                    allow.len().max(req.socket_deny.len()),
                    "network.unix_sockets",
                )?;
                if !allow.is_empty() || !req.socket_deny.is_empty() {
                    req.socket_allow = Some(allow);
                }
            }
            "allow_unix_sockets" => {
                let items = list_of(v, "network.allow_unix_sockets")?;
                let mut allow = Vec::new();
                for (i, path) in items.into_iter().enumerate() {
                    portcullis::config::check_unix_path(&path)
                        .map_err(|e| format!("network.allow_unix_sockets[{i}]: {e}"))?;
                    push_unique(&mut allow, path);
                }
                if !allow.is_empty() {
                    req.socket_allow = Some(allow);
                }
            }
            other => return Err(format!("unknown key network.{other}")),
        }
    }
    Ok(())
}

fn is_empty_list(v: &Value) -> bool {
    v.as_array().is_some_and(|a| a.is_empty())
}

fn check_count(n: usize, path: &str) -> Result<(), String> {
    if n > MAX_ENTRIES {
        return Err(format!("{path}: more than {MAX_ENTRIES} entries"));
    }
    Ok(())
}

fn map(v: &Value, path: &str) -> Result<Vec<(String, Value)>, String> {
    match v {
        Value::Object(m) => Ok(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
        _ => Err(format!("{path}: expected a table")),
    }
}

fn list_of(v: &Value, path: &str) -> Result<Vec<String>, String> {
    let Value::Array(a) = v else {
        return Err(format!("{path}: expected a list of strings"));
    };
    check_count(a.len(), path)?;
    a.iter()
        .enumerate()
        .map(|(i, s)| {
            s.as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("{path}[{i}]: expected a string"))
        })
        .collect()
}

fn quote(s: &str) -> String {
    let shown: String = s.chars().take(200).collect();
    format!("\"{}\"", shown.escape_default())
}

fn push_unique(list: &mut Vec<String>, item: String) {
    if !list.contains(&item) {
        list.push(item);
    }
}

/// Validates one managed pattern and appends its normalised spelling.
fn push_pattern(
    list: &mut Vec<String>,
    raw: &str,
    kind: ListKind,
    path: &str,
) -> Result<(), String> {
    if is_global_wildcard(raw) {
        return Err(format!(
            "{path}: managed domain patterns may not be global wildcards (got {})",
            quote(raw)
        ));
    }
    let p = parse_pattern(raw, kind).map_err(|e| format!("{path}: {e}"))?;
    push_unique(list, p.text);
    Ok(())
}

/// A pattern whose host part is only wildcards (`*`, `**`, `**.*`, `[*]`, `**.[*]`, …).
pub fn is_global_wildcard(raw: &str) -> bool {
    let mut host = raw;
    // Strip a trailing `:port` (digits), outside brackets.
    if let Some((h, port)) = raw.rsplit_once(':')
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && !h.contains(':')
    {
        host = h;
    }
    if let Some((h, port)) = raw.rsplit_once("]:")
        && port.bytes().all(|b| b.is_ascii_digit())
    {
        host = h;
    }
    let stripped: String = host.chars().filter(|c| !matches!(c, '[' | ']')).collect();
    !stripped.is_empty()
        && stripped.contains('*')
        && stripped.chars().all(|c| matches!(c, '*' | '.' | '?'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> Requirements {
        parse("application/toml", body).unwrap().0
    }

    fn err(body: &str) -> String {
        parse("application/toml", body).unwrap_err()
    }

    #[test]
    fn spec_example_is_valid() {
        let r = ok(r#"
schema_version = 1
[network]
mode = "limited"
allow_local_binding = false
allow_upstream_proxy = false
dangerously_allow_non_loopback_proxy = false
dangerously_allow_all_unix_sockets = false
managed_allowed_domains_only = true
[network.domains]
"**.corp.example" = "allow"
"pastebin.com" = "deny"
[network.unix_sockets]
"/run/user/1000/ssh-agent.sock" = "allow"
"#);
        assert_eq!(r.limited, Some(true));
        assert_eq!(r.allow_local_binding, Some(false));
        assert!(r.managed_allowed_domains_only);
        assert_eq!(r.allowed, ["**.corp.example"]);
        assert_eq!(r.denied, ["pastebin.com"]);
        assert_eq!(
            r.socket_allow,
            Some(vec!["/run/user/1000/ssh-agent.sock".to_string()])
        );
    }

    #[test]
    fn empty_document_imposes_nothing() {
        assert_eq!(ok(""), Requirements::default());
        assert_eq!(ok("[network]\n"), Requirements::default());
    }

    #[test]
    fn list_forms_and_json() {
        let r = ok(
            "[network]\nallowed_domains = [\"API.Example.com\"]\ndenied_domains = [\"evil.example\"]\nallow_unix_sockets = [\"/s\"]\n",
        );
        assert_eq!(r.allowed, ["api.example.com"]);
        assert_eq!(r.denied, ["evil.example"]);
        assert_eq!(r.socket_allow, Some(vec!["/s".to_string()]));
        let (j, _) = parse(
            "application/vnd.corp+json; charset=UTF-8",
            r#"{"network":{"domains":{"a.example":"deny"}}}"#,
        )
        .unwrap();
        assert_eq!(j.denied, ["a.example"]);
        // An empty list counts as absent, so it may sit beside the map form.
        assert!(
            parse(
                "application/toml",
                "[network]\nallowed_domains = []\n[network.domains]\n\"a.b\" = \"allow\"\n"
            )
            .is_ok()
        );
    }

    #[test]
    fn global_wildcards_are_refused_with_the_key_path() {
        assert_eq!(
            err("[network.domains]\n\"*\" = \"allow\"\n"),
            "network.domains.\"*\": managed domain patterns may not be global wildcards (got \"*\")"
        );
        for w in ["**", "**.*", "[*]", "**.[*]", "*:443"] {
            assert!(is_global_wildcard(w), "{w}");
            let e = err(&format!("[network]\ndenied_domains = [\"{w}\"]\n"));
            assert!(
                e.contains(
                    "network.denied_domains[0]: managed domain patterns may not be global wildcards"
                ),
                "{e}"
            );
        }
        for fine in [
            "*.example.com",
            "**.corp.example",
            "api.example.com:443",
            "10.0.0.0/8",
        ] {
            assert!(!is_global_wildcard(fine), "{fine}");
        }
    }

    #[test]
    fn invalid_documents_name_the_key() {
        assert_eq!(err("[network]\nbogus = 1\n"), "unknown key network.bogus");
        assert!(err("[network]\nmode = \"open\"\n").starts_with("network.mode: "));
        assert!(err("[network]\nmode = 3\n").starts_with("network.mode: "));
        assert!(
            err("[network]\nallow_local_binding = \"no\"\n")
                .starts_with("network.allow_local_binding: ")
        );
        assert!(
            err("[network.domains]\n\"a.example\" = \"maybe\"\n")
                .starts_with("network.domains.\"a.example\": ")
        );
        assert!(
            err("[network]\nallowed_domains = [\"a.b\"]\n[network.domains]\n\"c.d\" = \"deny\"\n")
                .starts_with("network.domains: cannot be combined")
        );
        assert!(err("[network]\nallow_unix_sockets = [\"/a\"]\n[network.unix_sockets]\n\"/b\" = \"allow\"\n").starts_with("network.unix_sockets: cannot be combined"));
        assert!(
            err("[network]\nallow_unix_sockets = [\"rel\"]\n")
                .starts_with("network.allow_unix_sockets[0]: ")
        );
        assert!(
            err("[network]\nallowed_domains = [\"a..b\"]\n")
                .starts_with("network.allowed_domains[0]: invalid pattern")
        );
        assert!(err("schema_version = 2\n").starts_with("schema_version: "));
        assert!(err("network = [\n").starts_with("TOML syntax"));
        let long = format!(
            "[network]\nallowed_domains = [\"{}.com\"]\n",
            "a".repeat(1000)
        );
        assert!(err(&long).contains("invalid pattern"));
    }

    #[test]
    fn unknown_top_level_keys_are_reported_not_fatal() {
        let (_, unknown) = parse("", "[other_product]\nx = 1\n").unwrap();
        assert_eq!(unknown, ["other_product"]);
    }

    #[test]
    fn allow_and_deny_of_one_pattern_is_accepted() {
        let r =
            ok("[network]\nallowed_domains = [\"a.example\"]\ndenied_domains = [\"a.example\"]\n");
        assert_eq!(r.allowed, r.denied);
    }

    #[test]
    fn too_many_entries() {
        let items: Vec<String> = (0..10_001).map(|i| format!("\"h{i}.example\"")).collect();
        let body = format!("[network]\ndenied_domains = [{}]\n", items.join(","));
        assert!(err(&body).contains("more than 10000 entries"));
    }

    #[test]
    fn content_types() {
        assert_eq!(format_of(""), Ok(Format::Toml));
        assert_eq!(format_of("text/plain; charset=utf-8"), Ok(Format::Toml));
        assert_eq!(format_of("application/json"), Ok(Format::Json));
        assert_eq!(format_of("application/problem+json"), Ok(Format::Json));
        assert!(format_of("text/html").is_err());
        assert!(format_of("application/toml; charset=latin1").is_err());
        assert!(
            parse("text/html", "")
                .unwrap_err()
                .contains("unsupported content type")
        );
    }
}
