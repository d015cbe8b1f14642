//! Grid-operator limits: a substation's capacity lowered at run time by a message on
//! `ev.limits.<substation_id>` (`{"capacity_kw": 80, "until": "<RFC 3339>"}`), as grid operators
//! do with OSCP/OCPP external limits (never raised above `--capacity-kw`). The side input of ingest → dispatcher → **substation**: the
//! substation applies a limit at once (re-allocating its sessions), reverts at `until`, and its
//! heartbeats carry the capacity in force, so the dispatcher routes by it.
//!
//! Stream `EV_LIMITS` keeps the last messages per substation: a starting substation replays
//! them in order (invalid ones ignored, as a running substation ignores them) before it charges,
//! then follows new ones. [`evgrid_model::limits::resolve`] is the pure rule; [`LimitFeed`] the NATS side.

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use evgrid_common::nats::{Nats, OrderedFeed};
use evgrid_common::streams;
use evgrid_model::subjects;

/// One limit message: its body and its `EV_LIMITS` sequence (a message seen twice, at start and
/// again from the consumer, is applied once).
#[derive(Debug, Clone)]
pub(crate) struct Received {
    pub payload: Bytes,
    pub seq: u64,
}

/// How the limit feed's ordered consumer is configured, from the next sequence.
type Config = Box<dyn FnMut(u64) -> consumer::pull::OrderedConfig + Send>;

/// The limit messages of one substation: an ordered consumer on `ev.limits.<id>` delivering
/// the stored ones first, then new ones; rebuilt whenever it fails or the client reconnects (a
/// rebuilt consumer delivers the stored ones again: callers skip sequences they have seen).
pub(crate) struct LimitFeed {
    js: jetstream::Context,
    subject: String,
    messages: OrderedFeed<Config>,
}

impl LimitFeed {
    pub fn new(nats: &Nats, substation_id: &str) -> Self {
        let subject = subjects::limits(substation_id);
        let filter = subject.clone();
        let config: Config = Box::new(move |_next| consumer::pull::OrderedConfig {
            filter_subject: filter.clone(),
            // Everything stored, again after a rebuild (each handled once, by sequence), so a
            // limit published while the consumer was being rebuilt is never missed.
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        });
        Self {
            js: nats.js.clone(),
            subject,
            messages: OrderedFeed::new(nats, streams::LIMITS, "limit consumer", config),
        }
    }

    /// The `EV_LIMITS` sequence of the newest limit message of this substation, if any: a
    /// starting substation replays up to it before it charges, so it never charges above a
    /// limit in force.
    pub async fn last_seq(&mut self) -> Result<Option<u64>, async_nats::Error> {
        let stream = self.js.get_stream_no_info(streams::LIMITS).await?;
        match stream.get_last_raw_message_by_subject(&self.subject).await {
            Ok(msg) => Ok(Some(msg.sequence)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The next limit message. Cancel-safe.
    pub async fn next(&mut self) -> Received {
        let msg = self.messages.next().await;
        Received {
            seq: msg.info().map_or(0, |info| info.stream_sequence),
            payload: msg.payload.clone(),
        }
    }
}
