#!/usr/bin/env python3
"""The twin kernel's own share of a handover, in this process: PRESERVE_FD of a memfd of
MIB, the freeze at kexec (serialize), and RETRIEVE_FD after the reboot, with wall and
CPU seconds (CPU seconds move less than wall time on a shared machine).

    bench/twin_preserve.py [--mib 1024] [--repeat 3] [--tree DIR]

--tree DIR: the `agent` and `controller` directories of another checkout (e.g. `git
archive HEAD agent controller | tar -x -C DIR`) to compare before/after in one run.
Baseline in the same run: one copy of as many bytes from the memfd into fresh memory
(os.preadv into a bytearray), the floor of any copy into the twin's RAM.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

ap = argparse.ArgumentParser()
ap.add_argument("--mib", type=int, default=1024)
ap.add_argument("--repeat", type=int, default=3)
ap.add_argument("--tree", metavar="DIR")
A = ap.parse_args()
base = A.tree or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [os.path.join(base, "agent"), os.path.join(base, "controller")]

from kho_agent.workload import fill_pattern, make_memfd  # noqa: E402
from kho_fleet.sim.twinhost import KernelSpec, TwinHost  # noqa: E402


def clock(fn: Callable[[], object]) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def one(mib: int) -> dict[str, tuple[float, float]]:
    size = mib << 20
    root = tempfile.mkdtemp(prefix="kho-bench-tp-", dir="/tmp")
    out: dict[str, tuple[float, float]] = {}
    fd = make_memfd("bench", fill_pattern(1, 1, size))
    try:
        bufs = [bytearray(size)]
        out["copy (baseline)"] = clock(lambda: os.preadv(fd, bufs, 0))
        bufs.clear()
        h = TwinHost(root, max(256, mib * 3 + 128) << 20, 4096, 0)
        h.boot(KernelSpec("7.2.13-twin"))
        h.device_open()
        s = h.create_session("vm")
        out["PRESERVE_FD"] = clock(lambda: h.preserve_fd(s, 1, fd))
        out["freeze (serialize)"] = clock(h.serialize)
        handoff = h.shutdown()
        out["reboot"] = clock(lambda: h.boot(KernelSpec("7.2.14-twin"), handoff))
        h.device_open()
        got: list[int] = []
        out["RETRIEVE_FD"] = clock(lambda: got.append(
            h.retrieve_fd(h.retrieve_session("vm"), 1)))
        assert os.fstat(got[0]).st_size == size
        assert os.pread(got[0], 1 << 20, size - (1 << 20)) == os.pread(fd, 1 << 20,
                                                                        size - (1 << 20))
        h.mem.map.close()
    finally:
        os.close(fd)
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, Python "
          f"{sys.version.split()[0]}, tree {os.path.abspath(base)}, {A.mib} MiB memfd; "
          f"uptime: {load}")
    runs = [one(A.mib) for _ in range(A.repeat)]
    for k in runs[0]:
        w = min(r[k][0] for r in runs)
        c = min(r[k][1] for r in runs)
        print(f"  {k:<20} best wall {w:6.2f} s   best cpu {c:6.2f} s")
    after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"  uptime after: {after}")


if __name__ == "__main__":
    main()
