//! The reference for ingest (the front of ingest → dispatcher → substation): the least an HTTP
//! front door can do — a warp handler that parses the same JSON body, publishes it to
//! `ev.requests` on JetStream, awaits the PubAck and answers 202 — run as its own process
//! (`evgrid-bench minimal-ingest`), so it pays for the same HTTP server, the same NATS
//! connection and the same stream as evgrid-ingest.
//!
//! With `--headers` it also sends what ingest must send by contract: `Nats-Msg-Id` = request id
//! (JetStream deduplicates on it) and the `Evgrid-Request-Id` and `Evgrid-Accepted-At` headers.
//! It does none of the rest (field validation, problem documents, metrics, recent-accept
//! memory, logs).

use std::net::SocketAddr;

use anyhow::Result;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use evgrid_common::config::{NatsArgs, parse_listen};
use evgrid_common::{http, nats, streams};
use evgrid_model::messages::ChargeRequest;
use evgrid_model::{headers, subjects};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warp::Filter;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};

/// Options of `evgrid-bench minimal-ingest`.
#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    #[command(flatten)]
    pub nats: NatsArgs,

    /// Where to serve `POST /v1/charge-requests` and `GET /readyz`.
    #[arg(long, value_parser = parse_listen)]
    pub listen: SocketAddr,

    /// Also send Nats-Msg-Id and the Evgrid-Request-Id / Evgrid-Accepted-At headers, as
    /// ingest must.
    #[arg(long)]
    pub headers: bool,
}

/// Connects, puts the streams in place, then serves until `shutdown`. The port is bound only
/// once NATS is usable, so a 200 on `/readyz` means ready.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let nats = nats::connect(
        &config.nats.nats_url,
        &config.nats.auth,
        "evgrid-bench-minimal",
        &shutdown,
    )
    .await?;
    streams::ensure(&nats.js, &streams::Retention::default()).await?;
    let listener = http::bind(config.listen).await?;
    let js = nats.js.clone();
    let with_headers = config.headers;
    let post = warp::path!("v1" / "charge-requests")
        .and(warp::post())
        .and(warp::body::bytes())
        .then(move |body: Bytes| accept(js.clone(), with_headers, body));
    let ready = warp::path!("readyz").map(|| StatusCode::OK.into_response());
    http::serve(listener, post.or(ready).unify(), shutdown).await;
    Ok(())
}

async fn accept(js: jetstream::Context, with_headers: bool, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<ChargeRequest>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let request_id = request.request_id.unwrap_or_else(Uuid::new_v4);
    let mut message = PublishMessage::build().payload(body);
    if with_headers {
        let id = request_id.to_string();
        message = message
            .message_id(&id)
            .header(headers::REQUEST_ID, id)
            .header(
                headers::ACCEPTED_AT,
                Utc::now().to_rfc3339_opts(SecondsFormat::Nanos, true),
            );
    }
    let stored = async { js.send_publish(subjects::REQUESTS, message).await?.await }.await;
    match stored {
        Ok(_) => warp::reply::with_status(
            warp::reply::json(&serde_json::json!({"request_id": request_id, "state": "queued"})),
            StatusCode::ACCEPTED,
        )
        .into_response(),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}
