//! The faults of the chaos suite, as data: which component of the grid (the single nats-server,
//! a node of a 3-node NATS cluster or all of them, one of the ingests or dispatchers, a
//! substation) gets which blow (kill -9 with or without a restart, SIGSTOP for a while), on
//! which shape of grid. The grid carries them out; the checker knows nothing about them beyond
//! their times.

use std::time::Duration;

/// A scenario as named on the command line (`--scenario NAME`, repeatable).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// No fault, single nats-server: the reference for the p99 ratio of the single-server
    /// scenarios.
    #[value(name = "none")]
    #[serde(rename = "none")]
    NoFault,
    /// kill -9 the dispatcher, restart it 3 s later.
    KillDispatcher,
    /// Two dispatchers: kill -9 one of them, never restarted.
    KillDispatcherOfTwo,
    /// kill -9 a substation, restart it 0.3 s later.
    KillSubstation,
    /// kill -9 a substation and never restart it.
    KillSubstationForever,
    /// SIGSTOP a substation for 10 s, then SIGCONT.
    StopSubstation,
    /// kill -9 ingest, restart it 2 s later on the same address.
    KillIngest,
    /// Two ingests, the load spread over both: kill -9 one of them, never restarted.
    KillIngestOfTwo,
    /// kill -9 the nats-server, restart it 3 s later on the same ports with its store.
    KillNats,
    /// No fault, 3-node cluster with R3: the reference of the cluster scenarios.
    #[value(name = "none-cluster")]
    #[serde(rename = "none-cluster")]
    NoFaultCluster,
    /// 3-node cluster: kill -9 the node leading `EV_REQUESTS`, restart it 3 s later.
    KillNatsNode,
    /// 3-node cluster: kill -9 the node leading `EV_REQUESTS`, never restarted.
    KillNatsNodeForever,
    /// 3-node cluster: kill -9 every node, restart them all 3 s later with their stores.
    RestartCluster,
}

/// The grid a scenario runs on: besides the 3 substations, how many NATS nodes (1: a single
/// server; 3: a cluster with every stream, bucket and consumer at R3), ingests and dispatchers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Shape {
    pub nats_nodes: usize,
    pub ingests: usize,
    pub dispatchers: usize,
}

impl Shape {
    const SINGLE: Shape = Shape {
        nats_nodes: 1,
        ingests: 1,
        dispatchers: 1,
    };
    const CLUSTER: Shape = Shape {
        nats_nodes: 3,
        ..Shape::SINGLE
    };

    pub fn is_cluster(&self) -> bool {
        self.nats_nodes > 1
    }
}

impl Scenario {
    /// Every scenario, each reference first: `none` before the single-server scenarios,
    /// `none-cluster` before the cluster's.
    pub const ALL: [Scenario; 13] = [
        Scenario::NoFault,
        Scenario::KillDispatcher,
        Scenario::KillDispatcherOfTwo,
        Scenario::KillSubstation,
        Scenario::KillSubstationForever,
        Scenario::StopSubstation,
        Scenario::KillIngest,
        Scenario::KillIngestOfTwo,
        Scenario::KillNats,
        Scenario::NoFaultCluster,
        Scenario::KillNatsNode,
        Scenario::KillNatsNodeForever,
        Scenario::RestartCluster,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::NoFault => "none",
            Scenario::KillDispatcher => "kill-dispatcher",
            Scenario::KillDispatcherOfTwo => "kill-dispatcher-of-two",
            Scenario::KillSubstation => "kill-substation",
            Scenario::KillSubstationForever => "kill-substation-forever",
            Scenario::StopSubstation => "stop-substation",
            Scenario::KillIngest => "kill-ingest",
            Scenario::KillIngestOfTwo => "kill-ingest-of-two",
            Scenario::KillNats => "kill-nats",
            Scenario::NoFaultCluster => "none-cluster",
            Scenario::KillNatsNode => "kill-nats-node",
            Scenario::KillNatsNodeForever => "kill-nats-node-forever",
            Scenario::RestartCluster => "restart-cluster",
        }
    }

    /// The grid it runs on.
    pub fn shape(self) -> Shape {
        match self {
            Scenario::KillDispatcherOfTwo => Shape {
                dispatchers: 2,
                ..Shape::SINGLE
            },
            Scenario::KillIngestOfTwo => Shape {
                ingests: 2,
                ..Shape::SINGLE
            },
            Scenario::NoFaultCluster
            | Scenario::KillNatsNode
            | Scenario::KillNatsNodeForever
            | Scenario::RestartCluster => Shape::CLUSTER,
            _ => Shape::SINGLE,
        }
    }

    /// The no-fault run its p99 is compared with.
    pub fn reference(self) -> Scenario {
        if self.shape().is_cluster() {
            Scenario::NoFaultCluster
        } else {
            Scenario::NoFault
        }
    }

    /// The fault this scenario injects, if any.
    pub fn fault(self) -> Option<Fault> {
        let kill = |target, restart_after| Fault {
            target,
            blow: Blow::Kill { restart_after },
        };
        let secs = Duration::from_secs;
        Some(match self {
            Scenario::NoFault | Scenario::NoFaultCluster => return None,
            Scenario::KillDispatcher => kill(Target::Dispatcher(0), Some(secs(3))),
            Scenario::KillDispatcherOfTwo => kill(Target::Dispatcher(0), None),
            Scenario::KillSubstation => {
                kill(Target::Substation(VICTIM), Some(Duration::from_millis(300)))
            }
            Scenario::KillSubstationForever => kill(Target::Substation(VICTIM), None),
            Scenario::StopSubstation => Fault {
                target: Target::Substation(VICTIM),
                blow: Blow::Freeze { during: secs(10) },
            },
            Scenario::KillIngest => kill(Target::Ingest(0), Some(secs(2))),
            Scenario::KillIngestOfTwo => kill(Target::Ingest(0), None),
            Scenario::KillNats => kill(Target::Nats, Some(secs(3))),
            Scenario::KillNatsNode => kill(Target::RequestsLeader, Some(secs(3))),
            Scenario::KillNatsNodeForever => kill(Target::RequestsLeader, None),
            Scenario::RestartCluster => kill(Target::Cluster, Some(secs(3))),
        })
    }
}

/// The substation every substation fault hits (index into the grid's substations).
pub const VICTIM: usize = 0;

/// A component of the grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// The single nats-server.
    Nats,
    /// The cluster node leading `EV_REQUESTS` when the fault strikes: the worst node to lose,
    /// since every 202 waits on it.
    RequestsLeader,
    /// Every node of the cluster at once.
    Cluster,
    Ingest(usize),
    Dispatcher(usize),
    Substation(usize),
}

/// What happens to the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blow {
    /// SIGKILL; started again after `restart_after`, or never.
    Kill { restart_after: Option<Duration> },
    /// SIGSTOP, SIGCONT after `during`.
    Freeze { during: Duration },
}

/// One fault of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub target: Target,
    pub blow: Blow,
}

impl Fault {
    /// How long after the blow the component is back (restarted or continued), if ever.
    pub fn back_after(&self) -> Option<Duration> {
        match self.blow {
            Blow::Kill { restart_after } => restart_after,
            Blow::Freeze { during } => Some(during),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scenario_but_none_has_a_fault() {
        for s in Scenario::ALL {
            assert_eq!(s.fault().is_none(), s == s.reference(), "{}", s.name());
        }
        // Each reference runs before the scenarios compared with it (the list is sorted so).
        for (i, s) in Scenario::ALL.iter().enumerate() {
            let reference = Scenario::ALL.iter().position(|r| *r == s.reference());
            assert!(reference.is_some_and(|r| r <= i), "{}", s.name());
            assert_eq!(s.shape().is_cluster(), s.reference().shape().is_cluster());
        }
        let mut sorted = Scenario::ALL;
        sorted.sort();
        assert_eq!(sorted, Scenario::ALL);
        assert!(
            Scenario::KillSubstationForever
                .fault()
                .unwrap()
                .back_after()
                .is_none()
        );
    }

    #[test]
    fn names_match_the_command_line() {
        use clap::ValueEnum as _;
        for s in Scenario::ALL {
            let parsed = Scenario::from_str(s.name(), false).unwrap();
            assert_eq!(parsed, s);
        }
    }
}
