//! Configuration and usage errors (`config.md` §2).
//!
//! Both render as one line: `config error: WHERE: KEY: PROBLEM` and `usage error: --FLAG: PROBLEM`.
//! Every piece that may come from hostile input (file label, key, problem text) is escaped so a
//! message never spans lines or carries terminal control sequences, and over-long keys are
//! shortened.

use std::fmt;

/// Longest key path rendered in a message (in characters); longer ones are cut with `…`.
const MAX_KEY_CHARS: usize = 256;
/// Longest problem text rendered in a message (in characters).
const MAX_PROBLEM_CHARS: usize = 1024;

/// A 1-based line and column (columns count Unicode scalar values) in a TOML file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
}

impl Position {
    /// Computes the position of byte `offset` in `text` (clamped to the text, snapped back to a
    /// character boundary).
    pub fn from_offset(text: &str, offset: usize) -> Position {
        let mut offset = offset.min(text.len());
        while offset > 0 && !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = text.get(..offset).unwrap_or("");
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let line = before.bytes().filter(|b| *b == b'\n').count() + 1;
        let column = before.get(line_start..).unwrap_or("").chars().count() + 1;
        Position { line, column }
    }
}

/// An invalid configuration: `config error: WHERE: KEY: PROBLEM`.
///
/// `WHERE` is `PATH:LINE:COLUMN` when the position in the TOML file is known, else `PATH`.
/// Errors about the file as a whole (unreadable, not UTF-8, TOML syntax) have no key; they render
/// as `config error: WHERE: PROBLEM`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// File path label (as given to the loader).
    pub path: String,
    /// Position in the file, when known.
    pub position: Option<Position>,
    /// Full key path (`network.allowed_domains[3]`), absent for file-level errors.
    pub key: Option<String>,
    /// What is wrong.
    pub problem: String,
}

impl ConfigError {
    /// An error about `key` with a known or unknown position.
    pub fn new(
        path: impl Into<String>,
        position: Option<Position>,
        key: impl Into<String>,
        problem: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            path: path.into(),
            position,
            key: Some(key.into()),
            problem: problem.into(),
        }
    }

    /// An error about the file as a whole (read failure, encoding, syntax).
    pub fn file(
        path: impl Into<String>,
        position: Option<Position>,
        problem: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            path: path.into(),
            position,
            key: None,
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "config error: {}",
            sanitize(&self.path, MAX_PROBLEM_CHARS)
        )?;
        if let Some(p) = self.position {
            write!(f, ":{}:{}", p.line, p.column)?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {}", sanitize(key, MAX_KEY_CHARS))?;
        }
        write!(f, ": {}", sanitize(&self.problem, MAX_PROBLEM_CHARS))
    }
}

/// An invalid command-line flag value: `usage error: --FLAG: PROBLEM`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct UsageError {
    /// The flag, with its leading dashes (`--http`).
    pub flag: String,
    /// What is wrong.
    pub problem: String,
}

impl UsageError {
    /// Builds a usage error for `flag` (spelled with its dashes).
    pub fn new(flag: impl Into<String>, problem: impl Into<String>) -> UsageError {
        UsageError {
            flag: flag.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "usage error: {}: {}",
            sanitize(&self.flag, MAX_KEY_CHARS),
            sanitize(&self.problem, MAX_PROBLEM_CHARS)
        )
    }
}

/// Either kind of startup-settings error; both mean exit status 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// A problem in the configuration file (or the embedded defaults).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A problem in a command-line flag value.
    #[error(transparent)]
    Usage(#[from] UsageError),
}

/// Escapes control characters (so a message stays on one line) and cuts over-long text.
pub(crate) fn sanitize(s: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max_chars + 8));
    for (n, c) in s.chars().enumerate() {
        if n >= max_chars {
            out.push('…');
            break;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() || is_bidi_control(c) => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Quotes a value for inclusion in a problem text (`"a..b"`), escaping and shortening it.
pub(crate) fn quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for (n, c) in s.chars().enumerate() {
        if n >= 120 {
            out.push('…');
            break;
        }
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
