//! `evgrid load` against a real nats-server per test, a tiny HTTP stand-in for ingest, and a
//! stand-in grid publishing session events and heartbeats; the built binary for exit codes and
//! `--json`.

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use evgrid::load::stats::ErrorKind;
use evgrid_common::streams;
use tokio_util::sync::CancellationToken;

use crate::helpers::{
    Behaviour, WAIT, args, evgrid, fake_grid, http_stub, nats_with_streams, stored,
};

async fn run(list: &[&str]) -> evgrid::load::stats::Report {
    tokio::time::timeout(
        WAIT,
        evgrid::load::run(args(list), CancellationToken::new()),
    )
    .await
    .expect("the run ends in time")
    .expect("the run succeeds")
}

#[tokio::test]
async fn closed_loop_over_nats_stores_every_request_once() {
    let (server, js) = nats_with_streams().await;
    let r = run(&[
        "--nats-url",
        server.url(),
        "--concurrency",
        "20",
        "--requests",
        "300",
    ])
    .await;
    assert_eq!(
        (r.mode, r.sent, r.accepted, r.errors.total),
        ("closed", 300, 300, 0)
    );
    assert_eq!(stored(&js, streams::REQUESTS).await, 300);
    let ids: HashSet<_> = crate::helpers::stored_requests(&js)
        .await
        .into_iter()
        .map(|b| b["request_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 300, "every request has its own id");
    let latency = r.latency_ms.expect("latencies");
    assert_eq!(latency.count, 300);
    assert!(latency.p50 <= latency.p99 && latency.p99 <= latency.max);
    assert!(r.throughput_rps > 0.0);
}

#[tokio::test]
async fn open_loop_over_nats_keeps_its_schedule() {
    let (server, js) = nats_with_streams().await;
    let r = run(&[
        "--nats-url",
        server.url(),
        "--rate",
        "200",
        "--duration",
        "1s",
    ])
    .await;
    assert_eq!(
        (r.mode, r.planned, r.sent, r.accepted),
        ("open", 200, 200, 200)
    );
    // The last request is due at 995 ms: the run lasts about the duration.
    assert!((0.99..3.0).contains(&r.elapsed_s), "{}", r.elapsed_s);
    assert_eq!(stored(&js, streams::REQUESTS).await, 200);
}

#[tokio::test]
async fn core_publish_without_acks_reaches_the_stream() {
    let (server, js) = nats_with_streams().await;
    let r = run(&["--nats-url", server.url(), "--no-ack", "--requests", "50"]).await;
    assert_eq!((r.accepted, r.errors.total), (50, 0));
    // Not acknowledged, so storage may trail the run by a moment.
    evgrid_test_support::eventually(WAIT, Duration::from_millis(20), || {
        let js = js.clone();
        async move { (stored(&js, streams::REQUESTS).await == 50).then_some(()) }
    })
    .await
    .expect("all 50 stored");
}

#[tokio::test]
async fn a_server_without_the_pipeline_is_one_clear_error() {
    let server = evgrid_test_support::NatsServer::start().unwrap();
    let err = evgrid::load::run(
        args(&["--nats-url", server.url()]),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("no JetStream stream stores ev.requests"),
        "{err:#}"
    );
}

#[tokio::test]
async fn http_closed_loop_posts_valid_distinct_requests() {
    let (addr, seen, _stop) = http_stub(Behaviour::default()).await;
    let url = format!("http://{addr}");
    let r = run(&[
        "--url",
        &url,
        "--requests",
        "60",
        "--concurrency",
        "8",
        "--energy-kwh",
        "normal:30,10",
        "--max-power-kw",
        "uniform:7..22",
        "--departure-hours",
        "uniform:2..10",
        "--seed",
        "7",
    ])
    .await;
    assert_eq!((r.sent, r.accepted, r.errors.total), (60, 60, 0));
    assert_eq!(r.seed, Some(7));
    assert_eq!(
        seen.ids.lock().unwrap().len(),
        60,
        "valid bodies, distinct ids"
    );
}

#[tokio::test]
async fn retries_go_to_the_other_replica_with_the_same_id() {
    // One replica answers, the other is down (nothing listens on its port).
    let (addr, seen, _stop) = http_stub(Behaviour::default()).await;
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let urls = format!("http://{addr},http://{down}");
    let base = [
        "--url",
        &urls,
        "--requests",
        "20",
        "--concurrency",
        "4",
        "--seed",
        "3",
    ];
    let once = run(&base).await;
    assert_eq!(once.accepted + once.errors.get(ErrorKind::Connect), 20);
    assert_eq!(
        once.accepted, 10,
        "every other request goes to each replica"
    );
    assert_eq!(once.retried, 0);

    let retried = run(&[&base[..], &["--retry-for", "5s"]].concat()).await;
    assert_eq!((retried.accepted, retried.errors.total), (20, 0));
    assert_eq!(
        retried.retried, 10,
        "each request sent to the dead replica, once more"
    );
    // The live replica saw each request of both runs once (10 + 20): a resend only follows
    // a failure, and carries the request's own id.
    assert_eq!(seen.ids.lock().unwrap().len(), 30);
    assert_eq!(seen.requests.load(std::sync::atomic::Ordering::Relaxed), 30);
}

#[tokio::test]
async fn a_slow_target_overloads_the_open_loop_instead_of_slowing_it() {
    let (addr, _seen, _stop) = http_stub(Behaviour {
        delay: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let url = format!("http://{addr}");
    let r = run(&[
        "--url",
        &url,
        "--rate",
        "40",
        "--duration",
        "1s",
        "--max-in-flight",
        "4",
    ])
    .await;
    let overload = r.errors.get(ErrorKind::Overload);
    assert_eq!(r.sent, 40, "the schedule never slips");
    assert_eq!(r.accepted + overload, 40);
    assert!(overload >= 20, "{overload} dropped");
    // Counted from the due time: never less than the target's own delay.
    assert!(r.latency_ms.unwrap().p50 >= 300.0);
    assert!(r.error_examples["overload"].contains("--max-in-flight"));
}

#[tokio::test]
async fn the_binary_reports_json_and_fails_above_the_error_ratio() {
    let (addr, _seen, _stop) = http_stub(Behaviour {
        fail_every: 2,
        ..Default::default()
    })
    .await;
    let url = format!("http://{addr}");
    let base = [
        "load",
        "--url",
        &url,
        "--requests",
        "20",
        "--concurrency",
        "2",
        "--json",
    ];
    let (ok, stdout, stderr) = evgrid(&base).await;
    assert!(!ok, "half the requests failed: {stderr}");
    assert!(stderr.contains("above --max-error-ratio"), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(report["sent"], 20);
    assert_eq!(report["accepted"], 10);
    assert_eq!(report["errors"]["http_5xx"], 10);
    assert_eq!(report["errors"]["total"], 10);
    assert!(report["throughput_rps"].as_f64().unwrap() > 0.0);
    for p in ["p50", "p90", "p99", "p999", "max"] {
        assert!(report["latency_ms"][p].is_number(), "latency_ms.{p}");
    }
    assert!(
        report.get("completed").is_none(),
        "only with --wait-complete"
    );

    let (ok, _, stderr) = evgrid(&[&base[..], &["--max-error-ratio", "0.5"]].concat()).await;
    assert!(ok, "0.5 is within the allowed ratio: {stderr}");

    let (ok, stdout, _) = evgrid(&["load", "--url", &url, "--requests", "5"]).await;
    assert!(!ok);
    assert!(stdout.contains("http_5xx 2"), "the text summary: {stdout}");
}

#[tokio::test]
async fn bad_options_fail_with_one_line_before_sending() {
    let (ok, stdout, stderr) = evgrid(&["load", "--url", "ftp://x", "--requests", "5"]).await;
    assert!(!ok && stdout.is_empty());
    assert!(stderr.contains("only http:// URLs"), "{stderr}");
    let (ok, _, stderr) = evgrid(&[
        "load",
        "--nats-url",
        "nats://127.0.0.1:1",
        "--url",
        "http://a:1",
    ])
    .await;
    assert!(!ok && stderr.contains("cannot be used with"), "{stderr}");
}

#[tokio::test]
async fn a_trace_that_cannot_be_read_is_one_line_naming_it_and_why_once() {
    let trace = "/nonexistent/acn.csv";
    for args in [
        &["load", "--url", "http://127.0.0.1:1", "--trace", trace][..],
        &["sim", "--trace", trace][..],
    ] {
        let (ok, stdout, stderr) = evgrid(args).await;
        assert!(!ok && stdout.is_empty(), "{args:?}: {stdout}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert_eq!(stderr.matches(trace).count(), 1, "{args:?}: {stderr}");
        assert_eq!(
            stderr.matches("No such file").count(),
            1,
            "{args:?}: {stderr}"
        );
    }
}

#[tokio::test]
async fn a_trace_replays_its_sessions_in_arrival_order() {
    let (server, js) = nats_with_streams().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions.csv.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&path).unwrap(),
        flate2::Compression::fast(),
    );
    // Arrivals over 10 minutes, out of order, one asking for nothing; at 600× that is 1 s.
    write!(
        gz,
        "arrival,departure,requested_energy (kWh),delivered_energy (kWh),station_id,session_id,estimated_departure,claimed\n\
         2019-05-01 08:05:00-07:00,2019-05-01 10:05:00-07:00,12.5,10,CA-1,s2,,True\n\
         2019-05-01 08:00:00-07:00,2019-05-01 09:00:00-07:00,30.0,10,CA-2,s1,,True\n\
         2019-05-01 08:06:00-07:00,2019-05-01 09:00:00-07:00,0.0,0,CA-3,s3,,True\n\
         2019-05-01 08:10:00-07:00,2019-05-01 18:00:00-07:00,7.0,7,CA-4,s4,,True\n"
    )
    .unwrap();
    gz.finish().unwrap();
    let trace = path.to_str().unwrap();
    let r = run(&[
        "--nats-url",
        server.url(),
        "--trace",
        trace,
        "--speed",
        "600",
    ])
    .await;
    assert_eq!(
        (r.mode, r.sent, r.accepted, r.trace_skipped),
        ("trace", 3, 3, Some(1))
    );
    assert!((0.99..3.0).contains(&r.elapsed_s), "{}", r.elapsed_s);
    let bodies = crate::helpers::stored_requests(&js).await;
    let energies: Vec<f64> = bodies
        .iter()
        .map(|b| b["energy_kwh"].as_f64().unwrap())
        .collect();
    assert_eq!(energies, [30.0, 12.5, 7.0]);
    assert!(bodies.iter().all(|b| b["max_power_kw"] == 6.6));
    assert!(bodies.iter().all(|b| b["departure"].is_string()));
}

#[tokio::test]
async fn wait_complete_follows_session_events_to_the_end() {
    let (server, js) = nats_with_streams().await;
    let _grid = fake_grid(js.clone(), 10).await;
    let (ok, stdout, stderr) = evgrid(&[
        "load",
        "--nats-url",
        server.url(),
        "--requests",
        "60",
        "--concurrency",
        "10",
        "--wait-complete",
        "--complete-timeout",
        "10s",
        "--json",
    ])
    .await;
    assert!(!ok, "6 rejections are errors: {stderr}");
    let r: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(r["accepted"], 60);
    assert_eq!(r["completed"], 54);
    // Every third request's car left short: multiples of 3 up to 60, less the rejected 30 and 60.
    assert_eq!(r["left_short"], 18);
    assert_eq!(r["rejected"], 6);
    assert_eq!(r["errors"]["rejected"], 6);
    assert_eq!(r["errors"]["incomplete"], 0);
    // The grid alternates a/b by arrival; the rejected ones (every 10th) would have gone to a.
    assert_eq!(r["per_substation"]["a"], 24);
    assert_eq!(r["per_substation"]["b"], 30);
    assert_eq!(r["dispatch_latency_ms"]["count"], 54);
    assert_eq!(r["charging_start_latency_ms"]["count"], 54);
    assert!(r["dispatch_latency_ms"]["p50"].as_f64().unwrap() >= 1.0);
    assert_eq!(r["peak_utilization"], 0.5);
    let herd = r["herd_factor"]
        .as_f64()
        .expect("enough dispatches per second");
    assert!(
        (1.0..2.0).contains(&herd),
        "alternating substations: {herd}"
    );
}

#[tokio::test]
async fn wait_complete_counts_what_never_completes() {
    let (server, _js) = nats_with_streams().await;
    // No grid: nothing ever completes.
    let r = run(&[
        "--nats-url",
        server.url(),
        "--requests",
        "5",
        "--wait-complete",
        "--complete-timeout",
        "300ms",
    ])
    .await;
    let c = r.completion.expect("completion figures");
    assert_eq!((c.completed, c.incomplete), (0, 5));
    assert_eq!(r.errors.get(ErrorKind::Incomplete), 5);
    assert_eq!(c.herd_factor, None);
}
