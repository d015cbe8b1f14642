//! `evgrid-ingest`: parses the options, installs logging, binds the HTTP listener and runs the
//! service (`evgrid_ingest::run`) until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use evgrid_common::config::{LogArgs, parse_listen};

#[derive(Parser, Debug)]
#[command(
    name = "evgrid-ingest",
    version,
    about = "evgrid's HTTP API: accepts EV charge requests into NATS JetStream."
)]
struct Cli {
    /// Address of the HTTP API and the ops endpoints (/metrics, /healthz, /readyz).
    #[arg(long, env = "EVGRID_LISTEN", default_value = "127.0.0.1:8080", value_parser = parse_listen)]
    listen: SocketAddr,

    #[command(flatten)]
    config: evgrid_ingest::Config,

    #[command(flatten)]
    log: LogArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = evgrid_common::config::parse_or_exit();
    evgrid_common::telemetry::init(cli.log.log_format);
    match serve(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("evgrid-ingest: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    let listener = evgrid_common::http::bind(cli.listen).await?;
    let shutdown = evgrid_common::shutdown::on_signals();
    evgrid_ingest::run(cli.config, listener, shutdown).await
}
