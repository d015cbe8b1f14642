//! How records read from the pipeline are shown over HTTP: `GET /v1/charge-requests/{id}` adds
//! whether a completed car left fully charged, derived from the stored record (the
//! substation's `reason`), and numbers are rounded to what they can mean (watt-hours, watts,
//! milliseconds) rather than shown with float noise such as `49.99999999999999`.

use evgrid_model::messages::{RequestRecord, RequestState, SessionOutcome};
use evgrid_model::units::round3;
use serde::Serialize;

/// The body of `GET /v1/charge-requests/{id}`: the stored record, rounded, plus for a
/// `completed` request whether the car got all it asked for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct RequestView {
    #[serde(flatten)]
    record: RequestRecord,
    /// `completed` only: true when the requested energy was delivered, false when the car left
    /// at its departure with less.
    #[serde(skip_serializing_if = "Option::is_none")]
    fully_charged: Option<bool>,
    /// `completed` only: energy asked for but not delivered, kWh (0 when fully charged).
    #[serde(skip_serializing_if = "Option::is_none")]
    energy_shortfall_kwh: Option<f64>,
}

impl From<RequestRecord> for RequestView {
    fn from(mut record: RequestRecord) -> Self {
        record.energy_kwh = round3(record.energy_kwh);
        record.energy_expected_kwh = record.energy_expected_kwh.map(round3);
        record.max_power_kw = round3(record.max_power_kw);
        record.energy_delivered_kwh = round3(record.energy_delivered_kwh);
        for m in &mut record.moved {
            m.energy_delivered_kwh = round3(m.energy_delivered_kwh);
        }
        let (fully_charged, energy_shortfall_kwh) = if record.state == RequestState::Completed {
            let shortfall = round3((record.energy_kwh - record.energy_delivered_kwh).max(0.0));
            // The substation's word when it gave one; the energies otherwise. A best-effort
            // request "delivered" what it could expect, not what it asked for.
            let full = match record.reason.as_deref() {
                Some(r) if r == SessionOutcome::Delivered.as_str() => {
                    record.energy_expected_kwh.is_none()
                }
                Some(r) if r == SessionOutcome::Departed.as_str() => false,
                _ => shortfall == 0.0,
            };
            (Some(full), Some(if full { 0.0 } else { shortfall }))
        } else {
            (None, None)
        };
        Self {
            record,
            fully_charged,
            energy_shortfall_kwh,
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};
    use evgrid_model::messages::ChargeRequest;
    use uuid::Uuid;

    use super::*;

    fn record(state: RequestState, delivered: f64, reason: Option<&str>) -> RequestRecord {
        let at = DateTime::<Utc>::from_timestamp(1_900_000_000, 0).unwrap();
        let request = ChargeRequest {
            request_id: None,
            vehicle_id: "ev-1".into(),
            energy_kwh: 30.0,
            max_power_kw: 11.0,
            departure: None,
            all_or_nothing: false,
        };
        let mut r = RequestRecord::new(Uuid::from_u128(1), state, &request, at, at);
        r.energy_delivered_kwh = delivered;
        r.reason = reason.map(str::to_owned);
        r
    }

    fn json(r: RequestRecord) -> serde_json::Value {
        serde_json::to_value(RequestView::from(r)).unwrap()
    }

    #[test]
    fn a_car_that_left_short_says_so_and_by_how_much() {
        let v = json(record(
            RequestState::Completed,
            12.345_678_9,
            Some("departed"),
        ));
        assert_eq!(v["state"], "completed");
        assert_eq!(v["fully_charged"], false);
        assert_eq!(v["energy_delivered_kwh"], 12.346);
        assert_eq!(v["energy_shortfall_kwh"], 17.654);

        let v = json(record(
            RequestState::Completed,
            29.999_999_999_9,
            Some("delivered"),
        ));
        assert_eq!(v["fully_charged"], true);
        assert_eq!(v["energy_delivered_kwh"], 30.0);
        assert_eq!(v["energy_shortfall_kwh"], 0.0);

        // Best effort: it delivered what it could expect, not what it asked for.
        let mut best_effort = record(RequestState::Completed, 9.9, Some("delivered"));
        best_effort.energy_expected_kwh = Some(9.900_000_1);
        let v = json(best_effort);
        assert_eq!(v["fully_charged"], false);
        assert_eq!(v["energy_expected_kwh"], 9.9);
        assert_eq!(v["energy_shortfall_kwh"], 20.1);

        // A record without a reason (an older writer) is judged by its energies.
        let v = json(record(RequestState::Completed, 0.0, None));
        assert_eq!(v["fully_charged"], false);
        assert_eq!(v["energy_shortfall_kwh"], 30.0);
    }

    #[test]
    fn only_completed_requests_carry_the_verdict() {
        let v = json(record(RequestState::Charging, 4.2, None));
        assert!(v.get("fully_charged").is_none(), "{v}");
        assert!(v.get("energy_shortfall_kwh").is_none(), "{v}");
        assert_eq!(v["energy_delivered_kwh"], 4.2);
    }

    #[test]
    fn rounding_drops_float_noise_only() {
        assert_eq!(round3(49.999_999_999_999_99), 50.0);
        assert_eq!(round3(0.1 + 0.2), 0.3);
        assert_eq!(round3(6.6), 6.6);
        assert_eq!(round3(0.0004), 0.0);
    }
}
