//! `portcullis-control`: the Portcullis control plane.

mod approvals;
mod audit;
mod cli;
mod client;
mod rules;
mod serve;
mod service;
mod state;
mod token;

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
    // stderr per --log, plus the audit slot `serve` fills (audit.md §1).
    let _ = portcullis::telemetry::init_logging(&cli.log);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let name = match cli.command {
        cli::Command::Serve(args) => return rt.block_on(serve::run(args)),
        cli::Command::Pending(args) => return rt.block_on(client::pending(args)),
        cli::Command::Approve(args) => return rt.block_on(client::approve(args)),
        cli::Command::Deny(args) => return rt.block_on(client::deny(args)),
        cli::Command::Policy(args) => return rt.block_on(client::policy(args)),
        cli::Command::Exec(_) => "exec",
        cli::Command::SocksConnect(_) => "socks-connect",
    };
    eprintln!("portcullis-control: {name} is not implemented yet");
    ExitCode::from(1)
}
