//! The steady demo load of `evgrid up --demo`: real charging sessions from the Caltech ACN data
//! shipped in `data/acn-caltech`, published to `ev.requests` at a modest rate, as a nats CLI user
//! would, so dispatch is visible as soon as the grid is up.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use chrono::Utc;
use evgrid_model::{messages::ChargeRequest, subjects};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The ACN stations' charging rate, kW.
const ACN_MAX_KW: f64 = 6.6;

/// One demo request: energy and how long the car stays.
#[derive(Debug, Clone, Copy)]
struct Sample {
    energy_kwh: f64,
    stay: chrono::Duration,
}

/// The trace the demo replays, from the repository's data folder.
pub fn default_trace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/acn-caltech/2019-09_2019-12.csv.gz")
}

fn samples() -> Vec<Sample> {
    match evgrid_sim::trace::read(default_trace()) {
        Ok(sessions) => sessions
            .into_iter()
            .filter(|s| s.energy_kwh > 0.0 && s.departure > s.arrival)
            .map(|s| Sample {
                energy_kwh: s.energy_kwh.min(evgrid_model::validate::ENERGY_KWH_MAX),
                stay: s.departure - s.arrival,
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "no ACN trace; the demo uses a synthetic mix");
            (1..=20)
                .map(|i| Sample {
                    energy_kwh: 5.0 + 2.5 * f64::from(i),
                    stay: chrono::Duration::hours(2 + i64::from(i % 8)),
                })
                .collect()
        }
    }
}

/// Publishes demo requests at `rate` per second until `shutdown`.
pub async fn drive(nats_url: String, rate: f64, shutdown: CancellationToken) {
    let Ok(nats) = evgrid_common::nats::connect(&nats_url, "evgrid-up-demo", &shutdown).await
    else {
        return;
    };
    let samples = samples();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    for (n, sample) in samples.iter().cycle().enumerate() {
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
        };
        let payload = serde_json::to_vec(&request).expect("serialisable").into();
        let publish = PublishMessage::build().payload(payload);
        match nats.js.send_publish(subjects::REQUESTS, publish).await {
            Ok(ack) => drop(ack),
            Err(e) => tracing::warn!(error = %e, "demo request not sent"),
        }
    }
}
