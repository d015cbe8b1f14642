//! Benchmark 1, the front of ingest → dispatcher → substation: evgrid-ingest against the minimal
//! handler (plain, and with the contract's message id and headers) and against raw pipelined
//! JetStream publishing, under the same `evgrid load` closed loop at each connection count.
//! Every measurement gets a fresh nats-server and a fresh process, and the variants alternate.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use evgrid_ingest::auth::{Rate, Scope, Scopes};

use crate::measure::{self, Sample, Series};
use crate::procs::{self, CpuMeter, Nats, Proc};
use crate::{load, setup};

/// Options of `evgrid-bench ingest`.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// HTTP connections (closed-loop concurrency) to measure at.
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    pub connections: Vec<u32>,
    /// Rounds; each measures every variant once, in turn.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Requests per measurement.
    #[arg(long, default_value_t = 60_000)]
    pub requests: u64,
    /// Requests sent before each measurement (connections, allocator and page cache warm).
    #[arg(long, default_value_t = 5_000)]
    pub warmup: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Ingest,
    Minimal {
        headers: bool,
    },
    RawJetStream,
    /// evgrid-ingest with an API key on every request (its hash looked up, its rate checked).
    IngestWithKey,
}

impl Variant {
    const ALL: [Variant; 5] = [
        Variant::Ingest,
        Variant::Minimal { headers: false },
        Variant::Minimal { headers: true },
        Variant::RawJetStream,
        Variant::IngestWithKey,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::Ingest => "evgrid-ingest",
            Variant::Minimal { headers: false } => "minimal handler",
            Variant::Minimal { headers: true } => "minimal handler + msg id + headers",
            Variant::RawJetStream => "raw JetStream publish (msg id), no HTTP",
            Variant::IngestWithKey => "evgrid-ingest, with an API key",
        }
    }
}

/// Runs the benchmark and returns its Markdown report.
pub async fn run(args: &Args, logs: &Path) -> Result<String> {
    let mut out = String::from("\n### 1. Ingest\n");
    for &connections in &args.connections {
        let mut series: Vec<Series> = Variant::ALL.iter().map(|v| Series::new(v.name())).collect();
        for round in 1..=args.rounds {
            for (i, variant) in Variant::ALL.iter().enumerate() {
                let sample = measure(*variant, connections, args, logs).await?;
                eprintln!(
                    "ingest c={connections} round {round}: {:<40} {:>8.0} req/s  p99 {:.2} ms",
                    variant.name(),
                    sample.rate,
                    sample.p99_ms
                );
                series[i].samples.push(sample);
            }
        }
        let label = if connections == 1 { "" } else { "s" };
        out += &measure::table(
            &format!("{connections} connection{label}"),
            "req/s",
            true,
            &series,
        );
        out.push('\n');
        out += &measure::ratio_line(&series[0], &series[1], 0.9, Some(2.0));
        out += &measure::ratio_line(&series[0], &series[2], 0.9, Some(2.0));
        let (raw, _, _) = measure::ratio(&series[0], &series[3], |x| x.rate);
        out += &format!(
            "- {} / {}: throughput {raw:.2}× (the JetStream ceiling at this many in flight)\n",
            series[0].name, series[3].name
        );
        let (keyed, _, _) = measure::ratio(&series[4], &series[0], |x| x.rate);
        out += &format!(
            "- {} / {}: throughput {keyed:.2}× (what checking keys costs)\n",
            series[4].name, series[0].name
        );
    }
    Ok(out)
}

async fn measure(variant: Variant, connections: u32, args: &Args, logs: &Path) -> Result<Sample> {
    let nats = Nats::start()?;
    let url = nats.url().to_owned();
    let keys = tempfile::tempdir()?;
    let mut key_words = Vec::new();
    let service = match variant {
        Variant::Ingest | Variant::IngestWithKey => {
            let mut words = vec!["--nats-url".into(), url.clone()];
            if variant == Variant::Ingest {
                words.push("--insecure-no-auth".into());
            } else {
                let file = keys.path().join("api-keys");
                // No rate limit: the load is the benchmark's, not an abuser's.
                let key = evgrid::api_key::add(
                    &file,
                    "bench",
                    Scopes::of(&[Scope::Submit]),
                    Rate::Unlimited,
                )?;
                words.extend(["--api-keys".into(), file.display().to_string()]);
                key_words = vec!["--api-key".to_owned(), key];
            }
            Some(Proc::service("ingest", "evgrid-ingest", words, logs).await?)
        }
        Variant::Minimal { headers } => {
            let mut words = vec!["minimal-ingest".into(), "--nats-url".into(), url.clone()];
            if headers {
                words.push("--headers".into());
            }
            Some(
                Proc::spawn_http("minimal", &std::env::current_exe()?, words, "/readyz", logs)
                    .await?,
            )
        }
        Variant::RawJetStream => {
            setup::ensure_streams(&url).await?;
            None
        }
    };
    let target = match &service {
        Some(p) => vec![
            "--url".into(),
            format!("http://{}", p.http.expect("serves HTTP")),
        ],
        None => vec!["--nats-url".into(), url.clone()],
    };
    let shape = |requests: u64| {
        let mut a = target.clone();
        a.extend(key_words.iter().cloned());
        a.extend([
            "--concurrency".into(),
            connections.to_string(),
            "--requests".into(),
            requests.to_string(),
        ]);
        a
    };
    let limit = Duration::from_secs(300);
    load::run(&shape(args.warmup), limit)
        .await?
        .require_clean("warm-up")?;
    let service_cpu = CpuMeter::start(service.as_ref().and_then(Proc::cpu_seconds));
    let nats_cpu = CpuMeter::start(nats.cpu_seconds());
    let load_cpu = CpuMeter::start(procs::finished_children_cpu_seconds());
    let report = load::run(&shape(args.requests), limit).await?;
    report.require_clean(variant.name())?;
    Ok(Sample {
        rate: report.throughput_rps,
        p50_ms: report.p50(),
        p99_ms: report.p99(),
        service_cpu_us: service_cpu
            .per(
                service.as_ref().and_then(Proc::cpu_seconds),
                report.accepted,
            )
            .unwrap_or(f64::NAN),
        nats_cpu_us: nats_cpu
            .per(nats.cpu_seconds(), report.accepted)
            .unwrap_or(f64::NAN),
        load_cpu_us: load_cpu
            .per(procs::finished_children_cpu_seconds(), report.accepted)
            .unwrap_or(f64::NAN),
    })
}
