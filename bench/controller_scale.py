#!/usr/bin/env python3
"""Controller overhead at fleet scale: N hosts that answer every agent step instantly.

10,000 real twins would be 10,000 server processes; what this measures is the
controller's own work per host -- state transitions committed to SQLite, the thread pool,
metrics, host and fleet reports -- with hosts that cost nothing ("instant hosts": canned
agent answers, zero boot delay). Prints CPU per host and peak RSS.
Targets (issue 4): <= 5 ms CPU per host, <= 1 GB peak RSS, at 10,000 hosts, max_parallel 500.
Baseline in the same process: the same hosts through the state machine alone (no engine).
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from typing import Any, Optional

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", p) for p in ("agent", "controller")]

import yaml  # noqa: E402

from kho_fleet.hostaccess import AgentCall, HostAccess  # noqa: E402
from kho_fleet.metrics import RolloutMetrics  # noqa: E402
from kho_fleet.rollout import Rollout, RolloutOptions  # noqa: E402
from kho_fleet.statedb import StateDB  # noqa: E402
from kho_fleet.transport import LocalTransport  # noqa: E402


def _report(host: str) -> dict:
    return {"schema": "kho-fleet/handover-report/v1", "host": host, "handover_id": "b",
            "result": "success", "failure": None,
            "kernel": {"from": {"release": "7.2.13", "kho_compatible": "kho-v4"},
                       "to": {"release": "7.2.14", "kho_compatible": "kho-v4"}},
            "radix": {"snapshot": {"root": 1}, "incoming": {"intact": False}},
            "workloads": [{"session": "vm", "token": 1, "size": 1 << 20, "verified": True,
                           "pfns_identical": True}],
            "downtime": {"blackout_s": 1.0}}


class InstantHost(HostAccess):
    """A host whose agent answers at once; boots take no time."""

    def __init__(self, host: Any) -> None:
        super().__init__(host, LocalTransport(host.name))
        self.boot = 0

    def push(self, local: str) -> str:
        return local

    def agent(self, step: str, *args: str, timeout: float = 300.0) -> AgentCall:
        if step == "kexec":
            self.boot += 1
        out = _report(self.name) if step in ("verify", "report") else {"ok": True, "checks": []}
        return AgentCall(step, 0, out, "", 0.0)

    def boot_marker(self) -> str:
        return str(self.boot)

    def wait_back(self, old_marker: Optional[str], timeout: float) -> float:
        return 0.0


class BenchRollout(Rollout):
    def _access(self, name: str) -> HostAccess:
        return InstantHost(self.inv.hosts[name])


def write_inputs(d: str, n: int, parallel: int) -> tuple[str, str]:
    """An inventory of `n` local hosts h00000.. and a canary + rest playbook, in `d`."""
    import hashlib
    inv = os.path.join(d, "inv.yaml")
    with open(inv, "w") as f:
        yaml.safe_dump({"all": {"vars": {"kho_transport": "local"},
                                "hosts": {f"h{i:05d}": None for i in range(n)}}}, f)
    kernel = os.path.join(d, "vmlinuz")
    with open(kernel, "wb") as f:
        f.write(b"k")
    pb = os.path.join(d, "pb.yaml")
    with open(pb, "w") as f:
        yaml.safe_dump({"name": "scale", "hosts": "all",
                        "target": {"kernel": kernel, "sha256": hashlib.sha256(b"k").hexdigest()},
                        "stages": [{"name": "canary", "hosts": 1},
                                   {"name": "rest", "hosts": "rest", "max_parallel": parallel,
                                    "gate": {"min_success_ratio": 0.99}}]}, f)
    return inv, pb


def main(n: int, parallel: int) -> None:
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="kho-scale-", dir=shm) as d:
        inv, pb = write_inputs(d, n, parallel)
        opts = RolloutOptions(os.path.join(d, "rollouts"), os.path.join(d, "reports"))
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        ro = BenchRollout.start(pb, inv, opts)
        ro.metrics = RolloutMetrics(ro.id, "scale", "7.2.14")
        fleet = ro.run()
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        assert fleet["rollout"]["status"] == "completed", fleet["rollout"]
        cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        # baseline: the same per-host transitions straight into a StateDB
        db = StateDB.create(os.path.join(d, "base"), playbook_path=pb, inventory_path=inv,
                            stages=[("all", [f"h{i:05d}" for i in range(n)])])
        b0 = resource.getrusage(resource.RUSAGE_SELF)
        for i in range(n):
            for st in ("preflight", "staged", "preserved", "snapshotted", "kexec_requested",
                       "kexec_sent", "up", "verified", "reported"):
                db.transition(f"h{i:05d}", st)
        b1 = resource.getrusage(resource.RUSAGE_SELF)
        base = (b1.ru_utime + b1.ru_stime) - (b0.ru_utime + b0.ru_stime)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{n} instant hosts, max_parallel {parallel}: rollout {wall:.1f}s wall")
    print(f"  controller CPU {cpu:.1f}s = {cpu / n * 1e3:.2f} ms per host (target <= 5 ms); "
          f"peak RSS {peak:.0f} MiB (target <= 1024)")
    print(f"  baseline, state transitions alone: {base / n * 1e3:.2f} ms per host "
          f"(engine/baseline {cpu / base:.1f}x)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10000,
         int(sys.argv[2]) if len(sys.argv) > 2 else 500)
