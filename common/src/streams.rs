//! JetStream streams, the request-state bucket and the durable consumers of the pipeline.
//!
//! Every service calls [`ensure`] at start: it creates or updates each definition, so a fresh
//! server needs no manual setup and a changed definition rolls forward. The same definitions,
//! as `nats` CLI JSON, are in `nats/` for operators (a test keeps the two in step).

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};

use evgrid_model::messages::{RequestRecord, session_state_key};
use evgrid_model::subjects;
use uuid::Uuid;

pub const REQUESTS: &str = "EV_REQUESTS";
pub const DISPATCH: &str = "EV_DISPATCH";
pub const TELEMETRY: &str = "EV_TELEMETRY";
pub const SESSIONS: &str = "EV_SESSIONS";
pub const REJECTED: &str = "EV_REJECTED";
/// Grid-operator limits (`ev.limits.<substation_id>`), the last [`LIMIT_HISTORY`] per
/// substation.
pub const LIMITS: &str = "EV_LIMITS";
/// Limit messages kept per substation. A starting substation replays them in order, ignoring
/// invalid ones as a running one does, so one bad message cannot erase the limit in force.
pub const LIMIT_HISTORY: i64 = 64;
/// Key-value bucket: request id → [`evgrid_model::messages::RequestRecord`].
pub const REQUEST_STATE_BUCKET: &str = "EV_REQUEST_STATE";
/// The dispatcher's durable pull consumer on `EV_REQUESTS`, shared by all dispatcher instances.
pub const DISPATCHER_CONSUMER: &str = "dispatcher";

const DAY: Duration = Duration::from_secs(24 * 3600);
const KIB: i32 = 1024;
const MIB: i64 = 1024 * 1024;
const GIB: i64 = 1024 * MIB;

/// Largest message `EV_REQUESTS` stores (payload and headers): ingest's 64 KiB body limit plus
/// 4 KiB of headers. Anything larger is refused at publish, so junk cannot fill the log or make
/// a rejection copy too large to store.
pub const REQUEST_MAX_MSG_BYTES: i32 = 68 * KIB;
/// Largest message `EV_REJECTED` stores: a request's payload plus the `Evgrid-Reject-*` headers
/// (the detail is cut at 1 KiB), so every request `EV_REQUESTS` took has room for its copy.
pub const REJECTED_MAX_MSG_BYTES: i32 = REQUEST_MAX_MSG_BYTES + 4 * KIB;
// A rejection copy of any stored request fits: its headers take well under 2 KiB.
const _: () = assert!(REJECTED_MAX_MSG_BYTES > REQUEST_MAX_MSG_BYTES + 2 * KIB);

/// Largest dispatch, session event or heartbeat (each under 2 KiB).
pub const SMALL_MAX_MSG_BYTES: i32 = 16 * KIB;
/// Largest grid-operator limit message (under 100 bytes).
pub const LIMIT_MAX_MSG_BYTES: i32 = 4 * KIB;
/// Largest request-state record (about 1 KiB, plus one short entry per failover move).
pub const STATE_MAX_VALUE_BYTES: i32 = 64 * KIB;
/// How long `EV_LIMITS` keeps a limit message: a limit without `until` older than this is
/// forgotten by a substation that restarts after it (grid operators re-send long-lived limits).
pub const LIMITS_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Substations `EV_LIMITS` keeps messages for, at [`LIMIT_HISTORY`] each: its message bound. A
/// flood of limits for made-up substations stops there (discard new), never evicting the limits
/// in force.
pub const LIMITS_MAX_SUBSTATIONS: i64 = 10_000;
/// Substations `EV_TELEMETRY` keeps a last heartbeat for: beyond, the oldest go first.
pub const TELEMETRY_MAX_SUBSTATIONS: i64 = 100_000;

/// How the streams keep messages: how long, the duplicate window, and on how many servers.
#[derive(Debug, Clone)]
pub struct Retention {
    /// `EV_REQUESTS`, `EV_DISPATCH`, `EV_SESSIONS` and request states: 7 days by default, so a
    /// week can be replayed.
    pub max_age: Duration,
    /// Window in which a repeated `Nats-Msg-Id` is stored only once.
    pub duplicate_window: Duration,
    /// Copies of every stream and of the bucket (`--replicas`): 1 on a single server; 3 on a
    /// cluster keeps every acknowledged write through the loss of any one node.
    pub replicas: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age: 7 * DAY,
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
        }
    }
}

impl Retention {
    /// The defaults, with `replicas` copies of everything.
    pub fn with_replicas(replicas: usize) -> Self {
        Self {
            replicas,
            ..Self::default()
        }
    }
}

/// How full a stream may get and what then: its size, its largest message, and whether a full
/// stream refuses new messages (the work that must not be lost: requests, dispatches that are
/// live sessions, limits in force) or drops its oldest (history: events, rejections, heartbeats).
struct Bounds {
    max_bytes: i64,
    max_message_size: i32,
    discard: stream::DiscardPolicy,
}

fn limits(
    name: &str,
    subject: &str,
    description: &str,
    r: &Retention,
    bounds: Bounds,
) -> stream::Config {
    stream::Config {
        name: name.into(),
        description: Some(description.into()),
        subjects: vec![subject.into()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: r.max_age,
        max_bytes: bounds.max_bytes,
        max_message_size: bounds.max_message_size,
        discard: bounds.discard,
        duplicate_window: r.duplicate_window,
        num_replicas: r.replicas,
        allow_direct: true,
        ..Default::default()
    }
}

/// The sizes below add up to about 17.3 GiB: within the 20 GB `max_file_store` of
/// `nats/nats-server.conf`, which JetStream checks them against when a stream is created.
fn bounds(max_bytes: i64, max_message_size: i32, discard: stream::DiscardPolicy) -> Bounds {
    Bounds {
        max_bytes,
        max_message_size,
        discard,
    }
}

/// Every stream of the pipeline.
pub fn stream_configs(r: &Retention) -> Vec<stream::Config> {
    vec![
        limits(
            REQUESTS,
            subjects::REQUESTS,
            "evgrid charge requests (replayable)",
            r,
            bounds(4 * GIB, REQUEST_MAX_MSG_BYTES, stream::DiscardPolicy::New),
        ),
        limits(
            DISPATCH,
            subjects::DISPATCH_ALL,
            "evgrid assignments of requests to substations",
            r,
            // An assignment un-acked is a live session's record: never dropped to make room.
            bounds(4 * GIB, SMALL_MAX_MSG_BYTES, stream::DiscardPolicy::New),
        ),
        limits(
            SESSIONS,
            subjects::SESSIONS_ALL,
            "evgrid charging session lifecycle events",
            r,
            bounds(4 * GIB, SMALL_MAX_MSG_BYTES, stream::DiscardPolicy::Old),
        ),
        stream::Config {
            // Rejections are rare and worth keeping for inspection longer than the rest.
            max_age: r.max_age.max(30 * DAY),
            ..limits(
                REJECTED,
                subjects::REJECTED,
                "evgrid requests that can never be served",
                r,
                bounds(GIB, REJECTED_MAX_MSG_BYTES, stream::DiscardPolicy::Old),
            )
        },
        stream::Config {
            // Only the latest heartbeat per substation matters: a starting dispatcher reads
            // every substation's last state at once, without waiting a heartbeat interval.
            max_messages_per_subject: 1,
            max_messages: TELEMETRY_MAX_SUBSTATIONS,
            max_age: DAY,
            duplicate_window: Duration::from_secs(1),
            ..limits(
                TELEMETRY,
                subjects::TELEMETRY_ALL,
                "evgrid substation heartbeats, last per substation",
                r,
                bounds(256 * MIB, SMALL_MAX_MSG_BYTES, stream::DiscardPolicy::Old),
            )
        },
        stream::Config {
            // The limit in force follows from the last messages per substation, kept until
            // replaced or LIMITS_MAX_AGE old. A full stream refuses new limits rather than drop
            // the ones in force.
            max_messages_per_subject: LIMIT_HISTORY,
            max_messages: LIMIT_HISTORY * LIMITS_MAX_SUBSTATIONS,
            max_age: LIMITS_MAX_AGE,
            ..limits(
                LIMITS,
                subjects::LIMITS_ALL,
                "evgrid grid-operator capacity limits, last per substation",
                r,
                bounds(128 * MIB, LIMIT_MAX_MSG_BYTES, stream::DiscardPolicy::New),
            )
        },
    ]
}

/// The request-state bucket.
pub fn request_state_config(r: &Retention) -> kv::Config {
    kv::Config {
        bucket: REQUEST_STATE_BUCKET.into(),
        description: "evgrid request id -> current state".into(),
        history: 1,
        max_age: r.max_age,
        max_bytes: 4 * GIB,
        max_value_size: STATE_MAX_VALUE_BYTES,
        storage: stream::StorageType::File,
        num_replicas: r.replicas,
        ..Default::default()
    }
}

/// Why a request's state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StateReadError {
    #[error("cannot read the request state {key}: {source}")]
    Read { key: String, source: kv::EntryError },
    #[error("the request state {key} is not a request record: {source}")]
    NotARecord {
        key: String,
        source: serde_json::Error,
    },
}

/// The record under `key` and its revision, read as [`read_latest`]: `(None, 0)` when there is
/// none; a deleted value, or one that is not a record, reads as none at its revision, so a
/// compare-and-set can still replace it. What the writers read before they write.
pub async fn read_state(
    kv: &kv::Store,
    key: &str,
) -> Result<(Option<RequestRecord>, u64), kv::EntryError> {
    Ok(match read_latest(kv, key).await? {
        Some(e) if e.operation == kv::Operation::Put => {
            (serde_json::from_slice(&e.value).ok(), e.revision)
        }
        Some(gone) => (None, gone.revision),
        None => (None, 0),
    })
}

/// The record under `key` ([`read_latest`]), if there is one (a deleted one is none).
pub async fn read_record(
    kv: &kv::Store,
    key: &str,
) -> Result<Option<RequestRecord>, StateReadError> {
    let entry = read_latest(kv, key)
        .await
        .map_err(|source| StateReadError::Read {
            key: key.to_owned(),
            source,
        })?;
    match entry {
        Some(e) if e.operation == kv::Operation::Put => serde_json::from_slice(&e.value)
            .map(Some)
            .map_err(|source| StateReadError::NotARecord {
                key: key.to_owned(),
                source,
            }),
        _ => Ok(None),
    }
}

/// A request's state as its readers see it ([`RequestRecord::merged`]): the dispatcher's
/// record, and, once it sends the request to a substation, that substation's session record.
pub async fn read_request(
    kv: &kv::Store,
    request_id: Uuid,
) -> Result<Option<RequestRecord>, StateReadError> {
    let Some(dispatcher) = read_record(kv, &request_id.to_string()).await? else {
        return Ok(None);
    };
    let session = match &dispatcher.substation_id {
        Some(substation) => read_record(kv, &session_state_key(request_id, substation)).await?,
        None => None,
    };
    Ok(RequestRecord::merged(Some(dispatcher), session))
}

/// The latest entry of `key` in the request-state bucket, never older than a write already
/// acknowledged: what every read before a compare-and-set, or that takes a missing record to
/// mean something, needs.
///
/// The bucket's own reads are direct gets, which on a replicated bucket any replica may answer,
/// including a follower that has not yet applied the latest write: it can return an older
/// revision, or nothing for a record just created. The chaos suite saw exactly that on a
/// 3-node cluster (a substation took a record it could not see for one moved away, and stopped
/// charging it). So a replicated bucket is read from its stream leader through the JetStream
/// API; a single replica is current by construction and keeps the cheaper direct get.
pub async fn read_latest(kv: &kv::Store, key: &str) -> Result<Option<kv::Entry>, kv::EntryError> {
    if kv.stream.cached_info().config.num_replicas <= 1 {
        return kv.entry(key).await;
    }
    let subject = format!("{}{key}", kv.prefix);
    let message = match kv.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(message) => message,
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
            return Ok(None);
        }
        Err(e) => return Err(kv::EntryError::with_source(kv::EntryErrorKind::Other, e)),
    };
    let operation = match message.headers.get("KV-Operation") {
        Some(op) => op
            .as_str()
            .parse()
            .map_err(|e| kv::EntryError::with_source(kv::EntryErrorKind::Other, e))?,
        None => kv::Operation::Put,
    };
    Ok(Some(kv::Entry {
        bucket: kv.name.clone(),
        key: key.to_owned(),
        value: message.payload,
        revision: message.sequence,
        delta: 0,
        created: message.time,
        operation,
        seen_current: false,
    }))
}

/// Requests a dispatcher holds un-acked at once (across all its instances), by default.
pub const DEFAULT_DISPATCHER_MAX_ACK_PENDING: i64 = 10_000;

/// The dispatcher's durable consumer on `EV_REQUESTS`.
///
/// `max_deliver` is unlimited: a request that cannot be placed yet is nak'ed with a delay and
/// must wait as long as it takes, never be dropped. Poison messages are terminated explicitly.
/// `replicas` as the stream's (`--replicas`): a consumer with fewer copies than its stream would
/// lose the pipeline's progress with its node.
pub fn dispatcher_consumer(max_ack_pending: i64, replicas: usize) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(DISPATCHER_CONSUMER.into()),
        description: Some("evgrid dispatcher: routes every charge request".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: DISPATCHER_ACK_WAIT,
        max_deliver: -1,
        max_ack_pending,
        deliver_policy: consumer::DeliverPolicy::All,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Name of one substation's durable consumer on `EV_DISPATCH`.
pub fn substation_consumer_name(substation_id: &str) -> String {
    format!("substation-{substation_id}")
}

/// One substation's durable consumer on `ev.dispatch.<id>`.
///
/// A substation holds each assignment un-acked while the session is alive (sending progress
/// acks) and acks it when the session is completed: the un-acked message is the session's
/// durable record, so a substation that dies resumes its sessions when it restarts. Hence no
/// bound on ack-pending: it is the number of cars at the substation. `replicas` as the stream's.
pub fn substation_consumer(substation_id: &str, replicas: usize) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(substation_consumer_name(substation_id)),
        description: Some(format!(
            "evgrid substation {substation_id}: its charging sessions"
        )),
        filter_subject: subjects::dispatch(substation_id),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: SUBSTATION_ACK_WAIT,
        max_deliver: -1,
        max_ack_pending: -1,
        deliver_policy: consumer::DeliverPolicy::All,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// A substation sends progress acks well within this for every live session.
///
/// Short, because it is how long the sessions of a substation that crashed wait before its
/// restarted process gets them back (nothing else can hand them over); the progress acks it
/// costs are cheap core publishes.
pub const SUBSTATION_ACK_WAIT: Duration = Duration::from_secs(2);

/// How long a request delivered to a dispatcher may stay un-acked before the server offers it
/// to another pull.
///
/// A dispatcher settles each request within milliseconds (decide, publish, ack; a request that
/// must wait is nak'ed with a delay, not held), so one second is ample, and it is how long the
/// requests in a crashed dispatcher's pulls wait before another replica (or its restart) takes
/// them. A late ack after a redelivery is harmless: the dispatch is deduplicated by request id.
pub const DISPATCHER_ACK_WAIT: Duration = Duration::from_secs(1);

/// Errors of [`ensure`]: which definition failed, and with how many replicas it was asked for.
#[derive(Debug, thiserror::Error)]
pub enum EnsureError {
    /// The server can never hold what was asked (more than one replica on a server that is not
    /// clustered): retrying cannot help, the operator must change `--replicas` or the server.
    #[error(
        "asked for {replicas} replicas of stream {name}, but the server refused: {server_said} (use --replicas 1 on a single server, or a cluster of at least {replicas} nodes)"
    )]
    ReplicasRefused {
        name: String,
        replicas: usize,
        server_said: String,
    },
    #[error("cannot create or update stream {name} with {replicas} replica(s)")]
    Stream {
        name: String,
        replicas: usize,
        #[source]
        error: jetstream::context::CreateStreamError,
    },
    #[error(
        "cannot create or update key-value bucket {REQUEST_STATE_BUCKET} with {replicas} replica(s)"
    )]
    Bucket {
        replicas: usize,
        #[source]
        error: jetstream::context::CreateKeyValueError,
    },
    /// With `--manage-streams false`: a stream (or the bucket) is not there yet; the service
    /// that manages them (the dispatcher) creates it.
    #[error(
        "stream {name} does not exist yet (the dispatcher, or a service with --manage-streams true, creates it)"
    )]
    Missing {
        name: String,
        #[source]
        error: async_nats::Error,
    },
}

impl EnsureError {
    /// Whether retrying can help: a refusal of the replicas is for good, anything else (a
    /// server starting, a cluster without a leader yet, a node down) may pass.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::ReplicasRefused { .. })
    }
}

/// Creates or updates every stream and the request-state bucket, with `r.replicas` copies each
/// (a changed count rolls forward: clustered servers move streams between R1 and R3 in place).
/// Idempotent; safe to run from every service at once. Returns the bucket.
pub async fn ensure(js: &jetstream::Context, r: &Retention) -> Result<kv::Store, EnsureError> {
    for config in stream_configs(r) {
        let name = config.name.clone();
        js.create_or_update_stream(config)
            .await
            .map_err(|error| stream_error(name, r.replicas, error))?;
    }
    js.create_or_update_key_value(request_state_config(r))
        .await
        .map_err(|error| EnsureError::Bucket {
            replicas: r.replicas,
            error,
        })
}

fn stream_error(
    name: String,
    replicas: usize,
    error: jetstream::context::CreateStreamError,
) -> EnsureError {
    use jetstream::context::CreateStreamErrorKind;
    if let CreateStreamErrorKind::JetStream(server) = error.kind()
        && server.error_code() == jetstream::ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED
    {
        return EnsureError::ReplicasRefused {
            name,
            replicas,
            server_said: server.to_string(),
        };
    }
    EnsureError::Stream {
        name,
        replicas,
        error,
    }
}

/// Checks that every stream and the request-state bucket exist, changing nothing: for a
/// service whose NATS user may read them but not manage them. Returns the bucket.
pub async fn expect(js: &jetstream::Context) -> Result<kv::Store, EnsureError> {
    for config in stream_configs(&Retention::default()) {
        js.get_stream(&config.name)
            .await
            .map_err(|error| EnsureError::Missing {
                name: config.name.clone(),
                error: error.into(),
            })?;
    }
    js.get_key_value(REQUEST_STATE_BUCKET)
        .await
        .map_err(|error| EnsureError::Missing {
            name: format!("KV_{REQUEST_STATE_BUCKET}"),
            error: error.into(),
        })
}

/// [`ensure`] (or [`expect`] when not `manage`), retried with backoff (the server may have
/// just started, or be restarting; the streams may not be created yet) until it works, logging
/// each failure. `Ok(None)` when `stop` fires first; `Err` when the server refuses for good
/// ([`EnsureError::is_permanent`]): the service exits with that one line.
pub async fn ensure_until_done(
    js: &jetstream::Context,
    r: &Retention,
    manage: bool,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<Option<kv::Store>, EnsureError> {
    // A permanent refusal ends the retries as a success of the outer `Result`, carrying the
    // inner error out.
    // Streams the dispatcher has not created yet are expected at a grid's first start.
    let expected = |e: &EnsureError| matches!(e, EnsureError::Missing { .. });
    let outcome = crate::backoff::retry_expecting("set up the streams", stop, expected, || async {
        let done = if manage {
            ensure(js, r).await
        } else {
            expect(js).await
        };
        match done {
            Ok(store) => Ok(Ok(store)),
            Err(e) if e.is_permanent() => Ok(Err(e)),
            Err(e) => Err(e),
        }
    })
    .await;
    match outcome {
        None => Ok(None),
        Some(result) => result.map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The operator copies in `nats/` are the code's definitions, serialised as the JetStream
    /// API (and `nats stream add --config`) reads them. `EVGRID_UPDATE_NATS_DEFS=1` rewrites them.
    fn check(path: &str, value: serde_json::Value) {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(path);
        let rendered = serde_json::to_string_pretty(&value).unwrap() + "\n";
        if std::env::var_os("EVGRID_UPDATE_NATS_DEFS").is_some() {
            std::fs::write(&path, &rendered).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            on_disk,
            rendered,
            "{} is out of step with common/src/streams.rs; run EVGRID_UPDATE_NATS_DEFS=1 cargo test -p evgrid-common",
            path.display()
        );
    }

    #[test]
    fn every_stream_is_bounded_in_size_and_message_size() {
        let r = Retention::default();
        for c in stream_configs(&r) {
            assert!(c.max_bytes > 0, "{}: max_bytes", c.name);
            assert!(c.max_message_size > 0, "{}: max_message_size", c.name);
            assert!(c.max_age > Duration::ZERO, "{}: max_age", c.name);
        }
        let kv = request_state_config(&r);
        assert!(kv.max_bytes > 0 && kv.max_value_size > 0);
        let total: i64 = stream_configs(&r).iter().map(|c| c.max_bytes).sum::<i64>() + kv.max_bytes;
        assert!(
            total < 20_000_000_000,
            "{total} bytes: above nats-server.conf's max_file_store"
        );
    }

    #[test]
    fn operator_definitions_match_the_code() {
        let r = Retention::default();
        for config in stream_configs(&r) {
            check(
                &format!("nats/streams/{}.json", config.name),
                serde_json::to_value(&config).unwrap(),
            );
        }
        let kv = request_state_config(&r);
        check(
            "nats/kv/EV_REQUEST_STATE.json",
            serde_json::json!({
                "bucket": kv.bucket, "description": kv.description, "history": kv.history,
                "max_age_seconds": kv.max_age.as_secs(), "max_bytes": kv.max_bytes,
                "max_value_size": kv.max_value_size, "storage": "file",
            }),
        );
        check(
            "nats/consumers/EV_REQUESTS.dispatcher.json",
            serde_json::to_value(dispatcher_consumer(DEFAULT_DISPATCHER_MAX_ACK_PENDING, 1))
                .unwrap(),
        );
        check(
            "nats/consumers/EV_DISPATCH.substation-ID.json",
            serde_json::to_value(substation_consumer("ID", 1)).unwrap(),
        );
    }
}
