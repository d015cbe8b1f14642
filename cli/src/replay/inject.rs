//! `evgrid replay --to-url / --to-nats-url`: the recorded requests of a window sent again into
//! the front of another grid's ingest → dispatcher → substation (a staging grid), with new
//! request ids, at `--speed` × their recorded pace, by `evgrid load`'s own senders and report.
//!
//! The plan has the shape of a trace's ([`crate::load::plan::TracePlan`]): request `i` is due at its stored
//! time after the first, divided by the speed; its stay (departure − acceptance) is its
//! departure after sending, unscaled, because the pipeline counts it on its simulated clock.
//! Run the target's substations at the recorded grid's `--time-scale` × the speed and the cars
//! see what they saw. Requests whose departure had passed when they arrived are left out (they
//! were rejected; resent, they would only be refused).

use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::load::plan::{Mix, RequestSpec, Schedule};
use crate::load::stats::Report;
use evgrid_common::config::{NatsAuth, Secret};

use crate::load::{self, LoadArgs};

use super::window::Original;

/// The schedule and the requests of `originals` resent at `speed`, and how many were left out.
pub fn plan(originals: &[Original], speed: f64) -> (Vec<Duration>, Vec<RequestSpec>, u64) {
    let first = originals.first().map(|o| o.stored_at);
    let (mut offsets, mut specs, mut left_out) = (Vec::new(), Vec::new(), 0);
    for o in originals {
        let departure_after = match o.stay_ms() {
            Some(ms) if ms <= 0 => {
                left_out += 1;
                continue;
            }
            stay => stay.map(|ms| Duration::from_millis(ms as u64)),
        };
        let since = (o.stored_at - first.unwrap_or(o.stored_at))
            .to_std()
            .unwrap_or_default();
        offsets.push(since.div_f64(speed));
        specs.push(RequestSpec {
            energy_kwh: o.request.energy_kwh,
            max_power_kw: o.request.max_power_kw,
            departure_after,
            all_or_nothing: o.request.all_or_nothing,
        });
    }
    (offsets, specs, left_out)
}

/// `evgrid load`'s options for re-injecting: `target` (its `--url` or `--nats-url` and value),
/// followed to completion when `wait_complete` (session events on `events_nats_url` for an
/// HTTP target), without a progress bar when `quiet`, with `auth` for every NATS connection
/// and `api_key` for the target ingest.
#[derive(Debug, Clone)]
pub struct Injection<'a> {
    pub target: (&'a str, &'a str),
    pub wait_complete: bool,
    pub events_nats_url: Option<&'a str>,
    pub quiet: bool,
    pub auth: &'a NatsAuth,
    /// The target ingest's API key.
    pub api_key: Option<&'a Secret>,
}

#[derive(Parser, Debug)]
struct LoadCli {
    #[command(flatten)]
    load: LoadArgs,
}

/// Sends `originals` as [`plan`] says, as `evgrid load --trace` would, and reports like it.
pub async fn run(
    originals: &[Original],
    speed: f64,
    how: Injection<'_>,
    shutdown: CancellationToken,
) -> anyhow::Result<Report> {
    // `evgrid load`'s own parser, so its defaults (timeouts, in-flight bound) hold here too.
    let mut words = vec!["load", how.target.0, how.target.1];
    if how.wait_complete {
        words.push("--wait-complete");
    }
    if let Some(url) = how.events_nats_url {
        words.extend(["--events-nats-url", url]);
    }
    if how.quiet {
        words.push("--quiet");
    }
    let mut args = LoadCli::try_parse_from(words)?.load;
    args.auth = how.auth.clone();
    if let Some(key) = how.api_key {
        args.api_key = Some(key.clone());
        args.api_key_file = None;
    }
    let (offsets, specs, left_out) = plan(originals, speed);
    if specs.is_empty() {
        anyhow::bail!("no request of the window can be sent again: every departure had passed");
    }
    load::run_plan(
        args,
        Mix::Trace(specs),
        Schedule::Trace { offsets },
        Some(left_out),
        shutdown,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};
    use evgrid_model::messages::ChargeRequest;
    use uuid::Uuid;

    fn original(stored_ms: i64, stay_s: Option<i64>) -> Original {
        let stored = DateTime::<Utc>::from_timestamp_millis(1_800_000_000_000 + stored_ms).unwrap();
        Original {
            request_id: Uuid::new_v4(),
            sequence: 1,
            stored_at: stored,
            accepted_at: stored,
            request: ChargeRequest {
                request_id: None,
                vehicle_id: "ev".into(),
                energy_kwh: 12.5,
                max_power_kw: 7.0,
                departure: stay_s.map(|s| stored + chrono::Duration::seconds(s)),
                all_or_nothing: stay_s.is_none(),
            },
        }
    }

    #[test]
    fn requests_keep_their_pace_at_the_speed_and_their_stay() {
        let originals = [
            original(0, Some(7200)),
            original(500, None),
            original(1500, Some(-5)),
            original(3000, Some(60)),
        ];
        let (offsets, specs, left_out) = plan(&originals, 2.0);
        assert_eq!(left_out, 1, "departed before it arrived");
        assert_eq!(
            offsets,
            [
                Duration::ZERO,
                Duration::from_millis(250),
                Duration::from_millis(1500)
            ]
        );
        assert_eq!(specs[0].departure_after, Some(Duration::from_secs(7200)));
        assert_eq!(specs[1].departure_after, None);
        assert!(specs[1].all_or_nothing && !specs[0].all_or_nothing);
        assert!(
            specs
                .iter()
                .all(|s| s.energy_kwh == 12.5 && s.max_power_kw == 7.0)
        );
    }
}
