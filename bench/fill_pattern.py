#!/usr/bin/env python3
"""fill_pattern throughput: GB/s of the seeded, page-stamped workload pattern.

Baselines, in the same process:
- memory: `block * reps`, one allocation and one write of the same number of bytes --
  what producing any fresh bytes object of that size costs here (page faults + memcpy).
- page loop: the pattern as it was built before issue 14 (repeat the block, copy it to a
  bytearray, stamp every page with struct.pack_into, copy back to bytes), kept here as
  the reference the bytes must equal.
Issue 14 target: the pattern at memory speed (fill/memory close to 1x).
"""

from __future__ import annotations

import os
import random
import struct
import sys
import time

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "agent")]

from kho_agent.workload import fill_pattern  # noqa: E402


def page_loop(token: int, seed: int, size: int, page_size: int = 4096) -> bytes:
    """fill_pattern before issue 14: one struct.pack_into per page."""
    block = random.Random(seed).randbytes(1 << 20)
    data = bytearray(block * -(-size // len(block)))
    del data[size:]
    stamp = struct.Struct("<QQ")
    for i in range(size // page_size):
        stamp.pack_into(data, i * page_size, token, i)
    return bytes(data)


def _best(fn, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t)
        del res
    return best


def run(size: int, page_size: int = 4096) -> None:
    block = random.Random(1).randbytes(1 << 20)
    reps = -(-size // len(block))
    assert fill_pattern(0x1001, 1, size, page_size) == page_loop(0x1001, 1, size, page_size)
    t_mem = _best(lambda: block * reps)
    t_old = _best(lambda: page_loop(0x1001, 1, size, page_size), 3)
    t_new = _best(lambda: fill_pattern(0x1001, 1, size, page_size))
    gb = size / 1e9
    print(f"{size >> 20:>5} MiB {page_size >> 10:>3}K pages | memory {gb / t_mem:5.2f} GB/s | "
          f"page loop {gb / t_old:5.2f} GB/s | fill_pattern {gb / t_new:5.2f} GB/s "
          f"({t_new * 1e3:7.1f} ms) | fill/memory {t_new / t_mem:4.2f}x | "
          f"speedup {t_old / t_new:4.1f}x")


if __name__ == "__main__":
    print(f"python {sys.version.split()[0]}; best of 5 (page loop: 3); "
          f"load {os.getloadavg()[0]:.2f}")
    run(64 << 20)
    run(256 << 20)
    run(256 << 20, 65536)
