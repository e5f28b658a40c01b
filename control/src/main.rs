//! `portcullis-control`: the Portcullis control plane.

mod approvals;
mod audit;
mod cli;
mod client;
mod exec;
mod reevaluate;
mod requirements;
use portcullis_control::rules;
mod serve;
mod server;
mod service;
mod socks_connect;
mod state;
mod token;
mod unix_listener;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // 0 for --help/--version, 2 for usage errors.
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    // exec speaks through `portcullis: ` lines on the user's terminal: unless asked for more,
    // its own logs are warnings only and the sidecar's errors only (its blocked-log lines
    // would garble prompts; the exit summary reports blocks instead).
    let default_log = cli.log == "info" && std::env::var_os("PORTCULLIS_LOG").is_none();
    let (log, sidecar_log) = match &cli.command {
        cli::Command::Exec(_) if default_log => ("warn".to_string(), "error".to_string()),
        _ => (cli.log.clone(), cli.log.clone()),
    };
    // stderr per --log, plus the audit slot `serve` fills (audit.md §1).
    let _ = portcullis::telemetry::init_logging(&log);
    // The requirements client uses rustls with the ring provider (requirements.md §2).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        cli::Command::Serve(args) => rt.block_on(serve::run(args)),
        cli::Command::Pending(args) => rt.block_on(client::pending(args)),
        cli::Command::Approve(args) => rt.block_on(client::approve(args)),
        cli::Command::Deny(args) => rt.block_on(client::deny(args)),
        cli::Command::Policy(args) => rt.block_on(client::policy(args)),
        cli::Command::Exec(args) => rt.block_on(exec::run(args, &sidecar_log)),
        cli::Command::SocksConnect(args) => rt.block_on(socks_connect::run(args)),
    }
}
