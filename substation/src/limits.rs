//! Grid-operator limits: a substation's capacity lowered or raised at run time by a message on
//! `ev.limits.<substation_id>` (`{"capacity_kw": 80, "until": "<RFC 3339>"}`), as grid operators
//! do with OSCP/OCPP external limits. The side input of ingest → dispatcher → **substation**: the
//! substation applies a limit at once (re-allocating its sessions), reverts at `until`, and its
//! heartbeats carry the capacity in force, so the dispatcher routes by it.
//!
//! Stream `EV_LIMITS` keeps the last messages per substation: a starting substation replays
//! them in order (invalid ones ignored, as a running substation ignores them) before it charges,
//! then follows new ones. [`resolve`] is the pure rule; [`LimitFeed`] the NATS side.

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use evgrid_common::messages::Limit;
use evgrid_common::{streams, subjects};

use crate::reopen::Reopening;

/// The capacity a limit puts in force at `now`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct InForce {
    pub capacity_kw: f64,
    /// When to go back to the configured capacity; `None` = until the next message.
    pub until: Option<DateTime<Utc>>,
}

impl InForce {
    /// No limit: the configured capacity.
    pub fn configured(configured_kw: f64) -> Self {
        Self {
            capacity_kw: configured_kw,
            until: None,
        }
    }
}

/// What `limit`, received at `now`, puts in force: its capacity until its `until`, or the
/// configured capacity when it has none (`null`) or its `until` has already passed.
pub(crate) fn resolve(limit: &Limit, configured_kw: f64, now: DateTime<Utc>) -> InForce {
    match (limit.capacity_kw, limit.until) {
        (Some(_), Some(until)) if until <= now => InForce::configured(configured_kw),
        (Some(capacity_kw), until) => InForce { capacity_kw, until },
        (None, _) => InForce::configured(configured_kw),
    }
}

/// One limit message: its body and its `EV_LIMITS` sequence (a message seen twice, at start and
/// again from the consumer, is applied once).
#[derive(Debug, Clone)]
pub(crate) struct Received {
    pub payload: Bytes,
    pub seq: u64,
}

/// The limit messages of one substation: an ordered consumer on `ev.limits.<id>` delivering
/// the stored ones first, then new ones; rebuilt with backoff whenever it fails, for ever (a
/// rebuilt consumer delivers the stored ones again: callers skip sequences they have seen).
pub(crate) struct LimitFeed {
    js: jetstream::Context,
    subject: String,
    messages: Reopening<consumer::pull::Ordered>,
}

impl LimitFeed {
    pub fn new(js: jetstream::Context, substation_id: &str) -> Self {
        Self {
            js,
            subject: subjects::limits(substation_id),
            messages: Reopening::new("limit consumer"),
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
        let Self {
            js,
            subject,
            messages,
        } = self;
        let msg = messages.next(|| open(js, subject)).await;
        Received {
            seq: msg.info().map_or(0, |info| info.stream_sequence),
            payload: msg.payload.clone(),
        }
    }
}

/// An ordered consumer on `subject`, from the oldest stored limit message on.
async fn open(
    js: &jetstream::Context,
    subject: &str,
) -> Result<consumer::pull::Ordered, async_nats::Error> {
    let stream = js.get_stream_no_info(streams::LIMITS).await?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subject.to_owned(),
            // Everything stored, again after a rebuild (each handled once, by sequence), so a
            // limit published while the consumer was being rebuilt is never missed.
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    Ok(consumer.messages().await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(hour: u32) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + i64::from(hour) * 3600, 0).unwrap()
    }

    #[test]
    fn a_limit_holds_until_its_end_or_the_next_message() {
        let limit =
            |capacity_kw: Option<f64>, until: Option<DateTime<Utc>>| Limit { capacity_kw, until };
        assert_eq!(
            resolve(&limit(Some(80.0), Some(at(2))), 150.0, at(1)),
            InForce {
                capacity_kw: 80.0,
                until: Some(at(2))
            }
        );
        assert_eq!(
            resolve(&limit(Some(80.0), None), 150.0, at(1)),
            InForce {
                capacity_kw: 80.0,
                until: None
            }
        );
        // Raising above the configured capacity is the operator's call.
        assert_eq!(
            resolve(&limit(Some(200.0), None), 150.0, at(1)).capacity_kw,
            200.0
        );
        // Already over, or lifted: the configured capacity.
        for lifted in [limit(Some(80.0), Some(at(1))), limit(None, Some(at(5)))] {
            assert_eq!(resolve(&lifted, 150.0, at(1)), InForce::configured(150.0));
        }
    }
}
