//! `evgrid-bench`: how close each stage of ingest → dispatcher → substation gets to what this
//! machine and NATS allow. Every benchmark measures its reference in the same run, alternating
//! (A B A B …), on fresh nats-servers and separate release binaries on loopback, and prints the
//! ratio: on shared, noisy machines only ratios carry over. docs/benchmarks.md has the commands
//! and the figures.
//!
//! The references live here too: [`minimal`] (the least an HTTP front door can do) and
//! [`forwarder`] (the least a router can do), run as `evgrid-bench minimal-ingest` and
//! `evgrid-bench forwarder`.
//!
//! [`chaos`] is not a benchmark but the fault-tolerance suite: faults injected into a grid under
//! load, and every accepted request accounted for afterwards.

pub mod chaos;
pub mod dispatch;
pub mod e2e;
pub mod forwarder;
pub mod ingest;
pub mod load;
pub mod measure;
pub mod minimal;
pub mod ocpp;
pub mod procs;
pub mod replicas;
pub mod setup;
