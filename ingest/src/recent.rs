//! The requests this process accepted recently, so that `GET /v1/charge-requests/{id}` right
//! after a 202 answers `queued` before the dispatcher has written anything to
//! `EV_REQUEST_STATE`.
//!
//! Only the request's `EV_REQUESTS` sequence is kept (from the PubAck): the GET reads the
//! request itself from the stream. So an entry is 24 bytes in tables allocated once, and the
//! hot path allocates nothing here; a store holding 100k heap objects would fragment the
//! allocator and slow every request down. Bounded (oldest forgotten first) and sharded by id,
//! so concurrent POSTs rarely meet on a lock.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use chrono::{DateTime, Utc};
use evgrid_model::messages::{ChargeRequest, RequestRecord, RequestState};
use uuid::Uuid;

const SHARDS: usize = 16;

/// At most about `capacity` recently accepted request ids, with their stream sequences.
pub(crate) struct RecentlyAccepted {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
}

struct Shard {
    sequences: HashMap<Uuid, u64>,
    oldest_first: VecDeque<Uuid>,
}

impl RecentlyAccepted {
    /// Remembers up to `capacity` requests (rounded up to a multiple of the shard count).
    pub(crate) fn new(capacity: usize) -> Self {
        let per_shard = capacity.div_ceil(SHARDS).max(1);
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        // +1: an insert briefly holds one more before the oldest goes.
                        sequences: HashMap::with_capacity(per_shard + 1),
                        oldest_first: VecDeque::with_capacity(per_shard),
                    })
                })
                .collect(),
            per_shard,
        }
    }

    fn shard(&self, id: &Uuid) -> &Mutex<Shard> {
        // Request ids are random (v4) or hashes (v5): their low bits spread evenly.
        &self.shards[(id.as_u64_pair().1 % SHARDS as u64) as usize]
    }

    /// Remembers that `id` is stored at `sequence`, forgetting the oldest entry when full.
    pub(crate) fn insert(&self, id: Uuid, sequence: u64) {
        let mut shard = self
            .shard(&id)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if shard.sequences.insert(id, sequence).is_some() {
            return;
        }
        if shard.oldest_first.len() >= self.per_shard
            && let Some(oldest) = shard.oldest_first.pop_front()
        {
            shard.sequences.remove(&oldest);
        }
        shard.oldest_first.push_back(id);
    }

    /// The `EV_REQUESTS` sequence of `id`, if this process accepted it recently.
    pub(crate) fn sequence(&self, id: &Uuid) -> Option<u64> {
        self.shard(id)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .sequences
            .get(id)
            .copied()
    }
}

/// The state of a stored request the pipeline has not reported on yet: queued, nothing
/// delivered. `None` if `payload` is not a charge request.
pub(crate) fn queued_record(
    request_id: Uuid,
    payload: &[u8],
    accepted_at: DateTime<Utc>,
) -> Option<RequestRecord> {
    let request: ChargeRequest = serde_json::from_slice(payload).ok()?;
    Some(RequestRecord::new(
        request_id,
        RequestState::Queued,
        &request,
        accepted_at,
        accepted_at,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_the_oldest_beyond_capacity() {
        let recent = RecentlyAccepted::new(SHARDS * 2);
        // Ids landing in one shard: the same low 64 bits.
        let ids: Vec<Uuid> = (0..3u128).map(|i| Uuid::from_u128(i << 64)).collect();
        for (seq, id) in ids.iter().enumerate() {
            recent.insert(*id, seq as u64);
        }
        assert_eq!(recent.sequence(&ids[0]), None);
        assert_eq!(recent.sequence(&ids[1]), Some(1));
        assert_eq!(recent.sequence(&ids[2]), Some(2));
        // Other shards are unaffected.
        recent.insert(Uuid::from_u128(1), 9);
        assert_eq!(recent.sequence(&Uuid::from_u128(1)), Some(9));
        assert_eq!(recent.sequence(&ids[2]), Some(2));
    }

    #[test]
    fn inserting_a_known_id_again_takes_no_extra_room() {
        let recent = RecentlyAccepted::new(SHARDS * 2);
        let (a, b) = (Uuid::from_u128(1 << 64), Uuid::from_u128(2 << 64));
        recent.insert(a, 1);
        recent.insert(a, 1);
        recent.insert(b, 2);
        assert_eq!(recent.sequence(&a), Some(1));
        assert_eq!(recent.sequence(&b), Some(2));
    }

    #[test]
    fn a_queued_record_carries_the_stored_request() {
        let id = Uuid::from_u128(9);
        let at = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let payload = br#"{"request_id":"00000000-0000-0000-0000-000000000009","vehicle_id":"ev-9","energy_kwh":30.0,"max_power_kw":11.0}"#;
        let record = queued_record(id, payload, at).unwrap();
        assert_eq!(record.request_id, id);
        assert_eq!(record.state, RequestState::Queued);
        assert_eq!(record.vehicle_id, "ev-9");
        assert_eq!(record.energy_kwh, 30.0);
        assert_eq!(record.energy_delivered_kwh, 0.0);
        assert_eq!((record.accepted_at, record.updated_at), (at, at));
        assert_eq!(queued_record(id, b"not json", at), None);
    }
}
