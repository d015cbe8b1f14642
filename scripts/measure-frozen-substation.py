#!/usr/bin/env python3
"""A frozen substation must not count the time it was frozen as charging. Runs `evgrid up` (one
substation of 100 kW at --time-scale 3600; nats-server on PATH), posts 20 cars of 10 kWh at 1 kW
(10 simulated hours = 10 s each), SIGSTOPs the evgrid process 2 s later for 10 s, and prints when
the cars complete after the resume: about 5 s (2 s before the freeze, 3 s of it counted), not at
once. Plain Python, no packages.

    scripts/measure-frozen-substation.py [EVGRID_BINARY] [INGEST_PORT]
"""
import json, signal, subprocess, sys, tempfile, time, urllib.request
EVGRID = sys.argv[1] if len(sys.argv) > 1 else "target/debug/evgrid"
PORT = sys.argv[2] if len(sys.argv) > 2 else "18181"
work = tempfile.mkdtemp()
up = subprocess.Popen([EVGRID, "up", "--nats-port", "0", "--ingest-listen", f"127.0.0.1:{PORT}", "--metrics-base-port", "0",
                       "--prometheus-bin", "/nonexistent", "--data-dir", work, "--capacities", "100", "--time-scale", "3600"],
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
base = f"http://127.0.0.1:{PORT}"
def post(i):
    req = urllib.request.Request(base + "/v1/charge-requests", data=json.dumps({"vehicle_id": f"ev-{i}", "energy_kwh": 10, "max_power_kw": 1}).encode(),
                                 headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=5))["request_id"]
def get(rid):
    return json.load(urllib.request.urlopen(f"{base}/v1/charge-requests/{rid}", timeout=5))
deadline = time.time() + 30
while True:
    try:
        urllib.request.urlopen(base + "/readyz", timeout=1); break
    except Exception:
        if time.time() > deadline: raise
        time.sleep(0.2)
time.sleep(2)  # substations heartbeat
ids = [post(i) for i in range(20)]
t0 = time.time()
time.sleep(2)
up.send_signal(signal.SIGSTOP); time.sleep(10); up.send_signal(signal.SIGCONT); resumed = time.time()
done = {}
while len(done) < 20 and time.time() - resumed < 40:
    for rid in ids:
        if rid not in done:
            r = get(rid)
            if r["state"] == "completed":
                done[rid] = (time.time() - resumed, r["energy_delivered_kwh"])
    time.sleep(0.1)
ts = sorted(v[0] for v in done.values())
print(json.dumps({"completed": len(done), "first_after_resume_s": round(ts[0], 2) if ts else None,
                  "last_after_resume_s": round(ts[-1], 2) if ts else None,
                  "posted_to_resume_s": round(resumed - t0, 2)}))
up.send_signal(signal.SIGINT); up.wait(timeout=20)
