//! The grid a chaos scenario runs against: NATS (one nats-server, or a 3-node cluster with
//! every stream, bucket and consumer at R3; the pinned build, via `evgrid-test-support`), one or
//! more ingests, one or more dispatchers and the substations, each a separate process of the real
//! binaries on loopback, and what a fault does to them: kill -9, restart with the same options
//! (and, for ingest and NATS, the same address and store), SIGSTOP/SIGCONT.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use evgrid_common::streams;
use evgrid_test_support::{NatsCluster, NatsServer};

use super::fault::{Shape, Target};
use crate::procs::{Proc, binary_in, free_addr};
use crate::setup;

/// How long a restarted cluster may take to elect its JetStream meta leader.
const CLUSTER_ELECTION: Duration = Duration::from_secs(30);

/// How the grid is built.
#[derive(Debug, Clone)]
pub struct GridSpec {
    /// Directory of `evgrid-ingest`, `evgrid-dispatcher`, `evgrid-substation`.
    pub bins: PathBuf,
    pub capacities_kw: Vec<f64>,
    pub time_scale: f64,
}

/// One service process and how to start it again as it was.
struct Service {
    name: String,
    binary: &'static str,
    args: Vec<String>,
    addr: SocketAddr,
    /// `None` while killed.
    proc: Option<Proc>,
}

/// The NATS of a grid.
enum Nats {
    Single(NatsServer),
    Cluster(NatsCluster),
}

impl Nats {
    fn start(nodes: usize) -> Result<Self> {
        Ok(if nodes > 1 {
            Nats::Cluster(NatsCluster::start(nodes)?)
        } else {
            Nats::Single(NatsServer::start()?)
        })
    }

    /// What `--nats-url` takes: one URL, or every node's, comma-separated.
    fn url(&self) -> String {
        match self {
            Nats::Single(s) => s.url().to_owned(),
            Nats::Cluster(c) => c.urls(),
        }
    }

    fn cluster(&mut self) -> Result<&mut NatsCluster> {
        match self {
            Nats::Cluster(c) => Ok(c),
            Nats::Single(_) => anyhow::bail!("the grid runs a single nats-server, not a cluster"),
        }
    }
}

/// A running grid. Every process is killed when it drops.
pub struct LocalGrid {
    nats: Nats,
    url: String,
    bins: PathBuf,
    logs: PathBuf,
    ingests: Vec<Service>,
    dispatchers: Vec<Service>,
    substations: Vec<Service>,
    /// The cluster nodes killed by the last blow, to restart.
    killed_nodes: Vec<usize>,
}

impl LocalGrid {
    /// Starts NATS, the substations (and waits for a heartbeat of each, so the dispatchers see
    /// the whole grid at once), the dispatchers and the ingests.
    pub async fn start(spec: &GridSpec, shape: Shape, logs: &Path) -> Result<Self> {
        let nats = Nats::start(shape.nats_nodes)?;
        let url = nats.url();
        let mut common = vec!["--nats-url".to_owned(), url.clone()];
        if shape.is_cluster() {
            common.extend(["--replicas".into(), shape.nats_nodes.to_string()]);
        }
        let service = |name: String, binary: &'static str, extra: Vec<String>| -> Result<Service> {
            Ok(Service {
                name,
                binary,
                args: common.iter().cloned().chain(extra).collect(),
                addr: free_addr()?,
                proc: None,
            })
        };
        let mut substations = Vec::new();
        for (i, capacity) in spec.capacities_kw.iter().enumerate() {
            let id = format!("s{}", i + 1);
            let extra = vec![
                "--id".into(),
                id.clone(),
                "--capacity-kw".into(),
                capacity.to_string(),
                "--time-scale".into(),
                spec.time_scale.to_string(),
            ];
            substations.push(service(id, "evgrid-substation", extra)?);
        }
        // One of one keeps its plain name, as in the single-replica scenarios' logs.
        let numbered = |role: &str, n: usize, i: usize| {
            if n == 1 {
                role.to_owned()
            } else {
                format!("{role}-{}", i + 1)
            }
        };
        let ingests = (0..shape.ingests)
            .map(|i| {
                service(
                    numbered("ingest", shape.ingests, i),
                    "evgrid-ingest",
                    // The faults are the subject here, not who may call.
                    vec!["--insecure-no-auth".to_owned()],
                )
            })
            .collect::<Result<_>>()?;
        let dispatchers = (0..shape.dispatchers)
            .map(|i| {
                let name = numbered("dispatcher", shape.dispatchers, i);
                service(name, "evgrid-dispatcher", vec![])
            })
            .collect::<Result<_>>()?;
        let mut grid = Self {
            nats,
            url,
            bins: spec.bins.clone(),
            logs: logs.to_path_buf(),
            ingests,
            dispatchers,
            substations,
            killed_nodes: Vec::new(),
        };
        for i in 0..grid.substations.len() {
            grid.start_service(Target::Substation(i)).await?;
        }
        let own = setup::connect(&grid.url).await?;
        setup::await_heartbeats(&own.js, grid.substations.len()).await?;
        for i in 0..grid.dispatchers.len() {
            grid.start_service(Target::Dispatcher(i)).await?;
        }
        for i in 0..grid.ingests.len() {
            grid.start_service(Target::Ingest(i)).await?;
        }
        Ok(grid)
    }

    /// Every ingest's base URL; each the same across its restarts.
    pub fn ingest_urls(&self) -> Vec<String> {
        self.ingests
            .iter()
            .map(|s| format!("http://{}", s.addr))
            .collect()
    }

    pub fn nats_url(&self) -> &str {
        &self.url
    }

    /// Substation ids, in order.
    pub fn substation_ids(&self) -> Vec<String> {
        self.substations.iter().map(|s| s.name.clone()).collect()
    }

    fn service(&mut self, target: Target) -> &mut Service {
        match target {
            Target::Ingest(i) => &mut self.ingests[i],
            Target::Dispatcher(i) => &mut self.dispatchers[i],
            Target::Substation(i) => &mut self.substations[i],
            Target::Nats | Target::RequestsLeader | Target::Cluster => {
                unreachable!("NATS is not a service")
            }
        }
    }

    /// Starts a service with its options and address, and waits until it is ready.
    async fn start_service(&mut self, target: Target) -> Result<()> {
        let (bins, logs) = (self.bins.clone(), self.logs.clone());
        let s = self.service(target);
        let program = binary_in(&bins, s.binary)?;
        let proc = Proc::spawn_http_at(&s.name, &program, s.args.clone(), s.addr, "/readyz", &logs)
            .await?;
        s.proc = Some(proc);
        Ok(())
    }

    /// kill -9. `js` finds the node leading `EV_REQUESTS` for [`Target::RequestsLeader`].
    pub async fn kill(
        &mut self,
        target: Target,
        js: &async_nats::jetstream::Context,
    ) -> Result<()> {
        match target {
            Target::Nats => match &mut self.nats {
                Nats::Single(s) => s.stop(),
                Nats::Cluster(_) => anyhow::bail!("the grid runs a cluster: kill a node"),
            },
            Target::RequestsLeader => {
                let leader = requests_leader(js).await?;
                let cluster = self.nats.cluster()?;
                let node = (0..cluster.size())
                    .find(|i| cluster.name(*i) == leader)
                    .with_context(|| format!("no node named {leader}"))?;
                cluster.kill(node);
                self.killed_nodes = vec![node];
            }
            Target::Cluster => {
                let cluster = self.nats.cluster()?;
                for i in 0..cluster.size() {
                    cluster.kill(i);
                }
                self.killed_nodes = (0..cluster.size()).collect();
            }
            _ => {
                let s = self.service(target);
                let mut proc = s
                    .proc
                    .take()
                    .with_context(|| format!("{} is not running", s.name))?;
                proc.kill()?;
            }
        }
        Ok(())
    }

    /// Starts a killed component again, as it was. Returns when it was started (the moment its
    /// recovery counts from); a service is also ready by the time this returns.
    pub async fn restart(&mut self, target: Target) -> Result<DateTime<Utc>> {
        let started = Utc::now();
        match target {
            Target::Nats => match &mut self.nats {
                Nats::Single(s) => s.restart()?,
                Nats::Cluster(_) => anyhow::bail!("the grid runs a cluster: restart a node"),
            },
            Target::RequestsLeader | Target::Cluster => {
                let nodes = std::mem::take(&mut self.killed_nodes);
                let cluster = self.nats.cluster()?;
                for i in nodes {
                    cluster.restart(i)?;
                }
                // Blocking, but nothing else of the suite runs meanwhile but the load, which
                // has its own tasks.
                tokio::task::block_in_place(|| cluster.wait_for_meta_leader(CLUSTER_ELECTION))?;
            }
            _ => self.start_service(target).await?,
        }
        Ok(started)
    }

    /// SIGSTOP (`freeze = true`) or SIGCONT.
    pub fn freeze(&mut self, target: Target, freeze: bool) -> Result<()> {
        let s = self.service(target);
        let proc = s
            .proc
            .as_ref()
            .with_context(|| format!("{} is not running", s.name))?;
        proc.signal(if freeze { "STOP" } else { "CONT" })
    }

    /// Fails when a service that should run has died (a crash the scenario did not cause).
    pub fn check_alive(&mut self) -> Result<()> {
        let services = self
            .ingests
            .iter_mut()
            .chain(self.dispatchers.iter_mut())
            .chain(self.substations.iter_mut());
        for s in services {
            if let Some(p) = s.proc.as_mut() {
                p.check_alive()?;
            }
        }
        Ok(())
    }
}

/// The server name of the cluster node leading `EV_REQUESTS`.
async fn requests_leader(js: &async_nats::jetstream::Context) -> Result<String> {
    let mut stream = js.get_stream(streams::REQUESTS).await?;
    let info = stream.info().await?;
    info.cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .context("EV_REQUESTS has no leader")
}
