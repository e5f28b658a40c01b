//! Compilation of rules into policy entries (`network-rules.md` §4): the last allow/deny line
//! per (host, port) key wins; `prompt` lines never compile; port-scoped keys become port rules.

use std::collections::HashMap;

use super::parse::Rule;

/// What the rules contribute to the effective policy.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// Any-port allow hosts (exact patterns).
    pub allowed: Vec<(String, usize)>,
    /// Any-port deny hosts (exact patterns).
    pub denied: Vec<(String, usize)>,
    /// Port-scoped rules: (host, port, allow?, line).
    pub port_rules: Vec<(String, u16, bool, usize)>,
}

/// Compiles rules in file order.
pub fn compile(rules: &[Rule]) -> Compiled {
    let mut winner: HashMap<(String, Option<u16>), &Rule> = HashMap::new();
    let mut order: Vec<(String, Option<u16>)> = Vec::new();
    for r in rules.iter().filter(|r| r.decision != "prompt") {
        let key = (r.host.clone(), r.port);
        if winner.insert(key.clone(), r).is_none() {
            order.push(key);
        }
    }
    let mut out = Compiled::default();
    for key in order {
        let Some(r) = winner.get(&key) else { continue };
        let allow = r.decision == "allow";
        match r.port {
            None if allow => out.allowed.push((r.host.clone(), r.line)),
            None => out.denied.push((r.host.clone(), r.line)),
            Some(p) => out.port_rules.push((r.host.clone(), p, allow, r.line)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::parse_file;

    fn c(text: &str) -> Compiled {
        compile(&parse_file(text.as_bytes()).unwrap())
    }

    fn rule(host: &str, decision: &str, extra: &str) -> String {
        format!(
            "network_rule(host=\"{host}\", protocol=\"https\", decision=\"{decision}\"{extra})\n"
        )
    }

    #[test]
    fn last_line_wins_per_key_and_prompt_never_compiles() {
        let x = c(&(rule("a.com", "allow", "") + &rule("a.com", "deny", "")));
        assert_eq!((x.allowed.len(), x.denied.len()), (0, 1));
        let x = c(&(rule("a.com", "deny", "") + &rule("a.com", "allow", "")));
        assert_eq!((x.allowed.len(), x.denied.len()), (1, 0));
        let x = c(&(rule("a.com", "allow", "") + &rule("a.com", "prompt", "")));
        assert_eq!(x.allowed.len(), 1);
    }

    #[test]
    fn port_scoped_rules_and_protocol_not_in_key() {
        let x = c(&(rule("a.com", "allow", "") + &rule("a.com", "deny", ", port=8443")));
        assert_eq!(x.allowed.len(), 1);
        assert_eq!(x.port_rules, vec![("a.com".into(), 8443, false, 2)]);
        let text = "network_rule(host=\"a.com\", protocol=\"http\", decision=\"allow\")\nnetwork_rule(host=\"a.com\", protocol=\"https\", decision=\"deny\")\n";
        let x = c(text);
        assert_eq!((x.allowed.len(), x.denied.len()), (0, 1));
    }
}
