//! `evgrid load`: drives charge requests into the front of ingest → dispatcher → substation
//! (ingest's HTTP API, or `ev.requests` on NATS directly) and measures what comes back:
//! acceptance latency and throughput, and with `--wait-complete` what happened at the far end
//! (completion, dispatch and charging-start latency, spread over substations, utilization).
//!
//! The run is planned first ([`plan`]: ids, bodies, send times), then driven ([`drive`]) while
//! [`follow`] watches the session events; [`stats`] turns the counts into the report.

pub mod dist;
pub mod drive;
pub mod follow;
pub mod grid;
pub mod plan;
pub mod progress;
pub mod stats;
pub mod target;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use chrono::Utc;
use clap::ArgGroup;
use evgrid_common::config::{
    DEFAULT_NATS_URL, NATS_URL_ENV, NatsAuth, Secret, parse_nats_url, parse_positive,
    parse_positive_duration as parse_duration,
};
use evgrid_common::nats;
use evgrid_model::subjects;
use evgrid_model::validate::{ENERGY_KWH_MAX, MAX_POWER_KW_MAX, MAX_POWER_KW_MIN, MAX_STAY};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::dist::Distribution;
use self::drive::Driver;
use self::follow::{Follower, Tracker};
use self::plan::{Mix, RunIds, Schedule, TracePlan};
use self::progress::Progress;
use self::stats::{ErrorKind, Recorder, Report};
use self::target::Target;

/// Smallest energy a sampled request asks for: the API refuses 0.
pub const MIN_SAMPLE: f64 = 0.1;
/// Smallest and largest sampled stay before departure, in hours (a minute to the API's longest
/// stay, 156 h).
pub const DEPARTURE_HOURS_MIN: f64 = 1.0 / 60.0;
pub const DEPARTURE_HOURS_MAX: f64 = MAX_STAY.num_hours() as f64;
/// Most requests `--wait-complete` follows in one run (its tracker holds a byte per request).
pub const MAX_TRACKED: u64 = 100_000_000;
/// How long to wait for a NATS server to answer at start.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Options of `evgrid load`.
#[derive(clap::Args, Debug, Clone)]
#[command(group(ArgGroup::new("target").required(true).args(["url", "nats_url"])))]
pub struct LoadArgs {
    /// Ingest base URL: requests are POSTed to {url}/v1/charge-requests. Several (comma-separated
    /// or repeated: ingest replicas) are used in turn, a retry going to the next. Exactly one of
    /// --url and --nats-url.
    #[arg(long, value_name = "http://HOST:PORT", value_parser = parse_http_url, value_delimiter = ',',
          help_heading = "Target")]
    pub url: Vec<reqwest::Url>,

    /// API key for --url, sent as `Authorization: Bearer <key>` (`evgrid up` keeps its operator
    /// key in `<data-dir>/api-key`). A command line is visible to every user of the machine:
    /// prefer the variable or --api-key-file.
    #[arg(long, env = "EVGRID_API_KEY", hide_env_values = true,
          value_parser = evgrid_common::config::parse_secret, help_heading = "Target")]
    pub api_key: Option<Secret>,

    /// File whose first line is the API key for --url.
    #[arg(long, env = "EVGRID_API_KEY_FILE", value_name = "FILE",
          conflicts_with = "api_key", value_parser = evgrid_common::config::read_secret_file,
          help_heading = "Target")]
    pub api_key_file: Option<Secret>,

    /// Resend a request that got no answer (no connection, --timeout) or a 5xx, with the same
    /// Idempotency-Key (so it is stored once), backing off from 100 ms to 1 s, for up to this
    /// long after its first send: what a client of replicated ingest does. Off by default: a load
    /// tool reports what the target answered, once.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, help_heading = "Target")]
    pub retry_for: Option<Duration>,

    /// NATS server: requests are published straight to ev.requests (a JetStream publish with
    /// Nats-Msg-Id = request id, awaiting the PubAck, as `nats pub -J` would).
    #[arg(long, value_name = "nats://HOST:PORT", value_parser = parse_nats_url, help_heading = "Target")]
    pub nats_url: Option<String>,

    /// With --nats-url: plain core publish, not awaiting the JetStream ack (as `nats pub`
    /// without -J); "accepted" then means handed to the server, not stored.
    #[arg(long, conflicts_with = "url", help_heading = "Target")]
    pub no_ack: bool,

    /// NATS server on which --wait-complete follows session events and heartbeats when the
    /// target is --url (with --nats-url, that server is used).
    #[arg(long, env = NATS_URL_ENV, default_value = DEFAULT_NATS_URL, value_name = "nats://HOST:PORT",
          value_parser = parse_nats_url, help_heading = "Target")]
    pub events_nats_url: String,

    /// How long one request may wait for its answer (HTTP response or PubAck): 500ms, 10s, 1m.
    #[arg(long, default_value = "10s", value_parser = parse_duration, help_heading = "Target")]
    pub timeout: Duration,

    /// Closed loop: requests in flight at once, each worker sending its next request when the
    /// last is answered.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000),
          conflicts_with_all = ["rate", "trace"], help_heading = "Load shape")]
    pub concurrency: u32,

    /// Requests to send: closed loop (default 100), or the first N sessions of --trace.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=plan::MAX_REQUESTS), conflicts_with = "rate",
          help_heading = "Load shape")]
    pub requests: Option<u64>,

    /// Open loop: requests per second on a fixed schedule that never slows down for the target
    /// (latency counts from each request's due time: no coordinated omission). Needs --duration.
    #[arg(long, value_parser = parse_positive, requires = "duration", conflicts_with = "trace",
          help_heading = "Load shape")]
    pub rate: Option<f64>,

    /// Open loop: how long to send at --rate (500ms, 30s, 5m).
    #[arg(long, value_parser = parse_duration, requires = "rate", help_heading = "Load shape")]
    pub duration: Option<Duration>,

    /// Open loop and --trace: most requests awaiting an answer. A request due while this many
    /// are waiting is dropped and counted as an `overload` error; the schedule never slips.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000),
          help_heading = "Load shape")]
    pub max_in_flight: u32,

    /// Energy per request, kWh: a number, uniform:LOW..HIGH or normal:MEAN,SD (samples clamped
    /// to 0.1..200, the API's limits).
    #[arg(long, default_value = "uniform:10..60", value_parser = parse_energy, help_heading = "Request mix")]
    pub energy_kwh: Distribution,

    /// The car's max charging power, kW: a number, uniform:LOW..HIGH or normal:MEAN,SD (clamped
    /// to 1..400, the API's limits).
    #[arg(long, default_value = "11", value_parser = parse_power, help_heading = "Request mix")]
    pub max_power_kw: Distribution,

    /// Departure, in hours after sending: a number, uniform:LOW..HIGH or normal:MEAN,SD
    /// (clamped to 1 minute..156 hours, the API's longest stay). Without it requests have no
    /// departure.
    #[arg(long, value_parser = parse_departure_hours, help_heading = "Request mix")]
    pub departure_hours: Option<Distribution>,

    /// Seed of the request mix; the report prints the one used, to repeat a run.
    #[arg(long, help_heading = "Request mix")]
    pub seed: Option<u64>,

    /// Replay real sessions from an ACN CSV file (.csv or .csv.gz, e.g.
    /// data/acn-caltech/2019-05_2019-08.csv.gz) instead of the mix; repeat to merge files.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["energy_kwh", "max_power_kw", "departure_hours", "seed"],
          help_heading = "Trace replay")]
    pub trace: Vec<PathBuf>,

    /// Replay speed: request i is sent at (arrival i − first arrival) ÷ SPEED. Each car's stay
    /// (departure − arrival) is its departure after sending, which the pipeline counts on its
    /// simulated clock: run the substations with --time-scale SPEED.
    #[arg(long, default_value_t = 1.0, value_parser = parse_positive, help_heading = "Trace replay")]
    pub speed: f64,

    /// The max charging power of replayed cars, kW (ACN stations are 6.6 kW).
    #[arg(long, default_value_t = 6.6, value_parser = parse_vehicle_kw, help_heading = "Trace replay")]
    pub vehicle_max_kw: f64,

    /// Follow every accepted request to `completed` by its session events and report dispatch
    /// and charging-start latency, spread over substations, peak utilization and herd factor.
    #[arg(long, help_heading = "Completion")]
    pub wait_complete: bool,

    /// With --wait-complete: how long to wait, after the last request is answered, for the
    /// rest to complete; those still open count as `incomplete` errors.
    #[arg(long, default_value = "60s", value_parser = parse_duration, help_heading = "Completion")]
    pub complete_timeout: Duration,

    /// Print one JSON object instead of the summary.
    #[arg(long, help_heading = "Output")]
    pub json: bool,

    /// No progress bar even on a terminal.
    #[arg(long, help_heading = "Output")]
    pub quiet: bool,

    /// Exit non-zero when errors ÷ sent is above this (0: any error fails the run).
    #[arg(long, default_value_t = 0.0, value_parser = parse_ratio, help_heading = "Output")]
    pub max_error_ratio: f64,

    /// Credentials and TLS for every NATS connection this command makes.
    #[command(flatten)]
    pub auth: NatsAuth,
}

/// `evgrid load` from the command line: runs until done or SIGINT/SIGTERM, prints the report,
/// and fails when the error ratio is above `--max-error-ratio`.
pub async fn main(args: LoadArgs) -> anyhow::Result<ExitCode> {
    let (json, max_error_ratio) = (args.json, args.max_error_ratio);
    let report = run(args, evgrid_common::shutdown::on_signals()).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    if report.error_ratio() > max_error_ratio {
        eprintln!(
            "evgrid load: {} of {} requests failed (ratio {:.4}), above --max-error-ratio {max_error_ratio}",
            report.errors.total,
            report.sent,
            report.error_ratio()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs one load as `args` describe, until its end or `shutdown` (then what was sent is
/// finished and reported).
pub async fn run(args: LoadArgs, shutdown: CancellationToken) -> anyhow::Result<Report> {
    let (mix, schedule, trace_skipped) = plan(&args)?;
    run_plan(args, mix, schedule, trace_skipped, shutdown).await
}

/// Runs a load planned elsewhere (`evgrid replay --to-url` plans it from a recorded window):
/// `mix` and `schedule` instead of those `args` describe, everything else as `args` say.
/// `trace_skipped` is reported as the trace's left-out sessions.
pub async fn run_plan(
    args: LoadArgs,
    mix: Mix,
    schedule: Schedule,
    trace_skipped: Option<u64>,
    shutdown: CancellationToken,
) -> anyhow::Result<Report> {
    if args.wait_complete && schedule.requests() > MAX_TRACKED {
        bail!(
            "--wait-complete tracks every request (a byte each): at most {MAX_TRACKED} requests, this run plans {}",
            schedule.requests()
        );
    }
    let seed = match mix {
        Mix::Random { seed, .. } => Some(seed),
        Mix::Trace(_) => None,
    };
    let mode = match schedule {
        Schedule::Closed { .. } => "closed",
        Schedule::Open { .. } => "open",
        Schedule::Trace { .. } => "trace",
    };
    let connections = match schedule {
        Schedule::Closed { concurrency, .. } => concurrency,
        _ => args.max_in_flight as usize,
    };

    let (target, target_name, events) = connect(&args, connections, &shutdown).await?;
    // With an API key, ids carry the key's owner (docs/security.md): made so, they are stored
    // as sent and the session events still map straight back to their requests.
    let ids = match target.owner_tag().await? {
        Some(tag) => RunIds::owned_by(tag, rand::random()),
        None => RunIds::new(rand::random()),
    };
    let recorder = Arc::new(Recorder::default());
    let tracker = args
        .wait_complete
        .then(|| Arc::new(Tracker::new(ids, schedule.requests())));
    let follower = match (&tracker, &events) {
        (Some(tracker), Some(nats)) => Some(Follower::start(nats, tracker.clone()).await?),
        _ => None,
    };

    let driver = Arc::new(Driver {
        target,
        mix,
        ids,
        recorder: recorder.clone(),
        tracker: tracker.clone(),
        timeout: args.timeout,
        retry_for: args.retry_for,
    });
    let progress = Progress::start(
        schedule.requests(),
        !args.quiet,
        recorder.clone(),
        tracker.clone(),
    );
    let run_start = Utc::now();
    let start = Instant::now();
    drive::run(
        driver.clone(),
        &schedule,
        args.max_in_flight as usize,
        &shutdown,
    )
    .await;
    if let Err(e) = driver.target.flush().await {
        recorder.error(e);
    }
    let elapsed = start.elapsed();

    let completion = match (follower, &tracker) {
        (Some(follower), Some(tracker)) => {
            let deadline = Instant::now() + args.complete_timeout;
            tracker
                .wait_settled(recorder.accepted_count(), deadline, &shutdown)
                .await;
            let (completion, rejection) = follower.finish(run_start).await;
            recorder.errors_after(ErrorKind::Rejected, completion.rejected, rejection);
            let why = if shutdown.is_cancelled() {
                "still open when the run was stopped".to_owned()
            } else {
                format!(
                    "not completed within --complete-timeout {:?}",
                    args.complete_timeout
                )
            };
            recorder.errors_after(ErrorKind::Incomplete, completion.incomplete, Some(why));
            Some(completion)
        }
        _ => None,
    };
    progress.finish().await;

    let accepted = recorder.accepted_count();
    Ok(Report {
        mode,
        target: target_name,
        seed,
        planned: schedule.requests(),
        sent: recorder.sent_count(),
        accepted,
        retried: recorder.retried_count(),
        errors: recorder.errors(),
        error_examples: recorder.error_examples(),
        elapsed_s: elapsed.as_secs_f64(),
        throughput_rps: if elapsed.is_zero() {
            0.0
        } else {
            accepted as f64 / elapsed.as_secs_f64()
        },
        latency_ms: recorder.latency(),
        trace_skipped,
        stopped_early: shutdown.is_cancelled(),
        completion,
    })
}

/// The request mix, the schedule, and (for a trace) how many sessions were left out.
fn plan(args: &LoadArgs) -> anyhow::Result<(Mix, Schedule, Option<u64>)> {
    if !args.trace.is_empty() {
        let mut sessions = Vec::new();
        for path in &args.trace {
            sessions.extend(evgrid_sim::trace::read(path)?);
        }
        let plan = TracePlan::new(
            sessions,
            args.speed,
            args.vehicle_max_kw,
            ENERGY_KWH_MAX,
            args.requests,
        );
        if plan.specs.is_empty() {
            bail!("the trace holds no session to replay");
        }
        return Ok((
            Mix::Trace(plan.specs),
            Schedule::Trace {
                offsets: plan.offsets,
            },
            Some(plan.skipped),
        ));
    }
    let mix = Mix::Random {
        energy_kwh: args.energy_kwh,
        max_power_kw: args.max_power_kw,
        departure_hours: args.departure_hours,
        seed: args.seed.unwrap_or_else(rand::random),
    };
    let schedule = match (args.rate, args.duration) {
        (Some(rate), Some(duration)) => Schedule::open(rate, duration),
        _ => Schedule::Closed {
            concurrency: args.concurrency as usize,
            requests: args.requests.unwrap_or(100),
        },
    };
    Ok((mix, schedule, None))
}

/// Connects the target, and the JetStream context `--wait-complete` follows events on.
async fn connect(
    args: &LoadArgs,
    connections: usize,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Target, String, Option<nats::Nats>)> {
    if !args.url.is_empty() {
        let key = args.api_key.as_ref().or(args.api_key_file.as_ref());
        let target = Target::http(&args.url, connections, key.map(Secret::expose))?;
        let events = if args.wait_complete {
            let nats = connect_nats(&args.events_nats_url, &args.auth, shutdown)
                .await
                .context(
                    "--wait-complete follows session events on --events-nats-url (env NATS_URL)",
                )?;
            Some(nats)
        } else {
            None
        };
        let name = args.url.iter().map(|u| u.as_str()).collect::<Vec<_>>();
        return Ok((target, name.join(","), events));
    }
    let url = args.nats_url.as_deref().context("no target")?;
    let nats = connect_nats(url, &args.auth, shutdown).await?;
    nats.js
        .stream_by_subject(subjects::REQUESTS)
        .await
        .with_context(|| {
            format!(
                "no JetStream stream stores {} on {url}: start the pipeline first (its services create the streams)",
                subjects::REQUESTS
            )
        })?;
    let target = if args.no_ack {
        Target::Core(nats.client.clone())
    } else {
        // The context's own bound on outstanding acks must not be what limits the load.
        Target::JetStream(
            jetstream::ContextBuilder::new()
                .timeout(args.timeout)
                .max_ack_inflight(connections.max(1))
                .build(nats.client.clone()),
        )
    };
    let name = format!("{url} ({})", subjects::REQUESTS);
    Ok((target, name, args.wait_complete.then_some(nats)))
}

/// Connects to NATS at `url` as the `evgrid` tools do, giving up after [`CONNECT_TIMEOUT`].
pub(crate) async fn connect_nats(
    url: &str,
    auth: &NatsAuth,
    shutdown: &CancellationToken,
) -> anyhow::Result<nats::Nats> {
    let attempt = shutdown.child_token();
    let connecting = nats::connect(url, auth, "evgrid-load", &attempt);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(result) => Ok(result?),
        Err(_) => {
            attempt.cancel();
            bail!("cannot reach NATS at {url} within {CONNECT_TIMEOUT:?}")
        }
    }
}

pub(crate) fn parse_http_url(s: &str) -> Result<reqwest::Url, String> {
    let mut url = reqwest::Url::parse(s)
        .map_err(|e| format!("expected a URL such as http://127.0.0.1:8080 ({e})"))?;
    if url.scheme() != "http" {
        return Err(format!(
            "only http:// URLs are supported (got {}://); put a TLS-terminating proxy in front for https",
            url.scheme()
        ));
    }
    // The API path is joined below the base, so a base path must end with a slash.
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

fn parse_energy(s: &str) -> Result<Distribution, String> {
    Distribution::parse(s, MIN_SAMPLE, ENERGY_KWH_MAX)
}

fn parse_power(s: &str) -> Result<Distribution, String> {
    Distribution::parse(s, MAX_POWER_KW_MIN, MAX_POWER_KW_MAX)
}

fn parse_departure_hours(s: &str) -> Result<Distribution, String> {
    Distribution::parse(s, DEPARTURE_HOURS_MIN, DEPARTURE_HOURS_MAX)
}

fn parse_vehicle_kw(s: &str) -> Result<f64, String> {
    parse_positive(s).and_then(|x| {
        if x <= MAX_POWER_KW_MAX {
            Ok(x)
        } else {
            Err(format!(
                "{x} kW is above the API's limit of {MAX_POWER_KW_MAX}"
            ))
        }
    })
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
        _ => Err(format!("expected a ratio between 0 and 1, got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        load: LoadArgs,
    }

    fn parse(args: &[&str]) -> Result<LoadArgs, String> {
        Cli::try_parse_from(std::iter::once("load").chain(args.iter().copied()))
            .map(|c| c.load)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2min"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["0s", "-1s", "10", "fast", "", "s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exactly_one_target() {
        assert!(parse(&[]).unwrap_err().contains("--url"));
        let both = parse(&["--url", "http://a:1", "--nats-url", "nats://b:2"]).unwrap_err();
        assert!(both.contains("cannot be used with"), "{both}");
        assert!(
            parse(&["--url", "https://a:1"])
                .unwrap_err()
                .contains("only http://")
        );
        let a = parse(&["--url", "http://a:1/base"]).unwrap();
        assert_eq!(a.url[0].as_str(), "http://a:1/base/");
        let replicas = parse(&["--url", "http://a:1,http://b:2", "--url", "http://c:3"]).unwrap();
        assert_eq!(replicas.url.len(), 3);
        assert!(parse(&["--url", "http://a:1,ftp://b"]).is_err());
        assert!(parse(&["--url", "http://a:1", "--no-ack"]).is_err());
    }

    #[test]
    fn the_default_is_the_original_test() {
        let a = parse(&["--url", "http://a:1"]).unwrap();
        let (_, schedule, _) = plan(&a).unwrap();
        assert_eq!(
            schedule,
            Schedule::Closed {
                concurrency: 100,
                requests: 100
            }
        );
    }

    #[test]
    fn load_shapes_do_not_mix() {
        let url = ["--url", "http://a:1"];
        let with = |extra: &[&str]| parse(&[&url[..], extra].concat());
        assert!(with(&["--rate", "10"]).is_err(), "rate needs duration");
        assert!(with(&["--duration", "1s"]).is_err(), "duration needs rate");
        assert!(with(&["--rate", "10", "--duration", "1s", "--concurrency", "5"]).is_err());
        assert!(with(&["--rate", "10", "--duration", "1s", "--requests", "5"]).is_err());
        assert!(with(&["--trace", "x.csv", "--rate", "1", "--duration", "1s"]).is_err());
        assert!(with(&["--trace", "x.csv", "--energy-kwh", "5"]).is_err());
        assert!(with(&["--energy-kwh", "500"]).is_err());
        assert!(with(&["--max-error-ratio", "2"]).is_err());
        let open = with(&["--rate", "10", "--duration", "2s"]).unwrap();
        assert_eq!(
            plan(&open).unwrap().1,
            Schedule::Open {
                rate: 10.0,
                requests: 20
            }
        );
    }
}
