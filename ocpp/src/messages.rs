//! The OCPP 2.0.1 messages the CSMS handles, as serde types (JSON field names as the OCPP 2.0.1
//! JSON schemas spell them), with the schemas' string lengths and enumerations checked.
//!
//! Why not the `rust-ocpp` crate: it turns on serde_json's `arbitrary_precision` (through
//! `rust_decimal`), and Cargo unifies features across the workspace, so every evgrid service
//! built beside it parsed numbers differently: a CI rehearsal found the whole pipeline stuck.
//! The few messages evgrid needs are small; defining them here keeps serde_json as it was.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// BootNotificationRequest.reason (BootReasonEnumType).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootReason {
    ApplicationReset,
    FirmwareUpdate,
    LocalReset,
    PowerUp,
    RemoteReset,
    ScheduledReset,
    Triggered,
    Unknown,
    Watchdog,
}

/// ChargingStationType.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChargingStation {
    pub model: String,
    pub vendor_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootNotificationRequest {
    pub reason: BootReason,
    pub charging_station: ChargingStation,
}

/// RegistrationStatusEnumType.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegistrationStatus {
    Accepted,
    Pending,
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootNotificationResponse {
    pub current_time: DateTime<Utc>,
    /// Seconds between heartbeats.
    pub interval: i32,
    pub status: RegistrationStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatRequest {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatResponse {
    pub current_time: DateTime<Utc>,
}

/// ConnectorStatusEnumType.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnectorStatus {
    Available,
    Occupied,
    Reserved,
    Unavailable,
    Faulted,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusNotificationRequest {
    pub timestamp: DateTime<Utc>,
    pub connector_status: ConnectorStatus,
    pub evse_id: i32,
    pub connector_id: i32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusNotificationResponse {}

/// IdTokenType: who is charging (evgrid: the request's `vehicle_id`, or its request id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdToken {
    pub id_token: String,
    /// IdTokenEnumType: `Central`, `eMAID`, `ISO14443`, `KeyCode`, `Local`, … (kept as sent).
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizeRequest {
    pub id_token: IdToken,
}

/// AuthorizationStatusEnumType (the values evgrid answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthorizationStatus {
    Accepted,
    Blocked,
    Invalid,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdTokenInfo {
    pub status: AuthorizationStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizeResponse {
    pub id_token_info: IdTokenInfo,
}

/// TransactionEventEnumType.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransactionEventKind {
    Started,
    Updated,
    Ended,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransactionInfo {
    pub transaction_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charging_state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Evse {
    pub id: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connector_id: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnitOfMeasure {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SampledValue {
    pub value: f64,
    /// MeasurandEnumType; absent means `Energy.Active.Import.Register`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measurand: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_of_measure: Option<UnitOfMeasure>,
}

impl SampledValue {
    /// The energy imported so far, in Wh, when this is that register's reading.
    pub fn energy_wh(&self) -> Option<f64> {
        let measurand = self
            .measurand
            .as_deref()
            .unwrap_or("Energy.Active.Import.Register");
        if measurand != "Energy.Active.Import.Register" {
            return None;
        }
        self.scaled("Wh", "kWh")
    }

    /// The active power drawn, in W, when this is that reading (`Power.Active.Import`).
    pub fn power_w(&self) -> Option<f64> {
        if self.measurand.as_deref() != Some("Power.Active.Import") {
            return None;
        }
        self.scaled("W", "kW")
    }

    /// The value in `base` units, read in `base` (the default) or `kilo`, with its multiplier.
    fn scaled(&self, base: &str, kilo: &str) -> Option<f64> {
        let unit = self.unit_of_measure.as_ref();
        let scale = match unit.and_then(|u| u.unit.as_deref()).unwrap_or(base) {
            u if u == base => 1.0,
            u if u == kilo => 1000.0,
            _ => return None,
        };
        let multiplier = unit.and_then(|u| u.multiplier).unwrap_or(0);
        Some(self.value * scale * 10f64.powi(multiplier))
    }
}

/// The newest reading among `values` that `read` takes.
pub fn newest<T>(values: &[MeterValue], read: impl Fn(&SampledValue) -> Option<T>) -> Option<T> {
    values
        .iter()
        .max_by_key(|m| m.timestamp)
        .and_then(|m| m.sampled_value.iter().find_map(read))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeterValue {
    pub timestamp: DateTime<Utc>,
    pub sampled_value: Vec<SampledValue>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransactionEventRequest {
    pub event_type: TransactionEventKind,
    pub timestamp: DateTime<Utc>,
    pub trigger_reason: String,
    pub seq_no: i32,
    pub transaction_info: TransactionInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token: Option<IdToken>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evse: Option<Evse>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meter_value: Option<Vec<MeterValue>>,
}

impl TransactionEventRequest {
    /// The newest energy register reading the event carries, in Wh.
    pub fn energy_wh(&self) -> Option<f64> {
        newest(self.meter_value.as_deref()?, SampledValue::energy_wh)
    }

    /// The newest active power reading the event carries, in W.
    pub fn power_w(&self) -> Option<f64> {
        newest(self.meter_value.as_deref()?, SampledValue::power_w)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransactionEventResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token_info: Option<IdTokenInfo>,
}

/// MeterValuesRequest: meter readings outside a transaction's events (or beside them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeterValuesRequest {
    pub evse_id: i32,
    pub meter_value: Vec<MeterValue>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeterValuesResponse {}

/// ACChargingParametersType: what an AC car asks for (ISO 15118).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AcChargingParameters {
    /// Wh.
    pub energy_amount: f64,
    pub ev_min_current: f64,
    pub ev_max_current: f64,
    pub ev_max_voltage: f64,
}

/// DCChargingParametersType: what a DC car asks for (ISO 15118).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DcChargingParameters {
    pub ev_max_current: f64,
    pub ev_max_voltage: f64,
    /// Wh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_amount: Option<f64>,
    /// W.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ev_max_power: Option<f64>,
}

/// ChargingNeedsType.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChargingNeeds {
    pub requested_energy_transfer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub departure_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ac_charging_parameters: Option<AcChargingParameters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dc_charging_parameters: Option<DcChargingParameters>,
}

impl ChargingNeeds {
    /// The energy the car asks for, in Wh, when it says.
    pub fn energy_wh(&self) -> Option<f64> {
        self.ac_charging_parameters
            .as_ref()
            .map(|ac| ac.energy_amount)
            .or_else(|| self.dc_charging_parameters.as_ref()?.energy_amount)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotifyEvChargingNeedsRequest {
    pub evse_id: i32,
    pub charging_needs: ChargingNeeds,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_schedule_tuples: Option<i32>,
}

/// NotifyEVChargingNeedsStatusEnumType.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NotifyEvChargingNeedsStatus {
    Accepted,
    Rejected,
    Processing,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotifyEvChargingNeedsResponse {
    pub status: NotifyEvChargingNeedsStatus,
}

/// Line-to-neutral voltage an ampere limit is converted with (European AC).
pub const NOMINAL_VOLTAGE_V: f64 = 230.0;
/// Phases of a limit in amperes that does not say (`numberPhases` absent: OCPP's default).
pub const DEFAULT_PHASES: i32 = 3;

/// ChargingRateUnitEnumType: watts, or amperes per phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChargingRateUnit {
    W,
    A,
}

/// ChargingSchedulePeriodType.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChargingSchedulePeriod {
    /// Seconds from the schedule's start.
    pub start_period: i32,
    /// In the schedule's rate unit.
    pub limit: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number_phases: Option<i32>,
}

/// ChargingScheduleType.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChargingSchedule {
    pub id: i32,
    pub charging_rate_unit: ChargingRateUnit,
    pub charging_schedule_period: Vec<ChargingSchedulePeriod>,
}

/// ChargingProfilePurposeEnumType.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChargingProfilePurpose {
    ChargingStationExternalConstraints,
    ChargingStationMaxProfile,
    TxDefaultProfile,
    TxProfile,
}

/// ChargingProfileKindEnumType.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChargingProfileKind {
    Absolute,
    Recurring,
    Relative,
}

/// ChargingProfileType.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChargingProfile {
    pub id: i32,
    pub stack_level: i32,
    pub charging_profile_purpose: ChargingProfilePurpose,
    pub charging_profile_kind: ChargingProfileKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<String>,
    pub charging_schedule: Vec<ChargingSchedule>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SetChargingProfileRequest {
    pub evse_id: i32,
    pub charging_profile: ChargingProfile,
}

/// ChargingProfileStatusEnumType.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChargingProfileStatus {
    Accepted,
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetChargingProfileResponse {
    pub status: ChargingProfileStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClearChargingProfileRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charging_profile_id: Option<i32>,
}

/// ClearChargingProfileStatusEnumType.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClearChargingProfileStatus {
    Accepted,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClearChargingProfileResponse {
    pub status: ClearChargingProfileStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestStopTransactionRequest {
    pub transaction_id: String,
}

/// RequestStartStopStatusEnumType.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestStartStopStatus {
    Accepted,
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestStopTransactionResponse {
    pub status: RequestStartStopStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReserveNowRequest {
    /// The reservation's id.
    pub id: i32,
    pub expiry_date_time: DateTime<Utc>,
    pub id_token: IdToken,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evse_id: Option<i32>,
}

/// ReserveNowStatusEnumType.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReserveNowStatus {
    Accepted,
    Faulted,
    Occupied,
    Rejected,
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReserveNowResponse {
    pub status: ReserveNowStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelReservationRequest {
    pub reservation_id: i32,
}

/// CancelReservationStatusEnumType.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CancelReservationStatus {
    Accepted,
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelReservationResponse {
    pub status: CancelReservationStatus,
}

use crate::rpc::Violation;

/// What the schemas bound beyond the types: string lengths, and ids that are never negative.
pub trait Checked {
    fn check(&self) -> Result<(), Violation>;
}

fn at_most(field: &str, value: &str, max: usize) -> Result<(), Violation> {
    if value.chars().count() > max {
        return Err((
            crate::rpc::ErrorCode::PropertyConstraintViolation,
            format!("{field} is longer than {max} characters"),
        ));
    }
    Ok(())
}

impl Checked for BootNotificationRequest {
    fn check(&self) -> Result<(), Violation> {
        let s = &self.charging_station;
        at_most("chargingStation.model", &s.model, 20)?;
        at_most("chargingStation.vendorName", &s.vendor_name, 50)?;
        at_most(
            "chargingStation.serialNumber",
            s.serial_number.as_deref().unwrap_or_default(),
            25,
        )?;
        at_most(
            "chargingStation.firmwareVersion",
            s.firmware_version.as_deref().unwrap_or_default(),
            50,
        )
    }
}

impl Checked for HeartbeatRequest {
    fn check(&self) -> Result<(), Violation> {
        Ok(())
    }
}

impl Checked for StatusNotificationRequest {
    fn check(&self) -> Result<(), Violation> {
        if self.evse_id < 0 || self.connector_id < 0 {
            return Err((
                crate::rpc::ErrorCode::PropertyConstraintViolation,
                "evseId and connectorId are never negative".into(),
            ));
        }
        Ok(())
    }
}

impl Checked for AuthorizeRequest {
    fn check(&self) -> Result<(), Violation> {
        at_most("idToken.idToken", &self.id_token.id_token, 36)
    }
}

impl Checked for MeterValuesRequest {
    fn check(&self) -> Result<(), Violation> {
        finite_readings(&self.meter_value)
    }
}

impl Checked for NotifyEvChargingNeedsRequest {
    fn check(&self) -> Result<(), Violation> {
        match self.charging_needs.energy_wh() {
            Some(wh) if !wh.is_finite() || wh < 0.0 => Err((
                crate::rpc::ErrorCode::PropertyConstraintViolation,
                "chargingNeeds energyAmount is a finite number of Wh, never negative".into(),
            )),
            _ => Ok(()),
        }
    }
}

fn finite_readings(values: &[MeterValue]) -> Result<(), Violation> {
    if values
        .iter()
        .flat_map(|m| &m.sampled_value)
        .any(|v| !v.value.is_finite())
    {
        return Err((
            crate::rpc::ErrorCode::PropertyConstraintViolation,
            "meter values are finite numbers".into(),
        ));
    }
    Ok(())
}

impl Checked for TransactionEventRequest {
    fn check(&self) -> Result<(), Violation> {
        at_most(
            "transactionInfo.transactionId",
            &self.transaction_info.transaction_id,
            36,
        )?;
        if let Some(token) = &self.id_token {
            at_most("idToken.idToken", &token.id_token, 36)?;
        }
        if self.seq_no < 0 {
            return Err((
                crate::rpc::ErrorCode::PropertyConstraintViolation,
                "seqNo is never negative".into(),
            ));
        }
        finite_readings(self.meter_value.as_deref().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn messages_read_as_the_ocpp_schemas_spell_them() {
        let boot: BootNotificationRequest = serde_json::from_value(json!({
            "reason": "PowerUp",
            "chargingStation": {"model": "Wallbox 22", "vendorName": "evgrid-test", "customData": {"vendorId": "x"}}
        }))
        .unwrap();
        assert_eq!(boot.reason, BootReason::PowerUp);
        assert!(boot.check().is_ok());
        let long = BootNotificationRequest {
            charging_station: ChargingStation {
                model: "m".repeat(21),
                ..boot.charging_station.clone()
            },
            ..boot
        };
        assert!(long.check().unwrap_err().1.contains("model"));
        assert!(
            serde_json::from_value::<BootNotificationRequest>(
                json!({"reason": "Bored", "chargingStation": {"model": "m", "vendorName": "v"}})
            )
            .is_err()
        );
        let response = serde_json::to_value(BootNotificationResponse {
            current_time: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            interval: 60,
            status: RegistrationStatus::Accepted,
        })
        .unwrap();
        assert_eq!(
            response,
            json!({"currentTime": "2027-01-15T08:00:00Z", "interval": 60, "status": "Accepted"})
        );
        let status: StatusNotificationRequest = serde_json::from_value(json!({
            "timestamp": "2027-01-15T08:00:00Z", "connectorStatus": "Occupied", "evseId": 1, "connectorId": 2
        }))
        .unwrap();
        assert_eq!(
            (status.connector_status, status.connector_id),
            (ConnectorStatus::Occupied, 2)
        );
    }

    #[test]
    fn the_energy_register_reads_in_wh_whatever_its_unit() {
        let event: TransactionEventRequest = serde_json::from_value(json!({
            "eventType": "Updated", "timestamp": "2027-01-15T08:00:00Z",
            "triggerReason": "MeterValuePeriodic", "seqNo": 3,
            "transactionInfo": {"transactionId": "tx-1", "chargingState": "Charging"},
            "meterValue": [
                {"timestamp": "2027-01-15T07:59:00Z", "sampledValue": [{"value": 1000.0}]},
                {"timestamp": "2027-01-15T08:00:00Z", "sampledValue": [
                    {"value": 11.0, "measurand": "Power.Active.Import", "unitOfMeasure": {"unit": "kW"}},
                    {"value": 1.5, "unitOfMeasure": {"unit": "kWh"}}
                ]}
            ]
        }))
        .unwrap();
        assert_eq!(event.energy_wh(), Some(1500.0));
        let scaled = SampledValue {
            value: 2.0,
            measurand: None,
            unit_of_measure: Some(UnitOfMeasure {
                unit: None,
                multiplier: Some(3),
            }),
        };
        assert_eq!(scaled.energy_wh(), Some(2000.0));
        assert!(event.check().is_ok());
    }
}
