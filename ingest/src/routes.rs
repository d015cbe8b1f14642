//! The HTTP API (warp): `POST /v1/charge-requests` stores a request in `ev.requests` and
//! answers 202 after the PubAck; `GET /v1/charge-requests/{request_id}` reads its state;
//! `GET /v1/substations` shows the grid; plus the shared ops endpoints. Every answer is timed
//! and counted by route template, and every failure is a problem document.

use std::sync::Arc;
use std::time::Instant;

use async_nats::HeaderName;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::stream::DirectGetErrorKind;
use bytes::{Buf, Bytes};
use chrono::{DateTime, SecondsFormat, Utc};
use evgrid_common::http::{Readiness, ops_routes};
use evgrid_common::streams;
use evgrid_model::messages::{RequestRecord, expected_energy_kwh};
use evgrid_model::{headers, subjects, validate};
use futures::Stream;
use prometheus::Registry;
use serde::Serialize;
use uuid::Uuid;
use warp::Filter;
use warp::http::{HeaderValue, StatusCode, header};
use warp::path::FullPath;
use warp::reply::Response;

use crate::auth::Scope;
use crate::contract::Route;
use crate::problem::{self, ApiError};
use crate::state::{AppState, Connected};
use crate::{recent, request};

// Built once: a header name made from a `&str` is validated and allocated on every publish.
static REQUEST_ID_HEADER: HeaderName = HeaderName::from_static(headers::REQUEST_ID);
static ACCEPTED_AT_HEADER: HeaderName = HeaderName::from_static(headers::ACCEPTED_AT);

/// The whole HTTP surface of ingest. Rejects nothing: every failure is already a problem.
pub(crate) fn routes(
    state: Arc<AppState>,
    registry: Registry,
    readiness: Readiness,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    let with_state = {
        let state = state.clone();
        warp::any().map(move || state.clone())
    };
    // Path before method everywhere, so a known path with the wrong method is a 405, not a 404.
    let authorization = || warp::header::optional::<String>("authorization");
    let post = warp::path!("v1" / "charge-requests")
        .and(warp::post())
        .and(with_state.clone())
        .and(authorization())
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::header::optional::<String>("idempotency-key"))
        .and(warp::header::optional::<u64>("content-length"))
        .and(warp::body::stream())
        .then(post_charge_request);
    let get_one = warp::path!("v1" / "charge-requests" / String)
        .and(warp::get())
        .and(with_state.clone())
        .and(authorization())
        .then(get_charge_request);
    let substations = warp::path!("v1" / "substations")
        .and(warp::get())
        .and(with_state.clone())
        .and(authorization())
        .map(|state: Arc<AppState>, authorization: Option<String>| {
            let substations = state
                .caller(authorization.as_deref(), Some(Scope::Operator))
                .map(|_| state.substations(Utc::now()));
            ok_json(substations)
        });
    let api_key = warp::path!("v1" / "api-key")
        .and(warp::get())
        .and(with_state)
        .and(authorization())
        .map(|state: Arc<AppState>, authorization: Option<String>| {
            ok_json(
                state
                    .caller(authorization.as_deref(), None)
                    .map(|caller| caller.describe()),
            )
        });
    let api = post
        .or(get_one)
        .unify()
        .or(substations)
        .unify()
        .or(api_key)
        .unify()
        .or(ops_routes(registry, readiness))
        .unify()
        .recover(problem::recover)
        .unify();

    let http_metrics = state.metrics.http.clone();
    warp::path::full()
        .map(move |path: FullPath| http_metrics.start(Route::of(path.as_str())))
        .and(api)
        .map(|in_flight: crate::metrics::InFlight, response| in_flight.finish(response))
}

/// The body of a 202.
#[derive(Serialize)]
struct Queued {
    request_id: Uuid,
    state: &'static str,
    /// Best effort: what the car can take at its max power before its departure, when that
    /// is less than it asked for (the GET shows the figure the dispatcher settled on).
    #[serde(skip_serializing_if = "Option::is_none")]
    energy_expected_kwh: Option<f64>,
}

async fn post_charge_request<S, B>(
    state: Arc<AppState>,
    authorization: Option<String>,
    content_type: Option<String>,
    idempotency_key: Option<String>,
    content_length: Option<u64>,
    body: S,
) -> Response
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let accepted = accept(
        &state,
        authorization.as_deref(),
        content_type.as_deref(),
        idempotency_key.as_deref(),
        content_length,
        body,
    )
    .await;
    match accepted {
        Ok((request_id, energy_expected_kwh)) => {
            let mut response = json_response(
                StatusCode::ACCEPTED,
                &Queued {
                    request_id,
                    state: "queued",
                    energy_expected_kwh,
                },
            );
            let location = format!("/v1/charge-requests/{request_id}");
            response.headers_mut().insert(
                header::LOCATION,
                HeaderValue::try_from(location).expect("a path is a header value"),
            );
            response
        }
        Err(e) => {
            if let Some(reason) = e.rejection() {
                state.metrics.rejected(reason);
            }
            e.into_response()
        }
    }
}

/// Checks, validates and stores one charge request; its id once JetStream has it, and the
/// energy it can expect when that is less than it asked for (best effort).
async fn accept<S, B>(
    state: &AppState,
    authorization: Option<&str>,
    content_type: Option<&str>,
    idempotency_key: Option<&str>,
    content_length: Option<u64>,
    body: S,
) -> Result<(Uuid, Option<f64>), ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let caller = state.caller(authorization, Some(Scope::Submit))?;
    let now = Utc::now();
    request::check_content_type(content_type)?;
    let body = request::read_body(content_length, body).await?;
    let mut charge = validate::parse_charge_request(&body, now)?;
    let request_id = state
        .access
        .request_id(&caller, idempotency_key, charge.request_id)?;
    charge.request_id = Some(request_id);
    let payload = serde_json::to_vec(&charge).map_err(|e| {
        tracing::error!(%request_id, error = %e, "cannot serialize a charge request");
        ApiError::Internal
    })?;

    let nats = state.nats()?;
    let ack = publish(nats, payload.into(), request_id, now, state).await?;
    state.recent.insert(request_id, ack.sequence);
    state.metrics.accepted(ack.duplicate);
    tracing::debug!(%request_id, duplicate = ack.duplicate, "charge request stored");
    let expected = if charge.all_or_nothing {
        None
    } else {
        expected_energy_kwh(
            charge.energy_kwh,
            charge.max_power_kw,
            charge.departure,
            now,
        )
    };
    Ok((request_id, expected))
}

/// Publishes the request to `ev.requests` and awaits the PubAck.
async fn publish(
    nats: &Connected,
    payload: Bytes,
    request_id: Uuid,
    accepted_at: DateTime<Utc>,
    state: &AppState,
) -> Result<PublishAck, ApiError> {
    let id = request_id.to_string();
    let message = PublishMessage::build()
        .payload(payload)
        // JetStream stores one message per id within the duplicate window.
        .message_id(&id)
        .header(REQUEST_ID_HEADER.clone(), id)
        .header(
            ACCEPTED_AT_HEADER.clone(),
            accepted_at.to_rfc3339_opts(SecondsFormat::Nanos, true),
        );
    let started = Instant::now();
    let stored = async {
        nats.nats
            .js
            .send_publish(subjects::REQUESTS, message)
            .await?
            .await
    }
    .await;
    match stored {
        Ok(ack) => {
            state
                .metrics
                .observe_publish_ack(started.elapsed().as_secs_f64());
            Ok(ack)
        }
        Err(e) => match store_full(&e) {
            Some(cause) => {
                tracing::error!(%request_id, error = %e, "charge request not stored: the store is full; answering 503");
                state.readiness.set_store_full();
                Err(ApiError::StoreFull(cause))
            }
            None => {
                tracing::warn!(%request_id, error = %e, "charge request not stored; answering 503");
                Err(ApiError::NatsUnavailable)
            }
        },
    }
}

/// Whether NATS refused to store a publish because a stream (or the server's store) is full,
/// and the server's words for it: an operator's problem, not an outage.
fn store_full(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    use async_nats::jetstream::{Error as JsError, ErrorCode};
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(js) = e.downcast_ref::<JsError>()
            && [
                ErrorCode::STREAM_STORE_FAILED,
                ErrorCode::STORAGE_RESOURCES_EXCEEDED,
                ErrorCode::INSUFFICIENT_RESOURCES,
                ErrorCode::ACCOUNT_RESOURCES_EXCEEDED,
            ]
            .contains(&js.error_code())
        {
            return Some(js.to_string());
        }
        source = e.source();
    }
    None
}

async fn get_charge_request(
    raw_id: String,
    state: Arc<AppState>,
    authorization: Option<String>,
) -> Response {
    let record = lookup(&state, authorization.as_deref(), &raw_id).await;
    ok_json(record.map(crate::view::RequestView::from))
}

/// The request's state from `EV_REQUEST_STATE` (the dispatcher's record, or the session
/// record of the substation it names), else `queued` if this process accepted it.
/// Another client's request is not found: its existence is not the caller's to know.
async fn lookup(
    state: &AppState,
    authorization: Option<&str>,
    raw_id: &str,
) -> Result<RequestRecord, ApiError> {
    let caller = state.caller(authorization, Some(Scope::Read))?;
    let request_id =
        Uuid::parse_str(raw_id).map_err(|_| ApiError::field("request_id", "must be a UUID"))?;
    if !caller.may_read(request_id) {
        return Err(ApiError::NotFound(request_id));
    }
    let nats = state.nats()?;
    match streams::read_request(&nats.request_states, request_id).await {
        Ok(Some(record)) => Ok(record),
        Ok(None) => match state.recent.sequence(&request_id) {
            Some(sequence) => stored_request(nats, request_id, sequence).await,
            None => Err(ApiError::NotFound(request_id)),
        },
        Err(e @ streams::StateReadError::NotARecord { .. }) => {
            tracing::error!(%request_id, error = %e, "unreadable request state in the bucket");
            Err(ApiError::Internal)
        }
        Err(e) => {
            tracing::warn!(%request_id, error = %e, "cannot read request state; answering 503");
            Err(ApiError::NatsUnavailable)
        }
    }
}

/// A request this process accepted, read back from `EV_REQUESTS`, as a `queued` record.
async fn stored_request(
    nats: &Connected,
    request_id: Uuid,
    sequence: u64,
) -> Result<RequestRecord, ApiError> {
    let message = match nats.requests.direct_get(sequence).await {
        Ok(message) => message,
        // Aged out or purged: nothing to show.
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => {
            return Err(ApiError::NotFound(request_id));
        }
        Err(e) => {
            tracing::warn!(%request_id, error = %e, "cannot read the stored request; answering 503");
            return Err(ApiError::NatsUnavailable);
        }
    };
    let header = |name: &str| message.headers.get(name).map(|v| v.as_str());
    if header(headers::REQUEST_ID) != Some(request_id.to_string().as_str()) {
        return Err(ApiError::NotFound(request_id));
    }
    let accepted_at = header(headers::ACCEPTED_AT)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.to_utc())
        .unwrap_or_else(|| {
            DateTime::from_timestamp_nanos(message.time.unix_timestamp_nanos() as i64)
        });
    recent::queued_record(request_id, &message.payload, accepted_at).ok_or_else(|| {
        tracing::error!(%request_id, sequence, "stored request is not a charge request");
        ApiError::Internal
    })
}

/// `200` with `value`, or the problem document of the error.
fn ok_json<T: Serialize>(value: Result<T, ApiError>) -> Response {
    match value {
        Ok(value) => json_response(StatusCode::OK, &value),
        Err(e) => e.into_response(),
    }
}

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut response = Response::new(body.into());
            *response.status_mut() = status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot serialize a response");
            ApiError::Internal.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_fall_under_their_templates() {
        assert_eq!(Route::of("/v1/charge-requests"), Route::ChargeRequests);
        assert_eq!(
            Route::of("/v1/charge-requests/6f1c0b5e-7a2d-4d55-9a3e-1f0e2b3c4d5e"),
            Route::ChargeRequest
        );
        assert_eq!(Route::of("/v1/charge-requests/x"), Route::ChargeRequest);
        assert_eq!(Route::of("/v1/charge-requests/"), Route::Other);
        assert_eq!(Route::of("/v1/charge-requests/a/b"), Route::Other);
        assert_eq!(Route::of("/v1/substations"), Route::Substations);
        assert_eq!(Route::of("/readyz"), Route::Readyz);
        assert_eq!(Route::of("/"), Route::Other);
        assert_eq!(Route::of("/v2/anything"), Route::Other);
    }

    #[test]
    fn route_indexes_follow_all() {
        for (i, route) in Route::ALL.iter().enumerate() {
            assert_eq!(route.index(), i);
        }
    }
}
