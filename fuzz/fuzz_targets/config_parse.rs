//! Configuration parsing (`config.md`): arbitrary bytes as a TOML config file.
//!
//! Invariants: never panics; parsing is deterministic; a config that parses compiles its
//! policy without panicking and every compiled entry re-parses to itself; the JSON view
//! (`GET /config`) re-serialised as TOML parses back to a config with the same view (where that view is
//! complete: no redacted secrets); a config is always reload-compatible with itself.
#![no_main]

mod common;

use common::checked_pattern;
use libfuzzer_sys::fuzz_target;
use portcullis::config::Config;
use portcullis::policy::{CompiledPolicy, ListKind};

/// JSON → TOML value; `null` (an unset option) is left out, as in a file.
fn to_toml(v: &serde_json::Value) -> Option<toml::Value> {
    use serde_json::Value as J;
    Some(match v {
        J::Null => return None,
        J::Bool(b) => toml::Value::Boolean(*b),
        J::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64()?),
        },
        J::String(s) => toml::Value::String(s.clone()),
        J::Array(a) => toml::Value::Array(a.iter().filter_map(to_toml).collect()),
        J::Object(o) => toml::Value::Table(
            o.iter()
                .filter_map(|(k, v)| Some((k.clone(), to_toml(v)?)))
                .collect(),
        ),
    })
}

fn sorted_sockets(mut v: serde_json::Value) -> serde_json::Value {
    for key in ["allow_unix_sockets", "deny_unix_sockets"] {
        if let Some(serde_json::Value::Array(a)) = v.pointer_mut(&format!("/network/{key}")) {
            a.sort_by_key(|x| x.to_string());
        }
    }
    v
}

fuzz_target!(|data: &[u8]| {
    let first = Config::from_toml_bytes(data, "fuzz.toml");
    let second = Config::from_toml_bytes(data, "fuzz.toml");
    match (&first, &second) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "parsing is not deterministic"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "errors differ"),
        _ => panic!("parsing is not deterministic"),
    }
    let Ok(cfg) = first else {
        return;
    };
    assert!(
        Config::reload_check(&cfg, &cfg).is_ok(),
        "a config cannot reload itself"
    );
    if let Ok(policy) = CompiledPolicy::from_config(&cfg) {
        for p in policy.allowed_patterns() {
            assert!(
                checked_pattern(&p, ListKind::Allow).is_some(),
                "compiled {p:?} invalid"
            );
        }
        for p in policy.denied_patterns() {
            assert!(
                checked_pattern(&p, ListKind::Deny).is_some(),
                "compiled {p:?} invalid"
            );
        }
    }
    let json = cfg.to_json();
    assert_eq!(json, cfg.to_json(), "JSON view not deterministic");
    if json.to_string().contains("<redacted>") {
        return;
    }
    let Some(toml::Value::Table(mut table)) = to_toml(&json) else {
        panic!("JSON view is not an object: {json}");
    };
    // The view lists `deny_unix_sockets`, which a file writes in the map form only.
    if let Some(toml::Value::Table(net)) = table.get_mut("network")
        && let Some(toml::Value::Array(deny)) = net.remove("deny_unix_sockets")
        && !deny.is_empty()
    {
        let mut map = toml::Table::new();
        if let Some(toml::Value::Array(allow)) = net.remove("allow_unix_sockets") {
            for a in allow.iter().filter_map(toml::Value::as_str) {
                map.insert(a.to_string(), "allow".into());
            }
        }
        for d in deny.iter().filter_map(toml::Value::as_str) {
            map.insert(d.to_string(), "deny".into());
        }
        net.insert("unix_sockets".into(), toml::Value::Table(map));
    }
    let text = match toml::to_string(&table) {
        Ok(t) => t,
        Err(e) => panic!("JSON view cannot be written as TOML: {e}\n{json}"),
    };
    match Config::from_toml_str(&text, "roundtrip.toml") {
        // Compared as the JSON view: `Config`'s equality also compares where each list
        // entry was written (key and column), which a rewrite necessarily changes.
        // The map form of `[network.unix_sockets]` is keyed by path, so this rewrite does not
        // keep the order of the unix-socket lists: compare them as sets.
        Ok(again) => assert_eq!(
            sorted_sockets(again.to_json()),
            sorted_sockets(json),
            "round trip changed the config\n{text}"
        ),
        Err(e) => panic!("round-tripped config does not parse: {e}\n{text}"),
    }
});
