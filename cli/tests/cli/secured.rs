//! The whole pipeline on a NATS with evgrid's roles (`evgrid_common::roles`, issue #11): every
//! service connects as its own user with only its role's permissions, the grid still charges,
//! and what a role may not send or read is refused by the server.

use std::time::Duration;

use evgrid_test_support::eventually;
use tokio::sync::mpsc;

use crate::helpers::{get_json, submit};
use crate::pipeline::{Options, Pipeline, client_with_key, password};

/// A client connected as `user`, and the server's errors to it (permission violations).
async fn connect_as(
    url: &str,
    user: &str,
) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password(user))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(error) = event {
                    let _ = tx.send(error.to_string());
                }
            }
        })
        .connect(url)
        .await
        .unwrap();
    (client, rx)
}

/// Fails if the server logged a permissions violation (of any of the pipeline's services).
fn assert_no_service_refused(pipeline: &Pipeline) {
    let violations: Vec<String> = pipeline
        .nats
        .log()
        .lines()
        .filter(|l| l.contains("Violation"))
        .map(str::to_owned)
        .collect();
    assert!(
        violations.is_empty(),
        "a service was refused: {violations:#?}"
    );
}

/// Waits (bounded) for the server to refuse `what` on `subject`.
async fn refused(errors: &mut mpsc::UnboundedReceiver<String>, what: &str, subject: &str) {
    let expected = format!("permissions violation for {what} to \"{subject}\"").to_lowercase();
    let within = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(error) = errors.recv().await {
            if error.to_lowercase().contains(&expected) {
                return;
            }
        }
    });
    within
        .await
        .unwrap_or_else(|_| panic!("no refusal of {what} to {subject} within 5 s"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grid_of_roles_charges_and_the_server_refuses_what_a_role_may_not_do() {
    let mut pipeline = Pipeline::start(Options {
        secured: true,
        ..Options::default()
    })
    .await;
    let url = pipeline.nats.url().to_owned();

    // The grid works with each service as its own user.
    let body =
        serde_json::json!({"vehicle_id": "ev-secure", "energy_kwh": 10.0, "max_power_kw": 11.0});
    let id = submit(&pipeline.http, &pipeline.url(""), body.to_string()).await;
    let state_url = pipeline.url(&format!("/v1/charge-requests/{id}"));
    eventually(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let record = get_json(&pipeline.http, &state_url).await?;
            (record["state"] == "completed").then_some(())
        },
    )
    .await
    .expect("completed within 30 s");

    // A grid-operator limit, sent as the operator, reaches s1; s1 restarts and resumes.
    let (operator, _) = connect_as(&url, "operator").await;
    let limit = serde_json::json!({"capacity_kw": 20.0});
    async_nats::jetstream::new(operator)
        .publish("ev.limits.s1", limit.to_string().into())
        .await
        .unwrap()
        .await
        .expect("the limit is stored");
    let substations_url = pipeline.url("/v1/substations");
    eventually(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            let view = get_json(&pipeline.http, &substations_url).await?;
            let s1 = view
                .as_array()?
                .iter()
                .find(|s| s["substation_id"] == "s1")?
                .clone();
            (s1["capacity_kw"] == 20.0).then_some(())
        },
    )
    .await
    .expect("s1 reports the limit within 20 s");
    pipeline.restart_substation(0).await;
    assert_no_service_refused(&pipeline);

    // Substation s1's credentials speak for s1 only.
    // Its own session records are the only request states it may write: not a request's own
    // record (the dispatcher's), nor another substation's session of it.
    let (s1, mut errors) = connect_as(&url, "substation-s1").await;
    let request_state = format!("$KV.EV_REQUEST_STATE.{id}");
    let s2_session = format!("$KV.EV_REQUEST_STATE.{id}.s2");
    for subject in [
        "ev.telemetry.s2",
        "ev.limits.s1",
        "ev.dispatch.s1",
        "ev.requests",
        "ev.sessions.s2.completed",
        &request_state,
        &s2_session,
    ] {
        s1.publish(subject.to_owned(), "{}".into()).await.unwrap();
        s1.flush().await.unwrap();
        refused(&mut errors, "publish", subject).await;
    }
    // Nor can it read what is delivered to others: their dispatches, or replies to anyone.
    for subject in ["ev.dispatch.s2", "_INBOX.>", "_INBOX_substation-s2.>"] {
        let _sub = s1.subscribe(subject).await.unwrap();
        s1.flush().await.unwrap();
        refused(&mut errors, "subscription", subject).await;
    }

    // The observer reads but sends nothing; ingest cannot dispatch.
    let (observer, mut errors) = connect_as(&url, "observer").await;
    observer.publish("ev.requests", "{}".into()).await.unwrap();
    observer.flush().await.unwrap();
    refused(&mut errors, "publish", "ev.requests").await;
    let (ingest, mut errors) = connect_as(&url, "ingest").await;
    for subject in ["ev.dispatch.s1", &request_state] {
        ingest
            .publish(subject.to_owned(), "{}".into())
            .await
            .unwrap();
        ingest.flush().await.unwrap();
        refused(&mut errors, "publish", subject).await;
    }
    // The record is as the pipeline left it.
    let record = get_json(&pipeline.http, &state_url).await.unwrap();
    assert_eq!(record["state"], "completed", "{record}");

    // No one without credentials.
    assert!(
        async_nats::connect(&url).await.is_err(),
        "anonymous connection accepted"
    );

    pipeline.stop().await;
}

/// The dispatcher's failover under the roles: a substation that stops for good has its
/// requests moved to the others, and every one completes, with no refusal of any service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_substations_requests_move_under_the_roles() {
    let mut pipeline = Pipeline::start(Options {
        secured: true,
        dispatcher_args: &["--substation-timeout", "1s"],
        ..Options::default()
    })
    .await;
    let api = pipeline.url("");
    // Long charges (100 kWh at 11 kW: 9 grid-hours, 9 s here), so s1 still holds some.
    let mut ids = Vec::new();
    for i in 0..9 {
        let body = serde_json::json!({"vehicle_id": format!("ev-{i}"), "energy_kwh": 100, "max_power_kw": 11});
        ids.push(submit(&pipeline.http, &api, body.to_string()).await);
    }
    let state = |id: &String| format!("{api}/v1/charge-requests/{id}");
    let on_s1 = eventually(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            let mut on_s1 = 0;
            for id in &ids {
                let record = get_json(&pipeline.http, &state(id)).await?;
                if record["substation_id"].is_null() {
                    return None;
                }
                on_s1 += usize::from(record["substation_id"] == "s1");
            }
            Some(on_s1)
        },
    )
    .await
    .expect("every request dispatched within 10 s");
    assert!(on_s1 > 0, "s1 got none of the 9 requests");

    pipeline.stop_substation(0).await;
    for id in &ids {
        let record = eventually(
            Duration::from_secs(60),
            Duration::from_millis(200),
            || async {
                let record = get_json(&pipeline.http, &state(id)).await?;
                (record["state"] == "completed").then_some(record)
            },
        )
        .await
        .unwrap_or_else(|_| panic!("{id} completed within 60 s"));
        assert_ne!(record["substation_id"], "s1", "{record}");
    }
    assert_no_service_refused(&pipeline);
}

#[tokio::test]
async fn nats_users_writes_passwords_and_the_block_a_server_takes() {
    let dir = tempfile::tempdir().unwrap();
    let (credentials, block) = (
        dir.path().join("credentials"),
        dir.path().join("users.conf"),
    );
    let (ok, _, stderr) = crate::helpers::evgrid(&[
        "nats-users",
        "--substation",
        "s1,s2",
        "--dir",
        credentials.to_str().unwrap(),
        "--out",
        block.to_str().unwrap(),
    ])
    .await;
    assert!(ok, "{stderr}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&block).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the block holds the passwords");
    }
    let server = evgrid_test_support::NatsServer::start_configured(
        &std::fs::read_to_string(&block).unwrap(),
    )
    .unwrap();
    let password = std::fs::read_to_string(credentials.join("substation-s2")).unwrap();
    async_nats::ConnectOptions::with_user_and_password(
        "substation-s2".into(),
        password.trim().into(),
    )
    .connect(server.url())
    .await
    .expect("substation-s2 connects with its password");
    assert!(async_nats::connect(server.url()).await.is_err());

    let (ok, _, stderr) = crate::helpers::evgrid(&["nats-users", "--substation", "s 1"]).await;
    assert!(!ok && stderr.contains("--substation"), "{stderr}");
}

/// `POST /v1/charge-requests` with `client`, an optional `Idempotency-Key` and `body`.
async fn post(
    client: &reqwest::Client,
    api: &str,
    idempotency_key: Option<&str>,
    body: &serde_json::Value,
) -> reqwest::Response {
    let mut request = client
        .post(format!("{api}/v1/charge-requests"))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(key) = idempotency_key {
        request = request.header("idempotency-key", key);
    }
    request.send().await.unwrap()
}

/// The status and problem type of an answer.
async fn problem(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap();
    let kind = body["type"].as_str().unwrap_or_default();
    (status, kind.rsplit('/').next().unwrap().to_owned())
}

/// Attacks 7 and 8 of issue #11 over HTTP, with ingest's keys as `evgrid up` runs it: a key
/// reads only its own requests, and nobody can name (so overwrite) another's request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_decide_who_submits_and_reads_and_ids_cannot_be_taken() {
    let pipeline = Pipeline::start(Options {
        secured: true,
        ..Options::default()
    })
    .await;
    let api = pipeline.url("");
    let keys = pipeline.keys.as_ref().unwrap();
    let (alice, mallory) = (client_with_key(&keys.alice), client_with_key(&keys.mallory));
    let body =
        serde_json::json!({"vehicle_id": "alice-car", "energy_kwh": 5.0, "max_power_kw": 11.0});

    // Without a key, or with an unknown one: 401, and nothing is stored.
    let anonymous = reqwest::Client::new();
    let response = post(&anonymous, &api, None, &body).await;
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer realm=\"evgrid\""
    );
    assert_eq!(problem(response).await, (401, "unauthorized".into()));
    let forged = client_with_key("evg_0000");
    assert_eq!(
        problem(post(&forged, &api, None, &body).await).await,
        (401, "unauthorized".into())
    );
    // A client key may not see the grid: that is the operator's.
    let response = mallory
        .get(pipeline.url("/v1/substations"))
        .send()
        .await
        .unwrap();
    assert_eq!(problem(response).await, (403, "forbidden".into()));

    // Alice's request, under her Idempotency-Key; its id is not the UUIDv5 of the key anyone
    // could compute (attack 7's premise).
    let response = post(&alice, &api, Some("order-1"), &body).await;
    assert_eq!(response.status(), 202);
    let id: String = response.json::<serde_json::Value>().await.unwrap()["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(
        id,
        evgrid_model::messages::request_id_from_idempotency_key("order-1").to_string()
    );
    let state_url = pipeline.url(&format!("/v1/charge-requests/{id}"));
    let completed = eventually(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let record = get_json(&alice, &state_url).await?;
            (record["state"] == "completed").then_some(record)
        },
    )
    .await
    .expect("alice's request completes within 30 s");

    // Attack 8: another key cannot read it (404, as for an id that does not exist); the
    // operator can.
    let response = mallory.get(&state_url).send().await.unwrap();
    assert_eq!(problem(response).await, (404, "not-found".into()));
    assert_eq!(
        get_json(&pipeline.http, &state_url).await.unwrap(),
        completed
    );

    // Attack 7: Mallory sends Alice's Idempotency-Key and names Alice's id in the body, with a
    // body no substation can deliver. Both map into Mallory's own ids: hers is another request,
    // rejected on its own, and Alice's completed record stays exactly as it was.
    let undeliverable = serde_json::json!({
        "request_id": id,
        "vehicle_id": "mallory-car",
        "energy_kwh": 50.0,
        "max_power_kw": 11.0,
        "departure": (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339(),
        "all_or_nothing": true,
    });
    let mut mallorys = Vec::new();
    for key in [Some("order-1"), None] {
        let mut body = undeliverable.clone();
        if key.is_some() {
            body.as_object_mut().unwrap().remove("request_id");
        }
        let response = post(&mallory, &api, key, &body).await;
        assert_eq!(response.status(), 202);
        let theirs = response.json::<serde_json::Value>().await.unwrap()["request_id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_ne!(theirs, id, "Mallory named Alice's request");
        mallorys.push(theirs);
    }
    for theirs in &mallorys {
        let url = pipeline.url(&format!("/v1/charge-requests/{theirs}"));
        eventually(
            Duration::from_secs(30),
            Duration::from_millis(100),
            || async {
                let record = get_json(&mallory, &url).await?;
                (record["state"] == "rejected").then_some(())
            },
        )
        .await
        .expect("Mallory's requests are rejected, as hers");
    }
    assert_eq!(get_json(&alice, &state_url).await.unwrap(), completed);

    // A key over its rate is told when to come back.
    let slow = client_with_key(&keys.slow);
    let mut limited = None;
    for _ in 0..20 {
        let response = post(&slow, &api, None, &body).await;
        if response.status() == 429 {
            limited = Some(response);
            break;
        }
        assert_eq!(response.status(), 202);
    }
    let response = limited.expect("20 requests at once exceed 5 a second");
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(problem(response).await, (429, "rate-limited".into()));
    pipeline.stop().await;
}
