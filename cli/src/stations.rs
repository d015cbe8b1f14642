//! `evgrid stations`: simulated OCPP 2.0.1 charging stations (`evgrid_ocpp::simulator`) that
//! connect to a substation's CSMS endpoint and charge cars there, walk-ins and the cars of the
//! reservations the substation makes, until SIGTERM or Ctrl-C. The far end of the substation's
//! OCPP flow, for local grids, demos and load.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use evgrid_common::config::{parse_duration, parse_positive, parse_positive_duration};
use evgrid_ocpp::simulator::{self, SimConfig};
use evgrid_ocpp::stations::{self, StationsFileError};

/// Options of `evgrid stations`.
#[derive(Args, Debug, Clone)]
pub struct StationsArgs {
    /// The CSMS endpoint of a substation, without the station id (each station appends its
    /// own): e.g. ws://127.0.0.1:9000/ocpp. Plain ws:// only.
    #[arg(long, env = "EVGRID_OCPP_URL", value_name = "ws://HOST:PORT/PATH", value_parser = parse_ws_url)]
    pub url: String,
    /// The stations, one `station_id:password` line each with the plain password (the
    /// substation's --ocpp-stations file may hold hashes; a client needs the password itself).
    #[arg(long, env = "EVGRID_OCPP_STATIONS", value_name = "FILE")]
    pub stations: PathBuf,
    /// Simulate only the first N stations of the file.
    #[arg(long, env = "EVGRID_OCPP_COUNT", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub count: Option<u32>,
    /// The most power each station draws, kW.
    #[arg(long, env = "EVGRID_OCPP_MAX_KW", value_name = "KW", default_value_t = 22.0, value_parser = parse_positive)]
    pub max_kw: f64,
    /// Simulated seconds per real second (3600: an hour of charging a second).
    #[arg(long, env = "EVGRID_OCPP_TIME_SCALE", value_name = "FACTOR", default_value_t = 1.0, value_parser = parse_positive)]
    pub time_scale: f64,
    /// Real time between a transaction's meter reports.
    #[arg(long, env = "EVGRID_OCPP_METER_INTERVAL", value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub meter_interval: Duration,
    /// Mean real time between walk-in cars at a free station (random, exponential gaps);
    /// without it, only the cars of reservations come. Up to days: no upper bound.
    #[arg(long, env = "EVGRID_OCPP_WALK_IN_EVERY", value_name = "DURATION",
          value_parser = parse_positive_duration)]
    pub walk_in_every: Option<Duration>,
    /// Seed of the walk-in schedule and the cars' needs; random (and logged) without it.
    #[arg(long, env = "EVGRID_OCPP_SEED")]
    pub seed: Option<u64>,
    /// Misbehave: every station draws its maximum whatever limit the CSMS sets (and says it
    /// accepted it). For testing a substation's enforcement.
    #[arg(long, env = "EVGRID_OCPP_IGNORE_LIMITS")]
    pub ignore_limits: bool,
}

/// Runs the stations until SIGTERM or Ctrl-C and prints what they did.
pub async fn main(args: StationsArgs) -> Result<ExitCode> {
    let config = config(&args)?;
    tracing::info!(
        stations = config.stations.len(),
        url = %config.url,
        seed = config.seed,
        "starting simulated charging stations"
    );
    let shutdown = evgrid_common::shutdown::on_signals();
    let report = simulator::run(config, None, shutdown).await;
    tracing::info!(?report, "simulated stations stopped");
    println!("evgrid stations: {report}");
    // Every station refused: nothing was simulated, most likely a wrong file or URL.
    if report.refused > 0 && report.connected == 0 {
        bail!(
            "the CSMS refused every station ({} of them): check --stations against the substation's stations file",
            report.refused
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The simulator's configuration from the options, with the stations file read.
pub fn config(args: &StationsArgs) -> Result<SimConfig> {
    let mut stations = read_stations(&args.stations)?;
    if let Some(count) = args.count {
        let count = count as usize;
        if count > stations.len() {
            bail!(
                "--count {count}: {} has only {} stations",
                args.stations.display(),
                stations.len()
            );
        }
        stations.truncate(count);
    }
    let mut config = SimConfig::new(args.url.clone(), stations);
    config.max_power_w = args.max_kw * 1000.0;
    config.time_scale = args.time_scale;
    config.meter_interval = args.meter_interval;
    config.walk_in_every = args.walk_in_every;
    config.seed = args.seed.unwrap_or_else(rand::random);
    config.ignore_limits = args.ignore_limits;
    Ok(config)
}

/// Reads `station_id:password` lines (blank lines and `#` comments skipped), in file order.
pub fn read_stations(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read stations file {}", path.display()))?;
    parse_stations(&text).map_err(|(line, why)| match line {
        0 => anyhow::anyhow!("stations file {} {why}", path.display()),
        line => anyhow::anyhow!("stations file {} line {line}: {why}", path.display()),
    })
}

/// The stations of a stations file's text, or the number of the bad line (0: the whole file)
/// and why.
pub fn parse_stations(text: &str) -> Result<Vec<(String, String)>, (usize, String)> {
    let entries = stations::entries(text).map_err(|e| match e {
        StationsFileError::Line { line, detail } => (line, detail),
        _ => (0, "names no station".to_owned()),
    })?;
    entries
        .into_iter()
        .map(|e| {
            let bad = |why: &str| (e.line, format!("station {}'s password {why}", e.station));
            if stations::is_hash(e.password) {
                return Err(bad("is a hash: a station needs the password itself"));
            }
            // What the CSMS takes: anything else would only be refused once connected.
            stations::check_plain_password(e.password).map_err(bad)?;
            Ok((e.station.to_owned(), e.password.to_owned()))
        })
        .collect()
}

fn parse_ws_url(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("ws://")
        .ok_or_else(|| format!("{s:?}: expected a ws:// URL (wss:// is not supported)"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{s:?}: no host"));
    }
    Ok(s.trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: StationsArgs,
    }

    fn parse(args: &[&str]) -> Result<StationsArgs, String> {
        Cli::try_parse_from(std::iter::once("stations").chain(args.iter().copied()))
            .map(|c| c.args)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_stations_file_is_read_in_order_and_bad_lines_are_named() {
        let stations =
            parse_stations("# sim\ncs-2:plain-password-0002\n\ncs-1:plain-password-0001\n")
                .unwrap();
        assert_eq!(
            stations,
            [
                ("cs-2".to_owned(), "plain-password-0002".to_owned()),
                ("cs-1".to_owned(), "plain-password-0001".to_owned())
            ]
        );
        let bcrypt = format!("cs-1:$2b$04${}", "x".repeat(53));
        for (text, line, expected) in [
            ("cs-1", 1, "expected"),
            ("cs-1:plain-password-0001\ncs-2:short", 2, "16 to 40"),
            (
                "\ncs-1:$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA",
                2,
                "hash",
            ),
            (bcrypt.as_str(), 1, "hash"),
            ("cs 1:plain-password-0001", 1, "station id"),
            (
                "cs-1:plain-password-0001\ncs-1:plain-password-0002",
                2,
                "earlier line",
            ),
        ] {
            let (at, why) = parse_stations(text).unwrap_err();
            assert_eq!(at, line, "{text:?}: {why}");
            assert!(why.contains(expected), "{text:?}: {why}");
        }
        assert!(parse_stations("# none\n").is_err());
    }

    #[test]
    fn errors_name_the_file_and_line_and_count_takes_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stations");
        std::fs::write(&file, "cs-1:plain-password-0001\ncs-2:$2b$04$xx\n").unwrap();
        let path = file.to_str().unwrap();
        let args = parse(&["--url", "ws://127.0.0.1:9000/ocpp/", "--stations", path]).unwrap();
        let error = config(&args).unwrap_err().to_string();
        assert!(error.contains(path) && error.contains("line 2"), "{error}");

        std::fs::write(
            &file,
            "cs-1:plain-password-0001\ncs-2:plain-password-0002\ncs-3:plain-password-0003\n",
        )
        .unwrap();
        let args = parse(&[
            "--url",
            "ws://127.0.0.1:9000/ocpp/",
            "--stations",
            path,
            "--count",
            "2",
            "--max-kw",
            "11",
            "--time-scale",
            "60",
            "--meter-interval",
            "500ms",
            "--walk-in-every",
            "2h",
            "--seed",
            "9",
            "--ignore-limits",
        ])
        .unwrap();
        let config = config(&args).unwrap();
        assert_eq!(config.url, "ws://127.0.0.1:9000/ocpp");
        assert_eq!(
            config
                .stations
                .iter()
                .map(|s| s.0.as_str())
                .collect::<Vec<_>>(),
            ["cs-1", "cs-2"]
        );
        assert_eq!(config.max_power_w, 11_000.0);
        assert_eq!(config.time_scale, 60.0);
        assert_eq!(config.meter_interval, Duration::from_millis(500));
        assert_eq!(config.walk_in_every, Some(Duration::from_secs(7200)));
        assert_eq!(config.seed, 9);
        assert!(config.ignore_limits);

        let too_many = parse(&["--url", "ws://h:1/ocpp", "--stations", path, "--count", "4"]);
        let error = config_error(too_many.unwrap());
        assert!(error.contains("only 3"), "{error}");
        for (url, option, value) in [
            ("wss://h:1/ocpp", "--seed", "1"),
            ("http://h:1/ocpp", "--seed", "1"),
            ("ws:///ocpp", "--seed", "1"),
            ("ws://h:1/ocpp", "--meter-interval", "1"),
            ("ws://h:1/ocpp", "--max-kw", "0"),
            ("ws://h:1/ocpp", "--time-scale", "-1"),
            ("ws://h:1/ocpp", "--count", "0"),
        ] {
            let args = ["--url", url, "--stations", path, option, value];
            let error = parse(&args).unwrap_err();
            assert!(!error.contains("more than once"), "{args:?}: {error}");
        }
        assert!(parse(&["--url", "ws://h:1/ocpp", "--stations", path, "--seed", "1"]).is_ok());
    }

    fn config_error(args: StationsArgs) -> String {
        config(&args).unwrap_err().to_string()
    }
}
