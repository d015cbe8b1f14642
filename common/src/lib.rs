//! `evgrid-common`: the contract the whole charge pipeline shares.
//!
//! ingest → `ev.requests` (stream `EV_REQUESTS`) → dispatcher → `ev.dispatch.<id>` (stream
//! `EV_DISPATCH`) → substation → `ev.sessions.<id>.<event>` (stream `EV_SESSIONS`), with
//! heartbeats on `ev.telemetry.<id>` and request state in the key-value bucket
//! `EV_REQUEST_STATE`. Everything a second service would otherwise have to re-declare lives
//! here: message types and their validation, subjects, stream/consumer definitions, the NATS
//! connection, and the plumbing every binary shares (config flags, logs, metrics, ops HTTP
//! endpoints, shutdown).

pub mod config;
pub mod headers;
pub mod heartbeats;
pub mod http;
pub mod messages;
pub mod metrics;
pub mod nats;
pub mod service;
pub mod shutdown;
pub mod streams;
pub mod subjects;
pub mod telemetry;
pub mod validate;

/// How long a duration of simulated/real time is, in hours, as the charging model counts it.
pub const SECONDS_PER_HOUR: f64 = 3600.0;
