//! `evgrid`: the command line around the pipeline. `evgrid up` runs the whole grid locally;
//! `evgrid load` drives charge requests at an ingest API or straight at NATS and measures what
//! comes back; `evgrid sim` runs the routing and charging model in simulated time
//! (`evgrid-sim`); `evgrid replay` runs what a live grid recorded through it; `evgrid stations`
//! plays OCPP charging stations against a substation's CSMS endpoint.

use clap::{Parser, Subcommand};
use evgrid_common::config::LogArgs;

#[derive(Parser, Debug)]
#[command(
    name = "evgrid",
    version,
    about = "Route EV charging across a power grid: tools around the evgrid pipeline"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole grid locally: NATS, ingest, dispatcher, substations (and Prometheus if installed).
    Up(Box<evgrid::up::UpArgs>),
    /// Drive charge requests at a deployment (HTTP or NATS) and report throughput and latency.
    Load(Box<evgrid::load::LoadArgs>),
    /// Simulate routing and power allocation policies on real or synthetic workloads.
    Sim(Box<evgrid_sim::SimArgs>),
    /// Replay what a live grid recorded through the simulator, beside what it actually did.
    Replay(Box<evgrid::replay::ReplayArgs>),
    /// Write NATS users for evgrid's roles (passwords, and the nats-server authorization block)
    /// for a NATS you run yourself.
    NatsUsers(evgrid::nats_users::NatsUsersArgs),
    /// Make an API key for ingest's HTTP API and add its hash to a keys file.
    ApiKey(evgrid::api_key::ApiKeyArgs),
    /// Make the secrets of a secured grid once (NATS users, API keys) and keep them.
    Secrets(evgrid::secrets::SecretsArgs),
    /// Simulate OCPP 2.0.1 charging stations that connect to a substation and charge cars,
    /// until SIGTERM or Ctrl-C.
    Stations(Box<evgrid::stations::StationsArgs>),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli: Cli = evgrid_common::config::parse_or_exit();
    // `up` sets up its logs itself: to a file in its data directory, once that exists.
    if !matches!(cli.command, Command::Up(_)) {
        evgrid_common::telemetry::init(cli.log.log_format);
    }
    let result = match cli.command {
        Command::Up(args) => evgrid::up::main(*args, cli.log.log_format)
            .await
            .map(|()| std::process::ExitCode::SUCCESS),
        Command::Load(args) => evgrid::load::main(*args).await,
        Command::Sim(args) => evgrid_sim::main(*args),
        Command::Replay(args) => evgrid::replay::main(*args).await,
        Command::NatsUsers(args) => {
            evgrid::nats_users::main(args).map(|()| std::process::ExitCode::SUCCESS)
        }
        Command::ApiKey(args) => {
            evgrid::api_key::main(args).map(|()| std::process::ExitCode::SUCCESS)
        }
        Command::Secrets(args) => {
            evgrid::secrets::main(args).map(|()| std::process::ExitCode::SUCCESS)
        }
        Command::Stations(args) => evgrid::stations::main(*args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("evgrid: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
