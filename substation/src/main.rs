//! The `evgrid-substation` binary: parses options, installs logging, binds the ops endpoint and
//! runs [`evgrid_substation::run`] until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use evgrid_common::config::{LISTEN_ENV, LogArgs, parse_listen};

/// evgrid substation: charges the electric vehicles dispatched to it, in simulated time, never
/// above its capacity.
#[derive(Parser, Debug)]
#[command(name = "evgrid-substation", version, about)]
struct Cli {
    #[command(flatten)]
    config: evgrid_substation::Config,

    /// Address of the HTTP endpoint (/metrics, /healthz, /readyz).
    #[arg(long, env = LISTEN_ENV, default_value = "127.0.0.1:9102", value_parser = parse_listen)]
    listen: SocketAddr,

    #[command(flatten)]
    log: LogArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    // Bad config: one line and status 2, before anything is bound.
    let cli: Cli =
        evgrid_common::config::parse_or_exit_renamed(evgrid_substation::config::RENAMED_ENV);
    evgrid_common::service::main(
        "evgrid-substation",
        cli.listen,
        &cli.log,
        |listener, shutdown| evgrid_substation::run(cli.config, listener, shutdown),
    )
    .await
}
