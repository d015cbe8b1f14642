//! `evgrid load --wait-complete` against the live pipeline: the real ingest, dispatcher and three
//! substations (their `run`, as their binaries call it) on one nats-server. The original load
//! test, then an open loop straight on NATS.

use tokio_util::sync::CancellationToken;

use crate::helpers::WAIT;
use crate::pipeline::{Options, Pipeline};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_load_test_completes_on_the_live_pipeline() {
    // Three 150 kW substations at 36,000× (a 30 kWh charge takes a tenth of a second),
    // heartbeats every 250 ms.
    let pipeline = Pipeline::start(Options {
        capacities: &[150.0, 150.0, 150.0],
        time_scale: 36_000.0,
        heartbeat_interval: "250ms",
        dispatcher_args: &["--defer-delay", "200ms"],
        ..Options::default()
    })
    .await;
    let url = pipeline.nats.url();
    let ingest_url = pipeline.url("");

    let run = |list: Vec<String>| async move {
        let list: Vec<&str> = list.iter().map(String::as_str).collect();
        tokio::time::timeout(
            WAIT,
            evgrid::load::run(crate::helpers::args(&list), CancellationToken::new()),
        )
        .await
        .expect("the run ends in time")
        .expect("the run succeeds")
    };
    let owned = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    // The original test: 100 concurrent HTTP requests, every one to `completed`.
    let r = run(owned(&[
        "--url",
        &ingest_url,
        "--events-nats-url",
        url,
        "--concurrency",
        "100",
        "--requests",
        "100",
        "--wait-complete",
        "--complete-timeout",
        "15s",
    ]))
    .await;
    let c = r.completion.clone().expect("completion figures");
    assert_eq!(
        (r.accepted, r.errors.total),
        (100, 0),
        "{:?}",
        r.error_examples
    );
    assert_eq!(c.completed, 100);
    assert_eq!(c.per_substation.values().sum::<u64>(), 100);
    for (id, _) in &pipeline.substations {
        assert!(
            c.per_substation.get(id).is_some_and(|n| *n > 0),
            "{id} got work: {c:?}"
        );
    }
    let peak = c.peak_utilization.expect("heartbeats during the run");
    assert!(
        peak > 0.0 && peak <= 1.0 + 1e-9,
        "never above capacity: {peak}"
    );
    assert_eq!(c.dispatch_latency_ms.expect("dispatches").count, 100);
    assert_eq!(c.charging_start_latency_ms.expect("starts").count, 100);

    // An open loop straight on NATS, followed on the same connection.
    let r = run(owned(&[
        "--nats-url",
        url,
        "--rate",
        "100",
        "--duration",
        "1s",
        "--wait-complete",
        "--complete-timeout",
        "15s",
    ]))
    .await;
    let c = r.completion.expect("completion figures");
    assert_eq!((r.sent, r.accepted, c.completed), (100, 100, 100));

    pipeline.stop().await;
}
