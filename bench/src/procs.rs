//! The processes a benchmark runs: a fresh nats-server per measurement (the pinned release, free
//! ports, temporary store, via `evgrid-test-support`), the real service binaries of the
//! pipeline (ingest → dispatcher → substation) and the references, each a separate process on
//! loopback, and what `/proc` says about each (CPU time, peak RSS).
//!
//! Every process is killed when its handle drops, so a failed or interrupted benchmark leaves
//! nothing running.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use evgrid_test_support::NatsServer;

/// Clock ticks per second of `/proc/<pid>/stat` CPU times (`USER_HZ`, 100 on every Linux
/// build that matters here).
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;
/// How long a service may take from spawn to a 200 on its readiness endpoint.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The directory of the release binaries: the one this binary runs from
/// (`target/release/evgrid-bench` beside `evgrid-ingest`, `evgrid-dispatcher`, …).
pub fn bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this binary's path")?;
    Ok(exe
        .parent()
        .context("this binary has no directory")?
        .to_path_buf())
}

/// A binary beside this one, checked to exist (build it with `cargo build --release`).
pub fn sibling(name: &str) -> Result<PathBuf> {
    binary_in(&bin_dir()?, name)
}

/// The binary `name` in `dir`, checked to exist.
pub fn binary_in(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: run `cargo build --release` first",
            path.display()
        );
    }
    Ok(path)
}

/// A free loopback address for a child to listen on. The port is released before the child
/// binds it; nothing else on this machine races for ephemeral ports fast enough to matter.
pub fn free_addr() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("no free port")?;
    Ok(listener.local_addr()?)
}

/// A fresh nats-server (JetStream, file store in a temporary directory), with its pid for CPU
/// accounting. Killed on drop.
pub struct Nats {
    pub server: NatsServer,
    pid: Option<u32>,
}

impl Nats {
    pub fn start() -> Result<Self> {
        let server = NatsServer::start()?;
        let pid = server_pid(&server.store_dir());
        Ok(Self { server, pid })
    }

    pub fn url(&self) -> &str {
        self.server.url()
    }

    /// CPU seconds (user + system) the server has used so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        self.pid.and_then(cpu_seconds)
    }
}

/// nats-server names its ports file `<binary>_<pid>.ports`, next to the store directory
/// test-support gives it.
fn server_pid(store_dir: &Path) -> Option<u32> {
    let ports_dir = store_dir.parent()?.join("ports");
    std::fs::read_dir(ports_dir).ok()?.flatten().find_map(|e| {
        let name = e.file_name().into_string().ok()?;
        name.strip_suffix(".ports")?
            .rsplit('_')
            .next()?
            .parse()
            .ok()
    })
}

/// One child process (a service binary or a reference), its output in a log file. Killed on
/// drop.
pub struct Proc {
    pub name: String,
    child: Child,
    /// The HTTP address it serves (ops endpoints or the API), when it has one.
    pub http: Option<SocketAddr>,
}

impl Proc {
    /// Spawns `program args…`, stdout and stderr appended to `<logs>/<name>.log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], logs: &Path) -> Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join(format!("{name}.log")))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            http: None,
        })
    }

    /// Spawns a binary that serves HTTP on `--listen`, and waits until `ready_path` answers 200.
    pub async fn spawn_http(
        name: &str,
        program: &Path,
        args: Vec<String>,
        ready_path: &str,
        logs: &Path,
    ) -> Result<Self> {
        Self::spawn_http_at(name, program, args, free_addr()?, ready_path, logs).await
    }

    /// [`Proc::spawn_http`] on a given address: a restarted process serves where its clients
    /// already send.
    pub async fn spawn_http_at(
        name: &str,
        program: &Path,
        mut args: Vec<String>,
        addr: SocketAddr,
        ready_path: &str,
        logs: &Path,
    ) -> Result<Self> {
        args.extend(["--listen".into(), addr.to_string()]);
        let mut proc = Self::spawn(name, program, &args, logs)?;
        proc.http = Some(addr);
        proc.wait_ready(ready_path).await?;
        Ok(proc)
    }

    /// Spawns the release binary `binary` (beside this one), serving HTTP, and waits until its
    /// `/readyz` answers 200: how every evgrid service is started.
    pub async fn service(name: &str, binary: &str, args: Vec<String>, logs: &Path) -> Result<Self> {
        Self::spawn_http(name, &sibling(binary)?, args, "/readyz", logs).await
    }

    /// Readiness is only observable by asking: poll until 200, bounded.
    async fn wait_ready(&mut self, path: &str) -> Result<()> {
        let addr = self.http.context("no HTTP address")?;
        let url = format!("http://{addr}{path}");
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited with {status} before it was ready (see its log)",
                    self.name
                );
            }
            let ok = client
                .get(&url)
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{} not ready within {READY_TIMEOUT:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, as abrupt as a crash, and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Sends `signal` (a `kill -s` name such as `STOP` or `CONT`).
    pub fn signal(&self, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .args(["-s", signal, &self.pid().to_string()])
            .status()
            .context("cannot run kill")?;
        if !status.success() {
            bail!("kill -s {signal} {} failed: {status}", self.name);
        }
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds (user + system) used so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(self.pid())
    }

    /// Peak resident set size so far (`VmHWM`), in MB (10^6 bytes).
    pub fn peak_rss_mb(&self) -> Option<f64> {
        status_kib(self.pid(), "VmHWM").map(|kib| kib as f64 * 1024.0 / 1e6)
    }

    /// Whether it is still running (a crash mid-benchmark invalidates the figures).
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => bail!("{} exited with {status} (see its log)", self.name),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of a process, all threads, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis,
    // where utime and stime are the 12th and 13th.
    let after = &stat[stat.rfind(')')? + 2..];
    let mut fields = after.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / CLOCK_TICKS_PER_SECOND)
}

/// CPU seconds (user + system) of this process's children that have been waited for, such as
/// every finished `evgrid load` run (`cutime` + `cstime` of `/proc/self/stat`).
pub fn finished_children_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let mut fields = after.split_whitespace().skip(13);
    let cutime: f64 = fields.next()?.parse().ok()?;
    let cstime: f64 = fields.next()?.parse().ok()?;
    Some((cutime + cstime) / CLOCK_TICKS_PER_SECOND)
}

/// A `kB` field of `/proc/<pid>/status` (`VmHWM`, `VmRSS`).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// CPU seconds used by a set of processes between two readings, per request, in µs.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuMeter {
    before: Option<f64>,
}

impl CpuMeter {
    pub fn start(now: Option<f64>) -> Self {
        Self { before: now }
    }

    /// µs of CPU per unit of work since [`CpuMeter::start`].
    pub fn per(&self, now: Option<f64>, work: u64) -> Option<f64> {
        let used = now? - self.before?;
        (work > 0).then(|| used * 1e6 / work as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).is_some());
        assert!(finished_children_cpu_seconds().is_some());
        assert!(status_kib(pid, "VmHWM").unwrap() > 0);
        assert!(status_kib(pid, "VmNope").is_none());
    }

    #[test]
    fn cpu_per_request() {
        let meter = CpuMeter::start(Some(1.0));
        assert_eq!(meter.per(Some(3.0), 1_000_000), Some(2.0));
        assert_eq!(meter.per(Some(3.0), 0), None);
        assert_eq!(CpuMeter::start(None).per(Some(3.0), 1), None);
    }
}
