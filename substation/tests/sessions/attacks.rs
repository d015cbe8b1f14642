//! What a substation does with messages nobody trustworthy sent (issue #11, docs/security.md):
//! a grid-operator limit above its nameplate, a dispatch no request could have produced.

use evgrid_model::messages::Dispatch;

use crate::helpers::{Grid, Running, dispatch, sample};

/// Attack 4: a limit of 1e308 kW on a 100 kW substation. It was applied as the capacity, and
/// the substation drew 1,200 kW; a limit now only ever lowers the configured capacity.
#[tokio::test]
async fn a_limit_cannot_raise_a_substation_above_its_configured_capacity() {
    let grid = Grid::start().await;
    let mut telemetry = grid.telemetry("s1").await;
    let substation = Running::start(grid.config("s1", 100.0)).await;
    // Twelve cars wanting 100 kW each: 1,200 kW of demand on 100 kW.
    let mut last_seq = 0;
    for _ in 0..12 {
        last_seq = grid.dispatch(&dispatch("s1", 150.0, 100.0)).await;
    }
    telemetry
        .until(|t| t.heartbeat.dispatch_seq == last_seq)
        .await;

    grid.limit("s1", r#"{"capacity_kw": 1e308}"#).await;
    let page = evgrid_test_support::eventually(
        crate::helpers::WAIT,
        std::time::Duration::from_millis(20),
        || async {
            let (_, page) = substation.get("/metrics").await;
            page.contains(
                r#"evgrid_substation_limit_messages_total{outcome="applied",substation="s1"} 1"#,
            )
            .then_some(page)
        },
    )
    .await
    .expect("the limit is taken");
    assert_eq!(
        sample(&page, "evgrid_substation_capacity_watts", "s1"),
        Some(100_000.0)
    );
    // Every heartbeat from now on: the nameplate, never more.
    for _ in 0..3 {
        let beat = telemetry.next().await;
        assert_eq!(beat.heartbeat.capacity_kw, 100.0);
        assert!(
            beat.heartbeat.load_kw <= 100.0,
            "{}",
            beat.heartbeat.load_kw
        );
        assert_eq!(beat.heartbeat.demand_kw, 1200.0);
    }
    substation.stop().await.unwrap();
}

/// Attack 6: a fake dispatch of 1e300 kWh on `ev.dispatch.s1` charged for ever at full capacity.
/// Dispatches are now held to the rules of a request: nonsense is terminated, nothing charges.
#[tokio::test]
async fn a_dispatch_no_request_could_produce_is_terminated() {
    let grid = Grid::start().await;
    let mut telemetry = grid.telemetry("s1").await;
    let substation = Running::start(grid.config("s1", 100.0)).await;
    let forged = [
        Dispatch {
            energy_kwh: 1e300,
            ..dispatch("s1", 1.0, 100.0)
        },
        Dispatch {
            max_power_kw: 1e-12,
            ..dispatch("s1", 1.0, 1.0)
        },
        Dispatch {
            departure: Some(chrono::Utc::now() + chrono::Duration::days(365 * 7000)),
            ..dispatch("s1", 1.0, 1.0)
        },
        // On s1's subject, naming another substation.
        dispatch("s2", 10.0, 10.0),
    ];
    let mut last_seq = 0;
    for d in &forged {
        last_seq = publish_on_s1(&grid, d).await;
    }
    let beat = telemetry
        .until(|t| t.heartbeat.dispatch_seq == last_seq)
        .await;
    assert_eq!(
        (
            beat.heartbeat.active_sessions,
            beat.heartbeat.queued_sessions,
            beat.heartbeat.load_kw
        ),
        (0, 0, 0.0)
    );
    let consumer = grid.all_acked("s1").await;
    assert_eq!(consumer.ack_floor.stream_sequence, last_seq);
    for d in &forged {
        assert!(grid.try_record(d.request_id).await.is_none());
    }
    // A real dispatch after them still charges.
    let real = dispatch("s1", 10.0, 10.0);
    let seq = grid.dispatch(&real).await;
    let beat = telemetry.until(|t| t.heartbeat.dispatch_seq == seq).await;
    assert_eq!(beat.heartbeat.active_sessions, 1);
    substation.stop().await.unwrap();
}

/// Publishes `d` on `ev.dispatch.s1` whatever substation its body names.
async fn publish_on_s1(grid: &Grid, d: &Dispatch) -> u64 {
    let on_s1 = async_nats::jetstream::message::PublishMessage::build()
        .payload(serde_json::to_vec(d).unwrap().into())
        .message_id(format!("dispatch-{}", d.request_id));
    grid.js
        .send_publish(evgrid_model::subjects::dispatch("s1"), on_s1)
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}
