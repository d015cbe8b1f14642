//! The dispatcher's options (clap, each with an env fallback and a default shown in `--help`).
//! Values are checked while parsing, so bad config stops the binary before it binds a port.

use std::time::Duration;

use evgrid_common::config::{DEFAULT_NATS_URL, NatsArgs, RenamedEnv, parse_duration};

use evgrid_model::decision::Policy;

/// `--max-in-flight`.
pub const MAX_IN_FLIGHT_ENV: &str = "EVGRID_MAX_IN_FLIGHT";
/// Publishes awaiting their PubAck at once. Measured on 2 cores, JetStream publishes reach
/// ~93k/s with 64 acks in flight, ~106k/s with 256 and ~120k/s with 1024: past 256 little is
/// gained, while the work redone after a crash keeps growing.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;
/// Upper bound of `--max-in-flight`: the JetStream context itself allows 5,000 acks in flight.
pub const MAX_IN_FLIGHT_LIMIT: usize = 4096;
/// `--defer-delay`.
pub const DEFER_DELAY_ENV: &str = "EVGRID_DEFER_DELAY";
/// One heartbeat interval: room is reported once per heartbeat, so asking sooner mostly burns
/// deliveries.
pub const DEFAULT_DEFER_DELAY: &str = "1s";
/// `--substation-timeout`.
pub const SUBSTATION_TIMEOUT_ENV: &str = "EVGRID_SUBSTATION_TIMEOUT";
/// Long enough that a substation restarting (a deploy, a crash and its supervisor's restart)
/// keeps its cars, which it resumes within seconds; short enough that cars at a substation
/// that is gone for good are placed elsewhere while they are still parked.
pub const DEFAULT_SUBSTATION_TIMEOUT: &str = "10s";
/// `--max-substations`.
pub const MAX_SUBSTATIONS_ENV: &str = "EVGRID_MAX_SUBSTATIONS";
/// Far more than any grid routed by one dispatcher, small enough that heartbeats of made-up
/// substations cannot grow its memory and metrics without bound (docs/security.md).
pub const DEFAULT_MAX_SUBSTATIONS: usize = 10_000;
/// Upper bound of `--max-substations`.
pub const MAX_SUBSTATIONS_LIMIT: usize = 1_000_000;
/// `--forget-after`.
pub const FORGET_AFTER_ENV: &str = "EVGRID_FORGET_AFTER";
/// Long past any failover (`--substation-timeout`, 10 s) and any restart: a substation silent
/// this long is gone, and keeping it only keeps its metric series.
pub const DEFAULT_FORGET_AFTER: &str = "10m";
/// `--policy` (default: [`Policy::default`]).
pub const POLICY_ENV: &str = "EVGRID_POLICY";

/// The names these options were read from before every variable became `EVGRID_` and the
/// option's name: still read, with a warning, until the next release.
pub const RENAMED_ENV: &[RenamedEnv] = &[
    RenamedEnv {
        old: "EVGRID_DISPATCH_MAX_IN_FLIGHT",
        new: MAX_IN_FLIGHT_ENV,
        flag: "--max-in-flight",
    },
    RenamedEnv {
        old: "EVGRID_DISPATCH_DEFER_DELAY",
        new: DEFER_DELAY_ENV,
        flag: "--defer-delay",
    },
];

/// Options of the dispatcher service.
#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    #[command(flatten)]
    pub nats: NatsArgs,

    /// Dispatch publishes awaiting their JetStream PubAck at once (decisions stay sequential).
    /// The consumer's max_ack_pending is 4 times this, leaving room for deferred requests.
    #[arg(
        long,
        env = MAX_IN_FLIGHT_ENV,
        default_value_t = DEFAULT_MAX_IN_FLIGHT,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_IN_FLIGHT_LIMIT as u64),
    )]
    pub max_in_flight: usize,

    /// How long a request waits before it is offered again when no substation is up or none has
    /// room: a number with its unit (`500ms`, `2s`, `1m`), from 1ms to 1h.
    #[arg(
        long,
        env = DEFER_DELAY_ENV,
        default_value = DEFAULT_DEFER_DELAY,
        value_parser = parse_duration,
    )]
    pub defer_delay: Duration,

    /// How a substation is chosen among those that are up (docs/dispatch.md; predictive by
    /// default: it delivers the most energy in `evgrid sim`).
    #[arg(long, env = POLICY_ENV, value_enum, default_value_t = Policy::default())]
    pub policy: Policy,

    /// How long a substation may be silent (no heartbeat) before it counts as failed: the
    /// requests it holds are then moved to substations with room, charging ones with the energy
    /// they got (docs/dispatch.md, "Substation failover"). From 1ms to 1h, with its unit.
    #[arg(
        long,
        env = SUBSTATION_TIMEOUT_ENV,
        default_value = DEFAULT_SUBSTATION_TIMEOUT,
        value_parser = parse_duration,
    )]
    pub substation_timeout: Duration,

    /// The most substations tracked at once: while that many are known, heartbeats of new ones
    /// are dropped (and counted), so made-up substation ids cannot grow memory or metrics.
    #[arg(
        long,
        env = MAX_SUBSTATIONS_ENV,
        default_value_t = DEFAULT_MAX_SUBSTATIONS,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_SUBSTATIONS_LIMIT as u64),
    )]
    pub max_substations: usize,

    /// How long a substation may be silent before it is forgotten, with its metric series (it
    /// is taken in as new if it heartbeats again). From 1ms to 1h, with its unit; at least twice
    /// `--substation-timeout` (raised to that), so failover always comes first.
    #[arg(
        long,
        env = FORGET_AFTER_ENV,
        default_value = DEFAULT_FORGET_AFTER,
        value_parser = parse_duration,
    )]
    pub forget_after: Duration,
}

impl Config {
    /// The defaults, talking to `nats_url` (tests, simulators).
    pub fn new(nats_url: impl Into<String>) -> Self {
        Self {
            nats: NatsArgs::new(nats_url),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            defer_delay: parse_duration(DEFAULT_DEFER_DELAY).expect("valid default"),
            policy: Policy::default(),
            substation_timeout: parse_duration(DEFAULT_SUBSTATION_TIMEOUT).expect("valid default"),
            max_substations: DEFAULT_MAX_SUBSTATIONS,
            forget_after: parse_duration(DEFAULT_FORGET_AFTER).expect("valid default"),
        }
    }
}

impl Config {
    /// `--forget-after`, raised to twice `--substation-timeout`: a failed substation's requests
    /// are offered to move before it is forgotten.
    pub fn effective_forget_after(&self) -> Duration {
        self.forget_after.max(self.substation_timeout * 2)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::new(DEFAULT_NATS_URL)
    }
}
