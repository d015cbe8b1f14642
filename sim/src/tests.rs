//! The simulator's claims, on workloads small enough for every CI run: the smart-dispatch results
//! of docs/dispatch.md (on one shipped trace rather than all four; the full runs are in docs/dispatch.md), the
//! capacity invariant over random workloads for every policy × allocation, determinism, and the
//! exactness of skipping futile offers.

use std::path::{Path, PathBuf};

use clap::Parser;
use evgrid_model::charging::Allocation;
use evgrid_model::decision::Policy;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::engine::{Setup, simulate};
use super::report::{Metrics, Report, Row};
use super::workload::{self, Burst, Fold, Range, Request, Synthetic};
use super::{SimArgs, compare};

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    args: SimArgs,
}

fn args(line: &str) -> SimArgs {
    Cli::try_parse_from(std::iter::once("sim").chain(line.split_whitespace()))
        .unwrap_or_else(|e| panic!("{line}: {e}"))
        .args
}

fn shipped_trace() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/acn-caltech/2020-02_2020-05.csv.gz")
        .display()
        .to_string()
}

fn row(report: &Report, policy: Policy, allocation: Allocation) -> &Metrics {
    &report
        .results
        .iter()
        .find(|r| r.policy == policy.as_str() && r.allocation == allocation.as_str())
        .unwrap_or_else(|| panic!("no row {policy:?} {allocation:?}"))
        .metrics
}

/// The metrics without the one measured on the wall clock.
fn deterministic(m: &Metrics) -> Metrics {
    Metrics {
        decisions_per_s: 0.0,
        sim_seconds: 0.0,
        ..m.clone()
    }
}

fn setup(capacities: &[f64], policy: Policy, allocation: Allocation) -> Setup {
    Setup {
        capacities: capacities.to_vec(),
        capacity_changes: Vec::new(),
        policy,
        allocation,
        heartbeat_s: 1.0,
        defer_delay_s: 1.0,
        seed: 1,
        record_load: false,
        skip_futile_offers: true,
    }
}

/// Caltech sessions of spring 2020 folded onto one week, on three substations tight enough
/// that demand exceeds supply at the weekday peaks.
fn tight_week(policies: &str, allocations: &str) -> Report {
    let line = format!(
        "--trace {} --fold week --capacities 40,60,100 --policy {policies} --allocation {allocations}",
        shipped_trace()
    );
    let args = args(&line);
    let (requests, _) = super::workload(&args).unwrap();
    compare(&args, &requests).0
}

#[test]
fn the_default_delivers_nearly_the_pooled_energy_and_beats_the_baselines() {
    let report = tight_week(
        "round-robin,least-loaded,predictive",
        Allocation::default().as_str(),
    );
    let pooled = &report.pooled_reference.metrics;
    assert_eq!(
        report.pooled_reference.allocation,
        Allocation::default().as_str()
    );
    let default = row(&report, Policy::default(), Allocation::default());
    // Demand exceeds supply: even the pooled grid leaves energy undelivered.
    assert!(pooled.energy_delivered_ratio < 0.95, "{pooled:?}");
    assert!(
        default.energy_delivered_kwh >= 0.98 * pooled.energy_delivered_kwh,
        "default {default:?} vs pooled {pooled:?}"
    );
    for baseline in [Policy::RoundRobin, Policy::LeastLoaded] {
        let b = row(&report, baseline, Allocation::default());
        assert!(
            default.energy_delivered_kwh > b.energy_delivered_kwh,
            "{baseline:?} {b:?} vs default {default:?}"
        );
    }
    for r in report.results.iter().chain([&report.pooled_reference]) {
        assert_eq!(r.metrics.capacity_violations, 0, "{r:?}");
    }
}

#[test]
fn triage_fills_more_cars_than_llf_at_nearly_its_energy_and_nothing_beats_the_bound() {
    let report = tight_week("predictive", "llf,edf,triage");
    let [llf, edf, triage] = [Allocation::Llf, Allocation::Edf, Allocation::Triage]
        .map(|allocation| row(&report, Policy::Predictive, allocation));
    assert!(
        triage.sessions_fully_served_ratio >= llf.sessions_fully_served_ratio + 0.2,
        "triage {triage:?} vs llf {llf:?}"
    );
    assert!(
        triage.sessions_fully_served_ratio >= edf.sessions_fully_served_ratio,
        "triage {triage:?} vs edf {edf:?}"
    );
    assert!(
        triage.energy_delivered_kwh >= 0.99 * llf.energy_delivered_kwh
            && triage.energy_delivered_kwh > edf.energy_delivered_kwh,
        "triage {triage:?} vs llf {llf:?} and edf {edf:?}"
    );
    // No allocation, split or pooled, delivers more than the pooled optimum.
    for r in report.results.iter().chain([&report.pooled_reference]) {
        assert!(
            r.metrics.energy_delivered_kwh <= report.energy_upper_bound_kwh * (1.0 + 1e-9),
            "{r:?} above the bound {}",
            report.energy_upper_bound_kwh
        );
    }
}

#[test]
fn deadline_aware_allocation_delivers_more_than_equal_share_when_departures_are_tight() {
    let report = tight_week("predictive", "equal-share,edf,llf");
    let equal = row(&report, Policy::Predictive, Allocation::EqualShare);
    for allocation in [Allocation::Edf, Allocation::Llf] {
        let m = row(&report, Policy::Predictive, allocation);
        assert!(
            m.energy_delivered_kwh > 1.02 * equal.energy_delivered_kwh,
            "{allocation:?} {m:?} vs equal share {equal:?}"
        );
    }
}

#[test]
fn a_burst_herds_under_least_loaded_but_not_under_the_default() {
    // 500 cars within a second (a depot at shift change), 1 s heartbeats.
    let args = args(
        "--burst 500@8h --capacities 300,500,700 --heartbeat 1s --policy all --allocation llf",
    );
    let (requests, _) = super::workload(&args).unwrap();
    let (report, _) = compare(&args, &requests);
    let herd = |policy| row(&report, policy, Allocation::Llf).herd_factor.unwrap();
    // Every request of the burst to the one substation the last heartbeats showed emptiest.
    assert!(herd(Policy::LeastLoaded) >= 2.0, "{report:?}");
    assert!(herd(Policy::default()) <= 1.2, "{report:?}");
    assert!(herd(Policy::Headroom) <= 1.2, "{report:?}");
    assert!(herd(Policy::P2c) <= 1.2, "{report:?}");
}

/// A random small workload: Poisson arrivals and a burst, with or without departures.
#[test]
fn a_car_that_waited_too_long_for_all_it_asked_is_charged_what_still_fits() {
    // One 11 kW substation, held for 2 h by the first car; the second asks for 1 h of charging
    // and stays 2.5 h, so `headroom` defers it until the first leaves, when only 0.5 h is left.
    let car = |at: f64, energy_kwh: f64, departure_h: f64| Request {
        at,
        energy_kwh,
        max_power_kw: 11.0,
        departure: Some(departure_h * 3600.0),
    };
    let requests = [car(0.0, 22.0, 2.0), car(1.0, 11.0, 2.5)];
    let run = simulate(
        &requests,
        &setup(&[11.0], Policy::Headroom, Allocation::default()),
    );
    // Live, the dispatcher charges it what fits on that later offer (best effort); so does
    // the simulator, instead of rejecting it as undeliverable.
    assert_eq!(run.rejected, 0);
    assert!(run.deferrals > 0);
    let second = run.metrics.energy_delivered_kwh - 22.0;
    assert!((5.0..5.5).contains(&second), "{second} kWh");
    assert_eq!(run.metrics.sessions_fully_served_ratio, 0.5);
}

fn random_workload(rng: &mut SmallRng) -> (Vec<Request>, Vec<f64>, f64) {
    let shape = Synthetic {
        energy_kwh: Range {
            min: 1.0,
            max: rng.random_range(2.0..60.0),
        },
        stay_h: rng.random_bool(0.8).then(|| Range {
            min: 0.2,
            max: rng.random_range(0.5..8.0),
        }),
        max_power_kw: rng.random_range(3.0..150.0),
    };
    let bursts = [Burst {
        count: rng.random_range(0..40),
        at: rng.random_range(0.0..3600.0),
    }];
    let per_hour = rng.random_range(5.0..60.0);
    let mut requests =
        workload::synthetic(Some(per_hour), 3.0 * 3600.0, &bursts, &shape, rng.random());
    workload::sort(&mut requests);
    let capacities: Vec<f64> = (0..rng.random_range(1..6))
        .map(|_| rng.random_range(5.0..300.0))
        .collect();
    let heartbeat_s = [0.5, 1.0, 5.0, 60.0][rng.random_range(0..4)];
    (requests, capacities, heartbeat_s)
}

#[test]
fn random_workloads_never_exceed_capacity_under_any_policy_or_allocation() {
    let mut rng = SmallRng::seed_from_u64(0x0053_494d);
    for case in 0..12 {
        let (requests, capacities, heartbeat_s) = random_workload(&mut rng);
        let requested: f64 = requests.iter().map(|r| r.energy_kwh).sum();
        for policy in Policy::ALL {
            for allocation in Allocation::ALL {
                let run = simulate(
                    &requests,
                    &Setup {
                        heartbeat_s,
                        defer_delay_s: heartbeat_s,
                        ..setup(&capacities, policy, allocation)
                    },
                );
                let m = &run.metrics;
                let context =
                    format!("case {case} {policy:?} {allocation:?} {capacities:?}: {m:?}");
                assert_eq!(m.capacity_violations, 0, "{context}");
                assert!(m.peak_utilization <= 1.0 + 1e-9, "{context}");
                assert!(
                    m.energy_delivered_kwh <= requested * (1.0 + 1e-9),
                    "{context}"
                );
                assert!(
                    (0.0..=1.0).contains(&m.sessions_fully_served_ratio),
                    "{context}"
                );
            }
        }
    }
}

/// `setup` run skipping futile offers, and offering every time.
fn skipping_and_not(
    requests: &[Request],
    setup: &Setup,
) -> (super::engine::Run, super::engine::Run) {
    let run = |skip_futile_offers| {
        simulate(
            requests,
            &Setup {
                skip_futile_offers,
                ..setup.clone()
            },
        )
    };
    (run(true), run(false))
}

/// Random grid-operator limits for `capacities`: a few steps each within the first hours.
fn random_limits(rng: &mut SmallRng, capacities: &[f64]) -> Vec<Vec<(f64, f64)>> {
    capacities
        .iter()
        .map(|&capacity| {
            let mut t = 0.0;
            (0..rng.random_range(0..4))
                .map(|_| {
                    t += rng.random_range(60.0..3600.0);
                    (t, capacity * rng.random_range(0.2..1.5))
                })
                .collect()
        })
        .collect()
}

#[test]
fn limits_hold_and_skipping_futile_offers_still_changes_nothing() {
    let mut rng = SmallRng::seed_from_u64(0x4c49_4d49);
    for case in 0..4 {
        let (requests, capacities, heartbeat_s) = random_workload(&mut rng);
        let limits = random_limits(&mut rng, &capacities);
        for policy in Policy::ALL {
            for allocation in [Allocation::Triage, Allocation::Edf] {
                let s = Setup {
                    capacity_changes: limits.clone(),
                    heartbeat_s,
                    defer_delay_s: heartbeat_s,
                    ..setup(&capacities, policy, allocation)
                };
                let (fast, every) = skipping_and_not(&requests, &s);
                let context = format!("case {case} {policy:?} {allocation:?} {limits:?}");
                assert_eq!(fast.metrics.capacity_violations, 0, "{context}");
                assert!(fast.metrics.peak_utilization <= 1.0 + 1e-9, "{context}");
                assert_eq!(
                    deterministic(&fast.metrics),
                    deterministic(&every.metrics),
                    "{context}"
                );
            }
        }
    }
}

#[test]
fn a_limit_costs_energy_on_the_grid_and_on_the_pooled_reference() {
    let line = "--poisson 40 --duration 6h --energy 10..40 --stay 1..4 --capacities 60,60";
    let (requests, _) = super::workload(&args(line)).unwrap();
    let free = compare(&args(line), &requests).0;
    let mut limited = args(line);
    // The first substation down to 10 kW from 1 h to 4 h.
    limited.capacity_changes = limited_changes();
    let (limited, _) = compare(&limited, &requests);
    let delivered = |r: &Row| r.metrics.energy_delivered_kwh;
    assert!(
        delivered(&limited.results[0]) < delivered(&free.results[0]) - 1.0,
        "{} vs {}",
        delivered(&limited.results[0]),
        delivered(&free.results[0])
    );
    assert!(delivered(&limited.pooled_reference) < delivered(&free.pooled_reference) - 1.0);
    assert_eq!(limited.results[0].metrics.capacity_violations, 0);
    assert_eq!(limited.energy_upper_bound_kwh, free.energy_upper_bound_kwh);
    assert_eq!(
        super::pooled_changes(&[60.0, 60.0], &limited_changes()),
        [(3600.0, 70.0), (4.0 * 3600.0, 120.0)]
    );
}

fn limited_changes() -> Vec<Vec<(f64, f64)>> {
    vec![vec![(3600.0, 10.0), (4.0 * 3600.0, 60.0)], Vec::new()]
}

#[test]
fn skipping_futile_offers_changes_nothing() {
    let mut rng = SmallRng::seed_from_u64(0x534b_4950);
    for case in 0..2 {
        let (requests, capacities, heartbeat_s) = random_workload(&mut rng);
        for policy in [Policy::LeastLoaded, Policy::P2c, Policy::Headroom] {
            for allocation in [Allocation::Edf, Allocation::Llf] {
                let s = Setup {
                    heartbeat_s,
                    defer_delay_s: heartbeat_s,
                    ..setup(&capacities, policy, allocation)
                };
                let (fast, every) = skipping_and_not(&requests, &s);
                assert_eq!(
                    deterministic(&fast.metrics),
                    deterministic(&every.metrics),
                    "case {case} {policy:?} {allocation:?}"
                );
                assert_eq!(fast.deferrals, every.deferrals);
            }
        }
    }
}

#[test]
fn runs_are_deterministic_and_the_plot_has_every_substation() {
    let mut a = args(
        "--poisson 200 --duration 2h --burst 100@30m --capacities 50,80 --policy all --allocation edf,triage --plot x.svg",
    );
    a.seed = 9;
    let (requests, _) = super::workload(&a).unwrap();
    let (first, plotted) = compare(&a, &requests);
    let (again, _) = compare(&a, &requests);
    let strip = |r: &Report| -> Vec<Metrics> {
        r.results
            .iter()
            .chain([&r.pooled_reference])
            .map(|row: &Row| deterministic(&row.metrics))
            .collect()
    };
    assert_eq!(strip(&first), strip(&again));
    assert_eq!(first.results.len(), 10);
    // The defaults are plotted, with a load log per substation.
    assert_eq!(
        (plotted.policy, plotted.allocation),
        (Policy::default(), Allocation::default())
    );
    assert_eq!(plotted.run.load.len(), 2);
    assert!(plotted.run.load.iter().all(|log| !log.is_empty()));
    let svg = super::plot::svg("t", &plotted.run.ids, &plotted.run.load);
    assert!(svg.contains("s1: capacity 50 kW") && svg.contains("s2: capacity 80 kW"));
}

#[test]
fn options_are_checked_while_parsing() {
    let parse = |line: &str| {
        Cli::try_parse_from(std::iter::once("sim").chain(line.split_whitespace())).map(|c| c.args)
    };
    for bad in [
        "",
        "--poisson 10 --policy fastest",
        "--poisson 10 --allocation fifo",
        "--poisson 0",
        "--burst 10",
        "--poisson 10 --capacities 10,-1",
        "--poisson 10 --vehicle-max-kw 500",
        "--poisson 10 --vehicle-max-kw 0.5",
        "--poisson 10 --heartbeat 2h",
        // A unit is required: `--heartbeat 1` once simulated 1 ms heartbeats without a word.
        "--poisson 10 --heartbeat 1",
        "--poisson 10 --defer-delay 500",
        "--poisson 10 --duration 8",
        "--burst 10@3600",
        "--poisson 10 --stay 5..1",
        "--poisson 10 --plot load.png",
        "--poisson 10 --plot load",
    ] {
        assert!(parse(bad).is_err(), "{bad:?} accepted");
    }
    let a = parse("--trace t.csv --fold week --policy all --allocation edf,llf").unwrap();
    assert_eq!(a.policy.0, Policy::ALL);
    assert_eq!(a.allocation.0, [Allocation::Edf, Allocation::Llf]);
    assert_eq!(a.fold, Fold::Week);
    let a = parse("--burst 10@1h --stay none --plot out/Load.SVG").unwrap();
    assert_eq!(a.plot, Some(PathBuf::from("out/Load.SVG")));
    assert_eq!(a.stay.0, None);
    assert_eq!(a.policy.0, [Policy::default()]);
}
