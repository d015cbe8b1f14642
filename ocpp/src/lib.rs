//! `evgrid-ocpp`: OCPP 2.0.1 (the Open Charge Point Protocol) for evgrid's substations, which
//! are the smart-charging controller (CSMS) of the charging stations they feed (issue #12).
//!
//! - [`rpc`]: OCPP-J framing, CALL / CALLRESULT / CALLERROR.
//! - [`messages`]: the OCPP 2.0.1 messages handled, as serde types.
//! - [`stations`]: which stations may connect, and their passwords (Security Profile 1).
//! - [`server`]: the WebSocket endpoint stations connect to, and what each has said.
//! - [`simulator`]: the other end, simulated charging stations (`evgrid stations`).

pub mod messages;
pub mod rpc;
pub mod server;
pub mod simulator;
pub mod stations;
