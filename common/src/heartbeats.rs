//! Following substation heartbeats (`ev.telemetry.<id>`, stream `EV_TELEMETRY`), for every
//! component that needs the live view of the grid: the dispatcher (to route) and ingest
//! (`GET /v1/substations`).
//!
//! An ordered consumer delivering the last heartbeat per substation first, then every new one,
//! gives a starting component the whole grid at once, without waiting a heartbeat interval.
//!
//! A heartbeat is judged by who sent it: the substation of its subject. One whose body names
//! another substation, or states numbers out of bounds ([`Telemetry::parse`]), is dropped and
//! handed to the caller's `refused` (each service counts them in a metric).

use async_nats::jetstream::consumer;
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::nats::Nats;
use crate::streams;
use evgrid_model::liveness::Observed;
use evgrid_model::messages::{HeartbeatError, Telemetry};
use evgrid_model::subjects;

/// Calls `on` for every heartbeat (the last of each substation first, then live ones) until
/// `shutdown`, and `refused` for every message dropped instead. Survives server restarts: the
/// consumer is rebuilt with backoff, replaying the last heartbeat per substation again (callers
/// keep the newest by `seq`/`stored_at`).
pub async fn follow(
    nats: Nats,
    shutdown: CancellationToken,
    mut on: impl FnMut(Observed),
    refused: impl FnMut(&HeartbeatError),
) {
    follow_telemetry(nats, shutdown, move |observed, _| on(observed), refused).await
}

/// [`follow`], with the additions substations send beside the heartbeat ([`Telemetry`]: the
/// projection and the limit in force).
pub async fn follow_telemetry(
    nats: Nats,
    shutdown: CancellationToken,
    mut on: impl FnMut(Observed, Telemetry),
    mut refused: impl FnMut(&HeartbeatError),
) {
    // The last heartbeat of every substation first, then every new one; a rebuilt consumer
    // starts over the same way (the latest per substation is what matters).
    let config = |_next| consumer::pull::OrderedConfig {
        filter_subject: subjects::TELEMETRY_ALL.into(),
        deliver_policy: consumer::DeliverPolicy::LastPerSubject,
        ..Default::default()
    };
    crate::nats::follow_ordered(&nats, streams::TELEMETRY, "heartbeat feed", config, &shutdown, |msg| {
        let stored_at = msg
            .info()
            .ok()
            .map(|i| crate::nats::to_utc(i.published))
            .unwrap_or_else(Utc::now);
        match Telemetry::parse(&msg.subject, &msg.payload) {
            Ok(telemetry) => {
                let observed = Observed {
                    heartbeat: telemetry.heartbeat.clone(),
                    stored_at,
                };
                on(observed, telemetry)
            }
            Err(e) => {
                // Debug, not warn: a flood of forged heartbeats must not flood the logs too; the
                // caller's metric counts them.
                tracing::debug!(subject = %msg.subject.escape_debug(), error = %e, "dropping a heartbeat");
                refused(&e);
            }
        }
    })
    .await
}
