//! `GET /v1/charge-requests/{request_id}` and `GET /v1/substations`.

use std::time::Duration;

use chrono::Utc;
use evgrid_model::messages::{Heartbeat, RequestRecord, RequestState};
use evgrid_test_support::{NatsServer, eventually};
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

    let ids: Vec<&Value> = view
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["substation_id"])
        .collect();
    assert_eq!(ids, ["north", "south"]);
    let south = &view[1];
    assert_eq!(south["status"], "up");
    assert_eq!(south["capacity_kw"], 150.0);
    assert_eq!(south["active_sessions"], 3);
    assert_eq!(south["queued_sessions"], 1);
    assert!(south["seconds_since_heartbeat"].as_f64().unwrap() < 60.0);
}
