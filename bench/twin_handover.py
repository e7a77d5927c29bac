#!/usr/bin/env python3
"""Where a twin handover's time goes: agent step times, the agent's preserve pieces, and
(--profile) the twin server's cProfile.

Issue 14's target: a twin handover of 1 GiB preserves in <= 3 s and verifies in <= 2 s on
2 cores. The preserve step is the agent (fill pattern, digests, memfd write) plus the twin
(PRESERVE_FD: page-cache placement, the copy into mem.img, the radix tree, the folio
array); verify is the agent's chunk digests after the twin restored every folio.

    bench/twin_handover.py [--mib 1024] [--repeat 1] [--profile DIR] [--pieces] [--tree DIR]

--pieces: the agent's preserve work in this process, on the same sizes (baseline: one
copy of as many bytes in memory, `bytes(data)`, in the same run).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

here = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.join(here, "..")
if "--tree" in sys.argv:        # another checkout's agent/ and controller/ (before/after)
    TREE = sys.argv[sys.argv.index("--tree") + 1]
sys.path[:0] = [os.path.join(TREE, "agent"), os.path.join(TREE, "controller")]

from kho_agent.chunkdigest import default_threads, digest_bytes, digest_fd  # noqa: E402
from kho_agent.workload import MemfdSpec, create_memfd, expected_bytes  # noqa: E402


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def pieces(mib: int) -> None:
    size = mib << 20
    m = MemfdSpec(token=0x1001, size=size, seed=1)
    t_fill = timed(lambda: expected_bytes(m, 4096))
    data = expected_bytes(m, 4096)
    t_copy = timed(lambda: bytes(bytearray(data)))
    t_sha = timed(lambda: hashlib.sha256(data).digest())
    t_dig = timed(lambda: digest_bytes(data, whole=True))
    fds: list[int] = []
    t_memfd = timed(lambda: fds.append(create_memfd("bench", m, data)))
    t_ver = timed(lambda: digest_fd(fds[0], size))
    os.close(fds[0])
    print(f"agent pieces, {mib} MiB, {default_threads()} cores; uptime: {load()}")
    for name, t in (("memory copy (baseline)", t_copy), ("fill pattern", t_fill),
                    ("hashlib.sha256, one core", t_sha),
                    ("digest_bytes (sha256 + chunks)", t_dig),
                    ("create_memfd (write)", t_memfd), ("digest_fd (verify)", t_ver)):
        print(f"  {name:<32} {t:6.2f} s  {size / t / 1e9:5.2f} GB/s  {t / t_copy:5.2f}x copy")


def handover(mib: int, profile: str | None) -> dict[str, float]:
    from kho_fleet.sim.handover import run_sim_handover
    work = tempfile.mkdtemp(prefix="kho-bench-ho-")
    if profile:
        os.makedirs(profile, exist_ok=True)
        os.environ["KHO_TWIN_PROFILE"] = os.path.abspath(profile)
    try:
        r = run_sim_handover(work, workload_mib=mib, boot_delay=0.1, boot_timeout=600)
    finally:
        os.environ.pop("KHO_TWIN_PROFILE", None)
        shutil.rmtree(work, ignore_errors=True)
    rep = r.report
    out = {s["step"]: s["seconds"] for s in r.steps}
    d = rep.get("downtime", {})
    out["blackout"] = d.get("restored_s") or float("nan")
    out["verify_window"] = (d.get("verified_s") or 0) - (d.get("restored_s") or 0)
    out["ok"] = float(rep.get("result") == "success")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--profile", metavar="DIR")
    ap.add_argument("--pieces", action="store_true")
    ap.add_argument("--tree", metavar="DIR", help="agent/ and controller/ of another checkout")
    a = ap.parse_args()
    if a.pieces:
        pieces(a.mib)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, Python "
          f"{sys.version.split()[0]}, twin handover of {a.mib} MiB, tree "
          f"{os.path.abspath(TREE)}")
    for _ in range(a.repeat):
        before = load()
        r = handover(a.mib, a.profile)
        print(f"  load before: {before.split('load average:')[-1].strip()}; after: "
              f"{load().split('load average:')[-1].strip()}")
        print("  " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()))
    if a.profile:
        for f in sorted(os.listdir(a.profile)):
            if f.endswith(".prof"):
                print(f"--- {f}")
                pstats.Stats(os.path.join(a.profile, f)).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
