//! Messages nobody trustworthy sent (issue #11, docs/security.md): heartbeats that speak for
//! another substation or lie about their numbers, requests that would hold a session for ever.

use evgrid_dispatcher::Policy;
use evgrid_model::headers;
use evgrid_model::messages::Heartbeat;
use evgrid_test_support::store;
use futures::StreamExt;

use std::time::Duration;

use chrono::Utc;
use evgrid_common::streams;
use evgrid_model::messages::{RequestRecord, RequestState};
use uuid::Uuid;

use crate::helpers::{WAIT, header, spawn_app, spawn_app_with};
use crate::{record, request, state_bucket};

/// Attack 2: a heartbeat on `ev.telemetry.zzz` whose body says it is s1, at 123,456 kW with
/// load −50. The body was trusted over the subject; now it is dropped and counted, and s1 is
/// routed by what s1 itself said (full: the request waits, by a policy that judges room).
#[tokio::test]
async fn a_heartbeat_speaks_only_for_the_substation_of_its_subject() {
    let mut app = spawn_app_with(Policy::LeastLoaded).await;
    let mut s1 = app.substation("s1", 100.0);
    s1.heartbeat(100.0, 0).await;
    let forged = Heartbeat {
        substation_id: "s1".into(),
        seq: 99,
        sent_at: chrono::Utc::now(),
        capacity_kw: 123_456.0,
        load_kw: -50.0,
        active_sessions: 0,
        queued_sessions: 0,
        demand_kw: 0.0,
        dispatch_seq: 0,
        interval_ms: 60_000,
    };
    let publish = |subject: &'static str, hb: Heartbeat| {
        let js = app.js.clone();
        async move { store(&js, subject, serde_json::to_vec(&hb).unwrap()).await }
    };
    publish("ev.telemetry.zzz", forged.clone()).await;
    // Its own subject, numbers out of bounds.
    publish(
        "ev.telemetry.s2",
        Heartbeat {
            substation_id: "s2".into(),
            capacity_kw: 1e308,
            load_kw: 0.0,
            ..forged
        },
    )
    .await;
    app.wait_for_metric(r#"evgrid_dispatch_heartbeats_refused_total{reason="wrong_substation"} 1"#)
        .await;
    app.wait_for_metric(r#"evgrid_dispatch_heartbeats_refused_total{reason="out_of_bounds"} 1"#)
        .await;

    let mut dispatches = app.subscribe("ev.dispatch.>").await;
    app.publish_request(r#"{"vehicle_id":"ev-1","energy_kwh":30,"max_power_kw":11}"#)
        .await;
    app.wait_for_metric(
        r#"evgrid_dispatch_decisions_total{outcome="deferred",substation="none"} 1"#,
    )
    .await;
    let metrics = app.metrics().await;
    assert!(!metrics.contains("zzz"), "{metrics}");
    assert!(!metrics.contains(r#"substation="s2""#), "{metrics}");
    // s1 frees up: the waiting request goes there, and only there.
    s1.heartbeat(0.0, 0).await;
    let got = crate::helpers::next_dispatch(&mut dispatches).await;
    assert_eq!(got.subject, "ev.dispatch.s1");
    app.stop().await;
}

/// Attack 10 over NATS: `max_power_kw` 1e-12, or a departure in year 9999 at 0.001 kW, were
/// dispatched and held a session for ever. Both are now rejected on `ev.rejected`, the detail
/// naming the field.
#[tokio::test]
async fn requests_that_would_stay_for_ever_are_rejected() {
    let mut app = spawn_app().await;
    let mut rejected = app.subscribe("ev.rejected").await;
    app.substation("s1", 100.0).heartbeat(0.0, 0).await;
    let bodies = [
        (
            r#"{"vehicle_id":"ev-1","energy_kwh":30,"max_power_kw":1e-12}"#,
            "max_power_kw",
        ),
        (
            r#"{"vehicle_id":"ev-2","energy_kwh":0.001,"max_power_kw":1,"departure":"9999-01-01T00:00:00Z"}"#,
            "departure",
        ),
        // No departure, and 200 kWh at 1 kW takes longer than the longest stay.
        (
            r#"{"vehicle_id":"ev-3","energy_kwh":200,"max_power_kw":1}"#,
            "max_power_kw",
        ),
    ];
    for (body, _) in bodies {
        app.publish_request(body).await;
    }
    for (body, field) in bodies {
        let msg = tokio::time::timeout(WAIT, rejected.next())
            .await
            .expect("a rejection in time")
            .unwrap();
        assert_eq!(msg.payload.as_ref(), body.as_bytes());
        let h = msg.headers.unwrap();
        assert_eq!(
            header(&h, headers::REJECT_REASON).as_deref(),
            Some("invalid_fields")
        );
        let detail = header(&h, headers::REJECT_DETAIL).unwrap();
        assert!(detail.starts_with(&format!("{field}:")), "{detail}");
    }
    app.wait_until_all_settled().await;
    assert_eq!(app.dispatch_stream_messages().await, 0);
    app.stop().await;
}

/// Attack 5: ~1 MiB of junk on `ev.requests`. Its copy to `ev.rejected` (the payload plus the
/// rejection headers) was larger than the server takes, so it was naked and retried for ever,
/// and 16 of them stalled a dispatcher at `--max-in-flight 4`. `EV_REQUESTS` now refuses such a
/// message at the door (common/tests/nats); whatever copy the server still refuses (here:
/// `EV_REJECTED` shrunk to 256-byte messages) is given up after `REJECT_ATTEMPTS` (5)
/// deliveries and counted, and the request behind it is dispatched.
#[tokio::test]
async fn junk_whose_rejection_cannot_be_stored_is_dropped_after_a_few_attempts() {
    let mut app = crate::helpers::spawn_app_configured(|c| c.max_in_flight = 4).await;
    let mut dispatches = app.subscribe("ev.dispatch.>").await;
    app.substation("s1", 100.0).heartbeat(0.0, 0).await;
    let mut rejected = app.js.get_stream("EV_REJECTED").await.unwrap();
    let tiny = async_nats::jetstream::stream::Config {
        max_message_size: 256,
        ..rejected.info().await.unwrap().config.clone()
    };
    app.js.update_stream(tiny).await.unwrap();
    let junk = vec![b'x'; 1024];
    for _ in 0..16 {
        app.publish_request(junk.clone()).await;
    }
    let good = uuid::Uuid::new_v4();
    app.publish_request(format!(
        r#"{{"request_id":"{good}","vehicle_id":"ev-1","energy_kwh":30,"max_power_kw":11}}"#
    ))
    .await;
    let got = crate::helpers::next_dispatch(&mut dispatches).await;
    assert_eq!(got.dispatch.request_id, good);
    app.wait_for_metric(r#"evgrid_dispatch_rejections_dropped_total{reason="not_json"} 16"#)
        .await;
    app.wait_until_all_settled().await;
    let consumer = app.dispatcher_consumer().await;
    assert_eq!(consumer.num_redelivered, 0);
    assert_eq!(rejected.info().await.unwrap().state.messages, 0);
    app.stop().await;
}

/// Attack 3: heartbeats from 150k random substation ids grew the dispatcher from 10 to 357 MB
/// for good, a request took 114 s to dispatch and `/metrics` reached 17.8 MB. The dispatcher
/// now tracks at most `--max-substations` (new ones beyond are dropped and counted) and forgets
/// the ones silent for `--forget-after`, with their metric series. Scaled down here: 50
/// tracked, 500 made-up ids.
#[tokio::test]
async fn made_up_substations_are_bounded_and_forgotten() {
    let mut app = crate::helpers::spawn_app_configured(|c| {
        c.max_substations = 50;
        c.substation_timeout = std::time::Duration::from_millis(100);
        c.forget_after = std::time::Duration::from_millis(300);
    })
    .await;
    let mut dispatches = app.subscribe("ev.dispatch.>").await;
    let mut s1 = app.substation("s1", 100.0);
    s1.heartbeat(0.0, 0).await;
    let made_up: Vec<Vec<u8>> = (0..500)
        .map(|i| {
            let hb = Heartbeat {
                substation_id: format!("junk-{i}"),
                seq: 1,
                sent_at: chrono::Utc::now(),
                capacity_kw: 0.0,
                load_kw: 0.0,
                active_sessions: 0,
                queued_sessions: 0,
                demand_kw: 0.0,
                dispatch_seq: 0,
                interval_ms: 50,
            };
            serde_json::to_vec(&hb).unwrap()
        })
        .collect();
    let mut acks = Vec::new();
    for (i, body) in made_up.into_iter().enumerate() {
        let ack = app
            .js
            .publish(format!("ev.telemetry.junk-{i}"), body.into())
            .await
            .unwrap();
        acks.push(ack);
    }
    for ack in acks {
        ack.await.unwrap();
    }
    // s1 and 49 of them fill the view; the other 451 are dropped.
    app.wait_for_metric(
        r#"evgrid_dispatch_heartbeats_refused_total{reason="too_many_substations"} 451"#,
    )
    .await;
    // s1 keeps heartbeating (the grid is heard): the silent made-up ones are forgotten.
    s1.heartbeat(0.0, 0).await;
    let addr = app.addr;
    let page = evgrid_test_support::eventually(
        crate::helpers::WAIT,
        std::time::Duration::from_millis(50),
        || async move {
            let page = crate::helpers::http_get(addr, "/metrics").await.1;
            (!page.contains("junk-")).then_some(page)
        },
    )
    .await
    .expect("the made-up substations are forgotten, with their series");
    assert!(page.contains(r#"evgrid_substation_heartbeat_age_seconds{substation="s1"}"#));
    assert!(page.len() < 64 * 1024, "{} bytes", page.len());
    // Room again: a new substation is taken in, and requests are dispatched.
    app.substation("s2", 100.0).heartbeat(0.0, 0).await;
    app.wait_for_metric(
        r#"evgrid_dispatch_decisions_total{outcome="dispatched",substation="s2"} 0"#,
    )
    .await;
    app.publish_request(r#"{"vehicle_id":"ev-1","energy_kwh":30,"max_power_kw":11}"#)
        .await;
    let got = crate::helpers::next_dispatch(&mut dispatches).await;
    assert!(["ev.dispatch.s1", "ev.dispatch.s2"].contains(&got.subject.as_str()));
    app.stop().await;
}

/// Attack 7: the id of a completed request, resent after the dedupe window with a body that is
/// rejected. The rejection is stored in `ev.rejected`; the finished record is never overwritten.
#[tokio::test]
async fn a_message_reusing_a_finished_requests_id_never_overwrites_its_record() {
    let mut app = spawn_app().await;
    let kv = state_bucket(&app).await;
    app.substation("s1", 100.0).heartbeat(0.0, 0).await;
    let victim = Uuid::new_v4();
    app.publish_request(request(victim, 20.0, 11.0)).await;
    let queued = evgrid_test_support::eventually(WAIT, Duration::from_millis(10), || async {
        record(&app, victim)
            .await
            .filter(|r| r.state == RequestState::Dispatched)
    })
    .await
    .expect("dispatched state");
    let completed = RequestRecord {
        state: RequestState::Completed,
        energy_delivered_kwh: 20.0,
        reason: Some("delivered".into()),
        completed_at: Some(Utc::now()),
        ..queued
    };
    // s1 completes it, in its own session record.
    kv.put(
        evgrid_model::messages::session_state_key(victim, "s1"),
        serde_json::to_vec(&completed).unwrap().into(),
    )
    .await
    .unwrap();
    // 50 kWh at 11 kW in an hour, all or nothing: undeliverable.
    app.publish_request(format!(
        r#"{{"request_id":"{victim}","vehicle_id":"attacker","energy_kwh":50,"max_power_kw":11,"departure":"{}","all_or_nothing":true}}"#,
        (Utc::now() + chrono::Duration::hours(1)).to_rfc3339()
    ))
    .await;
    app.wait_until_all_settled().await;
    let mut rejected = app.js.get_stream(streams::REJECTED).await.unwrap();
    assert_eq!(rejected.info().await.unwrap().state.messages, 1);
    let now = record(&app, victim).await.unwrap();
    assert_eq!(now, completed, "the finished record was overwritten");
    app.stop().await;
}
