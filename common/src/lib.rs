//! `evgrid-common`: the service plumbing every part of the charge pipeline shares.
//!
//! ingest → `ev.requests` (stream `EV_REQUESTS`) → dispatcher → `ev.dispatch.<id>` (stream
//! `EV_DISPATCH`) → substation → `ev.sessions.<id>.<event>` (stream `EV_SESSIONS`), with
//! heartbeats on `ev.telemetry.<id>` and request state in the key-value bucket
//! `EV_REQUEST_STATE`. The contract itself (messages, validation, subjects) is the pure
//! `evgrid-model`; this crate holds the I/O around it that a second service would otherwise
//! re-declare: stream and consumer definitions, the NATS connection and its consumers, and what
//! every binary shares (config flags, logs, metrics, ops HTTP endpoints, shutdown).

pub mod backoff;
pub mod config;
pub mod error;
pub mod heartbeats;
pub mod http;
pub mod metrics;
pub mod nats;
pub mod roles;
pub mod service;
pub mod shutdown;
pub mod streams;
pub mod telemetry;
