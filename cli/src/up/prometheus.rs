//! The Prometheus of `evgrid up`: starting it, and the config it runs with — the same jobs,
//! labels and rules as the compose stack (rendered by `evgrid_observability`), on this stack's
//! ports. The rules are built into the binary and written beside the config, so `evgrid up`
//! works from any directory, not only from the repository.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use evgrid_observability::{SubstationTarget, Targets, prometheus_config};
use tokio::process::Command;

use super::banner::Endpoints;
use super::process::ChildProcess;
use super::{PROBE_TIMEOUT, UpArgs, free_port, port_is_free};

/// The Prometheus `evgrid up` started.
pub(super) struct Prometheus {
    pub(super) child: ChildProcess,
    pub(super) url: String,
    /// Why it is not on the port asked for, when it is not.
    pub(super) moved: Option<String>,
}

/// Starts Prometheus with a generated config scraping every component, if it is installed.
/// Err says why it is not running (shown in the banner); the grid runs either way. A port
/// already taken (Debian's `prometheus` package runs one on 9090) is replaced by a free one,
/// and the Prometheus that answers is checked to be this one before it is shown.
pub(super) async fn start_prometheus(
    args: &UpArgs,
    endpoints: &Endpoints,
) -> Result<Prometheus, String> {
    let dir = args.data_dir.join("prometheus");
    let free = || free_port().map_err(|e| format!("no free port: {e}"));
    let (port, moved) = match args.prometheus_port {
        0 => (free()?, None),
        port if port_is_free(port) => (port, None),
        port => (
            free()?,
            Some(format!("port {port} is taken by another process")),
        ),
    };
    std::fs::create_dir_all(dir.join("data"))
        .and_then(|_| write_local_config(&dir, endpoints, port, args.prometheus_scrape_interval))
        .map_err(|e| format!("cannot write its config in {}: {e}", dir.display()))?;
    let config_file = dir.join("prometheus.yml").display().to_string();
    let child = Command::new(&args.prometheus_bin)
        .arg(format!("--config.file={config_file}"))
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
    let http = reqwest::Client::builder()
        .timeout(PROBE_TIMEOUT)
        .connect_timeout(PROBE_TIMEOUT)
        .build()
        .map_err(|e| format!("no HTTP client: {e}"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(Some(status)) = child.child.try_wait() {
            let last = child.last_stderr_line(|l| l.contains("err")).await;
            return Err(format!("exited during start ({status}): {last}"));
        }
        // Ready, and running with our config file: whatever else answers on the port is not ours.
        if serves_config(&http, &url, &config_file).await {
            // Its log is not ours to show; drop the pipe so it never blocks on a full buffer.
            drop(child.child.stderr.take());
            return Ok(Prometheus { child, url, moved });
        }
        if tokio::time::Instant::now() > deadline {
            child.stop().await;
            return Err(format!("did not answer as ours on {url} within 15 s"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// True when the Prometheus at `url` is ready and runs with `config_file`.
pub(super) async fn serves_config(http: &reqwest::Client, url: &str, config_file: &str) -> bool {
    let ready = http
        .get(format!("{url}/-/ready"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success());
    if !ready {
        return false;
    }
    let flags = match http.get(format!("{url}/api/v1/status/flags")).send().await {
        Ok(r) => r.json::<serde_json::Value>().await.ok(),
        Err(_) => None,
    };
    flags.is_some_and(|f| f["data"]["config.file"].as_str() == Some(config_file))
}

/// The repository's rule files, by file name, as built into this binary.
pub const RULE_FILES: [(&str, &str); 1] = [(
    "evgrid.rules.yml",
    include_str!("../../../observability/prometheus/rules/evgrid.rules.yml"),
)];

/// Writes [`RULE_FILES`] into `dir/rules/` and `prometheus.yml` into `dir`, scraping every
/// component of `endpoints` every `scrape_interval` (rules evaluated as often), Prometheus itself
/// on `port`.
pub fn write_local_config(
    dir: &Path,
    endpoints: &Endpoints,
    port: u16,
    scrape_interval: Duration,
) -> std::io::Result<()> {
    let rules = dir.join("rules");
    std::fs::create_dir_all(&rules)?;
    for (name, text) in RULE_FILES {
        std::fs::write(rules.join(name), text)?;
    }
    let config = local_config(endpoints, port, scrape_interval);
    std::fs::write(dir.join("prometheus.yml"), config)
}

/// Renders `prometheus.yml` for `endpoints`, loading every `*.yml` in `rules/` beside it.
fn local_config(endpoints: &Endpoints, port: u16, scrape_interval: Duration) -> String {
    prometheus_config(&Targets {
        scrape_interval,
        // Prometheus resolves rule paths from the config file's directory.
        rule_files: vec!["rules/*.yml".to_owned()],
        ingest: vec![endpoints.ingest.to_string()],
        dispatcher: vec![endpoints.dispatcher_metrics.to_string()],
        substations: endpoints
            .substations
            .iter()
            .map(|(id, _, addr)| SubstationTarget {
                id: id.clone(),
                address: addr.to_string(),
            })
            .collect(),
        // No NATS exporter runs locally; the NATS dashboard is a compose-stack feature.
        nats_exporter: Vec::new(),
        prometheus: vec![format!("127.0.0.1:{port}")],
    })
}
