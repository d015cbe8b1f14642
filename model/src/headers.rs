//! NATS header names carried along a request's path, so one request can be followed (logs) and
//! timed (accept → charging started) across ingest → dispatcher → substation.

/// The request id (UUID), on every message about a request.
pub const REQUEST_ID: &str = "Evgrid-Request-Id";
/// When ingest accepted the request (RFC 3339). Absent for requests published straight to NATS;
/// then the stream timestamp stands in.
pub const ACCEPTED_AT: &str = "Evgrid-Accepted-At";
/// On `ev.rejected`: why the request can never be served (a [`crate::messages::RejectReason`]).
pub const REJECT_REASON: &str = "Evgrid-Reject-Reason";
/// On `ev.rejected`: a readable explanation naming the offending field.
pub const REJECT_DETAIL: &str = "Evgrid-Reject-Detail";
/// On `ev.rejected`: the subject the payload came from.
pub const SOURCE_SUBJECT: &str = "Evgrid-Source-Subject";
/// On `ev.rejected`: the stream sequence of the payload in its source stream.
pub const SOURCE_SEQUENCE: &str = "Evgrid-Source-Sequence";
/// On a request offered again by failover (`ev.requests`): the failed substation it is to move
/// away from.
pub const MOVED_FROM: &str = "Evgrid-Moved-From";
/// With [`MOVED_FROM`]: the `EV_DISPATCH` sequence of the dispatch it is to move away from.
pub const MOVE_OF: &str = "Evgrid-Move-Of";
/// On a dispatch: the dispatcher instance that sent it (a UUID per process), so the other
/// replicas count it as theirs to wait for and the sender does not count it twice.
pub const DISPATCHER: &str = "Evgrid-Dispatcher";
/// On a dispatch: the power (kW) the dispatcher counted for it until the substation's heartbeat
/// shows it.
pub const POWER_KW: &str = "Evgrid-Power-Kw";
