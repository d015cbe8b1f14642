"""OCPP 2.0.1 charging stations written with a client no one here wrote: the `ocpp` package
(PyPI, its v201 module) over `websockets`, both pinned in scripts/install-test-deps. They
drive a substation run with `--chargers ocpp` (substation/tests/sessions/ocpp.rs).

    python3 stations.py URL CONFIG_JSON

CONFIG_JSON: {"stations": [{"id", "password", "behaviour", "walk_in"}], "time_scale",
"meter_interval", "max_w", "done_after"}. Each station boots and reports its connector; a car
arrives for every ReserveNow (with the reservation's idToken) or at once with `walk_in` as its
idToken; the car authorizes, starts a transaction and reports its meter (energy register and
power, in TransactionEvents; a walk-in's in MeterValues) every `meter_interval` seconds, drawing
the limit in force (its default until it has its own, the station's most without either). Behaviours: `obey`; `ignore` (draws its most whatever it is told, and says Accepted);
`drop` (closes its connection once mid-transaction and reconnects, carrying on). A walk-in car
needs 5 kWh and ends its transaction itself when full; a reserved car charges until the CSMS
stops it. Every limit received, transaction started and ended is printed as a JSON line with a
monotonic time `t`; the script exits once `done_after` transactions have ended.
"""

import asyncio
import base64
import json
import sys
import time
from datetime import datetime, timezone

import websockets
from ocpp.routing import on
from ocpp.v201 import ChargePoint, call, call_result

WALK_IN_NEED_WH = 5000.0


def say(**fields):
    fields["t"] = time.monotonic()
    print(json.dumps(fields), flush=True)


def now():
    return datetime.now(timezone.utc).isoformat()


class Station(ChargePoint):
    def __init__(self, sid, ws, fleet):
        super().__init__(sid, ws)
        self.fleet = fleet
        self.sid = sid

    @on("SetChargingProfile")
    async def on_set_charging_profile(self, evse_id, charging_profile, **kwargs):
        state = self.fleet.state[self.sid]
        schedule = charging_profile["charging_schedule"][0]
        limit = schedule["charging_schedule_period"][0]["limit"]
        if schedule["charging_rate_unit"] == "A":
            limit = limit * 230.0 * schedule["charging_schedule_period"][0].get("number_phases", 3)
        purpose = charging_profile["charging_profile_purpose"]
        if purpose == "TxProfile":
            state["limit_w"] = limit
        else:
            state["default_w"] = limit
        say(station=self.sid, limit_w=limit, purpose=purpose,
            transaction=charging_profile.get("transaction_id"))
        return call_result.SetChargingProfile(status="Accepted")

    @on("ClearChargingProfile")
    async def on_clear_charging_profile(self, **kwargs):
        return call_result.ClearChargingProfile(status="Accepted")

    @on("ReserveNow")
    async def on_reserve_now(self, id, expiry_date_time, id_token, **kwargs):
        state = self.fleet.state[self.sid]
        if state["car"] is not None:
            return call_result.ReserveNow(status="Occupied")
        say(station=self.sid, reserved=id_token["id_token"], token=id_token["id_token"])
        state["car"] = {"token": id_token["id_token"], "need_wh": None}
        return call_result.ReserveNow(status="Accepted")

    @on("CancelReservation")
    async def on_cancel_reservation(self, reservation_id, **kwargs):
        return call_result.CancelReservation(status="Accepted")

    @on("RequestStopTransaction")
    async def on_request_stop(self, transaction_id, **kwargs):
        state = self.fleet.state[self.sid]
        if state.get("tx") != transaction_id:
            return call_result.RequestStopTransaction(status="Rejected")
        state["stop"] = True
        say(station=self.sid, stop_requested=transaction_id)
        return call_result.RequestStopTransaction(status="Accepted")


class Fleet:
    def __init__(self, url, config):
        self.url = url
        self.config = config
        self.state = {}
        self.ended = 0
        self.done = asyncio.Event()

    async def connect(self, spec):
        token = base64.b64encode(f"{spec['id']}:{spec['password']}".encode()).decode()
        try:
            ws = await websockets.connect(
                f"{self.url}/ocpp/{spec['id']}",
                subprotocols=["ocpp2.0.1"],
                additional_headers={"Authorization": f"Basic {token}"},
            )
        except websockets.exceptions.InvalidStatus as e:
            say(station=spec["id"], refused=e.response.status_code)
            return None, None
        cp = Station(spec["id"], ws, self)
        task = asyncio.create_task(cp.start())
        return cp, task

    async def run_station(self, spec):
        sid = spec["id"]
        self.state[sid] = {"car": None, "limit_w": None, "default_w": None, "tx": None}
        cp, task = await self.connect(spec)
        if cp is None:
            return
        await cp.call(call.BootNotification(
            charging_station={"model": "Wallbox 22", "vendor_name": "evgrid-test"},
            reason="PowerUp"))
        await cp.call(call.StatusNotification(
            timestamp=now(), connector_status="Available", evse_id=1, connector_id=1))
        say(station=sid, booted=True)
        state = self.state[sid]
        if spec.get("walk_in"):
            state["car"] = {"token": spec["walk_in"], "need_wh": WALK_IN_NEED_WH}
        while state["car"] is None:
            if self.done.is_set():
                return
            await asyncio.sleep(0.02)
        car = state["car"]
        await asyncio.sleep(0.1)  # the driver walks up and plugs in
        id_token = {"id_token": car["token"], "type": "Central"}
        await cp.call(call.StatusNotification(
            timestamp=now(), connector_status="Occupied", evse_id=1, connector_id=1))
        await cp.call(call.Authorize(id_token=id_token))
        tx = f"{sid}-tx"
        state["tx"] = tx
        seq = 0
        energy = 0.0
        max_w = self.config["max_w"]

        async def event(kind, trigger, power, cp, **extra):
            nonlocal seq
            stamp = now()
            await cp.call(call.TransactionEvent(
                event_type=kind, timestamp=stamp, trigger_reason=trigger, seq_no=seq,
                transaction_info={"transaction_id": tx, **extra},
                id_token=id_token if kind == "Started" else None,
                evse={"id": 1, "connector_id": 1},
                meter_value=[{"timestamp": stamp, "sampled_value": [
                    {"value": energy},
                    {"value": power, "measurand": "Power.Active.Import",
                     "unit_of_measure": {"unit": "W"}},
                ]}]))
            seq += 1

        await event("Started", "Authorized", 0.0, cp)
        say(station=sid, started=tx, token=car["token"])
        if car["need_wh"] is not None:
            departure = datetime.fromtimestamp(time.time() + 60, timezone.utc).isoformat()
            await cp.call(call.NotifyEVChargingNeeds(
                evse_id=1, charging_needs={
                    "requested_energy_transfer": "AC_three_phase",
                    "departure_time": departure,
                    "ac_charging_parameters": {
                        "energy_amount": int(car["need_wh"]), "ev_min_current": 6,
                        "ev_max_current": 32, "ev_max_voltage": 400}}))
        interval = self.config["meter_interval"]
        dropped = False
        ticks = 0
        while True:
            await asyncio.sleep(interval)
            ticks += 1
            if spec["behaviour"] == "ignore":
                power = max_w
            else:
                limit = state["limit_w"]
                if limit is None:
                    limit = state["default_w"] if state["default_w"] is not None else max_w
                power = min(limit, max_w)
            if car["need_wh"] is not None:
                power = min(power, (car["need_wh"] - energy) * 3600.0 / (interval * self.config["time_scale"]))
            energy += power * interval * self.config["time_scale"] / 3600.0
            if spec["behaviour"] == "drop" and not dropped and ticks == 3:
                dropped = True
                task.cancel()
                await cp._connection.close()
                say(station=sid, dropped=True)
                await asyncio.sleep(0.3)
                cp, task = await self.connect(spec)
                say(station=sid, reconnected=True)
            full = car["need_wh"] is not None and energy >= car["need_wh"] - 1e-6
            if state.get("stop") or full:
                reason = "Remote" if state.get("stop") else "EVDisconnected"
                await event("Ended", "RemoteStop" if state.get("stop") else "EVDeparted",
                            0.0, cp, stopped_reason=reason)
                say(station=sid, ended=tx, energy_wh=energy, token=car["token"])
                break
            if car["need_wh"] is None:
                await event("Updated", "MeterValuePeriodic", power, cp)
            else:
                # Walk-ins report through MeterValues, the other way stations send readings.
                stamp = now()
                await cp.call(call.MeterValues(evse_id=1, meter_value=[{
                    "timestamp": stamp, "sampled_value": [
                        {"value": energy},
                        {"value": power, "measurand": "Power.Active.Import",
                         "unit_of_measure": {"unit": "W"}}]}]))
            say(station=sid, power_w=power)
        self.ended += 1
        if self.ended >= self.config["done_after"]:
            self.done.set()
        await self.done.wait()
        task.cancel()
        await cp._connection.close()


async def main(url, config):
    config = json.loads(config)
    fleet = Fleet(url, config)
    await asyncio.gather(*(fleet.run_station(s) for s in config["stations"]))
    say(finished=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
