"""The KHO preserved-memory radix tree: geometry, key decoding and a validating walker.

Mirrors `enum kho_radix_consts`, struct kho_radix_node/leaf in
include/linux/kho/abi/kexec_handover.h and kho_radix_{encode,decode}_key(),
kho_radix_add_page(), __kho_radix_walk_tree() in kernel/liveupdate/kexec_handover.c.

Every node is one page. Intermediate nodes hold PAGE_SIZE/8 u64 physical addresses of
their children; leaves (level 0) are bitmaps. A key is `(1 << (ORDER0 - order)) |
(pa >> (PAGE_SHIFT + order))`; the root sits at level DEPTH-1.

The walker reads physical memory through a callable and trusts nothing: each node page is
visited at most once, pointers are checked for alignment and readability, table slots
beyond the key space are rejected, and the walk is bounded. Problems end up in
`RadixWalk.errors` with `intact=False`; the blocks found elsewhere are still reported.
The builder (RadixBuilder, encode_key) is in abi/encode/radix.py: only the twin and tests
build trees.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .memory import MemoryReadError, Reader
from .versions import kho_abi, page_shift

__all__ = [
    "RadixGeometry",
    "geometry",
    "decode_key",
    "RadixWalk",
    "walk_radix",
]

_MASK64 = (1 << 64) - 1
_NONZERO = re.compile(rb"[^\x00]+", re.S)
_ONES = re.compile("1+")
_MAX_ERRORS = 64


@dataclass(frozen=True)
class RadixGeometry:
    """Tree constants for one page size and KHO ABI version (see versions.py)."""

    page_size: int
    page_shift: int
    order0: int        # KHO_ORDER_0_LOG2: position of the order bit for order 0
    table_log2: int    # KHO_TABLE_SIZE_LOG2: log2(slots per intermediate node)
    bitmap_log2: int   # KHO_BITMAP_SIZE_LOG2: log2(bits per leaf)
    depth: int         # KHO_TREE_MAX_DEPTH: intermediate levels + 1 bitmap level
    compatible: str

    @property
    def key_bits(self) -> int:
        """How many key bits the tree can hold: (DEPTH-1)*TABLE_LOG2 + BITMAP_LOG2."""
        return (self.depth - 1) * self.table_log2 + self.bitmap_log2

    @property
    def min_order(self) -> int:
        """Lowest order whose keys fit the tree (kho-v2/v3 on 16 KiB pages: 1, else 0)."""
        return max(0, self.order0 + 1 - self.key_bits)

    def shift(self, level: int) -> int:
        """Key bit where the table index of `level` (>= 1) starts."""
        return (level - 1) * self.table_log2 + self.bitmap_log2


def geometry(page_size: int = 4096, compatible: str = "kho-v4") -> RadixGeometry:
    """The radix constants of `compatible` on `page_size` pages.

    >>> geometry(16384, "kho-v4").depth, geometry(16384, "kho-v3").depth
    (5, 4)
    """
    abi = kho_abi(compatible)
    shift = page_shift(page_size)
    order0 = 64 - shift
    table = (page_size // 8).bit_length() - 1
    bitmap = shift + 3
    span = order0 - bitmap + (1 if abi.depth_plus_one else 0)
    depth = -(-span // table) + 1
    return RadixGeometry(page_size, shift, order0, table, bitmap, depth, compatible)


def decode_key(g: RadixGeometry, key: int) -> tuple[int, int]:
    """kho_radix_decode_key(): (pa, order) of `key` (the order bit is shifted out)."""
    if key <= 0 or key.bit_length() - 1 > g.order0:
        raise ValueError(f"key 0x{key:x} has no valid order bit")
    order = g.order0 - (key.bit_length() - 1)
    return (key << (g.page_shift + order)) & _MASK64, order


@dataclass
class RadixWalk:
    """The result of walking a tree.

    blocks: coalesced [phys, order, count] runs -- `count` consecutive blocks of
    2^order pages starting at `phys`, in key order (higher orders first).
    pages_by_order: number of preserved blocks ("pages" of that order) per order.
    node_pages: physical addresses of every node page read (root first).
    """

    root: int
    geometry: RadixGeometry
    intact: bool = True
    errors: list[str] = field(default_factory=list)
    nodes: int = 0
    node_pages: list[int] = field(default_factory=list)
    blocks: list[list[int]] = field(default_factory=list)
    pages_by_order: dict[int, int] = field(default_factory=dict)
    preserved_bytes: int = 0
    suppressed_errors: int = 0

    def error(self, msg: str) -> None:
        self.intact = False
        if len(self.errors) < _MAX_ERRORS:
            self.errors.append(msg)
        else:
            self.suppressed_errors += 1

    def ranges(self) -> list[tuple[int, int]]:
        """Sorted, merged [start, end) physical byte ranges covered by the blocks."""
        spans = sorted((p, p + c * (self.geometry.page_size << o)) for p, o, c in self.blocks)
        out: list[tuple[int, int]] = []
        for s, e in spans:
            if out and s <= out[-1][1]:
                if e > out[-1][1]:
                    out[-1] = (out[-1][0], e)
            else:
                out.append((s, e))
        return out

    def to_json(self) -> dict[str, Any]:
        """The stable JSON form (docs/inspect-json.md)."""
        errors = list(self.errors)
        if self.suppressed_errors:
            errors.append(f"... and {self.suppressed_errors} more errors")
        return {
            "root": self.root,
            "intact": self.intact,
            "errors": errors,
            "nodes": self.nodes,
            "blocks": [list(b) for b in self.blocks],
            "pages_by_order": {str(o): n for o, n in sorted(self.pages_by_order.items())},
            "preserved_bytes": self.preserved_bytes,
        }


class _Emitter:
    """Coalesces (pa, order, count) runs as the walker finds them, in key order."""

    def __init__(self, walk: RadixWalk) -> None:
        self.walk = walk
        self.ps = walk.geometry.page_size

    def run(self, pa: int, order: int, count: int) -> None:
        w = self.walk
        w.pages_by_order[order] = w.pages_by_order.get(order, 0) + count
        size = self.ps << order
        w.preserved_bytes += count * size
        last = w.blocks[-1] if w.blocks else None
        if last is not None and last[1] == order and last[0] + last[2] * size == pa:
            last[2] += count
        else:
            w.blocks.append([pa, order, count])


def _leaf_runs(leaf: bytes) -> list[tuple[int, int]]:
    """(first_bit, nbits) of every run of set bits in a little-endian bitmap, in order.

    Sparse leaves are scanned a nonzero byte-run at a time (regex over the bytes);
    busy leaves as one binary string (one regex match per run, all in C).
    """
    busy = len(leaf) - leaf.count(0)
    if busy == 0:
        return []
    if busy > 256 and leaf.count(0xFF) != busy:
        bits = format(int.from_bytes(leaf, "little"), "b")[::-1]
        return [(m.start(), m.end() - m.start()) for m in _ONES.finditer(bits)]
    out = []
    for m in _NONZERO.finditer(leaf):
        s, e = m.span()
        seg = m.group()
        if seg.count(0xFF) == e - s:
            out.append((s * 8, (e - s) * 8))
            continue
        v = int.from_bytes(seg, "little")
        base = s * 8
        while v:
            low = v & -v
            start = low.bit_length() - 1
            nxt = v + low                   # carries through the run
            end = (nxt & -nxt).bit_length() - 1
            v &= nxt                        # drop this run
            out.append((base + start, end - start))
    return out


def walk_radix(read: Reader, root: int, g: RadixGeometry, *,
               in_ram: Optional[Callable[[int, int], bool]] = None,
               max_nodes: int = 1 << 20) -> RadixWalk:
    """Walk the tree whose root node is at physical `root`, validating as it goes.

    read: reads physical memory (raises MemoryReadError outside it).
    in_ram: optional check that a preserved block [pa, pa+len) lies in RAM.
    max_nodes: bound on node pages read (the walk stops with an error beyond it).

    Never raises for bad trees: cycles, shared or misaligned nodes, unreadable pointers,
    slots beyond the key space, key-less bits and blocks outside RAM become errors.
    """
    w = RadixWalk(root=root, geometry=g)
    emit = _Emitter(w)
    ps = g.page_size
    slots = ps // 8
    key_bits = min(g.order0 + 1, g.key_bits)  # valid keys are < 2^key_bits
    unpack = struct.Struct(f"<{slots}Q").unpack
    visited: set[int] = set()
    # explicit stack of (phys, level, key prefix, where-from); popped in key order
    stack: list[tuple[int, int, int, str]] = [(root, g.depth - 1, 0, "root")]
    while stack:
        phys, level, prefix, origin = stack.pop()
        what = f"level-{level} node 0x{phys:x} ({origin})"
        if phys % ps:
            w.error(f"{what}: pointer not page-aligned")
            continue
        if phys in visited:
            w.error(f"{what}: page already visited (cycle or shared node)")
            continue
        if w.nodes >= max_nodes:
            w.error(f"{what}: more than {max_nodes} node pages, walk stopped")
            break
        visited.add(phys)
        try:
            page = read(phys, ps)
        except MemoryReadError as e:
            w.error(f"{what}: unreadable ({e})")
            continue
        if len(page) != ps:
            w.error(f"{what}: short read ({len(page)} bytes)")
            continue
        w.nodes += 1
        w.node_pages.append(phys)
        if level == 0:
            _walk_leaf(page, prefix, g, emit, w, in_ram)
            continue
        shift = g.shift(level)
        children: list[tuple[int, int, int, str]] = []
        if page.count(0) != ps:
            for idx, child in enumerate(unpack(page)):
                if not child:
                    continue
                key = prefix | (idx << shift)
                if key >> key_bits:
                    w.error(f"{what}: slot {idx} points past the key space "
                            f"(depth {g.depth} for {g.compatible})")
                    continue
                children.append((child, level - 1, key, f"slot {idx} of 0x{phys:x}"))
        stack.extend(reversed(children))
    return w


def _walk_leaf(page: bytes, prefix: int, g: RadixGeometry, emit: _Emitter,
               w: RadixWalk, in_ram: Optional[Callable[[int, int], bool]]) -> None:
    """Emit the runs of one leaf bitmap whose keys start at `prefix`."""
    ps = g.page_size
    runs = _leaf_runs(page)
    if not runs:
        return
    if prefix:
        # every key in this leaf shares prefix's order bit: one order for the leaf
        order = g.order0 - (prefix.bit_length() - 1)
        ss = g.page_shift + order
        base = (prefix << ss) & _MASK64
        last_bit, last_n = runs[-1]
        if in_ram is not None and not in_ram(base + (runs[0][0] << ss),
                                             (last_bit + last_n - runs[0][0]) << ss):
            good = []
            for bit, n in runs:
                if in_ram(base + (bit << ss), n << ss):
                    good.append((bit, n))
                else:
                    w.error(f"leaf at key 0x{prefix:x}: blocks 0x{base + (bit << ss):x} "
                            f"(order {order}, {n}) outside RAM")
            runs = good
            if not runs:
                return
        bit0, n0 = runs[0]
        emit.run(base + (bit0 << ss), order, n0)       # may coalesce with the last run
        rest = runs[1:]
        if rest:
            w.blocks.extend([[base + (bit << ss), order, n] for bit, n in rest])
            total = sum(n for _, n in rest)
            w.pages_by_order[order] = w.pages_by_order.get(order, 0) + total
            w.preserved_bytes += total * (ps << order)
        return
    # the lowest leaf mixes (absurdly) high orders; decode bit by bit
    for bit, n in runs:
        for key in range(bit, bit + n):
            if key == 0:
                w.error("leaf 0: bit 0 set, a key without an order bit")
                continue
            pa, order = decode_key(g, key)
            if in_ram is not None and not in_ram(pa, ps << order):
                w.error(f"block 0x{pa:x} order {order} outside RAM")
                continue
            emit.run(pa, order, 1)
