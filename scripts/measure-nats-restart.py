#!/usr/bin/env python3
"""How long the grid needs to dispatch again after its NATS server is killed (-9) and restarted
with its store: `evgrid up` on a nats-server of our own, requests published at up to 100/s,
kill 5 s in, restart 3 s later; prints the time from the restart to the first dispatch seen on
ev.dispatch.>. Needs nats-py and nats-server (scripts/install-test-deps; run it with that venv's
python). A stand-in until the chaos suite exists.

    scripts/measure-nats-restart.py [PORT] [EVGRID_BINARY]
"""
import asyncio, json, signal, subprocess, sys, tempfile, time, shutil, os
import nats

PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 14222
EVGRID = sys.argv[2] if len(sys.argv) > 2 else "target/debug/evgrid"
WORK = tempfile.mkdtemp(prefix="evgrid-nats-restart-")
STORE = os.path.join(WORK, "store")

def start_nats():
    return subprocess.Popen(["nats-server", "-js", "-a", "127.0.0.1", "-p", str(PORT), "-sd", STORE],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

async def main():
    srv = start_nats(); time.sleep(0.5)
    up = subprocess.Popen([EVGRID, "up", "--nats-url", f"nats://127.0.0.1:{PORT}", "--ingest-listen", "127.0.0.1:0",
                           "--metrics-base-port", "0", "--prometheus-bin", "/nonexistent", "--quiet",
                           "--data-dir", os.path.join(WORK, "up"), "--capacities", "300,300,300"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dispatched = []
    async def on_dispatch(msg):
        dispatched.append(time.monotonic())
    nc = await nats.connect(f"nats://127.0.0.1:{PORT}", max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    await nc.subscribe("ev.dispatch.>", cb=on_dispatch)
    js = nc.jetstream()
    # wait until the grid dispatches
    t_start = time.monotonic()
    while not dispatched and time.monotonic() - t_start < 30:
        try:
            await js.publish("ev.requests", json.dumps({"vehicle_id": "warm", "energy_kwh": 1, "max_power_kw": 7}).encode(), timeout=1)
        except Exception:
            pass
        await asyncio.sleep(0.2)
    assert dispatched, "grid never dispatched"
    t0 = time.monotonic()
    killed_at = restarted_at = None
    sent = 0
    while time.monotonic() - t0 < 25:
        now = time.monotonic() - t0
        if killed_at is None and now >= 5:
            srv.send_signal(signal.SIGKILL); srv.wait(); killed_at = time.monotonic()
        if killed_at and restarted_at is None and time.monotonic() - killed_at >= 3:
            srv = start_nats(); restarted_at = time.monotonic()
        try:
            await asyncio.wait_for(js.publish("ev.requests", json.dumps({"vehicle_id": f"ev-{sent}", "energy_kwh": 2, "max_power_kw": 7}).encode()), 0.05)
            sent += 1
        except Exception:
            pass
        await asyncio.sleep(0.01)
    after = [t for t in dispatched if t > restarted_at]
    first = (after[0] - restarted_at) if after else None
    print(json.dumps({"accepted_during_run": sent, "first_dispatch_after_restart_s": first,
                      "dispatches_after_restart": len(after)}))
    up.send_signal(signal.SIGTERM); up.wait(timeout=20); srv.send_signal(signal.SIGTERM); srv.wait()
    await nc.close()
    shutil.rmtree(WORK, ignore_errors=True)

asyncio.run(main())
