//! Grid-operator limits (`ev.limits.<substation_id>`): which capacity a limit message puts in
//! force, and until when. The pure rule the live substation applies to each limit it receives
//! (the simulator's limits follow it too).

use chrono::{DateTime, Utc};

use crate::messages::Limit;

/// The capacity a limit puts in force at `now`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InForce {
    pub capacity_kw: f64,
    /// When to go back to the configured capacity; `None` = until the next message.
    pub until: Option<DateTime<Utc>>,
}

impl InForce {
    /// No limit: the configured capacity.
    pub fn configured(configured_kw: f64) -> Self {
        Self {
            capacity_kw: configured_kw,
            until: None,
        }
    }
}

/// What `limit`, received at `now`, puts in force: its capacity until its `until`, or the
/// configured capacity when it has none (`null`) or its `until` has already passed.
///
/// A limit only ever lowers the capacity: one above the configured capacity (the substation's
/// nameplate) puts the configured capacity in force. Anyone who can publish on
/// `ev.limits.<id>` could otherwise make a 100 kW substation draw 1,200 kW.
pub fn resolve(limit: &Limit, configured_kw: f64, now: DateTime<Utc>) -> InForce {
    match (limit.capacity_kw, limit.until) {
        (Some(_), Some(until)) if until <= now => InForce::configured(configured_kw),
        (Some(capacity_kw), until) => InForce {
            capacity_kw: capacity_kw.min(configured_kw),
            until,
        },
        (None, _) => InForce::configured(configured_kw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(hour: u32) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + i64::from(hour) * 3600, 0).unwrap()
    }

    #[test]
    fn a_limit_holds_until_its_end_or_the_next_message() {
        let limit =
            |capacity_kw: Option<f64>, until: Option<DateTime<Utc>>| Limit { capacity_kw, until };
        assert_eq!(
            resolve(&limit(Some(80.0), Some(at(2))), 150.0, at(1)),
            InForce {
                capacity_kw: 80.0,
                until: Some(at(2))
            }
        );
        assert_eq!(
            resolve(&limit(Some(80.0), None), 150.0, at(1)),
            InForce {
                capacity_kw: 80.0,
                until: None
            }
        );
        // Never above the configured capacity, however large the limit.
        for above in [150.0, 200.0, 1e308] {
            assert_eq!(
                resolve(&limit(Some(above), Some(at(2))), 150.0, at(1)),
                InForce {
                    capacity_kw: 150.0,
                    until: Some(at(2))
                }
            );
        }
        // Already over, or lifted: the configured capacity.
        for lifted in [limit(Some(80.0), Some(at(1))), limit(None, Some(at(5)))] {
            assert_eq!(resolve(&lifted, 150.0, at(1)), InForce::configured(150.0));
        }
    }
}
