//! The `network_rule(...)` file parser of the control plane (`network-rules.md`).
//!
//! Invariants: never panics; a parse error points inside the input (line ≥ 1, at most the
//! number of lines); every parsed rule renders to a canonical line that parses back to the same
//! rule and renders to the same line; the whole file of canonical lines parses to the same rules;
//! every rule host is exactly what the policy normaliser prints for it (§2: "the result must
//! equal what the policy.md normaliser produces"), so compiled rules match requests.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::policy::normalize_host;
use portcullis_control::rules::host::parse_host;
use portcullis_control::rules::parse::{parse_file, parse_line};

fuzz_target!(|data: &[u8]| {
    let rules = match parse_file(data) {
        Ok(r) => r,
        Err(e) => {
            let lines = data.iter().filter(|b| **b == b'\n').count() + 1;
            assert!(
                e.line >= 1 && e.line <= lines.max(1),
                "error line {} of {lines}",
                e.line
            );
            assert!(e.column >= 1, "error column {}", e.column);
            return;
        }
    };
    let mut file = String::new();
    for rule in &rules {
        let line = rule.canonical();
        assert!(!line.contains('\n'), "canonical line spans lines: {line:?}");
        let again = match parse_line(&line, rule.line) {
            Ok(Some(r)) => r,
            other => panic!("canonical line {line:?} of {rule:?} does not parse: {other:?}"),
        };
        assert_eq!(
            &again, rule,
            "canonical line {line:?} parses to another rule"
        );
        assert_eq!(again.canonical(), line, "canonical rendering is not stable");

        // The stored host is in normal form: it parses to itself, with no port inside.
        let h = parse_host(&rule.host);
        assert!(
            h.as_ref()
                .is_ok_and(|h| h.host == rule.host && h.port.is_none()),
            "rule host {:?} does not re-parse to itself: {h:?}",
            rule.host
        );
        // And it is exactly the policy normaliser's spelling.
        let norm = normalize_host(&rule.host).map(|n| n.to_string());
        assert_eq!(
            norm.as_deref(),
            Ok(rule.host.as_str()),
            "rule host {:?} differs from the policy normaliser's form",
            rule.host
        );
        file.push_str(&line);
        file.push('\n');
    }
    let reparsed = match parse_file(file.as_bytes()) {
        Ok(r) => r,
        Err(e) => panic!("canonical file does not parse: {e:?}\n{file}"),
    };
    assert_eq!(reparsed.len(), rules.len());
    for (i, (a, b)) in reparsed.iter().zip(&rules).enumerate() {
        assert_eq!(a.line, i + 1);
        assert_eq!(a.canonical(), b.canonical());
    }
});
