//! `portcullis-control serve`: load config, rules and token, bind, serve, print the ready line,
//! shut down on SIGINT/SIGTERM (SIGHUP re-reads the rules).

use std::process::ExitCode;

use crate::cli::ServeArgs;
use crate::server::{self, Failure, Listeners};

/// Runs `serve` to completion.
pub async fn run(args: ServeArgs) -> ExitCode {
    match serve(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("{}", f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), Failure> {
    let server::Loaded { config, services } = server::load(&args.policy).await?;
    let listen = server::listen_addr(args.listen.as_deref(), &config)?;
    let audit = crate::audit::start(&config, &services.state.instance_id)
        .map_err(|message| Failure { code: 2, message })?;
    let token_path = match args.token_file.clone() {
        Some(p) => p,
        None => config.control_token_file().map_err(|e| Failure {
            code: 2,
            message: e.to_string(),
        })?,
    };
    let token = server::load_token(&token_path)?;
    let tcp = server::bind_tcp(listen).await?;
    let bound = tcp.local_addr().unwrap_or(listen);
    let unix_path = args
        .unix_socket
        .clone()
        .or(config.control.unix_socket.clone());
    let unix = match unix_path {
        Some(path) => Some((server::bind_unix(&path).await?, path)),
        None => None,
    };
    let unix_key = unix
        .as_ref()
        .map(|(_, p)| {
            format!(
                ",\"unix\":{}",
                serde_json::Value::from(p.display().to_string())
            )
        })
        .unwrap_or_default();
    let signals = portcullis::signals::Signals::install().map_err(|e| Failure {
        code: 1,
        message: format!("startup error: cannot install signal handlers: {e}"),
    })?;
    let running = server::start(
        &services,
        token,
        Listeners {
            tcp: Some(tcp),
            unix,
        },
    )?;
    running.ready().await;
    println!("{{\"event\":\"ready\",\"component\":\"control\",\"grpc\":\"{bound}\"{unix_key}}}");
    tracing::info!(grpc = %bound, "portcullis-control ready");
    // SIGHUP re-reads the rules file meanwhile.
    signals.wait_for_shutdown(|| services.reload_rules()).await;
    tracing::info!("shutting down");
    running.shutdown(&services).await;
    crate::audit::shutdown(audit).await;
    Ok(())
}
