//! API keys (issue #11): who may call, what each scope allows, whose requests a key reads, and
//! the rate limit, over real HTTP against ingest with a keys file `evgrid api-key` would write.

use std::collections::HashMap;

use evgrid_ingest::auth::{Rate, Scope};
use evgrid_test_support::NatsServer;
use reqwest::Method;
use serde_json::json;

use crate::helpers::{Reply, TestApp, sample, spawn_app_with_keys};

/// Ingest with keys: `ops` (operator), `fleet` and `other` (submit, read), `poster` (submit
/// only), `slow` (submit, read at 2 a second).
async fn keyed_app(nats: &NatsServer) -> (TestApp, HashMap<String, String>) {
    spawn_app_with_keys(
        nats,
        &[
            ("ops", &[Scope::Operator], Rate::Default),
            ("fleet", &[Scope::Submit, Scope::Read], Rate::Default),
            ("other", &[Scope::Submit, Scope::Read], Rate::Default),
            ("poster", &[Scope::Submit], Rate::Default),
            ("slow", &[Scope::Submit, Scope::Read], Rate::PerSecond(2.0)),
        ],
    )
    .await
}

fn body() -> serde_json::Value {
    json!({"vehicle_id": "ev-1", "energy_kwh": 10.0, "max_power_kw": 11.0})
}

impl TestApp {
    /// `method path` with `key` (if any) as the bearer, and `body` as JSON (if any).
    async fn as_key(
        &self,
        key: Option<&str>,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Reply {
        self.send(method, path, |mut r| {
            if let Some(key) = key {
                r = r.header("authorization", format!("Bearer {key}"));
            }
            if let Some(body) = body {
                r = r
                    .header("content-type", "application/json")
                    .body(body.to_string());
            }
            r
        })
        .await
    }
}

#[tokio::test]
async fn every_api_call_needs_a_known_key_and_the_ops_endpoints_none() {
    let nats = NatsServer::start().unwrap();
    let (app, keys) = keyed_app(&nats).await;
    for (method, path) in [
        (Method::POST, "/v1/charge-requests"),
        (
            Method::GET,
            "/v1/charge-requests/6f1c0b5e-7a2d-4d55-9a3e-1f0e2b3c4d5e",
        ),
        (Method::GET, "/v1/substations"),
        (Method::GET, "/v1/api-key"),
    ] {
        for key in [None, Some("evg_not-a-key")] {
            let reply = app.as_key(key, method.clone(), path, Some(&body())).await;
            reply.problem(401, "unauthorized");
            assert_eq!(
                reply.header("www-authenticate"),
                Some("Bearer realm=\"evgrid\"")
            );
        }
    }
    let reply = app
        .send(Method::GET, "/v1/api-key", |r| {
            r.header("authorization", format!("Basic {}", keys["ops"]))
        })
        .await;
    assert!(
        reply.problem(401, "unauthorized")["detail"]
            .as_str()
            .unwrap()
            .contains("Bearer")
    );
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(app.get(path).await.status, 200, "{path}");
    }
    let metrics = app.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            r#"evgrid_ingest_rejected_total{reason="unauthorized"}"#
        ),
        2.0
    );
}

#[tokio::test]
async fn scopes_decide_what_a_key_does_and_a_key_reads_only_its_own_requests() {
    let nats = NatsServer::start().unwrap();
    let (app, keys) = keyed_app(&nats).await;
    let key = |name: &str| Some(keys[name].clone());

    // Who am I: the name, the scopes and the prefix of my ids.
    let me = app
        .as_key(key("fleet").as_deref(), Method::GET, "/v1/api-key", None)
        .await;
    assert_eq!(me.status, 200);
    let me = me.json();
    assert_eq!(me["name"], "fleet");
    assert_eq!(me["scopes"], json!(["submit", "read"]));
    let prefix = me["request_id_prefix"].as_str().unwrap().to_owned();

    let posted = app
        .as_key(
            key("fleet").as_deref(),
            Method::POST,
            "/v1/charge-requests",
            Some(&body()),
        )
        .await;
    let id = posted.accepted_id();
    assert!(id.starts_with(&prefix), "{id} {prefix}");
    let path = format!("/v1/charge-requests/{id}");
    assert_eq!(
        app.as_key(key("fleet").as_deref(), Method::GET, &path, None)
            .await
            .status,
        200
    );
    assert_eq!(
        app.as_key(key("ops").as_deref(), Method::GET, &path, None)
            .await
            .status,
        200
    );
    // Another client's request is not found, exactly as an id nobody used.
    let theirs = app
        .as_key(key("other").as_deref(), Method::GET, &path, None)
        .await;
    let nobodys = app
        .as_key(
            key("other").as_deref(),
            Method::GET,
            "/v1/charge-requests/6f1c0b5e-7a2d-4d55-9a3e-1f0e2b3c4d5e",
            None,
        )
        .await;
    theirs.problem(404, "not-found");
    nobodys.problem(404, "not-found");

    // A key without the scope: 403 naming what is missing.
    let reply = app
        .as_key(key("poster").as_deref(), Method::GET, &path, None)
        .await;
    let problem = reply.problem(403, "forbidden");
    assert!(
        problem["detail"].as_str().unwrap().contains("needs read"),
        "{problem}"
    );
    app.as_key(
        key("fleet").as_deref(),
        Method::GET,
        "/v1/substations",
        None,
    )
    .await
    .problem(403, "forbidden");
    assert_eq!(
        app.as_key(key("ops").as_deref(), Method::GET, "/v1/substations", None)
            .await
            .status,
        200
    );

    // The same Idempotency-Key from two clients: two requests, each its owner's.
    let with_key = |name: &'static str| {
        let app = &app;
        let key = keys[name].clone();
        async move {
            app.send(Method::POST, "/v1/charge-requests", |r| {
                r.header("authorization", format!("Bearer {key}"))
                    .header("idempotency-key", "order-7")
                    .header("content-type", "application/json")
                    .body(body().to_string())
            })
            .await
            .accepted_id()
        }
    };
    let (fleets, others) = (with_key("fleet").await, with_key("other").await);
    assert_ne!(fleets, others);
    assert_eq!(
        with_key("fleet").await,
        fleets,
        "the same key names the same request"
    );
}

#[tokio::test]
async fn a_key_over_its_rate_gets_429_with_retry_after_and_others_are_untouched() {
    let nats = NatsServer::start().unwrap();
    let (app, keys) = keyed_app(&nats).await;
    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..10 {
        let reply = app
            .as_key(
                Some(&keys["slow"]),
                Method::POST,
                "/v1/charge-requests",
                Some(&body()),
            )
            .await;
        statuses.push(reply.status);
        if reply.status == 429 {
            limited = Some(reply);
        }
    }
    // A burst of a second's worth (2), then refused until the bucket refills.
    assert_eq!(&statuses[..2], &[202, 202], "{statuses:?}");
    let reply = limited.unwrap_or_else(|| panic!("no 429 in {statuses:?}"));
    reply.problem(429, "rate-limited");
    assert_eq!(reply.header("retry-after"), Some("1"));
    // Another key is not slowed by it.
    let other = app
        .as_key(
            Some(&keys["fleet"]),
            Method::POST,
            "/v1/charge-requests",
            Some(&body()),
        )
        .await;
    assert_eq!(other.status, 202);
    assert!(
        sample(
            &app.metrics().await,
            r#"evgrid_ingest_rejected_total{reason="rate_limited"}"#
        ) >= 1.0
    );
}
