//! The short chaos suite: `none`, `kill-dispatcher-of-two`, `kill-substation` and
//! `kill-nats-node` (the leader of `EV_REQUESTS` in a 3-node cluster) at a few seconds of load
//! each, on the debug binaries of the workspace
//! (ingest → dispatcher → substations as separate processes, real nats-servers), asserting that
//! every accepted request ends completed once or rejected, and nothing is lost, doubled, left
//! unstored or above capacity. The full run is `evgrid-bench chaos --scenario all`
//! (docs/reliability.md).
//!
//! One scenario per kind of component and fault that no other test covers end to end: the other
//! scenarios are left to the full run, to keep CI short (a frozen dispatcher replica's requests
//! and a client's retries to another ingest are tested in their crates), or last longer than this test's load (a 10 s
//! freeze, a substation that never returns, 3 s without any NATS, a whole cluster restarted).

use std::path::Path;
use std::time::Duration;

use evgrid_bench::chaos::check::Verdict;
use evgrid_bench::chaos::{self, ChaosArgs, Scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_request_is_accounted_for_under_faults() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate is inside the repository");
    let bins = evgrid_test_support::workspace_binaries(repo).unwrap_or_else(|e| panic!("{e:#}"));
    let bin_dir = bins["evgrid-ingest"]
        .parent()
        .expect("a binary has a directory")
        .to_path_buf();
    let logs = tempfile::tempdir().unwrap();
    let args = ChaosArgs {
        scenarios: vec![vec![
            Scenario::NoFault,
            Scenario::KillDispatcherOfTwo,
            Scenario::KillSubstation,
            Scenario::KillNatsNode,
        ]],
        rate: 100.0,
        duration: Duration::from_secs(3),
        fault_at: Duration::from_secs(1),
        // Room for a request that waits out an ack wait after a kill; the window ends as soon
        // as everything is final.
        drain: Duration::from_secs(30),
        capacity_kw: 800.0,
        time_scale: 3600.0,
        energy_kwh: "uniform:5..30".into(),
        max_power_kw: "11".into(),
        json: None,
        bin_dir: Some(bin_dir),
    };
    let report = chaos::run(&args, logs.path()).await.unwrap_or_else(|e| {
        let kept = logs.keep();
        panic!("{e:#} (process logs in {})", kept.display())
    });
    let table = report.markdown();
    assert_eq!(report.scenarios.len(), 4, "{table}");
    for r in &report.scenarios {
        let name = r.scenario.name();
        let a = &r.accounting;
        assert!(
            a.accepted >= 200,
            "{name}: only {} accepted\n{table}",
            a.accepted
        );
        assert!(
            r.failures().is_empty(),
            "{name}: {:?}\n{table}",
            r.failures()
        );
        assert_eq!(a.count(Verdict::Stuck), 0, "{name}: stuck\n{table}");
        assert_eq!(
            a.count(Verdict::CompletedOnce) + a.count(Verdict::Rejected),
            a.accepted,
            "{name}: not every accepted request is final\n{table}"
        );
        assert!(
            r.drained_s.is_some(),
            "{name}: drain window ran out\n{table}"
        );
        assert!(
            r.load.other_status.is_empty(),
            "{name}: {:?}",
            r.load.other_status
        );
        assert!(r.heartbeats.heartbeats > 0, "{name}: no heartbeat seen");
    }
    for r in &report.scenarios[1..] {
        assert!(
            r.recovery.as_ref().is_some_and(|r| r.seconds.is_some()),
            "{}: no recovery\n{table}",
            r.scenario.name()
        );
    }
}
