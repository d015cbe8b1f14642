//! Every metric of the substation stage, registered in the service's registry and served on
//! `GET /metrics`. Names follow docs/metrics.md: `evgrid_` prefix, base units (watts,
//! joules, seconds), counters ending in `_total`. Each metric carries the constant label
//! `substation="<id>"`, so one Prometheus tells many substations apart (several may run in one
//! process, each with its own registry).

use prometheus::{
    Counter, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry,
};

use evgrid_common::metrics::register;

use evgrid_model::charging::Snapshot;

const WATTS_PER_KW: f64 = 1000.0;
const JOULES_PER_KWH: f64 = 3.6e6;

/// Accept → charging started, in seconds: from a few ms (an idle substation) to a minute (a
/// saturated grid), with boundaries at the 1 s and 5 s alert thresholds.
pub const ACCEPT_TO_CHARGING_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The substation's metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// kW, label-free apart from `substation`: the original system's name, kept for continuity.
    pub current_load_kw: Gauge,
    pub load_watts: Gauge,
    pub capacity_watts: Gauge,
    pub utilization_ratio: Gauge,
    pub active_sessions: IntGauge,
    pub queued_sessions: IntGauge,
    pub throttled_sessions: IntGauge,
    pub energy_delivered_joules: Counter,
    pub sessions_started: IntCounter,
    pub sessions_completed: IntCounter,
    /// Sessions whose car left at its departure before its energy was delivered.
    pub sessions_departed: IntCounter,
    pub sessions_interrupted: IntCounter,
    /// Sessions stopped because their request moved on without this substation (failover).
    pub sessions_fenced: IntCounter,
    /// `evgrid_substation_limit_messages_total{outcome="applied"}`.
    pub limit_applied: IntCounter,
    /// `evgrid_substation_limit_messages_total{outcome="invalid"}`: logged and ignored.
    pub limit_invalid: IntCounter,
    pub accept_to_charging_seconds: Histogram,
    /// `--chargers ocpp` (docs/ocpp.md): stations connected, sessions counted at their worst
    /// case now, and the limits sent and their answers.
    pub ocpp_stations_connected: IntGauge,
    pub ocpp_untrusted_sessions: IntGauge,
    pub ocpp_worst_case: IntCounter,
    pub ocpp_limits_sent: IntCounter,
    pub ocpp_limits_accepted: IntCounter,
    pub ocpp_limits_refused: IntCounter,
    pub ocpp_walk_ins: IntCounter,
    pub ocpp_meter_readings: IntCounter,
    /// Per station: the limit in force and the power its meter shows (W). The one `station`
    /// label: ids come from the operator's stations file, a fixed set, and the Grid dashboard
    /// shows each station's limit against its draw.
    pub station_limit_watts: GaugeVec,
    pub station_power_watts: GaugeVec,
    /// Energy already counted into `energy_delivered_joules` (kWh).
    counted_kwh: f64,
}

impl Metrics {
    /// Declares every metric with `substation="<substation_id>"` and registers it in `registry`.
    pub fn new(registry: &Registry, substation_id: &str) -> Self {
        let opts =
            |name: &str, help: &str| Opts::new(name, help).const_label("substation", substation_id);
        let gauge = |name: &str, help: &str| {
            register(
                registry,
                Gauge::with_opts(opts(name, help)).expect("valid gauge"),
            )
        };
        let int_gauge = |name: &str, help: &str| {
            register(
                registry,
                IntGauge::with_opts(opts(name, help)).expect("valid gauge"),
            )
        };
        let counter = |name: &str, help: &str| {
            register(
                registry,
                IntCounter::with_opts(opts(name, help)).expect("valid counter"),
            )
        };
        let limit_messages = register(
            registry,
            IntCounterVec::new(
                opts(
                    "evgrid_substation_limit_messages_total",
                    "Grid-operator limit messages on ev.limits.<id>, by outcome (applied, or \
                     invalid: logged and ignored).",
                ),
                &["outcome"],
            )
            .expect("valid counter"),
        );
        Self {
            limit_applied: limit_messages.with_label_values(&["applied"]),
            limit_invalid: limit_messages.with_label_values(&["invalid"]),
            current_load_kw: gauge(
                "substation_current_load",
                "Power drawn now, in kW (the original name; see evgrid_substation_load_watts).",
            ),
            load_watts: gauge(
                "evgrid_substation_load_watts",
                "Power drawn by the charging sessions now, in watts.",
            ),
            capacity_watts: gauge(
                "evgrid_substation_capacity_watts",
                "Power the substation can deliver in total, in watts.",
            ),
            utilization_ratio: gauge(
                "evgrid_substation_utilization_ratio",
                "Load divided by capacity (0 to 1).",
            ),
            active_sessions: int_gauge(
                "evgrid_substation_active_sessions",
                "Sessions drawing power.",
            ),
            queued_sessions: int_gauge(
                "evgrid_substation_queued_sessions",
                "Sessions accepted and waiting for power.",
            ),
            throttled_sessions: int_gauge(
                "evgrid_substation_throttled_sessions",
                "Sessions drawing less than their car's max power.",
            ),
            energy_delivered_joules: register(
                registry,
                Counter::with_opts(opts(
                    "evgrid_substation_energy_delivered_joules_total",
                    "Energy delivered to cars, in joules (simulated).",
                ))
                .expect("valid counter"),
            ),
            sessions_started: counter(
                "evgrid_substation_sessions_started_total",
                "Sessions that started drawing power (a resumed session starts again).",
            ),
            sessions_completed: counter(
                "evgrid_substation_sessions_completed_total",
                "Sessions whose requested energy was delivered.",
            ),
            sessions_departed: counter(
                "evgrid_substation_sessions_departed_total",
                "Sessions whose car left at its departure before its energy was delivered \
                 (their request is completed with the energy it got).",
            ),
            sessions_interrupted: counter(
                "evgrid_substation_sessions_interrupted_total",
                "Sessions stopped by a shutdown before completion (resumed on restart).",
            ),
            sessions_fenced: counter(
                "evgrid_substation_sessions_fenced_total",
                "Sessions stopped because their request was moved to another substation while \
                 this one was cut off or frozen (failover fencing): not charged here again.",
            ),
            accept_to_charging_seconds: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "evgrid_request_accept_to_charging_seconds",
                        "Wall time from a request's acceptance by ingest to its first power.",
                    )
                    .const_label("substation", substation_id)
                    .buckets(ACCEPT_TO_CHARGING_BUCKETS.to_vec()),
                )
                .expect("valid histogram"),
            ),
            ocpp_stations_connected: int_gauge(
                "evgrid_substation_ocpp_stations_connected",
                "Charging stations connected over OCPP now (--chargers ocpp).",
            ),
            ocpp_untrusted_sessions: int_gauge(
                "evgrid_substation_ocpp_worst_case_sessions",
                "Sessions counted at their station's most because the station is out of reach, \
                 refused or never answered its limit, or draws more than it.",
            ),
            ocpp_worst_case: counter(
                "evgrid_substation_ocpp_worst_case_total",
                "Times a session was put at its station's worst case (see \
                 evgrid_substation_ocpp_worst_case_sessions).",
            ),
            ocpp_limits_sent: counter(
                "evgrid_substation_ocpp_limits_sent_total",
                "Charging limits (SetChargingProfile) sent to stations.",
            ),
            ocpp_limits_accepted: counter(
                "evgrid_substation_ocpp_limits_accepted_total",
                "Charging limits stations accepted.",
            ),
            ocpp_limits_refused: counter(
                "evgrid_substation_ocpp_limits_refused_total",
                "Charging limits stations rejected or did not answer in time.",
            ),
            ocpp_walk_ins: counter(
                "evgrid_substation_ocpp_walk_ins_total",
                "Cars that plugged in without a request and were charged as sessions of their own.",
            ),
            ocpp_meter_readings: counter(
                "evgrid_substation_ocpp_meter_readings_total",
                "Meter readings of transactions taken from stations (TransactionEvent, \
                 MeterValues).",
            ),
            station_limit_watts: register(
                registry,
                GaugeVec::new(
                    opts(
                        "evgrid_substation_station_limit_watts",
                        "The charging limit in force at a station's transaction, in watts.",
                    ),
                    &["station"],
                )
                .expect("valid gauge"),
            ),
            station_power_watts: register(
                registry,
                GaugeVec::new(
                    opts(
                        "evgrid_substation_station_power_watts",
                        "The power a station's meter shows its car drawing, in watts.",
                    ),
                    &["station"],
                )
                .expect("valid gauge"),
            ),
            counted_kwh: 0.0,
        }
    }

    /// Sets the gauges from the charging model and counts the energy delivered since last time.
    pub fn observe(&mut self, s: &Snapshot) {
        self.current_load_kw.set(s.load_kw);
        self.load_watts.set(s.load_kw * WATTS_PER_KW);
        self.capacity_watts.set(s.capacity_kw * WATTS_PER_KW);
        self.utilization_ratio.set(if s.capacity_kw > 0.0 {
            s.load_kw / s.capacity_kw
        } else {
            0.0
        });
        self.active_sessions.set(i64::from(s.active));
        self.queued_sessions.set(i64::from(s.queued));
        self.throttled_sessions.set(i64::from(s.throttled));
        let new_kwh = s.delivered_kwh - self.counted_kwh;
        if new_kwh > 0.0 {
            self.energy_delivered_joules
                .inc_by(new_kwh * JOULES_PER_KWH);
            self.counted_kwh = s.delivered_kwh;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_carries_the_substation_label() {
        let registry = Registry::new();
        let mut metrics = Metrics::new(&registry, "s-1");
        metrics.observe(&Snapshot {
            capacity_kw: 100.0,
            load_kw: 25.0,
            delivered_kwh: 2.0,
            ..Snapshot::default()
        });
        metrics.observe(&Snapshot {
            capacity_kw: 100.0,
            load_kw: 25.0,
            delivered_kwh: 3.0,
            ..Snapshot::default()
        });
        let families = registry.gather();
        assert_eq!(families.len(), 23);
        for family in &families {
            for metric in family.get_metric() {
                let labels: Vec<(&str, &str)> = metric
                    .get_label()
                    .iter()
                    .map(|l| (l.name(), l.value()))
                    .filter(|(name, _)| *name != "outcome")
                    .collect();
                assert_eq!(labels, [("substation", "s-1")], "{}", family.name());
            }
        }
        assert_eq!(metrics.utilization_ratio.get(), 0.25);
        assert_eq!(metrics.load_watts.get(), 25_000.0);
        assert_eq!(metrics.energy_delivered_joules.get(), 3.0 * JOULES_PER_KWH);
    }
}
