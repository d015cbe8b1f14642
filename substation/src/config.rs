//! The substation's configuration: command-line options with environment fallbacks, checked
//! while parsing so bad values stop the binary before it binds a port or touches NATS.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use evgrid_common::config::parse_listen;
use evgrid_ocpp::stations::Stations;

use evgrid_common::config::{NatsArgs, RenamedEnv, parse_duration, parse_positive};
use evgrid_model::subjects::valid_substation_id;
use evgrid_model::units::parse_capacity;

use evgrid_model::charging::Allocation;

/// `--id`: no default, every substation must be told who it is. `EVGRID_SUBSTATION_ID` rather
/// than `EVGRID_ID`, which would not say whose id it is among the services' variables.
pub const ID_ENV: &str = "EVGRID_SUBSTATION_ID";
/// `--capacity-kw`.
pub const CAPACITY_KW_ENV: &str = "EVGRID_CAPACITY_KW";
/// Default capacity: a typical fast-charging site.
pub const DEFAULT_CAPACITY_KW: f64 = 150.0;
/// `--time-scale`.
pub const TIME_SCALE_ENV: &str = "EVGRID_TIME_SCALE";
/// Real time by default; tests and demos use e.g. 3600 (an hour per second).
pub const DEFAULT_TIME_SCALE: f64 = 1.0;
/// `--heartbeat-interval`.
pub const HEARTBEAT_INTERVAL_ENV: &str = "EVGRID_HEARTBEAT_INTERVAL";
/// The dispatcher counts a substation out after 3 silent intervals: one second keeps routing
/// fresh without flooding `EV_TELEMETRY`.
pub const DEFAULT_HEARTBEAT_INTERVAL: &str = "1s";
/// `--allocation` (default: [`Allocation::default`]).
pub const ALLOCATION_ENV: &str = "EVGRID_ALLOCATION";

/// `--chargers`.
pub const CHARGERS_ENV: &str = "EVGRID_CHARGERS";
/// `--ocpp-listen`.
pub const OCPP_LISTEN_ENV: &str = "EVGRID_OCPP_LISTEN";
/// Where stations connect by default: OCPP's usual port (many chargers' factory setting
/// points at 9000), on loopback until an operator opens it.
pub const DEFAULT_OCPP_LISTEN: &str = "127.0.0.1:9000";
/// `--ocpp-stations`.
pub const OCPP_STATIONS_ENV: &str = "EVGRID_OCPP_STATIONS";
/// `--ocpp-station-max-kw`.
pub const OCPP_STATION_MAX_KW_ENV: &str = "EVGRID_OCPP_STATION_MAX_KW";
/// A station's most, when it is not under a limit the substation knows: 22 kW, the largest
/// common AC charger (three phases at 32 A).
pub const DEFAULT_OCPP_STATION_MAX_KW: f64 = 22.0;
/// `--ocpp-rate-unit`.
pub const OCPP_RATE_UNIT_ENV: &str = "EVGRID_OCPP_RATE_UNIT";

/// Where a substation's cars charge.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Chargers {
    /// Cars charge in the substation's own model, in simulated time.
    #[default]
    Simulated,
    /// Cars charge at real charging stations that connect over OCPP 2.0.1
    /// (docs/ocpp.md).
    Ocpp,
}

/// The unit charging limits are sent in.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RateUnit {
    /// Watts.
    #[default]
    W,
    /// Amperes per phase (230 V, three phases).
    A,
}

/// The OCPP side of a substation (`--chargers ocpp`).
#[derive(clap::Args, Clone, Debug)]
pub struct OcppArgs {
    /// Where charging stations connect (`--chargers ocpp`): ws://HOST:PORT/ocpp/STATION_ID.
    #[arg(
        long,
        env = OCPP_LISTEN_ENV,
        default_value = DEFAULT_OCPP_LISTEN,
        value_parser = parse_listen,
        value_name = "HOST:PORT"
    )]
    pub ocpp_listen: SocketAddr,

    /// The stations that may connect, one `station_id:password` line each; the password
    /// plain (16-40 characters) or an argon2 or bcrypt hash of it (required with
    /// `--chargers ocpp`).
    #[arg(
        long,
        env = OCPP_STATIONS_ENV,
        value_parser = read_stations,
        value_name = "FILE",
        required_if_eq("chargers", "ocpp")
    )]
    pub ocpp_stations: Option<Stations>,

    /// The most a station can draw, in kW: what the substation counts a station at while it
    /// is out of reach or does not keep its limit.
    #[arg(
        long,
        env = OCPP_STATION_MAX_KW_ENV,
        default_value_t = DEFAULT_OCPP_STATION_MAX_KW,
        value_parser = parse_positive,
        value_name = "KW"
    )]
    pub ocpp_station_max_kw: f64,

    /// The unit of the limits sent to the stations.
    #[arg(long, env = OCPP_RATE_UNIT_ENV, value_enum, default_value_t = RateUnit::default())]
    pub ocpp_rate_unit: RateUnit,
}

impl Default for OcppArgs {
    fn default() -> Self {
        Self {
            ocpp_listen: DEFAULT_OCPP_LISTEN.parse().expect("a socket address"),
            ocpp_stations: None,
            ocpp_station_max_kw: DEFAULT_OCPP_STATION_MAX_KW,
            ocpp_rate_unit: RateUnit::default(),
        }
    }
}

/// A stations file, read and checked while the options are parsed.
fn read_stations(path: &str) -> Result<Stations, String> {
    Stations::read(Path::new(path)).map_err(|e| e.to_string())
}

/// The names these options were read from before they took the `EVGRID_` prefix: still read,
/// with a warning, until the next release.
pub const RENAMED_ENV: &[RenamedEnv] = &[
    RenamedEnv {
        old: "SUBSTATION_ID",
        new: ID_ENV,
        flag: "--id",
    },
    RenamedEnv {
        old: "SUBSTATION_CAPACITY_KW",
        new: CAPACITY_KW_ENV,
        flag: "--capacity-kw",
    },
];

/// Options of one substation.
#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    #[command(flatten)]
    pub nats: NatsArgs,

    /// Substation id: the last token of its subjects and its metric label ([A-Za-z0-9_-], 1-64).
    #[arg(long, env = ID_ENV, value_parser = parse_substation_id)]
    pub id: String,

    /// Power the substation can deliver in total, in kW (at most 1,000,000: 1 GW).
    #[arg(
        long,
        env = CAPACITY_KW_ENV,
        default_value_t = DEFAULT_CAPACITY_KW,
        value_parser = parse_capacity,
        allow_negative_numbers = true,
        value_name = "KW"
    )]
    pub capacity_kw: f64,

    /// Simulated seconds per real second (3600: an hour of charging takes a second).
    #[arg(
        long,
        env = TIME_SCALE_ENV,
        default_value_t = DEFAULT_TIME_SCALE,
        value_parser = parse_positive,
        allow_negative_numbers = true,
        value_name = "FACTOR"
    )]
    pub time_scale: f64,

    /// How often to publish a heartbeat on `ev.telemetry.<id>`, real time, with its unit: 500ms,
    /// 1s, 1.5s, 1m, from 1ms to 1h.
    #[arg(
        long,
        env = HEARTBEAT_INTERVAL_ENV,
        default_value = DEFAULT_HEARTBEAT_INTERVAL,
        value_parser = parse_duration,
        value_name = "DURATION"
    )]
    pub heartbeat_interval: Duration,

    /// How the capacity is shared when the cars want more than it (docs/substation.md;
    /// triage by default: nearly the most energy and the most cars full in `evgrid sim`,
    /// docs/dispatch.md).
    #[arg(long, env = ALLOCATION_ENV, value_enum, default_value_t = Allocation::default())]
    pub allocation: Allocation,

    /// Where the cars charge: in the substation's model (simulated), or at charging stations
    /// over OCPP 2.0.1 (ocpp; docs/ocpp.md).
    #[arg(long, env = CHARGERS_ENV, value_enum, default_value_t = Chargers::default())]
    pub chargers: Chargers,

    #[command(flatten)]
    pub ocpp: OcppArgs,
}

/// A substation id that is safe as a subject token and a metric label.
pub fn parse_substation_id(s: &str) -> Result<String, String> {
    if valid_substation_id(s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a substation id: use 1 to 64 of A-Z a-z 0-9 - _ (no dots, spaces or wildcards)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substation_ids() {
        assert_eq!(parse_substation_id("north-1"), Ok("north-1".into()));
        assert!(parse_substation_id("a.b").is_err());
        assert!(parse_substation_id("").is_err());
    }
}
