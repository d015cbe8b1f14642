//! What `evgrid up` prints once everything runs: where each component is ([`Endpoints`]), what
//! the time scale means, and commands to try.

use std::net::SocketAddr;
use std::path::PathBuf;

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
    /// Why Prometheus is not on the port asked for, when it is not.
    pub prometheus_moved: Option<String>,
    /// With --chargers ocpp: each substation's OCPP URL and its simulated stations.
    pub ocpp: Vec<(String, String, usize)>,
}

/// What the banner says besides the endpoints.
pub(super) struct BannerNotes<'a> {
    /// How NATS keeps what it acknowledges: servers, replicas, fsync policy.
    pub(super) nats_store: String,
    pub(super) time_scale: f64,
    pub(super) log_file: Option<PathBuf>,
    pub(super) demo: Option<(&'a crate::demo::Demo, f64)>,
    /// The directory of the NATS users' passwords, when evgrid started NATS with users.
    pub(super) credentials: Option<PathBuf>,
    /// The file of the operator's API key, unless the API runs without keys.
    pub(super) api_key: Option<PathBuf>,
}

pub(super) fn print_banner(e: &Endpoints, notes: &BannerNotes) {
    let mut out = String::new();
    out.push_str("evgrid is up\n\n");
    out.push_str(&format!("  API (ingest)      http://{}\n", e.ingest));
    match &notes.api_key {
        Some(file) => out.push_str(&format!(
            "  API key           {} (operator: submit, read all); more with `evgrid api-key`\n",
            file.display()
        )),
        None => out.push_str(
            "  API key           none: anyone who reaches the API may submit and read everything\n",
        ),
    }
    out.push_str(&format!("  NATS              {}\n", e.nats_url));
    if let Some(m) = &e.nats_monitor {
        out.push_str(&format!("  NATS monitoring   {m}\n"));
    }
    out.push_str(&format!("  NATS store        {}\n", notes.nats_store));
    match &notes.credentials {
        Some(dir) => out.push_str(&format!(
            "  NATS users        a password per role in {}/: client (submits), observer\n                    (reads), operator (limits, streams); no anonymous access\n",
            dir.display()
        )),
        None => out.push_str("  NATS users        none: anyone who reaches NATS may publish anything\n"),
    }
    out.push_str(&format!(
        "  dispatcher        http://{}/metrics\n",
        e.dispatcher_metrics
    ));
    for (id, cap, addr) in &e.substations {
        out.push_str(&format!("  {id:<17} http://{addr}/metrics  ({cap} kW)\n"));
        if let Some((_, url, n)) = e.ocpp.iter().find(|(s, _, _)| s == id) {
            let label = format!("{id} OCPP");
            out.push_str(&format!("  {label:<17}  {url}  ({n} simulated stations)\n"));
        }
    }
    match &e.prometheus {
        Ok(url) => match &e.prometheus_moved {
            Some(why) => out.push_str(&format!("  Prometheus        {url}  ({why})\n")),
            None => out.push_str(&format!("  Prometheus        {url}\n")),
        },
        Err(why) => out.push_str(&format!("  Prometheus        not started: {why}\n")),
    }
    out.push_str(&format!(
        "  Time scale        {}x: {}\n",
        notes.time_scale,
        time_scale_meaning(notes.time_scale)
    ));
    if let Some((demo, rate)) = notes.demo {
        out.push_str(&format!(
            "  Demo              {rate:.1} requests/s from {}\n",
            demo.source()
        ));
    }
    match &notes.log_file {
        Some(path) => out.push_str(&format!("  Logs              {}\n", path.display())),
        None => out.push_str("  Logs              on stderr (--logs)\n"),
    }
    out.push_str("\nTry:\n");
    let bearer = match &notes.api_key {
        Some(file) => format!(" -H \"Authorization: Bearer $(cat {})\"", file.display()),
        None => String::new(),
    };
    out.push_str(&format!(
        "  curl -si -X POST http://{}/v1/charge-requests{bearer} \\\n       -H 'content-type: application/json' -d '{{\"vehicle_id\":\"ev-1\",\"energy_kwh\":30,\"max_power_kw\":11}}'\n",
        e.ingest
    ));
    out.push_str(&format!(
        "  curl -s http://{}/v1/substations{bearer}\n",
        e.ingest
    ));
    // The nats CLI as a client and as an observer (its --user/--password).
    let as_user = |user: &str| match &notes.credentials {
        Some(dir) => format!(
            " --user {user} --password \"$(cat {})\"",
            dir.join(user).display()
        ),
        None => String::new(),
    };
    out.push_str(&format!(
        "  nats -s {}{} pub ev.requests '{{\"vehicle_id\":\"ev-2\",\"energy_kwh\":20,\"max_power_kw\":7}}'\n",
        e.nats_url,
        as_user("client")
    ));
    out.push_str(&format!(
        "  nats -s {}{} sub 'ev.sessions.>'\n",
        e.nats_url,
        as_user("observer")
    ));
    out.push_str("\nCtrl-C stops everything.\n");
    println!("{out}");
}

/// How long a simulated hour of charging takes at `time_scale`, in words.
pub(super) fn time_scale_meaning(time_scale: f64) -> String {
    let real = 3600.0 / time_scale;
    let took = if real < 1.0 {
        format!("{:.0} ms", real * 1000.0)
    } else if real < 120.0 {
        format!("{real:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_owned()
            + " s"
    } else {
        format!("{:.1} min", real / 60.0)
    };
    format!("an hour of charging takes {took} of real time")
}
