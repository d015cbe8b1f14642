"""Schemathesis hooks for ingest/tests/api/fuzz.rs.

Two rules of POST /v1/charge-requests span more than one value, so OpenAPI cannot express them,
and schema-valid cases that break them are left out rather than reported as "valid data
rejected" (each has its own test in post.rs):
- a body `request_id` and an `Idempotency-Key` header must name the same request (422);
- a `departure` must be in the future and at most 156 h ahead (the longest stay), and without
  a departure `energy_kwh / max_power_kw` must be at most 156 h (422), which a schema cannot say.
"""

from datetime import datetime, timedelta, timezone

import schemathesis

# model/src/validate.rs MAX_STAY.
LONGEST_STAY = timedelta(hours=156)


def _outside_the_stay(body):
    value = body.get("departure")
    if value is None:
        energy, power = body.get("energy_kwh"), body.get("max_power_kw")
        if isinstance(energy, (int, float)) and isinstance(power, (int, float)) and power > 0:
            return energy / power > LONGEST_STAY.total_seconds() / 3600
        return False
    if not isinstance(value, str):
        return False
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return False
    if when.tzinfo is None:
        return False
    now = datetime.now(timezone.utc)
    # A minute of slack at the far end: the case is sent a little after it is filtered.
    return when <= now or when > now + LONGEST_STAY - timedelta(minutes=1)


@schemathesis.hook
def filter_case(ctx, case):
    headers = case.headers or {}
    body = case.body if isinstance(case.body, dict) else {}
    has_key = any(name.lower() == "idempotency-key" for name in headers)
    if has_key and body.get("request_id") is not None:
        return False
    return not _outside_the_stay(body)
