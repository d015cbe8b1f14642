//! The faults of the chaos suite, as data: which component of the grid (nats-server, ingest,
//! dispatcher, a substation) gets which blow (kill -9 with or without a restart, SIGSTOP for a
//! while), and what its recovery is measured by. The grid carries them out; the checker knows
//! nothing about them beyond their times.

use std::time::Duration;

/// A scenario as named on the command line (`--scenario NAME`, repeatable).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// No fault: the reference for the p99 ratio.
    #[value(name = "none")]
    #[serde(rename = "none")]
    NoFault,
    /// kill -9 the dispatcher, restart it 3 s later.
    KillDispatcher,
    /// kill -9 a substation, restart it 0.3 s later.
    KillSubstation,
    /// kill -9 a substation and never restart it.
    KillSubstationForever,
    /// SIGSTOP a substation for 10 s, then SIGCONT.
    StopSubstation,
    /// kill -9 ingest, restart it 2 s later on the same address.
    KillIngest,
    /// kill -9 the nats-server, restart it 3 s later on the same ports with its store.
    KillNats,
}

impl Scenario {
    /// Every scenario, `none` first: its p99 is the reference of the others.
    pub const ALL: [Scenario; 7] = [
        Scenario::NoFault,
        Scenario::KillDispatcher,
        Scenario::KillSubstation,
        Scenario::KillSubstationForever,
        Scenario::StopSubstation,
        Scenario::KillIngest,
        Scenario::KillNats,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::NoFault => "none",
            Scenario::KillDispatcher => "kill-dispatcher",
            Scenario::KillSubstation => "kill-substation",
            Scenario::KillSubstationForever => "kill-substation-forever",
            Scenario::StopSubstation => "stop-substation",
            Scenario::KillIngest => "kill-ingest",
            Scenario::KillNats => "kill-nats",
        }
    }

    /// The fault this scenario injects, if any.
    pub fn fault(self) -> Option<Fault> {
        let kill = |target, restart_after| Fault {
            target,
            blow: Blow::Kill { restart_after },
        };
        Some(match self {
            Scenario::NoFault => return None,
            Scenario::KillDispatcher => kill(Target::Dispatcher, Some(Duration::from_secs(3))),
            Scenario::KillSubstation => {
                kill(Target::Substation(VICTIM), Some(Duration::from_millis(300)))
            }
            Scenario::KillSubstationForever => kill(Target::Substation(VICTIM), None),
            Scenario::StopSubstation => Fault {
                target: Target::Substation(VICTIM),
                blow: Blow::Freeze {
                    during: Duration::from_secs(10),
                },
            },
            Scenario::KillIngest => kill(Target::Ingest, Some(Duration::from_secs(2))),
            Scenario::KillNats => kill(Target::Nats, Some(Duration::from_secs(3))),
        })
    }
}

/// The substation every substation fault hits (index into the grid's substations).
pub const VICTIM: usize = 0;

/// A component of the grid. A NATS cluster would add its nodes here (`NatsNode(i)`), and the
/// grid would learn to kill and restart them; nothing else changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    Nats,
    Ingest,
    Dispatcher,
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
            assert_eq!(s.fault().is_none(), s == Scenario::NoFault, "{}", s.name());
        }
        assert_eq!(Scenario::ALL[0], Scenario::NoFault);
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
