//! What `evgrid replay` reads from NATS, once, as the live grid recorded it: the original charge
//! requests of a window of `EV_REQUESTS` (move offers of failover and repeats of one request
//! left out), their states in `EV_REQUEST_STATE`, their session events in `EV_SESSIONS`, every
//! substation's last heartbeat in `EV_TELEMETRY` (its configured capacity and heartbeat
//! interval) and the grid-operator limits in `EV_LIMITS`. Nothing is waited for beyond the last
//! message stored when the read begins.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use evgrid_common::nats::Nats;
use evgrid_common::nats::read::{self, ReadError, Start, Stored};
use evgrid_common::streams;
use evgrid_model::headers;
use evgrid_model::messages::{
    ChargeRequest, Limit, RequestRecord, SessionReport, Telemetry, request_id_from_sequence,
};
use evgrid_model::subjects;
use uuid::Uuid;

use super::window::{LimitChange, Original, Substation};

/// A point in the request log: a time, or a stream sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    Time(DateTime<Utc>),
    Sequence(u64),
}

impl std::str::FromStr for Point {
    type Err = String;

    /// A stream sequence (`1000`) or an RFC 3339 time (`2026-12-05T09:00:00Z`).
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(seq) = s.parse::<u64>() {
            return Ok(Point::Sequence(seq));
        }
        DateTime::parse_from_rfc3339(s)
            .map(|t| Point::Time(t.to_utc()))
            .map_err(|_| {
                format!("expected a stream sequence (1000) or an RFC 3339 time (2026-12-05T09:00:00Z), got {s:?}")
            })
    }
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Point::Time(t) => write!(f, "{}", t.to_rfc3339()),
            Point::Sequence(s) => write!(f, "sequence {s}"),
        }
    }
}

/// Why a window cannot be replayed. The caller branches on [`ReplayError::EmptyWindow`] only
/// to say so; every variant is one readable line.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(
        "no charge request in the window ({window}) of {}: nothing to replay",
        streams::REQUESTS
    )]
    EmptyWindow { window: String },
    #[error(
        "no heartbeat of any substation in {} (it keeps a day): the grid's capacities are unknown; run the grid, or replay a window of the last day",
        streams::TELEMETRY
    )]
    NoSubstations,
}

/// Requests of the window left out, and why.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LeftOut {
    /// Failover's move offers (header `Evgrid-Moved-From`): not arrivals.
    pub moves: usize,
    /// A request id stored again (a retry past the duplicate window): the first counts.
    pub repeats: usize,
    /// Not a charge request at all (the dispatcher rejected it).
    pub invalid: usize,
}

/// Everything the live grid recorded over a window.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub originals: Vec<Original>,
    pub left_out: LeftOut,
    /// First and last stream sequences of the window.
    pub sequences: (u64, u64),
    pub states: HashMap<Uuid, RequestRecord>,
    pub sessions: Vec<SessionReport>,
    pub substations: Vec<Substation>,
    pub limits: Vec<LimitChange>,
    /// When the states were read.
    pub read_at: DateTime<Utc>,
}

/// Reads the window `[from, until]` (both inclusive; `until` at most the last request stored
/// now).
pub async fn window(
    nats: &Nats,
    from: Start,
    until: Option<Point>,
) -> Result<Recorded, ReplayError> {
    let describe = || {
        let from = match from {
            Start::All => "the oldest request".to_owned(),
            Start::Sequence(s) => Point::Sequence(s).to_string(),
            Start::Time(t) => Point::Time(t).to_string(),
        };
        match until {
            Some(u) => format!("{from} to {u}"),
            None => format!("{from} to the last request"),
        }
    };
    let stored = read::read_stream(&nats.js, streams::REQUESTS, from).await?;
    let within = |m: &Stored| match until {
        Some(Point::Time(t)) => m.published <= t,
        Some(Point::Sequence(s)) => m.sequence <= s,
        None => true,
    };
    let (originals, left_out) = originals(stored.iter().take_while(|m| within(m)));
    let (Some(first), Some(last)) = (originals.first(), originals.last()) else {
        return Err(ReplayError::EmptyWindow { window: describe() });
    };
    let sequences = (first.sequence, last.sequence);
    let ids: HashSet<Uuid> = originals.iter().map(|o| o.request_id).collect();

    // A session cannot start before its request was stored.
    let sessions = read::read_stream(&nats.js, streams::SESSIONS, Start::Time(first.stored_at))
        .await?
        .into_iter()
        .filter_map(|m| serde_json::from_slice::<SessionReport>(&m.payload).ok())
        .filter(|r| ids.contains(&r.event.request_id))
        .collect();
    let substations = substations(
        &read::read_last_per_subject(&nats.js, streams::TELEMETRY, subjects::TELEMETRY_ALL).await?,
    );
    if substations.is_empty() {
        return Err(ReplayError::NoSubstations);
    }
    let limits = read::read_stream(&nats.js, streams::LIMITS, Start::All)
        .await?
        .into_iter()
        .filter_map(|m| {
            // An invalid limit changes nothing live either.
            let limit = Limit::parse(&m.payload).ok()?;
            Some(LimitChange {
                substation_id: subjects::substation_of(&m.subject)?.to_owned(),
                at: m.published,
                limit,
            })
        })
        .collect();
    let kv = read::bucket(&nats.js).await?;
    let read_at = Utc::now();
    let states = read::records(&kv, ids).await?;
    Ok(Recorded {
        originals,
        left_out,
        sequences,
        states,
        sessions,
        substations,
        limits,
        read_at,
    })
}

/// The original requests among `stored`, each once, with their ids and acceptance times as the
/// dispatcher reads them.
fn originals<'a>(stored: impl Iterator<Item = &'a Stored>) -> (Vec<Original>, LeftOut) {
    let mut left_out = LeftOut::default();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for m in stored {
        if m.header(headers::MOVED_FROM).is_some() {
            left_out.moves += 1;
            continue;
        }
        let Ok(request) = serde_json::from_slice::<ChargeRequest>(&m.payload) else {
            left_out.invalid += 1;
            continue;
        };
        let header_id = m
            .header(headers::REQUEST_ID)
            .and_then(|v| Uuid::parse_str(v.trim()).ok());
        let request_id = request
            .request_id
            .or(header_id)
            .unwrap_or_else(|| request_id_from_sequence(m.sequence));
        if !seen.insert(request_id) {
            left_out.repeats += 1;
            continue;
        }
        let accepted_at = m
            .header(headers::ACCEPTED_AT)
            .and_then(|v| DateTime::parse_from_rfc3339(v.trim()).ok())
            .map_or(m.published, |t| t.to_utc());
        out.push(Original {
            request_id,
            sequence: m.sequence,
            stored_at: m.published,
            accepted_at,
            request,
        });
    }
    (out, left_out)
}

/// Every substation's configured capacity and heartbeat interval, by id, from its last
/// heartbeat.
fn substations(telemetry: &[Stored]) -> Vec<Substation> {
    let mut by_id: HashMap<String, Substation> = HashMap::new();
    for m in telemetry {
        // Judged as the services judge it: a body speaking for another substation, or out of
        // bounds, is not a substation of this grid.
        let Ok(t) = Telemetry::parse(&m.subject, &m.payload) else {
            continue;
        };
        by_id.insert(
            t.heartbeat.substation_id.clone(),
            Substation {
                id: t.heartbeat.substation_id,
                capacity_kw: t.configured_capacity_kw.unwrap_or(t.heartbeat.capacity_kw),
                interval_ms: t.heartbeat.interval_ms,
            },
        );
    }
    let mut all: Vec<Substation> = by_id.into_values().collect();
    all.sort_by(|a, b| a.id.cmp(&b.id));
    all
}
