//! Library behind the `evgrid` command line: each subcommand is a module, so tests drive the
//! same code the binary runs.

pub mod api_key;
pub mod credentials;
mod demo;
pub mod load;
pub mod nats_users;
pub mod replay;
pub mod secrets;
pub mod stations;
mod status;
pub mod up;
