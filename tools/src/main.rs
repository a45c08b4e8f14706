//! `shale`: the command-line client and the host daemon (`shale serve`).
//!
//! The CLI is a thin gRPC client: every command becomes one call to the daemon over its Unix socket, and the
//! daemon's one-line error is printed as `error: ...` with exit status 1 (2 for usage errors, from clap).
//! Modules: [`cli`] (grammar), [`commands`] (client commands), [`output`] (tables, JSON), [`serve`] (the daemon),
//! [`paths`] (default state directory and socket).

mod cli;
mod commands;
mod nbd;
mod output;
mod paths;
mod serve;
mod vm_cmd;
mod vms;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command};

fn init_tracing(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Serve(args) => {
            let state_dir = args
                .state_dir
                .clone()
                .unwrap_or_else(paths::default_state_dir);
            let socket = cli
                .socket
                .unwrap_or_else(|| state_dir.join(paths::SOCKET_NAME));
            let nbd = nbd::serve_options(&args, &state_dir);
            serve::run(state_dir, socket, nbd).await?;
            Ok(0)
        }
        Command::Sr(cmd) => {
            let socket = cli.socket.unwrap_or_else(paths::default_socket);
            let mut ctx = commands::Ctx::connect(&socket, cli.json).await?;
            commands::sr(&mut ctx, cmd).await
        }
        Command::Vdi(cmd) => {
            let socket = cli.socket.unwrap_or_else(paths::default_socket);
            let mut ctx = commands::Ctx::connect(&socket, cli.json).await?;
            commands::vdi(&mut ctx, cmd).await
        }
        Command::Nbd(cmd) => {
            let socket = cli.socket.unwrap_or_else(paths::default_socket);
            let mut ctx = commands::Ctx::connect(&socket, cli.json).await?;
            nbd::nbd(&mut ctx, cmd).await
        }
        Command::Vm(cmd) => vm_cmd::run(cli.socket, cli.json, cmd).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve(_));
    init_tracing(if serving { "info" } else { "warn" });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // One line: the outermost context, then its causes.
            let msg = e
                .chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
