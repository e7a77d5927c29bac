#!/usr/bin/env python3
"""Radix-tree walk throughput: pages/s for dense and sparse trees read through an ELF core.

Columns, in the same process and from the same file:
- walk: walk_radix() alone -- validation, counts, and the leaves kept in compact form;
- +blocks: walk_radix() and then its `blocks` list ([pa, order, n] per run, what the
  snapshot JSON and the twin consume), so the decoding the walk defers is counted too;
- read: merely reading every node page of the tree (what any walker must at least do);
  printed as the ratio walk time / read time (issue 14 target: <= 20x);
- lists: building as many [pa, order, n] lists as the walk reports blocks, with the
  garbage collector paused as RadixWalk.blocks does (the floor of any walker whose
  output is one list per block), ratio +blocks / lists.
Issue 14 target: isolated order-0 pages >= 10 M pages/s.

--agent DIR walks with the kho_agent package found in DIR instead (e.g. a checkout of an
older version, for before/after figures on the same machine at the same load).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import tempfile
import time
from typing import Callable, TypeVar

_ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
_ARGS.add_argument("--agent", default=os.path.join(os.path.dirname(__file__), "..", "agent"),
                   help="directory holding the kho_agent package to measure")
_ARGS.add_argument("--repeat", type=int, default=7, help="best of N (default 7)")
OPTS = _ARGS.parse_args()
sys.path[:0] = [OPTS.agent]

from kho_agent.abi.encode.radix import RadixBuilder  # noqa: E402
from kho_agent.abi.memory import SparseMemory  # noqa: E402
from kho_agent.abi.radix import geometry, walk_radix  # noqa: E402
from kho_agent.physmem import ElfCore, write_elf_core  # noqa: E402

T = TypeVar("T")


def _best(fn: Callable[[], T], repeat: int) -> tuple[float, T]:
    best, res = float("inf"), None
    for _ in range(repeat):
        res = None                              # free the last result before timing
        t = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t)
    assert res is not None
    return best, res


def run(name: str, build, page_size: int = 4096) -> None:
    g = geometry(page_size, "kho-v4")
    mem = SparseMemory(1 << 46, page_size)
    tree = RadixBuilder(g, mem.alloc_page)
    build(tree, page_size)
    tree.write_to(mem.write)
    with tempfile.TemporaryDirectory() as d:
        core = os.path.join(d, "tree.core")
        write_elf_core(core, ((p, bytes(b)) for p, b in tree.nodes.items()))
        with ElfCore(core) as src:
            nodes = list(tree.nodes)
            t_read, _ = _best(lambda: [src.read(p, page_size) for p in nodes], OPTS.repeat)
            t_walk, w = _best(lambda: walk_radix(src.read, tree.root, g), OPTS.repeat)
            t_full, _ = _best(lambda: walk_radix(src.read, tree.root, g).blocks, OPTS.repeat)
    assert w.intact, w.errors
    n = len(w.blocks)
    gc.disable()                        # as RadixWalk.blocks does while it builds them
    try:
        t_lists, _ = _best(lambda: [[pa, 0, 1] for pa in range(1 << 40, (1 << 40) + n * 4096,
                                                                4096)], OPTS.repeat)
    finally:
        gc.enable()
    pages = sum(n << int(o) for o, n in w.pages_by_order.items())
    blocks = sum(w.pages_by_order.values())
    print(f"{name:<38} {pages:>10,} pages {blocks:>9,} blocks {n:>9,} runs {w.nodes:>5} nodes"
          f" | walk {t_walk * 1e3:8.2f} ms {pages / t_walk / 1e6:8.1f} M pages/s "
          f"walk/read {t_walk / t_read:6.1f}x | +blocks {t_full * 1e3:8.2f} ms "
          f"{pages / t_full / 1e6:8.1f} M pages/s +blocks/read {t_full / t_read:6.1f}x | "
          f"read {t_read * 1e3:6.2f} ms | lists {t_lists * 1e3:6.2f} ms "
          f"+blocks/lists {t_full / t_lists:5.1f}x")


def dense(tree: RadixBuilder, ps: int) -> None:
    tree.add_run(4 << 30, 0, 4 << 20)           # 4 M contiguous order-0 pages


def sparse_folios(tree: RadixBuilder, ps: int) -> None:
    # 2 MiB THP folios (order 9) and 64 KiB mTHP (order 4) scattered over 4 TiB
    rng = random.Random(7)
    for _ in range(20000):
        order = rng.choice((9, 9, 4))
        size = 4096 << order
        tree.add(rng.randrange(0, 4 << 40) // size * size, order)


def sparse_pages(tree: RadixBuilder, ps: int) -> None:
    # worst case: isolated order-0 pages, one in each aligned group of 64, over 8 M pages
    rng = random.Random(8)
    for i in range(0, 8 << 20, 64):
        tree.add((i + rng.randrange(64)) * ps, 0)


def random_pages(tree: RadixBuilder, ps: int) -> None:
    # isolated order-0 pages at random (some neighbours, several per 64-bit word)
    rng = random.Random(9)
    for pfn in rng.sample(range(8 << 20), 1 << 17):
        tree.add(pfn * ps, 0)


if __name__ == "__main__":
    print(f"python {sys.version.split()[0]}; best of {OPTS.repeat}; reader: ElfCore (mmap); "
          f"agent: {os.path.normpath(OPTS.agent)}; load {os.getloadavg()[0]:.2f}")
    run("dense: 4M order-0 pages", dense)
    run("sparse: scattered THP/mTHP folios", sparse_folios)
    run("sparse: isolated order-0 pages", sparse_pages)
    run("sparse: random order-0 pages", random_pages)
    run("sparse: isolated order-0 pages, 64K", sparse_pages, 65536)
