//! How fast the dispatcher decides (ingest → **dispatcher** → substation): the pure
//! [`decide`] for every policy over grids of 3, 100 and 10,000 substations, each with a fresh
//! heartbeat, a projection and a few assignments in flight, as the live dispatcher holds them.
//! Criterion prints the throughput as `elem/s`: decisions per second on one core.
//!
//! `cargo bench -p evgrid-model --bench decision`

use std::hint::black_box;
use std::time::Duration;

use chrono::{DateTime, Utc};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use evgrid_model::decision::{Demand, GridView, Policy, decide};
use evgrid_model::liveness::Observed;
use evgrid_model::messages::{Heartbeat, PROJECTION_HORIZONS_S, Projection};
use rand::SeedableRng;
use rand::rngs::SmallRng;

const SIZES: [usize; 3] = [3, 100, 10_000];

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).expect("valid time")
}

/// `n` substations of 100 to 1,000 kW, half loaded, each with energy due over the horizons and
/// two assignments in flight.
fn grid(n: usize) -> GridView {
    let width = n.to_string().len();
    let mut grid = GridView::new();
    let demand = Demand {
        energy_kwh: 20.0,
        max_power_kw: 11.0,
        departure: Some(now() + chrono::Duration::hours(6)),
    };
    for i in 0..n {
        let capacity_kw = 100.0 + (i * 37 % 900) as f64;
        let heartbeat = Heartbeat {
            substation_id: format!("s{:0width$}", i + 1),
            seq: 1,
            sent_at: now(),
            capacity_kw,
            load_kw: capacity_kw * 0.5,
            active_sessions: 10,
            queued_sessions: 0,
            demand_kw: capacity_kw * 0.6,
            dispatch_seq: 0,
            interval_ms: 1000,
        };
        let due_kwh = PROJECTION_HORIZONS_S
            .iter()
            .map(|h| capacity_kw * 0.4 * h / 3600.0 * (1.0 + (i % 7) as f64 / 10.0))
            .collect();
        let projection = Projection {
            horizons_s: PROJECTION_HORIZONS_S.to_vec(),
            due_kwh,
            remaining_kwh: capacity_kw * 12.0,
        };
        let id = heartbeat.substation_id.clone();
        grid.observe_with(
            Observed {
                heartbeat,
                stored_at: now(),
            },
            Some(projection),
        );
        for seq in 0..2 {
            grid.record_assignment(&id, (i * 2 + seq + 1) as u64, 11.0, &demand);
        }
    }
    grid
}

fn decisions(c: &mut Criterion) {
    let demand = Demand {
        energy_kwh: 25.0,
        max_power_kw: 11.0,
        departure: Some(now() + chrono::Duration::hours(4)),
    };
    let at = now() + chrono::Duration::milliseconds(300);
    let mut group = c.benchmark_group("decide");
    group.throughput(Throughput::Elements(1));
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    for n in SIZES {
        let grid = grid(n);
        for policy in Policy::ALL {
            let mut rng = SmallRng::seed_from_u64(1);
            group.bench_with_input(BenchmarkId::new(policy.as_str(), n), &grid, |b, grid| {
                b.iter(|| decide(black_box(grid), black_box(&demand), at, policy, &mut rng))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
