#!/usr/bin/env python3
"""Workload verification throughput: the agent's memfd check (mmap + sha256) in GB/s per core.

Baseline in the same process: hashlib.sha256 over the same bytes already in memory.
Target (issue 3): >= 1 GB/s per core; the ratio says what the memfd path costs on top.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "agent")]

from kho_agent.workload import fill_pattern, hash_fd, make_memfd  # noqa: E402


def best(fn, repeat: int = 3) -> float:
    t = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def main(mib: int = 512) -> None:
    size = mib << 20
    data = fill_pattern(1, 1, size)
    fd = make_memfd("bench", data)
    try:
        want = hashlib.sha256(data).hexdigest()
        assert hash_fd(fd, size) == want
        t_base = best(lambda: hashlib.sha256(data).digest())
        t_agent = best(lambda: hash_fd(fd, size))
    finally:
        os.close(fd)
    gb = size / 1e9
    print(f"{mib} MiB memfd, best of 3, one core")
    print(f"  hashlib.sha256 on bytes in memory : {gb / t_base:6.2f} GB/s")
    print(f"  agent verify (preadv memfd + sha256): {gb / t_agent:6.2f} GB/s   "
          f"ratio to hashlib {t_base / t_agent:5.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 512)
