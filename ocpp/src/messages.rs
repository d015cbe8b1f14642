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

/// A payload field breaking its schema's limits: the OCPP-J error code and why.
pub type Violation = (crate::rpc::ErrorCode, String);

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
}
