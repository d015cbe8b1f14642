//! Every metric the dispatcher exports on `GET /metrics` (names as docs/metrics.md sets them: `evgrid_` prefix,
//! base units, `_total` counters, labels from small fixed sets). The dispatcher sits between
//! `ev.requests` and `ev.dispatch.<id>`: these count its decisions, what it rejected, how fast it
//! decides and publishes, the substations it sees, and the backlog of its JetStream consumer.

use evgrid_common::metrics::{TOO_MANY_SUBSTATIONS, register};
use evgrid_model::messages::{HeartbeatError, RejectReason};
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry,
};

/// `substation` label of decisions that chose none (deferred, rejected).
pub const NO_SUBSTATION: &str = "none";

/// Values of the `outcome` label of [`Metrics::decisions`].
pub mod outcome {
    pub const DISPATCHED: &str = "dispatched";
    pub const DEFERRED: &str = "deferred";
    pub const REJECTED: &str = "rejected";
}

/// A decision is a scan over the substations: ~1 µs for a few, ~10 ms would be a problem.
const DECISION_BUCKETS: &[f64] = &[
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2,
];

/// A PubAck takes ~0.1 ms on an idle local server and up to the 5 s ack timeout when NATS is
/// in trouble.
const PUBLISH_ACK_BUCKETS: &[f64] = &[
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// `state` of `evgrid_dispatch_moved_total`: moved before it started charging.
pub const MOVED_DISPATCHED: &str = "dispatched";
/// `state` of `evgrid_dispatch_moved_total`: moved while charging (interrupted, the rest moved).
pub const MOVED_CHARGING: &str = "charging";

/// The dispatcher's metrics, registered once in the service's registry.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// `evgrid_dispatch_decisions_total{substation,outcome}`.
    pub decisions: IntCounterVec,
    /// `evgrid_dispatch_decision_duration_seconds`.
    pub decision_duration: Histogram,
    /// `evgrid_dispatch_rejected_total{reason}`, counted once the rejection is stored.
    pub rejected: IntCounterVec,
    /// `evgrid_substations_up`.
    pub substations_up: IntGauge,
    /// `evgrid_substation_heartbeat_age_seconds{substation}`.
    pub heartbeat_age: GaugeVec,
    /// `evgrid_dispatch_consumer_pending_messages`.
    pub consumer_pending: IntGauge,
    /// `evgrid_dispatch_consumer_ack_pending_messages`.
    pub consumer_ack_pending: IntGauge,
    /// `evgrid_dispatch_consumer_redelivered_messages`.
    pub consumer_redelivered: IntGauge,
    /// `evgrid_dispatch_publish_ack_duration_seconds`.
    pub publish_ack_duration: Histogram,
    /// `evgrid_dispatch_moved_total{from,state}`, `state` one of [`MOVED_DISPATCHED`] and
    /// [`MOVED_CHARGING`].
    pub moved: IntCounterVec,
    /// `evgrid_dispatch_rejections_dropped_total{reason}`: rejected requests terminated without
    /// a copy in `ev.rejected`, because the server refused the copy every time.
    pub rejections_dropped: IntCounterVec,
    /// `evgrid_dispatch_heartbeats_refused_total{reason}`, `reason` one of
    /// [`HeartbeatError::REASONS`].
    pub heartbeats_refused: IntCounterVec,
}

impl Metrics {
    /// Declares every metric in `registry`, with the label values known up front pre-created
    /// so rates start at zero instead of appearing on the first event.
    pub fn new(registry: &Registry) -> Self {
        let decisions = register(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "evgrid_dispatch_decisions_total",
                    "Dispatch decisions by chosen substation (\"none\" unless dispatched) and \
                     outcome (dispatched, deferred, rejected). A request deferred N times counts N.",
                ),
                &["substation", "outcome"],
            )
            .expect("valid metric"),
        );
        for o in [outcome::DEFERRED, outcome::REJECTED] {
            decisions.with_label_values(&[NO_SUBSTATION, o]);
        }
        let rejected = register(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "evgrid_dispatch_rejected_total",
                    "Requests published to ev.rejected, by reason.",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        );
        for reason in RejectReason::ALL {
            rejected.with_label_values(&[reason.as_str()]);
        }
        let rejections_dropped = register(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "evgrid_dispatch_rejections_dropped_total",
                    "Rejected requests terminated without their copy in ev.rejected, by reason: \
                     the server refused the copy (e.g. larger than its max payload) on every \
                     one of 5 deliveries.",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        );
        for reason in RejectReason::ALL {
            rejections_dropped.with_label_values(&[reason.as_str()]);
        }
        let heartbeats_refused = evgrid_common::metrics::heartbeats_refused(
            registry,
            "evgrid_dispatch_heartbeats_refused_total",
        );
        Self {
            heartbeats_refused,
            rejections_dropped,
            decisions,
            decision_duration: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "evgrid_dispatch_decision_duration_seconds",
                        "Time to decide where one request goes (the pure decision only).",
                    )
                    .buckets(DECISION_BUCKETS.to_vec()),
                )
                .expect("valid metric"),
            ),
            rejected,
            substations_up: register(
                registry,
                IntGauge::new(
                    "evgrid_substations_up",
                    "Substations heard from within 1.5 of their heartbeat intervals (at least interval + 0.5 s).",
                )
                .expect("valid metric"),
            ),
            heartbeat_age: register(
                registry,
                GaugeVec::new(
                    Opts::new(
                        "evgrid_substation_heartbeat_age_seconds",
                        "Seconds since the last heartbeat of each substation was stored.",
                    ),
                    &["substation"],
                )
                .expect("valid metric"),
            ),
            consumer_pending: register(
                registry,
                IntGauge::new(
                    "evgrid_dispatch_consumer_pending_messages",
                    "Requests in EV_REQUESTS not yet delivered to the dispatcher consumer.",
                )
                .expect("valid metric"),
            ),
            consumer_ack_pending: register(
                registry,
                IntGauge::new(
                    "evgrid_dispatch_consumer_ack_pending_messages",
                    "Requests delivered to the dispatcher consumer and not yet acknowledged \
                     (in flight or waiting after a deferral).",
                )
                .expect("valid metric"),
            ),
            consumer_redelivered: register(
                registry,
                IntGauge::new(
                    "evgrid_dispatch_consumer_redelivered_messages",
                    "Requests the dispatcher consumer has delivered more than once and not yet \
                     acknowledged.",
                )
                .expect("valid metric"),
            ),
            publish_ack_duration: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "evgrid_dispatch_publish_ack_duration_seconds",
                        "Time from publishing a dispatch or rejection to its JetStream PubAck.",
                    )
                    .buckets(PUBLISH_ACK_BUCKETS.to_vec()),
                )
                .expect("valid metric"),
            ),
            moved: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "evgrid_dispatch_moved_total",
                        "Requests moved away from a failed substation (failover), by that \
                         substation and the request's state there (dispatched, charging).",
                    ),
                    &["from", "state"],
                )
                .expect("valid metric"),
            ),
        }
    }

    /// Counts one decision.
    pub fn decided(&self, substation: &str, outcome: &str) {
        self.decisions
            .with_label_values(&[substation, outcome])
            .inc();
    }

    /// Pre-creates the per-substation series when a substation is first heard from.
    pub fn substation_seen(&self, substation: &str) {
        self.decisions
            .with_label_values(&[substation, outcome::DISPATCHED]);
        self.heartbeat_age.with_label_values(&[substation]);
        for state in [MOVED_DISPATCHED, MOVED_CHARGING] {
            self.moved.with_label_values(&[substation, state]);
        }
    }

    /// Counts a message on `ev.telemetry.<id>` dropped instead of routed by.
    pub fn heartbeat_refused(&self, error: &HeartbeatError) {
        self.heartbeats_refused
            .with_label_values(&[error.reason()])
            .inc();
    }

    /// Counts a heartbeat of a new substation dropped because the dispatcher tracks
    /// `--max-substations` already.
    pub fn too_many_substations(&self) {
        self.heartbeats_refused
            .with_label_values(&[TOO_MANY_SUBSTATIONS])
            .inc();
    }

    /// Drops the per-substation series of a forgotten substation, so made-up or long-gone ids
    /// do not stay on `/metrics` for ever.
    pub fn substation_forgotten(&self, substation: &str) {
        for outcome in [outcome::DISPATCHED, outcome::DEFERRED, outcome::REJECTED] {
            let _ = self.decisions.remove_label_values(&[substation, outcome]);
        }
        let _ = self.heartbeat_age.remove_label_values(&[substation]);
        for state in [MOVED_DISPATCHED, MOVED_CHARGING] {
            let _ = self.moved.remove_label_values(&[substation, state]);
        }
    }

    /// The gauge of one substation's heartbeat age.
    pub fn heartbeat_age_of(&self, substation: &str) -> Gauge {
        self.heartbeat_age.with_label_values(&[substation])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported_with_its_fixed_labels() {
        let registry = prometheus::Registry::new();
        let m = Metrics::new(&registry);
        m.substation_seen("s1");
        let text = evgrid_common::metrics::encode(&registry);
        for name in [
            "evgrid_dispatch_decisions_total",
            "evgrid_dispatch_decision_duration_seconds_bucket",
            "evgrid_dispatch_rejected_total",
            "evgrid_substations_up",
            "evgrid_substation_heartbeat_age_seconds",
            "evgrid_dispatch_consumer_pending_messages",
            "evgrid_dispatch_consumer_ack_pending_messages",
            "evgrid_dispatch_consumer_redelivered_messages",
            "evgrid_dispatch_publish_ack_duration_seconds_bucket",
            "evgrid_dispatch_heartbeats_refused_total{reason=\"wrong_substation\"} 0",
            "evgrid_dispatch_rejections_dropped_total{reason=\"not_json\"} 0",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
        for reason in RejectReason::ALL {
            assert!(text.contains(&format!(
                "evgrid_dispatch_rejected_total{{reason=\"{}\"}} 0",
                reason.as_str()
            )));
        }
        assert!(text.contains(
            "evgrid_dispatch_decisions_total{outcome=\"dispatched\",substation=\"s1\"} 0"
        ));
    }
}
