//! `POST /v1/charge-requests`: what is stored, what is deduplicated, what is refused.

use chrono::{DateTime, Utc};
use evgrid_test_support::NatsServer;
use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{
    RAW_POST, jetstream, raw_answer, raw_send, sample, spawn_app, stored_requests, valid_request,
};

#[tokio::test]
async fn a_valid_request_is_stored_with_its_headers_before_the_202() {
    let nats = NatsServer::start().unwrap();
    let app = spawn_app(&nats).await;
    let js = jetstream(&nats).await;

    let mut body = valid_request();
    // Tomorrow, whole seconds, written at +02:00: stored in UTC.
    let tomorrow = DateTime::from_timestamp(Utc::now().timestamp() + 24 * 3600, 0).unwrap();
    let at_plus_two = tomorrow.with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).unwrap());
    body["departure"] = json!(at_plus_two.format("%Y-%m-%dT%H:%M:%S%:z").to_string());
    let id = app.post(&body).await.accepted_id();
    assert_eq!(Uuid::parse_str(&id).unwrap().get_version_num(), 4);

    let stream = js.get_stream("EV_REQUESTS").await.unwrap();
    let message = stream.get_raw_message(1).await.unwrap();
    assert_eq!(message.subject.as_str(), "ev.requests");
    let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(header("Nats-Msg-Id").as_deref(), Some(id.as_str()));
    assert_eq!(header("Evgrid-Request-Id").as_deref(), Some(id.as_str()));
    let accepted_at = header("Evgrid-Accepted-At").expect("Evgrid-Accepted-At");
    DateTime::parse_from_rfc3339(&accepted_at).expect("RFC 3339");
    let fraction = accepted_at.split('.').nth(1).expect("fractional seconds");
    assert_eq!(fraction.trim_end_matches('Z').len(), 9, "{accepted_at}");

    let stored: Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(
        stored,
        json!({"request_id": id, "vehicle_id": "ev-1", "energy_kwh": 30.0, "max_power_kw": 11.0,
               "departure": tomorrow.format("%Y-%m-%dT%H:%M:%SZ").to_string()})
    );
    assert_eq!(stored_requests(&js).await, 1);
}

#[tokio::test]
async fn a_car_leaving_before_its_energy_fits_is_told_what_it_can_expect() {
    let nats = NatsServer::start().unwrap();
    let app = spawn_app(&nats).await;
    let in_90_min = (Utc::now() + chrono::Duration::minutes(90)).to_rfc3339();
    let mut body = valid_request();
    body["energy_kwh"] = json!(26.0);
    body["max_power_kw"] = json!(6.6);
    body["departure"] = json!(in_90_min);

    // 6.6 kW for 1.5 h: about 9.9 kWh of the 26 asked for.
    let reply = app.post(&body).await;
    reply.accepted_id();
    let expected = reply.json()["energy_expected_kwh"]
        .as_f64()
        .expect("best effort");
    assert!((9.8..=9.9).contains(&expected), "{expected}");

    // All or nothing: no expectation (the dispatcher rejects it); nor when it fits.
    body["all_or_nothing"] = json!(true);
    let reply = app.post(&body).await;
    reply.accepted_id();
    assert!(reply.json().get("energy_expected_kwh").is_none());
    body["all_or_nothing"] = json!(false);
    body["energy_kwh"] = json!(5.0);
    let reply = app.post(&body).await;
    reply.accepted_id();
    assert!(reply.json().get("energy_expected_kwh").is_none());
}

#[tokio::test]
async fn the_same_request_id_is_stored_once() {
    let nats = NatsServer::start().unwrap();
    let app = spawn_app(&nats).await;
    let js = jetstream(&nats).await;

    // Twice by body.
    let id = Uuid::new_v4().to_string();
    let mut body = valid_request();
    body["request_id"] = json!(id);
    assert_eq!(app.post(&body).await.accepted_id(), id);
    assert_eq!(app.post(&body).await.accepted_id(), id);
    // Header and body agreeing name the same request: a third send.
    let agreeing = app
        .post_with(Some("application/json"), Some(&id), body.to_string())
        .await;
    assert_eq!(agreeing.accepted_id(), id);

    // Twice by a key that is not a UUID: a stable id derived from it.
    let plain = valid_request().to_string();
    let first = app
        .post_with(Some("application/json"), Some("order-42"), plain.clone())
        .await
        .accepted_id();
    let second = app
        .post_with(Some("application/json"), Some("order-42"), plain)
        .await
        .accepted_id();
    assert_eq!(first, second);
    assert_ne!(first, id);

    assert_eq!(stored_requests(&js).await, 2);
    let metrics = app.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            r#"evgrid_ingest_accepted_total{duplicate="false"}"#
        ),
        2.0
    );
    assert_eq!(
        sample(
            &metrics,
            r#"evgrid_ingest_accepted_total{duplicate="true"}"#
        ),
        3.0
    );
}

/// One bad input: what to send and the problem it must get.
struct Case {
    what: &'static str,
    content_type: Option<&'static str>,
    key: Option<&'static str>,
    body: String,
    status: u16,
    kind: &'static str,
    field: Option<&'static str>,
}

fn case(
    what: &'static str,
    content_type: Option<&'static str>,
    body: String,
    (status, kind): (u16, &'static str),
) -> Case {
    Case {
        what,
        content_type,
        key: None,
        body,
        status,
        kind,
        field: None,
    }
}

fn field_case(what: &'static str, body: Value, field: &'static str) -> Case {
    Case {
        field: Some(field),
        ..case(
            what,
            Some("application/json"),
            body.to_string(),
            (422, "invalid-fields"),
        )
    }
}

fn with(field: &str, value: Value) -> Value {
    let mut body = valid_request();
    body[field] = value;
    body
}

#[tokio::test]
async fn each_bad_input_gets_its_status_and_a_problem() {
    let nats = NatsServer::start().unwrap();
    let app = spawn_app(&nats).await;
    let js = jetstream(&nats).await;

    let mut missing_energy = valid_request();
    missing_energy.as_object_mut().unwrap().remove("energy_kwh");
    let cases = [
        case(
            "malformed JSON",
            Some("application/json"),
            "{\"vehicle_id\": ".into(),
            (400, "malformed-json"),
        ),
        field_case(
            "empty vehicle_id",
            with("vehicle_id", json!("")),
            "vehicle_id",
        ),
        field_case(
            "long vehicle_id",
            with("vehicle_id", json!("v".repeat(65))),
            "vehicle_id",
        ),
        field_case("zero energy", with("energy_kwh", json!(0)), "energy_kwh"),
        field_case(
            "too much energy",
            with("energy_kwh", json!(200.5)),
            "energy_kwh",
        ),
        field_case("missing energy", missing_energy, "energy_kwh"),
        field_case(
            "too much power",
            with("max_power_kw", json!(401)),
            "max_power_kw",
        ),
        field_case(
            "power as text",
            with("max_power_kw", json!("11")),
            "max_power_kw",
        ),
        field_case(
            "departure passed",
            with("departure", json!("2000-01-01T00:00:00Z")),
            "departure",
        ),
        field_case(
            "departure not a time",
            with("departure", json!("tomorrow")),
            "departure",
        ),
        field_case(
            "request_id not a UUID",
            with("request_id", json!("x")),
            "request_id",
        ),
        field_case("unknown field", with("energy_kw", json!(30)), "energy_kw"),
        field_case("not an object", json!([1, 2]), "body"),
        Case {
            key: Some("order-7"),
            ..field_case(
                "header and body name different ids",
                with("request_id", json!(Uuid::new_v4())),
                "request_id",
            )
        },
        Case {
            key: Some(" "),
            ..field_case("blank idempotency key", valid_request(), "Idempotency-Key")
        },
        case(
            "body over 64 KiB",
            Some("application/json"),
            format!("{}{}", valid_request(), " ".repeat(64 * 1024)),
            (413, "payload-too-large"),
        ),
        case(
            "text/plain",
            Some("text/plain"),
            valid_request().to_string(),
            (415, "unsupported-media-type"),
        ),
        case(
            "no content type",
            None,
            valid_request().to_string(),
            (415, "unsupported-media-type"),
        ),
    ];
    for case in &cases {
        let reply = app
            .post_with(case.content_type, case.key, case.body.clone())
            .await;
        assert_eq!(reply.status, case.status, "{}: {}", case.what, reply.text);
        let problem = reply.problem(case.status, case.kind);
        match case.field {
            Some(field) => {
                assert_eq!(problem["field"], field, "{}: {problem}", case.what);
                let named: Vec<&str> = problem["errors"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["field"].as_str().unwrap())
                    .collect();
                assert!(named.contains(&field), "{}: {problem}", case.what);
            }
            None => assert!(problem.get("field").is_none(), "{}", case.what),
        }
    }

    // Every field at fault is named, not just the first.
    let reply = app
        .post(&json!({"vehicle_id": "", "energy_kwh": -1, "max_power_kw": 11}))
        .await;
    let problem = reply.problem(422, "invalid-fields");
    assert_eq!(problem["errors"].as_array().unwrap().len(), 2, "{problem}");

    assert_eq!(stored_requests(&js).await, 0, "nothing refused is stored");
    let metrics = app.metrics().await;
    for (reason, count) in [
        ("malformed_json", 1.0),
        ("invalid_fields", 15.0),
        ("too_large", 1.0),
        ("unsupported_media_type", 2.0),
    ] {
        let series = format!(r#"evgrid_ingest_rejected_total{{reason="{reason}"}}"#);
        assert_eq!(sample(&metrics, &series), count, "{series}");
    }
}

#[tokio::test]
async fn the_limits_are_inclusive() {
    let nats = NatsServer::start().unwrap();
    let app = spawn_app(&nats).await;

    // Exactly 64 KiB (JSON padded with spaces), a charset parameter, the top of every range.
    let body =
        json!({"vehicle_id": "é".repeat(64), "energy_kwh": 200, "max_power_kw": 400}).to_string();
    let padded = format!("{body}{}", " ".repeat(64 * 1024 - body.len()));
    assert_eq!(padded.len(), 64 * 1024);
    app.post_with(Some("Application/JSON; charset=utf-8"), None, padded)
        .await
        .accepted_id();
}

#[tokio::test]
async fn a_chunked_body_needs_no_content_length() {
    let nats = NatsServer::start().unwrap();
    let app = spawn_app(&nats).await;

    let body = valid_request().to_string();
    let (a, b) = body.split_at(10);
    let request = format!(
        "{RAW_POST}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         {:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let mut tcp = raw_send(app.addr, &request).await;
    let answer = raw_answer(&mut tcp).await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
}

#[tokio::test]
async fn unknown_paths_methods_and_ids_are_problems() {
    let nats = NatsServer::start().unwrap();
    let app = spawn_app(&nats).await;

    app.get("/nowhere").await.problem(404, "not-found");
    app.get("/v1/charge-requests/a/b")
        .await
        .problem(404, "not-found");
    for (method, path, allow) in [
        (Method::GET, "/v1/charge-requests", "POST"),
        (Method::DELETE, "/v1/charge-requests", "POST"),
        (Method::POST, "/v1/substations", "GET"),
        (
            Method::PUT,
            "/v1/charge-requests/6f1c0b5e-7a2d-4d55-9a3e-1f0e2b3c4d5e",
            "GET",
        ),
        (Method::POST, "/healthz", "GET"),
    ] {
        let reply = app.send(method, path, |r| r).await;
        reply.problem(405, "method-not-allowed");
        assert_eq!(reply.header("allow"), Some(allow), "{path}");
    }
    let unknown = Uuid::new_v4();
    let problem = app
        .get(&format!("/v1/charge-requests/{unknown}"))
        .await
        .problem(404, "not-found");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains(&unknown.to_string())
    );
    let problem = app
        .get("/v1/charge-requests/not-a-uuid")
        .await
        .problem(422, "invalid-fields");
    assert_eq!(problem["field"], "request_id");
}

/// Attack 10 (docs/security.md): `max_power_kw` 1e-12, or a departure in year 9999 at 0.001
/// kW, were answered 202 and then held a session for ever. Now 422, naming the field, and not
/// stored.
#[tokio::test]
async fn a_request_that_would_stay_for_ever_is_refused_naming_the_field() {
    let nats = NatsServer::start().unwrap();
    let app = spawn_app(&nats).await;
    let js = jetstream(&nats).await;
    let past_the_stay = (Utc::now() + chrono::Duration::hours(157)).to_rfc3339();
    for (body, field) in [
        (
            json!({"vehicle_id": "ev", "energy_kwh": 30, "max_power_kw": 1e-12}),
            "max_power_kw",
        ),
        (
            json!({"vehicle_id": "ev", "energy_kwh": 0.001, "max_power_kw": 0.001,
                   "departure": "9999-12-31T00:00:00Z"}),
            "max_power_kw",
        ),
        (
            json!({"vehicle_id": "ev", "energy_kwh": 1, "max_power_kw": 11,
                   "departure": "9999-12-31T00:00:00Z"}),
            "departure",
        ),
        (
            json!({"vehicle_id": "ev", "energy_kwh": 1, "max_power_kw": 11,
                   "departure": past_the_stay}),
            "departure",
        ),
        // No departure: 200 kWh at 1 kW is 200 h, longer than the longest stay.
        (
            json!({"vehicle_id": "ev", "energy_kwh": 200, "max_power_kw": 1}),
            "max_power_kw",
        ),
    ] {
        let problem = app.post(&body).await.problem(422, "invalid-fields");
        assert_eq!(problem["field"], field, "{body}: {problem}");
    }
    assert_eq!(stored_requests(&js).await, 0);
    // At the edges: accepted.
    let within = (Utc::now() + chrono::Duration::hours(155)).to_rfc3339();
    app.post(&json!({"vehicle_id": "ev", "energy_kwh": 1, "max_power_kw": 1, "departure": within}))
        .await
        .accepted_id();
    app.post(&json!({"vehicle_id": "ev", "energy_kwh": 156, "max_power_kw": 1}))
        .await
        .accepted_id();
}
