//! Persisted `network_rule(...)` lines (`network-rules.md`): parsing, host rules, compilation
//! loading, and writing (append/remove under a lock, atomic replace: [`store`]).

pub mod compile;
pub mod host;
pub mod parse;
pub mod store;

pub use compile::{Compiled, compile};
pub use parse::{Rule, parse_file};

/// Loads the rules file at `serve` start: missing → empty; unreadable → `Err((1, message))`;
/// a parse error → `Err((2, PATH:LINE:COLUMN: MESSAGE))`. Temp files left by a crashed writer
/// more than an hour ago are deleted first (they never affect the rules).
pub fn load(path: &std::path::Path) -> Result<Vec<Rule>, (u8, String)> {
    store::remove_stale_temps(path);
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err((1, format!("cannot read rules file {}: {e}", path.display()))),
    };
    parse_file(&bytes).map_err(|e| (2, e.render(&path.display().to_string())))
}
