//! `--chargers ocpp`: the substation is the CSMS of charging stations run by a client no one
//! here wrote (the Python `ocpp` package, `stations.py`); dispatches are published as the
//! dispatcher would, and what the stations were told and metered is checked against what the
//! substation recorded.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use evgrid_model::messages::{Dispatch, RequestState, SessionEventKind, SessionReport};
use evgrid_ocpp::stations::Stations;
use evgrid_substation::Chargers;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout};

use crate::helpers::{Grid, Running, dispatch};

const PASSWORD: &str = "a-station-password-16+";
/// How long a whole fleet run may take.
const FLEET_WAIT: Duration = Duration::from_secs(20);

/// The Python stations, and what they print as they go.
struct Fleet {
    child: Child,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
    seen: Vec<Value>,
}

impl Fleet {
    /// Runs `stations.py` against `url` with `stations` (id, behaviour, walk-in token).
    fn start(url: &str, stations: &[(&str, &str, Option<&str>)], done_after: usize) -> Self {
        let specs: Vec<Value> = stations
            .iter()
            .map(|(id, behaviour, walk_in)| {
                let password = if id.starts_with("bad") {
                    "not-the-password-at-all"
                } else {
                    PASSWORD
                };
                json!({"id": id, "password": password, "behaviour": behaviour, "walk_in": walk_in})
            })
            .collect();
        let config = json!({
            "stations": specs, "time_scale": 3600.0, "meter_interval": 0.1,
            "max_w": 22000.0, "done_after": done_after,
        });
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sessions/stations.py");
        let mut child = tokio::process::Command::new(evgrid_test_support::python())
            .args([script, url, &config.to_string()])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs (scripts/install-test-deps installs ocpp and websockets)");
        let stdout = child.stdout.take().unwrap();
        Self {
            child,
            lines: BufReader::new(stdout).lines(),
            seen: Vec::new(),
        }
    }

    /// Reads what the stations print until a line for which `f` holds.
    async fn until(&mut self, f: impl Fn(&Value) -> bool) -> Value {
        let read = async {
            while let Some(line) = self.lines.next_line().await.unwrap() {
                let value: Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
                self.seen.push(value.clone());
                if f(&value) {
                    return value;
                }
            }
            panic!("the stations exited early: {:#?}", self.seen);
        };
        match tokio::time::timeout(FLEET_WAIT, read).await {
            Ok(value) => value,
            Err(_) => panic!("not seen within {FLEET_WAIT:?}; seen: {:#?}", self.seen),
        }
    }

    /// Waits for the stations to finish; everything they printed.
    async fn finish(mut self) -> Vec<Value> {
        self.until(|v| v["finished"] == true).await;
        let status = tokio::time::timeout(FLEET_WAIT, self.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "stations.py failed: {:#?}", self.seen);
        self.seen
    }
}

/// A substation `s1` with `--chargers ocpp`, the stations `ids` allowed in.
async fn substation(grid: &Grid, capacity_kw: f64, ids: &[&str]) -> (Running, String) {
    Running::start_ocpp(ocpp_config(grid, capacity_kw, ids)).await
}

fn ocpp_config(grid: &Grid, capacity_kw: f64, ids: &[&str]) -> evgrid_substation::Config {
    let lines: String = ids.iter().map(|id| format!("{id}:{PASSWORD}\n")).collect();
    let mut config = grid.config("s1", capacity_kw);
    config.chargers = Chargers::Ocpp;
    config.ocpp.ocpp_stations = Some(Stations::parse(&lines).unwrap());
    config
}

/// Replays the limits the stations were told, in the order they took them: the sum of the
/// TxProfile limits in force after each change (W), with the line it follows. A transaction's
/// limit stops counting when it ends.
fn sums_in_force(seen: &[Value]) -> Vec<(f64, usize)> {
    let mut in_force: BTreeMap<String, f64> = BTreeMap::new();
    let mut sums = Vec::new();
    for (i, v) in seen.iter().enumerate() {
        let station = v["station"].as_str().unwrap_or_default().to_owned();
        if v["purpose"] == "TxProfile" {
            in_force.insert(station, v["limit_w"].as_f64().unwrap());
        } else if v.get("ended").is_some() {
            in_force.remove(&station);
        } else {
            continue;
        }
        sums.push((in_force.values().sum(), i));
    }
    sums
}

fn for_vehicle<'a>(seen: &'a [Value], key: &str, vehicle: &str) -> &'a Value {
    seen.iter()
        .find(|v| v.get(key).is_some() && v["token"] == vehicle)
        .unwrap_or_else(|| panic!("no {key} for {vehicle}: {seen:#?}"))
}

#[tokio::test]
async fn dispatched_cars_and_walk_ins_charge_through_ocpp_transactions_within_capacity() {
    let grid = Grid::start().await;
    let mut events = grid
        .subscribe::<SessionReport>("ev.sessions.s1.>".to_owned())
        .await;
    let ids = ["st-1", "st-2", "st-3", "st-4"];
    let (substation, url) = substation(&grid, 30.0, &ids).await;
    let mut fleet = Fleet::start(
        &url,
        &[
            ("st-1", "obey", None),
            ("st-2", "obey", None),
            ("st-3", "obey", None),
            ("st-4", "obey", Some("walk-in-car")),
            ("bad-1", "obey", None),
        ],
        4,
    );
    let refused = fleet.until(|v| v.get("refused").is_some()).await;
    assert_eq!(refused["refused"], 401, "an unknown station is refused");
    for _ in 0..4 {
        fleet.until(|v| v["booted"] == true).await;
    }
    fleet.until(|v| v["started"].is_string()).await;
    // Three requests of 10 kWh; 30 kW for them and the walk-in: they share.
    let dispatches: Vec<Dispatch> = (0..3).map(|_| dispatch("s1", 10.0, 22.0)).collect();
    for d in &dispatches {
        grid.dispatch(d).await;
    }
    let seen = fleet.finish().await;

    for d in &dispatches {
        let reserved = for_vehicle(&seen, "reserved", &d.vehicle_id);
        let ended = for_vehicle(&seen, "ended", &d.vehicle_id);
        assert_eq!(reserved["station"], ended["station"]);
        let metered_kwh = ended["energy_wh"].as_f64().unwrap() / 1000.0;
        let record = grid.record(d.request_id).await;
        assert_eq!(record.state, RequestState::Completed);
        assert!(
            (record.energy_delivered_kwh - metered_kwh).abs() < 1e-6,
            "the record says {} kWh, the meter {metered_kwh}",
            record.energy_delivered_kwh
        );
        assert!(metered_kwh >= 10.0 - 1e-3, "{metered_kwh} kWh of 10");
    }
    // The walk-in was allocated power, and reported like any other session.
    let walk_in = for_vehicle(&seen, "started", "walk-in-car")["station"].clone();
    assert!(
        seen.iter()
            .any(|v| v["station"] == walk_in && v["purpose"] == "TxProfile"),
        "the walk-in's station got a limit"
    );
    let mut walk_in_events = Vec::new();
    while walk_in_events.len() < 3 {
        let e = events.next().await;
        if e.event.vehicle_id == "walk-in-car" {
            walk_in_events.push(e);
        }
    }
    let kinds: Vec<SessionEventKind> = walk_in_events.iter().map(|e| e.event.event).collect();
    assert_eq!(
        kinds,
        [
            SessionEventKind::Accepted,
            SessionEventKind::Started,
            SessionEventKind::Completed
        ]
    );
    let metered = for_vehicle(&seen, "ended", "walk-in-car")["energy_wh"]
        .as_f64()
        .unwrap();
    assert!((walk_in_events[2].event.energy_delivered_kwh - metered / 1000.0).abs() < 1e-6);
    let sums = sums_in_force(&seen);
    assert!(!sums.is_empty());
    for (sum, i) in sums {
        assert!(sum <= 30_000.0 + 1e-6, "{sum} W in force after {}", seen[i]);
    }
    substation.stop().await.unwrap();
}

#[tokio::test]
async fn a_station_that_ignores_its_limit_is_counted_at_its_most_and_the_others_give_way() {
    let grid = Grid::start().await;
    let (substation, url) = substation(&grid, 40.0, &["a", "b", "c"]).await;
    let mut fleet = Fleet::start(
        &url,
        &[
            ("a", "obey", None),
            ("b", "obey", None),
            ("c", "ignore", None),
        ],
        3,
    );
    for _ in 0..3 {
        fleet.until(|v| v["booted"] == true).await;
    }
    // Stations are reserved in id order: c, which ignores its limits, gets the last.
    let mut dispatches: Vec<Dispatch> = (0..2).map(|_| dispatch("s1", 30.0, 22.0)).collect();
    dispatches.push(dispatch("s1", 60.0, 22.0));
    for d in &dispatches {
        grid.dispatch(d).await;
        fleet
            .until(|v| v["reserved"] == d.vehicle_id.as_str())
            .await;
    }
    let seen = fleet.finish().await;
    // While c charges at its most, 22 kW, a and b share the 18 kW left: the limits they hold
    // when c is full and asked to stop (after that, c's end rightly gives them more).
    let c_full = seen
        .iter()
        .position(|v| v["stop_requested"] == "c-tx")
        .expect("c is stopped when its meter shows its energy");
    let mut last = BTreeMap::new();
    for v in &seen[..c_full] {
        let station = v["station"].as_str().unwrap_or_default();
        if v["purpose"] == "TxProfile" {
            last.insert(station, v["limit_w"].as_f64().unwrap());
        } else if v.get("ended").is_some() {
            // A car gone: its limit holds nothing any more.
            last.remove(station);
        }
    }
    let others = last.get("a").unwrap_or(&0.0) + last.get("b").unwrap_or(&0.0);
    assert!(
        others <= 18_000.0 + 1e-6,
        "a and b still allowed {others} W: {last:?}"
    );
    assert!(
        seen[..c_full]
            .iter()
            .any(|v| v["station"] == "c" && v["power_w"] == 22000.0)
    );
    for d in &dispatches {
        assert_eq!(
            grid.record(d.request_id).await.state,
            RequestState::Completed
        );
    }
    let (_, page) = substation.get("/metrics").await;
    let worst = crate::helpers::sample(&page, "evgrid_substation_ocpp_worst_case_total", "s1");
    assert!(worst.unwrap_or(0.0) >= 1.0, "{page}");
    substation.stop().await.unwrap();
}

#[tokio::test]
async fn an_operator_limit_reaches_every_station_in_one_round_and_a_dropped_station_resumes() {
    let grid = Grid::start().await;
    let (substation, url) = substation(&grid, 40.0, &["a", "b"]).await;
    let mut fleet = Fleet::start(&url, &[("a", "obey", None), ("b", "drop", None)], 2);
    for _ in 0..2 {
        fleet.until(|v| v["booted"] == true).await;
    }
    let dispatches: Vec<Dispatch> = (0..2).map(|_| dispatch("s1", 40.0, 22.0)).collect();
    for d in &dispatches {
        grid.dispatch(d).await;
    }
    // b drops its connection mid-transaction and comes back.
    fleet.until(|v| v["reconnected"] == true).await;
    fleet
        .until(|v| v["station"] == "a" && v.get("power_w").is_some())
        .await;
    let before = fleet.seen.len();
    grid.limit("s1", r#"{"capacity_kw": 20}"#).await;
    let seen = fleet.finish().await;

    let sums = sums_in_force(&seen);
    for &(sum, i) in &sums {
        assert!(
            sum <= 40_000.0 + 1e-6,
            "{sum} W in force after {}: {:#?}",
            seen[i],
            &seen[..=i]
        );
    }
    // After the limit, the first limit each station takes brings the sum within 20 kW (one
    // round), and no later one takes it above.
    let after: Vec<&Value> = seen[before..]
        .iter()
        .filter(|v| v["purpose"] == "TxProfile")
        .collect();
    let mut first = BTreeMap::new();
    for v in &after {
        first
            .entry(v["station"].as_str().unwrap())
            .or_insert(v["limit_w"].as_f64().unwrap());
    }
    assert_eq!(first.len(), 2, "both stations got a new limit: {after:#?}");
    assert!(first.values().sum::<f64>() <= 20_000.0 + 1e-6, "{first:?}");
    let settled = sums
        .iter()
        .position(|&(sum, i)| i >= before && sum <= 20_000.0 + 1e-6);
    for &(sum, i) in &sums[settled.expect("the limit is reached")..] {
        assert!(sum <= 20_000.0 + 1e-6, "{sum} W in force after {}", seen[i]);
    }
    for d in &dispatches {
        let ended = for_vehicle(&seen, "ended", &d.vehicle_id);
        let record = grid.record(d.request_id).await;
        assert_eq!(record.state, RequestState::Completed);
        let metered_kwh = ended["energy_wh"].as_f64().unwrap() / 1000.0;
        assert!((record.energy_delivered_kwh - metered_kwh).abs() < 1e-6);
    }
    assert!(seen.iter().any(|v| v["dropped"] == true));
    substation.stop().await.unwrap();
}

#[tokio::test]
async fn a_restarted_substation_takes_back_the_transactions_going_on() {
    let grid = Grid::start().await;
    let config = ocpp_config(&grid, 22.0, &["st-1"]);
    let (first, url) = Running::start_ocpp(config.clone()).await;
    // evgrid's own simulated station (it reconnects, and boots again when the CSMS asks).
    let (observer, mut events) = tokio::sync::mpsc::unbounded_channel();
    let stop = tokio_util::sync::CancellationToken::new();
    let sim = evgrid_ocpp::simulator::SimConfig {
        time_scale: 3600.0,
        meter_interval: Duration::from_millis(100),
        reserved_arrival_delay: Duration::from_millis(100),
        reconnect_delay: Duration::from_millis(100),
        ..evgrid_ocpp::simulator::SimConfig::new(
            format!("{url}/ocpp"),
            vec![("st-1".into(), PASSWORD.into())],
        )
    };
    let stations = tokio::spawn(evgrid_ocpp::simulator::run(
        sim,
        Some(observer),
        stop.clone(),
    ));
    // 40 kWh at 11 kW: about four seconds of charging.
    let d = dispatch("s1", 40.0, 11.0);
    grid.dispatch(&d).await;
    let charging = evgrid_test_support::eventually(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || async {
            let record = grid.try_record(d.request_id).await?;
            (record.energy_delivered_kwh > 2.0).then_some(record)
        },
    )
    .await
    .expect("the car charges at the station");
    assert!(charging.charger.is_some(), "{charging:?}");

    // A shutdown hands the session back; the next process serves the stations where they were.
    first.stop().await.unwrap();
    let (second, _) = Running::start_ocpp_at(config, url.trim_start_matches("ws://")).await;
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(evgrid_ocpp::simulator::SimEvent::Ended { energy_wh, .. }) =
                events.recv().await
            {
                return energy_wh;
            }
        }
    })
    .await
    .expect("the transaction ends: the request's energy is there");
    let record = evgrid_test_support::eventually(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || async {
            let record = grid.try_record(d.request_id).await?;
            (record.state == RequestState::Completed).then_some(record)
        },
    )
    .await
    .expect("the request completes");
    // The whole transaction's energy, before and after the restart, counted once, and no
    // walk-in made of the car the second process did not know.
    assert!(
        (record.energy_delivered_kwh - ended / 1000.0).abs() < 1e-6,
        "{record:?} against the meter's {ended} Wh"
    );
    assert!(record.energy_delivered_kwh >= 40.0 - 1e-3);
    let (_, page) = second.get("/metrics").await;
    let walk_ins = crate::helpers::sample(&page, "evgrid_substation_ocpp_walk_ins_total", "s1");
    assert_eq!(walk_ins, Some(0.0), "{page}");
    stop.cancel();
    stations.await.unwrap();
    second.stop().await.unwrap();
}
