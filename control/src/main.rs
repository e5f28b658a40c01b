//! `portcullis-control`: the Portcullis control plane.

mod cli;

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
    let name = match cli.command {
        cli::Command::Serve(_) => "serve",
        cli::Command::Exec(_) => "exec",
        cli::Command::Pending(_) => "pending",
        cli::Command::Approve(_) => "approve",
        cli::Command::Deny(_) => "deny",
        cli::Command::Policy(_) => "policy",
        cli::Command::SocksConnect(_) => "socks-connect",
    };
    eprintln!("portcullis-control: {name} is not implemented yet");
    ExitCode::from(1)
}
