//! What `evgrid load` sends and when, decided before anything is sent: the n-th request's
//! id, body and intended send time are pure functions of the plan (seed, mix or trace, rate),
//! so a run is reproducible and the senders at the front of ingest → dispatcher → substation
//! do no more work per request than encode and send.

use std::io::Write;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use evgrid_model::units::round3;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use uuid::Uuid;

use super::dist::Distribution;
use evgrid_sim::trace::Session;

/// The parameters of one request, before it is stamped with an id and a send time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestSpec {
    pub energy_kwh: f64,
    pub max_power_kw: f64,
    /// Departure as a duration after sending, if any.
    pub departure_after: Option<Duration>,
    /// Ask for all of the energy or nothing (`all_or_nothing`); best effort otherwise.
    pub all_or_nothing: bool,
}

/// Where request parameters come from.
#[derive(Debug, Clone)]
pub enum Mix {
    /// Drawn from distributions, request `i` from its own generator seeded by `(seed, i)`, so
    /// the mix does not depend on which worker sends which request.
    Random {
        energy_kwh: Distribution,
        max_power_kw: Distribution,
        departure_hours: Option<Distribution>,
        seed: u64,
    },
    /// Replayed sessions, in send order.
    Trace(Vec<RequestSpec>),
}

impl Mix {
    /// The parameters of request `i`.
    pub fn spec(&self, i: u64) -> RequestSpec {
        match self {
            Mix::Random {
                energy_kwh,
                max_power_kw,
                departure_hours,
                seed,
            } => {
                let mut rng = SmallRng::seed_from_u64(seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                RequestSpec {
                    energy_kwh: round3(energy_kwh.sample(&mut rng)),
                    max_power_kw: round3(max_power_kw.sample(&mut rng)),
                    departure_after: departure_hours
                        .map(|d| Duration::from_secs_f64(d.sample(&mut rng) * 3600.0)),
                    all_or_nothing: false,
                }
            }
            Mix::Trace(specs) => specs[i as usize],
        }
    }
}

/// When requests are sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// `concurrency` workers, each sending its next request when the last one is answered.
    Closed { concurrency: usize, requests: u64 },
    /// Request `i` is due at `i / rate` seconds, whatever happens to earlier ones.
    Open { rate: f64, requests: u64 },
    /// Request `i` is due at `offsets[i]` (a trace's arrivals, scaled by the replay speed).
    Trace { offsets: Vec<Duration> },
}

impl Schedule {
    /// An open loop at `rate` per second for `duration`: every request due before the end
    /// (at most [`MAX_REQUESTS`]).
    pub fn open(rate: f64, duration: Duration) -> Self {
        let requests = ((rate * duration.as_secs_f64()).ceil().max(0.0) as u64).min(MAX_REQUESTS);
        Schedule::Open { rate, requests }
    }

    /// How many requests the run sends (or drops for overload).
    pub fn requests(&self) -> u64 {
        match self {
            Schedule::Closed { requests, .. } | Schedule::Open { requests, .. } => *requests,
            Schedule::Trace { offsets } => offsets.len() as u64,
        }
    }

    /// When request `i` is due, after the start of the run; `None` in a closed loop.
    pub fn due(&self, i: u64) -> Option<Duration> {
        match self {
            Schedule::Closed { .. } => None,
            Schedule::Open { rate, .. } => Some(Duration::from_secs_f64(i as f64 / rate)),
            Schedule::Trace { offsets } => offsets.get(i as usize).copied(),
        }
    }
}

/// A trace turned into a plan: sessions in arrival order, arrivals as offsets from the first
/// divided by `speed`, the stay (departure − arrival) as the departure after sending, and the
/// car's max power `vehicle_max_kw`. Sessions asking for no energy (which the API refuses) are
/// left out and counted; at most `limit` sessions are kept.
///
/// The stay is not divided by `speed`: the pipeline reads a departure as a distance from
/// acceptance on its simulated clock (docs/architecture.md), so with substations running at
/// `--time-scale` = `speed` a car keeps its real stay in simulated time, as arrivals do.
#[derive(Debug, Clone, PartialEq)]
pub struct TracePlan {
    pub offsets: Vec<Duration>,
    pub specs: Vec<RequestSpec>,
    /// Sessions left out because they ask for no energy.
    pub skipped: u64,
}

impl TracePlan {
    pub fn new(
        mut sessions: Vec<Session>,
        speed: f64,
        vehicle_max_kw: f64,
        energy_max_kwh: f64,
        limit: Option<u64>,
    ) -> Self {
        sessions.sort_by_key(|s| s.arrival);
        let first = sessions.first().map(|s| s.arrival);
        let scaled = |d: chrono::TimeDelta| {
            Duration::from_secs_f64(d.to_std().unwrap_or_default().as_secs_f64() / speed)
        };
        let mut plan = TracePlan {
            offsets: Vec::with_capacity(sessions.len()),
            specs: Vec::with_capacity(sessions.len()),
            skipped: 0,
        };
        for s in &sessions {
            if limit.is_some_and(|l| plan.specs.len() as u64 >= l) {
                break;
            }
            if s.energy_kwh <= 0.0 {
                plan.skipped += 1;
                continue;
            }
            plan.offsets
                .push(scaled(s.arrival - first.unwrap_or(s.arrival)));
            plan.specs.push(RequestSpec {
                energy_kwh: s.energy_kwh.min(energy_max_kwh),
                max_power_kw: vehicle_max_kw,
                departure_after: Some((s.departure - s.arrival).to_std().unwrap_or_default()),
                all_or_nothing: false,
            });
        }
        plan
    }
}

/// Request ids of one run: a random 80-bit prefix and the request's index in the low 48 bits,
/// formatted as UUID v4. Unique across runs (the prefix), free to make, and an id seen in a
/// session event maps straight back to its request without a shared table.
#[derive(Debug, Clone, Copy)]
pub struct RunIds {
    prefix: u128,
}

const INDEX_BITS: u32 = 48;
const INDEX_MASK: u128 = (1 << INDEX_BITS) - 1;
/// Most requests one run can number (the index bits of [`RunIds`]).
pub const MAX_REQUESTS: u64 = 1 << INDEX_BITS;

impl RunIds {
    /// `random` supplies the prefix (its low 48 bits are ignored).
    pub fn new(random: u128) -> Self {
        // Set the version and variant bits once; they lie outside the index bits.
        let prefix = uuid::Builder::from_random_bytes((random & !INDEX_MASK).to_be_bytes())
            .into_uuid()
            .as_u128();
        Self { prefix }
    }

    /// Ids whose first 48 bits are `tag` (an API key's owner, as ingest makes them).
    pub fn owned_by(tag: evgrid_model::messages::OwnerTag, random: u128) -> Self {
        let prefix =
            evgrid_model::messages::with_owner_tag(tag, Uuid::from_u128(Self::new(random).prefix));
        Self {
            prefix: prefix.as_u128(),
        }
    }

    pub fn id(&self, i: u64) -> Uuid {
        Uuid::from_u128(self.prefix | (u128::from(i) & INDEX_MASK))
    }

    /// The index of one of this run's ids, `None` for anyone else's.
    pub fn index(&self, id: Uuid) -> Option<u64> {
        let v = id.as_u128();
        (v & !INDEX_MASK == self.prefix).then_some((v & INDEX_MASK) as u64)
    }
}

/// Writes the JSON body of request `i` into `buf` (cleared first): the same fields as
/// `POST /v1/charge-requests` and `ev.requests`. `now` is the send time, from which the
/// departure is counted.
pub fn encode(buf: &mut Vec<u8>, id: Uuid, i: u64, spec: &RequestSpec, now: DateTime<Utc>) {
    buf.clear();
    let mut uuid = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let uuid = id.hyphenated().encode_lower(&mut uuid);
    // Writing into a Vec cannot fail.
    let _ = write!(
        buf,
        r#"{{"request_id":"{uuid}","vehicle_id":"load-{i}","energy_kwh":{},"max_power_kw":{}"#,
        spec.energy_kwh, spec.max_power_kw
    );
    if let Some(after) = spec.departure_after {
        let departure = now + after;
        let _ = write!(
            buf,
            r#","departure":"{}""#,
            departure.to_rfc3339_opts(SecondsFormat::Millis, true)
        );
    }
    if spec.all_or_nothing {
        buf.extend_from_slice(br#","all_or_nothing":true"#);
    }
    buf.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use evgrid_model::validate::{ENERGY_KWH_MAX, parse_charge_request};

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn random_mix(seed: u64) -> Mix {
        Mix::Random {
            energy_kwh: Distribution::parse("uniform:10..60", 0.1, 200.0).unwrap(),
            max_power_kw: Distribution::parse("normal:11,3", 1.0, 400.0).unwrap(),
            departure_hours: Some(Distribution::parse("uniform:1..8", 0.01, 156.0).unwrap()),
            seed,
        }
    }

    #[test]
    fn a_seed_reproduces_the_mix_whatever_the_order() {
        let (a, b) = (random_mix(1), random_mix(1));
        let forward: Vec<_> = (0..50).map(|i| a.spec(i)).collect();
        let backward: Vec<_> = (0..50).rev().map(|i| b.spec(i)).collect();
        assert!(forward.iter().eq(backward.iter().rev()));
        assert_ne!(random_mix(2).spec(0), forward[0]);
        assert_ne!(forward[0], forward[1]);
    }

    #[test]
    fn bodies_pass_the_api_validation() {
        let mix = random_mix(3);
        let now = t("2026-01-01T00:00:00Z");
        let ids = RunIds::new(0x1234_5678_9abc_def0_1122_3344_5566_7788);
        let mut buf = Vec::new();
        for i in 0..100 {
            let spec = mix.spec(i);
            encode(&mut buf, ids.id(i), i, &spec, now);
            let r = parse_charge_request(&buf, now).unwrap();
            assert_eq!(r.request_id, Some(ids.id(i)));
            assert_eq!(r.vehicle_id, format!("load-{i}"));
            assert_eq!(r.energy_kwh, spec.energy_kwh);
            assert_eq!(
                r.departure,
                Some(now + spec.departure_after.unwrap())
                    .map(|d| { DateTime::from_timestamp_millis(d.timestamp_millis()).unwrap() })
            );
        }
        let plain = RequestSpec {
            energy_kwh: 30.0,
            max_power_kw: 11.0,
            departure_after: None,
            all_or_nothing: true,
        };
        encode(&mut buf, ids.id(0), 0, &plain, now);
        let plain = parse_charge_request(&buf, now).unwrap();
        assert!(plain.departure.is_none() && plain.all_or_nothing);
    }

    #[test]
    fn ids_are_v4_and_map_back_to_their_index() {
        let ids = RunIds::new(u128::MAX);
        for i in [0, 1, 99, INDEX_MASK as u64] {
            let id = ids.id(i);
            assert_eq!(id.get_version_num(), 4);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            assert_eq!(ids.index(id), Some(i));
        }
        assert_eq!(ids.index(Uuid::new_v4()), None);
        assert_eq!(RunIds::new(0).index(ids.id(5)), None);
    }

    #[test]
    fn open_loop_schedules_every_request_due_within_the_duration() {
        let s = Schedule::open(100.0, Duration::from_secs(1));
        assert_eq!(s.requests(), 100);
        assert_eq!(s.due(0), Some(Duration::ZERO));
        assert_eq!(s.due(50), Some(Duration::from_millis(500)));
        assert_eq!(Schedule::open(3.0, Duration::from_secs(1)).requests(), 3);
        assert_eq!(Schedule::open(2.5, Duration::from_secs(1)).requests(), 3);
        let closed = Schedule::Closed {
            concurrency: 4,
            requests: 10,
        };
        assert_eq!((closed.requests(), closed.due(3)), (10, None));
    }

    #[test]
    fn traces_replay_in_arrival_order_scaled_by_speed() {
        let session = |arrival: &str, departure: &str, energy_kwh: f64| Session {
            arrival: t(arrival),
            departure: t(departure),
            energy_kwh,
        };
        let sessions = vec![
            session("2019-05-01T10:00:00Z", "2019-05-01T12:00:00Z", 300.0),
            session("2019-05-01T08:00:00Z", "2019-05-01T16:00:00Z", 20.0),
            session("2019-05-01T09:00:00Z", "2019-05-01T10:00:00Z", 0.0),
        ];
        let plan = TracePlan::new(sessions.clone(), 3600.0, 6.6, ENERGY_KWH_MAX, None);
        assert_eq!(plan.skipped, 1);
        assert_eq!(
            plan.offsets,
            [Duration::ZERO, Duration::from_secs(2)],
            "8:00 and 10:00 at 3600×"
        );
        assert_eq!(
            plan.specs[0].departure_after,
            Some(Duration::from_secs(8 * 3600)),
            "the stay is kept: the pipeline scales it"
        );
        assert_eq!(
            plan.specs[1].energy_kwh, ENERGY_KWH_MAX,
            "clamped to the API limit"
        );
        assert!(plan.specs.iter().all(|s| s.max_power_kw == 6.6));

        let first = TracePlan::new(sessions, 1.0, 6.6, ENERGY_KWH_MAX, Some(1));
        assert_eq!(first.specs.len(), 1);
        assert_eq!(first.specs[0].energy_kwh, 20.0);
    }
}
