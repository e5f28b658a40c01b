//! The `network_rule(...)` line format (`network-rules.md` §1, §3): a hand-written parser with
//! `PATH:LINE:COLUMN: MESSAGE` errors (columns count characters), and the canonical rendering.

use super::host::parse_host;

/// Largest rules file.
const MAX_FILE: usize = 16 * 1024 * 1024;
/// Longest line.
const MAX_LINE: usize = 8192;
/// Most rules.
const MAX_RULES: usize = 100_000;

/// One parsed rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// 1-based line number.
    pub line: usize,
    /// Normalised host.
    pub host: String,
    /// `http`, `https`, `socks5_tcp` or `socks5_udp`.
    pub protocol: String,
    /// `allow`, `deny` or `prompt`.
    pub decision: String,
    /// Port-scoped rule.
    pub port: Option<u16>,
    /// Why.
    pub justification: Option<String>,
}

impl Rule {
    /// The canonical line (§5.1).
    pub fn canonical(&self) -> String {
        let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
        let mut line = format!(
            "network_rule(host={}, protocol={}, decision={}",
            q(&self.host),
            q(&self.protocol),
            q(&self.decision)
        );
        if let Some(p) = self.port {
            line.push_str(&format!(", port={p}"));
        }
        if let Some(j) = &self.justification {
            line.push_str(&format!(", justification={}", q(j)));
        }
        line.push(')');
        line
    }
}

/// A parse error with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl ParseError {
    /// `PATH:LINE:COLUMN: MESSAGE`.
    pub fn render(&self, path: &str) -> String {
        format!("{path}:{}:{}: {}", self.line, self.column, self.message)
    }
}

fn err(line: usize, column: usize, message: impl Into<String>) -> ParseError {
    ParseError {
        line,
        column,
        message: message.into(),
    }
}

/// Parses a whole file.
pub fn parse_file(bytes: &[u8]) -> Result<Vec<Rule>, ParseError> {
    if bytes.len() > MAX_FILE {
        return Err(err(1, 1, "file larger than 16 MiB"));
    }
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let before = &bytes[..e.valid_up_to()];
        let line = before.iter().filter(|b| **b == b'\n').count() + 1;
        err(line, 1, "file is not valid UTF-8")
    })?;
    let mut rules = Vec::new();
    for (i, raw) in text.split('\n').enumerate() {
        let line_no = i + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.len() > MAX_LINE {
            return Err(err(line_no, 1, "line longer than 8192 bytes"));
        }
        if let Some(rule) = parse_line(line, line_no)? {
            if rules.len() == MAX_RULES {
                return Err(err(line_no, 1, "more than 100000 rules"));
            }
            rules.push(rule);
        }
    }
    Ok(rules)
}

struct Cursor {
    chars: Vec<char>,
    at: usize,
    line: usize,
}

impl Cursor {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }
    fn col(&self) -> usize {
        self.at + 1
    }
    fn blanks(&mut self) {
        while matches!(self.peek(), Some(' ' | '\t')) {
            self.at += 1;
        }
    }
    fn ident(&mut self) -> Option<String> {
        let start = self.at;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || (c == '-' && self.at > start))
        {
            self.at += 1;
        }
        (self.at > start).then(|| self.chars[start..self.at].iter().collect())
    }
    fn error(&self, col: usize, msg: impl Into<String>) -> ParseError {
        err(self.line, col, msg)
    }
    /// A JSON string starting at the opening quote.
    fn string(&mut self) -> Result<String, ParseError> {
        let open = self.col();
        self.at += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.error(open, "unterminated string"));
            };
            match c {
                '"' => {
                    self.at += 1;
                    return Ok(out);
                }
                '\\' => {
                    let esc = self.col();
                    self.at += 1;
                    let line = self.line;
                    let bad = move || err(line, esc, "invalid escape sequence in string");
                    let c = self.peek().ok_or_else(bad)?;
                    self.at += 1;
                    match c {
                        '"' => out.push('"'),
                        '\\' => out.push('\\'),
                        '/' => out.push('/'),
                        'b' => out.push('\u{8}'),
                        'f' => out.push('\u{c}'),
                        'n' => out.push('\n'),
                        'r' => out.push('\r'),
                        't' => out.push('\t'),
                        'u' => {
                            let hi = self.hex4().ok_or_else(bad)?;
                            let ch = if (0xd800..0xdc00).contains(&hi) {
                                if self.peek() != Some('\\') {
                                    return Err(bad());
                                }
                                self.at += 1;
                                if self.peek() != Some('u') {
                                    return Err(bad());
                                }
                                self.at += 1;
                                let lo = self.hex4().ok_or_else(bad)?;
                                if !(0xdc00..0xe000).contains(&lo) {
                                    return Err(bad());
                                }
                                char::from_u32(0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00))
                            } else if (0xdc00..0xe000).contains(&hi) {
                                None
                            } else {
                                char::from_u32(hi)
                            };
                            out.push(ch.ok_or_else(bad)?);
                        }
                        _ => return Err(bad()),
                    }
                }
                c if (c as u32) < 0x20 => {
                    return Err(self.error(self.col(), "control character in string"));
                }
                c => {
                    out.push(c);
                    self.at += 1;
                }
            }
        }
    }
    fn hex4(&mut self) -> Option<u32> {
        let s: String = self.chars.get(self.at..self.at + 4)?.iter().collect();
        let v = u32::from_str_radix(&s, 16)
            .ok()
            .filter(|_| s.chars().all(|c| c.is_ascii_hexdigit()))?;
        self.at += 4;
        Some(v)
    }
}

const ARGS: [&str; 5] = ["host", "protocol", "decision", "port", "justification"];

enum Value {
    Str(String, usize),
    Int(u64, usize),
}

/// Parses one line; `None` for blank and comment lines.
pub fn parse_line(line: &str, line_no: usize) -> Result<Option<Rule>, ParseError> {
    let mut c = Cursor {
        chars: line.chars().collect(),
        at: 0,
        line: line_no,
    };
    c.blanks();
    match c.peek() {
        None | Some('#') => return Ok(None),
        _ => {}
    }
    let name_col = c.col();
    let Some(name) = c.ident().filter(|n| {
        n.chars()
            .next()
            .is_some_and(|ch| ch.is_ascii_alphabetic() || ch == '_')
    }) else {
        return Err(c.error(name_col, "expected network_rule(...) or a comment"));
    };
    if name != "network_rule" {
        return Err(c.error(
            name_col,
            format!("unknown rule \"{name}\"; only network_rule(...) is supported"),
        ));
    }
    c.blanks();
    if c.peek() != Some('(') {
        return Err(c.error(c.col(), "expected \"(\" after network_rule"));
    }
    c.at += 1;
    let mut args: Vec<(String, Value, usize)> = Vec::new();
    let close_col;
    loop {
        c.blanks();
        if c.peek() == Some(')') {
            close_col = c.col();
            c.at += 1;
            break;
        }
        let arg_col = c.col();
        let Some(arg) = c
            .ident()
            .filter(|a| a.chars().next().is_some_and(|ch| ch.is_ascii_alphabetic()))
        else {
            return Err(c.error(arg_col, "arguments must be written as name=value"));
        };
        c.blanks();
        if c.peek() != Some('=') {
            return Err(c.error(arg_col, "arguments must be written as name=value"));
        }
        c.at += 1;
        if !ARGS.contains(&arg.as_str()) {
            return Err(c.error(
                arg_col,
                format!("unknown argument \"{arg}\" (expected host, protocol, decision, port, justification)"),
            ));
        }
        if args.iter().any(|(a, _, _)| *a == arg) {
            return Err(c.error(arg_col, format!("argument \"{arg}\" given twice")));
        }
        c.blanks();
        let value_col = c.col();
        let value = match c.peek() {
            Some('"') if arg == "port" => {
                return Err(c.error(value_col, "argument \"port\" must be an integer"));
            }
            Some('"') => Value::Str(c.string()?, value_col),
            Some('\'') => {
                return Err(c.error(value_col, "strings must be double-quoted JSON strings"));
            }
            Some(d) if d.is_ascii_digit() && arg == "port" => {
                let start = c.at;
                while c.peek().is_some_and(|d| d.is_ascii_digit()) {
                    c.at += 1;
                }
                let digits: String = c.chars[start..c.at].iter().collect();
                if digits.len() > 1 && digits.starts_with('0') {
                    return Err(c.error(value_col, "argument \"port\" must be an integer"));
                }
                Value::Int(digits.parse().unwrap_or(u64::MAX), value_col)
            }
            _ if arg == "port" => {
                return Err(c.error(value_col, "argument \"port\" must be an integer"));
            }
            _ => return Err(c.error(value_col, format!("argument \"{arg}\" must be a string"))),
        };
        args.push((arg, value, arg_col));
        c.blanks();
        match c.peek() {
            Some(',') => c.at += 1,
            Some(')') => {}
            _ => return Err(c.error(c.col(), "expected \",\" or \")\"")),
        }
    }
    c.blanks();
    match c.peek() {
        None | Some('#') => {}
        _ => return Err(c.error(c.col(), "unexpected text after \")\"")),
    }
    let get = |name: &str| args.iter().find(|(a, _, _)| a == name).map(|(_, v, _)| v);
    for required in ["host", "protocol", "decision"] {
        if get(required).is_none() {
            return Err(c.error(
                close_col,
                format!("missing required argument \"{required}\""),
            ));
        }
    }
    let string = |name: &str| match get(name) {
        Some(Value::Str(s, col)) => Some((s.clone(), *col)),
        _ => None,
    };
    let (protocol, pcol) = string("protocol").unwrap_or_default();
    let protocol = match protocol.as_str() {
        "http" => "http",
        "https" | "https_connect" | "http-connect" => "https",
        "socks5_tcp" => "socks5_tcp",
        "socks5_udp" => "socks5_udp",
        other => {
            return Err(c.error(
                pcol,
                format!(
                    "protocol must be one of http, https, socks5_tcp, socks5_udp (got \"{other}\")"
                ),
            ));
        }
    };
    let (decision, dcol) = string("decision").unwrap_or_default();
    let decision = match decision.as_str() {
        "allow" => "allow",
        "deny" | "forbidden" => "deny",
        "prompt" => "prompt",
        other => {
            return Err(c.error(
                dcol,
                format!("decision must be one of allow, deny, prompt (got \"{other}\")"),
            ));
        }
    };
    let justification = match string("justification") {
        None => None,
        Some((j, col)) => {
            if j.trim().is_empty() {
                return Err(c.error(col, "justification must not be blank"));
            }
            if j.chars().any(char::is_control) {
                return Err(c.error(col, "justification must not contain control characters"));
            }
            if j.chars().count() > 1024 {
                return Err(c.error(col, "justification must be at most 1024 characters"));
            }
            Some(j)
        }
    };
    let port_arg = match get("port") {
        Some(Value::Int(p, col)) => {
            if !(1..=65535).contains(p) {
                return Err(c.error(*col, "port must be between 1 and 65535"));
            }
            Some((*p as u16, *col))
        }
        _ => None,
    };
    let (host_text, hcol) = string("host").unwrap_or_default();
    let host = parse_host(&host_text).map_err(|m| c.error(hcol, m))?;
    let port = match (host.port, port_arg) {
        (Some(a), Some((b, col))) if a != b => {
            return Err(c.error(col, format!("host port :{a} conflicts with port={b}")));
        }
        (Some(a), _) => Some(a),
        (None, p) => p.map(|(p, _)| p),
    };
    Ok(Some(Rule {
        line: line_no,
        host: host.host,
        protocol: protocol.into(),
        decision: decision.into(),
        port,
        justification,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(line: &str) -> Rule {
        parse_line(line, 1).unwrap().unwrap()
    }

    fn error(text: &str) -> String {
        parse_file(text.as_bytes()).unwrap_err().render("rules")
    }

    #[test]
    fn parses_minimal_and_full_rules() {
        let r = one(r#"network_rule(host="api.github.com", protocol="https", decision="allow")"#);
        assert_eq!(
            (
                r.host.as_str(),
                r.protocol.as_str(),
                r.decision.as_str(),
                r.port
            ),
            ("api.github.com", "https", "allow", None)
        );
        let r = one(
            r#"  network_rule ( justification = "CI # needs it" , port=443, decision="forbidden", protocol="https_connect", host="A.com.", )  # trailing"#,
        );
        assert_eq!(
            (r.decision.as_str(), r.protocol.as_str(), r.port),
            ("deny", "https", Some(443))
        );
        assert_eq!(r.justification.as_deref(), Some("CI # needs it"));
        assert_eq!(
            r.canonical(),
            r#"network_rule(host="a.com", protocol="https", decision="deny", port=443, justification="CI # needs it")"#
        );
        assert_eq!(one(&r.canonical()), Rule { line: 1, ..r });
        let rules = parse_file(b"\xef\xbb\xbf# c\r\n\r\nnetwork_rule(host=\"a\", protocol=\"http\", decision=\"prompt\")\r\n").unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].line, 3);
    }

    #[test]
    fn error_table() {
        let cases = [
            (
                "x y",
                "rules:1:1: unknown rule \"x\"; only network_rule(...) is supported",
            ),
            ("=", "rules:1:1: expected network_rule(...) or a comment"),
            (
                "network_rule host",
                "rules:1:14: expected \"(\" after network_rule",
            ),
            (
                "network_rule(\"a\")",
                "rules:1:14: arguments must be written as name=value",
            ),
            (
                "network_rule(hots=\"a\")",
                "rules:1:14: unknown argument \"hots\" (expected host, protocol, decision, port, justification)",
            ),
            (
                "network_rule(host=\"a\", host=\"b\")",
                "rules:1:24: argument \"host\" given twice",
            ),
            ("network_rule(host=\"a)", "rules:1:19: unterminated string"),
            (
                "network_rule(host=\"a\\q\")",
                "rules:1:21: invalid escape sequence in string",
            ),
            (
                "network_rule(host='a')",
                "rules:1:19: strings must be double-quoted JSON strings",
            ),
            (
                "network_rule(port=\"1\")",
                "rules:1:19: argument \"port\" must be an integer",
            ),
            (
                "network_rule(host=1)",
                "rules:1:19: argument \"host\" must be a string",
            ),
            (
                "network_rule(host=\"a\" protocol=\"http\")",
                "rules:1:23: expected \",\" or \")\"",
            ),
            (
                "network_rule(host=\"a\", protocol=\"http\", decision=\"allow\") x",
                "rules:1:59: unexpected text after \")\"",
            ),
            (
                "network_rule(host=\"a\", protocol=\"http\")",
                "rules:1:39: missing required argument \"decision\"",
            ),
            (
                "network_rule(host=\"a\", protocol=\"ftp\", decision=\"allow\")",
                "rules:1:33: protocol must be one of http, https, socks5_tcp, socks5_udp (got \"ftp\")",
            ),
            (
                "network_rule(host=\"a\", protocol=\"http\", decision=\"maybe\")",
                "rules:1:50: decision must be one of allow, deny, prompt (got \"maybe\")",
            ),
            (
                "network_rule(host=\"a\", protocol=\"http\", decision=\"allow\", justification=\" \")",
                "rules:1:73: justification must not be blank",
            ),
            (
                "network_rule(host=\"a\", protocol=\"http\", decision=\"allow\", port=0)",
                "rules:1:64: port must be between 1 and 65535",
            ),
            (
                "network_rule(host=\"a:80\", protocol=\"http\", decision=\"allow\", port=81)",
                "rules:1:67: host port :80 conflicts with port=81",
            ),
            (
                "network_rule(host=\"*.a\", protocol=\"http\", decision=\"allow\")",
                "rules:1:19: host must be a specific host; wildcards are not allowed",
            ),
            (
                "network_rule(justification=\"é\", host=\"a b\", protocol=\"http\", decision=\"allow\")",
                "rules:1:38: host must not contain whitespace",
            ),
        ];
        for (line, want) in cases {
            assert_eq!(error(line), want, "{line}");
        }
        assert_eq!(
            parse_file(b"\xff").unwrap_err().message,
            "file is not valid UTF-8"
        );
        let long = format!("# {}", "x".repeat(9000));
        assert_eq!(
            parse_file(long.as_bytes()).unwrap_err().message,
            "line longer than 8192 bytes"
        );
    }

    #[test]
    fn escapes_and_surrogates() {
        let r = one(
            r#"network_rule(host="a", protocol="http", decision="allow", justification="\u00e9 \ud83d\ude00 \"q\"")"#,
        );
        assert_eq!(r.justification.as_deref(), Some("é 😀 \"q\""));
        assert!(parse_line(r#"network_rule(host="a", protocol="http", decision="allow", justification="\ud83d")"#, 1).is_err());
    }
}
