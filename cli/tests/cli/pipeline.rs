//! A whole pipeline per test: a real nats-server, ingest, dispatcher and substations running as
//! tasks (the same `run` functions the binaries call), on free ports.

use std::net::SocketAddr;
use std::time::Duration;

use evgrid::up::service_config;
use evgrid_test_support::{NatsServer, eventually};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::helpers::get_json;

pub struct Pipeline {
    pub nats: NatsServer,
    pub ingest: SocketAddr,
    /// The dispatcher's ops endpoint (`/metrics`, `/healthz`, `/readyz`).
    pub dispatcher: SocketAddr,
    /// An HTTP client of ingest: as the operator's key in a secured pipeline.
    pub http: reqwest::Client,
    /// The API keys of a secured pipeline.
    pub keys: Option<Keys>,
    pub substations: Vec<(String, f64)>,
    /// Each substation's ops endpoint, in the order of `substations`.
    pub substation_ops: Vec<SocketAddr>,
    /// Each substation's command line and its own stop (a child of `shutdown`), for restarts.
    substation_runs: Vec<(Vec<String>, CancellationToken)>,
    shutdown: CancellationToken,
    tasks: Vec<(String, JoinHandle<anyhow::Result<()>>)>,
}

pub struct Options<'a> {
    pub capacities: &'a [f64],
    pub time_scale: f64,
    pub heartbeat_interval: &'a str,
    pub dispatcher_args: &'a [&'a str],
    /// NATS with evgrid's roles (`evgrid_common::roles`): every service connects as its own
    /// user, with [`password`] of its user name; only the dispatcher manages the streams. And
    /// ingest with API keys ([`Keys`]), as `evgrid up` runs it.
    pub secured: bool,
}

/// The API keys of a secured pipeline, made with `evgrid api-key`'s code before ingest starts.
pub struct Keys {
    pub operator: String,
    /// Two clients with `submit,read`: the victim and the attacker of the attack tests.
    pub alice: String,
    pub mallory: String,
    /// `submit,read` at 5 requests a second.
    pub slow: String,
    _dir: tempfile::TempDir,
}

impl Keys {
    /// Makes the keys; returns them and the keys file.
    fn make() -> (Keys, std::path::PathBuf) {
        use evgrid_ingest::auth::{Rate, Scope, Scopes};
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("api-keys");
        let add = |name: &str, scopes: &[Scope], rate: Rate| {
            evgrid::api_key::add(&file, name, Scopes::of(scopes), rate).unwrap()
        };
        let client = [Scope::Submit, Scope::Read];
        let keys = Keys {
            operator: add("operator", &[Scope::Operator], Rate::Unlimited),
            alice: add("alice", &client, Rate::Unlimited),
            mallory: add("mallory", &client, Rate::Unlimited),
            slow: add("slow", &client, Rate::PerSecond(5.0)),
            _dir: dir,
        };
        (keys, file)
    }
}

/// An HTTP client that sends `key` with every request.
pub fn client_with_key(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {key}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

impl Default for Options<'_> {
    fn default() -> Self {
        Self {
            capacities: &[50.0, 100.0, 150.0],
            time_scale: 3600.0,
            heartbeat_interval: "200ms",
            dispatcher_args: &[],
            secured: false,
        }
    }
}

/// The test password of a role's user in a secured pipeline.
pub fn password(user: &str) -> String {
    format!("pw-{user}-test")
}

/// The nats-server configuration of a secured pipeline with substations `ids`: every role's
/// user, with [`password`].
fn roles_config(ids: &[String]) -> String {
    use evgrid_common::roles::{Role, User, authorization};
    let users: Vec<User> = Role::of_grid(ids)
        .into_iter()
        .map(|role| User {
            password: password(&role.user()),
            role,
        })
        .collect();
    authorization(&users)
}

fn words(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

impl Pipeline {
    pub async fn start(opts: Options<'_>) -> Pipeline {
        evgrid_common::telemetry::init_for_tests();
        let ids: Vec<String> = (1..=opts.capacities.len())
            .map(|i| format!("s{i}"))
            .collect();
        let nats = if opts.secured {
            NatsServer::start_configured(&roles_config(&ids)).unwrap()
        } else {
            NatsServer::start().unwrap()
        };
        let url = nats.url().to_owned();
        // The words that connect a service as `user` (none on an open server).
        let connect_as = |user: &str, manages_streams: bool| -> Vec<String> {
            let mut w = words(&["--nats-url", &url]);
            if opts.secured {
                w.extend(words(&[
                    "--nats-user",
                    user,
                    "--nats-password",
                    &password(user),
                ]));
                w.extend(words(&["--manage-streams", &manages_streams.to_string()]));
            }
            w
        };
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();

        let ingest_listener = listener().await;
        let ingest = ingest_listener.local_addr().unwrap();
        let mut ingest_words = connect_as("ingest", false);
        let keys = if opts.secured {
            let (keys, file) = Keys::make();
            ingest_words.extend(words(&["--api-keys", file.to_str().unwrap()]));
            Some(keys)
        } else {
            ingest_words.push("--insecure-no-auth".to_owned());
            None
        };
        let config: evgrid_ingest::Config = service_config(&ingest_words).unwrap();
        tasks.push((
            "ingest".to_owned(),
            tokio::spawn(evgrid_ingest::run(
                config,
                ingest_listener,
                shutdown.clone(),
            )),
        ));

        let mut dispatcher_words = connect_as("dispatcher", true);
        dispatcher_words.extend(words(opts.dispatcher_args));
        let config: evgrid_dispatcher::Config = service_config(&dispatcher_words).unwrap();
        let dispatcher_listener = listener().await;
        let dispatcher = dispatcher_listener.local_addr().unwrap();
        tasks.push((
            "dispatcher".to_owned(),
            tokio::spawn(evgrid_dispatcher::run(
                config,
                dispatcher_listener,
                shutdown.clone(),
            )),
        ));

        let mut substations = Vec::new();
        let mut substation_ops = Vec::new();
        let mut substation_runs = Vec::new();
        for (id, capacity) in ids.into_iter().zip(opts.capacities) {
            let mut args = connect_as(&format!("substation-{id}"), false);
            args.extend(words(&[
                "--id",
                &id,
                "--capacity-kw",
                &capacity.to_string(),
                "--time-scale",
                &opts.time_scale.to_string(),
                "--heartbeat-interval",
                opts.heartbeat_interval,
            ]));
            let stop = shutdown.child_token();
            let (ops, task) = start_substation(&args, stop.clone()).await;
            substation_ops.push(ops);
            tasks.push((id.clone(), task));
            substation_runs.push((args, stop));
            substations.push((id, *capacity));
        }

        let pipeline = Pipeline {
            nats,
            ingest,
            dispatcher,
            http: keys
                .as_ref()
                .map_or_else(reqwest::Client::new, |k| client_with_key(&k.operator)),
            keys,
            substations,
            substation_ops,
            substation_runs,
            shutdown,
            tasks,
        };
        pipeline.wait_until_grid_is_up().await;
        pipeline
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ingest)
    }

    async fn wait_until_grid_is_up(&self) {
        let api = format!("http://{}", self.ingest);
        wait_until_grid_is_up(
            &self.http,
            &api,
            self.substations.len(),
            Duration::from_secs(20),
        )
        .await;
    }

    /// Stops substation `i` as SIGTERM would (its sessions interrupted and handed back) and
    /// requires it to return `Ok` within 10 s. It stays stopped.
    pub async fn stop_substation(&mut self, i: usize) {
        self.substation_runs[i].1.cancel();
        let id = &self.substations[i].0;
        let at = self
            .tasks
            .iter()
            .position(|(name, _)| name == id)
            .expect("a running substation");
        let (name, task) = self.tasks.remove(at);
        let result = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap_or_else(|_| panic!("{name} did not stop within 10 s"))
            .unwrap_or_else(|e| panic!("{name} panicked: {e}"));
        result.unwrap_or_else(|e| panic!("{name} failed: {e:#}"));
    }

    /// [`Pipeline::stop_substation`], then starts it again and waits until the grid is whole.
    pub async fn restart_substation(&mut self, i: usize) {
        self.stop_substation(i).await;
        let name = self.substations[i].0.clone();
        let (args, stop) = &mut self.substation_runs[i];
        *stop = self.shutdown.child_token();
        let (ops, task) = start_substation(args, stop.clone()).await;
        self.substation_ops[i] = ops;
        self.tasks.push((name, task));
        self.wait_until_grid_is_up().await;
    }

    /// Stops every service as SIGTERM would and requires each to return `Ok` within 10 s.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for (name, task) in self.tasks {
            let result = tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .unwrap_or_else(|_| panic!("{name} did not stop within 10 s of shutdown"))
                .unwrap_or_else(|e| panic!("{name} panicked: {e}"));
            if let Err(e) = result {
                panic!("{name} failed: {e:#}");
            }
        }
    }
}

/// Starts a substation with `args` on a free ops port until `stop`.
async fn start_substation(
    args: &[String],
    stop: CancellationToken,
) -> (SocketAddr, JoinHandle<anyhow::Result<()>>) {
    let config: evgrid_substation::Config = service_config(args).unwrap();
    let ops_listener = listener().await;
    let ops = ops_listener.local_addr().unwrap();
    (
        ops,
        tokio::spawn(evgrid_substation::run(config, ops_listener, stop)),
    )
}

/// Waits until the ingest at `api` is ready and its live view shows `substations` substations
/// `up`, for at most `within`.
pub async fn wait_until_grid_is_up(
    http: &reqwest::Client,
    api: &str,
    substations: usize,
    within: Duration,
) {
    eventually(within, Duration::from_millis(50), || async {
        let ready = http
            .get(format!("{api}/readyz"))
            .send()
            .await
            .ok()?
            .status()
            .is_success();
        let view = get_json(http, &format!("{api}/v1/substations")).await?;
        let up = view
            .as_array()?
            .iter()
            .filter(|s| s["status"] == "up")
            .count();
        (ready && up == substations).then_some(())
    })
    .await
    .unwrap_or_else(|_| {
        panic!("the grid is not ready with {substations} substations up within {within:?}")
    });
}
