//! The body every service binary shares (`evgrid-ingest`, `evgrid-dispatcher`,
//! `evgrid-substation`), once clap has parsed its options: install logging, bind the listener,
//! run the service until SIGTERM/SIGINT, and turn an error into one line and a failing exit.

use std::net::SocketAddr;
use std::process::ExitCode;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::LogArgs;
use crate::{http, shutdown, telemetry};

/// Runs a service binary named `name`: `run` gets the bound `listen` address and the token
/// cancelled by SIGTERM/SIGINT.
pub async fn main<Fut>(
    name: &str,
    listen: SocketAddr,
    log: &LogArgs,
    run: impl FnOnce(TcpListener, CancellationToken) -> Fut,
) -> ExitCode
where
    Fut: Future<Output = anyhow::Result<()>>,
{
    telemetry::init(log.log_format);
    let served = async {
        let listener = http::bind(listen).await?;
        run(listener, shutdown::on_signals()).await
    };
    match served.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
