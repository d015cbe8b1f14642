//! What the HTTP handlers share: the NATS connection once it is usable, the recently accepted
//! requests, the live grid view and the metrics.

use std::sync::{Mutex, OnceLock, PoisonError};

use async_nats::jetstream::{kv, stream};
use chrono::{DateTime, Utc};
use evgrid_common::http::Readiness;
use evgrid_common::nats::Nats;
use evgrid_model::liveness::Observed;

use crate::auth::{Access, Caller, Scope};
use crate::metrics::Metrics;
use crate::problem::ApiError;
use crate::recent::RecentlyAccepted;
use crate::substations::{LatestHeartbeats, SubstationStatus};

pub(crate) struct AppState {
    /// Who may call, and the ids their requests get.
    pub(crate) access: Access,
    connected: OnceLock<Connected>,
    pub(crate) recent: RecentlyAccepted,
    grid: Mutex<LatestHeartbeats>,
    pub(crate) metrics: Metrics,
    /// What `/readyz` reports; a full store is recorded here by the POST that met it.
    pub(crate) readiness: Readiness,
}

/// The connection and the handles built on it once, when the streams exist.
pub(crate) struct Connected {
    pub(crate) nats: Nats,
    /// `EV_REQUESTS`, to read back a request accepted here.
    pub(crate) requests: stream::Stream<()>,
    pub(crate) request_states: kv::Store,
}

impl AppState {
    pub(crate) fn new(
        access: Access,
        recent_accepts: usize,
        metrics: Metrics,
        readiness: Readiness,
    ) -> Self {
        Self {
            access,
            connected: OnceLock::new(),
            recent: RecentlyAccepted::new(recent_accepts),
            grid: Mutex::default(),
            metrics,
            readiness,
        }
    }

    /// The caller behind `authorization` (the header's value), with `scope`, within its rate
    /// now ([`Access::check`]).
    pub(crate) fn caller(
        &self,
        authorization: Option<&str>,
        scope: Option<Scope>,
    ) -> Result<Caller, ApiError> {
        self.access
            .check(authorization, scope, std::time::Instant::now())
    }

    /// Called once, when the streams and the request-state bucket are in place.
    pub(crate) fn set_connected(
        &self,
        nats: Nats,
        requests: stream::Stream<()>,
        request_states: kv::Store,
    ) {
        let _ = self.connected.set(Connected {
            nats,
            requests,
            request_states,
        });
    }

    /// The connection, if NATS can be used right now. A disconnected client would only queue
    /// the request until its timeout: better to answer 503 at once.
    pub(crate) fn nats(&self) -> Result<&Connected, ApiError> {
        match self.connected.get() {
            Some(c) if c.nats.is_connected() => Ok(c),
            _ => Err(ApiError::NatsUnavailable),
        }
    }

    /// Takes in a heartbeat; false when it was dropped (too many substations).
    pub(crate) fn observe_heartbeat(&self, observed: Observed) -> bool {
        self.grid
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .observe(observed)
    }

    pub(crate) fn substations(&self, now: DateTime<Utc>) -> Vec<SubstationStatus> {
        self.grid
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .view(now)
    }
}
