//! Reading a `POST /v1/charge-requests` off the wire, before the shared validation
//! (`evgrid_model::validate`) sees its body: the content type, the 64 KiB body limit, and which
//! request id the request names (`Idempotency-Key` header, body `request_id`, or a new one).

use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use uuid::Uuid;

use crate::contract::BODY_LIMIT_BYTES;
use crate::problem::ApiError;

/// Longest accepted `Idempotency-Key` header value.
pub(crate) const IDEMPOTENCY_KEY_MAX_CHARS: usize = 255;

/// The body must be JSON: `application/json`, with parameters such as `charset` allowed.
pub(crate) fn check_content_type(content_type: Option<&str>) -> Result<(), ApiError> {
    let essence = content_type
        .map(|v| v.split(';').next().unwrap_or("").trim())
        .unwrap_or("");
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType {
            got: content_type.map(str::to_owned),
        })
    }
}

/// Reads the whole body, refusing more than [`BODY_LIMIT_BYTES`]: at once when the declared
/// `Content-Length` is over, otherwise (chunked bodies) as soon as the bytes read pass it.
pub(crate) async fn read_body<S, B>(content_length: Option<u64>, body: S) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    if content_length.is_some_and(|n| n > BODY_LIMIT_BYTES as u64) {
        return Err(ApiError::TooLarge);
    }
    let mut body = std::pin::pin!(body);
    // The usual body arrives in one chunk: keep it as is rather than copying it.
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|e| ApiError::BodyRead(e.to_string()))?;
        let read = first.as_ref().map_or(0, Bytes::len) + rest.len() + chunk.remaining();
        if read > BODY_LIMIT_BYTES {
            return Err(ApiError::TooLarge);
        }
        match &first {
            None => first = Some(chunk.copy_to_bytes(chunk.remaining())),
            Some(_) => rest.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining())),
        }
    }
    Ok(match first {
        None => Bytes::new(),
        Some(first) if rest.is_empty() => first,
        Some(first) => {
            let mut all = BytesMut::with_capacity(first.len() + rest.len());
            all.extend_from_slice(&first);
            all.extend_from_slice(&rest);
            all.freeze()
        }
    })
}

/// The request id: the `Idempotency-Key` header if given, else the body's `request_id`, else
/// `new()`, each through `map` (which turns a key, or an id the client chose, into the id
/// stored). A header and a body naming different ids is a contradiction the client must fix.
pub(crate) fn resolve_request_id(
    idempotency_key: Option<&str>,
    body_id: Option<Uuid>,
    map: impl Fn(&str) -> Uuid,
    new: impl FnOnce() -> Uuid,
) -> Result<Uuid, ApiError> {
    let body_id = body_id.map(|id| map(&id.to_string()));
    let Some(key) = idempotency_key else {
        return Ok(body_id.unwrap_or_else(new));
    };
    let key = key.trim();
    if key.is_empty() || key.chars().count() > IDEMPOTENCY_KEY_MAX_CHARS {
        return Err(ApiError::field(
            "Idempotency-Key",
            format!("header must be 1 to {IDEMPOTENCY_KEY_MAX_CHARS} characters"),
        ));
    }
    let id = map(key);
    match body_id {
        Some(body_id) if body_id != id => Err(ApiError::field(
            "request_id",
            format!(
                "differs from the request id {id} named by the Idempotency-Key header; send one or make them agree"
            ),
        )),
        _ => Ok(id),
    }
}

#[cfg(test)]
mod tests {
    use evgrid_model::messages::request_id_from_idempotency_key;

    use super::*;

    #[test]
    fn json_with_parameters_is_json() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON;charset=UTF-8",
            " application/json ",
        ] {
            assert!(check_content_type(Some(ok)).is_ok(), "{ok}");
        }
        for bad in [
            None,
            Some(""),
            Some("text/plain"),
            Some("application/jsonx"),
            Some("application/x-www-form-urlencoded"),
            Some("application/problem+json"),
        ] {
            assert!(
                matches!(
                    check_content_type(bad),
                    Err(ApiError::UnsupportedMediaType { .. })
                ),
                "{bad:?}"
            );
        }
    }

    fn chunks(parts: &[&[u8]]) -> impl Stream<Item = Result<Bytes, warp::Error>> + use<> {
        let parts: Vec<Result<Bytes, warp::Error>> = parts
            .iter()
            .map(|p| Ok(Bytes::copy_from_slice(p)))
            .collect();
        futures::stream::iter(parts)
    }

    #[tokio::test]
    async fn the_body_limit_holds_for_declared_and_chunked_bodies() {
        let limit = vec![b'x'; BODY_LIMIT_BYTES];
        let body = read_body(Some(limit.len() as u64), chunks(&[&limit]))
            .await
            .unwrap();
        assert_eq!(body.len(), BODY_LIMIT_BYTES);
        let half = &limit[..BODY_LIMIT_BYTES / 2];
        assert_eq!(read_body(None, chunks(&[half, half])).await.unwrap(), limit);
        assert!(matches!(
            read_body(Some(BODY_LIMIT_BYTES as u64 + 1), chunks(&[])).await,
            Err(ApiError::TooLarge)
        ));
        assert!(matches!(
            read_body(None, chunks(&[half, half, b"y"])).await,
            Err(ApiError::TooLarge)
        ));
        assert!(read_body(None, chunks(&[])).await.unwrap().is_empty());
    }

    fn fresh() -> Uuid {
        Uuid::from_u128(1)
    }

    #[test]
    fn the_header_names_the_id_then_the_body_then_a_new_one() {
        let body = Uuid::from_u128(7);
        assert_eq!(
            resolve_request_id(None, None, request_id_from_idempotency_key, fresh).unwrap(),
            fresh()
        );
        assert_eq!(
            resolve_request_id(None, Some(body), request_id_from_idempotency_key, fresh).unwrap(),
            body
        );
        let key = "order-42";
        let from_key = request_id_from_idempotency_key(key);
        assert_eq!(
            resolve_request_id(Some(key), None, request_id_from_idempotency_key, fresh).unwrap(),
            from_key
        );
        assert_eq!(
            resolve_request_id(
                Some(&body.to_string()),
                Some(body),
                request_id_from_idempotency_key,
                fresh
            )
            .unwrap(),
            body
        );
    }

    #[test]
    fn contradicting_or_empty_keys_are_field_errors() {
        use evgrid_model::validate::RequestError;
        let field = |r: Result<Uuid, ApiError>| match r {
            Err(ApiError::Request(RequestError::Invalid(errors))) => errors[0].field.clone(),
            other => panic!("expected a field error, got {other:?}"),
        };
        assert_eq!(
            field(resolve_request_id(
                Some("order-42"),
                Some(Uuid::from_u128(7)),
                request_id_from_idempotency_key,
                fresh
            )),
            "request_id"
        );
        assert_eq!(
            field(resolve_request_id(
                Some("  "),
                None,
                request_id_from_idempotency_key,
                fresh
            )),
            "Idempotency-Key"
        );
        assert_eq!(
            field(resolve_request_id(
                Some(&"k".repeat(256)),
                None,
                request_id_from_idempotency_key,
                fresh
            )),
            "Idempotency-Key"
        );
    }
}
