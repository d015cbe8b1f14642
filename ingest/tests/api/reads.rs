//! `GET /v1/charge-requests/{request_id}` and `GET /v1/substations`.

use std::time::Duration;

use chrono::Utc;
use evgrid_model::messages::{Heartbeat, RequestRecord, RequestState};
use evgrid_test_support::{NatsServer, eventually, store};
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::{WAIT, jetstream, spawn_app, valid_request};

#[tokio::test]
async fn a_request_is_queued_right_after_its_202_then_follows_the_bucket() {
    let nats = NatsServer::start().unwrap();
    let app = spawn_app(&nats).await;
    let js = jetstream(&nats).await;

    let id = app.post(&valid_request()).await.accepted_id();
    let reply = app.get(&format!("/v1/charge-requests/{id}")).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let queued = reply.json();
    assert_eq!(queued["request_id"], id.as_str());
    assert_eq!(queued["state"], "queued");
    assert_eq!(queued["vehicle_id"], "ev-1");
    assert_eq!(queued["energy_kwh"], 30.0);
    assert_eq!(queued["max_power_kw"], 11.0);
    assert_eq!(queued["energy_delivered_kwh"], 0.0);
    assert!(queued["accepted_at"].is_string());

    // Once the pipeline records a state, that is the answer.
    let bucket = js.get_key_value("EV_REQUEST_STATE").await.unwrap();
    let now = Utc::now();
    let charging = RequestRecord {
        request_id: id.parse().unwrap(),
        state: RequestState::Charging,
        vehicle_id: "ev-1".into(),
        energy_kwh: 30.0,
        energy_expected_kwh: None,
        max_power_kw: 11.0,
        departure: None,
        substation_id: Some("s1".into()),
        energy_delivered_kwh: 4.5,
        reason: None,
        accepted_at: now,
        dispatched_at: Some(now),
        charging_started_at: Some(now),
        completed_at: None,
        rejected_at: None,
        updated_at: now,
        moved: Vec::new(),
        charger: None,
    };
    bucket
        .put(&id, serde_json::to_vec(&charging).unwrap().into())
        .await
        .unwrap();
    let reply = app.get(&format!("/v1/charge-requests/{id}")).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json(), serde_json::to_value(&charging).unwrap());

    // A request another instance accepted: only the bucket knows it.
    let other = RequestRecord {
        request_id: Uuid::new_v4(),
        state: RequestState::Rejected,
        reason: Some("undeliverable".into()),
        rejected_at: Some(now),
        substation_id: None,
        charging_started_at: None,
        ..charging.clone()
    };
    bucket
        .put(
            other.request_id.to_string(),
            serde_json::to_vec(&other).unwrap().into(),
        )
        .await
        .unwrap();
    let reply = app
        .get(&format!("/v1/charge-requests/{}", other.request_id))
        .await;
    assert_eq!(reply.json(), serde_json::to_value(&other).unwrap());

    // A car that left at its departure with a third of its energy: completed, and visibly short.
    let departed = RequestRecord {
        request_id: Uuid::new_v4(),
        state: RequestState::Completed,
        energy_delivered_kwh: 10.000_000_000_000_2,
        reason: Some("departed".into()),
        completed_at: Some(now),
        ..charging
    };
    bucket
        .put(
            departed.request_id.to_string(),
            serde_json::to_vec(&departed).unwrap().into(),
        )
        .await
        .unwrap();
    let reply = app
        .get(&format!("/v1/charge-requests/{}", departed.request_id))
        .await;
    let shown = reply.json();
    assert_eq!(shown["state"], "completed");
    assert_eq!(shown["fully_charged"], false);
    assert_eq!(shown["energy_delivered_kwh"], 10.0);
    assert_eq!(shown["energy_shortfall_kwh"], 20.0);
}

/// The substation ids of a `/v1/substations` view, in order.
fn ids(view: &Value) -> Vec<&Value> {
    view.as_array()
        .unwrap()
        .iter()
        .map(|s| &s["substation_id"])
        .collect()
}

fn heartbeat(id: &str, seq: u64, load_kw: f64, interval_ms: u64) -> Heartbeat {
    Heartbeat {
        substation_id: id.into(),
        seq,
        sent_at: Utc::now(),
        capacity_kw: 150.0,
        load_kw,
        active_sessions: 3,
        queued_sessions: 1,
        demand_kw: load_kw,
        dispatch_seq: 0,
        interval_ms,
    }
}

#[tokio::test]
async fn substations_show_the_newest_heartbeat_and_who_is_stale() {
    let nats = NatsServer::start().unwrap();
    let app = spawn_app(&nats).await;
    let js = jetstream(&nats).await;

    assert_eq!(
        app.get("/v1/substations").await.json(),
        serde_json::json!([])
    );
    // "south" beats every minute (up); "north" claims to beat every millisecond, so it is
    // stale three milliseconds after its heartbeat is stored.
    for hb in [
        heartbeat("south", 1, 10.0, 60_000),
        heartbeat("south", 2, 20.0, 60_000),
        heartbeat("north", 1, 5.0, 1),
    ] {
        let subject = format!("ev.telemetry.{}", hb.substation_id);
        js.publish(subject, serde_json::to_vec(&hb).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    let view = eventually(WAIT, Duration::from_millis(20), || async {
        let view = app.get("/v1/substations").await.json();
        let south = view
            .as_array()?
            .iter()
            .find(|s| s["substation_id"] == "south")?;
        (view.as_array()?.len() == 2 && south["load_kw"] == 20.0 && view[0]["status"] == "stale")
            .then_some(view)
    })
    .await
    .expect("both substations show, with south's newest heartbeat");

    assert_eq!(ids(&view), ["north", "south"]);
    let south = &view[1];
    assert_eq!(south["status"], "up");
    assert_eq!(south["capacity_kw"], 150.0);
    assert_eq!(south["active_sessions"], 3);
    assert_eq!(south["queued_sessions"], 1);
    assert!(south["seconds_since_heartbeat"].as_f64().unwrap() < 60.0);
}

/// Attack 2 (docs/security.md): a heartbeat on `ev.telemetry.zzz` whose body says it is s1's.
/// `/v1/substations` showed s1 at 123,456 kW with load −50; the subject is who sent it, so the
/// message is dropped and counted, and s1 shows what s1 itself said.
#[tokio::test]
async fn a_heartbeat_speaks_only_for_the_substation_of_its_subject() {
    let nats = NatsServer::start().unwrap();
    let app = spawn_app(&nats).await;
    let js = jetstream(&nats).await;
    let publish = |subject: &'static str, hb: Heartbeat| {
        let js = js.clone();
        async move { store(&js, subject, serde_json::to_vec(&hb).unwrap()).await }
    };
    publish("ev.telemetry.s1", heartbeat("s1", 1, 20.0, 60_000)).await;
    let forged = Heartbeat {
        capacity_kw: 123_456.0,
        load_kw: -50.0,
        ..heartbeat("s1", 2, 0.0, 60_000)
    };
    publish("ev.telemetry.zzz", forged).await;
    // On its own subject, but out of bounds.
    let huge = Heartbeat {
        capacity_kw: 1e308,
        ..heartbeat("s2", 1, 0.0, 60_000)
    };
    publish("ev.telemetry.s2", huge).await;

    let metrics = eventually(WAIT, Duration::from_millis(20), || async {
        let page = app.metrics().await;
        let refused = |reason: &str| {
            crate::helpers::sample(
                &page,
                &format!("evgrid_ingest_heartbeats_refused_total{{reason=\"{reason}\"}}"),
            )
        };
        (refused("wrong_substation") == 1.0 && refused("out_of_bounds") == 1.0).then_some(())
    })
    .await;
    assert!(metrics.is_ok(), "{}", app.metrics().await);
    let view = app.get("/v1/substations").await.json();
    assert_eq!(ids(&view), ["s1"]);
    assert_eq!(view[0]["capacity_kw"], 150.0);
    assert_eq!(view[0]["load_kw"], 20.0);
}

/// Attack 3 on ingest: heartbeats from made-up substation ids. `/v1/substations` shows at most
/// 10,000 substations (the dispatcher's default `--max-substations`); heartbeats of new ones
/// beyond are dropped and counted, and the long-silent are forgotten (unit-tested in
/// `substations.rs`: forgetting takes 10 minutes).
#[tokio::test]
async fn the_substations_shown_are_bounded() {
    let nats = NatsServer::start().unwrap();
    let app = spawn_app(&nats).await;
    let js = jetstream(&nats).await;
    // In batches: the context holds at most 5,000 acks in flight.
    for batch in (0..10_050).collect::<Vec<_>>().chunks(1000) {
        let mut acks = Vec::new();
        for i in batch {
            let hb = heartbeat(&format!("junk-{i}"), 1, 0.0, 60_000);
            let subject = format!("ev.telemetry.junk-{i}");
            acks.push(
                js.publish(subject, serde_json::to_vec(&hb).unwrap().into())
                    .await
                    .unwrap(),
            );
        }
        for ack in acks {
            ack.await.unwrap();
        }
    }
    let refused = eventually(WAIT, Duration::from_millis(50), || async {
        let page = app.metrics().await;
        let n = crate::helpers::sample(
            &page,
            r#"evgrid_ingest_heartbeats_refused_total{reason="too_many_substations"}"#,
        );
        (n == 50.0).then_some(())
    })
    .await;
    assert!(refused.is_ok(), "{}", app.metrics().await);
    let view = app.get("/v1/substations").await.json();
    assert_eq!(view.as_array().unwrap().len(), 10_000);
}
