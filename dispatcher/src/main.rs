//! The `evgrid-dispatcher` binary: parses options, installs logging, binds the ops endpoint,
//! wires SIGTERM/SIGINT and runs [`evgrid_dispatcher::run`].

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use evgrid_common::config::{LISTEN_ENV, LogArgs, parse_listen, parse_or_exit_renamed};
use evgrid_dispatcher::Config;

/// Routes EV charge requests from ev.requests to substations by a routing policy (--policy).
#[derive(Parser, Debug)]
#[command(name = "evgrid-dispatcher", version)]
struct Cli {
    #[command(flatten)]
    config: Config,

    /// Address of the HTTP endpoint serving /metrics, /healthz and /readyz.
    #[arg(long, env = LISTEN_ENV, default_value = "127.0.0.1:9101", value_parser = parse_listen)]
    listen: SocketAddr,

    #[command(flatten)]
    log: LogArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    // Bad config: one line and status 2, before anything is bound.
    let cli: Cli = parse_or_exit_renamed(evgrid_dispatcher::config::RENAMED_ENV);
    evgrid_common::service::main(
        "evgrid-dispatcher",
        cli.listen,
        &cli.log,
        |listener, shutdown| evgrid_dispatcher::run(cli.config, listener, shutdown),
    )
    .await
}
