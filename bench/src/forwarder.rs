//! The reference for the dispatcher (the middle of ingest → dispatcher → substation): the least
//! a router can do — consume `EV_REQUESTS` through the same durable consumer, turn each request
//! into a `Dispatch` for the next substation in turn, publish it to `ev.dispatch.<id>` with the
//! contract's `Nats-Msg-Id` and headers, await the PubAck, then ack — run as its own process
//! (`evgrid-bench forwarder`). No validation beyond parsing, no grid view, no decision, no
//! metrics, no logs per message; the same number of publishes in flight as the dispatcher.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, AckKind, Message};
use chrono::{DateTime, Utc};
use evgrid_common::config::NatsArgs;
use evgrid_common::{nats, streams};
use evgrid_model::messages::{ChargeRequest, Dispatch, request_id_from_sequence};
use evgrid_model::{headers, subjects};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Options of `evgrid-bench forwarder`.
#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    #[command(flatten)]
    pub nats: NatsArgs,

    /// Publishes awaiting their PubAck at once (the dispatcher's default).
    #[arg(long, default_value_t = 256)]
    pub max_in_flight: usize,

    /// Substations to forward to, in turn.
    #[arg(long, value_delimiter = ',', default_value = "s1,s2,s3")]
    pub substations: Vec<String>,
}

/// Forwards until `shutdown`, then finishes what is in flight.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let nats = nats::connect(
        &config.nats.nats_url,
        &config.nats.auth,
        "evgrid-bench-forwarder",
        &shutdown,
    )
    .await?;
    streams::ensure(&nats.js, &streams::Retention::default()).await?;
    let subjects: Vec<Arc<str>> = config
        .substations
        .iter()
        .map(|s| Arc::from(s.as_str()))
        .collect();
    // The dispatcher's consumer, with the same bound on un-acked messages.
    let desired =
        streams::dispatcher_consumer((config.max_in_flight as i64) * 4, config.nats.replicas);
    let mut in_flight = FuturesUnordered::new();
    let mut turn = 0usize;
    'rebuild: while !shutdown.is_cancelled() {
        let consumer: PullConsumer = match nats.js.get_stream(streams::REQUESTS).await {
            Ok(stream) => stream
                .get_or_create_consumer(streams::DISPATCHER_CONSUMER, desired.clone())
                .await
                .map_err(anyhow::Error::from)?,
            Err(e) => {
                tracing::warn!(error = %e, "no EV_REQUESTS yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut messages = consumer.messages().await?;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break 'rebuild,
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                next = messages.next(), if in_flight.len() < config.max_in_flight => match next {
                    Some(Ok(msg)) => {
                        let substation = subjects[turn % subjects.len()].clone();
                        turn += 1;
                        in_flight.push(forward(nats.js.clone(), msg, substation));
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "consumer failed; rebuilding");
                        continue 'rebuild;
                    }
                    None => continue 'rebuild,
                },
            }
        }
    }
    while in_flight.next().await.is_some() {}
    nats.client.flush().await?;
    Ok(())
}

async fn forward(js: jetstream::Context, msg: Message, substation: Arc<str>) {
    let Ok(info) = msg.info() else { return };
    let (stream_seq, published) = (info.stream_sequence, info.published);
    let Ok(request) = serde_json::from_slice::<ChargeRequest>(&msg.payload) else {
        let _ = msg.ack_with(AckKind::Term).await;
        return;
    };
    let header = |name: &str| {
        msg.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str())
    };
    let request_id = request
        .request_id
        .or_else(|| header(headers::REQUEST_ID).and_then(|v| Uuid::parse_str(v).ok()))
        .unwrap_or_else(|| request_id_from_sequence(stream_seq));
    let accepted_at = header(headers::ACCEPTED_AT)
        .and_then(|v| DateTime::parse_from_rfc3339(v).ok())
        .map_or_else(
            || DateTime::from_timestamp_nanos(published.unix_timestamp_nanos() as i64),
            |t| t.to_utc(),
        );
    let dispatch = Dispatch {
        request_id,
        substation_id: substation.to_string(),
        vehicle_id: request.vehicle_id,
        energy_kwh: request.energy_kwh,
        energy_expected_kwh: None,
        max_power_kw: request.max_power_kw,
        departure: request.departure,
        accepted_at,
        dispatched_at: Utc::now(),
        request_seq: stream_seq,
    };
    let payload = serde_json::to_vec(&dispatch).expect("a Dispatch serializes");
    let message = PublishMessage::build()
        .payload(payload.into())
        .message_id(format!("dispatch-{request_id}"))
        .header(headers::REQUEST_ID, request_id.to_string())
        .header(headers::ACCEPTED_AT, accepted_at.to_rfc3339());
    let stored = async {
        js.send_publish(subjects::dispatch(&substation), message)
            .await?
            .await
    }
    .await;
    let kind = match stored {
        Ok(_) => AckKind::Ack,
        Err(_) => AckKind::Nak(Some(Duration::from_secs(1))),
    };
    let _ = msg.ack_with(kind).await;
}
