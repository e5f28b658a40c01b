//! Command-line flags of `portcullis-proxy` (README "Binaries and CLI contract").

use std::path::PathBuf;

use clap::Parser;

/// Portcullis data plane: a local HTTP and SOCKS5 proxy that enforces an egress policy.
#[derive(Debug, Parser)]
#[command(name = "portcullis-proxy", version, about)]
pub struct Args {
    /// TOML configuration file (without it, the embedded defaults).
    #[arg(long, value_name = "PATH", env = "PORTCULLIS_CONFIG")]
    pub config: Option<PathBuf>,
    /// HTTP proxy listener address (`127.0.0.1:0` = any free port).
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
    /// SOCKS5 listener address (enables SOCKS5).
    #[arg(long, value_name = "ADDR")]
    pub socks5: Option<String>,
    /// Admin API listener address (always loopback).
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    /// Control plane endpoint (`http://HOST:PORT` or `unix:/abs/path`).
    #[arg(long, value_name = "URL")]
    pub control: Option<String>,
    /// Bearer token file for the control plane.
    #[arg(long, value_name = "PATH")]
    pub control_token_file: Option<PathBuf>,
    /// Seconds to wait for the first policy snapshot.
    #[arg(long, value_name = "SECS")]
    pub control_timeout: Option<u64>,
    /// Session id reported to the control plane.
    #[arg(long, value_name = "ID")]
    pub session_id: Option<String>,
    /// Where the MITM CA certificate files are written.
    #[arg(long, value_name = "DIR")]
    pub mitm_dir: Option<PathBuf>,
    /// Add a pattern to the allowlist (repeatable).
    #[arg(long = "allow", value_name = "PATTERN")]
    pub allow: Vec<String>,
    /// Add a pattern to the denylist (repeatable).
    #[arg(long = "deny", value_name = "PATTERN")]
    pub deny: Vec<String>,
    /// `full` or `limited` (read-only methods).
    #[arg(long, value_name = "MODE", value_parser = ["full", "limited"])]
    pub mode: Option<String>,
    /// Runtime worker threads, 1–1024 (default: available CPUs).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    /// Log filter (`info`, `debug`, `portcullis=trace`, …).
    #[arg(
        long,
        value_name = "FILTER",
        env = "PORTCULLIS_LOG",
        default_value = "info"
    )]
    pub log: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn bad_values_are_usage_errors() {
        assert!(Args::try_parse_from(["p", "--mode", "open"]).is_err());
        assert!(Args::try_parse_from(["p", "--worker-threads", "0"]).is_err());
        assert!(Args::try_parse_from(["p", "--bogus"]).is_err());
        let a = Args::try_parse_from(["p", "--allow", "a.com", "--allow", "b.com"]).unwrap();
        assert_eq!(a.allow, ["a.com", "b.com"]);
    }
}
