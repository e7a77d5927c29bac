#!/usr/bin/env python3
"""The agent's own time between `kexec --yes` and `kexec -e`, with N MiB of workloads.

One full handover on a digital-twin host (real agent processes); prints the agent's
kexec window (journal build + seal into a preserved memfd + disk copy), the other step
times, and the journal size. Target (issue 3): <= 50 ms for 1 GiB of workloads.
Baseline in the same run: the time of a bare `kho-agent status` (process start-up).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", p) for p in ("agent", "controller")]

from kho_fleet.sim.handover import run_agent, run_sim_handover  # noqa: E402


def main(mib: int) -> None:
    with tempfile.TemporaryDirectory(prefix="kho-bench-") as d:
        t0 = time.perf_counter()
        res = run_sim_handover(d, workload_mib=mib, boot_delay=0.2)
        wall = time.perf_counter() - t0
        rep = res.report
        base = min(run_agent(res.root, "status")["seconds"] for _ in range(3))
        journal = os.path.getsize(os.path.join(res.root, "var/lib/kho-agent/journal.json"))
    assert rep["result"] == "success", rep.get("failure")
    print(f"{mib} MiB of workloads on a twin host: handover {rep['result']} in {wall:.1f}s")
    for s in res.steps:
        print(f"  {s['step']:<10} {s['seconds'] * 1e3:9.1f} ms (process)")
    print(f"  agent kexec window (kexec --yes -> kexec -e): {rep['agent_kexec_s'] * 1e3:.1f} ms "
          f"(target <= 50 ms); journal {journal / 1e6:.2f} MB")
    print(f"  baseline: bare agent process (status) {base * 1e3:.1f} ms")
    d = rep["downtime"]
    print(f"  downtime {d['blackout_s']:.3f}s (kexec->kernel {d['kexec_to_kernel_s']:.3f}, "
          f"kernel->agent {d['kernel_to_agent_s']:.3f}, "
          f"agent->restored {d['agent_to_restored_s']:.3f})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1024)
