//! Library behind the `evgrid` command line: each subcommand is a module, so tests drive the
//! same code the binary runs.

mod demo;
pub mod load;
mod prometheus;
pub mod sim;
mod status;
pub mod trace;
pub mod up;
