//! Subject names: the public NATS contract. Users type these with the nats CLI, so they never
//! change without a migration.

/// Charge requests, JSON as in `POST /v1/charge-requests`. Stored in `EV_REQUESTS`.
pub const REQUESTS: &str = "ev.requests";
/// Requests that can never be served: original payload, reason in headers. Stored in `EV_REJECTED`.
pub const REJECTED: &str = "ev.rejected";
/// Wildcard over every substation's heartbeats.
pub const TELEMETRY_ALL: &str = "ev.telemetry.*";
/// Wildcard over every dispatch.
pub const DISPATCH_ALL: &str = "ev.dispatch.*";
/// Wildcard over every session event.
pub const SESSIONS_ALL: &str = "ev.sessions.*.*";
/// Wildcard over every substation's grid-operator limits.
pub const LIMITS_ALL: &str = "ev.limits.*";

/// Heartbeats of one substation.
pub fn telemetry(substation_id: &str) -> String {
    format!("ev.telemetry.{substation_id}")
}

/// Assignments of requests to one substation.
pub fn dispatch(substation_id: &str) -> String {
    format!("ev.dispatch.{substation_id}")
}

/// Session lifecycle events of one substation: `ev.sessions.<id>.<accepted|started|completed|interrupted>`.
pub fn sessions(substation_id: &str, event: &str) -> String {
    format!("ev.sessions.{substation_id}.{event}")
}

/// Grid-operator capacity limits of one substation (`{"capacity_kw": 80, "until": "…"}`).
/// Stored in `EV_LIMITS`, last one per substation.
pub fn limits(substation_id: &str) -> String {
    format!("ev.limits.{substation_id}")
}

/// The substation id is the last token of a telemetry, dispatch or limits subject (three
/// tokens: `ev.<kind>.<id>`; anything longer is none of them).
pub fn substation_of(subject: &str) -> Option<&str> {
    let mut tokens = subject.split('.');
    match (tokens.next(), tokens.next(), tokens.next(), tokens.next()) {
        (Some("ev"), Some(_kind), Some(id), None) if !id.is_empty() => Some(id),
        _ => None,
    }
}

/// A substation id becomes a subject token and a metric label, so it is restricted to
/// `[A-Za-z0-9_-]{1,64}`: no dots, wildcards or spaces.
pub fn valid_substation_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substation_is_the_third_token() {
        assert_eq!(substation_of(&telemetry("s-1")), Some("s-1"));
        assert_eq!(substation_of(&dispatch("north")), Some("north"));
        assert_eq!(substation_of(&limits("s-2")), Some("s-2"));
        assert_eq!(substation_of("ev.requests"), None);
        assert_eq!(substation_of("ev.telemetry.s1.x"), None);
    }

    #[test]
    fn substation_ids_are_subject_safe() {
        assert!(valid_substation_id("substation-1"));
        assert!(!valid_substation_id("a.b"));
        assert!(!valid_substation_id("a*"));
        assert!(!valid_substation_id(""));
        assert!(!valid_substation_id(&"x".repeat(65)));
    }
}
