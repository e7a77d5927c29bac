#!/usr/bin/env python3
"""Radix-tree walk throughput: pages/s for dense and sparse trees read through an ELF core.

Baseline, in the same process and from the same file: merely reading every node page of
the tree (what any walker must at least do). Prints pages/s, blocks/s and the ratio
walk time / read time. Targets (issue 2): >= 50 M pages/s dense, >= 5 M pages/s sparse.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "agent")]

from kho_agent.abi.encode.radix import RadixBuilder  # noqa: E402
from kho_agent.abi.memory import SparseMemory  # noqa: E402
from kho_agent.abi.radix import geometry, walk_radix  # noqa: E402
from kho_agent.physmem import ElfCore, write_elf_core  # noqa: E402


def _best(fn, repeat: int = 5) -> tuple[float, object]:
    best, res = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t)
    return best, res


def run(name: str, build, page_size: int = 4096) -> None:
    g = geometry(page_size, "kho-v4")
    mem = SparseMemory(1 << 46, page_size)
    tree = RadixBuilder(g, mem.alloc_page)
    build(tree)
    tree.write_to(mem.write)
    with tempfile.TemporaryDirectory() as d:
        core = os.path.join(d, "tree.core")
        write_elf_core(core, ((p, bytes(b)) for p, b in tree.nodes.items()))
        with ElfCore(core) as src:
            nodes = list(tree.nodes)
            t_read, _ = _best(lambda: [src.read(p, page_size) for p in nodes])
            t_walk, w = _best(lambda: walk_radix(src.read, tree.root, g))
    assert w.intact, w.errors
    pages = sum(n << int(o) for o, n in w.pages_by_order.items())
    blocks = sum(w.pages_by_order.values())
    print(f"{name:<34} {pages:>10,} pages {blocks:>9,} blocks {w.nodes:>6} nodes | "
          f"walk {t_walk * 1e3:8.2f} ms  {pages / t_walk / 1e6:9.1f} M pages/s  "
          f"{blocks / t_walk / 1e6:6.2f} M blocks/s | read-only {t_read * 1e3:7.2f} ms  "
          f"walk/read {t_walk / t_read:6.1f}x")


def dense(tree: RadixBuilder) -> None:
    tree.add_run(4 << 30, 0, 4 << 20)           # 4 M contiguous order-0 pages (16 GiB)


def sparse_folios(tree: RadixBuilder) -> None:
    # 2 MiB THP folios (order 9) and 64 KiB mTHP (order 4) scattered over 4 TiB
    rng = random.Random(7)
    for _ in range(20000):
        order = rng.choice((9, 9, 4))
        size = 4096 << order
        tree.add(rng.randrange(0, 4 << 40) // size * size, order)


def sparse_pages(tree: RadixBuilder) -> None:
    # worst case: isolated order-0 pages, one in 64, over 32 GiB
    rng = random.Random(8)
    for i in range(0, 8 << 20, 64):
        tree.add((i + rng.randrange(64)) * 4096, 0)


if __name__ == "__main__":
    print(f"python {sys.version.split()[0]}; best of 5; reader: ElfCore (mmap)")
    run("dense: 4M order-0 pages", dense)
    run("sparse: scattered THP/mTHP folios", sparse_folios)
    run("sparse: isolated order-0 pages", sparse_pages)
