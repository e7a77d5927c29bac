#!/usr/bin/env python3
"""Workload verification throughput: chunked sha256 digests over 1, 2, 4 threads.

Baseline in the same run: hashlib.sha256 over the same bytes already in memory, on one
core. Target (issue 14): the chunked check of a memfd (chunkdigest.digest_fd: preadv into
per-thread buffers, one sha256 per 2 MiB chunk) at >= 0.8 x cores x that baseline. Also
shown: the previous agent path (one sha256 stream over the memfd, workload.hash_fd) and
the preserve side (digest_bytes: whole-file sha256 + chunk digests of bytes in memory).

    bench/verify_throughput.py [MIB]            # throughput table (default 512 MiB)
    bench/verify_throughput.py --handover MIB   # a twin handover of MIB: step times
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

REPEAT = int(os.environ.get("KHO_BENCH_REPEAT", "3"))

here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(here, "..", "agent"), os.path.join(here, "..", "controller")]

from kho_agent.chunkdigest import (  # noqa: E402
    default_threads,
    digest_bytes,
    digest_fd,
    digest_mapped,
)
from kho_agent.workload import fill_pattern, hash_fd, make_memfd  # noqa: E402


def best(fn: Callable[[], object], repeat: int = REPEAT) -> float:
    t = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def parallel_hashlib(data: bytes, n: int) -> None:
    """hashlib.sha256 over `n` equal slices of `data` in `n` threads: the most the
    machine's cores give right now (other load included), with no file involved."""
    import threading
    mv = memoryview(data)
    step = -(-len(mv) // n)
    ts = [threading.Thread(target=hashlib.sha256, args=(mv[i * step:(i + 1) * step],))
          for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def header() -> str:
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, Python "
            f"{sys.version.split()[0]}, {default_threads()} cores; uptime: {load}")


def throughput(mib: int) -> None:
    size = mib << 20
    data = fill_pattern(1, 1, size)
    fd = make_memfd("bench", data)
    cores = default_threads()
    try:
        want = hashlib.sha256(data).hexdigest()
        assert hash_fd(fd, size) == want
        assert digest_fd(fd, size, whole=True).sha256 == want
        t_base = best(lambda: hashlib.sha256(data).digest())
        t_stream = best(lambda: hash_fd(fd, size))
        assert digest_mapped(fd, size).chunks == digest_fd(fd, size).chunks
        rows = [(n, best(lambda n=n: digest_fd(fd, size, threads=n))) for n in (1, 2, 4)]
        mrows = [(n, best(lambda n=n: digest_mapped(fd, size, threads=n))) for n in (1, 2, 4)]
        t_pre = best(lambda: digest_bytes(data, whole=True))
        t_par = best(lambda: parallel_hashlib(data, cores))
    finally:
        os.close(fd)
    gb = size / 1e9
    base = gb / t_base
    print(header())
    print(f"{mib} MiB memfd, best of {REPEAT}; baseline hashlib.sha256 on bytes in memory, "
          f"one core: {base:.2f} GB/s\n")
    print("| check | GB/s | × hashlib | target (0.8 × min(threads, cores) × hashlib) |")
    print("|---|---|---|---|")
    print(f"| ceiling: hashlib on bytes in memory, {cores} threads (no file) | "
          f"{gb / t_par:.2f} | {t_base / t_par:.2f}× | — |")
    print(f"| one sha256 stream over the memfd (before) | {gb / t_stream:.2f} | "
          f"{t_base / t_stream:.2f}× | — |")
    for n, t in rows:
        target = 0.8 * min(n, cores)
        ok = "met" if t_base / t >= target else "NOT met"
        print(f"| chunk digests, {n} thread{'s' if n > 1 else ''} | {gb / t:.2f} | "
              f"{t_base / t:.2f}× | {target:.1f}×: {ok} |")
    for n, t in mrows:
        target = 0.8 * min(n, cores)
        ok = "met" if t_base / t >= target else "NOT met"
        print(f"| chunk digests in place (mmap), {n} thread{'s' if n > 1 else ''} | "
              f"{gb / t:.2f} | {t_base / t:.2f}× | {target:.1f}×: {ok} |")
    print(f"| preserve side: sha256 + chunk digests of bytes in memory, {cores} threads | "
          f"{gb / t_pre:.2f} | {t_base / t_pre:.2f}× | — |")


def handover(mib: int) -> None:
    from kho_fleet.sim.handover import run_sim_handover
    work = tempfile.mkdtemp(prefix="kho-bench-verify-")
    try:
        r = run_sim_handover(work, workload_mib=mib, boot_delay=0.1, boot_timeout=300)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rep = r.report
    steps = {s["step"]: s["seconds"] for s in r.steps}
    d = rep.get("downtime", {})
    print(header())
    print(f"twin handover of {mib} MiB: {rep.get('result')} {rep.get('failure') or ''}")
    for k in ("preflight", "stage", "preserve", "snapshot", "kexec", "verify", "report"):
        print(f"  agent {k:<9} step: {steps.get(k, float('nan')):7.2f} s")
    ver = (d.get("verified_s") or 0) - (d.get("restored_s") or 0)
    print(f"  blackout (kexec -e -> restored): {d.get('restored_s')} s; "
          f"verify (restored -> verified): {ver:.2f} s")
    print(f"  kexec->kernel {d.get('kexec_to_kernel_s')} s, kernel->agent "
          f"{d.get('kernel_to_agent_s')} s, agent->restored {d.get('agent_to_restored_s')} s")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--handover":
        handover(int(sys.argv[2]))
    else:
        throughput(int(sys.argv[1]) if len(sys.argv) > 1 else 512)
