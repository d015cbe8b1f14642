//! Prometheus plumbing shared by every service: a registry with process metrics (CPU, RSS,
//! open fds) and the text encoder behind `GET /metrics`. Each service declares its own
//! metrics in its `metrics.rs`.

use evgrid_model::messages::HeartbeatError;
use prometheus::{Encoder, IntCounterVec, Opts, Registry, TextEncoder};

/// A fresh registry holding the process collector.
pub fn registry() -> Registry {
    let registry = Registry::new();
    #[cfg(target_os = "linux")]
    {
        let _ = registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
    }
    registry
}

/// The registry in the Prometheus text exposition format.
pub fn encode(registry: &Registry) -> String {
    let mut buf = Vec::with_capacity(8 * 1024);
    // Encoding into a Vec cannot fail for well-formed metrics; a failure would be a bug in
    // a metric's declaration, better shown as a partial page than as a crash.
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut buf) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// Registers a metric built by `make`, panicking on a duplicate name: that is a programming
/// error caught by every test that builds the service.
pub fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered twice");
    metric
}

/// `reason` of a heartbeats-refused counter beside [`HeartbeatError::REASONS`]: a heartbeat of a
/// new substation while the service already tracks as many as it keeps.
pub const TOO_MANY_SUBSTATIONS: &str = "too_many_substations";

/// `<name>{reason}`: the messages on `ev.telemetry.<id>` a service that follows heartbeats
/// dropped ([`crate::heartbeats`]), one series per [`HeartbeatError::REASONS`] and
/// [`TOO_MANY_SUBSTATIONS`], pre-created at 0.
pub fn heartbeats_refused(registry: &Registry, name: &str) -> IntCounterVec {
    let counter = register(
        registry,
        IntCounterVec::new(
            Opts::new(
                name,
                "Messages on ev.telemetry.<id> dropped, by reason: malformed, wrong_substation \
                 (the body names another substation than its subject), out_of_bounds (capacity, \
                 load, demand, interval or projection), too_many_substations (a new substation \
                 while as many as are kept are known).",
            ),
            &["reason"],
        )
        .expect("valid metric"),
    );
    for reason in HeartbeatError::REASONS
        .into_iter()
        .chain([TOO_MANY_SUBSTATIONS])
    {
        counter.with_label_values(&[reason]);
    }
    counter
}
