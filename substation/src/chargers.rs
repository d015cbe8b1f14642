//! Where the live substation's sessions meet real charging stations (`--chargers ocpp`,
//! docs/ocpp.md): which car is which request, which station each session charges at, the
//! limit in force at each, and which stations cannot be trusted to keep one.
//!
//! Pure bookkeeping, between the CSMS ([`evgrid_ocpp::server`]) and the shell: the shell feeds
//! it what the stations say and the powers the model allocates, and sends the [`Command`]s it
//! returns. The safety rules live here:
//!
//! - a session whose station is out of reach, refused or never answered a limit, or draws more
//!   than its limit, is counted at its worst case ([`Chargers::pin_kw`]: the station's most, or
//!   what it was seen drawing if more), so the model lowers the others;
//! - a limit goes down at once, but up only when the limits in force (each station's accepted
//!   limit, or a higher one sent and not answered, or sent with its answer lost) leave room for
//!   it within the capacity: the sum of the limits in force never exceeds the capacity, even
//!   while answers are on their way.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use evgrid_ocpp::messages::{TransactionEventKind, TransactionEventRequest};
use evgrid_ocpp::server::{Command, Outcome};
use uuid::Uuid;

/// A limit that changes by less than this (W) is not sent again, unless it goes down.
const LIMIT_STEP_W: f64 = 100.0;
/// A station drawing more than its limit by this much (fraction, plus [`OVERDRAW_MARGIN_W`])
/// does not keep it: meters and cars' controllers round, but not by more.
const OVERDRAW_TOLERANCE: f64 = 0.05;
const OVERDRAW_MARGIN_W: f64 = 200.0;
/// A station takes a moment to follow a lower limit (and a reading may have been taken before
/// it did): for this long after it accepted one, its draw is held to the limit before.
const OVERDRAW_GRACE: Duration = Duration::from_secs(2);
/// The EVSE a reservation asks for: evgrid's stations have one each.
const RESERVED_EVSE: i32 = 1;
/// The longest a connector is held for a car without a departure.
const RESERVATION_HOURS: i64 = 12;
/// A transaction nobody here knows (after a restart, its events carry no idToken) waits this
/// long for its request's session to claim it, counted at its station's most meanwhile; then
/// it is charged as a walk-in. A restarted substation gets its sessions back within the
/// dispatch ack wait (2 s) of reconnecting.
pub(crate) const ORPHAN_GRACE: Duration = Duration::from_secs(10);

/// What the shell does with a TransactionEvent.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tx {
    /// A transaction of no session yet: the awaited session whose car this is (by its idToken,
    /// or a resumed session's transaction, with the energy its request had before it), or a
    /// walk-in (none). The shell calls [`Chargers::plug`] for it.
    New {
        awaited: Option<Uuid>,
        id_token: Option<String>,
        energy_before_kwh: Option<f64>,
    },
    /// A transaction nobody here knows, going on (no idToken to tell whose): held for
    /// [`ORPHAN_GRACE`] (`true` the first time it is seen).
    Orphan(bool),
    /// A reading of a session's meter.
    Metered(Uuid),
    /// The session's transaction ended: the car has left.
    Ended(Uuid),
    /// An event that changes nothing (a transaction that ended, or an older event).
    Ignored,
}

/// One session's car at a station.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Plug {
    pub station: String,
    pub evse_id: i32,
    pub transaction_id: String,
    /// Energy the request had before this transaction (kWh).
    pub base_kwh: f64,
    /// The transaction's energy register (kWh) and power (W), as last read.
    pub meter_kwh: f64,
    pub power_w: Option<f64>,
    /// The limit the station accepted, and the last one sent and not answered yet (W).
    in_force_w: Option<f64>,
    pending_w: Option<f64>,
    /// The highest of the limits sent and not answered yet: the station may take any of them
    /// before the last.
    in_flight_max_w: f64,
    /// The highest limit sent that the station may have taken without saying so (its answer
    /// was lost with its connection, or late): counted until a later limit is accepted.
    unsure_w: f64,
    /// Its limit is to be sent again, whatever it was (the station reconnected).
    resend: bool,
    /// Refused a limit or never answered it (until it reconnects), or
    /// its last reading was over its limit: counted at its worst case.
    refused: bool,
    overdraw: bool,
    /// The limit before the last decrease, and until when the station may still draw it.
    lowered_from: Option<(f64, Instant)>,
    pub stop_sent: bool,
    seq_no: i32,
}

#[derive(Debug, Clone, Default)]
struct Link {
    connected: bool,
    booted: bool,
    /// The station took the TxDefaultProfile of 0 W: a new transaction draws nothing until
    /// it has its own limit.
    default_in_force: bool,
    /// It refused a reservation (it knows of a car the substation does not): not asked again
    /// until it boots or a transaction of it ends.
    declined: bool,
}

/// The stations, and the sessions at or expected at them.
#[derive(Debug)]
pub(crate) struct Chargers {
    max_w: f64,
    links: HashMap<String, Link>,
    plugs: HashMap<Uuid, Plug>,
    /// Sessions by (station, transaction id), and by (station, EVSE id): a meter reading
    /// names either.
    by_transaction: HashMap<(String, String), Uuid>,
    by_evse: HashMap<(String, i32), Uuid>,
    /// Sessions waiting for their car, by the idTokens that car may use.
    awaited: HashMap<String, Uuid>,
    tokens: HashMap<Uuid, Vec<String>>,
    /// Connectors held for awaited cars: (station, reservation id).
    reservations: HashMap<Uuid, (String, i32)>,
    /// Awaited cars with no connector held yet, first come first, with their departure.
    unreserved: VecDeque<(Uuid, Option<DateTime<Utc>>)>,
    /// Resumed sessions' transactions, by (station, transaction id): the session and the
    /// energy its request had before the transaction.
    expected: HashMap<(String, String), (Uuid, f64)>,
    /// Transactions going on that no session has claimed yet: since when, and their last event.
    orphans: HashMap<(String, String), (Instant, Box<TransactionEventRequest>)>,
    next_reservation: i32,
}

impl Chargers {
    /// `station_max_kw`: the most any station can draw.
    pub fn new(station_max_kw: f64) -> Self {
        Self {
            max_w: station_max_kw * 1000.0,
            links: HashMap::new(),
            plugs: HashMap::new(),
            by_transaction: HashMap::new(),
            by_evse: HashMap::new(),
            awaited: HashMap::new(),
            tokens: HashMap::new(),
            reservations: HashMap::new(),
            unreserved: VecDeque::new(),
            expected: HashMap::new(),
            orphans: HashMap::new(),
            next_reservation: 1,
        }
    }

    pub fn plug_of(&self, id: Uuid) -> Option<&Plug> {
        self.plugs.get(&id)
    }

    /// The most a station can draw (kW): what a walk-in is planned with.
    pub fn station_max_kw(&self) -> f64 {
        self.max_w / 1000.0
    }

    /// The session charging at `station`'s EVSE `evse_id`, if any.
    pub fn session_at(&self, station: &str, evse_id: i32) -> Option<Uuid> {
        self.by_evse.get(&(station.to_owned(), evse_id)).copied()
    }

    /// Stations connected now.
    pub fn connected(&self) -> usize {
        self.links.values().filter(|l| l.connected).count()
    }

    /// Sessions counted at their worst case now.
    pub fn untrusted(&self) -> usize {
        self.plugs
            .keys()
            .filter(|&&id| self.pin_kw(id).is_some())
            .count()
    }

    /// A station's WebSocket opened. Its transactions' limits are sent again by the next
    /// [`Chargers::limits`] (it keeps its profiles across a reconnect, but may have missed one).
    pub fn on_connected(&mut self, station: &str) {
        let link = self.links.entry(station.to_owned()).or_default();
        link.connected = true;
        for plug in self.plugs.values_mut().filter(|p| p.station == station) {
            plug.refused = false;
            plug.resend = true;
        }
    }

    /// A station booted: every new transaction of it is to draw nothing until it has its own
    /// limit (a TxDefaultProfile of 0 W).
    pub fn on_booted(&mut self, station: &str) -> Command {
        let link = self.links.entry(station.to_owned()).or_default();
        link.booted = true;
        link.declined = false;
        Command::SetLimit {
            evse_id: 0,
            transaction_id: None,
            limit_w: 0.0,
        }
    }

    /// A station's connection closed: its sessions are counted at their worst case until it
    /// returns (it keeps its last limit, but nobody can tell). Returns them.
    pub fn on_disconnected(&mut self, station: &str) -> Vec<Uuid> {
        if let Some(link) = self.links.get_mut(station) {
            link.connected = false;
        }
        self.sessions_at(station)
    }

    pub fn sessions_at(&self, station: &str) -> Vec<Uuid> {
        self.plugs
            .iter()
            .filter(|(_, p)| p.station == station)
            .map(|(&id, _)| id)
            .collect()
    }

    /// A session waits for its car, which will authorize with one of `tokens`. Returns the
    /// reservations to send: this car's when a station is free to hold for it (after any car
    /// waiting longer).
    pub fn await_car(
        &mut self,
        id: Uuid,
        tokens: Vec<String>,
        departure: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Vec<(String, Command)> {
        self.await_token(id, tokens);
        self.unreserved.push_back((id, departure));
        self.reserve_waiting(now)
    }

    /// Session `id`'s car will be known by any of `tokens` when it starts a transaction, with
    /// no connector held for it (a resumed session's car is at its station already).
    pub fn await_token(&mut self, id: Uuid, tokens: Vec<String>) {
        for token in &tokens {
            self.awaited.insert(token.clone(), id);
        }
        self.tokens.insert(id, tokens);
    }

    /// A resumed session's car was charging in `transaction` of `station` (its record says):
    /// that transaction is its own again. Returns the transaction's last event when it is
    /// going on already (an orphan), for the shell to plug it now.
    pub fn expect(
        &mut self,
        id: Uuid,
        station: &str,
        transaction: &str,
        energy_before_kwh: f64,
    ) -> Option<Box<TransactionEventRequest>> {
        let key = (station.to_owned(), transaction.to_owned());
        match self.orphans.remove(&key) {
            Some((_, event)) => Some(event),
            None => {
                self.expected.insert(key, (id, energy_before_kwh));
                None
            }
        }
    }

    /// Transactions unclaimed for [`ORPHAN_GRACE`] by `now`: taken out, with their station and
    /// last event, to be charged as walk-ins.
    pub fn unclaimed(&mut self, now: Instant) -> Vec<(String, Box<TransactionEventRequest>)> {
        let due: Vec<(String, String)> = self
            .orphans
            .iter()
            .filter(|(_, (since, _))| now.duration_since(*since) >= ORPHAN_GRACE)
            .map(|(key, _)| key.clone())
            .collect();
        due.into_iter()
            .filter_map(|key| {
                let (_, event) = self.orphans.remove(&key)?;
                Some((key.0, event))
            })
            .collect()
    }

    /// What the transactions nobody has claimed may draw (kW): each at its station's most.
    pub fn orphans_kw(&self) -> f64 {
        self.orphans.len() as f64 * self.max_w / 1000.0
    }

    /// Holds free stations for the cars waiting longest without one.
    pub fn reserve_waiting(&mut self, now: DateTime<Utc>) -> Vec<(String, Command)> {
        let mut sends = Vec::new();
        while let Some(&(id, departure)) = self.unreserved.front() {
            let waiting = self.tokens.contains_key(&id) && !self.reservations.contains_key(&id);
            if !waiting {
                self.unreserved.pop_front();
                continue;
            }
            let Some(station) = self.free_station() else {
                break;
            };
            self.unreserved.pop_front();
            let id_token = self.tokens[&id][0].clone();
            let reservation_id = self.next_reservation;
            self.next_reservation = self.next_reservation.wrapping_add(1).max(1);
            self.reservations
                .insert(id, (station.clone(), reservation_id));
            let expiry = departure
                .filter(|d| *d > now)
                .unwrap_or(now + chrono::Duration::hours(RESERVATION_HOURS));
            sends.push((
                station,
                Command::Reserve {
                    reservation_id,
                    id_token,
                    evse_id: Some(RESERVED_EVSE),
                    expiry,
                },
            ));
        }
        sends
    }

    /// A connected, booted station with no car and no reservation (the first by id, so
    /// choices are reproducible).
    fn free_station(&self) -> Option<String> {
        let mut free: Vec<&String> = self
            .links
            .iter()
            .filter(|(_, l)| l.connected && l.booted && !l.declined)
            .map(|(s, _)| s)
            .filter(|s| !self.plugs.values().any(|p| &p.station == *s))
            .filter(|s| !self.reservations.values().any(|(r, _)| r == *s))
            .collect();
        free.sort();
        free.first().map(|s| (*s).clone())
    }

    /// A TransactionEvent of `station`: what it means for the sessions.
    pub fn on_transaction(
        &mut self,
        station: &str,
        event: &TransactionEventRequest,
        now: Instant,
    ) -> Tx {
        let key = (
            station.to_owned(),
            event.transaction_info.transaction_id.clone(),
        );
        if let Some(&id) = self.by_transaction.get(&key) {
            let plug = self.plugs.get_mut(&id).expect("a plug per transaction");
            if event.seq_no < plug.seq_no {
                return Tx::Ignored;
            }
            plug.seq_no = event.seq_no;
            if let Some(wh) = event.energy_wh() {
                plug.meter_kwh = wh / 1000.0;
            }
            if let Some(w) = event.power_w() {
                plug.power_w = Some(w);
            }
            self.check_draw(id, now);
            return match event.event_type {
                TransactionEventKind::Ended => Tx::Ended(id),
                _ => Tx::Metered(id),
            };
        }
        if let Some((id, energy_before_kwh)) = self.expected.remove(&key) {
            return Tx::New {
                awaited: Some(id),
                id_token: None,
                energy_before_kwh: Some(energy_before_kwh),
            };
        }
        let id_token = event.id_token.as_ref().map(|t| t.id_token.clone());
        match event.event_type {
            TransactionEventKind::Ended => {
                // Over before anyone claimed it: nothing draws any more.
                self.orphans.remove(&key);
                return Tx::Ignored;
            }
            // Going on, and no token says whose: a session of this substation's before a
            // restart may claim it yet.
            TransactionEventKind::Updated if id_token.is_none() => {
                let new = !self.orphans.contains_key(&key);
                let since = self.orphans.get(&key).map_or(now, |(since, _)| *since);
                self.orphans.insert(key, (since, Box::new(event.clone())));
                return Tx::Orphan(new);
            }
            _ => {}
        }
        self.orphans.remove(&key);
        let awaited = id_token.as_ref().and_then(|t| self.awaited.get(t).copied());
        Tx::New {
            awaited,
            id_token,
            energy_before_kwh: None,
        }
    }

    /// Puts session `id` at `station`'s transaction: a car that was awaited, or a walk-in.
    /// Returns a reservation to cancel, when its connector was held elsewhere.
    pub fn plug(
        &mut self,
        id: Uuid,
        station: &str,
        event: &TransactionEventRequest,
        base_kwh: f64,
    ) -> Option<(String, Command)> {
        for token in self.tokens.remove(&id).unwrap_or_default() {
            self.awaited.remove(&token);
        }
        let transaction_id = event.transaction_info.transaction_id.clone();
        self.by_transaction
            .insert((station.to_owned(), transaction_id.clone()), id);
        let evse_id = event.evse.as_ref().map_or(RESERVED_EVSE, |e| e.id);
        self.by_evse.insert((station.to_owned(), evse_id), id);
        self.plugs.insert(
            id,
            Plug {
                station: station.to_owned(),
                evse_id,
                transaction_id,
                base_kwh,
                meter_kwh: event.energy_wh().unwrap_or(0.0) / 1000.0,
                power_w: event.power_w(),
                in_force_w: None,
                pending_w: None,
                in_flight_max_w: 0.0,
                unsure_w: 0.0,
                resend: false,
                refused: false,
                overdraw: false,
                lowered_from: None,
                stop_sent: false,
                seq_no: event.seq_no,
            },
        );
        let (held_at, reservation_id) = self.reservations.remove(&id)?;
        // A reservation is used up by its car; one held at another station is given back.
        (held_at != station).then_some((held_at, Command::CancelReservation { reservation_id }))
    }

    /// A MeterValues reading of `station`'s EVSE: the session it belongs to, if any.
    pub fn on_meter(
        &mut self,
        station: &str,
        evse_id: i32,
        energy_wh: Option<f64>,
        power_w: Option<f64>,
        now: Instant,
    ) -> Option<Uuid> {
        let id = self.session_at(station, evse_id)?;
        let plug = self.plugs.get_mut(&id)?;
        if let Some(wh) = energy_wh {
            plug.meter_kwh = wh / 1000.0;
        }
        if power_w.is_some() {
            plug.power_w = power_w;
        }
        self.check_draw(id, now);
        Some(id)
    }

    /// Marks a session whose station draws more than its limit: the higher of the limit in
    /// force (its own, else the station's default), the one sent, and the one before a
    /// decrease still within [`OVERDRAW_GRACE`].
    fn check_draw(&mut self, id: Uuid, now: Instant) {
        let Some(plug) = self.plugs.get_mut(&id) else {
            return;
        };
        let default = match self.links.get(&plug.station) {
            Some(link) if link.default_in_force => 0.0,
            _ => self.max_w,
        };
        let before = plug
            .lowered_from
            .filter(|&(_, until)| now < until)
            .map_or(0.0, |(w, _)| w);
        let limit = plug
            .in_force_w
            .unwrap_or(default)
            .max(plug.in_flight_max_w)
            .max(before);
        let Some(power_w) = plug.power_w else {
            return;
        };
        // Each reading decides: a station seen over its limit once by a reading that crossed
        // a change is trusted again when the next shows it under.
        let over = power_w > limit * (1.0 + OVERDRAW_TOLERANCE) + OVERDRAW_MARGIN_W;
        if over && !plug.overdraw {
            tracing::warn!(station = %plug.station, transaction = %plug.transaction_id, power_w, limit_w = limit, "station draws more than its limit: counted at its worst case");
        }
        plug.overdraw = over;
    }

    /// The power session `id` is to be counted at whatever the policy says (kW): its worst case
    /// when its station cannot be relied on to keep a limit; `None` when it can.
    pub fn pin_kw(&self, id: Uuid) -> Option<f64> {
        let plug = self.plugs.get(&id)?;
        let link = self.links.get(&plug.station);
        let connected = link.is_some_and(|l| l.connected);
        let unlimited = plug.in_force_w.is_none() && !link.is_some_and(|l| l.default_in_force);
        (!connected || plug.refused || plug.overdraw || unlimited)
            .then(|| self.max_w.max(plug.power_w.unwrap_or(0.0)) / 1000.0)
    }

    /// The limits to send for the powers the model allocated (`powers`: session id, kW, and
    /// whether the model holds it pinned), within `capacity_kw`: every decrease now, each
    /// increase once the limits in force leave room for it.
    pub fn limits(
        &mut self,
        powers: impl Iterator<Item = (Uuid, f64, bool)>,
        capacity_kw: f64,
    ) -> Vec<(String, Command)> {
        let capacity_w = capacity_kw * 1000.0;
        let mut total: f64 = self.plugs.keys().map(|&id| self.committed_w(id)).sum();
        let mut sends = Vec::new();
        let mut raises = Vec::new();
        for (id, kw, pinned) in powers {
            // A pinned power is no allocation (the model may not know yet that the station is
            // trusted again): only a first limit is sent from it.
            if pinned && !self.waits_for_first_limit(id) {
                continue;
            }
            let Some(plug) = self.plugs.get(&id) else {
                continue;
            };
            let target = (kw * 1000.0).floor().max(0.0);
            let last = plug.pending_w.or(plug.in_force_w).filter(|_| !plug.resend);
            let lower = last.is_none_or(|l| target < l - 1.0) && target < self.committed_w(id);
            let higher = last.is_none_or(|l| target >= l + LIMIT_STEP_W) && !lower;
            if lower {
                sends.push((id, target));
            } else if higher {
                raises.push((id, target));
            }
        }
        for &(id, target) in &sends {
            // A decrease counts once it is accepted: the higher limit stays in the sum.
            self.plugs.get_mut(&id).expect("checked").sent(target);
        }
        // Smallest raises first: the most stations get theirs when room is short.
        raises.sort_by(|a, b| a.1.total_cmp(&b.1));
        for (id, target) in raises {
            let now = self.committed_w(id);
            if total - now + target > capacity_w + 1.0 {
                continue;
            }
            total += target - now;
            sends.push((id, target));
            self.plugs.get_mut(&id).expect("checked").sent(target);
        }
        sends
            .into_iter()
            .map(|(id, limit_w)| {
                let plug = &self.plugs[&id];
                (
                    plug.station.clone(),
                    Command::SetLimit {
                        evse_id: plug.evse_id,
                        transaction_id: Some(plug.transaction_id.clone()),
                        limit_w,
                    },
                )
            })
            .collect()
    }

    /// A new transaction on a station without a default of 0 W draws its most until its
    /// first limit is accepted: it is counted so, and that limit is still sent.
    fn waits_for_first_limit(&self, id: Uuid) -> bool {
        let Some(plug) = self.plugs.get(&id) else {
            return false;
        };
        let connected = self.links.get(&plug.station).is_some_and(|l| l.connected);
        connected && !plug.refused && !plug.overdraw && plug.in_force_w.is_none()
    }

    /// What session `id`'s station may draw now, as far as the substation can tell (W): its
    /// worst case, else the higher of the limit accepted and the one sent.
    fn committed_w(&self, id: Uuid) -> f64 {
        let plug = &self.plugs[&id];
        if let Some(kw) = self.pin_kw(id) {
            return kw * 1000.0;
        }
        plug.in_force_w
            .unwrap_or(0.0)
            .max(plug.in_flight_max_w)
            .max(plug.unsure_w)
    }

    /// A station answered a command. True when that changes what a session is counted at.
    pub fn on_answered(
        &mut self,
        station: &str,
        command: &Command,
        outcome: &Outcome,
        now: Instant,
    ) -> bool {
        match command {
            Command::SetLimit {
                transaction_id: None,
                ..
            } => {
                let link = self.links.entry(station.to_owned()).or_default();
                let accepted = *outcome == Outcome::Accepted;
                let changed = link.default_in_force != accepted;
                link.default_in_force = accepted;
                // Its transactions without a limit of their own drew the most until now.
                let max_w = self.max_w;
                for plug in self.plugs.values_mut() {
                    if plug.station == station && plug.in_force_w.is_none() && accepted {
                        plug.lowered_from = Some((max_w, now + OVERDRAW_GRACE));
                    }
                }
                changed
            }
            Command::SetLimit {
                transaction_id: Some(tx),
                limit_w,
                ..
            } => {
                let Some(&id) = self.by_transaction.get(&(station.to_owned(), tx.clone())) else {
                    return false;
                };
                let before = self.pin_kw(id);
                let plug = self.plugs.get_mut(&id).expect("a plug per transaction");
                match outcome {
                    Outcome::Accepted => {
                        if let Some(was) = plug.in_force_w.filter(|&was| was > *limit_w) {
                            plug.lowered_from = Some((was, now + OVERDRAW_GRACE));
                        }
                        plug.in_force_w = Some(*limit_w);
                        plug.unsure_w = 0.0;
                        plug.answered(*limit_w);
                    }
                    Outcome::Refused(_) => {
                        tracing::warn!(station, transaction = %tx, ?outcome, "station refused its limit: counted at its worst case");
                        plug.refused = true;
                        plug.answered(*limit_w);
                    }
                    // Maybe taken, maybe not: counted as taken (if higher) until a later limit
                    // is; a silent station is not trusted meanwhile.
                    Outcome::TimedOut | Outcome::Unreachable => {
                        plug.unsure_w = plug.unsure_w.max(*limit_w);
                        plug.answered(*limit_w);
                        plug.resend = true;
                        if *outcome == Outcome::TimedOut {
                            tracing::warn!(station, transaction = %tx, "station did not answer its limit: counted at its worst case");
                            plug.refused = true;
                        }
                    }
                }
                before != self.pin_kw(id)
            }
            Command::Reserve { reservation_id, .. } if *outcome != Outcome::Accepted => {
                // Held for another elsewhere, then; the car may still plug in anywhere with its
                // token meanwhile.
                let refused: Vec<Uuid> = self
                    .reservations
                    .iter()
                    .filter(|(_, (s, r))| s == station && r == reservation_id)
                    .map(|(&id, _)| id)
                    .collect();
                for id in refused {
                    self.reservations.remove(&id);
                    self.unreserved.push_front((id, None));
                }
                if let Some(link) = self.links.get_mut(station) {
                    link.declined = true;
                }
                false
            }
            _ => false,
        }
    }

    /// The session's meter says its energy is there: the command that stops its transaction,
    /// once.
    pub fn stop(&mut self, id: Uuid) -> Option<(String, Command)> {
        let plug = self.plugs.get_mut(&id)?;
        if plug.stop_sent {
            return None;
        }
        plug.stop_sent = true;
        Some((
            plug.station.clone(),
            Command::Stop {
                transaction_id: plug.transaction_id.clone(),
            },
        ))
    }

    /// Session `id` is over: forgets it, and returns what to send (a reservation to cancel,
    /// the ended transaction's profile to clear, the freed station held for a waiting car).
    pub fn forget(&mut self, id: Uuid, now: DateTime<Utc>) -> Vec<(String, Command)> {
        for token in self.tokens.remove(&id).unwrap_or_default() {
            self.awaited.remove(&token);
        }
        self.expected.retain(|_, (session, _)| *session != id);
        let mut sends = Vec::new();
        if let Some((station, reservation_id)) = self.reservations.remove(&id) {
            sends.push((station, Command::CancelReservation { reservation_id }));
        }
        if let Some(plug) = self.plugs.remove(&id) {
            self.by_transaction
                .remove(&(plug.station.clone(), plug.transaction_id));
            let at = (plug.station.clone(), plug.evse_id);
            if self.by_evse.get(&at) == Some(&id) {
                self.by_evse.remove(&at);
            }
            if let Some(link) = self.links.get_mut(&plug.station) {
                link.declined = false;
            }
            sends.push((plug.station, Command::ClearLimit));
        }
        // The connector freed (or the reservation given back) may be held for another car.
        sends.extend(self.reserve_waiting(now));
        sends
    }

    /// Every session at a station, with its station, limit in force and power drawn (W).
    pub fn plugs(&self) -> impl Iterator<Item = (Uuid, &Plug)> {
        self.plugs.iter().map(|(&id, p)| (id, p))
    }
}

impl Plug {
    fn sent(&mut self, limit_w: f64) {
        self.pending_w = Some(limit_w);
        self.in_flight_max_w = self.in_flight_max_w.max(limit_w);
        self.resend = false;
    }

    /// The answer to the limit `limit_w` came (answers come in the order of the CALLs): when
    /// it was the last sent, none is in flight any more.
    fn answered(&mut self, limit_w: f64) {
        if self.pending_w == Some(limit_w) {
            self.pending_w = None;
            self.in_flight_max_w = 0.0;
        }
    }

    /// The limit the station accepted (W).
    pub fn in_force_w(&self) -> Option<f64> {
        self.in_force_w
    }
}

#[cfg(test)]
mod tests {
    use evgrid_ocpp::messages::{
        Evse, IdToken, MeterValue, SampledValue, TransactionInfo, UnitOfMeasure,
    };

    use super::*;

    fn event(
        kind: TransactionEventKind,
        tx: &str,
        seq_no: i32,
        token: Option<&str>,
        wh: f64,
        w: f64,
    ) -> TransactionEventRequest {
        let now = Utc::now();
        TransactionEventRequest {
            event_type: kind,
            timestamp: now,
            trigger_reason: "MeterValuePeriodic".into(),
            seq_no,
            transaction_info: TransactionInfo {
                transaction_id: tx.into(),
                charging_state: None,
                stopped_reason: None,
            },
            id_token: token.map(|t| IdToken {
                id_token: t.into(),
                kind: "Local".into(),
            }),
            evse: Some(Evse {
                id: 1,
                connector_id: Some(1),
            }),
            meter_value: Some(vec![MeterValue {
                timestamp: now,
                sampled_value: vec![
                    SampledValue {
                        value: wh,
                        measurand: None,
                        unit_of_measure: None,
                    },
                    SampledValue {
                        value: w,
                        measurand: Some("Power.Active.Import".into()),
                        unit_of_measure: Some(UnitOfMeasure {
                            unit: Some("W".into()),
                            multiplier: None,
                        }),
                    },
                ],
            }]),
        }
    }

    fn online(chargers: &mut Chargers, station: &str) {
        chargers.on_connected(station);
        let default = chargers.on_booted(station);
        chargers.on_answered(station, &default, &Outcome::Accepted, Instant::now());
    }

    fn limit_of(sends: &[(String, Command)], station: &str) -> Option<f64> {
        sends.iter().find_map(|(s, c)| match c {
            Command::SetLimit {
                limit_w,
                transaction_id: Some(_),
                ..
            } if s == station => Some(*limit_w),
            _ => None,
        })
    }

    #[test]
    fn an_awaited_car_is_reserved_a_station_and_known_by_its_token() {
        let mut c = Chargers::new(22.0);
        online(&mut c, "b");
        online(&mut c, "a");
        let id = Uuid::from_u128(1);
        let mut sends = c.await_car(id, vec!["car-1".into(), id.to_string()], None, Utc::now());
        assert_eq!(sends.len(), 1);
        let (station, reserve) = sends.remove(0);
        assert_eq!(station, "a");
        assert!(matches!(reserve, Command::Reserve { ref id_token, .. } if id_token == "car-1"));
        let started = event(
            TransactionEventKind::Started,
            "t1",
            0,
            Some("car-1"),
            0.0,
            0.0,
        );
        // It plugs in at the other station: the reservation is given back.
        assert_eq!(
            c.on_transaction("b", &started, Instant::now()),
            Tx::New {
                awaited: Some(id),
                id_token: Some("car-1".into()),
                energy_before_kwh: None,
            }
        );
        let cancel = c.plug(id, "b", &started, 2.0).unwrap();
        assert_eq!(cancel.0, "a");
        assert!(matches!(cancel.1, Command::CancelReservation { .. }));
        assert!(c.tokens.is_empty() && c.awaited.is_empty());
        let walk_in = event(
            TransactionEventKind::Started,
            "t2",
            0,
            Some("car-9"),
            0.0,
            0.0,
        );
        assert_eq!(
            c.on_transaction("a", &walk_in, Instant::now()),
            Tx::New {
                awaited: None,
                id_token: Some("car-9".into()),
                energy_before_kwh: None,
            }
        );
        let updated = event(TransactionEventKind::Updated, "t1", 1, None, 1500.0, 7000.0);
        assert_eq!(
            c.on_transaction("b", &updated, Instant::now()),
            Tx::Metered(id)
        );
        assert_eq!(c.plug_of(id).unwrap().meter_kwh, 1.5);
        let stale = event(TransactionEventKind::Updated, "t1", 0, None, 1000.0, 7000.0);
        assert_eq!(c.on_transaction("b", &stale, Instant::now()), Tx::Ignored);
        let ended = event(TransactionEventKind::Ended, "t1", 2, None, 2000.0, 0.0);
        assert_eq!(c.on_transaction("b", &ended, Instant::now()), Tx::Ended(id));
        assert_eq!(
            c.forget(id, Utc::now()),
            [("b".to_owned(), Command::ClearLimit)]
        );
    }

    #[test]
    fn a_freed_or_declining_station_is_held_for_the_car_waiting_longest() {
        let mut c = Chargers::new(22.0);
        online(&mut c, "a");
        online(&mut c, "b");
        let ids: Vec<Uuid> = (1..=3).map(Uuid::from_u128).collect();
        let mut held = Vec::new();
        for (n, &id) in ids.iter().enumerate() {
            held.push(c.await_car(id, vec![format!("car-{n}")], None, Utc::now()));
        }
        assert_eq!(held.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1, 0]);
        // b knows better (a car is there): the third car... still waits, and the first
        // car's hold moves on when a frees.
        let (station, refused) = held[1][0].clone();
        assert_eq!(station, "b");
        c.on_answered(
            "b",
            &refused,
            &Outcome::Refused("Occupied".into()),
            Instant::now(),
        );
        assert!(c.reserve_waiting(Utc::now()).is_empty(), "b declined");
        let sends = c.forget(ids[0], Utc::now());
        let reserved: Vec<&str> = sends
            .iter()
            .filter(|(_, cmd)| matches!(cmd, Command::Reserve { .. }))
            .map(|(s, _)| s.as_str())
            .collect();
        assert_eq!(reserved, ["a"], "{sends:?}");
        assert!(matches!(&sends[1].1, Command::Reserve { id_token, .. } if id_token == "car-1"));
    }

    #[test]
    fn a_transaction_nobody_knows_waits_for_its_session_counted_at_the_most() {
        let mut c = Chargers::new(22.0);
        online(&mut c, "a");
        let t0 = Instant::now();
        // After a restart: the transaction reports before its session is back.
        let going = event(
            TransactionEventKind::Updated,
            "ta",
            7,
            None,
            5000.0,
            11000.0,
        );
        assert_eq!(c.on_transaction("a", &going, t0), Tx::Orphan(true));
        assert_eq!(c.on_transaction("a", &going, t0), Tx::Orphan(false));
        assert_eq!(c.orphans_kw(), 22.0);
        let id = Uuid::from_u128(1);
        let claimed = c.expect(id, "a", "ta", 3.0).expect("going on already");
        assert_eq!(claimed.transaction_info.transaction_id, "ta");
        assert_eq!(c.orphans_kw(), 0.0);
        // Expected before it reports: its first event is the session's, with its energy before.
        let other = Uuid::from_u128(2);
        assert!(c.expect(other, "a", "tb", 1.5).is_none());
        let next = event(TransactionEventKind::Updated, "tb", 3, None, 900.0, 7000.0);
        assert_eq!(
            c.on_transaction("a", &next, t0),
            Tx::New {
                awaited: Some(other),
                id_token: None,
                energy_before_kwh: Some(1.5),
            }
        );
        // Unclaimed for the grace: handed over, to be charged as a walk-in.
        let lost = event(TransactionEventKind::Updated, "tc", 2, None, 100.0, 7000.0);
        assert_eq!(c.on_transaction("a", &lost, t0), Tx::Orphan(true));
        assert!(c.unclaimed(t0 + ORPHAN_GRACE / 2).is_empty());
        let adopted = c.unclaimed(t0 + ORPHAN_GRACE);
        assert_eq!(adopted.len(), 1);
        assert_eq!(adopted[0].0, "a");
        assert_eq!(c.orphans_kw(), 0.0);
    }

    #[test]
    fn limits_go_down_at_once_and_up_only_within_the_capacity_in_force() {
        let mut c = Chargers::new(22.0);
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        for (id, station, tx) in [(a, "a", "ta"), (b, "b", "tb")] {
            online(&mut c, station);
            c.plug(
                id,
                station,
                &event(TransactionEventKind::Started, tx, 0, None, 0.0, 0.0),
                0.0,
            );
        }
        // 30 kW: 20 + 10.
        let sends = c.limits(
            [(a, 20.0), (b, 10.0)]
                .into_iter()
                .map(|(id, kw)| (id, kw, false)),
            30.0,
        );
        assert_eq!(
            (limit_of(&sends, "a"), limit_of(&sends, "b")),
            (Some(20_000.0), Some(10_000.0))
        );
        for (station, command) in &sends {
            c.on_answered(station, command, &Outcome::Accepted, Instant::now());
        }
        // Now 10 + 20: a goes down at once; b goes up only once a's decrease is accepted.
        let sends = c.limits(
            [(a, 10.0), (b, 20.0)]
                .into_iter()
                .map(|(id, kw)| (id, kw, false)),
            30.0,
        );
        assert_eq!(
            (limit_of(&sends, "a"), limit_of(&sends, "b")),
            (Some(10_000.0), None)
        );
        c.on_answered("a", &sends[0].1, &Outcome::Accepted, Instant::now());
        let sends = c.limits(
            [(a, 10.0), (b, 20.0)]
                .into_iter()
                .map(|(id, kw)| (id, kw, false)),
            30.0,
        );
        assert_eq!(limit_of(&sends, "b"), Some(20_000.0));
        // Small changes are not sent.
        c.on_answered("b", &sends[0].1, &Outcome::Accepted, Instant::now());
        assert!(
            c.limits(
                [(a, 10.05), (b, 19.95)]
                    .into_iter()
                    .map(|(id, kw)| (id, kw, false)),
                30.0
            )
            .len()
                == 1
        );
    }

    #[test]
    fn stations_that_do_not_keep_their_limit_are_counted_at_their_worst() {
        let mut c = Chargers::new(22.0);
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        c.on_connected("a");
        // No default profile taken: a new transaction draws its most until its limit is in.
        c.plug(
            a,
            "a",
            &event(TransactionEventKind::Started, "ta", 0, None, 0.0, 0.0),
            0.0,
        );
        assert_eq!(c.pin_kw(a), Some(22.0));
        let sends = c.limits([(a, 5.0)].into_iter().map(|(id, kw)| (id, kw, false)), 30.0);
        assert_eq!(limit_of(&sends, "a"), Some(5_000.0));
        assert!(c.on_answered("a", &sends[0].1, &Outcome::Accepted, Instant::now()));
        assert_eq!(c.pin_kw(a), None);
        // Drawing 8 kW on a 5 kW limit: counted at its worst, what it draws if more.
        c.on_meter("a", 1, Some(100.0), Some(8_000.0), Instant::now());
        assert_eq!(c.pin_kw(a), Some(22.0));
        // A refused limit, and a station out of reach, likewise.
        online(&mut c, "b");
        c.plug(
            b,
            "b",
            &event(TransactionEventKind::Started, "tb", 0, None, 0.0, 0.0),
            0.0,
        );
        let sends = c.limits([(b, 5.0)].into_iter().map(|(id, kw)| (id, kw, false)), 30.0);
        assert!(c.on_answered(
            "b",
            &sends[0].1,
            &Outcome::Refused("Rejected".into()),
            Instant::now()
        ));
        assert_eq!(c.pin_kw(b), Some(22.0));
        // Back (a reconnect): its default of 0 W holds until the limit is sent again.
        c.on_connected("b");
        assert_eq!(c.pin_kw(b), None);
        assert_eq!(c.on_disconnected("b"), [b]);
        assert_eq!(c.pin_kw(b), Some(22.0));
        assert_eq!(c.untrusted(), 2);
    }
}
