//! What a substation does with messages nobody trustworthy sent (issue #11, docs/security.md):
//! a grid-operator limit above its nameplate.

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
