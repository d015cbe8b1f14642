"""Schemathesis hooks for ingest/tests/api/fuzz.rs.

Two rules of POST /v1/charge-requests span more than one value, so OpenAPI cannot express them,
and schema-valid cases that break them are left out rather than reported as "valid data
rejected" (each has its own test in post.rs):
- a body `request_id` and an `Idempotency-Key` header must name the same request (422);
- a `departure` must be in the future (422), which a schema cannot say of a date-time.
"""

from datetime import datetime, timezone

import schemathesis


def _in_the_past(value):
    if not isinstance(value, str):
        return False
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return False
    if when.tzinfo is None:
        return False
    return when <= datetime.now(timezone.utc)


@schemathesis.hook
def filter_case(ctx, case):
    headers = case.headers or {}
    body = case.body if isinstance(case.body, dict) else {}
    has_key = any(name.lower() == "idempotency-key" for name in headers)
    if has_key and body.get("request_id") is not None:
        return False
    return not _in_the_past(body.get("departure"))
