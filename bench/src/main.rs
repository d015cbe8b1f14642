//! `evgrid-bench`: runs one benchmark (or all) and prints its Markdown report on stdout, progress
//! on stderr; or, as a child of a benchmark, runs one of the references.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use evgrid_bench::{chaos, dispatch, e2e, forwarder, ingest, minimal, ocpp, replicas};
use evgrid_common::config::LogArgs;

#[derive(Parser, Debug)]
#[command(
    name = "evgrid-bench",
    version,
    about = "evgrid's benchmarks: each against a reference measured in the same run, alternating, with ratios. Build with `cargo build --release` first."
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    #[command(flatten)]
    Benchmark(Benchmark),
    /// (Reference, run by the benchmarks) the minimal ingest handler.
    #[command(hide = true)]
    MinimalIngest(minimal::Config),
    /// (Reference, run by the benchmarks) the minimal consume → publish → ack forwarder.
    #[command(hide = true)]
    Forwarder(forwarder::Config),
}

#[derive(Subcommand, Debug)]
enum Benchmark {
    /// 1. evgrid-ingest vs a minimal warp handler (plain, and with msg id + headers) and raw JetStream.
    Ingest(ingest::Args),
    /// 2. evgrid-dispatcher draining stored requests vs a consume → publish → ack forwarder.
    Dispatcher(dispatch::Args),
    /// 3. End to end: the original 100-concurrent test and an open loop at half the maximum.
    E2e(e2e::E2eArgs),
    /// 4. Peak RSS of each service, idle and under load.
    Memory(e2e::MemoryArgs),
    /// 5. The original design's 100-concurrent test with a 1 s charging hold.
    Original(e2e::OriginalArgs),
    /// 7. A burst of cars through 1, 2 and 3 dispatcher replicas: herd factor and throughput.
    Replicas(replicas::Args),
    /// Benchmark 8: one substation as the CSMS of 1,000 OCPP stations (a full reallocation
    /// reaching every station, peak RSS, CPU per meter reading).
    Ocpp(ocpp::Args),
    /// Every benchmark, with its defaults, one after the other.
    All,
    /// The fault-tolerance suite: faults under load, every accepted request accounted for
    /// (docs/reliability.md). Exits non-zero when a request was lost or doubled, or a
    /// substation went above its capacity.
    Chaos(Box<chaos::ChaosArgs>),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = evgrid_common::config::parse_or_exit();
    // A benchmark's own NATS connections would only add noise to its report: it logs when
    // asked (RUST_LOG); the references log as services do.
    let is_reference = !matches!(cli.command, Command::Benchmark(_));
    if is_reference || std::env::var_os("RUST_LOG").is_some() {
        evgrid_common::telemetry::init(cli.log.log_format);
    }
    let shutdown = evgrid_common::shutdown::on_signals();
    let result = match cli.command {
        // The references stop on the signal themselves, finishing their in-flight work.
        Command::MinimalIngest(config) => minimal::run(config, shutdown).await,
        Command::Forwarder(config) => forwarder::run(config, shutdown).await,
        Command::Benchmark(benchmark) => tokio::select! {
            // A benchmark stopped by a signal is dropped, which kills every process it started.
            result = run(benchmark) => result,
            _ = shutdown.cancelled() => Err(anyhow::anyhow!("stopped by a signal")),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("evgrid-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `benchmark` and prints its report; keeps the processes' logs when it fails.
async fn run(benchmark: Benchmark) -> anyhow::Result<()> {
    let logs = tempfile::Builder::new()
        .prefix("evgrid-bench-")
        .tempdir()
        .context("no temporary directory")?;
    let path = logs.path();
    let report = match benchmark {
        Benchmark::Ingest(args) => ingest::run(&args, path).await,
        Benchmark::Dispatcher(args) => dispatch::run(&args, path).await,
        Benchmark::E2e(args) => e2e::e2e(&args, path).await,
        Benchmark::Memory(args) => e2e::memory(&args, path).await,
        Benchmark::Original(args) => e2e::original(&args, path).await,
        Benchmark::Replicas(args) => replicas::run(&args, path).await,
        Benchmark::Ocpp(args) => ocpp::run(&args, path).await,
        Benchmark::All => all(path).await,
        Benchmark::Chaos(args) => chaos::main(&args, path).await,
    };
    match report {
        Ok(report) => {
            println!("{report}");
            Ok(())
        }
        Err(e) => {
            let kept = logs.keep();
            Err(e.context(format!("process logs in {}", kept.display())))
        }
    }
}

async fn all(logs: &std::path::Path) -> anyhow::Result<String> {
    fn defaults<A: clap::Args>() -> A {
        #[derive(Parser)]
        struct Wrap<A: clap::Args> {
            #[command(flatten)]
            a: A,
        }
        Wrap::<A>::parse_from(["all"]).a
    }
    let mut out = ingest::run(&defaults(), logs).await?;
    out += &dispatch::run(&defaults(), logs).await?;
    out += &e2e::e2e(&defaults(), logs).await?;
    out += &e2e::memory(&defaults(), logs).await?;
    out += &e2e::original(&defaults(), logs).await?;
    out += &replicas::run(&defaults(), logs).await?;
    out += &ocpp::run(&defaults(), logs).await?;
    Ok(out)
}
