//! `evgrid-model`: the functional core of the charge pipeline, ingest → dispatcher →
//! substation, with no I/O.
//!
//! Everything here is plain data and pure functions: the public contract (messages, their
//! validation, subjects, header names), the dispatcher's routing [`decision`], the substation's
//! [`charging`] model and the [`limits`] and [`liveness`] rules. No NATS, no HTTP, no clock
//! reads, no randomness but a seeded generator passed in. The live services (`evgrid-ingest`,
//! `evgrid-dispatcher`, `evgrid-substation`) and the simulator (`evgrid-sim`) call the same
//! functions, so what `evgrid sim` measures is what the grid does. The crate builds without
//! async-nats, tokio or warp: that purity is checked by the compiler, not kept by discipline.

pub mod charging;
pub mod decision;
pub mod headers;
pub mod limits;
pub mod liveness;
pub mod messages;
pub mod subjects;
pub mod units;
pub mod validate;

/// How long a duration of simulated/real time is, in hours, as the charging model counts it.
pub const SECONDS_PER_HOUR: f64 = 3600.0;
