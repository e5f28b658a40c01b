//! `portcullis-control`: the Portcullis control plane.

mod approvals;
mod cli;
mod client;
mod requirements;
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
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // The requirements client uses rustls with the ring provider (requirements.md §2).
    let _ = rustls::crypto::ring::default_provider().install_default();
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
