//! End-to-end tests of the whole pipeline on a real nats-server: HTTP and raw NATS requests
//! through ingest → dispatcher → substations to `completed`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::pipeline::{Options, Pipeline};
use evgrid_model::messages::{Heartbeat, SessionEvent};
use futures::StreamExt;
use uuid::Uuid;

/// Collects every heartbeat while a test runs, to check that none ever showed an overload.
async fn watch_heartbeats(client: &async_nats::Client) -> Arc<Mutex<Vec<Heartbeat>>> {
    let seen: Arc<Mutex<Vec<Heartbeat>>> = Arc::default();
    let mut sub = client.subscribe("ev.telemetry.*").await.unwrap();
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            if let Ok(hb) = serde_json::from_slice::<Heartbeat>(&msg.payload) {
                sink.lock().unwrap().push(hb);
            }
        }
    });
    seen
}

/// Awaits `n` distinct completed sessions (bounded), returning completions per request id.
async fn await_completions(
    sub: &mut async_nats::Subscriber,
    n: usize,
    within: Duration,
) -> HashMap<Uuid, Vec<SessionEvent>> {
    let mut done: HashMap<Uuid, Vec<SessionEvent>> = HashMap::new();
    let deadline = tokio::time::Instant::now() + within;
    while done.len() < n {
        let msg = tokio::time::timeout_at(deadline, sub.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {n} sessions completed within {within:?}",
                    done.len()
                )
            })
            .expect("subscription ended");
        let event: SessionEvent = serde_json::from_slice(&msg.payload).unwrap();
        done.entry(event.request_id).or_default().push(event);
    }
    done
}

async fn stream_messages(client: &async_nats::Client, stream: &str) -> u64 {
    let js = async_nats::jetstream::new(client.clone());
    js.get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

/// The original system's load test: 100 concurrent HTTP charge requests, 3 substations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_requests_all_complete_without_overload() {
    let pipeline = Pipeline::start(Options::default()).await;
    let client = pipeline.nats.client().await.unwrap();
    let heartbeats = watch_heartbeats(&client).await;
    let mut completed = client.subscribe("ev.sessions.*.completed").await.unwrap();
    client.flush().await.unwrap();

    let posts = (0..100).map(|i| {
        let http = pipeline.http.clone();
        let url = pipeline.url("/v1/charge-requests");
        async move {
            let body = serde_json::json!({"vehicle_id": format!("ev-{i}"), "energy_kwh": 10.0, "max_power_kw": 11.0});
            let response = http.post(url).json(&body).send().await.unwrap();
            assert_eq!(response.status(), 202);
            let body: serde_json::Value = response.json().await.unwrap();
            Uuid::parse_str(body["request_id"].as_str().unwrap()).unwrap()
        }
    });
    let ids: HashSet<Uuid> = futures::future::join_all(posts).await.into_iter().collect();
    assert_eq!(ids.len(), 100, "every request got its own id");

    let done = await_completions(&mut completed, 100, Duration::from_secs(60)).await;
    assert_eq!(
        done.keys().copied().collect::<HashSet<_>>(),
        ids,
        "exactly the posted requests completed"
    );
    assert!(
        done.values().all(|events| events.len() == 1),
        "no session completed twice"
    );
    let per_substation = done
        .values()
        .fold(HashMap::<String, usize>::new(), |mut m, e| {
            *m.entry(e[0].substation_id.clone()).or_default() += 1;
            m
        });
    for (id, _) in &pipeline.substations {
        assert!(
            per_substation.get(id).copied().unwrap_or(0) > 0,
            "{id} got no work: {per_substation:?}"
        );
    }
    for events in done.values() {
        assert!((events[0].energy_delivered_kwh - 10.0).abs() < 1e-6);
    }
    assert_eq!(
        stream_messages(&client, "EV_REQUESTS").await,
        100,
        "none stored twice"
    );
    assert_eq!(
        stream_messages(&client, "EV_DISPATCH").await,
        100,
        "none dispatched twice"
    );

    // Every request's state is visible over HTTP.
    for id in ids.iter().take(10) {
        let record: serde_json::Value = pipeline
            .http
            .get(pipeline.url(&format!("/v1/charge-requests/{id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(record["state"], "completed", "{record}");
        assert!(record["substation_id"].is_string());
    }

    check_no_overload(&heartbeats.lock().unwrap());
    pipeline.stop().await;
}

fn check_no_overload(seen: &[Heartbeat]) {
    assert!(!seen.is_empty(), "no heartbeats seen");
    for hb in seen {
        assert!(hb.load_kw <= hb.capacity_kw + 1e-9, "overload: {hb:?}");
    }
}

/// A request published straight to NATS is handled like an HTTP one; garbage is rejected
/// without stopping the pipeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_nats_requests_complete_and_garbage_is_rejected() {
    let pipeline = Pipeline::start(Options::default()).await;
    let client = pipeline.nats.client().await.unwrap();
    let mut completed = client.subscribe("ev.sessions.*.completed").await.unwrap();
    let mut rejected = client.subscribe("ev.rejected").await.unwrap();
    client.flush().await.unwrap();
    let js = async_nats::jetstream::new(client.clone());

    for payload in [
        &b"not json at all"[..],
        br#"{"vehicle_id":"ev-1","energy_kwh":-3,"max_power_kw":11}"#,
    ] {
        js.publish("ev.requests", payload.to_vec().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    js.publish(
        "ev.requests",
        br#"{"vehicle_id":"ev-raw","energy_kwh":5,"max_power_kw":11}"#
            .to_vec()
            .into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    for expected in ["not_json", "invalid_fields"] {
        let msg = tokio::time::timeout(Duration::from_secs(10), rejected.next())
            .await
            .unwrap()
            .unwrap();
        let headers = msg.headers.clone().unwrap();
        assert_eq!(
            headers.get("Evgrid-Reject-Reason").unwrap().as_str(),
            expected
        );
        assert_eq!(
            headers.get("Evgrid-Source-Subject").unwrap().as_str(),
            "ev.requests"
        );
    }
    let done = await_completions(&mut completed, 1, Duration::from_secs(20)).await;
    let event = done.values().next().unwrap()[0].clone();
    assert_eq!(event.vehicle_id, "ev-raw");
    assert_eq!(
        event.request_id,
        evgrid_model::messages::request_id_from_sequence(3)
    );
    pipeline.stop().await;
}

/// The same request id twice (HTTP retry) is stored once and dispatched once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_is_stored_and_dispatched_once() {
    let pipeline = Pipeline::start(Options::default()).await;
    let client = pipeline.nats.client().await.unwrap();
    let mut completed = client.subscribe("ev.sessions.*.completed").await.unwrap();
    client.flush().await.unwrap();
    let id = Uuid::new_v4();
    for _ in 0..2 {
        let response = pipeline
            .http
            .post(pipeline.url("/v1/charge-requests"))
            .header("Idempotency-Key", id.to_string())
            .json(
                &serde_json::json!({"vehicle_id": "ev-retry", "energy_kwh": 5, "max_power_kw": 11}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["request_id"], id.to_string());
    }
    let done = await_completions(&mut completed, 1, Duration::from_secs(20)).await;
    assert_eq!(done[&id].len(), 1);
    assert_eq!(stream_messages(&client, "EV_REQUESTS").await, 1);
    assert_eq!(stream_messages(&client, "EV_DISPATCH").await, 1);
    pipeline.stop().await;
}

/// Every service refuses a nats-server older than 2.10, naming both versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_refuses_a_server_that_is_too_old() {
    use evgrid::up::service_config;
    use tokio_util::sync::CancellationToken;

    let bin = evgrid_test_support::old_nats_server_bin().unwrap();
    let server = evgrid_test_support::NatsServer::start_with(bin).unwrap();
    let version = server.client().await.unwrap().server_info().version;
    let words = |extra: &[&str]| -> Vec<String> {
        ["--nats-url", server.url()]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let listener = || async { tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap() };
    let token = CancellationToken::new();
    let version = version.as_str();
    let refusal = |service: &'static str,
                   run: std::pin::Pin<
        Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>,
    >| async move {
        let result = tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .unwrap_or_else(|_| panic!("{service} kept running on an old server"));
        let message = format!("{:#}", result.expect_err(service));
        assert!(
            message.contains(version) && message.contains("2.10.0"),
            "{service}: {message}"
        );
    };
    let ingest = evgrid_ingest::run(
        service_config(&words(&["--insecure-no-auth"])).unwrap(),
        listener().await,
        token.clone(),
    );
    refusal("ingest", Box::pin(ingest)).await;
    let dispatcher = evgrid_dispatcher::run(
        service_config(&words(&[])).unwrap(),
        listener().await,
        token.clone(),
    );
    refusal("dispatcher", Box::pin(dispatcher)).await;
    let substation = evgrid_substation::run(
        service_config(&words(&["--id", "s1"])).unwrap(),
        listener().await,
        token.clone(),
    );
    refusal("substation", Box::pin(substation)).await;
}
