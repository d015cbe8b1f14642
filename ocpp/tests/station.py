"""An OCPP 2.0.1 charging station written with a client no one here wrote: the `ocpp` package
(PyPI, its v201 module) over `websockets`, both pinned in scripts/install-test-deps.

    python3 station.py URL STATION_ID PASSWORD SCENARIO

prints one JSON object per step on stdout for the Rust test to check (ocpp/tests/csms.rs).
Scenarios: `boot` (boot, heartbeat, status, an action the CSMS does not implement),
`charge` (boot, authorize the car, and a transaction started, updated and ended with the
energy register's readings),
`no-boot` (a heartbeat before any BootNotification), `connect` (only the connection: how the
CSMS answers it), `no-subprotocol` (connecting without offering ocpp2.0.1).
"""

import asyncio
import base64
import json
import sys
from datetime import datetime, timezone

import websockets
from ocpp.exceptions import OCPPError
from ocpp.v201 import ChargePoint, call


def say(**fields):
    print(json.dumps(fields), flush=True)


async def call_or_error(cp, payload):
    try:
        return await cp.call(payload, suppress=False), None
    except OCPPError as e:
        return None, type(e).__name__


async def main(url, station, password, scenario):
    token = base64.b64encode(f"{station}:{password}".encode()).decode()
    kwargs = {"additional_headers": {"Authorization": f"Basic {token}"}}
    if scenario != "no-subprotocol":
        kwargs["subprotocols"] = ["ocpp2.0.1"]
    try:
        ws = await websockets.connect(f"{url}/ocpp/{station}", **kwargs)
    except websockets.exceptions.InvalidStatus as e:
        say(refused=e.response.status_code)
        return
    say(connected=True, subprotocol=ws.subprotocol)
    if scenario in ("connect", "no-subprotocol"):
        await ws.close()
        return
    cp = ChargePoint(station, ws)
    listener = asyncio.create_task(cp.start())
    if scenario == "charge":
        await cp.call(
            call.BootNotification(
                charging_station={"model": "Wallbox 22", "vendor_name": "evgrid-test"},
                reason="PowerUp",
            )
        )
        token = {"id_token": "ev-ocpp-1", "type": "Central"}
        auth = await cp.call(call.Authorize(id_token=token))
        say(authorize=auth.id_token_info["status"])
        for seq, (kind, trigger, wh) in enumerate(
            [("Started", "Authorized", 0.0), ("Updated", "MeterValuePeriodic", 5000.0),
             ("Ended", "EVDeparted", 10000.0)]
        ):
            now = datetime.now(timezone.utc).isoformat()
            info = {"transaction_id": "tx-1"}
            if kind == "Ended":
                info["stopped_reason"] = "EVDisconnected"
            result = await cp.call(
                call.TransactionEvent(
                    event_type=kind,
                    timestamp=now,
                    trigger_reason=trigger,
                    seq_no=seq,
                    transaction_info=info,
                    id_token=token if kind == "Started" else None,
                    evse={"id": 1, "connector_id": 1},
                    meter_value=[{"timestamp": now, "sampled_value": [{"value": wh}]}],
                )
            )
            say(event=kind, id_token_info=result.id_token_info)
    elif scenario == "no-boot":
        _, error = await call_or_error(cp, call.Heartbeat())
        say(heartbeat_error=error)
    else:
        boot = await cp.call(
            call.BootNotification(
                charging_station={"model": "Wallbox 22", "vendor_name": "evgrid-test"},
                reason="PowerUp",
            )
        )
        say(boot=boot.status, interval=boot.interval)
        beat = await cp.call(call.Heartbeat())
        say(heartbeat=beat.current_time)
        await cp.call(
            call.StatusNotification(
                timestamp=datetime.now(timezone.utc).isoformat(),
                connector_status="Available",
                evse_id=1,
                connector_id=1,
            )
        )
        say(status="sent")
        _, error = await call_or_error(cp, call.DataTransfer(vendor_id="evgrid-test"))
        say(data_transfer_error=error)
    listener.cancel()
    await ws.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
