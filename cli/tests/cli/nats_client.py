"""A third-party NATS client (nats-py) using evgrid's NATS contract the way the README's nats CLI
recipes do: watch heartbeats, publish a raw charge request (as `nats pub` would), follow its
session to `completed`, read its state from the key-value bucket, and replay the request stream
from a sequence. Driven by cli/tests/cli/nats_client.rs; prints one JSON line of what it saw.

With evgrid's NATS roles (as `evgrid up` runs them), the request is published as the `client`
user and everything else is read as the `observer`: give each its URL, credentials included
(nats://user:password@host:port).

usage: nats_client.py CLIENT_URL OBSERVER_URL VEHICLE_ID
"""

import asyncio
import json
import sys

import nats
from nats.js.api import ConsumerConfig, DeliverPolicy

TIMEOUT = 30


async def main(client_url, observer_url, vehicle_id):
    client = await nats.connect(client_url)
    nc = await nats.connect(observer_url)
    js = nc.jetstream()
    seen = {}

    # nats sub 'ev.telemetry.*'
    telemetry = await nc.subscribe("ev.telemetry.*")
    heartbeat = json.loads((await telemetry.next_msg(timeout=TIMEOUT)).data)
    seen["heartbeat_fields"] = sorted(heartbeat)

    # nats sub 'ev.sessions.*.completed', then nats pub ev.requests '{...}'
    completed = await nc.subscribe("ev.sessions.*.completed")
    request = {"vehicle_id": vehicle_id, "energy_kwh": 5, "max_power_kw": 11}
    await nc.flush()
    await client.publish("ev.requests", json.dumps(request).encode())
    await client.flush()
    while True:
        event = json.loads((await completed.next_msg(timeout=TIMEOUT)).data)
        if event["vehicle_id"] == vehicle_id:
            break
    seen["completed"] = event

    # The request's state, as GET /v1/charge-requests/{id} serves it: the dispatcher's record
    # names the substation, whose session record (`<id>.<substation>`) is the state from then on.
    bucket = await js.key_value("EV_REQUEST_STATE")
    dispatched = json.loads((await bucket.get(event["request_id"])).value)
    session_key = f'{event["request_id"]}.{dispatched["substation_id"]}'
    seen["state"] = json.loads((await bucket.get(session_key)).value)

    # nats sub --stream EV_REQUESTS --start-sequence 1 ev.requests
    replay = await js.subscribe(
        "ev.requests",
        stream="EV_REQUESTS",
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=1),
    )
    while True:
        msg = await replay.next_msg(timeout=TIMEOUT)
        if json.loads(msg.data).get("vehicle_id") == vehicle_id:
            seen["replayed_sequence"] = msg.metadata.sequence.stream
            break

    await nc.close()
    await client.close()
    print(json.dumps(seen))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
