//! The `evgrid-dispatcher` binary: parses options, installs logging, binds the ops endpoint,
//! wires SIGTERM/SIGINT and runs [`evgrid_dispatcher::run`].

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use evgrid_common::config::{LogArgs, parse_listen, parse_or_exit};
use evgrid_common::{http, shutdown, telemetry};
use evgrid_dispatcher::Config;

/// Routes EV charge requests from ev.requests to substations by a routing policy (--policy).
#[derive(Parser, Debug)]
#[command(name = "evgrid-dispatcher", version)]
struct Cli {
    #[command(flatten)]
    config: Config,

    /// Address of the HTTP endpoint serving /metrics, /healthz and /readyz.
    #[arg(long, env = "EVGRID_LISTEN", default_value = "127.0.0.1:9101", value_parser = parse_listen)]
    listen: SocketAddr,

    #[command(flatten)]
    log: LogArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = parse_or_exit();
    telemetry::init(cli.log.log_format);
    match start(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("evgrid-dispatcher: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn start(cli: Cli) -> anyhow::Result<()> {
    let listener = http::bind(cli.listen).await?;
    evgrid_dispatcher::run(cli.config, listener, shutdown::on_signals()).await
}
