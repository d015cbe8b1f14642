//! Following substation heartbeats (`ev.telemetry.<id>`, stream `EV_TELEMETRY`), for every
//! component that needs the live view of the grid: the dispatcher (to route) and ingest
//! (`GET /v1/substations`).
//!
//! An ordered consumer delivering the last heartbeat per substation first, then every new one,
//! gives a starting component the whole grid at once, without waiting a heartbeat interval.

use async_nats::jetstream::{self, consumer};
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use serde::de::DeserializeOwned;

use crate::messages::{Heartbeat, Telemetry};
use crate::{streams, subjects};

/// A substation silent for this many of its heartbeat intervals is out.
pub const STALE_AFTER_INTERVALS: u32 = 3;

/// A heartbeat and when the server stored it. Ages are measured from the server's timestamp
/// rather than the substation's `sent_at`, so a substation's clock skew cannot keep it "up".
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub heartbeat: Heartbeat,
    pub stored_at: DateTime<Utc>,
}

impl Observed {
    /// Seconds since the heartbeat was stored, at `now` (never negative).
    pub fn age_seconds(&self, now: DateTime<Utc>) -> f64 {
        ((now - self.stored_at)
            .num_microseconds()
            .unwrap_or(i64::MAX) as f64
            / 1e6)
            .max(0.0)
    }

    /// Up = heard from within [`STALE_AFTER_INTERVALS`] heartbeat intervals.
    pub fn is_up(&self, now: DateTime<Utc>) -> bool {
        let limit = self.heartbeat.interval_ms as f64 / 1000.0 * f64::from(STALE_AFTER_INTERVALS);
        self.age_seconds(now) <= limit
    }
}

/// Calls `on` for every heartbeat (the last of each substation first, then live ones) until
/// `shutdown`. Survives server restarts: the consumer is rebuilt with backoff, replaying the
/// last heartbeat per substation again (callers keep the newest by `seq`/`stored_at`).
pub async fn follow(
    js: jetstream::Context,
    shutdown: CancellationToken,
    mut on: impl FnMut(Observed),
) {
    follow_parsed(js, shutdown, |heartbeat: Heartbeat, stored_at| {
        on(Observed {
            heartbeat,
            stored_at,
        })
    })
    .await
}

/// [`follow`], with the additions substations send beside the heartbeat ([`Telemetry`]: the
/// projection and the limit in force).
pub async fn follow_telemetry(
    js: jetstream::Context,
    shutdown: CancellationToken,
    mut on: impl FnMut(Observed, Telemetry),
) {
    follow_parsed(js, shutdown, |telemetry: Telemetry, stored_at| {
        let observed = Observed {
            heartbeat: telemetry.heartbeat.clone(),
            stored_at,
        };
        on(observed, telemetry)
    })
    .await
}

async fn follow_parsed<T: DeserializeOwned>(
    js: jetstream::Context,
    shutdown: CancellationToken,
    mut on: impl FnMut(T, DateTime<Utc>),
) {
    // The last heartbeat of every substation first, then every new one; a rebuilt consumer
    // starts over the same way (the latest per substation is what matters).
    let config = |_next| consumer::pull::OrderedConfig {
        filter_subject: subjects::TELEMETRY_ALL.into(),
        deliver_policy: consumer::DeliverPolicy::LastPerSubject,
        ..Default::default()
    };
    crate::nats::follow_ordered(&js, streams::TELEMETRY, config, &shutdown, |msg| {
        let stored_at = msg
            .info()
            .ok()
            .map(|i| DateTime::from_timestamp_nanos(i.published.unix_timestamp_nanos() as i64))
            .unwrap_or_else(Utc::now);
        match serde_json::from_slice::<T>(&msg.payload) {
            Ok(heartbeat) => on(heartbeat, stored_at),
            Err(e) => {
                tracing::warn!(subject = %msg.subject, error = %e, "ignoring malformed heartbeat")
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(interval_ms: u64, stored_at: DateTime<Utc>) -> Observed {
        Observed {
            heartbeat: Heartbeat {
                substation_id: "s1".into(),
                seq: 1,
                sent_at: stored_at,
                capacity_kw: 100.0,
                load_kw: 0.0,
                active_sessions: 0,
                queued_sessions: 0,
                demand_kw: 0.0,
                dispatch_seq: 0,
                interval_ms,
            },
            stored_at,
        }
    }

    #[test]
    fn silent_for_three_intervals_is_out() {
        let t0 = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let o = observed(1000, t0);
        assert!(o.is_up(t0 + chrono::Duration::milliseconds(2999)));
        assert!(o.is_up(t0 + chrono::Duration::milliseconds(3000)));
        assert!(!o.is_up(t0 + chrono::Duration::milliseconds(3001)));
        assert_eq!(o.age_seconds(t0 - chrono::Duration::seconds(5)), 0.0);
    }
}
