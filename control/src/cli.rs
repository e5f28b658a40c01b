//! Command line of `portcullis-control` (README "Binaries and CLI contract", control.md §10–11).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Portcullis control plane: approvals, persisted rules, requirements, live policy push.
#[derive(Debug, Parser)]
#[command(name = "portcullis-control", version, about)]
pub struct Cli {
    /// Log filter (`info`, `debug`, …).
    #[arg(
        long,
        global = true,
        value_name = "FILTER",
        env = "PORTCULLIS_LOG",
        default_value = "info"
    )]
    pub log: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the gRPC API for hosts and data planes.
    Serve(ServeArgs),
    /// Run COMMAND behind a private control plane and proxy sidecar (the main job).
    Exec(ExecArgs),
    /// List (or watch) pending asks.
    Pending(PendingArgs),
    /// Approve a pending ask.
    Approve(ApproveArgs),
    /// Deny a pending ask.
    Deny(DenyArgs),
    /// Show the effective policy with provenance.
    Policy(PolicyArgs),
    /// Relay stdio to HOST:PORT through a SOCKS5 proxy (used by GIT_SSH_COMMAND).
    SocksConnect(SocksConnectArgs),
}

/// Flags shared by `serve` and `exec` for loading policy.
#[derive(Debug, Args)]
pub struct PolicySourceArgs {
    /// TOML configuration file (without it, the embedded defaults).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// The network_rule file.
    #[arg(long, value_name = "PATH")]
    pub rules: Option<PathBuf>,
    /// Enterprise requirements backend (HTTPS).
    #[arg(long, value_name = "URL")]
    pub requirements_url: Option<String>,
    /// Start even when requirements cannot be fetched.
    #[arg(long)]
    pub requirements_optional: bool,
    /// Seconds an ask waits for an answer (1–3600).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ask_timeout: Option<u64>,
}

/// `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub policy: PolicySourceArgs,
    /// gRPC listen address (`127.0.0.1:0` = any free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Also serve on this unix socket.
    #[arg(long, value_name = "PATH")]
    pub unix_socket: Option<PathBuf>,
    /// Bearer token file (created 0600 if missing).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
}

/// `exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub policy: PolicySourceArgs,
    /// Session id (default `exec-` + 12 hex).
    #[arg(long, value_name = "ID")]
    pub session_id: Option<String>,
    /// Never prompt on the terminal; asks wait for an API answer or time out.
    #[arg(long)]
    pub no_prompt: bool,
    /// Also serve the API on TCP with the token.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Write the private endpoint URL here.
    #[arg(long, value_name = "PATH")]
    pub control_endpoint_file: Option<PathBuf>,
    /// The data-plane binary (default: next to this executable, else on PATH).
    #[arg(long, value_name = "PATH", env = "PORTCULLIS_PROXY_BIN")]
    pub proxy_bin: Option<PathBuf>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Connection flags of the CLI clients.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Control plane endpoint (`http://HOST:PORT` or `unix:/abs/path`).
    #[arg(
        long,
        value_name = "URL",
        env = "PORTCULLIS_CONTROL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub endpoint: String,
    /// Token file (else `PORTCULLIS_TOKEN`, else `control.token_file`).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Config file (read for `state_dir` and `control.token_file` only).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// RPC timeout in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,
    /// One JSON object per output record.
    #[arg(long)]
    pub json: bool,
}

/// `pending`.
#[derive(Debug, Args)]
pub struct PendingArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Keep watching for new, resolved and expired asks.
    #[arg(long)]
    pub watch: bool,
}

/// Scope of an approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scope {
    /// This request (and the ones waiting with it) only.
    Once,
    /// Every request of this session.
    Session,
    /// Persist a rule.
    Always,
}

/// `approve`.
#[derive(Debug, Args)]
pub struct ApproveArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The ask id (`ask_` + 16 hex).
    pub id: String,
    /// How long the approval lasts.
    #[arg(long = "for", value_enum, default_value = "once")]
    pub scope: Scope,
    /// Why (written into an `always` rule).
    #[arg(long, value_name = "TEXT")]
    pub justification: Option<String>,
}

/// `deny`.
#[derive(Debug, Args)]
pub struct DenyArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The ask id.
    pub id: String,
    /// Persist a host-level deny rule.
    #[arg(long)]
    pub always: bool,
    /// Why.
    #[arg(long, value_name = "TEXT")]
    pub justification: Option<String>,
}

/// `policy`.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `socks-connect`.
#[derive(Debug, Args)]
pub struct SocksConnectArgs {
    /// The SOCKS5 listener (`127.0.0.1:8081`).
    pub socks_addr: String,
    /// Destination host.
    pub host: String,
    /// Destination port.
    #[arg(value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_the_contract() {
        let c = Cli::try_parse_from(["pc", "exec", "--", "curl", "-sS", "https://x"]).unwrap();
        let Command::Exec(e) = c.command else {
            panic!("exec")
        };
        assert_eq!(e.command, ["curl", "-sS", "https://x"]);
        let c = Cli::try_parse_from(["pc", "approve", "ask_0123456789abcdef", "--for", "session"])
            .unwrap();
        let Command::Approve(a) = c.command else {
            panic!("approve")
        };
        assert_eq!(a.scope, Scope::Session);
        assert!(
            Cli::try_parse_from([
                "pc",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--token-file",
                "/t"
            ])
            .is_ok()
        );
        assert!(Cli::try_parse_from(["pc", "socks-connect", "127.0.0.1:8081", "h", "22"]).is_ok());
    }

    #[test]
    fn usage_errors() {
        for bad in [
            &["pc"][..],
            &["pc", "exec"],
            &["pc", "approve"],
            &["pc", "approve", "x", "--for", "forever"],
            &["pc", "socks-connect", "a", "b", "0"],
            &["pc", "serve", "--bogus"],
            &["pc", "serve", "--ask-timeout", "0"],
        ] {
            let e = Cli::try_parse_from(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }
}
