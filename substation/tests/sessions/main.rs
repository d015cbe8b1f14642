//! Integration tests of the substation stage against a real nats-server: the test publishes
//! dispatches as the dispatcher would and watches what the substation reports.

mod attacks;
mod helpers;
mod ocpp;

use std::time::{Duration, Instant};

use evgrid_common::streams;
use evgrid_model::messages::{
    ChargeRequest, Move, RequestRecord, RequestState, SessionEventKind, SessionOutcome,
    SessionReport,
};
use helpers::{Grid, Running, WAIT, dispatch, sample};

#[tokio::test]
async fn a_dispatched_request_completes_and_is_acked() {
    let grid = Grid::start().await;
    let mut events = grid.events("s1").await;
    let mut heartbeats = grid.heartbeats("s1").await;
    // A consumer left by an older version, with another ack wait: brought up to date.
    let stale = async_nats::jetstream::consumer::pull::Config {
        ack_wait: Duration::from_secs(5),
        description: Some("old".into()),
        ..streams::substation_consumer("s1", 1)
    };
    let dispatches = grid.js.get_stream(streams::DISPATCH).await.unwrap();
    dispatches.create_consumer(stale).await.unwrap();
    let substation = Running::start(grid.config("s1", 150.0)).await;

    // 10 kWh at 10 kW: one simulated hour, one real second.
    let d = dispatch("s1", 10.0, 10.0);
    let seq = grid.dispatch(&d).await;

    let kinds: Vec<SessionEventKind> = [events.next().await, events.next().await]
        .iter()
        .inspect(|e| assert_eq!(e.request_id, d.request_id))
        .map(|e| e.event)
        .collect();
    assert_eq!(
        kinds,
        [SessionEventKind::Accepted, SessionEventKind::Started]
    );
    let beat = heartbeats.until(|h| h.dispatch_seq == seq).await;
    assert_eq!((beat.active_sessions, beat.load_kw), (1, 10.0));
    assert_eq!(beat.capacity_kw, 150.0);

    let completed = events.next().await;
    assert_eq!(completed.event, SessionEventKind::Completed);
    assert_eq!(completed.energy_delivered_kwh, 10.0);

    let record = grid.record(d.request_id).await;
    assert_eq!(record.state, RequestState::Completed);
    assert_eq!(record.energy_delivered_kwh, 10.0);
    assert_eq!(record.substation_id.as_deref(), Some("s1"));
    assert!(record.charging_started_at.is_some() && record.completed_at.is_some());
    let consumer = grid.all_acked("s1").await;
    assert_eq!(consumer.ack_floor.stream_sequence, seq);
    assert_eq!(consumer.config.ack_wait, streams::SUBSTATION_ACK_WAIT);

    let (status, _) = substation.get("/readyz").await;
    assert_eq!(status, 200);
    let (_, page) = substation.get("/metrics").await;
    let value = |name| sample(&page, name, "s1");
    assert_eq!(
        value("evgrid_substation_sessions_completed_total"),
        Some(1.0)
    );
    assert_eq!(value("evgrid_substation_sessions_started_total"), Some(1.0));
    assert_eq!(value("evgrid_substation_capacity_watts"), Some(150_000.0));
    assert_eq!(value("substation_current_load"), Some(0.0));
    assert_eq!(
        value("evgrid_request_accept_to_charging_seconds_count"),
        Some(1.0)
    );
    let joules = value("evgrid_substation_energy_delivered_joules_total").unwrap();
    assert!((joules - 10.0 * 3.6e6).abs() < 1.0, "{joules} J");

    substation.stop().await.unwrap();
}

#[tokio::test]
async fn more_demand_than_capacity_queues_and_never_overloads() {
    let grid = Grid::start().await;
    let mut events = grid.events("s1").await;
    let mut heartbeats = grid.heartbeats("s1").await;
    // 20 kW for five 11 kW cars: one draws 11, one is throttled to 9, three wait.
    let substation = Running::start(grid.config("s1", 20.0)).await;
    let cars: Vec<_> = (0..5).map(|_| dispatch("s1", 5.0, 11.0)).collect();
    for d in &cars {
        grid.dispatch(d).await;
    }

    let (mut completed, mut started) = (Vec::new(), Vec::new());
    let (mut beats, mut saturated_beats) = (0, 0);
    while completed.len() < cars.len() {
        tokio::select! {
            e = events.next() => match e.event {
                SessionEventKind::Started => started.push(e.at),
                SessionEventKind::Completed => completed.push(e),
                _ => {}
            },
            h = heartbeats.next() => {
                beats += 1;
                assert!(h.load_kw <= h.capacity_kw, "overload: {h:?}");
                if h.queued_sessions > 0 {
                    saturated_beats += 1;
                    assert_eq!(h.load_kw, 20.0, "capacity idle while cars wait: {h:?}");
                    assert!(h.demand_kw > h.capacity_kw);
                }
            }
        }
    }
    // By the events' times (a completion is announced once its state is stored, so the next
    // car's start may be published first): two cars drew power until one finished.
    let first_completion = completed.iter().map(|e| e.at).min().unwrap();
    let started_before = started.iter().filter(|at| **at < first_completion).count();
    assert_eq!(started_before, 2);
    assert_eq!(started.len(), 5);
    assert!(
        saturated_beats > 0,
        "no heartbeat saw the queue ({beats} beats)"
    );
    for d in &cars {
        let e = completed.iter().find(|e| e.request_id == d.request_id);
        assert_eq!(e.map(|e| e.energy_delivered_kwh), Some(5.0));
        assert_eq!(
            grid.record(d.request_id).await.state,
            RequestState::Completed
        );
    }
    grid.all_acked("s1").await;
    substation.stop().await.unwrap();
}

#[tokio::test]
async fn a_duplicate_dispatch_of_a_completed_request_is_skipped() {
    let grid = Grid::start().await;
    let mut events = grid.events("s1").await;
    let mut heartbeats = grid.heartbeats("s1").await;
    let substation = Running::start(grid.config("s1", 150.0)).await;

    let first = dispatch("s1", 1.0, 50.0);
    grid.dispatch(&first).await;
    events
        .until(|e| e.event == SessionEventKind::Completed)
        .await;
    grid.all_acked("s1").await;

    // The same assignment again, past the duplicate window (a new message id), then another
    // request: events are published in order, so the duplicate would show before it.
    let duplicate = grid.dispatch_with_id(&first, "replayed").await;
    let second = dispatch("s1", 1.0, 50.0);
    let second_seq = grid.dispatch(&second).await;
    let next = events.next().await;
    assert_eq!(
        (next.request_id, next.event),
        (second.request_id, SessionEventKind::Accepted)
    );
    events
        .until(|e| e.event == SessionEventKind::Completed)
        .await;
    let consumer = grid.all_acked("s1").await;
    assert_eq!(consumer.ack_floor.stream_sequence, second_seq);
    assert!(duplicate < second_seq);
    heartbeats.until(|h| h.dispatch_seq == second_seq).await;
    let record = grid.record(first.request_id).await;
    assert_eq!(
        (record.state, record.energy_delivered_kwh),
        (RequestState::Completed, 1.0)
    );
    let (_, page) = substation.get("/metrics").await;
    assert_eq!(
        sample(&page, "evgrid_substation_sessions_completed_total", "s1"),
        Some(2.0)
    );
    substation.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_interrupts_and_a_restart_resumes_the_session() {
    let grid = Grid::start().await;
    let mut events = grid.events("s1").await;
    let mut heartbeats = grid.heartbeats("s1").await;
    // 10 kWh at 10 kW at 360x: ten real seconds, so the shutdown lands mid-session.
    let slow = evgrid_substation::Config {
        time_scale: 360.0,
        ..grid.config("s1", 150.0)
    };
    let substation = Running::start(slow).await;
    let d = dispatch("s1", 10.0, 10.0);
    let seq = grid.dispatch(&d).await;
    events.until(|e| e.event == SessionEventKind::Started).await;
    // A few heartbeats later some energy is delivered.
    for _ in 0..4 {
        heartbeats.until(|h| h.dispatch_seq == seq).await;
    }
    substation.stop().await.unwrap();

    let interrupted = events.next().await;
    assert_eq!(interrupted.event, SessionEventKind::Interrupted);
    let so_far = interrupted.energy_delivered_kwh;
    assert!(so_far > 0.0 && so_far < 10.0, "{so_far} kWh");
    let record = grid.record(d.request_id).await;
    assert_eq!(
        (record.state, record.energy_delivered_kwh),
        (RequestState::Charging, so_far)
    );
    let consumer = grid.consumer("s1").await;
    assert_eq!(consumer.ack_floor.stream_sequence, 0, "message acked");

    // A new substation process on the same server resumes from the recorded energy.
    let restarted_at = Instant::now();
    let substation = Running::start(grid.config("s1", 150.0)).await;
    let accepted = events.next().await;
    let resume_latency = restarted_at.elapsed();
    assert_eq!(
        (accepted.event, accepted.energy_delivered_kwh),
        (SessionEventKind::Accepted, so_far)
    );
    assert!(
        resume_latency < Duration::from_secs(5),
        "resumed after {resume_latency:?}: the message was not handed back"
    );
    events
        .until(|e| e.event == SessionEventKind::Completed)
        .await;
    let record = grid.record(d.request_id).await;
    assert_eq!(
        (record.state, record.energy_delivered_kwh),
        (RequestState::Completed, 10.0)
    );
    let (_, page) = substation.get("/metrics").await;
    // Only what was left was delivered here.
    let joules = sample(
        &page,
        "evgrid_substation_energy_delivered_joules_total",
        "s1",
    )
    .unwrap();
    assert!(
        ((joules / 3.6e6) - (10.0 - so_far)).abs() < 1e-6,
        "{joules} J"
    );
    grid.all_acked("s1").await;
    substation.stop().await.unwrap();
}

/// The substation binary as a process of its own, killed (SIGKILL) when dropped.
struct Process(std::process::Child);

impl Process {
    fn start(grid: &Grid, id: &str, time_scale: &str) -> Self {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_evgrid-substation"))
            .args(["--nats-url", grid.server.url(), "--id", id])
            .args(["--capacity-kw", "150", "--time-scale", time_scale])
            .args(["--heartbeat-interval", "50ms", "--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("substation starts");
        Self(child)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_crashed_substation_gets_its_sessions_back_at_once_from_their_recorded_energy() {
    let grid = Grid::start().await;
    let mut events = grid.events("s1").await;
    // 10 kWh at 10 kW at 360x: ten real seconds, so the crash lands mid-session.
    let crashing = Process::start(&grid, "s1", "360");
    let d = dispatch("s1", 10.0, 10.0);
    grid.dispatch(&d).await;
    events.until(|e| e.event == SessionEventKind::Started).await;
    // The energy so far, checkpointed while the session charges (the `started` event may
    // come before the first state write is stored).
    let recorded = evgrid_test_support::eventually(WAIT, Duration::from_millis(20), || async {
        let record = grid.try_record(d.request_id).await?;
        (record.state == RequestState::Charging && record.energy_delivered_kwh > 0.0)
            .then_some(record.energy_delivered_kwh)
    })
    .await
    .expect("energy checkpointed while charging");

    // SIGKILL: no shutdown path, the session's message is still un-acked at the server.
    drop(crashing);
    let restarted_at = Instant::now();
    let _restarted = Process::start(&grid, "s1", "360");
    let resumed = events
        .until(|e| e.event == SessionEventKind::Accepted)
        .await;
    let resume_latency = restarted_at.elapsed();
    assert!(
        resumed.energy_delivered_kwh >= recorded,
        "resumed from {} kWh, {recorded} kWh were recorded",
        resumed.energy_delivered_kwh
    );
    // The ack wait bounds it (2 s; it was 30 s): far below, however slow the machine.
    assert!(
        resume_latency < Duration::from_secs(10),
        "resumed {resume_latency:?} after the restart"
    );
    events
        .until(|e| e.event == SessionEventKind::Completed)
        .await;
    let record = grid.record(d.request_id).await;
    assert_eq!(
        (record.state, record.energy_delivered_kwh),
        (RequestState::Completed, 10.0)
    );
    grid.all_acked("s1").await;
}

#[tokio::test]
async fn a_session_moved_away_while_cut_off_stops_charging_here() {
    let grid = Grid::start().await;
    let mut events = grid.events("s1").await;
    let mut heartbeats = grid.heartbeats("s1").await;
    // 10 kWh at 10 kW at 360x: ten real seconds.
    let slow = evgrid_substation::Config {
        time_scale: 360.0,
        ..grid.config("s1", 150.0)
    };
    let substation = Running::start(slow).await;
    let d = dispatch("s1", 10.0, 10.0);
    let seq = grid.dispatch(&d).await;
    events.until(|e| e.event == SessionEventKind::Started).await;

    // A dispatcher's failover moves it away as s1 charges: it fences s1's session record by
    // compare-and-set, as the dispatcher does (retried when s1's own checkpoint lands in
    // between).
    let key = evgrid_model::messages::session_state_key(d.request_id, "s1");
    let moved = evgrid_test_support::eventually(WAIT, Duration::from_millis(10), || async {
        let entry = grid.kv.entry(key.as_str()).await.unwrap().unwrap();
        let mut record: RequestRecord = serde_json::from_slice(&entry.value).unwrap();
        record.moved.push(Move {
            substation_id: "s1".into(),
            dispatch_seq: seq,
            state: record.state,
            energy_delivered_kwh: record.energy_delivered_kwh,
            moved_at: chrono::Utc::now(),
            reason: "no heartbeat from s1 for 10 s".into(),
        });
        record.state = RequestState::Queued;
        record.substation_id = None;
        let body = serde_json::to_vec(&record).unwrap().into();
        let stored = grid.kv.update(key.as_str(), body, entry.revision).await;
        stored.is_ok().then_some(record)
    })
    .await
    .expect("moved by compare-and-set");

    // s1's next write is refused: it stops charging it and lets the message go, writing
    // nothing more.
    heartbeats.until(|h| h.active_sessions == 0).await;
    grid.all_acked("s1").await;
    let (_, page) = substation.get("/metrics").await;
    assert_eq!(
        sample(&page, "evgrid_substation_sessions_fenced_total", "s1"),
        Some(1.0)
    );
    assert_eq!(grid.record(d.request_id).await, moved);
    substation.stop().await.unwrap();
    // Not even a shutdown writes it back.
    assert_eq!(grid.record(d.request_id).await, moved);
}

#[tokio::test]
async fn a_restart_does_not_extend_a_cars_stay() {
    let grid = Grid::start().await;
    let mut events = grid.events("s1").await;
    // 20 kWh at 10 kW, leaving one simulated hour after acceptance: at 360x, ten real seconds.
    let slow = evgrid_substation::Config {
        time_scale: 360.0,
        ..grid.config("s1", 150.0)
    };
    let substation = Running::start(slow).await;
    let mut d = dispatch("s1", 20.0, 10.0);
    d.departure = Some(d.accepted_at + chrono::Duration::hours(1));
    grid.dispatch(&d).await;
    events.until(|e| e.event == SessionEventKind::Started).await;
    substation.stop().await.unwrap();
    let so_far = events
        .until(|e| e.event == SessionEventKind::Interrupted)
        .await
        .energy_delivered_kwh;

    // The next process runs at 3600x: once a real second has passed since the dispatch, the
    // car's hour is over and it has left with what it got; it is not given another hour.
    let hour_at_3600x = (d.dispatched_at + chrono::Duration::seconds(1) - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(hour_at_3600x).await;
    let substation = Running::start(grid.config("s1", 150.0)).await;
    let completed = events
        .until(|e| e.event == SessionEventKind::Completed)
        .await;
    assert!(
        (completed.energy_delivered_kwh - so_far).abs() < 1e-6,
        "{} kWh delivered, {so_far} before the restart",
        completed.energy_delivered_kwh
    );
    let record = grid.record(d.request_id).await;
    assert_eq!(record.reason.as_deref(), Some("departed"));
    grid.all_acked("s1").await;
    substation.stop().await.unwrap();
}

#[tokio::test]
async fn a_request_another_substation_took_is_not_charged_here() {
    let grid = Grid::start().await;
    let mut events = grid.events("s1").await;
    let substation = Running::start(grid.config("s1", 150.0)).await;
    // Dispatched twice (past the dedupe window): s2 took it first and charges it.
    let twice = dispatch("s1", 10.0, 10.0);
    let at_s2 = RequestRecord {
        substation_id: Some("s2".into()),
        ..RequestRecord::new(
            twice.request_id,
            RequestState::Charging,
            &ChargeRequest {
                request_id: Some(twice.request_id),
                vehicle_id: twice.vehicle_id.clone(),
                energy_kwh: twice.energy_kwh,
                max_power_kw: twice.max_power_kw,
                departure: None,
                all_or_nothing: false,
            },
            twice.accepted_at,
            twice.accepted_at,
        )
    };
    grid.kv
        .put(
            twice.request_id.to_string(),
            serde_json::to_vec(&at_s2).unwrap().into(),
        )
        .await
        .unwrap();
    grid.dispatch(&twice).await;
    let other = dispatch("s1", 1.0, 10.0);
    grid.dispatch(&other).await;

    // Events are published in order: by the other request's completion, the first was handled.
    loop {
        let e = events.next().await;
        assert_ne!(e.request_id, twice.request_id, "charged here too: {e:?}");
        if e.request_id == other.request_id && e.event == SessionEventKind::Completed {
            break;
        }
    }
    grid.all_acked("s1").await;
    let record = grid.record(twice.request_id).await;
    assert_eq!(
        (record.state, record.substation_id.as_deref()),
        (RequestState::Charging, Some("s2"))
    );
    substation.stop().await.unwrap();
}

#[tokio::test]
async fn a_nats_restart_mid_session_does_not_stop_the_substation() {
    let mut grid = Grid::start().await;
    let mut events = grid.events("s1").await;
    let slow = evgrid_substation::Config {
        time_scale: 1800.0,
        ..grid.config("s1", 150.0)
    };
    let substation = Running::start(slow).await;
    let before = dispatch("s1", 10.0, 10.0);
    grid.dispatch(&before).await;
    events.until(|e| e.event == SessionEventKind::Started).await;

    grid.server.restart().unwrap();
    // A dispatch after the restart is taken too. Publish with a short ack timeout, so an
    // attempt lost while this client reconnects is retried at once.
    let after = dispatch("s1", 1.0, 10.0);
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(200))
        .build(grid.client.clone());
    let msg_id = format!("dispatch-{}", after.request_id);
    let seq = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(seq) = helpers::try_dispatch(&js, &after, &msg_id).await {
                return seq;
            }
        }
    })
    .await
    .expect("publish after the restart");
    for d in [&before, &after] {
        let record = evgrid_test_support::eventually(WAIT, Duration::from_millis(50), || async {
            let record = grid.try_record(d.request_id).await?;
            (record.state == RequestState::Completed).then_some(record)
        })
        .await
        .expect("completed after the restart");
        assert_eq!(record.energy_delivered_kwh, d.energy_kwh);
    }
    let consumer = grid.all_acked("s1").await;
    assert_eq!(consumer.ack_floor.stream_sequence, seq);
    substation.stop().await.unwrap();
}

#[tokio::test]
async fn a_car_leaves_at_its_departure_with_the_energy_it_got() {
    let grid = Grid::start().await;
    let mut completed = grid
        .subscribe::<SessionReport>("ev.sessions.s1.completed".into())
        .await;
    let substation = Running::start(grid.config("s1", 20.0)).await;
    // 20 kWh at 10 kW takes two simulated hours; the car leaves after one (a real second).
    let mut leaving = dispatch("s1", 20.0, 10.0);
    leaving.departure = Some(leaving.accepted_at + chrono::Duration::hours(1));
    // 1 kWh at 10 kW: done in six simulated minutes, well before it leaves.
    let staying = dispatch("s1", 1.0, 10.0);
    grid.dispatch(&leaving).await;
    grid.dispatch(&staying).await;

    let first = completed.next().await;
    assert_eq!(first.event.request_id, staying.request_id);
    assert_eq!(first.outcome, Some(SessionOutcome::Delivered));
    let left = completed.next().await;
    assert_eq!(left.event.request_id, leaving.request_id);
    assert_eq!(left.event.event, SessionEventKind::Completed);
    assert_eq!(left.outcome, Some(SessionOutcome::Departed));
    // It drew 10 kW from its arrival to its departure: 10 kWh of the 20 asked for.
    let got = left.event.energy_delivered_kwh;
    assert!((got - 10.0).abs() < 1e-6, "{got} kWh");

    let record = grid.record(leaving.request_id).await;
    assert_eq!(record.state, RequestState::Completed);
    assert_eq!(record.reason.as_deref(), Some("departed"));
    assert!((record.energy_delivered_kwh - 10.0).abs() < 1e-6);
    assert!(record.completed_at.is_some());
    let record = grid.record(staying.request_id).await;
    assert_eq!(
        (record.reason.as_deref(), record.energy_delivered_kwh),
        (Some("delivered"), 1.0)
    );
    grid.all_acked("s1").await;
    let (_, page) = substation.get("/metrics").await;
    assert_eq!(
        sample(&page, "evgrid_substation_sessions_departed_total", "s1"),
        Some(1.0)
    );
    assert_eq!(
        sample(&page, "evgrid_substation_sessions_completed_total", "s1"),
        Some(1.0)
    );
    substation.stop().await.unwrap();
}

#[tokio::test]
async fn a_best_effort_session_charges_its_expected_energy_and_completes_delivered() {
    let grid = Grid::start().await;
    let mut completed = grid
        .subscribe::<SessionReport>("ev.sessions.s1.completed".into())
        .await;
    let substation = Running::start(grid.config("s1", 20.0)).await;
    // 20 kWh asked at 10 kW, leaving in two simulated hours; the dispatcher expects 15 kWh (as
    // if it had waited half an hour): the session charges 15 and is done before the departure.
    let mut best_effort = dispatch("s1", 20.0, 10.0);
    best_effort.departure = Some(best_effort.accepted_at + chrono::Duration::hours(2));
    best_effort.energy_expected_kwh = Some(15.0);
    grid.dispatch(&best_effort).await;

    let done = completed.next().await;
    assert_eq!(done.event.request_id, best_effort.request_id);
    assert_eq!(done.outcome, Some(SessionOutcome::Delivered));
    assert!((done.event.energy_delivered_kwh - 15.0).abs() < 1e-6);
    assert_eq!(done.event.energy_kwh, 20.0, "the request as asked");
    let record = grid.record(best_effort.request_id).await;
    assert_eq!(
        (
            record.state,
            record.reason.as_deref(),
            record.energy_expected_kwh
        ),
        (RequestState::Completed, Some("delivered"), Some(15.0))
    );
    assert!((record.energy_delivered_kwh - 15.0).abs() < 1e-6);
    grid.all_acked("s1").await;
    substation.stop().await.unwrap();
}

#[tokio::test]
async fn a_grid_operator_limit_applies_at_once_reverts_and_survives_a_restart() {
    let grid = Grid::start().await;
    let mut telemetry = grid.telemetry("s1").await;
    let substation = Running::start(grid.config("s1", 100.0)).await;
    // Three cars wanting 150 kW for hours: the substation stays saturated.
    let mut last_seq = 0;
    for _ in 0..3 {
        last_seq = grid.dispatch(&dispatch("s1", 150.0, 50.0)).await;
    }
    let beat = telemetry
        .until(|t| t.heartbeat.dispatch_seq == last_seq)
        .await;
    assert_eq!(
        (beat.heartbeat.capacity_kw, beat.heartbeat.load_kw),
        (100.0, 100.0)
    );
    let projection = beat.projection.expect("heartbeats carry the projection");
    assert!(projection.remaining_kwh > 0.0);
    assert_eq!(beat.configured_capacity_kw, None);

    // Lowered: the next heartbeat already draws within the limit.
    grid.limit("s1", r#"{"capacity_kw": 40}"#).await;
    let limited = telemetry.until(|t| t.heartbeat.capacity_kw == 40.0).await;
    assert_eq!(limited.heartbeat.load_kw, 40.0);
    assert_eq!(limited.configured_capacity_kw, Some(100.0));
    assert_eq!(limited.limit_until, None);
    // Nonsense is logged, counted and ignored.
    grid.limit("s1", r#"{"capacity_kw": -5}"#).await;
    grid.limit("s1", "eighty please").await;
    let page = evgrid_test_support::eventually(WAIT, Duration::from_millis(20), || async {
        let (_, page) = substation.get("/metrics").await;
        page.contains(
            r#"evgrid_substation_limit_messages_total{outcome="invalid",substation="s1"} 2"#,
        )
        .then_some(page)
    })
    .await
    .expect("invalid limits counted");
    assert!(page.contains(
        r#"evgrid_substation_limit_messages_total{outcome="applied",substation="s1"} 1"#
    ));
    assert_eq!(
        sample(&page, "evgrid_substation_capacity_watts", "s1"),
        Some(40_000.0)
    );
    for _ in 0..3 {
        let t = telemetry.next().await;
        assert_eq!((t.heartbeat.capacity_kw, t.heartbeat.load_kw), (40.0, 40.0));
    }

    // A restarted substation applies the limit in force before it charges anything.
    substation.stop().await.unwrap();
    let substation = Running::start(grid.config("s1", 100.0)).await;
    let first = telemetry.until(|t| t.heartbeat.seq == 1).await;
    assert_eq!(first.heartbeat.capacity_kw, 40.0);
    let resumed = telemetry
        .until(|t| t.heartbeat.active_sessions + t.heartbeat.queued_sessions == 3)
        .await;
    assert_eq!(
        (resumed.heartbeat.capacity_kw, resumed.heartbeat.load_kw),
        (40.0, 40.0)
    );

    // Raised for a moment: back to the configured capacity when it ends.
    let until = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let body = format!(
        r#"{{"capacity_kw": 60, "until": "{}"}}"#,
        until.to_rfc3339()
    );
    grid.limit("s1", &body).await;
    let raised = telemetry.until(|t| t.heartbeat.capacity_kw == 60.0).await;
    assert_eq!(raised.heartbeat.load_kw, 60.0);
    assert!(raised.limit_until.is_some());
    let back = telemetry.until(|t| t.heartbeat.capacity_kw == 100.0).await;
    assert!(chrono::Utc::now() >= until);
    assert_eq!(back.heartbeat.load_kw, 100.0);
    assert_eq!(
        (back.configured_capacity_kw, back.limit_until),
        (None, None)
    );
    substation.stop().await.unwrap();
}

mod cli {
    use std::process::Stdio;

    use super::*;

    /// Runs the binary with `args` and no substation environment; (success, stdout, stderr).
    async fn run(args: &[&str]) -> (bool, String, String) {
        run_with_env(args, &[]).await
    }

    /// [`run`], with `env` set.
    async fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_evgrid-substation"));
        for var in [
            "SUBSTATION_ID",
            "SUBSTATION_CAPACITY_KW",
            "EVGRID_SUBSTATION_ID",
            "EVGRID_CAPACITY_KW",
            "EVGRID_TIME_SCALE",
            "EVGRID_HEARTBEAT_INTERVAL",
            "EVGRID_ALLOCATION",
            "EVGRID_LISTEN",
            "NATS_URL",
        ] {
            cmd.env_remove(var);
        }
        // An unreachable NATS: a binary that got past its config would wait for it, not exit.
        cmd.args([
            "--nats-url",
            "nats://127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
        let out = tokio::time::timeout(WAIT, cmd.output())
            .await
            .expect("exits without waiting for NATS")
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    #[tokio::test]
    async fn bad_config_exits_non_zero_with_one_line() {
        for (args, mentions) in [
            (&["--id", "s1", "--capacity-kw", "-5"][..], "greater than 0"),
            (
                &["--id", "s1", "--capacity-kw", "lots"][..],
                "greater than 0",
            ),
            (&[][..], "--id"),
            (&["--id", "a.b"][..], "not a substation id"),
            (
                &["--id", "s1", "--heartbeat-interval", "61m"][..],
                "duration",
            ),
            (&["--id", "s1", "--time-scale", "0"][..], "greater than 0"),
            (&["--id", "s1", "--allocation", "fifo"][..], "--allocation"),
        ] {
            let (ok, _, stderr) = run(args).await;
            assert!(!ok, "{args:?} accepted");
            let stderr = stderr.trim();
            assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
            assert!(stderr.contains(mentions), "{args:?}: {stderr}");
        }
    }

    #[tokio::test]
    async fn env_names_take_the_evgrid_prefix_and_old_ones_still_work_with_a_warning() {
        // A bad --time-scale stops the binary before NATS: the error is about the time scale
        // (not a missing --id), so the id was read.
        let scale = ["--time-scale", "0"];
        let (ok, _, stderr) = run_with_env(&scale, &[("EVGRID_SUBSTATION_ID", "s1")]).await;
        assert!(!ok);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("--time-scale"), "{stderr}");

        let (ok, _, stderr) = run_with_env(&scale, &[("SUBSTATION_ID", "s1")]).await;
        assert!(!ok);
        let lines: Vec<&str> = stderr.trim().lines().collect();
        assert_eq!(lines.len(), 2, "a warning, then the error: {stderr}");
        assert!(
            lines[0].contains("SUBSTATION_ID is deprecated")
                && lines[0].contains("EVGRID_SUBSTATION_ID"),
            "{stderr}"
        );
        assert!(lines[1].contains("--time-scale"), "{stderr}");

        // The old capacity reaches --capacity-kw (and is checked there).
        let old = [("SUBSTATION_CAPACITY_KW", "-5")];
        let (ok, _, stderr) = run_with_env(&["--id", "s1"], &old).await;
        assert!(!ok);
        assert!(
            stderr.contains("SUBSTATION_CAPACITY_KW is deprecated"),
            "{stderr}"
        );
        assert!(stderr.contains("--capacity-kw"), "{stderr}");
        let new = [("EVGRID_CAPACITY_KW", "-5")];
        let (ok, _, stderr) = run_with_env(&["--id", "s1"], &new).await;
        assert!(!ok);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("--capacity-kw"), "{stderr}");
    }

    #[tokio::test]
    async fn a_duration_without_a_unit_is_refused() {
        let args = ["--id", "s1", "--heartbeat-interval", "1"];
        let (ok, _, stderr) = run(&args).await;
        assert!(!ok);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("no unit") && stderr.contains("1s"),
            "{stderr}"
        );
    }

    #[tokio::test]
    async fn help_shows_every_option_with_its_env_and_default() {
        let (ok, help, _) = run(&["--help"]).await;
        assert!(ok);
        for text in [
            "--id",
            "EVGRID_SUBSTATION_ID",
            "--capacity-kw",
            "EVGRID_CAPACITY_KW",
            "default: 150",
            "--time-scale",
            "EVGRID_TIME_SCALE",
            "--heartbeat-interval",
            "EVGRID_HEARTBEAT_INTERVAL",
            "default: 1s",
            "--allocation",
            "EVGRID_ALLOCATION",
            "default: triage",
            "equal-share",
            "fcfs",
            "--listen",
            "EVGRID_LISTEN",
            "127.0.0.1:9102",
            "--nats-url",
            "NATS_URL",
            "--log-format",
        ] {
            assert!(help.contains(text), "--help lacks {text}:\n{help}");
        }
    }
}
