//! `evgrid up` as a user runs it: the built binary with a pinned nats-server on free ports comes
//! up, serves `/readyz`, completes a posted request, and leaves no process behind after SIGINT.
//! [`UpProcess`] runs it for other tests too (the live Prometheus of `observability`).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use evgrid_test_support::nats_server_bin;
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Live processes (id, command line) whose command line mentions `needle` (our temporary data
/// directory).
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let zombie =
            std::fs::read_to_string(entry.path().join("stat")).is_ok_and(|s| s.contains(") Z "));
        if cmdline.contains(needle) && !zombie {
            found.push((pid, cmdline));
        }
    }
    found
}

fn signal(which: &str, pid: u32) -> bool {
    std::process::Command::new("kill")
        .args([which, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// Where [`UpProcess`] keeps what `evgrid up` writes to stderr (its logs), in its data directory.
pub const STDERR_LOG: &str = "stderr.log";

/// The built `evgrid up` on free ports, in a temporary data directory, with what its banner
/// says. [`UpProcess::stop`] stops it as Ctrl-C does; dropped while running (a failing test),
/// it gets SIGINT, then whatever it started and left gets SIGKILL, so nothing outlives a test.
pub struct UpProcess {
    child: Child,
    /// The data directory, part of the command line of every process `evgrid up` starts.
    pub data_dir: String,
    /// Banner label (`API (ingest)`, `NATS`, `Prometheus`…) → the rest of its line.
    banner: BTreeMap<String, String>,
    data: Option<tempfile::TempDir>,
}

impl UpProcess {
    /// Starts `evgrid up` with `args` besides the free ports, data directory and pinned
    /// nats-server; returns once the banner is printed.
    pub async fn start(args: &[&str]) -> UpProcess {
        Self::start_with_env(args, &[]).await
    }

    /// [`UpProcess::start`] with environment variables set for it.
    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> UpProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_evgrid"));
        command.envs(env.iter().copied());
        Self::launch(command, args).await
    }

    /// [`UpProcess::start`] of the `evgrid` binary at `bin`, run from the directory `cwd`.
    pub async fn start_from(bin: &Path, cwd: &Path, args: &[&str]) -> UpProcess {
        let mut command = Command::new(bin);
        command.current_dir(cwd);
        Self::launch(command, args).await
    }

    async fn launch(mut command: Command, args: &[&str]) -> UpProcess {
        // Free ports everywhere, unless the test names one.
        let free_ports = [
            ("--nats-port", "0"),
            ("--metrics-base-port", "0"),
            ("--prometheus-port", "0"),
            ("--ingest-listen", "127.0.0.1:0"),
        ];
        let data = tempfile::tempdir().unwrap();
        let data_dir = data.path().to_str().unwrap().to_owned();
        let stderr = std::fs::File::create(data.path().join(STDERR_LOG)).unwrap();
        let mut child = command
            .arg("up")
            .args(
                free_ports
                    .iter()
                    .filter(|(flag, _)| !args.contains(flag))
                    .flat_map(|(f, v)| [f, v]),
            )
            .args(["--data-dir", &data_dir])
            .arg("--nats-server-bin")
            .arg(nats_server_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut up = UpProcess {
            child,
            data_dir,
            banner: BTreeMap::new(),
            data: Some(data),
        };
        // The banner lists `label   value` lines, then the "Try:" examples.
        loop {
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .expect("banner within 30 s")
                .unwrap()
                .expect("evgrid up exited before printing its banner");
            if line.trim() == "Try:" {
                break;
            }
            if let Some((label, value)) = line.trim().split_once("  ") {
                up.banner.insert(label.to_owned(), value.trim().to_owned());
            }
        }
        // Keep draining stdout (the live line) so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        up
    }

    /// An HTTP client of its ingest, with the operator key `evgrid up` made (`<data-dir>/api-key`,
    /// as the banner says).
    pub fn http(&self) -> reqwest::Client {
        let file = self.banner("API key").split(' ').next().unwrap();
        let key = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file}: {e}"));
        crate::pipeline::client_with_key(key.trim())
    }

    /// The value of a banner line, e.g. `banner("NATS")`.
    pub fn banner(&self, label: &str) -> &str {
        self.banner
            .get(label)
            .unwrap_or_else(|| panic!("no {label:?} in the banner: {:?}", self.banner))
    }

    /// SIGINT, as Ctrl-C: requires a clean exit with nothing left running; returns the data
    /// directory, kept until the caller drops it.
    /// A client of this grid's NATS (`servers`: its URL, or several) as `user`, with the
    /// password `evgrid up` keeps in the data directory.
    pub async fn connect_as(&self, servers: Vec<String>, user: &str) -> async_nats::Client {
        let path = Path::new(&self.data_dir).join("credentials").join(user);
        let password =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        async_nats::ConnectOptions::with_user_and_password(user.into(), password.trim().into())
            .connect(servers)
            .await
            .unwrap()
    }

    pub async fn stop(self) -> tempfile::TempDir {
        self.stop_within(Duration::from_secs(15)).await
    }

    /// [`UpProcess::stop`], requiring the exit within `limit` of the SIGINT.
    pub async fn stop_within(mut self, limit: Duration) -> tempfile::TempDir {
        assert!(signal("-INT", self.child.id().expect("still running")));
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("evgrid up stops within {limit:?} of SIGINT"))
            .unwrap();
        assert!(status.success(), "clean exit, got {status}");
        assert_eq!(
            processes_mentioning(&self.data_dir),
            Vec::<(u32, String)>::new(),
            "nothing left running"
        );
        self.data.take().expect("stopped once")
    }
}

impl Drop for UpProcess {
    fn drop(&mut self) {
        let Ok(None) = self.child.try_wait() else {
            return;
        };
        if let Some(pid) = self.child.id() {
            signal("-INT", pid);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while !processes_mentioning(&self.data_dir).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        for (pid, _) in processes_mentioning(&self.data_dir) {
            signal("-KILL", pid);
        }
    }
}

/// POSTs a small request for `vehicle` to the API and awaits its `completed` session event on
/// `client`; returns the request id.
async fn post_and_await_completion(
    http: &reqwest::Client,
    api: &str,
    client: &async_nats::Client,
    vehicle: &str,
) -> String {
    let mut completed = client.subscribe("ev.sessions.*.completed").await.unwrap();
    client.flush().await.unwrap();
    let body = serde_json::json!({"vehicle_id": vehicle, "energy_kwh": 5, "max_power_kw": 11});
    let id = crate::helpers::submit(http, api, body.to_string()).await;
    let done = tokio::time::timeout(Duration::from_secs(30), completed.next())
        .await
        .expect("the request completes within 30 s")
        .unwrap();
    let event: serde_json::Value = serde_json::from_slice(&done.payload).unwrap();
    assert_eq!(event["request_id"], id.as_str());
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_the_grid_completes_a_request_and_stops_cleanly_on_sigint() {
    // Debug logs of the services, as JSON: every line about the request names it.
    let up = UpProcess::start_with_env(
        &["--time-scale", "3600", "--logs"],
        &[
            ("EVGRID_LOG_FORMAT", "json"),
            (
                "RUST_LOG",
                "warn,evgrid_ingest=debug,evgrid_dispatcher=debug,evgrid_substation=debug",
            ),
        ],
    )
    .await;
    let (api, nats) = (up.banner("API (ingest)"), up.banner("NATS"));

    let http = up.http();
    crate::pipeline::wait_until_grid_is_up(&http, api, 3, Duration::from_secs(30)).await;

    // NATS has users: none without a password, and the observer follows the sessions.
    assert!(
        async_nats::connect(nats).await.is_err(),
        "an anonymous client got in"
    );
    let client = up.connect_as(vec![nats.to_owned()], "observer").await;
    let id = post_and_await_completion(&http, api, &client, "ev-up").await;
    drop(client);

    assert!(
        !processes_mentioning(&up.data_dir).is_empty(),
        "nats-server runs under the data dir"
    );
    let data = up.stop().await;
    assert!(
        data.path().join("nats").exists(),
        "the JetStream store is kept for the next run"
    );
    // The passwords, and the server configuration that holds them, are the owner's only.
    for private in ["credentials/observer", "run/evgrid-local.conf"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.path().join(private))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{private}");
    }

    // One grep follows the request through ingest, the dispatcher and the substation.
    let logs = std::fs::read_to_string(data.path().join(STDERR_LOG)).unwrap();
    let services: std::collections::BTreeSet<String> = logs
        .lines()
        .filter(|line| line.contains(&id))
        .map(|line| {
            let line: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            let target = line["target"].as_str().unwrap_or_default();
            target.split("::").next().unwrap_or_default().to_owned()
        })
        .collect();
    for service in ["evgrid_ingest", "evgrid_dispatcher", "evgrid_substation"] {
        assert!(
            services.contains(service),
            "no {service} log line names {id}: {services:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_a_3_node_cluster_replicates_everything_and_completes_a_request() {
    let up = UpProcess::start(&["--nats-cluster", "3", "--time-scale", "3600"]).await;
    let (api, nats) = (up.banner("API (ingest)"), up.banner("NATS"));
    let servers: Vec<String> = nats.split(',').map(str::to_owned).collect();
    assert_eq!(servers.len(), 3, "the banner names every server: {nats}");
    assert_eq!(up.banner("NATS monitoring").split(',').count(), 3);
    assert!(
        up.banner("NATS store")
            .starts_with("3 server(s), R3, fsync every 2m"),
        "{}",
        up.banner("NATS store")
    );

    let http = up.http();
    crate::pipeline::wait_until_grid_is_up(&http, api, 3, Duration::from_secs(60)).await;
    let client = up.connect_as(servers, "observer").await;
    post_and_await_completion(&http, api, &client, "ev-r3").await;

    // Everything evgrid created is on all three nodes.
    let js = async_nats::jetstream::new(client.clone());
    for name in ["EV_REQUESTS", "EV_DISPATCH", "KV_EV_REQUEST_STATE"] {
        let info = js
            .get_stream(name)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .clone();
        assert_eq!(info.config.num_replicas, 3, "{name}");
    }
    let requests = js.get_stream_no_info("EV_REQUESTS").await.unwrap();
    let mut dispatcher: async_nats::jetstream::consumer::PullConsumer =
        requests.get_consumer("dispatcher").await.unwrap();
    assert_eq!(dispatcher.info().await.unwrap().config.num_replicas, 3);
    drop(client);

    let data = up.stop().await;
    for node in ["n1", "n2", "n3"] {
        assert!(
            data.path().join("nats-cluster").join(node).exists(),
            "node {node} keeps its store in the data dir"
        );
    }
}
