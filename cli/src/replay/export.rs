//! `evgrid replay --export FILE.csv`: the recorded requests of a window in the ACN CSV format
//! that `evgrid sim --trace` and `evgrid load --trace` read (columns of `evgrid_sim::trace`), so
//! a recorded day can be kept, shared and replayed offline, or driven again into the front of
//! ingest → dispatcher → substation.
//!
//! Times are on the simulated clock of the replay ([`Clock`]): the first arrival as stored,
//! later ones stretched by `--time-scale`, so `evgrid sim --trace` sees the requests exactly as
//! `evgrid replay` simulates them (with `--vehicle-max-kw` the cars' power), and `evgrid load
//! --trace --speed <time scale>` sends them at their recorded pace. Besides the three columns
//! the trace readers use, each row keeps `max_power_kw`, `all_or_nothing`, `request_id` and
//! `vehicle_id` of the request, which they ignore. ACN rows need a departure: requests without
//! one, or whose departure had passed on arrival, are left out and counted.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::Context as _;
use chrono::SecondsFormat;
use evgrid_sim::trace::{ARRIVAL, DEPARTURE, REQUESTED_ENERGY};

use super::window::{Clock, Original};

/// Rows written and requests left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Exported {
    pub rows: usize,
    /// Requests without a departure, or leaving before they arrived: ACN has no row for them.
    pub left_out: usize,
}

/// Writes `originals` to `path` (gzipped when it ends in `.gz`, as the trace readers expect).
pub fn write(path: &Path, originals: &[Original], clock: &Clock) -> anyhow::Result<Exported> {
    let failed = || format!("cannot write {}", path.display());
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "gz") {
        let gz =
            flate2::write::GzEncoder::new(BufWriter::new(file), flate2::Compression::default());
        let (gz, exported) = rows(gz, originals, clock).with_context(failed)?;
        gz.finish()?.flush().with_context(failed)?;
        Ok(exported)
    } else {
        let (mut out, exported) =
            rows(BufWriter::new(file), originals, clock).with_context(failed)?;
        out.flush().with_context(failed)?;
        Ok(exported)
    }
}

/// Writes the header and a row per exportable request into `out`, and gives it back.
fn rows<W: Write>(out: W, originals: &[Original], clock: &Clock) -> anyhow::Result<(W, Exported)> {
    let mut csv = csv::Writer::from_writer(out);
    csv.write_record([
        ARRIVAL,
        DEPARTURE,
        REQUESTED_ENERGY,
        "max_power_kw",
        "all_or_nothing",
        "request_id",
        "vehicle_id",
    ])?;
    let mut exported = Exported {
        rows: 0,
        left_out: 0,
    };
    for o in originals {
        let Some(stay_ms) = o.stay_ms().filter(|&ms| ms > 0) else {
            exported.left_out += 1;
            continue;
        };
        let arrival = clock.sim_date(o.stored_at);
        let departure = arrival + chrono::Duration::milliseconds(stay_ms);
        let r = &o.request;
        csv.write_record([
            arrival.to_rfc3339_opts(SecondsFormat::Millis, true),
            departure.to_rfc3339_opts(SecondsFormat::Millis, true),
            r.energy_kwh.to_string(),
            r.max_power_kw.to_string(),
            r.all_or_nothing.to_string(),
            o.request_id.to_string(),
            r.vehicle_id.clone(),
        ])?;
        exported.rows += 1;
    }
    let out = csv.into_inner().map_err(|e| e.into_error())?;
    Ok((out, exported))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};
    use evgrid_model::messages::ChargeRequest;
    use evgrid_sim::workload::{Fold, from_sessions};
    use uuid::Uuid;

    fn original(n: u128, stored: DateTime<Utc>, stay_s: Option<i64>) -> Original {
        Original {
            request_id: Uuid::from_u128(n),
            sequence: n as u64,
            stored_at: stored,
            accepted_at: stored,
            request: ChargeRequest {
                request_id: None,
                vehicle_id: format!("ev-{n}"),
                energy_kwh: 7.0 + n as f64 / 3.0,
                max_power_kw: 11.0,
                departure: stay_s.map(|s| stored + chrono::Duration::seconds(s)),
                all_or_nothing: false,
            },
        }
    }

    #[test]
    fn the_trace_reads_back_as_the_replay_simulates() {
        let first = DateTime::parse_from_rfc3339("2026-12-05T09:18:21.347897749Z")
            .unwrap()
            .to_utc();
        let originals: Vec<Original> = (0..20)
            .map(|n| {
                let stored = first + chrono::Duration::microseconds(n as i64 * 48_123);
                original(n, stored, (n != 7).then_some(3600 + n as i64 * 600))
            })
            .collect();
        let clock = Clock::new(first, 3600.0);
        for name in ["t.csv", "t.csv.gz"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(name);
            let exported = write(&path, &originals, &clock).unwrap();
            assert_eq!(
                exported,
                Exported {
                    rows: 19,
                    left_out: 1
                }
            );
            let sessions = evgrid_sim::trace::read(&path).unwrap();
            let (read, skipped) = from_sessions(&sessions, Fold::None, 11.0);
            assert_eq!(skipped, 0);
            let simulated: Vec<_> = originals
                .iter()
                .filter(|o| o.request.departure.is_some())
                .map(|o| super::super::window::to_sim(o, &clock))
                .collect();
            assert_eq!(read, simulated, "{name}");
        }
    }
}
