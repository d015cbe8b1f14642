//! The dispatcher end to end on a real nats-server per test. The tests play the other stages:
//! they publish requests to `ev.requests` as ingest or `nats pub` would, and act as substations
//! (heartbeats on `ev.telemetry.<id>`, watching `ev.dispatch.>`).

mod attacks;
mod helpers;
mod live_grid;

use std::collections::{BTreeMap, HashSet};
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::Utc;
use evgrid_common::streams;
use evgrid_dispatcher::Policy;
use evgrid_model::headers;
use evgrid_model::messages::{RequestRecord, RequestState, request_id_from_sequence};
use futures::{FutureExt, StreamExt};
use helpers::{
    WAIT, header, next_dispatch, spawn_app, spawn_app_configured, spawn_app_with, start_dispatcher,
};
use uuid::Uuid;

pub(crate) fn request(id: Uuid, energy_kwh: f64, max_power_kw: f64) -> String {
    format!(
        r#"{{"request_id":"{id}","vehicle_id":"ev-{id}","energy_kwh":{energy_kwh},"max_power_kw":{max_power_kw}}}"#
    )
}

pub(crate) async fn state_bucket(app: &helpers::TestApp) -> kv::Store {
    app.js
        .get_key_value(streams::REQUEST_STATE_BUCKET)
        .await
        .unwrap()
}

/// The request's state as readers see it: the dispatcher's record, or the session record of
/// the substation it names.
pub(crate) async fn record(app: &helpers::TestApp, id: Uuid) -> Option<RequestRecord> {
    streams::read_request(&state_bucket(app).await, id)
        .await
        .unwrap()
}

/// The next state a watch on the request-state bucket sees, within [`WAIT`].
async fn next_record(watch: &mut kv::Watch) -> RequestRecord {
    let entry = tokio::time::timeout(WAIT, watch.next())
        .await
        .expect("a state in time")
        .unwrap()
        .unwrap();
    serde_json::from_slice(&entry.value).unwrap()
}

#[tokio::test]
async fn a_raw_request_without_id_is_dispatched_under_its_derived_id() {
    let mut app = spawn_app().await;
    let mut dispatches = app.subscribe("ev.dispatch.>").await;
    app.substation("s1", 100.0).heartbeat(0.0, 0).await;

    let seq = app
        .publish_request(r#"{"vehicle_id":"ev-1","energy_kwh":30,"max_power_kw":11}"#)
        .await;

    let got = next_dispatch(&mut dispatches).await;
    let id = request_id_from_sequence(seq);
    assert_eq!(got.subject, "ev.dispatch.s1");
    assert_eq!(got.dispatch.request_id, id);
    assert_eq!(got.dispatch.request_seq, seq);
    assert_eq!(got.dispatch.vehicle_id, "ev-1");
    assert_eq!(
        header(&got.headers, "Nats-Msg-Id"),
        Some(format!("dispatch-{id}"))
    );
    assert_eq!(
        header(&got.headers, headers::REQUEST_ID),
        Some(id.to_string())
    );
    let accepted_at = header(&got.headers, headers::ACCEPTED_AT).expect("accepted-at carried");
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(&accepted_at).unwrap(),
        got.dispatch.accepted_at
    );
    app.wait_until_all_settled().await;
    // Recorded as dispatched (a new state: created) before the request was acked.
    let recorded = record(&app, id).await.expect("state recorded");
    assert_eq!(
        (recorded.state, recorded.substation_id.as_deref()),
        (RequestState::Dispatched, Some("s1"))
    );

    app.wait_for_metric(
        r#"evgrid_dispatch_decisions_total{outcome="dispatched",substation="s1"} 1"#,
    )
    .await;
    app.wait_for_metric("evgrid_substations_up 1").await;
    let metrics = app.metrics().await;
    assert!(metrics.contains(r#"evgrid_substation_heartbeat_age_seconds{substation="s1"}"#));
    assert!(metrics.contains("evgrid_dispatch_decision_duration_seconds_count"));
    assert!(metrics.contains("evgrid_dispatch_publish_ack_duration_seconds_count 1"));
    assert!(metrics.contains("evgrid_dispatch_consumer_ack_pending_messages"));
    app.stop().await;
}

#[tokio::test]
async fn invalid_requests_are_rejected_and_the_pipeline_keeps_going() {
    let mut app = spawn_app().await;
    let mut rejected = app.subscribe("ev.rejected").await;
    let mut dispatches = app.subscribe("ev.dispatch.>").await;
    app.substation("s1", 50.0).heartbeat(0.0, 0).await;

    let (passed_id, late_id, good_id) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let hour_ago = (Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let in_an_hour = (Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("not_json", b"\x00\xffcharge me".to_vec()),
        // A field name with a line break must not break the reject headers.
        (
            "invalid_fields",
            br#"{"vehicle_id":"","energy_kwh":30,"max_power_kw":11,"colour\r\n":"red"}"#.to_vec(),
        ),
        (
            "departure_passed",
            format!(
                r#"{{"request_id":"{passed_id}","vehicle_id":"ev-p","energy_kwh":30,"max_power_kw":11,"departure":"{hour_ago}"}}"#
            )
            .into_bytes(),
        ),
        // 100 kWh at 11 kW is 9 h; the car leaves in 1 h, and wants all or nothing.
        (
            "undeliverable",
            format!(
                r#"{{"request_id":"{late_id}","vehicle_id":"ev-u","energy_kwh":100,"max_power_kw":11,"departure":"{in_an_hour}","all_or_nothing":true}}"#
            )
            .into_bytes(),
        ),
    ];
    let mut sent = BTreeMap::new();
    for (reason, body) in &bodies {
        let seq = app.publish_request(body.clone()).await;
        sent.insert(reason.to_string(), (seq, body.clone()));
    }
    app.publish_request(request(good_id, 30.0, 11.0)).await;

    let mut seen = BTreeMap::new();
    for _ in 0..bodies.len() {
        let msg = tokio::time::timeout(WAIT, rejected.next())
            .await
            .expect("a rejection in time")
            .unwrap();
        let h = msg.headers.clone().unwrap();
        let reason = header(&h, headers::REJECT_REASON).unwrap();
        let (seq, body) = &sent[&reason];
        assert_eq!(
            msg.payload.as_ref(),
            body.as_slice(),
            "{reason}: original payload"
        );
        assert_eq!(
            header(&h, headers::SOURCE_SUBJECT).as_deref(),
            Some("ev.requests")
        );
        assert_eq!(header(&h, headers::SOURCE_SEQUENCE), Some(seq.to_string()));
        let detail = header(&h, headers::REJECT_DETAIL).unwrap();
        assert!(!detail.is_empty(), "{reason}: detail");
        let id = header(&h, headers::REQUEST_ID).expect("request id");
        seen.insert(reason, (id, detail));
    }
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        [
            "departure_passed",
            "invalid_fields",
            "not_json",
            "undeliverable"
        ]
    );
    assert!(seen["invalid_fields"].1.contains("vehicle_id"));
    assert!(seen["departure_passed"].1.contains("departure"));
    assert_eq!(seen["departure_passed"].0, passed_id.to_string());
    assert_eq!(seen["undeliverable"].0, late_id.to_string());
    assert_eq!(
        seen["not_json"].0,
        request_id_from_sequence(sent["not_json"].0).to_string()
    );

    // The valid request behind them is still dispatched.
    let got = next_dispatch(&mut dispatches).await;
    assert_eq!(got.dispatch.request_id, good_id);

    // Terminated, not waiting for redelivery; states recorded where the fields parsed.
    app.wait_until_all_settled().await;
    for (id, reason) in [(passed_id, "departure_passed"), (late_id, "undeliverable")] {
        let r = record(&app, id).await.expect("rejected state recorded");
        assert_eq!(r.state, RequestState::Rejected);
        assert_eq!(r.reason.as_deref(), Some(reason));
        assert!(r.rejected_at.is_some());
    }
    let not_json_id: Uuid = seen["not_json"].0.parse().unwrap();
    assert!(record(&app, not_json_id).await.is_none());
    for reason in [
        "not_json",
        "invalid_fields",
        "departure_passed",
        "undeliverable",
    ] {
        app.wait_for_metric(&format!(
            r#"evgrid_dispatch_rejected_total{{reason="{reason}"}} 1"#
        ))
        .await;
    }
    app.stop().await;
}

#[tokio::test]
async fn a_car_leaving_before_its_energy_fits_gets_what_fits() {
    let mut app = spawn_app().await;
    let mut dispatches = app.subscribe("ev.dispatch.>").await;
    app.substation("s1", 50.0).heartbeat(0.0, 0).await;
    let id = Uuid::new_v4();
    let in_an_hour = (Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    // 100 kWh at 11 kW is 9 h; in the hour it has the car takes 11 kWh.
    app.publish_request(format!(
        r#"{{"request_id":"{id}","vehicle_id":"ev-b","energy_kwh":100,"max_power_kw":11,"departure":"{in_an_hour}"}}"#
    ))
    .await;

    let got = next_dispatch(&mut dispatches).await.dispatch;
    assert_eq!(got.request_id, id);
    assert_eq!(got.energy_kwh, 100.0, "the request as asked");
    let expected = got.energy_expected_kwh.expect("best effort");
    assert!((10.9..11.0).contains(&expected), "{expected}");
    assert_eq!(got.energy_target_kwh(), expected);
    app.wait_until_all_settled().await;
    let r = record(&app, id).await.expect("dispatched state recorded");
    assert_eq!(r.state, RequestState::Dispatched);
    assert_eq!(
        (r.energy_kwh, r.energy_expected_kwh),
        (100.0, Some(expected))
    );
    app.stop().await;
}

#[tokio::test]
async fn a_request_waits_queued_until_a_substation_is_up() {
    let mut app = spawn_app().await;
    let mut dispatches = app.subscribe("ev.dispatch.>").await;
    let id = Uuid::new_v4();
    let mut state = state_bucket(&app)
        .await
        .watch(id.to_string())
        .await
        .unwrap();

    app.publish_request(request(id, 20.0, 11.0)).await;

    let queued = next_record(&mut state).await;
    assert_eq!(queued.state, RequestState::Queued);
    assert_eq!(queued.request_id, id);
    // Deferred (that is what wrote the state) and nothing up to send it to.
    assert!(dispatches.next().now_or_never().is_none());

    app.substation("late", 22.0).heartbeat(0.0, 0).await;
    let got = next_dispatch(&mut dispatches).await;
    assert_eq!(got.dispatch.request_id, id);
    assert_eq!(got.subject, "ev.dispatch.late");
    // No substation process runs here, yet the state says where the request went: `queued`
    // moved on by compare-and-set.
    let dispatched = next_record(&mut state).await;
    assert_eq!(
        (dispatched.state, dispatched.substation_id.as_deref()),
        (RequestState::Dispatched, Some("late"))
    );
    assert_eq!(dispatched.dispatched_at, Some(got.dispatch.dispatched_at));
    app.wait_until_all_settled().await;
    app.stop().await;
}

#[tokio::test]
async fn a_redelivery_of_a_request_already_taken_is_acked_without_deciding_again() {
    let mut app = spawn_app().await;
    let kv = state_bucket(&app).await;
    // Nothing is up: both requests are deferred (delivery 1 writes `queued`). One of them
    // leaves soon, so its next delivery would be rejected as `departure_passed`.
    let plain = Uuid::new_v4();
    let leaving = Uuid::new_v4();
    let departure = Utc::now() + chrono::Duration::milliseconds(1500);
    app.publish_request(request(plain, 20.0, 11.0)).await;
    app.publish_request(format!(
        r#"{{"request_id":"{leaving}","vehicle_id":"ev-2","energy_kwh":1,"max_power_kw":11,"departure":"{}"}}"#,
        departure.to_rfc3339()
    ))
    .await;
    for id in [plain, leaving] {
        let mut state = kv.watch_with_history(id.to_string()).await.unwrap();
        let queued = next_record(&mut state).await;
        assert_eq!(queued.state, RequestState::Queued);
        // What an earlier delivery's dispatch leads to, when only its ack was lost: the
        // dispatcher recorded it dispatched to s1, and s1 records its session charging.
        let at_s1 = |state| RequestRecord {
            state,
            substation_id: Some("s1".into()),
            ..queued.clone()
        };
        for (key, record) in [
            (id.to_string(), at_s1(RequestState::Dispatched)),
            (
                evgrid_model::messages::session_state_key(id, "s1"),
                at_s1(RequestState::Charging),
            ),
        ] {
            kv.put(key, serde_json::to_vec(&record).unwrap().into())
                .await
                .unwrap();
        }
    }
    // Past the departure, and a substation up: deciding again would reject one request and
    // dispatch the other a second time.
    tokio::time::sleep_until(
        tokio::time::Instant::now() + (departure - Utc::now()).to_std().unwrap_or_default(),
    )
    .await;
    app.substation("s2", 100.0).heartbeat(0.0, 0).await;
    app.wait_until_all_settled().await;

    assert_eq!(app.dispatch_stream_messages().await, 0, "dispatched again");
    let mut rejected = app.js.get_stream(streams::REJECTED).await.unwrap();
    let rejected = rejected.info().await.unwrap().state.messages;
    assert_eq!(rejected, 0, "rejected while charging");
    for id in [plain, leaving] {
        let now = record(&app, id).await.unwrap();
        assert_eq!(
            (now.state, now.substation_id.as_deref()),
            (RequestState::Charging, Some("s1"))
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn a_failed_substations_requests_move_to_one_with_room_once() {
    // Two dispatchers share the consumer, so both offer the moves: each request still moves once.
    let mut app = spawn_app_configured(|c| c.substation_timeout = Duration::from_secs(1)).await;
    let (second_addr, second_stop, _second) =
        helpers::start_dispatcher_configured(&app.nats, |c| {
            c.substation_timeout = Duration::from_secs(1)
        })
        .await;
    let kv = state_bucket(&app).await;
    let mut dispatches = app.subscribe("ev.dispatch.>").await;
    let mut interrupted = app.subscribe("ev.sessions.s1.interrupted").await;
    let mut s1 = app.substation("s1", 100.0);
    s1.interval_ms = 200;
    s1.heartbeat(0.0, 0).await;
    let waiting = Uuid::new_v4();
    let charging = Uuid::new_v4();
    for id in [waiting, charging] {
        app.publish_request(request(id, 20.0, 11.0)).await;
        let got = next_dispatch(&mut dispatches).await;
        assert_eq!(got.subject, "ev.dispatch.s1");
    }
    // s1 took one and charged 4.5 kWh of it; then it falls silent. (The dispatcher records
    // `dispatched` just after the dispatch is stored, so wait for that first.)
    let mut record_at_s1 =
        evgrid_test_support::eventually(WAIT, Duration::from_millis(10), || async {
            record(&app, charging).await
        })
        .await
        .expect("dispatched state");
    // Where a substation records its session: its own key, `<request id>.s1`.
    record_at_s1.state = RequestState::Charging;
    record_at_s1.energy_delivered_kwh = 4.5;
    let s1_session = evgrid_model::messages::session_state_key(charging, "s1");
    kv.put(
        s1_session.as_str(),
        serde_json::to_vec(&record_at_s1).unwrap().into(),
    )
    .await
    .unwrap();
    let silent_since = std::time::Instant::now();
    app.substation("s2", 100.0).heartbeat(0.0, 0).await;

    let mut moved = std::collections::HashMap::new();
    for _ in 0..2 {
        let got = next_dispatch(&mut dispatches).await;
        assert_eq!(got.subject, "ev.dispatch.s2");
        let id = got.dispatch.request_id;
        let msg_id = header(&got.headers, "Nats-Msg-Id").unwrap_or_default();
        assert!(
            msg_id.starts_with(&format!("dispatch-{id}-after-")),
            "{msg_id}"
        );
        moved.insert(id, got);
    }
    tracing::info!(moved_after = ?silent_since.elapsed(), "both moved");
    assert!(moved.contains_key(&waiting) && moved.contains_key(&charging));
    app.wait_until_all_settled().await;
    // Offered by both dispatchers, moved once: no third dispatch.
    assert!(dispatches.next().now_or_never().is_none());
    assert_eq!(app.dispatch_stream_messages().await, 4);

    let now = record(&app, charging).await.unwrap();
    assert_eq!(
        (
            now.state,
            now.substation_id.as_deref(),
            now.energy_delivered_kwh
        ),
        (RequestState::Dispatched, Some("s2"), 4.5),
        "{now:?}"
    );
    assert_eq!(now.moved.len(), 1);
    assert_eq!(now.moved[0].substation_id, "s1");
    assert_eq!(now.moved[0].state, RequestState::Charging);
    assert_eq!(now.moved[0].energy_delivered_kwh, 4.5);
    // s1's session record is fenced: it names no substation, so s1's next write is refused
    // and, read, tells it the request moved on.
    let fence: RequestRecord =
        serde_json::from_slice(&kv.get(s1_session.as_str()).await.unwrap().unwrap()).unwrap();
    assert_eq!(
        (fence.state, fence.substation_id, fence.moved.len()),
        (RequestState::Queued, None, 1)
    );
    let other = record(&app, waiting).await.unwrap();
    assert_eq!(
        (
            other.state,
            other.substation_id.as_deref(),
            other.moved.len()
        ),
        (RequestState::Dispatched, Some("s2"), 1)
    );
    // The charging session is announced interrupted on s1's behalf, with what it got there.
    let event = tokio::time::timeout(WAIT, interrupted.next())
        .await
        .expect("interrupted event")
        .unwrap();
    let report: evgrid_model::messages::SessionReport =
        serde_json::from_slice(&event.payload).unwrap();
    assert_eq!(
        (report.event.request_id, report.event.energy_delivered_kwh),
        (charging, 4.5)
    );
    // Counted by whichever dispatcher moved it.
    let line = r#"evgrid_dispatch_moved_total{from="s1",state="charging"} 1"#;
    let pages = [
        app.metrics().await,
        helpers::http_get(second_addr, "/metrics").await.1,
    ];
    assert_eq!(pages.iter().filter(|p| p.contains(line)).count(), 1);
    second_stop.cancel();
    app.stop().await;
}

#[tokio::test]
async fn a_grid_silent_as_a_whole_fails_nobody_and_one_silent_alone_fails() {
    // Every heartbeat stops at once, as when NATS is away (a cluster restarted whole): that
    // silence is not the substations', and moving their cars would be for nothing.
    let timeout = Duration::from_secs(1);
    let mut app = spawn_app_configured(|c| c.substation_timeout = timeout).await;
    let mut dispatches = app.subscribe("ev.dispatch.>").await;
    let mut grid = [app.substation("s1", 100.0), app.substation("s2", 100.0)];
    for s in &mut grid {
        s.interval_ms = 200;
        s.heartbeat(0.0, 0).await;
    }
    let id = Uuid::new_v4();
    app.publish_request(request(id, 20.0, 11.0)).await;
    let first = next_dispatch(&mut dispatches).await;
    let (held, other) = if first.subject == "ev.dispatch.s1" {
        (0, 1)
    } else {
        (1, 0)
    };
    evgrid_test_support::eventually(WAIT, Duration::from_millis(10), || async {
        record(&app, id)
            .await
            .filter(|r| r.state == RequestState::Dispatched)
    })
    .await
    .expect("dispatched state");
    // The outage: twice the timeout without any heartbeat (the fault under test is time
    // passing, not a wait for an event).
    tokio::time::sleep(2 * timeout).await;
    // Back: both heartbeat again, for longer than the timeout.
    let back = tokio::time::Instant::now();
    while back.elapsed() < timeout + Duration::from_millis(500) {
        for s in &mut grid {
            s.heartbeat(0.0, 0).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let now = record(&app, id).await.unwrap();
    assert!(
        now.moved.is_empty(),
        "moved after a silence of all: {now:?}"
    );
    assert!(
        dispatches.next().now_or_never().is_none(),
        "dispatched again"
    );

    // The same substation silent alone, while the other is heard: failed, its request moved.
    let moved = loop {
        grid[other].heartbeat(0.0, 0).await;
        if let Ok(Some(msg)) =
            tokio::time::timeout(Duration::from_millis(200), dispatches.next()).await
        {
            break msg;
        }
        assert!(back.elapsed() < WAIT * 2, "never moved");
    };
    assert_eq!(
        moved.subject.as_str(),
        format!("ev.dispatch.s{}", other + 1)
    );
    let now = record(&app, id).await.unwrap();
    assert_eq!(now.moved.len(), 1, "{now:?}");
    assert_eq!(now.moved[0].substation_id, format!("s{}", held + 1));
    app.stop().await;
}

#[tokio::test]
async fn a_burst_is_spread_and_the_excess_waits_for_room() {
    const REQUESTS: usize = 300;
    // Headroom judges room, and defers when there is none.
    let mut app = spawn_app_with(Policy::Headroom).await;
    let mut dispatches = app.subscribe("ev.dispatch.>").await;
    let mut substations = [
        app.substation("s1", 100.0),
        app.substation("s2", 200.0),
        app.substation("s3", 300.0),
    ];
    for s in &mut substations {
        s.heartbeat(0.0, 0).await;
    }
    // A substation takes 11 kW requests while its headroom is above zero: ceil(capacity / 11).
    let fits: usize = substations
        .iter()
        .map(|s| (s.capacity_kw / 11.0).ceil() as usize)
        .sum();
    assert_eq!(fits, 57);

    app.publish_requests((0..REQUESTS).map(|_| request(Uuid::new_v4(), 10.0, 11.0)))
        .await;

    let mut dispatched: HashSet<Uuid> = HashSet::new();
    let mut round = 0;
    while dispatched.len() < REQUESTS {
        round += 1;
        let expected = fits.min(REQUESTS - dispatched.len());
        let mut per_substation: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..expected {
            let got = next_dispatch(&mut dispatches).await;
            assert!(
                dispatched.insert(got.dispatch.request_id),
                "dispatched twice"
            );
            *per_substation
                .entry(got.dispatch.substation_id)
                .or_default() += 1;
        }
        if expected == fits {
            let total_capacity: f64 = substations.iter().map(|s| s.capacity_kw).sum();
            for s in &substations {
                let share = fits as f64 * s.capacity_kw / total_capacity;
                let n = per_substation.get(&s.id).copied().unwrap_or(0) as f64;
                assert!(
                    n <= 1.2 * share,
                    "round {round}: {} got {n}, fair share {share:.1}",
                    s.id
                );
            }
        }
        if round == 1 {
            // Heartbeats that echo nothing (the cars have not arrived yet) free nothing: the
            // pending assignments still count, so several defer cycles pass without a dispatch.
            for s in &mut substations {
                s.heartbeat(0.0, 0).await;
            }
            let quiet =
                tokio::time::timeout(helpers::TEST_DEFER_DELAY * 5, dispatches.next()).await;
            assert!(quiet.is_err(), "dispatched beyond the headroom");
        }
        // Every substation took what it was sent and finished charging: room again.
        let taken = dispatched.len() as u64;
        for s in &mut substations {
            s.heartbeat(0.0, taken).await;
        }
    }
    assert_eq!(round, REQUESTS.div_ceil(fits));
    app.wait_until_all_settled().await;
    assert_eq!(app.dispatch_stream_messages().await, REQUESTS as u64);
    app.stop().await;
}

#[tokio::test]
async fn replicas_count_each_others_sends_and_spread_a_burst_like_one() {
    const REQUESTS: usize = 300;
    let mut app = spawn_app_with(Policy::Headroom).await;
    let (_, second_stop, _second) =
        helpers::start_dispatcher_configured(&app.nats, |c| c.policy = Policy::Headroom).await;
    let mut dispatches = app.subscribe("ev.dispatch.>").await;
    let mut substations = [
        app.substation("s1", 100.0),
        app.substation("s2", 200.0),
        app.substation("s3", 300.0),
    ];
    for s in &mut substations {
        s.heartbeat(0.0, 0).await;
    }
    // What one dispatcher sends before the next heartbeat (see the test above).
    let fits = 57;

    // A stream of requests rather than one instant burst: two replicas deciding the same
    // instant cannot see each other's sends (over-sending there is only ever queued at a
    // substation, which never exceeds its capacity); a few milliseconds apart they do.
    for _ in 0..REQUESTS / 3 {
        app.publish_request(request(Uuid::new_v4(), 10.0, 11.0))
            .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // No heartbeat frees room: what is sent is all the burst gets until then.
    let mut senders = HashSet::new();
    let mut per_substation: BTreeMap<String, usize> = BTreeMap::new();
    while let Ok(Some(msg)) =
        tokio::time::timeout(helpers::TEST_DEFER_DELAY * 10, dispatches.next()).await
    {
        let dispatch: evgrid_model::messages::Dispatch =
            serde_json::from_slice(&msg.payload).unwrap();
        *per_substation.entry(dispatch.substation_id).or_default() += 1;
        senders.insert(header(
            &msg.headers.unwrap_or_default(),
            headers::DISPATCHER,
        ));
    }
    let sent: usize = per_substation.values().sum();
    // Counting only its own sends, each replica would fill every substation: twice `fits`
    // (all 100 requests here). A loaded machine delays the replicas' view of each other a
    // little, hence the margin.
    assert!(
        (fits..=fits * 3 / 2).contains(&sent),
        "{sent} sent by {} replicas ({per_substation:?}), room for {fits}",
        senders.len()
    );
    assert_eq!(senders.len(), 2, "both replicas dispatched");
    second_stop.cancel();
    app.stop().await;
}

#[tokio::test]
async fn the_same_request_twice_is_dispatched_once() {
    let mut app = spawn_app().await;
    let mut dispatches = app.subscribe("ev.dispatch.>").await;
    app.substation("s1", 100.0).heartbeat(0.0, 0).await;
    let id = Uuid::new_v4();
    // Published raw without Nats-Msg-Id: both copies are stored in EV_REQUESTS.
    let first = app.publish_request(request(id, 30.0, 11.0)).await;
    let second = app.publish_request(request(id, 30.0, 11.0)).await;
    assert_ne!(first, second);

    assert_eq!(next_dispatch(&mut dispatches).await.dispatch.request_id, id);
    app.wait_until_all_settled().await;
    assert_eq!(app.dispatch_stream_messages().await, 1);
    app.stop().await;
}

#[tokio::test]
async fn shutdown_finishes_in_flight_work_and_another_instance_takes_over() {
    const REQUESTS: usize = 2000;
    let mut app = spawn_app().await;
    let mut dispatches = app.subscribe("ev.dispatch.>").await;
    app.substation("big", 400.0 * REQUESTS as f64)
        .heartbeat(0.0, 0)
        .await;
    app.publish_requests((0..REQUESTS).map(|_| request(Uuid::new_v4(), 10.0, 11.0)))
        .await;
    next_dispatch(&mut dispatches).await;
    // Stop mid-stream: it returns Ok after finishing the publishes and acks it holds, and
    // hands back what it buffered, so the next instance needs no AckWait to take over.
    app.stop().await;
    assert!(app.dispatch_stream_messages().await < REQUESTS as u64);

    let (_addr, shutdown, handle) = start_dispatcher(&app.nats).await;
    app.wait_until_all_settled().await;
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    // Every request dispatched, none twice.
    assert_eq!(app.dispatch_stream_messages().await, REQUESTS as u64);
}

#[tokio::test]
async fn dispatching_resumes_after_a_nats_restart() {
    let mut app = spawn_app().await;
    let mut substation = app.substation("s1", 100.0);
    substation.heartbeat(0.0, 0).await;
    let mut dispatches = app.subscribe("ev.dispatch.>").await;
    let before = Uuid::new_v4();
    app.publish_request(request(before, 10.0, 11.0)).await;
    assert_eq!(
        next_dispatch(&mut dispatches).await.dispatch.request_id,
        before
    );

    app.nats.restart().expect("nats-server restarts");
    // Retry quickly while our own client reconnects (its subscriptions are restored).
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(300))
        .build(app.client.clone());
    let after = Uuid::new_v4();
    let body = request(after, 10.0, 11.0);
    evgrid_test_support::eventually(WAIT, Duration::from_millis(50), || {
        let (js, body) = (js.clone(), body.clone());
        async move {
            js.publish("ev.requests", body.into())
                .await
                .ok()?
                .await
                .ok()
        }
    })
    .await
    .expect("request stored after the restart");
    // A SIGKILLed server may forget the last ack and deliver `before` again: the dispatcher
    // publishes it again, JetStream drops the duplicate, but a core subscriber sees it.
    loop {
        let id = next_dispatch(&mut dispatches).await.dispatch.request_id;
        if id == after {
            break;
        }
        assert_eq!(id, before);
    }
    // A core subscriber may see the dispatch before the stream has stored it: await the count.
    let js = app.js.clone();
    evgrid_test_support::eventually(WAIT, Duration::from_millis(20), || {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream(streams::DISPATCH).await.ok()?;
            let messages = stream.info().await.ok()?.state.messages;
            (messages == 2).then_some(())
        }
    })
    .await
    .expect("both dispatches stored, once each");
    assert_eq!(app.dispatch_stream_messages().await, 2);
    app.stop().await;
}

#[tokio::test]
async fn what_a_frozen_replica_was_handed_goes_to_another_within_its_ack_wait() {
    // A dispatcher process, frozen (SIGSTOP) with requests handed to it: its connection and
    // pull request stay open, so only the ack wait takes them back for another replica.
    let mut app = spawn_app_with(Policy::Headroom).await;
    app.stop().await;
    let mut frozen = std::process::Command::new(env!("CARGO_BIN_EXE_evgrid-dispatcher"))
        .args(["--nats-url", app.nats.url(), "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = frozen.id().to_string();
    let signal = |sig: &str| {
        let done = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(done.success(), "kill {sig}");
    };
    // Pulling (the consumer may not exist until it starts).
    evgrid_test_support::eventually(WAIT, Duration::from_millis(20), || async {
        let consumer = helpers::dispatcher_consumer(&app.js).await.ok()?;
        (consumer.num_waiting >= 1).then_some(())
    })
    .await
    .expect("the replica pulls");
    signal("-STOP");
    let mut dispatches = app.subscribe("ev.dispatch.>").await;
    app.substation("s1", 1000.0).heartbeat(0.0, 0).await;
    app.publish_requests((0..20).map(|_| request(Uuid::new_v4(), 10.0, 11.0)))
        .await;
    // All handed to the frozen one (the only puller).
    evgrid_test_support::eventually(WAIT, Duration::from_millis(20), || async {
        (app.dispatcher_consumer().await.num_ack_pending == 20).then_some(())
    })
    .await
    .expect("handed to the frozen replica");

    let (_, stop, _replica) = start_dispatcher(&app.nats).await;
    let started = std::time::Instant::now();
    for _ in 0..20 {
        next_dispatch(&mut dispatches).await;
    }
    let all_in = started.elapsed();
    signal("-CONT");
    signal("-KILL");
    frozen.wait().unwrap();
    stop.cancel();
    // The 30 s ack wait of old held them that long. Now each is taken back after 1 s, and the
    // frozen replica's pull request, which could take a redelivery again, expires within 2 s
    // (about 2 s for all of them here; the bound leaves room for a loaded machine).
    assert!(
        all_in < Duration::from_secs(15),
        "all dispatched after {all_in:?}"
    );
}

#[test]
fn bad_config_exits_non_zero_with_one_line() {
    let bin = env!("CARGO_BIN_EXE_evgrid-dispatcher");
    // Arguments, environment, and the option the one line must name.
    let cases = [
        (vec!["--defer-delay", "soon"], None, "--defer-delay"),
        (vec!["--defer-delay", "1"], None, "--defer-delay"),
        (vec!["--max-in-flight", "0"], None, "--max-in-flight"),
        (vec!["--policy", "fastest"], None, "--policy"),
        (vec![], Some(("EVGRID_POLICY", "random")), "--policy"),
        (vec!["--listen", "nowhere"], None, "--listen"),
        (vec![], Some(("EVGRID_DEFER_DELAY", "-1s")), "--defer-delay"),
    ];
    for (args, env, names) in cases {
        let mut command = Command::new(bin);
        command.args(&args);
        if let Some((key, value)) = env {
            command.env(key, value);
        }
        let out = command.output().expect("binary runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} {env:?} succeeded");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(names), "{args:?}: {stderr}");
    }

    let help = Command::new(bin).arg("--help").output().unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for expected in [
        "NATS_URL",
        "EVGRID_REPLICAS",
        "EVGRID_LISTEN",
        "EVGRID_MAX_IN_FLIGHT",
        "EVGRID_DEFER_DELAY",
        "EVGRID_POLICY",
        "[default: predictive]",
        "round-robin",
        "least-loaded",
        "p2c",
        "headroom",
        "EVGRID_LOG_FORMAT",
        "[default: 1s]",
        "[default: 127.0.0.1:9101]",
    ] {
        assert!(help.contains(expected), "--help lacks {expected}:\n{help}");
    }
}

#[test]
fn old_env_names_still_work_for_one_release_with_a_warning() {
    let bin = env!("CARGO_BIN_EXE_evgrid-dispatcher");
    for (old, new, flag) in [
        (
            "EVGRID_DISPATCH_DEFER_DELAY",
            "EVGRID_DEFER_DELAY",
            "--defer-delay",
        ),
        (
            "EVGRID_DISPATCH_MAX_IN_FLIGHT",
            "EVGRID_MAX_IN_FLIGHT",
            "--max-in-flight",
        ),
    ] {
        // A bad value under the old name is refused by its option: the old name is read.
        let out = Command::new(bin)
            .env(old, "-1s")
            .env_remove(new)
            .output()
            .expect("binary runs");
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.trim().lines().collect();
        assert_eq!(lines.len(), 2, "a warning, then the error: {stderr}");
        assert!(
            lines[0].contains(&format!("{old} is deprecated")) && lines[0].contains(new),
            "{stderr}"
        );
        assert!(lines[1].contains(flag), "{stderr}");
    }
}
