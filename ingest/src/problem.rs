//! Every failure of the HTTP API as an RFC 9457 problem (`application/problem+json`): the
//! handlers' errors ([`ApiError`]) and warp's routing rejections ([`recover`]) alike, so a
//! client of ingest never sees another error format.
//!
//! Problem `type`s are a small fixed set of URIs under `https://evgrid.dev/problems/`,
//! documented in `docs/api.md` and `docs/openapi.yaml`.

use evgrid_model::validate::{FieldError, RequestError};
use serde::Serialize;
use uuid::Uuid;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;

use crate::contract::{BODY_LIMIT_BYTES, Rejection};

/// Seconds a client should wait before retrying when NATS is unreachable: about one
/// reconnect attempt of the client (which backs off to 2 s).
pub(crate) const RETRY_AFTER_SECONDS: u32 = 2;

const PROBLEM_JSON: &str = "application/problem+json";

/// Why a request failed, as handlers report it. The variant decides the status code.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// Not JSON (400), or field errors naming every offending field (422): the shared
    /// validation's verdict, or ingest's own about `request_id` and `Idempotency-Key`.
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("body is larger than {BODY_LIMIT_BYTES} bytes")]
    TooLarge,
    #[error("Content-Type must be application/json, got {}", got.as_deref().unwrap_or("none"))]
    UnsupportedMediaType { got: Option<String> },
    #[error("cannot read the request body: {0}")]
    BodyRead(String),
    #[error("no charge request {0} is known")]
    NotFound(Uuid),
    #[error("NATS is unreachable; retry in a few seconds")]
    NatsUnavailable,
    /// NATS answered, but refused to store the request: the stream (or the server's store) is
    /// full. Not an outage: an operator must make room.
    #[error("the request store is full ({0}); retry later")]
    StoreFull(String),
    /// No API key, or one the keys file does not know (401).
    #[error("{0}")]
    Unauthorized(String),
    /// A known key without the scope this needs (403).
    #[error("{0}")]
    Forbidden(String),
    /// The key is over its rate limit; a request will be taken again after this (429).
    #[error("this API key is over its rate limit; retry in {:.1} s", .0.as_secs_f64())]
    RateLimited(std::time::Duration),
    #[error("internal error; the server log has the cause")]
    Internal,
}

impl ApiError {
    /// A field error about one field.
    pub(crate) fn field(field: &str, detail: impl Into<String>) -> Self {
        Self::Request(RequestError::Invalid(vec![FieldError {
            field: field.into(),
            detail: detail.into(),
        }]))
    }

    fn kind(&self) -> ProblemType {
        match self {
            Self::Request(RequestError::Malformed(_)) => ProblemType::MalformedJson,
            Self::Request(RequestError::Invalid(_)) => ProblemType::InvalidFields,
            Self::TooLarge => ProblemType::PayloadTooLarge,
            Self::UnsupportedMediaType { .. } => ProblemType::UnsupportedMediaType,
            Self::BodyRead(_) => ProblemType::BadRequest,
            Self::NotFound(_) => ProblemType::NotFound,
            Self::NatsUnavailable => ProblemType::ServiceUnavailable,
            Self::StoreFull(_) => ProblemType::StoreFull,
            Self::Unauthorized(_) => ProblemType::Unauthorized,
            Self::Forbidden(_) => ProblemType::Forbidden,
            Self::RateLimited(_) => ProblemType::RateLimited,
            Self::Internal => ProblemType::Internal,
        }
    }

    /// The `reason` this error counts under in `evgrid_ingest_rejected_total`, for a POST.
    pub(crate) fn rejection(&self) -> Option<Rejection> {
        match self {
            Self::Request(RequestError::Malformed(_)) => Some(Rejection::MalformedJson),
            Self::Request(RequestError::Invalid(_)) => Some(Rejection::InvalidFields),
            Self::TooLarge => Some(Rejection::TooLarge),
            Self::UnsupportedMediaType { .. } => Some(Rejection::UnsupportedMediaType),
            Self::NatsUnavailable => Some(Rejection::NatsUnavailable),
            Self::StoreFull(_) => Some(Rejection::StoreFull),
            Self::Unauthorized(_) => Some(Rejection::Unauthorized),
            Self::Forbidden(_) => Some(Rejection::Forbidden),
            Self::RateLimited(_) => Some(Rejection::RateLimited),
            Self::BodyRead(_) | Self::NotFound(_) | Self::Internal => None,
        }
    }

    pub(crate) fn into_response(self) -> Response {
        let errors = match &self {
            Self::Request(RequestError::Invalid(errors)) => errors.as_slice(),
            _ => &[],
        };
        let mut response = problem_response(self.kind(), &self.to_string(), errors);
        let headers = response.headers_mut();
        match &self {
            Self::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"evgrid\""),
                );
            }
            Self::RateLimited(wait) => {
                // Whole seconds, rounded up: a client that waits that long is let in.
                let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
                headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            }
            _ => {}
        }
        response
    }
}

/// The fixed set of problem types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProblemType {
    MalformedJson,
    InvalidFields,
    PayloadTooLarge,
    UnsupportedMediaType,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    ServiceUnavailable,
    StoreFull,
    Unauthorized,
    Forbidden,
    RateLimited,
    Internal,
}

impl ProblemType {
    fn uri(self) -> &'static str {
        match self {
            Self::MalformedJson => "https://evgrid.dev/problems/malformed-json",
            Self::InvalidFields => "https://evgrid.dev/problems/invalid-fields",
            Self::PayloadTooLarge => "https://evgrid.dev/problems/payload-too-large",
            Self::UnsupportedMediaType => "https://evgrid.dev/problems/unsupported-media-type",
            Self::BadRequest => "https://evgrid.dev/problems/bad-request",
            Self::NotFound => "https://evgrid.dev/problems/not-found",
            Self::MethodNotAllowed => "https://evgrid.dev/problems/method-not-allowed",
            Self::ServiceUnavailable => "https://evgrid.dev/problems/service-unavailable",
            Self::StoreFull => "https://evgrid.dev/problems/store-full",
            Self::Unauthorized => "https://evgrid.dev/problems/unauthorized",
            Self::Forbidden => "https://evgrid.dev/problems/forbidden",
            Self::RateLimited => "https://evgrid.dev/problems/rate-limited",
            Self::Internal => "https://evgrid.dev/problems/internal",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::MalformedJson => "Malformed JSON",
            Self::InvalidFields => "Invalid fields",
            Self::PayloadTooLarge => "Payload too large",
            Self::UnsupportedMediaType => "Unsupported media type",
            Self::BadRequest => "Bad request",
            Self::NotFound => "Not found",
            Self::MethodNotAllowed => "Method not allowed",
            Self::ServiceUnavailable => "Service unavailable",
            Self::StoreFull => "Store full",
            Self::Unauthorized => "Unauthorized",
            Self::Forbidden => "Forbidden",
            Self::RateLimited => "Too many requests",
            Self::Internal => "Internal server error",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Self::MalformedJson | Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::InvalidFields => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::ServiceUnavailable | Self::StoreFull => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The problem document. `field` (the first offending field) and `errors` (all of them) are
/// present only for field errors.
#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    title: &'static str,
    status: u16,
    detail: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    #[serde(skip_serializing_if = "<[FieldError]>::is_empty")]
    errors: &'a [FieldError],
}

fn problem_json(kind: ProblemType, detail: &str, errors: &[FieldError]) -> Vec<u8> {
    serde_json::to_vec(&Problem {
        kind: kind.uri(),
        title: kind.title(),
        status: kind.status().as_u16(),
        detail,
        field: errors.first().map(|e| e.field.as_str()),
        errors,
    })
    .expect("a problem serializes")
}

fn problem_response(kind: ProblemType, detail: &str, errors: &[FieldError]) -> Response {
    let status = kind.status();
    let mut response = Response::new(problem_json(kind, detail, errors).into());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
    }
    response
}

/// Turns warp's rejections (no route, wrong method, unreadable header) into problems.
pub(crate) async fn recover(rejection: warp::Rejection) -> Result<Response, warp::Rejection> {
    use warp::reject;
    let (kind, detail) = if rejection.is_not_found() {
        (ProblemType::NotFound, "no resource at this path".to_owned())
    } else if rejection.find::<reject::MethodNotAllowed>().is_some() {
        (
            ProblemType::MethodNotAllowed,
            "this resource does not support the method; see the Allow header".to_owned(),
        )
    } else if let Some(e) = rejection.find::<reject::InvalidHeader>() {
        (
            ProblemType::BadRequest,
            format!("header {} has an invalid value", e.name()),
        )
    } else if let Some(e) = rejection.find::<reject::MissingHeader>() {
        (
            ProblemType::BadRequest,
            format!("header {} is required", e.name()),
        )
    } else if rejection.find::<reject::PayloadTooLarge>().is_some() {
        (ProblemType::PayloadTooLarge, ApiError::TooLarge.to_string())
    } else if rejection.find::<reject::UnsupportedMediaType>().is_some() {
        (
            ProblemType::UnsupportedMediaType,
            "Content-Type must be application/json".to_owned(),
        )
    } else {
        tracing::error!(?rejection, "unhandled rejection");
        (ProblemType::Internal, ApiError::Internal.to_string())
    };
    Ok(problem_response(kind, &detail, &[]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(kind: ProblemType, detail: &str, errors: &[FieldError]) -> serde_json::Value {
        serde_json::from_slice(&problem_json(kind, detail, errors)).unwrap()
    }

    #[test]
    fn field_errors_name_the_first_field_and_list_all() {
        let error = ApiError::Request(RequestError::Invalid(vec![
            FieldError {
                field: "energy_kwh".into(),
                detail: "is required".into(),
            },
            FieldError {
                field: "colour".into(),
                detail: "unknown field".into(),
            },
        ]));
        assert_eq!(error.rejection(), Some(Rejection::InvalidFields));
        let ApiError::Request(RequestError::Invalid(errors)) = &error else {
            unreachable!()
        };
        let body = json(error.kind(), &error.to_string(), errors);
        assert_eq!(body["type"], "https://evgrid.dev/problems/invalid-fields");
        assert_eq!(body["status"], 422);
        assert_eq!(body["field"], "energy_kwh");
        assert_eq!(body["errors"][1]["field"], "colour");
        assert_eq!(
            body["detail"],
            "energy_kwh: is required; colour: unknown field"
        );
        let response = error.into_response();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
    }

    #[test]
    fn unavailable_says_when_to_retry_and_has_no_field() {
        let response = ApiError::NatsUnavailable.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let body = json(ProblemType::ServiceUnavailable, "down", &[]);
        assert_eq!(body["status"], 503);
        assert!(body.get("field").is_none() && body.get("errors").is_none());
    }

    #[test]
    fn every_problem_type_is_distinct() {
        let all = [
            ProblemType::MalformedJson,
            ProblemType::InvalidFields,
            ProblemType::PayloadTooLarge,
            ProblemType::UnsupportedMediaType,
            ProblemType::BadRequest,
            ProblemType::NotFound,
            ProblemType::MethodNotAllowed,
            ProblemType::ServiceUnavailable,
            ProblemType::StoreFull,
            ProblemType::Unauthorized,
            ProblemType::Forbidden,
            ProblemType::RateLimited,
            ProblemType::Internal,
        ];
        let uris: std::collections::HashSet<_> = all.iter().map(|k| k.uri()).collect();
        assert_eq!(uris.len(), all.len());
    }
}
