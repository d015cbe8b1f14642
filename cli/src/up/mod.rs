//! `evgrid up`: the whole grid on one machine with one command. Starts (or joins) a NATS server,
//! runs ingest, the dispatcher and the substations as tasks of this process — the same library
//! code the separate binaries run — starts Prometheus when it is installed, optionally drives a
//! demo load, prints where everything is, and stops it all on Ctrl-C/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, FromArgMatches, Parser};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use evgrid_common::config::{LogFormat, parse_duration, parse_listen, parse_positive};
use evgrid_common::roles::Role;

use crate::credentials;
use evgrid_dispatcher::Policy;

mod banner;
mod process;
mod prometheus;
mod stations;

pub use banner::Endpoints;
use banner::{BannerNotes, print_banner};
use process::start_nats;
use prometheus::start_prometheus;

#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    /// Use this running NATS server (JetStream enabled, 2.10+) instead of starting one; or
    /// several comma-separated, the servers of a running cluster.
    #[arg(long, env = evgrid_common::config::NATS_URL_ENV)]
    pub nats_url: Option<String>,
    /// Number of nats-servers to start when no --nats-url is given: 1 is a single server; 3
    /// (or 5) a cluster on loopback with routes between the nodes, every stream, the bucket and
    /// every consumer replicated on all of them (each node's store under the data directory).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_cluster: u8,
    /// JetStream fsync policy of the servers evgrid starts: `always` (fsync every write before
    /// its ack: a 202 survives a power cut) or an interval such as `2m` (nats-server's default:
    /// writes reach the OS at once, the disk within the interval). See docs/durability.md.
    #[arg(long, default_value = DEFAULT_NATS_SYNC, value_parser = NatsSync::parse)]
    pub nats_sync: NatsSync,
    /// Replicas of every stream, the bucket and consumer (1..=5), as the services'
    /// --replicas. Default: the number of servers started (--nats-cluster), or 1 with
    /// --nats-url.
    #[arg(long, env = evgrid_common::config::REPLICAS_ENV, value_parser = evgrid_common::config::parse_replicas)]
    pub replicas: Option<usize>,
    /// nats-server binary to start when no --nats-url is given.
    #[arg(long, default_value = "nats-server")]
    pub nats_server_bin: PathBuf,
    /// Start NATS without users: anyone who can reach its port may publish anything, as a
    /// grid operator or as any substation. By default each service has its own user with only
    /// its role's permissions, and the passwords are in `<data-dir>/credentials`
    /// (docs/security.md).
    #[arg(long)]
    pub insecure_nats: bool,
    /// Serve the HTTP API without API keys: anyone who reaches it may submit and read every
    /// request. By default an operator key is made in `<data-dir>/api-key` (docs/security.md).
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// Client port of the NATS server evgrid starts (0 = any free port); with --nats-cluster
    /// N, the first of N consecutive ports.
    #[arg(long, default_value_t = 4222)]
    pub nats_port: u16,
    /// Where the NATS JetStream store and Prometheus data live; kept across runs.
    #[arg(long, default_value = ".evgrid")]
    pub data_dir: PathBuf,
    /// Start from an empty data directory (deletes the previous store).
    #[arg(long)]
    pub fresh: bool,
    /// Number of substations (capacities from --capacities, else 50, 100, 150, ... kW).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub substations: u16,
    /// Capacities in kW, comma-separated (their count sets the number of substations).
    #[arg(long, value_delimiter = ',', value_parser = parse_positive)]
    pub capacities: Vec<f64>,
    /// HTTP API of ingest.
    #[arg(long, default_value = "127.0.0.1:8080", value_parser = parse_listen)]
    pub ingest_listen: SocketAddr,
    /// First port of the dispatcher's and substations' metrics endpoints (0 = any free ports).
    #[arg(long, default_value_t = 9101)]
    pub metrics_base_port: u16,
    /// Simulated seconds per real second. The default, 3600, makes an hour of charging pass in
    /// a second, so a 30 kWh car at 11 kW finishes in about 3 s and the README's 100-car load
    /// (about 12 grid-hours of energy) completes well within a minute.
    #[arg(long, default_value_t = DEFAULT_TIME_SCALE, value_parser = parse_positive)]
    pub time_scale: f64,
    /// Where the cars charge: in each substation's model (simulated), or at simulated OCPP
    /// 2.0.1 charging stations behind each substation (ocpp; docs/ocpp.md).
    #[arg(long, value_enum, default_value_t = evgrid_substation::Chargers::default())]
    pub chargers: evgrid_substation::Chargers,
    /// With --chargers ocpp: simulated stations behind each substation.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub stations_per_substation: u16,
    /// With --chargers ocpp: port where the first substation's stations connect; the next
    /// substation's is the one after (0 = any free ports).
    #[arg(long, default_value_t = 9000)]
    pub ocpp_base_port: u16,
    /// Dispatch policy, as `evgrid-dispatcher --policy` (its default when not given).
    #[arg(long, value_enum)]
    pub policy: Option<Policy>,
    /// Prometheus binary; started with a generated config when found.
    #[arg(long, default_value = "prometheus")]
    pub prometheus_bin: PathBuf,
    /// Port for Prometheus (0 = any free port).
    #[arg(long, default_value_t = 9090)]
    pub prometheus_port: u16,
    /// How often Prometheus scrapes every component and evaluates the rules (the compose
    /// stack's 5s; shorter gives data sooner, e.g. in tests).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub prometheus_scrape_interval: Duration,
    /// Also drive a steady demo load of real charging sessions (ACN-Data, Caltech).
    #[arg(long)]
    pub demo: bool,
    /// Demo requests per second (real time). By default derived from the capacities, the time
    /// scale and the demo sessions' mean energy so that the demo uses about 40 % of the grid:
    /// busy, with room left for requests of your own.
    #[arg(long, value_parser = parse_positive)]
    pub demo_rate: Option<f64>,
    /// No banner and no live status line.
    #[arg(long)]
    pub quiet: bool,
    /// Show the services' logs on stderr (above the live line) instead of writing them to
    /// `evgrid.log` in the data directory. Warnings and errors are shown either way.
    #[arg(long = "logs", short = 'v')]
    pub logs: bool,
}

/// Default `--nats-sync`: nats-server's own default, written out so the choice is visible (and
/// measured, docs/benchmarks.md): a crash of the server process loses nothing acknowledged; a
/// power cut may lose what was acknowledged in the last two minutes.
pub const DEFAULT_NATS_SYNC: &str = "2m";

/// JetStream's fsync policy (`sync_interval` of nats-server's `jetstream` block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsSync {
    /// fsync every write before it is acknowledged.
    Always,
    /// fsync every so often (writes are handed to the OS at once either way).
    Every(Duration),
}

impl NatsSync {
    /// `always`, or a duration with a unit (`2m`, `10s`, `500ms`).
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("always") {
            return Ok(Self::Always);
        }
        match parse_duration(s) {
            Ok(d) if !d.is_zero() => Ok(Self::Every(d)),
            _ => Err(format!(
                "expected `always` or an interval such as 2m, 10s, 500ms, got {s:?}"
            )),
        }
    }

    /// The value of `sync_interval` in a nats-server config file.
    pub fn conf_value(self) -> String {
        match self {
            Self::Always => "always".to_owned(),
            Self::Every(d) => format!("\"{}ms\"", d.as_millis()),
        }
    }
}

impl std::fmt::Display for NatsSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Always => f.write_str("fsync always"),
            Self::Every(d) => write!(f, "fsync every {}", humantime_ish(*d)),
        }
    }
}

/// `2m`, `10s`, `500ms`: the unit the value reads best in.
fn humantime_ish(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Default `--time-scale`: an hour of charging per real second (see `UpArgs::time_scale`).
pub const DEFAULT_TIME_SCALE: f64 = 3600.0;

/// Where the services' logs go, in the data directory, unless `--logs`.
pub const LOG_FILE: &str = "evgrid.log";

/// Bound on every HTTP probe `evgrid up` makes (Prometheus readiness and identity): a listener
/// that accepts and never answers must not hold start-up.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

impl UpArgs {
    /// Checks every option, and every service's configuration as it would be built, before
    /// anything is started or deleted: bad config is one line and no side effect.
    pub fn validate(&self) -> Result<()> {
        let capacities = self.capacities();
        if capacities.len() > 100 {
            bail!(
                "--capacities names {} substations; at most 100",
                capacities.len()
            );
        }
        if self.metrics_base_port != 0
            && usize::from(self.metrics_base_port) + capacities.len() > usize::from(u16::MAX)
        {
            bail!(
                "--metrics-base-port {} leaves no room for {} substation ports",
                self.metrics_base_port,
                capacities.len()
            );
        }
        if let Some(url) = &self.nats_url {
            evgrid_common::config::parse_nats_url(url)
                .map_err(|e| anyhow::anyhow!("--nats-url: {e}"))?;
            if self.nats_cluster > 1 {
                bail!(
                    "--nats-cluster starts servers, --nats-url uses running ones: give one or the other"
                );
            }
        }
        if self.nats_url.is_none()
            && self.nats_port != 0
            && usize::from(self.nats_port) + usize::from(self.nats_cluster) > usize::from(u16::MAX)
        {
            bail!(
                "--nats-port {} leaves no room for {} servers",
                self.nats_port,
                self.nats_cluster
            );
        }
        // The services' own parsers, with a stand-in URL (the real one is known once NATS runs)
        // and no keys file (made once the data directory is in place).
        ServiceConfigs::new(
            self,
            &capacities,
            evgrid_common::config::DEFAULT_NATS_URL,
            None,
            None,
            &[],
        )?;
        Ok(())
    }

    /// `--replicas`, else one per server evgrid starts (1 with --nats-url).
    fn replicas(&self) -> usize {
        self.replicas.unwrap_or(if self.nats_url.is_some() {
            1
        } else {
            usize::from(self.nats_cluster)
        })
    }

    fn capacities(&self) -> Vec<f64> {
        if self.capacities.is_empty() {
            (1..=self.substations)
                .map(|i| 50.0 * f64::from(i))
                .collect()
        } else {
            self.capacities.clone()
        }
    }
}

/// Parses a service's `Config` from command-line words, exactly as its own binary would, so
/// `evgrid up` and the separate binaries share defaults and validation.
pub fn service_config<C: Args>(words: &[String]) -> Result<C> {
    #[derive(Parser)]
    struct Wrapper<C: Args> {
        #[command(flatten)]
        config: C,
    }
    let matches = Wrapper::<C>::command()
        .no_binary_name(true)
        .try_get_matches_from(words)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Wrapper::<C>::from_arg_matches(&matches)?.config)
}

/// The keys file of ingest, unless `--insecure-no-auth`: in the credentials directory, with
/// the operator key beside the data (`api_key_file`).
fn api_keys_file(args: &UpArgs) -> Option<PathBuf> {
    (!args.insecure_no_auth).then(|| credentials::dir(&args.data_dir).join("api-keys"))
}

/// Where `evgrid up` keeps its operator API key.
pub fn api_key_file(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("api-key")
}

fn path_word(path: &std::path::Path) -> Result<String> {
    path.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

async fn bind_metrics(base: u16, offset: u16) -> Result<tokio::net::TcpListener> {
    let port = if base == 0 { 0 } else { base + offset };
    evgrid_common::http::bind(SocketAddr::from(([127, 0, 0, 1], port))).await
}

/// `evgrid up` from the command line: checks the options, prepares the data directory, sends
/// the logs where `--logs` says, and runs the grid until SIGINT/SIGTERM.
pub async fn main(args: UpArgs, log_format: LogFormat) -> Result<()> {
    args.validate()?;
    prepare_data_dir(&args)?;
    let log_file = if args.logs {
        None
    } else {
        let path = args.data_dir.join(LOG_FILE);
        Some(
            std::fs::File::create(&path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        )
    };
    evgrid_common::telemetry::init_with_file(log_format, log_file);
    run_prepared(args, evgrid_common::shutdown::on_signals()).await
}

fn prepare_data_dir(args: &UpArgs) -> Result<()> {
    if args.fresh && args.data_dir.exists() {
        std::fs::remove_dir_all(&args.data_dir)
            .with_context(|| format!("cannot remove {}", args.data_dir.display()))?;
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data directory {}", args.data_dir.display()))
}

/// Why start-up stopped: a signal came first.
#[derive(Debug, thiserror::Error)]
#[error("stopped by a signal during start-up")]
struct Interrupted;

/// Awaits `step` unless `shutdown` comes first: then the step is dropped (a child it started is
/// killed on drop) and start-up ends with [`Interrupted`].
async fn or_shutdown<T>(
    shutdown: &CancellationToken,
    step: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::select! {
        result = step => result,
        _ = shutdown.cancelled() => Err(Interrupted.into()),
    }
}

/// Refuses a port another process holds, with one line saying what to do instead.
fn ensure_free(port: u16, what: &str, instead: &str) -> Result<()> {
    if port == 0 || port_is_free(port) {
        return Ok(());
    }
    bail!("port {port} for {what} is already in use by another process; {instead}")
}

/// True when nothing listens on `port`: neither on loopback nor on all interfaces (a system
/// service such as Debian's Prometheus listens on `:9090`).
fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        && std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
}

/// Runs the grid until `shutdown`; returns once everything has stopped. A signal during
/// start-up stops what has started and returns Ok.
pub async fn run(args: UpArgs, shutdown: CancellationToken) -> Result<()> {
    args.validate()?;
    prepare_data_dir(&args)?;
    run_prepared(args, shutdown).await
}

/// [`run`] once the options are checked and the data directory is ready.
async fn run_prepared(args: UpArgs, shutdown: CancellationToken) -> Result<()> {
    match start_and_run(args, &shutdown).await {
        Err(e) if e.is::<Interrupted>() => Ok(()),
        other => other,
    }
}

async fn start_and_run(args: UpArgs, shutdown: &CancellationToken) -> Result<()> {
    let capacities = args.capacities();
    // The users of a NATS this command starts; a server given with --nats-url is the
    // operator's, with its own users (EVGRID_NATS_USER and the others reach the services).
    let credentials = (args.nats_url.is_none() && !args.insecure_nats)
        .then(|| {
            credentials::Credentials::load_or_create(
                &credentials::dir(&args.data_dir),
                &substation_ids(&capacities),
            )
        })
        .transpose()?;
    if let Some(keys) = api_keys_file(&args) {
        crate::api_key::operator_key(&keys, &api_key_file(&args.data_dir))?;
    }

    // Bind every port first: a port in use fails before anything has started.
    let ingest_listener = evgrid_common::http::bind(args.ingest_listen).await?;
    let dispatcher_listener = bind_metrics(args.metrics_base_port, 0).await?;
    let mut substation_listeners = Vec::new();
    let mut ocpp_listeners = Vec::new();
    for i in 0..capacities.len() {
        substation_listeners.push(bind_metrics(args.metrics_base_port, 1 + i as u16).await?);
        if args.chargers == evgrid_substation::Chargers::Ocpp {
            ocpp_listeners.push(bind_metrics(args.ocpp_base_port, i as u16).await?);
        }
    }

    let (nats_child, nats_url, nats_monitor) = match &args.nats_url {
        Some(url) => (None, url.clone(), None),
        None => {
            for i in 0..u16::from(args.nats_cluster) {
                let port = if args.nats_port == 0 {
                    0
                } else {
                    args.nats_port + i
                };
                ensure_free(
                    port,
                    "NATS",
                    &format!(
                        "to use that server pass --nats-url nats://127.0.0.1:{port}, or pick another port with --nats-port (0: any free port)"
                    ),
                )?;
            }
            let started = or_shutdown(
                shutdown,
                start_nats(&args, &args.data_dir, credentials.as_ref()),
            )
            .await?;
            (Some(started.children), started.urls, Some(started.monitors))
        }
    };

    let services = shutdown.child_token();
    let result = run_services(
        &args,
        &capacities,
        Listeners {
            ingest: ingest_listener,
            dispatcher: dispatcher_listener,
            substations: substation_listeners,
            ocpp: ocpp_listeners,
        },
        &nats_url,
        nats_monitor,
        credentials.as_ref(),
        services,
    )
    .await;
    for child in nats_child.into_iter().flatten() {
        child.stop().await;
    }
    result
}

/// Every in-process service's configuration, parsed by its own parser as its binary would.
struct ServiceConfigs {
    ingest: evgrid_ingest::Config,
    dispatcher: evgrid_dispatcher::Config,
    substations: Vec<evgrid_substation::Config>,
    /// With --chargers ocpp: each substation's stations.
    fleets: Vec<stations::Fleet>,
}

impl ServiceConfigs {
    fn new(
        args: &UpArgs,
        capacities: &[f64],
        nats_url: &str,
        credentials: Option<&credentials::Credentials>,
        api_keys: Option<&std::path::Path>,
        ocpp: &[SocketAddr],
    ) -> Result<Self> {
        // How `role` connects; with users, only the dispatcher manages the streams.
        let nats = |role: Role| -> Vec<String> {
            let mut words = vec![
                "--nats-url".to_owned(),
                nats_url.to_owned(),
                "--replicas".to_owned(),
                args.replicas().to_string(),
            ];
            if let Some(credentials) = credentials {
                let auth = credentials.auth(&role);
                words.extend([
                    "--nats-user".to_owned(),
                    role.user(),
                    "--nats-password".to_owned(),
                    auth.password().unwrap_or_default().to_owned(),
                    "--manage-streams".to_owned(),
                    (role == Role::Dispatcher).to_string(),
                ]);
            }
            words
        };
        let mut ingest_words = nats(Role::Ingest);
        match api_keys {
            Some(file) => ingest_words.extend(["--api-keys".to_owned(), path_word(file)?]),
            None => ingest_words.push("--insecure-no-auth".to_owned()),
        }
        let ingest = service_config(&ingest_words).context("ingest")?;
        let mut dispatcher_words = nats(Role::Dispatcher);
        if let Some(policy) = args.policy {
            dispatcher_words.extend(["--policy".to_owned(), policy.as_str().to_owned()]);
        }
        let dispatcher = service_config(&dispatcher_words).context("dispatcher")?;
        let mut substations = Vec::new();
        let mut fleets = Vec::new();
        for (i, (id, capacity)) in substation_ids(capacities)
            .into_iter()
            .zip(capacities)
            .enumerate()
        {
            let mut words = nats(Role::Substation(id.clone()));
            words.extend([
                "--id".to_owned(),
                id.clone(),
                "--capacity-kw".to_owned(),
                capacity.to_string(),
                "--time-scale".to_owned(),
                args.time_scale.to_string(),
            ]);
            if let Some(addr) = ocpp.get(i) {
                let fleet = stations::fleet(
                    &credentials::dir(&args.data_dir),
                    &id,
                    args.stations_per_substation,
                )?;
                words.extend([
                    "--chargers".to_owned(),
                    "ocpp".to_owned(),
                    "--ocpp-listen".to_owned(),
                    addr.to_string(),
                    "--ocpp-stations".to_owned(),
                    path_word(&fleet.file)?,
                ]);
                fleets.push(fleet);
            }
            substations.push(
                service_config::<evgrid_substation::Config>(&words).with_context(|| id.clone())?,
            );
        }
        Ok(Self {
            ingest,
            dispatcher,
            substations,
            fleets,
        })
    }
}

struct Listeners {
    ingest: tokio::net::TcpListener,
    dispatcher: tokio::net::TcpListener,
    substations: Vec<tokio::net::TcpListener>,
    /// With --chargers ocpp: where each substation's stations connect.
    ocpp: Vec<tokio::net::TcpListener>,
}

async fn run_services(
    args: &UpArgs,
    capacities: &[f64],
    listeners: Listeners,
    nats_url: &str,
    nats_monitor: Option<String>,
    credentials: Option<&credentials::Credentials>,
    token: CancellationToken,
) -> Result<()> {
    let ocpp_addrs = listeners
        .ocpp
        .iter()
        .map(|l| l.local_addr())
        .collect::<std::io::Result<Vec<_>>>()?;
    let ServiceConfigs {
        ingest: ingest_config,
        dispatcher: dispatcher_config,
        substations: substation_configs,
        fleets,
    } = ServiceConfigs::new(
        args,
        capacities,
        nats_url,
        credentials,
        api_keys_file(args).as_deref(),
        &ocpp_addrs,
    )?;
    // The demo submits as a client would; the live line reads as an observer.
    let auth = |role: Role| credentials.map(|c| c.auth(&role)).unwrap_or_default();

    let endpoints = Endpoints {
        ingest: listeners.ingest.local_addr()?,
        nats_url: nats_url.to_owned(),
        nats_monitor,
        dispatcher_metrics: listeners.dispatcher.local_addr()?,
        substations: substation_configs
            .iter()
            .zip(&listeners.substations)
            .zip(capacities)
            .map(|((c, l), cap)| Ok((c.id.clone(), *cap, l.local_addr()?)))
            .collect::<Result<_>>()?,
        prometheus: Err("not started yet".to_owned()),
        prometheus_moved: None,
        ocpp: substation_ids(capacities)
            .into_iter()
            .zip(&ocpp_addrs)
            .zip(&fleets)
            .map(|((id, addr), fleet)| {
                (
                    id,
                    format!("ws://{addr}/ocpp/<station id>"),
                    fleet.stations.len(),
                )
            })
            .collect(),
    };

    let mut set = tokio::task::JoinSet::new();
    set.spawn(named(
        "ingest",
        evgrid_ingest::run(ingest_config, listeners.ingest, token.clone()),
    ));
    set.spawn(named(
        "dispatcher",
        evgrid_dispatcher::run(dispatcher_config, listeners.dispatcher, token.clone()),
    ));
    let mut ocpp_listeners = listeners.ocpp.into_iter();
    for (config, listener) in substation_configs.into_iter().zip(listeners.substations) {
        set.spawn(named(
            "substation",
            evgrid_substation::run_with_ocpp(
                config,
                listener,
                ocpp_listeners.next(),
                token.clone(),
            ),
        ));
    }

    let tracker = TaskTracker::new();
    // Start-up races the signal: a Ctrl-C while Prometheus starts drops (and kills) it.
    let prometheus = tokio::select! {
        started = start_prometheus(args, &endpoints) => started,
        _ = token.cancelled() => Err("stopped during start-up".to_owned()),
    };
    let endpoints = Endpoints {
        prometheus: prometheus
            .as_ref()
            .map(|p| p.url.clone())
            .map_err(Clone::clone),
        prometheus_moved: prometheus.as_ref().ok().and_then(|p| p.moved.clone()),
        ..endpoints
    };
    let demo = args.demo.then(crate::demo::Demo::load);
    let demo_rate = demo.as_ref().map(|demo| {
        args.demo_rate
            .unwrap_or_else(|| demo.rate_for(capacities.iter().sum(), args.time_scale))
    });
    if !args.quiet && !token.is_cancelled() {
        print_banner(
            &endpoints,
            &BannerNotes {
                nats_store: nats_store(args, nats_url),
                time_scale: args.time_scale,
                log_file: (!args.logs).then(|| args.data_dir.join(LOG_FILE)),
                demo: demo.as_ref().zip(demo_rate),
                credentials: credentials.map(|_| credentials::dir(&args.data_dir)),
                api_key: api_keys_file(args).map(|_| api_key_file(&args.data_dir)),
            },
        );
    }
    for (fleet, addr) in fleets.iter().zip(&ocpp_addrs) {
        let config = stations::simulation(format!("ws://{addr}/ocpp"), fleet, args.time_scale);
        tracker.spawn(evgrid_ocpp::simulator::run(config, None, token.clone()));
    }
    if let (Some(demo), Some(rate)) = (demo, demo_rate) {
        tracker.spawn(demo.drive(nats_url.to_owned(), auth(Role::Client), rate, token.clone()));
    }
    if !args.quiet {
        tracker.spawn(crate::status::live_line(
            nats_url.to_owned(),
            auth(Role::Observer),
            token.clone(),
        ));
    }

    // Run until a signal, or until a service fails (then stop the rest and report it).
    let mut failure = None;
    tokio::select! {
        _ = token.cancelled() => {}
        Some(joined) = set.join_next() => {
            failure = match joined {
                // A service that saw the signal first and stopped cleanly is no failure.
                Ok(Ok(_)) if token.is_cancelled() => None,
                Ok(Ok(name)) => Some(anyhow::anyhow!("{name} stopped unexpectedly")),
                Ok(Err(e)) => Some(e),
                Err(e) => Some(anyhow::anyhow!("a service panicked: {e}")),
            };
        }
    }
    token.cancel();
    tracker.close();
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(joined) = set.join_next().await {
            if let Ok(Err(e)) = joined {
                tracing::error!(error = %format!("{e:#}"), "service failed while stopping");
            }
        }
        tracker.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("services did not stop within 10 s; exiting anyway");
        set.abort_all();
    }
    if let Ok(prometheus) = prometheus {
        prometheus.child.stop().await;
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The ids of the substations `evgrid up` runs: `substation-1`, `substation-2`, ...
fn substation_ids(capacities: &[f64]) -> Vec<String> {
    (1..=capacities.len())
        .map(|i| format!("substation-{i}"))
        .collect()
}

/// The banner's account of durability: how many servers, how many copies, which fsync.
fn nats_store(args: &UpArgs, nats_url: &str) -> String {
    let replicas = args.replicas();
    match &args.nats_url {
        Some(_) => format!(
            "{} server(s) given, R{replicas} (fsync as those servers are configured)",
            nats_url.split(',').count()
        ),
        None => format!(
            "{} server(s), R{replicas}, {} (docs/durability.md)",
            args.nats_cluster, args.nats_sync
        ),
    }
}

async fn named(
    name: &'static str,
    service: impl std::future::Future<Output = anyhow::Result<()>>,
) -> Result<&'static str> {
    service.await.with_context(|| name.to_owned())?;
    Ok(name)
}

fn free_port() -> Result<u16> {
    Ok(process::free_ports(1)?[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_sync_is_always_or_an_interval() {
        assert_eq!(NatsSync::parse("always"), Ok(NatsSync::Always));
        assert_eq!(
            NatsSync::parse("2m"),
            Ok(NatsSync::Every(Duration::from_secs(120)))
        );
        assert_eq!(NatsSync::parse("2m").unwrap().conf_value(), "\"120000ms\"");
        assert_eq!(NatsSync::Always.conf_value(), "always");
        assert_eq!(NatsSync::parse("2m").unwrap().to_string(), "fsync every 2m");
        for bad in ["sometimes", "0s", "10", ""] {
            assert!(NatsSync::parse(bad).is_err(), "{bad}");
        }
    }

    fn up_args(words: &[&str]) -> UpArgs {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            up: UpArgs,
        }
        Cli::try_parse_from(std::iter::once("up").chain(words.iter().copied()))
            .unwrap()
            .up
    }

    #[test]
    fn replicas_follow_the_servers_started_unless_given() {
        assert_eq!(up_args(&[]).replicas(), 1);
        assert_eq!(up_args(&["--nats-cluster", "3"]).replicas(), 3);
        assert_eq!(
            up_args(&["--nats-cluster", "3", "--replicas", "1"]).replicas(),
            1
        );
        assert_eq!(
            up_args(&["--nats-url", "nats://a:4222,nats://b:4222"]).replicas(),
            1
        );
    }

    #[test]
    fn a_cluster_to_start_and_servers_to_use_exclude_each_other() {
        let err = up_args(&["--nats-cluster", "3", "--nats-url", "nats://a:4222"])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("give one or the other"), "{err}");
        assert!(up_args(&["--nats-cluster", "3"]).validate().is_ok());
    }
}
