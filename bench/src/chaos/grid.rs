//! The grid a chaos scenario runs against: one nats-server (the pinned build, via
//! `evgrid-test-support`), ingest, the dispatcher and the substations, each a separate process
//! of the real binaries on loopback, and what a fault does to them: kill -9, restart with the
//! same options (and, for ingest and nats-server, the same address and store), SIGSTOP/SIGCONT.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use evgrid_test_support::NatsServer;

use super::fault::Target;
use crate::procs::{Proc, binary_in, free_addr};
use crate::setup;

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

/// A running grid. Every process is killed when it drops.
pub struct LocalGrid {
    pub nats: NatsServer,
    bins: PathBuf,
    logs: PathBuf,
    ingest: Service,
    dispatcher: Service,
    substations: Vec<Service>,
}

impl LocalGrid {
    /// Starts nats-server, the substations (and waits for a heartbeat of each, so the
    /// dispatcher sees the whole grid at once), the dispatcher and ingest.
    pub async fn start(spec: &GridSpec, logs: &Path) -> Result<Self> {
        let nats = NatsServer::start()?;
        let url = nats.url().to_owned();
        let service = |name: &str, binary: &'static str, extra: Vec<String>| -> Result<Service> {
            let mut args = vec!["--nats-url".to_owned(), url.clone()];
            args.extend(extra);
            Ok(Service {
                name: name.to_owned(),
                binary,
                args,
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
            substations.push(service(&id, "evgrid-substation", extra)?);
        }
        let mut grid = Self {
            ingest: service("ingest", "evgrid-ingest", vec![])?,
            dispatcher: service("dispatcher", "evgrid-dispatcher", vec![])?,
            nats,
            bins: spec.bins.clone(),
            logs: logs.to_path_buf(),
            substations,
        };
        for i in 0..grid.substations.len() {
            grid.start_service(Target::Substation(i)).await?;
        }
        let own = setup::connect(&url).await?;
        setup::await_heartbeats(&own.js, grid.substations.len()).await?;
        grid.start_service(Target::Dispatcher).await?;
        grid.start_service(Target::Ingest).await?;
        Ok(grid)
    }

    /// Ingest's base URL; the same across its restarts.
    pub fn ingest_url(&self) -> String {
        format!("http://{}", self.ingest.addr)
    }

    pub fn nats_url(&self) -> &str {
        self.nats.url()
    }

    /// Substation ids, in order.
    pub fn substation_ids(&self) -> Vec<String> {
        self.substations.iter().map(|s| s.name.clone()).collect()
    }

    fn service(&mut self, target: Target) -> &mut Service {
        match target {
            Target::Ingest => &mut self.ingest,
            Target::Dispatcher => &mut self.dispatcher,
            Target::Substation(i) => &mut self.substations[i],
            Target::Nats => unreachable!("nats-server is not a service"),
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

    /// kill -9.
    pub fn kill(&mut self, target: Target) -> Result<()> {
        if target == Target::Nats {
            self.nats.stop();
            return Ok(());
        }
        let s = self.service(target);
        let mut proc = s
            .proc
            .take()
            .with_context(|| format!("{} is not running", s.name))?;
        proc.kill()
    }

    /// Starts a killed component again, as it was. Returns when it was started (the moment its
    /// recovery counts from); a service is also ready by the time this returns.
    pub async fn restart(&mut self, target: Target) -> Result<DateTime<Utc>> {
        if target == Target::Nats {
            self.nats.restart()?;
            return Ok(Utc::now());
        }
        let started = Utc::now();
        self.start_service(target).await?;
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
        let services = std::iter::once(&mut self.ingest)
            .chain(std::iter::once(&mut self.dispatcher))
            .chain(self.substations.iter_mut());
        for s in services {
            if let Some(p) = s.proc.as_mut() {
                p.check_alive()?;
            }
        }
        Ok(())
    }
}
