//! `evgrid-ingest`: parses the options, installs logging, binds the HTTP listener and runs the
//! service (`evgrid_ingest::run`) until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use evgrid_common::config::{LISTEN_ENV, LogArgs, parse_listen};

#[derive(Parser, Debug)]
#[command(
    name = "evgrid-ingest",
    version,
    about = "evgrid's HTTP API: accepts EV charge requests into NATS JetStream."
)]
struct Cli {
    /// Address of the HTTP API and the ops endpoints (/metrics, /healthz, /readyz).
    #[arg(long, env = LISTEN_ENV, default_value = "127.0.0.1:8080", value_parser = parse_listen)]
    listen: SocketAddr,

    #[command(flatten)]
    config: evgrid_ingest::Config,

    #[command(flatten)]
    log: LogArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    // Bad config: one line and status 2, before anything is bound.
    let cli: Cli = evgrid_common::config::parse_or_exit_renamed(evgrid_ingest::RENAMED_ENV);
    if let Err(e) = cli.config.check() {
        eprintln!("evgrid-ingest: {e}");
        return ExitCode::from(2);
    }
    evgrid_common::service::main(
        "evgrid-ingest",
        cli.listen,
        &cli.log,
        |listener, shutdown| evgrid_ingest::run(cli.config, listener, shutdown),
    )
    .await
}
