//! OCPP-J framing (OCPP 2.0.1 part 4, "JSON over WebSockets"): every WebSocket text message is
//! a JSON array, one of
//!
//! - `[2, "<message id>", "<Action>", {payload}]`, a CALL (a request),
//! - `[3, "<message id>", {payload}]`, a CALLRESULT (its answer),
//! - `[4, "<message id>", "<error code>", "<description>", {details}]`, a CALLERROR.
//!
//! This module turns text into [`Frame`]s and back, and nothing else: what an action means is
//! the caller's. A message that is not a frame is a [`FrameError`] carrying the CALLERROR to
//! answer it with, when it has a message id to answer.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// A payload breaking its message's rules: the CALLERROR code and why.
pub type Violation = (ErrorCode, String);

/// A CALL's payload as the message `T`; a `FormatViolation` when it is not one.
pub fn payload<T: DeserializeOwned>(payload: Value) -> Result<T, Violation> {
    serde_json::from_value(payload).map_err(|e| (ErrorCode::FormatViolation, e.to_string()))
}

/// A message as a payload (the messages are plain structs: they always serialize).
pub fn to_payload<T: Serialize>(message: T) -> Value {
    serde_json::to_value(message).expect("an OCPP message serializes")
}

/// Longest message id OCPP allows (36 characters: a UUID).
pub const MAX_MESSAGE_ID_CHARS: usize = 36;

/// One OCPP-J message.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Call {
        id: String,
        action: String,
        payload: Value,
    },
    CallResult {
        id: String,
        payload: Value,
    },
    CallError {
        id: String,
        code: ErrorCode,
        description: String,
        details: Value,
    },
}

/// The CALLERROR codes of OCPP-J 2.0.1 (part 4, 4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Payload for the action is not conform the PDU structure.
    FormatViolation,
    /// Any other error not covered by the more specific codes.
    GenericError,
    /// An internal error occurred and the receiver could not process the action.
    InternalError,
    /// The receiver got a message it does not recognise as valid (unknown message type).
    MessageTypeNotSupported,
    /// The requested action is recognised but not supported by the receiver.
    NotImplemented,
    /// The requested action is not known by the receiver.
    NotSupported,
    /// A payload field has a value outside its occurrence constraints.
    OccurrenceConstraintViolation,
    /// A payload field is syntactically correct but violates a property constraint.
    PropertyConstraintViolation,
    /// The payload is incomplete.
    ProtocolError,
    /// The message was refused by the receiver, as it is not allowed in its state.
    SecurityError,
    /// A payload field has a wrong type.
    TypeConstraintViolation,
    /// The call was not performed because of a previous message id.
    RpcFrameworkError,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FormatViolation => "FormatViolation",
            Self::GenericError => "GenericError",
            Self::InternalError => "InternalError",
            Self::MessageTypeNotSupported => "MessageTypeNotSupported",
            Self::NotImplemented => "NotImplemented",
            Self::NotSupported => "NotSupported",
            Self::OccurrenceConstraintViolation => "OccurrenceConstraintViolation",
            Self::PropertyConstraintViolation => "PropertyConstraintViolation",
            Self::ProtocolError => "ProtocolError",
            Self::SecurityError => "SecurityError",
            Self::TypeConstraintViolation => "TypeConstraintViolation",
            Self::RpcFrameworkError => "RpcFrameworkError",
        }
    }

    /// The code named `s`; an unknown one (another version's) reads as `GenericError`.
    pub fn parse(s: &str) -> Self {
        [
            Self::FormatViolation,
            Self::GenericError,
            Self::InternalError,
            Self::MessageTypeNotSupported,
            Self::NotImplemented,
            Self::NotSupported,
            Self::OccurrenceConstraintViolation,
            Self::PropertyConstraintViolation,
            Self::ProtocolError,
            Self::SecurityError,
            Self::TypeConstraintViolation,
            Self::RpcFrameworkError,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
        .unwrap_or(Self::GenericError)
    }
}

/// A message that is not a valid frame: why, and the CALLERROR that answers it (OCPP answers
/// a broken CALL whose id can be read; anything else is only logged).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{description}")]
pub struct FrameError {
    /// The message id, when one could be read.
    pub id: Option<String>,
    pub code: ErrorCode,
    pub description: String,
}

impl FrameError {
    fn new(id: Option<&str>, code: ErrorCode, description: impl Into<String>) -> Self {
        Self {
            id: id.map(str::to_owned),
            code,
            description: description.into(),
        }
    }

    /// The CALLERROR answering it, when the broken message had an id.
    pub fn answer(&self) -> Option<Frame> {
        let id = self.id.clone()?;
        Some(Frame::reply(id, Err((self.code, self.description.clone()))))
    }
}

impl Frame {
    /// Reads one WebSocket text message.
    pub fn parse(text: &str) -> Result<Frame, FrameError> {
        let value: Value = serde_json::from_str(text).map_err(|e| {
            FrameError::new(None, ErrorCode::ProtocolError, format!("not JSON: {e}"))
        })?;
        let Value::Array(mut items) = value else {
            return Err(FrameError::new(
                None,
                ErrorCode::ProtocolError,
                "an OCPP-J message is a JSON array",
            ));
        };
        let id = match items.get(1) {
            Some(Value::String(id))
                if !id.is_empty() && id.chars().count() <= MAX_MESSAGE_ID_CHARS =>
            {
                id.clone()
            }
            _ => {
                return Err(FrameError::new(
                    None,
                    ErrorCode::ProtocolError,
                    format!(
                        "the message id must be a string of 1 to {MAX_MESSAGE_ID_CHARS} characters"
                    ),
                ));
            }
        };
        let bad = |code, what: &str| Err(FrameError::new(Some(&id), code, what));
        // The payload is taken out of the array, not copied: every message passes here.
        match (items.first().and_then(Value::as_u64), items.len()) {
            (Some(2), 4) => {
                let Some(action) = items[2].as_str().filter(|a| !a.is_empty()) else {
                    return bad(ErrorCode::ProtocolError, "a CALL's action must be a string");
                };
                if !items[3].is_object() {
                    return bad(
                        ErrorCode::FormatViolation,
                        "a CALL's payload must be an object",
                    );
                }
                let action = action.to_owned();
                Ok(Frame::Call {
                    id,
                    action,
                    payload: items[3].take(),
                })
            }
            (Some(3), 3) => {
                if !items[2].is_object() {
                    return bad(
                        ErrorCode::FormatViolation,
                        "a CALLRESULT's payload must be an object",
                    );
                }
                Ok(Frame::CallResult {
                    payload: items[2].take(),
                    id,
                })
            }
            (Some(4), 5) => Ok(Frame::CallError {
                code: ErrorCode::parse(items[2].as_str().unwrap_or_default()),
                description: items[3].as_str().unwrap_or_default().to_owned(),
                details: items[4].take(),
                id,
            }),
            (Some(2..=4), n) => bad(
                ErrorCode::ProtocolError,
                &format!("message type {} with {n} elements", items[0]),
            ),
            _ => bad(
                ErrorCode::MessageTypeNotSupported,
                "the message type must be 2 (CALL), 3 (CALLRESULT) or 4 (CALLERROR)",
            ),
        }
    }

    /// The message's id.
    pub fn id(&self) -> &str {
        match self {
            Frame::Call { id, .. } | Frame::CallResult { id, .. } | Frame::CallError { id, .. } => {
                id
            }
        }
    }

    /// The WebSocket text of this frame (written from references: nothing is copied).
    pub fn to_text(&self) -> String {
        let text = match self {
            Frame::Call {
                id,
                action,
                payload,
            } => serde_json::to_string(&(2, id, action, payload)),
            Frame::CallResult { id, payload } => serde_json::to_string(&(3, id, payload)),
            Frame::CallError {
                id,
                code,
                description,
                details,
            } => serde_json::to_string(&(4, id, code.as_str(), description, details)),
        };
        text.expect("a frame serializes")
    }

    /// The answer to the CALL `id`: its CALLRESULT, or the CALLERROR of what it violated.
    pub fn reply(id: String, result: Result<Value, Violation>) -> Frame {
        match result {
            Ok(payload) => Frame::CallResult { id, payload },
            Err((code, description)) => Frame::CallError {
                id,
                code,
                description,
                details: json!({}),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_read_and_write_as_ocpp_j() {
        let call =
            Frame::parse(r#"[2,"19223201","BootNotification",{"reason":"PowerUp"}]"#).unwrap();
        assert_eq!(
            call,
            Frame::Call {
                id: "19223201".into(),
                action: "BootNotification".into(),
                payload: json!({"reason": "PowerUp"}),
            }
        );
        assert_eq!(Frame::parse(&call.to_text()).unwrap(), call);
        let result = Frame::parse(r#"[3, "19223201", {"status": "Accepted"}]"#).unwrap();
        assert_eq!(result.id(), "19223201");
        let error = Frame::parse(r#"[4,"1","NotImplemented","no",{}]"#).unwrap();
        assert!(matches!(
            error,
            Frame::CallError {
                code: ErrorCode::NotImplemented,
                ..
            }
        ));
        assert_eq!(Frame::parse(&error.to_text()).unwrap(), error);
        let other = Frame::parse(r#"[4,"1","SomethingNew","",{}]"#).unwrap();
        assert!(matches!(
            other,
            Frame::CallError {
                code: ErrorCode::GenericError,
                ..
            }
        ));
    }

    #[test]
    fn a_broken_message_is_answered_when_its_id_can_be_read() {
        let cases = [
            ("not json", None, ErrorCode::ProtocolError),
            (r#"{"a":1}"#, None, ErrorCode::ProtocolError),
            (
                r#"[2, 17, "Heartbeat", {}]"#,
                None,
                ErrorCode::ProtocolError,
            ),
            (
                &format!(r#"[2, "{}", "Heartbeat", {{}}]"#, "x".repeat(37)),
                None,
                ErrorCode::ProtocolError,
            ),
            (
                r#"[2, "7", "Heartbeat", []]"#,
                Some("7"),
                ErrorCode::FormatViolation,
            ),
            (r#"[2, "7", "", {}]"#, Some("7"), ErrorCode::ProtocolError),
            (
                r#"[2, "7", "Heartbeat"]"#,
                Some("7"),
                ErrorCode::ProtocolError,
            ),
            (
                r#"[5, "7", {}]"#,
                Some("7"),
                ErrorCode::MessageTypeNotSupported,
            ),
            (
                r#"["2", "7", "Heartbeat", {}]"#,
                Some("7"),
                ErrorCode::MessageTypeNotSupported,
            ),
        ];
        for (text, id, code) in cases {
            let error = Frame::parse(text).unwrap_err();
            assert_eq!((error.id.as_deref(), error.code), (id, code), "{text}");
            assert_eq!(error.answer().is_some(), id.is_some());
        }
    }
}
