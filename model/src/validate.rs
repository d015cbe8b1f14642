//! Validation of charge requests, shared by ingest (HTTP) and the dispatcher (requests published
//! straight to `ev.requests`), so both paths apply exactly the same rules and name the same
//! fields.

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::messages::{ChargeRequest, Dispatch};
use crate::subjects::valid_substation_id;

/// Limits of the public contract (docs/api.md, docs/openapi.yaml).
pub const VEHICLE_ID_MAX_CHARS: usize = 64;
pub const ENERGY_KWH_MAX: f64 = 200.0;
pub const MAX_POWER_KW_MAX: f64 = 400.0;
/// The least `max_power_kw` of a request: below it a car holds a session for days for almost
/// nothing (a request at 1e-12 kW never ends). Every public charger delivers more; the ACN trace
/// replays at the simulator's `--vehicle-max-kw`, never below 1 kW.
pub const MAX_POWER_KW_MIN: f64 = 1.0;
/// The longest stay: a departure at most this far after the request is validated, and a request
/// without departure must be deliverable within it at its `max_power_kw`. Under the streams'
/// 7-day retention (`EV_REQUESTS`, `EV_DISPATCH`, the request states) with half a day to spare
/// for queueing, so a session never outlives its records; longer than the longest ACN Caltech
/// stay (150.2 h), so real data passes.
pub const MAX_STAY: TimeDelta = TimeDelta::hours(156);

/// `energy_kwh`: above 0, at most [`ENERGY_KWH_MAX`].
const ENERGY: Bounds = Bounds {
    min: 0.0,
    min_inclusive: false,
    max: ENERGY_KWH_MAX,
};
/// `max_power_kw`: at least [`MAX_POWER_KW_MIN`], at most [`MAX_POWER_KW_MAX`].
const POWER: Bounds = Bounds {
    min: MAX_POWER_KW_MIN,
    min_inclusive: true,
    max: MAX_POWER_KW_MAX,
};

/// The range a number field must be in (the top inclusive).
#[derive(Debug, Clone, Copy)]
struct Bounds {
    min: f64,
    min_inclusive: bool,
    max: f64,
}

impl Bounds {
    fn contains(self, x: f64) -> bool {
        let above = if self.min_inclusive {
            x >= self.min
        } else {
            x > self.min
        };
        above && x <= self.max
    }

    fn describe(self) -> String {
        let low = if self.min_inclusive {
            "at least"
        } else {
            "greater than"
        };
        format!("must be {low} {} and at most {}", self.min, self.max)
    }
}

/// One offending field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FieldError {
    pub field: String,
    pub detail: String,
}

/// Why a body is not a valid charge request. Callers branch on it: 400 vs 422 over HTTP,
/// the `reason` on `ev.rejected` over NATS.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// Not parseable as JSON at all.
    #[error("body is not valid JSON: {0}")]
    Malformed(String),
    /// JSON, but one or more fields break the rules. Never empty.
    #[error("{}", describe(.0))]
    Invalid(Vec<FieldError>),
}

fn describe(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.detail))
        .collect::<Vec<_>>()
        .join("; ")
}

impl RequestError {
    /// Only a passed departure is wrong: a separate rejection reason on `ev.rejected`.
    pub fn is_departure_passed(&self) -> bool {
        matches!(self, RequestError::Invalid(errs)
            if errs.len() == 1 && errs[0].field == "departure" && errs[0].detail.contains("passed"))
    }
}

/// Parses and validates a charge request body against the clock `now`.
///
/// Every field error is collected (not just the first), so a client can fix its request in one
/// round trip. Unknown fields are errors too: a typo such as `energy_kw` must not silently
/// become "missing energy_kwh" downstream. `null` for an optional field means absent.
pub fn parse_charge_request(
    body: &[u8],
    now: DateTime<Utc>,
) -> Result<ChargeRequest, RequestError> {
    // Nearly every body is a valid request: read it straight into its fields. Anything else
    // (an error, or merely a form the short way does not know) goes the full way, which names
    // every offending field; both ways accept exactly the same requests (tested below).
    if let Some(request) = parse_valid(body, now) {
        return Ok(request);
    }
    parse_in_full(body, now)
}

/// The fields of a charge request as the contract spells them, read without building a JSON
/// tree (which cost ingest and the dispatcher about 4% of their CPU per request).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Fields<'a> {
    vehicle_id: String,
    energy_kwh: f64,
    max_power_kw: f64,
    #[serde(default, borrow)]
    departure: Option<&'a str>,
    #[serde(default, borrow)]
    request_id: Option<&'a str>,
    #[serde(default)]
    all_or_nothing: Option<bool>,
}

/// The request when `body` is a valid one by the rules of [`validate_object`], else `None`
/// (then only the full way can say why, or accept a form this one does not read, such as
/// escaped characters in `departure`).
fn parse_valid(body: &[u8], now: DateTime<Utc>) -> Option<ChargeRequest> {
    // A derived struct would also read a JSON array; the contract wants an object.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let f: Fields = serde_json::from_slice(body).ok()?;
    if vehicle_id_error(&f.vehicle_id).is_some()
        || !ENERGY.contains(f.energy_kwh)
        || !POWER.contains(f.max_power_kw)
    {
        return None;
    }
    let departure = match f.departure {
        None => None,
        Some(s) => {
            let t = DateTime::parse_from_rfc3339(s).ok()?.with_timezone(&Utc);
            if t <= now {
                return None;
            }
            Some(t)
        }
    };
    if stay_error(f.energy_kwh, f.max_power_kw, departure, now).is_some() {
        return None;
    }
    let request_id = match f.request_id {
        None => None,
        Some(s) => Some(Uuid::parse_str(s).ok()?),
    };
    Some(ChargeRequest {
        request_id,
        vehicle_id: f.vehicle_id,
        energy_kwh: f.energy_kwh,
        max_power_kw: f.max_power_kw,
        departure,
        all_or_nothing: f.all_or_nothing.unwrap_or(false),
    })
}

/// The full way: every field checked, every error named.
fn parse_in_full(body: &[u8], now: DateTime<Utc>) -> Result<ChargeRequest, RequestError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| RequestError::Malformed(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(RequestError::Invalid(vec![FieldError {
            field: "body".into(),
            detail: "must be a JSON object".into(),
        }]));
    };
    validate_object(&map, now)
}

fn validate_object(
    map: &Map<String, Value>,
    now: DateTime<Utc>,
) -> Result<ChargeRequest, RequestError> {
    let mut errors = Vec::new();
    let mut fail = |field: &str, detail: String| {
        errors.push(FieldError {
            field: field.to_owned(),
            detail,
        })
    };

    for key in map.keys() {
        if !matches!(
            key.as_str(),
            "vehicle_id"
                | "energy_kwh"
                | "max_power_kw"
                | "departure"
                | "request_id"
                | "all_or_nothing"
        ) {
            fail(key, "unknown field".into());
        }
    }

    let vehicle_id = match map.get("vehicle_id") {
        None | Some(Value::Null) => {
            fail("vehicle_id", "is required".into());
            None
        }
        Some(Value::String(s)) => match vehicle_id_error(s) {
            Some(detail) => {
                fail("vehicle_id", detail);
                None
            }
            None => Some(s.clone()),
        },
        Some(other) => {
            fail(
                "vehicle_id",
                format!("must be a string, got {}", kind(other)),
            );
            None
        }
    };

    let energy_kwh = number_in_range(map, "energy_kwh", ENERGY, &mut fail);
    let max_power_kw = number_in_range(map, "max_power_kw", POWER, &mut fail);

    let departure = match map.get("departure") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match DateTime::parse_from_rfc3339(s) {
            Ok(t) => {
                let t = t.with_timezone(&Utc);
                if t <= now {
                    fail("departure", format!("has already passed ({s})"));
                    None
                } else {
                    Some(t)
                }
            }
            Err(e) => {
                fail("departure", format!("must be an RFC 3339 time: {e}"));
                None
            }
        },
        Some(other) => {
            fail(
                "departure",
                format!("must be an RFC 3339 string, got {}", kind(other)),
            );
            None
        }
    };

    let request_id = match map.get("request_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match Uuid::parse_str(s) {
            Ok(id) => Some(id),
            Err(_) => {
                fail("request_id", "must be a UUID".into());
                None
            }
        },
        Some(other) => {
            fail(
                "request_id",
                format!("must be a UUID string, got {}", kind(other)),
            );
            None
        }
    };

    let all_or_nothing = match map.get("all_or_nothing") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            fail(
                "all_or_nothing",
                format!("must be true or false, got {}", kind(other)),
            );
            false
        }
    };

    if let (Some(energy_kwh), Some(max_power_kw)) = (energy_kwh, max_power_kw)
        && let Some(error) = stay_error(energy_kwh, max_power_kw, departure, now)
    {
        errors.push(error);
    }
    if !errors.is_empty() {
        return Err(RequestError::Invalid(errors));
    }
    Ok(ChargeRequest {
        request_id,
        vehicle_id: vehicle_id.expect("validated"),
        energy_kwh: energy_kwh.expect("validated"),
        max_power_kw: max_power_kw.expect("validated"),
        departure,
        all_or_nothing,
    })
}

/// What is wrong with a vehicle id, if anything.
fn vehicle_id_error(id: &str) -> Option<String> {
    let chars = id.chars().count();
    if chars == 0 || chars > VEHICLE_ID_MAX_CHARS {
        Some(format!(
            "must be 1 to {VEHICLE_ID_MAX_CHARS} characters, got {chars}"
        ))
    } else if id.chars().any(char::is_control) {
        Some("must not contain control characters".into())
    } else {
        None
    }
}

/// Why a request would stay longer than [`MAX_STAY`] after `from`, naming the field to change:
/// a departure further away, or (without a departure) an energy that takes longer than that at
/// the car's max power.
fn stay_error(
    energy_kwh: f64,
    max_power_kw: f64,
    departure: Option<DateTime<Utc>>,
    from: DateTime<Utc>,
) -> Option<FieldError> {
    let max_h = MAX_STAY.num_hours();
    match departure {
        Some(t) if t > from + MAX_STAY => Some(FieldError {
            field: "departure".into(),
            detail: format!(
                "must be at most {max_h} h after the request is accepted (the longest stay), got {}",
                t.to_rfc3339()
            ),
        }),
        Some(_) => None,
        None => {
            let hours = energy_kwh / max_power_kw;
            (hours > max_h as f64).then(|| FieldError {
                field: "max_power_kw".into(),
                detail: format!(
                    "{energy_kwh} kWh at {max_power_kw} kW takes {hours:.1} h, longer than the \
                     longest stay ({max_h} h): raise max_power_kw, lower energy_kwh or give a \
                     departure"
                ),
            })
        }
    }
}

/// Checks a dispatch (`ev.dispatch.<id>`) by the rules of a request, so a substation charges
/// nothing ingest would have refused: the vehicle id, energy and power bounds, the substation
/// id, and the longest stay counted from `dispatched_at` (the dispatcher validated the request
/// then). A departure already passed is allowed: the car has left, the session ends at once.
pub fn check_dispatch(d: &Dispatch) -> Result<(), RequestError> {
    let mut errors = Vec::new();
    let mut fail = |field: &str, detail: String| {
        errors.push(FieldError {
            field: field.to_owned(),
            detail,
        })
    };
    if !valid_substation_id(&d.substation_id) {
        fail("substation_id", "must be [A-Za-z0-9_-], 1 to 64".into());
    }
    if let Some(detail) = vehicle_id_error(&d.vehicle_id) {
        fail("vehicle_id", detail);
    }
    for (field, value, bounds) in [
        ("energy_kwh", d.energy_kwh, ENERGY),
        ("max_power_kw", d.max_power_kw, POWER),
    ] {
        if !bounds.contains(value) {
            fail(field, format!("{}, got {value}", bounds.describe()));
        }
    }
    if let Some(e) = d.energy_expected_kwh
        && !ENERGY.contains(e)
    {
        fail(
            "energy_expected_kwh",
            format!("{}, got {e}", ENERGY.describe()),
        );
    }
    if errors.is_empty()
        && let Some(error) = stay_error(d.energy_kwh, d.max_power_kw, d.departure, d.dispatched_at)
    {
        errors.push(error);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(RequestError::Invalid(errors))
    }
}

fn number_in_range(
    map: &Map<String, Value>,
    field: &str,
    bounds: Bounds,
    fail: &mut impl FnMut(&str, String),
) -> Option<f64> {
    match map.get(field) {
        None | Some(Value::Null) => {
            fail(field, "is required".into());
            None
        }
        Some(Value::Number(n)) => match n.as_f64() {
            Some(x) if bounds.contains(x) => Some(x),
            _ => {
                fail(field, format!("{}, got {n}", bounds.describe()));
                None
            }
        },
        Some(other) => {
            fail(field, format!("must be a number, got {}", kind(other)));
            None
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .to_utc()
    }

    fn fields(err: RequestError) -> Vec<String> {
        match err {
            RequestError::Invalid(errs) => errs.into_iter().map(|e| e.field).collect(),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    /// The short way accepts exactly what the full way accepts, with the same result.
    #[test]
    fn both_ways_agree() {
        let bodies: &[&[u8]] = &[
            br#"{"vehicle_id":"ev-1","energy_kwh":30,"max_power_kw":11}"#,
            br#" {"vehicle_id":"ev-\u00e9","energy_kwh":30.5,"max_power_kw":11,"departure":null,"request_id":null}"#,
            br#"{"vehicle_id":"ev-1","energy_kwh":200,"max_power_kw":400,"departure":"2026-01-01T02:00:00+01:00","request_id":"6f1c0b5e-7a2d-4d55-9a3e-1f0e2b3c4d5e"}"#,
            br#"{"vehicle_id":"ev-1","energy_kwh":1,"max_power_kw":1,"departure":"2026\u002d01-01T02:00:00Z"}"#,
            br#"{"vehicle_id":"ev-1","energy_kwh":1,"max_power_kw":1,"request_id":"6F1C0B5E7A2D4D559A3E1F0E2B3C4D5E"}"#,
            br#"["ev-1",30,11]"#,
            br#"["ev-1",30,11,null,null]"#,
            br#"{"vehicle_id":"ev-1","energy_kwh":30,"max_power_kw":11,"energy_kwh":40}"#,
            br#"{"vehicle_id":"ev-1","energy_kwh":30,"max_power_kw":11,"colour":"red"}"#,
            br#"{"vehicle_id":null,"energy_kwh":30,"max_power_kw":11}"#,
            br#"{"vehicle_id":"","energy_kwh":30,"max_power_kw":11}"#,
            br#"{"vehicle_id":"a\nb","energy_kwh":30,"max_power_kw":11}"#,
            br#"{"vehicle_id":"ev-1","energy_kwh":"30","max_power_kw":11}"#,
            br#"{"vehicle_id":"ev-1","energy_kwh":0,"max_power_kw":11}"#,
            br#"{"vehicle_id":"ev-1","energy_kwh":30,"max_power_kw":400.5}"#,
            br#"{"vehicle_id":"ev-1","energy_kwh":30,"max_power_kw":11,"departure":"2025-12-31T23:00:00Z"}"#,
            br#"{"vehicle_id":"ev-1","energy_kwh":30,"max_power_kw":11,"departure":"tomorrow"}"#,
            br#"{"vehicle_id":"ev-1","energy_kwh":30,"max_power_kw":11,"request_id":"x"}"#,
            br#"{"vehicle_id":"ev-1","energy_kwh":1e400,"max_power_kw":11}"#,
            br#"{"vehicle_id":"ev-1","energy_kwh":30,"max_power_kw":11,"all_or_nothing":true}"#,
            br#"{"vehicle_id":"ev-1","energy_kwh":30,"max_power_kw":11,"all_or_nothing":null}"#,
            br#"{"vehicle_id":"ev-1","energy_kwh":30,"max_power_kw":11,"all_or_nothing":"yes"}"#,
            br#"{"vehicle_id":"ev-1","energy_kwh":30,"max_power_kw":0.5}"#,
            br#"{"vehicle_id":"ev-1","energy_kwh":200,"max_power_kw":1}"#,
            br#"{"vehicle_id":"ev-1","energy_kwh":30,"max_power_kw":1,"departure":"2026-01-07T12:00:00Z"}"#,
            br#"{"vehicle_id":"ev-1","energy_kwh":30,"max_power_kw":1,"departure":"2026-01-07T12:00:01Z"}"#,
            br#"{"vehicle_id":"ev-1","energy_kwh":0.001,"max_power_kw":0.001,"departure":"9999-01-01T00:00:00Z"}"#,
            br#"{"vehicle_id":"ev-1"} trailing"#,
            b"{not json",
            b"",
        ];
        for body in bodies {
            assert_eq!(
                parse_charge_request(body, now()),
                parse_in_full(body, now()),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(
            parse_valid(bodies[0], now()).is_some(),
            "the usual body goes the short way"
        );
    }

    #[test]
    fn accepts_the_minimal_request() {
        let r = parse_charge_request(
            br#"{"vehicle_id":"ev-1","energy_kwh":30,"max_power_kw":11}"#,
            now(),
        )
        .unwrap();
        assert_eq!(r.vehicle_id, "ev-1");
        assert_eq!(r.energy_kwh, 30.0);
        assert_eq!(r.max_power_kw, 11.0);
        assert_eq!(r.departure, None);
        assert_eq!(r.request_id, None);
    }

    #[test]
    fn accepts_every_optional_field() {
        let r = parse_charge_request(
            br#"{"vehicle_id":"ev-1","energy_kwh":200,"max_power_kw":400,
                "departure":"2026-01-01T02:00:00+01:00","request_id":"6f1c0b5e-7a2d-4d55-9a3e-1f0e2b3c4d5e"}"#,
            now(),
        )
        .unwrap();
        assert_eq!(
            r.departure.unwrap().to_rfc3339(),
            "2026-01-01T01:00:00+00:00"
        );
        assert!(r.request_id.is_some());
    }

    #[test]
    fn all_or_nothing_is_a_boolean_and_false_by_default() {
        let parse = |extra: &str| {
            parse_charge_request(
                format!(r#"{{"vehicle_id":"ev-1","energy_kwh":30,"max_power_kw":11{extra}}}"#)
                    .as_bytes(),
                now(),
            )
        };
        assert!(!parse("").unwrap().all_or_nothing);
        assert!(!parse(r#","all_or_nothing":null"#).unwrap().all_or_nothing);
        assert!(!parse(r#","all_or_nothing":false"#).unwrap().all_or_nothing);
        assert!(parse(r#","all_or_nothing":true"#).unwrap().all_or_nothing);
        let Err(RequestError::Invalid(errors)) = parse(r#","all_or_nothing":1"#) else {
            panic!("a number is not a boolean");
        };
        assert_eq!(errors[0].field, "all_or_nothing");
        assert!(
            errors[0].detail.contains("true or false"),
            "{}",
            errors[0].detail
        );
    }

    #[test]
    fn malformed_json_is_not_a_field_error() {
        assert!(matches!(
            parse_charge_request(b"{not json", now()),
            Err(RequestError::Malformed(_))
        ));
    }

    #[test]
    fn every_bad_field_is_named() {
        let err = parse_charge_request(
            br#"{"vehicle_id":"","energy_kwh":0,"max_power_kw":401,"departure":"tomorrow","request_id":"x","colour":"red"}"#,
            now(),
        )
        .unwrap_err();
        let mut f = fields(err);
        f.sort();
        assert_eq!(
            f,
            [
                "colour",
                "departure",
                "energy_kwh",
                "max_power_kw",
                "request_id",
                "vehicle_id"
            ]
        );
    }

    #[test]
    fn limits_are_inclusive_at_the_top_and_exclusive_at_zero() {
        for (e, p, ok) in [
            (200.0, 400.0, true),
            (200.01, 1.0, false),
            (1.0, 400.5, false),
            (-1.0, 1.0, false),
        ] {
            let body = format!(r#"{{"vehicle_id":"v","energy_kwh":{e},"max_power_kw":{p}}}"#);
            assert_eq!(
                parse_charge_request(body.as_bytes(), now()).is_ok(),
                ok,
                "{body}"
            );
        }
    }

    #[test]
    fn power_has_a_floor_and_a_stay_a_ceiling() {
        let parse = |body: &str| parse_charge_request(body.as_bytes(), now());
        // 1 kW is the least power; below it, the field is named.
        assert!(parse(r#"{"vehicle_id":"v","energy_kwh":1,"max_power_kw":1}"#).is_ok());
        assert_eq!(
            fields(parse(r#"{"vehicle_id":"v","energy_kwh":1,"max_power_kw":1e-12}"#).unwrap_err()),
            ["max_power_kw"]
        );
        // A departure up to MAX_STAY (156 h) away; a second more is refused.
        let at = |t: &str| {
            format!(r#"{{"vehicle_id":"v","energy_kwh":1,"max_power_kw":11,"departure":"{t}"}}"#)
        };
        assert!(parse(&at("2026-01-07T12:00:00Z")).is_ok());
        let Err(RequestError::Invalid(errors)) = parse(&at("2026-01-07T12:00:01Z")) else {
            panic!("a departure past the longest stay is accepted");
        };
        assert_eq!(errors[0].field, "departure");
        assert!(errors[0].detail.contains("156 h"), "{}", errors[0].detail);
        assert_eq!(
            fields(parse(&at("9999-01-01T00:00:00Z")).unwrap_err()),
            ["departure"]
        );
        // Without a departure, the energy must fit in the longest stay at the car's power.
        assert!(parse(r#"{"vehicle_id":"v","energy_kwh":156,"max_power_kw":1}"#).is_ok());
        assert_eq!(
            fields(parse(r#"{"vehicle_id":"v","energy_kwh":157,"max_power_kw":1}"#).unwrap_err()),
            ["max_power_kw"]
        );
    }

    fn dispatch() -> Dispatch {
        Dispatch {
            request_id: Uuid::nil(),
            substation_id: "s1".into(),
            vehicle_id: "ev-1".into(),
            energy_kwh: 30.0,
            energy_expected_kwh: None,
            max_power_kw: 11.0,
            departure: Some(now() + TimeDelta::hours(8)),
            accepted_at: now(),
            dispatched_at: now(),
            request_seq: 1,
        }
    }

    #[test]
    fn a_dispatch_is_held_to_the_rules_of_a_request() {
        assert_eq!(check_dispatch(&dispatch()), Ok(()));
        // A car that has left already is a session that ends at once, not an error.
        let left = Dispatch {
            departure: Some(now() - TimeDelta::hours(1)),
            ..dispatch()
        };
        assert_eq!(check_dispatch(&left), Ok(()));
        let named = |d: Dispatch| fields(check_dispatch(&d).unwrap_err());
        assert_eq!(
            named(Dispatch {
                energy_kwh: 1e300,
                ..dispatch()
            }),
            ["energy_kwh"]
        );
        assert_eq!(
            named(Dispatch {
                max_power_kw: f64::NAN,
                energy_expected_kwh: Some(-1.0),
                ..dispatch()
            }),
            ["max_power_kw", "energy_expected_kwh"]
        );
        assert_eq!(
            named(Dispatch {
                substation_id: "a.b".into(),
                vehicle_id: String::new(),
                ..dispatch()
            }),
            ["substation_id", "vehicle_id"]
        );
        assert_eq!(
            named(Dispatch {
                departure: Some(now() + MAX_STAY + TimeDelta::seconds(1)),
                ..dispatch()
            }),
            ["departure"]
        );
        assert_eq!(
            named(Dispatch {
                departure: None,
                energy_kwh: 200.0,
                max_power_kw: 1.0,
                ..dispatch()
            }),
            ["max_power_kw"]
        );
    }

    #[test]
    fn vehicle_id_counts_characters_not_bytes() {
        let id = "é".repeat(64);
        let body = format!(r#"{{"vehicle_id":"{id}","energy_kwh":1,"max_power_kw":1}}"#);
        assert!(parse_charge_request(body.as_bytes(), now()).is_ok());
        let id = "é".repeat(65);
        let body = format!(r#"{{"vehicle_id":"{id}","energy_kwh":1,"max_power_kw":1}}"#);
        assert_eq!(
            fields(parse_charge_request(body.as_bytes(), now()).unwrap_err()),
            ["vehicle_id"]
        );
    }

    #[test]
    fn a_passed_departure_is_its_own_reason() {
        let err = parse_charge_request(
            br#"{"vehicle_id":"v","energy_kwh":1,"max_power_kw":1,"departure":"2025-12-31T23:00:00Z"}"#,
            now(),
        )
        .unwrap_err();
        assert!(err.is_departure_passed());
    }

    #[test]
    fn wrong_types_and_non_objects_are_field_errors() {
        assert_eq!(
            fields(
                parse_charge_request(
                    br#"{"vehicle_id":1,"energy_kwh":"30","max_power_kw":null}"#,
                    now()
                )
                .unwrap_err()
            ),
            ["vehicle_id", "energy_kwh", "max_power_kw"]
        );
        assert_eq!(
            fields(parse_charge_request(b"[1,2]", now()).unwrap_err()),
            ["body"]
        );
    }
}
