//! Life around NATS and the process: serving before NATS is up, 503 while it is down, recovery
//! without a restart, clean shutdown with in-flight requests finished, and the metrics page.

use std::time::Duration;

use evgrid_test_support::{NatsServer, eventually};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use crate::helpers::{
    RAW_POST, WAIT, jetstream, raw_answer, raw_send, sample, spawn_app, spawn_app_at,
    stored_requests, valid_request,
};

/// Posts with a fixed idempotency key until a 202: retries are stored once.
async fn post_until_accepted(app: &crate::helpers::TestApp, key: &str) -> String {
    eventually(WAIT, Duration::from_millis(50), || async {
        let reply = app
            .post_with(
                Some("application/json"),
                Some(key),
                valid_request().to_string(),
            )
            .await;
        (reply.status == 202).then(|| reply.accepted_id())
    })
    .await
    .expect("accepted again once NATS is back")
}

#[tokio::test]
async fn nats_down_answers_503_and_recovers_after_a_restart() {
    let mut nats = NatsServer::start().unwrap();
    let app = spawn_app(&nats).await;
    let id = app.post(&valid_request()).await.accepted_id();

    nats.stop();
    app.wait_readyz(503).await;
    let reply = app.post(&valid_request()).await;
    reply.problem(503, "service-unavailable");
    assert_eq!(reply.header("retry-after"), Some("2"));
    app.get(&format!("/v1/charge-requests/{id}"))
        .await
        .problem(503, "service-unavailable");
    let metrics = app.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            r#"evgrid_ingest_rejected_total{reason="nats_unavailable"}"#
        ),
        1.0
    );

    nats.restart().unwrap();
    let key = Uuid::new_v4().to_string();
    assert_eq!(post_until_accepted(&app, &key).await, key);
    app.wait_ready().await;
    assert_eq!(stored_requests(&jetstream(&nats).await).await, 2);
}

#[tokio::test]
async fn serves_before_nats_is_reachable_and_becomes_ready_when_it_is() {
    let mut nats = NatsServer::start().unwrap();
    nats.stop();
    let app = spawn_app_at(nats.url()).await;

    assert_eq!(app.get("/healthz").await.json()["status"], "alive");
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["ready"], false);
    app.post(&valid_request())
        .await
        .problem(503, "service-unavailable");
    assert_eq!(
        app.get("/v1/substations").await.json(),
        serde_json::json!([])
    );

    nats.restart().unwrap();
    app.wait_ready().await;
    post_until_accepted(&app, "first-after-start").await;
    assert_eq!(stored_requests(&jetstream(&nats).await).await, 1);
}

#[tokio::test]
async fn shutdown_finishes_the_request_in_flight_then_returns() {
    let nats = NatsServer::start().unwrap();
    let app = spawn_app(&nats).await;

    // A request whose body is still arriving when shutdown begins.
    let body = valid_request().to_string();
    let (head, tail) = body.split_at(10);
    let start = format!("{RAW_POST}Content-Length: {}\r\n\r\n{head}", body.len());
    let mut tcp = raw_send(app.addr, &start).await;
    eventually(WAIT, Duration::from_millis(10), || async {
        let in_flight = sample(&app.metrics().await, "evgrid_http_requests_in_flight");
        // The /metrics request itself is one.
        (in_flight >= 2.0).then_some(())
    })
    .await
    .expect("the POST is in flight");

    app.begin_shutdown();
    tcp.write_all(tail.as_bytes()).await.unwrap();
    let answer = raw_answer(&mut tcp).await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");

    let addr = app.addr;
    app.stopped().await.expect("a clean stop");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
    assert_eq!(stored_requests(&jetstream(&nats).await).await, 1);
}

#[tokio::test]
async fn the_metrics_page_names_every_ingest_metric() {
    let nats = NatsServer::start().unwrap();
    let app = spawn_app(&nats).await;
    app.post(&valid_request()).await.accepted_id();
    app.get("/nowhere").await;

    let metrics = app.metrics().await;
    for name in [
        "evgrid_http_requests_total",
        "evgrid_http_request_duration_seconds",
        "evgrid_http_requests_in_flight",
        "evgrid_ingest_publish_ack_duration_seconds",
        "evgrid_ingest_rejected_total",
        "evgrid_ingest_accepted_total",
        "process_cpu_seconds_total",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{metrics}"
        );
    }
    for (series, value) in [
        (
            r#"evgrid_http_requests_total{route="/v1/charge-requests",status="202"}"#,
            1.0,
        ),
        (
            r#"evgrid_http_requests_total{route="other",status="404"}"#,
            1.0,
        ),
        (
            r#"evgrid_http_request_duration_seconds_count{route="/v1/charge-requests"}"#,
            1.0,
        ),
        ("evgrid_ingest_publish_ack_duration_seconds_count", 1.0),
        (r#"evgrid_ingest_rejected_total{reason="too_large"}"#, 0.0),
    ] {
        assert_eq!(sample(&metrics, series), value, "{series}");
        assert!(metrics.contains(series), "{series} is shown");
    }
}

/// Attack 13 of issue #11, and any grid that outgrows its store: when NATS refuses to store a
/// request because the stream is full, the answer says so (not "unreachable"), `/readyz`
/// turns 503 naming the store, and the refusal is counted for the `RequestStoreFull` alert.
#[tokio::test]
async fn a_full_store_is_named_as_such_and_makes_ingest_unready() {
    let nats = NatsServer::start().unwrap();
    let app = spawn_app(&nats).await;
    // Shrink the request stream (it refuses new messages when full) to a few requests.
    let js = async_nats::jetstream::new(nats.client().await.unwrap());
    let mut config = js
        .get_stream("EV_REQUESTS")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    config.max_bytes = 4096;
    js.update_stream(config).await.unwrap();

    let mut refused = None;
    for i in 0..200 {
        let reply = app
            .post(&serde_json::json!({"vehicle_id": format!("ev-{i}"), "energy_kwh": 10, "max_power_kw": 11}))
            .await;
        if reply.status != 202 {
            refused = Some(reply);
            break;
        }
    }
    let reply = refused.expect("the 4 KiB stream refused a request within 200");
    assert_eq!(reply.status, 503, "{}", reply.text);
    let problem = reply.json();
    assert_eq!(
        problem["type"], "https://evgrid.dev/problems/store-full",
        "{problem}"
    );
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("store is full"),
        "{problem}"
    );
    assert!(reply.header("retry-after").is_some());

    let ready = app.get("/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.text);
    assert_eq!(ready.json()["store"], "full");
    assert!(
        app.metrics()
            .await
            .contains("evgrid_ingest_rejected_total{reason=\"store_full\"} 1"),
        "counted as store_full"
    );
}
