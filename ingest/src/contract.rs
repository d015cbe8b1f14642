//! The fixed vocabulary of ingest's HTTP contract: the route templates, the reasons a charge
//! request is refused, and the body limit. The metrics label by these, the problem documents
//! and the handlers name them; this module depends on none of those, so they all point one way.

/// Largest accepted body: 64 KiB (a charge request is about 200 bytes).
pub const BODY_LIMIT_BYTES: usize = 64 * 1024;

/// The route templates: the `route` label of the HTTP metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    ChargeRequests,
    ChargeRequest,
    Substations,
    ApiKey,
    Metrics,
    Healthz,
    Readyz,
    /// Any path the API does not serve.
    Other,
}

impl Route {
    pub(crate) const ALL: [Route; 8] = [
        Self::ChargeRequests,
        Self::ChargeRequest,
        Self::Substations,
        Self::ApiKey,
        Self::Metrics,
        Self::Healthz,
        Self::Readyz,
        Self::Other,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::ChargeRequests => "/v1/charge-requests",
            Self::ChargeRequest => "/v1/charge-requests/{request_id}",
            Self::Substations => "/v1/substations",
            Self::ApiKey => "/v1/api-key",
            Self::Metrics => "/metrics",
            Self::Healthz => "/healthz",
            Self::Readyz => "/readyz",
            Self::Other => "other",
        }
    }

    /// Position in [`Route::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The template a request path falls under.
    pub(crate) fn of(path: &str) -> Route {
        match path {
            "/v1/charge-requests" => Self::ChargeRequests,
            "/v1/substations" => Self::Substations,
            "/v1/api-key" => Self::ApiKey,
            "/metrics" => Self::Metrics,
            "/healthz" => Self::Healthz,
            "/readyz" => Self::Readyz,
            _ => match path.strip_prefix("/v1/charge-requests/") {
                Some(id) if !id.is_empty() && !id.contains('/') => Self::ChargeRequest,
                _ => Self::Other,
            },
        }
    }

    /// The `Allow` header of a 405 on this route.
    pub(crate) fn allow(self) -> Option<&'static str> {
        match self {
            Self::ChargeRequests => Some("POST"),
            Self::Other => None,
            _ => Some("GET"),
        }
    }
}

/// Why a `POST /v1/charge-requests` was not accepted: the `reason` label of
/// `evgrid_ingest_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejection {
    MalformedJson,
    InvalidFields,
    TooLarge,
    UnsupportedMediaType,
    NatsUnavailable,
    StoreFull,
    /// No API key, or an unknown one.
    Unauthorized,
    /// A key without the `submit` scope.
    Forbidden,
    /// A key over its rate limit.
    RateLimited,
}

impl Rejection {
    pub(crate) const ALL: [Rejection; 9] = [
        Self::MalformedJson,
        Self::InvalidFields,
        Self::TooLarge,
        Self::UnsupportedMediaType,
        Self::NatsUnavailable,
        Self::StoreFull,
        Self::Unauthorized,
        Self::Forbidden,
        Self::RateLimited,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::MalformedJson => "malformed_json",
            Self::InvalidFields => "invalid_fields",
            Self::TooLarge => "too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::NatsUnavailable => "nats_unavailable",
            Self::StoreFull => "store_full",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::RateLimited => "rate_limited",
        }
    }
}
