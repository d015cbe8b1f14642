//! What `evgrid load` measured: counters and HDR latency histograms filled by the senders and
//! the session-event follower, and the report (text summary or one JSON object) built from them
//! at the end of the run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Why a request did not count as accepted (or, with `--wait-complete`, as completed). The
/// names are the keys of `errors` in the JSON report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// HTTP 4xx: the request was refused.
    Http4xx,
    /// HTTP 5xx (503 when ingest cannot reach NATS).
    Http5xx,
    /// Any other non-2xx HTTP status.
    HttpOther,
    /// No connection to the target.
    Connect,
    /// No answer (HTTP response or PubAck) within `--timeout`.
    Timeout,
    /// The HTTP exchange failed after connecting.
    Transport,
    /// JetStream refused the publish (no stream, no responders, …).
    Nats,
    /// Dropped before sending: `--max-in-flight` requests were already waiting.
    Overload,
    /// Accepted, then rejected by the dispatcher (`ev.rejected`).
    Rejected,
    /// Accepted, but not completed within `--complete-timeout`.
    Incomplete,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 10] = [
        Self::Http4xx,
        Self::Http5xx,
        Self::HttpOther,
        Self::Connect,
        Self::Timeout,
        Self::Transport,
        Self::Nats,
        Self::Overload,
        Self::Rejected,
        Self::Incomplete,
    ];

    /// No answer, or an answer that may change on a resend (`--retry-for`): no connection, a
    /// timeout, a broken exchange, a 5xx.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Self::Connect | Self::Timeout | Self::Transport | Self::Http5xx
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http4xx => "http_4xx",
            Self::Http5xx => "http_5xx",
            Self::HttpOther => "http_other",
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Transport => "transport",
            Self::Nats => "nats",
            Self::Overload => "overload",
            Self::Rejected => "rejected",
            Self::Incomplete => "incomplete",
        }
    }
}

/// An error of one request: its kind, and a readable detail kept as an example.
#[derive(Debug, Clone, PartialEq)]
pub struct SendError {
    pub kind: ErrorKind,
    pub detail: String,
}

impl SendError {
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }
}

/// A latency histogram in microseconds, from 1 µs to an hour, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds are valid")
}

/// Records `d` into a microsecond histogram (at least 1 µs; beyond an hour saturates).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

/// Counters shared by every sender. Cheap on the hot path: atomics, and one short lock for the
/// histogram; error examples only on errors.
#[derive(Debug)]
pub struct Recorder {
    sent: AtomicU64,
    accepted: AtomicU64,
    /// Resends (`--retry-for`), beyond each request's first send.
    retried: AtomicU64,
    errors: [AtomicU64; ErrorKind::ALL.len()],
    latency: Mutex<Histogram<u64>>,
    examples: Mutex<BTreeMap<ErrorKind, String>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            sent: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            errors: Default::default(),
            latency: Mutex::new(histogram()),
            examples: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Recorder {
    /// A request was due (sent, or dropped for overload).
    pub fn sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    /// A request is sent again (`--retry-for`).
    pub fn retried(&self) {
        self.retried.fetch_add(1, Ordering::Relaxed);
    }

    /// Resends so far.
    pub fn retried_count(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }

    /// A request was accepted `latency` after it was due.
    pub fn accepted(&self, latency: Duration) {
        record(&mut self.latency.lock().expect("poisoned"), latency);
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// A request failed; the first detail of each kind is kept as an example.
    pub fn error(&self, error: SendError) {
        self.errors[error.kind as usize].fetch_add(1, Ordering::Relaxed);
        self.examples
            .lock()
            .expect("poisoned")
            .entry(error.kind)
            .or_insert(error.detail);
    }

    /// Counts `n` errors of `kind` found after sending (rejections, incomplete sessions).
    pub fn errors_after(&self, kind: ErrorKind, n: u64, example: Option<String>) {
        if n > 0 {
            self.errors[kind as usize].fetch_add(n, Ordering::Relaxed);
            if let Some(e) = example {
                self.examples
                    .lock()
                    .expect("poisoned")
                    .entry(kind)
                    .or_insert(e);
            }
        }
    }

    pub fn sent_count(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn accepted_count(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    pub fn errors(&self) -> Errors {
        let counts: BTreeMap<String, u64> = ErrorKind::ALL
            .iter()
            .map(|k| {
                (
                    k.as_str().to_owned(),
                    self.errors[*k as usize].load(Ordering::Relaxed),
                )
            })
            .collect();
        Errors {
            total: counts.values().sum(),
            counts,
        }
    }

    pub fn error_examples(&self) -> BTreeMap<String, String> {
        self.examples
            .lock()
            .expect("poisoned")
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
            .collect()
    }

    pub fn latency(&self) -> Option<Latency> {
        Latency::of(&self.latency.lock().expect("poisoned"))
    }
}

/// Errors by kind (every kind, zeros included), and their total.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Errors {
    #[serde(flatten)]
    pub counts: BTreeMap<String, u64>,
    pub total: u64,
}

impl Errors {
    pub fn get(&self, kind: ErrorKind) -> u64 {
        self.counts.get(kind.as_str()).copied().unwrap_or(0)
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub count: u64,
}

impl Latency {
    /// Percentiles of a microsecond histogram; `None` when it is empty.
    pub fn of(h: &Histogram<u64>) -> Option<Self> {
        let ms = |us: u64| us as f64 / 1000.0;
        (!h.is_empty()).then(|| Latency {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            count: h.len(),
        })
    }
}

/// What `--wait-complete` observed on the session events and heartbeats.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Completion {
    /// Accepted requests that reached `completed`.
    pub completed: u64,
    /// Accepted requests the dispatcher rejected.
    pub rejected: u64,
    /// Accepted requests neither completed nor rejected within `--complete-timeout`.
    pub incomplete: u64,
    /// Session `interrupted` events seen (a substation stopped; the session resumes).
    pub interrupted_events: u64,
    /// Of `completed`, the cars that left at their departure before they were fully charged
    /// (the event's `outcome` is `departed`).
    pub left_short: u64,
    /// Energy the completed sessions delivered, kWh (what `evgrid sim` reports as
    /// `energy_delivered_kwh` for the same workload).
    pub energy_delivered_kwh: f64,
    /// accepted_at → dispatched_at.
    pub dispatch_latency_ms: Option<Latency>,
    /// accepted_at → the `started` event.
    pub charging_start_latency_ms: Option<Latency>,
    /// Requests dispatched to each substation.
    pub per_substation: BTreeMap<String, u64>,
    /// Highest load / capacity in any heartbeat stored during the run.
    pub peak_utilization: Option<f64>,
    /// Largest share one substation got within one heartbeat interval ÷ its capacity-weighted
    /// fair share, over intervals with at least 10 dispatches (1 = perfectly spread).
    pub herd_factor: Option<f64>,
}

/// The result of one run: printed as a summary, or as one JSON object with `--json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// `closed`, `open` or `trace`.
    pub mode: &'static str,
    /// Where requests went: the ingest URL or `nats://…` (`ev.requests`).
    pub target: String,
    /// The seed of the request mix (pass it back with `--seed` to repeat the run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Requests the plan holds.
    pub planned: u64,
    /// Requests due and attempted, dropped-for-overload included: `accepted` + send errors.
    pub sent: u64,
    /// Requests the target accepted (HTTP 2xx, or the JetStream PubAck).
    pub accepted: u64,
    /// Resends (`--retry-for`), beyond each request's first send.
    #[serde(skip_serializing_if = "is_zero")]
    pub retried: u64,
    pub errors: Errors,
    /// The first error message of each kind seen.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub error_examples: BTreeMap<String, String>,
    /// Seconds from the first request to the last answer.
    pub elapsed_s: f64,
    /// accepted ÷ elapsed_s.
    pub throughput_rps: f64,
    /// Due → accepted (closed loop: sent → accepted).
    pub latency_ms: Option<Latency>,
    /// Trace sessions left out because they ask for no energy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_skipped: Option<u64>,
    /// True when a signal stopped the run early.
    pub stopped_early: bool,
    #[serde(flatten)]
    pub completion: Option<Completion>,
}

impl Report {
    /// errors ÷ sent (0 when nothing was sent and nothing failed).
    pub fn error_ratio(&self) -> f64 {
        match (self.errors.total, self.sent) {
            (0, _) => 0.0,
            (_, 0) => 1.0,
            (e, s) => e as f64 / s as f64,
        }
    }

    /// The human summary.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let w = &mut out;
        let mode = match self.mode {
            "trace" => "trace replay",
            "open" => "open loop",
            _ => "closed loop",
        };
        let _ = writeln!(w, "evgrid load: {mode} → {}", self.target);
        if self.stopped_early {
            let _ = writeln!(w, "  (stopped early by a signal)");
        }
        let _ = writeln!(
            w,
            "  sent          {} of {} planned",
            self.sent, self.planned
        );
        let _ = writeln!(w, "  accepted      {}", self.accepted);
        if self.retried > 0 {
            let _ = writeln!(w, "  resent        {} (--retry-for)", self.retried);
        }
        let _ = write!(w, "  errors        {}", self.errors.total);
        for (kind, n) in self.errors.counts.iter().filter(|(_, n)| **n > 0) {
            let _ = write!(w, "  {kind} {n}");
        }
        let _ = writeln!(w);
        for (kind, example) in &self.error_examples {
            let _ = writeln!(w, "    {kind}: {example}");
        }
        let _ = writeln!(
            w,
            "  throughput    {:.1} req/s over {:.3} s",
            self.throughput_rps, self.elapsed_s
        );
        latency_line(w, "latency", self.latency_ms);
        if let Some(skipped) = self.trace_skipped.filter(|n| *n > 0) {
            let _ = writeln!(
                w,
                "  trace         {skipped} sessions asking for 0 kWh left out"
            );
        }
        if let Some(c) = &self.completion {
            let _ = writeln!(
                w,
                "  completed     {} (fully charged {}, left short {}; rejected {}, incomplete {}, interrupted events {})",
                c.completed,
                c.completed.saturating_sub(c.left_short),
                c.left_short,
                c.rejected,
                c.incomplete,
                c.interrupted_events
            );
            let _ = writeln!(
                w,
                "  energy        {:.1} kWh delivered",
                c.energy_delivered_kwh
            );
            latency_line(w, "dispatch", c.dispatch_latency_ms);
            latency_line(w, "charge start", c.charging_start_latency_ms);
            let _ = write!(w, "  substations  ");
            if c.per_substation.is_empty() {
                let _ = write!(w, "  (no dispatch seen)");
            }
            for (id, n) in &c.per_substation {
                let _ = write!(w, "  {id} {n}");
            }
            let _ = writeln!(w);
            let opt = |x: Option<f64>| x.map_or("n/a".to_owned(), |x| format!("{x:.3}"));
            let _ = writeln!(
                w,
                "  peak utilization {}   herd factor {}",
                opt(c.peak_utilization),
                opt(c.herd_factor)
            );
        }
        out
    }
}

fn latency_line(w: &mut String, what: &str, l: Option<Latency>) {
    match l {
        Some(l) => {
            let _ = writeln!(
                w,
                "  {what:<13} ms  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
                l.p50, l.p90, l.p99, l.p999, l.max
            );
        }
        None => {
            let _ = writeln!(w, "  {what:<13} ms  (no samples)");
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_in_milliseconds() {
        let mut h = histogram();
        for ms in 1..=1000 {
            record(&mut h, Duration::from_millis(ms));
        }
        let l = Latency::of(&h).unwrap();
        assert!((l.p50 - 500.0).abs() <= 1.0, "{l:?}");
        assert!((l.p99 - 990.0).abs() <= 1.0, "{l:?}");
        assert!((l.max - 1000.0).abs() <= 1.0, "{l:?}");
        assert_eq!(l.count, 1000);
        assert_eq!(Latency::of(&histogram()), None);
    }

    #[test]
    fn errors_count_every_kind_and_keep_one_example() {
        let r = Recorder::default();
        r.sent();
        r.sent();
        r.sent();
        r.accepted(Duration::from_millis(2));
        r.error(SendError::new(ErrorKind::Http5xx, "500 first"));
        r.error(SendError::new(ErrorKind::Http5xx, "500 second"));
        let e = r.errors();
        assert_eq!((e.get(ErrorKind::Http5xx), e.total), (2, 2));
        assert_eq!(e.counts.len(), ErrorKind::ALL.len());
        assert_eq!(r.error_examples()["http_5xx"], "500 first");
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["http_5xx"], 2);
        assert_eq!(json["total"], 2);
        assert_eq!(json["overload"], 0);
    }
}
