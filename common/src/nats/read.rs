//! Reading what the pipeline recorded, once: the stored messages of a stream (requests, session
//! events, dispatches, limits) from a point in time or a sequence up to its last message when
//! the read began, and the request states of the `EV_REQUEST_STATE` bucket. For tools that look
//! back at ingest → dispatcher → substation after the fact (`evgrid replay`, the chaos checker),
//! never for the services, which follow streams live ([`super::OrderedFeed`]).

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull, kv};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use evgrid_model::messages::RequestRecord;
use futures::StreamExt;
use uuid::Uuid;

/// Bound on waiting for the next stored message of a stream being read.
pub const NEXT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bucket reads in flight at once.
const READS_IN_FLIGHT: usize = 64;

/// One stored message.
#[derive(Debug, Clone)]
pub struct Stored {
    pub subject: String,
    pub payload: Bytes,
    pub headers: Option<async_nats::HeaderMap>,
    /// Its stream sequence.
    pub sequence: u64,
    /// When the server stored it.
    pub published: DateTime<Utc>,
}

impl Stored {
    /// The value of header `name`, if the message has it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.as_ref()?.get(name).map(|v| v.as_str())
    }
}

/// Where a read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The oldest message the stream holds.
    All,
    /// The first message at or after this stream sequence.
    Sequence(u64),
    /// The first message stored at or after this time.
    Time(DateTime<Utc>),
}

impl Start {
    fn policy(self) -> DeliverPolicy {
        match self {
            Start::All => DeliverPolicy::All,
            Start::Sequence(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
            Start::Time(t) => DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(
                    t.timestamp_nanos_opt().unwrap_or(0),
                ))
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
            },
        }
    }
}

/// Why a stream or the bucket could not be read; each names what.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("no stream {stream} on this server (have the services run here?)")]
    NoStream {
        stream: String,
        #[source]
        error: async_nats::Error,
    },
    #[error("cannot read stream {stream}")]
    Read {
        stream: String,
        #[source]
        error: async_nats::Error,
    },
    #[error("{stream}: no message within {NEXT_TIMEOUT:?} after {read} of it")]
    Stalled { stream: String, read: usize },
    #[error("no request-state bucket {}", crate::streams::REQUEST_STATE_BUCKET)]
    NoBucket(#[source] async_nats::Error),
    #[error("cannot read the state of request {id}")]
    State {
        id: Uuid,
        #[source]
        error: crate::streams::StateReadError,
    },
}

/// The messages of `stream` from `start` up to the last one stored when the read began (later
/// ones are not waited for), oldest first, through an ordered consumer.
pub async fn read_stream(
    js: &jetstream::Context,
    stream: &str,
    start: Start,
) -> Result<Vec<Stored>, ReadError> {
    let failed = |error: async_nats::Error| ReadError::Read {
        stream: stream.to_owned(),
        error,
    };
    let mut handle = stream_handle(js, stream).await?;
    let state = handle
        .info()
        .await
        .map_err(|e| failed(e.into()))?
        .state
        .clone();
    let mut out = Vec::new();
    if state.messages == 0 || matches!(start, Start::Sequence(s) if s > state.last_sequence) {
        return Ok(out);
    }
    let config = pull::OrderedConfig {
        deliver_policy: start.policy(),
        ..Default::default()
    };
    let consumer = handle
        .create_consumer(config)
        .await
        .map_err(|e| failed(e.into()))?;
    // A start after the last message leaves nothing to deliver: nothing would ever arrive.
    if consumer.cached_info().num_pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await.map_err(|e| failed(e.into()))?;
    loop {
        let Ok(next) = tokio::time::timeout(NEXT_TIMEOUT, messages.next()).await else {
            return Err(ReadError::Stalled {
                stream: stream.to_owned(),
                read: out.len(),
            });
        };
        let message = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(failed(e.into())),
            None => return Err(failed("the consumer ended".into())),
        };
        let info = message.info().map_err(|e| failed(e.to_string().into()))?;
        let (sequence, pending) = (info.stream_sequence, info.pending);
        if sequence > state.last_sequence {
            return Ok(out);
        }
        out.push(Stored {
            subject: message.subject.to_string(),
            payload: message.payload.clone(),
            headers: message.headers.clone(),
            sequence,
            published: super::to_utc(info.published),
        });
        if sequence >= state.last_sequence || pending == 0 {
            return Ok(out);
        }
    }
}

/// The newest message of every subject of `stream` matching `filter`, each read by its subject.
/// For a stream that keeps one message per subject (heartbeats), where reading in order up to
/// the end at the start would leave out a subject whose message was replaced meanwhile, and a
/// consumer delivering the last per subject can skip one replaced before its delivery.
pub async fn read_last_per_subject(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
) -> Result<Vec<Stored>, ReadError> {
    let failed = |error: async_nats::Error| ReadError::Read {
        stream: stream.to_owned(),
        error,
    };
    let handle = stream_handle(js, stream).await?;
    let mut listed = handle
        .info_with_subjects(filter)
        .await
        .map_err(|e| failed(e.into()))?;
    let mut subjects = Vec::new();
    while let Some(subject) = listed.next().await {
        subjects.push(subject.map_err(|e| failed(e.into()))?.0);
    }
    let handle = &handle;
    let reads = futures::stream::iter(subjects)
        .map(|subject| async move { handle.get_last_raw_message_by_subject(&subject).await })
        .buffered(READS_IN_FLIGHT);
    let mut reads = std::pin::pin!(reads);
    let mut out = Vec::new();
    while let Some(read) = reads.next().await {
        let m = match read {
            Ok(m) => m,
            // Expired since it was listed.
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => continue,
            Err(e) => return Err(failed(e.into())),
        };
        out.push(Stored {
            subject: m.subject.to_string(),
            payload: m.payload,
            headers: Some(m.headers),
            sequence: m.sequence,
            published: super::to_utc(m.time),
        });
    }
    Ok(out)
}

async fn stream_handle(
    js: &jetstream::Context,
    stream: &str,
) -> Result<jetstream::stream::Stream, ReadError> {
    js.get_stream(stream)
        .await
        .map_err(|e| ReadError::NoStream {
            stream: stream.to_owned(),
            error: e.into(),
        })
}

/// The request-state bucket.
pub async fn bucket(js: &jetstream::Context) -> Result<kv::Store, ReadError> {
    js.get_key_value(crate::streams::REQUEST_STATE_BUCKET)
        .await
        .map_err(|e| ReadError::NoBucket(e.into()))
}

/// The states of `ids` (absent or deleted ids are left out), each as its readers see it
/// ([`crate::streams::read_request`]: the dispatcher's record merged with the session record
/// of the substation it names), read as the services read a state a decision depends on
/// ([`crate::streams::read_latest`]: from the leader of a replicated bucket, where a follower
/// may not have applied the latest write).
pub async fn records(
    kv: &kv::Store,
    ids: impl IntoIterator<Item = Uuid>,
) -> Result<HashMap<Uuid, RequestRecord>, ReadError> {
    let reads = futures::stream::iter(ids)
        .map(|id| async move { (id, crate::streams::read_request(kv, id).await) })
        .buffer_unordered(READS_IN_FLIGHT);
    let mut out = HashMap::new();
    let mut reads = std::pin::pin!(reads);
    while let Some((id, read)) = reads.next().await {
        let record = read.map_err(|error| ReadError::State { id, error })?;
        if let Some(record) = record {
            out.insert(id, record);
        }
    }
    Ok(out)
}
