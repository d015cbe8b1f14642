//! The steady demo load of `evgrid up --demo`: real charging sessions from the Caltech ACN data
//! (`data/acn-caltech`, built into the binary), published to `ev.requests` as a nats CLI user
//! would, at a rate sized to the grid so dispatch is visible as soon as the grid is up and a
//! request of your own still finds power.

use evgrid_common::config::NatsAuth;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use chrono::Utc;
use evgrid_model::{messages::ChargeRequest, subjects};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The ACN stations' charging rate, kW.
const ACN_MAX_KW: f64 = 6.6;

/// Share of the grid's capacity the demo aims to use on average: busy (queues form at the
/// smaller substations now and then) but far from saturated, so a request posted by hand during
/// the demo charges within seconds.
pub const DEMO_UTILIZATION: f64 = 0.4;

/// The trace the demo replays, built in so `evgrid up --demo` works from any directory.
const TRACE: &[u8] = include_bytes!("../../data/acn-caltech/2019-09_2019-12.csv.gz");
const TRACE_NAME: &str = "data/acn-caltech/2019-09_2019-12.csv.gz";

/// The banner's name for the real trace (tests look for it).
pub const ACN_SOURCE: &str = "Caltech ACN sessions";
/// The banner's name for the fallback mix.
pub const SYNTHETIC_SOURCE: &str = "a synthetic mix";

/// One demo request: energy and how long the car stays.
#[derive(Debug, Clone, Copy)]
struct Sample {
    energy_kwh: f64,
    stay: chrono::Duration,
}

/// The sessions the demo replays, in trace order.
#[derive(Debug)]
pub struct Demo {
    samples: Vec<Sample>,
    source: &'static str,
}

impl Demo {
    /// The built-in ACN sessions (those asking more than a car at 6.6 kW can take before it
    /// leaves are charged what fits, best effort); a synthetic mix if the trace cannot be read.
    pub fn load() -> Demo {
        let gz = flate2::read::MultiGzDecoder::new(TRACE);
        let samples: Vec<Sample> = match evgrid_sim::trace::parse(gz, Path::new(TRACE_NAME)) {
            Ok(sessions) => sessions
                .into_iter()
                .filter(|s| s.energy_kwh > 0.0 && s.departure > s.arrival)
                .map(|s| Sample {
                    energy_kwh: s.energy_kwh.min(evgrid_model::validate::ENERGY_KWH_MAX),
                    stay: s.departure - s.arrival,
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %evgrid_common::error::chain(&e), "no ACN trace; the demo uses a synthetic mix");
                Vec::new()
            }
        };
        if samples.is_empty() {
            return Demo {
                samples: (1..=20)
                    .map(|i| Sample {
                        energy_kwh: 5.0 + 2.5 * f64::from(i),
                        stay: chrono::Duration::hours(8 + i64::from(i % 4)),
                    })
                    .collect(),
                source: SYNTHETIC_SOURCE,
            };
        }
        Demo {
            samples,
            source: ACN_SOURCE,
        }
    }

    /// Where the sessions come from, for the banner.
    pub fn source(&self) -> &'static str {
        self.source
    }

    /// Requests per real second that use [`DEMO_UTILIZATION`] of `capacity_kw` on average at
    /// `time_scale`: the energy asked for per simulated hour, rate × 3600 / time_scale × mean
    /// energy, equals that share of the capacity.
    pub fn rate_for(&self, capacity_kw: f64, time_scale: f64) -> f64 {
        let mean_kwh =
            self.samples.iter().map(|s| s.energy_kwh).sum::<f64>() / self.samples.len() as f64;
        let rate = DEMO_UTILIZATION * capacity_kw * time_scale / (3600.0 * mean_kwh);
        // Round to one decimal as the banner shows it; at least one request every 10 s.
        ((rate * 10.0).round() / 10.0).max(0.1)
    }

    /// Publishes demo requests at `rate` per second until `shutdown`.
    pub async fn drive(
        self,
        nats_url: String,
        auth: NatsAuth,
        rate: f64,
        shutdown: CancellationToken,
    ) {
        let Ok(nats) =
            evgrid_common::nats::connect(&nats_url, &auth, "evgrid-up-demo", &shutdown).await
        else {
            return;
        };
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        for (n, sample) in self.samples.iter().cycle().enumerate() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let request = ChargeRequest {
                request_id: Some(Uuid::new_v4()),
                vehicle_id: format!("demo-{}", n % 500),
                energy_kwh: sample.energy_kwh,
                max_power_kw: ACN_MAX_KW,
                departure: Some(Utc::now() + sample.stay),
                all_or_nothing: false,
            };
            let payload = serde_json::to_vec(&request).expect("serialisable").into();
            let publish = PublishMessage::build().payload(payload);
            match nats.js.send_publish(subjects::REQUESTS, publish).await {
                Ok(ack) => drop(ack),
                Err(e) => tracing::warn!(error = %e, "demo request not sent"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_trace_is_read_and_sized_to_the_grid() {
        let demo = Demo::load();
        assert_eq!(demo.source(), ACN_SOURCE);
        assert!(demo.samples.len() > 2000, "{}", demo.samples.len());
        // The quick start's grid: 300 kW at an hour per second.
        let rate = demo.rate_for(300.0, 3600.0);
        assert!((5.0..=15.0).contains(&rate), "{rate}");
        // Ten times slower time, a tenth of the rate (within rounding).
        assert!((demo.rate_for(300.0, 360.0) - rate / 10.0).abs() <= 0.1);
    }
}
