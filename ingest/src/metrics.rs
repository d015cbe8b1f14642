//! Every metric ingest exports, served on `/metrics` (docs/metrics.md).
//!
//! Label values come from fixed sets (route templates, status codes, rejection reasons), and
//! every combination known in advance is resolved once at start: the request path only touches
//! atomics, never the registry, and the combinations show as 0 before they first happen.

use std::sync::Arc;
use std::time::Instant;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;

use crate::contract::{Rejection, Route};
use evgrid_common::metrics::register;
use evgrid_model::messages::HeartbeatError;

/// HTTP request durations: from 100 µs (a rejected body) to 5 s (a PubAck timing out), with
/// boundaries at 0.25 s and 1 s where latency alerts fire.
const HTTP_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// JetStream PubAck latency: ~50 µs on a local server, up to the 5 s ack timeout.
const PUBLISH_ACK_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

/// The statuses each route can answer, pre-created so they show as 0.
fn statuses(route: Route) -> &'static [u16] {
    match route {
        Route::ChargeRequests => &[202, 400, 401, 403, 405, 413, 415, 422, 429, 500, 503],
        Route::ChargeRequest => &[200, 401, 403, 404, 405, 422, 429, 500, 503],
        Route::Substations | Route::ApiKey => &[200, 401, 403, 405, 429],
        Route::Readyz => &[200, 405, 503],
        Route::Metrics | Route::Healthz => &[200, 405],
        Route::Other => &[404],
    }
}

/// Ingest's metrics, registered once per [`crate::run`].
pub(crate) struct Metrics {
    pub(crate) http: Arc<HttpMetrics>,
    publish_ack: Histogram,
    rejected: [IntCounter; Rejection::ALL.len()],
    accepted_new: IntCounter,
    accepted_duplicate: IntCounter,
    /// `evgrid_ingest_heartbeats_refused_total{reason}`.
    heartbeats_refused: IntCounterVec,
}

impl Metrics {
    pub(crate) fn register(registry: &Registry) -> Self {
        let rejected = register(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "evgrid_ingest_rejected_total",
                    "Charge requests not accepted, by reason.",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        );
        let accepted = register(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "evgrid_ingest_accepted_total",
                    "Charge requests stored in EV_REQUESTS (duplicate: the id was already stored).",
                ),
                &["duplicate"],
            )
            .expect("valid metric"),
        );
        Self {
            http: Arc::new(HttpMetrics::register(registry)),
            publish_ack: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "evgrid_ingest_publish_ack_duration_seconds",
                        "Time from publishing a charge request to its JetStream PubAck.",
                    )
                    .buckets(PUBLISH_ACK_BUCKETS.to_vec()),
                )
                .expect("valid metric"),
            ),
            rejected: Rejection::ALL.map(|r| rejected.with_label_values(&[r.as_str()])),
            accepted_new: accepted.with_label_values(&["false"]),
            accepted_duplicate: accepted.with_label_values(&["true"]),
            heartbeats_refused: evgrid_common::metrics::heartbeats_refused(
                registry,
                "evgrid_ingest_heartbeats_refused_total",
            ),
        }
    }

    /// Counts a heartbeat of a new substation dropped: as many as are shown are known.
    pub(crate) fn too_many_substations(&self) {
        self.heartbeats_refused
            .with_label_values(&[evgrid_common::metrics::TOO_MANY_SUBSTATIONS])
            .inc();
    }

    /// Counts a message on `ev.telemetry.<id>` dropped instead of shown.
    pub(crate) fn heartbeat_refused(&self, error: &HeartbeatError) {
        self.heartbeats_refused
            .with_label_values(&[error.reason()])
            .inc();
    }

    pub(crate) fn observe_publish_ack(&self, seconds: f64) {
        self.publish_ack.observe(seconds);
    }

    pub(crate) fn rejected(&self, reason: Rejection) {
        let i = Rejection::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("every reason is in ALL");
        self.rejected[i].inc();
    }

    pub(crate) fn accepted(&self, duplicate: bool) {
        if duplicate {
            self.accepted_duplicate.inc();
        } else {
            self.accepted_new.inc();
        }
    }
}

/// Per-route HTTP metrics, with the counter of each known (route, status) pair pre-resolved.
pub(crate) struct HttpMetrics {
    in_flight: IntGauge,
    requests: IntCounterVec,
    routes: Vec<RouteMetrics>,
}

struct RouteMetrics {
    duration: Histogram,
    by_status: Vec<(u16, IntCounter)>,
}

impl HttpMetrics {
    fn register(registry: &Registry) -> Self {
        let requests = register(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "evgrid_http_requests_total",
                    "HTTP requests answered, by route template and status code.",
                ),
                &["route", "status"],
            )
            .expect("valid metric"),
        );
        let duration = register(
            registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "evgrid_http_request_duration_seconds",
                    "Time to answer an HTTP request, by route template.",
                )
                .buckets(HTTP_BUCKETS.to_vec()),
                &["route"],
            )
            .expect("valid metric"),
        );
        let in_flight = register(
            registry,
            IntGauge::new(
                "evgrid_http_requests_in_flight",
                "HTTP requests being answered right now.",
            )
            .expect("valid metric"),
        );
        let routes = Route::ALL
            .iter()
            .map(|&route| RouteMetrics {
                duration: duration.with_label_values(&[route.label()]),
                by_status: statuses(route)
                    .iter()
                    .map(|&s| {
                        (
                            s,
                            requests.with_label_values(&[route.label(), &s.to_string()]),
                        )
                    })
                    .collect(),
            })
            .collect();
        Self {
            in_flight,
            requests,
            routes,
        }
    }

    /// Counts a request in flight until the returned guard is finished or dropped.
    pub(crate) fn start(self: &Arc<Self>, route: Route) -> InFlight {
        self.in_flight.inc();
        InFlight {
            metrics: self.clone(),
            route,
            started: Instant::now(),
        }
    }

    fn record(&self, route: Route, status: StatusCode, seconds: f64) {
        let metrics = &self.routes[route.index()];
        metrics.duration.observe(seconds);
        match metrics
            .by_status
            .iter()
            .find(|(s, _)| *s == status.as_u16())
        {
            Some((_, counter)) => counter.inc(),
            None => self
                .requests
                .with_label_values(&[route.label(), status.as_str()])
                .inc(),
        }
    }
}

/// One HTTP request being answered. Dropping it unfinished (the client went away) only takes
/// it out of the in-flight gauge.
pub(crate) struct InFlight {
    metrics: Arc<HttpMetrics>,
    route: Route,
    started: Instant,
}

impl InFlight {
    /// Records the answer's status and duration, and names the allowed methods on a 405.
    pub(crate) fn finish(self, mut response: Response) -> Response {
        let status = response.status();
        self.metrics
            .record(self.route, status, self.started.elapsed().as_secs_f64());
        if status == StatusCode::METHOD_NOT_ALLOWED
            && let Some(allow) = self.route.allow()
        {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_combinations_show_as_zero() {
        let registry = Registry::new();
        let _metrics = Metrics::register(&registry);
        let text = evgrid_common::metrics::encode(&registry);
        for line in [
            r#"evgrid_http_requests_total{route="/v1/charge-requests",status="202"} 0"#,
            r#"evgrid_http_requests_total{route="other",status="404"} 0"#,
            r#"evgrid_ingest_rejected_total{reason="too_large"} 0"#,
            r#"evgrid_ingest_accepted_total{duplicate="true"} 0"#,
            r#"evgrid_http_request_duration_seconds_bucket{route="/v1/substations",le="0.25"} 0"#,
            r#"evgrid_ingest_publish_ack_duration_seconds_bucket{le="0.00005"} 0"#,
            "evgrid_http_requests_in_flight 0",
            r#"evgrid_ingest_heartbeats_refused_total{reason="wrong_substation"} 0"#,
        ] {
            assert!(text.contains(line), "missing {line}\n{text}");
        }
    }

    #[test]
    fn a_finished_request_is_counted_once_and_leaves_the_gauge() {
        let registry = Registry::new();
        let metrics = Metrics::register(&registry);
        let guard = metrics.http.start(Route::Substations);
        assert_eq!(metrics.http.in_flight.get(), 1);
        let mut response = Response::new(Vec::<u8>::new().into());
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        let response = guard.finish(response);
        assert_eq!(response.headers()[header::ALLOW], "GET");
        assert_eq!(metrics.http.in_flight.get(), 0);
        let count = |status: &str| {
            metrics
                .http
                .requests
                .with_label_values(&["/v1/substations", status])
                .get()
        };
        assert_eq!(count("405"), 1);
        assert_eq!(count("200"), 0);
        // A status outside the pre-created set still counts.
        let mut odd = Response::new(Vec::<u8>::new().into());
        *odd.status_mut() = StatusCode::IM_A_TEAPOT;
        metrics.http.start(Route::Substations).finish(odd);
        assert_eq!(count("418"), 1);
    }
}
