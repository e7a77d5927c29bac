"""The KHO preserved-memory radix tree: keys, a validating walker, and a builder.

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
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

from .memory import MemoryReadError, Reader
from .versions import kho_abi, page_shift

__all__ = [
    "RadixGeometry",
    "geometry",
    "encode_key",
    "decode_key",
    "RadixWalk",
    "walk_radix",
    "RadixBuilder",
    "split_pages",
    "coalesce",
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


def encode_key(g: RadixGeometry, pa: int, order: int) -> int:
    """kho_radix_encode_key(): the key of a block of 2^order pages at physical `pa`.

    >>> hex(encode_key(geometry(4096), 0x1000, 0))
    '0x10000000000001'
    """
    if not 0 <= order <= g.order0:
        raise ValueError(f"order {order} out of range 0..{g.order0}")
    if order < g.min_order:
        # kho-v2/v3 sized the tree without the order bit: on 16 KiB pages an order-0
        # key needs one level more than it has (fixed by kho-v4's depth formula).
        raise ValueError(f"{g.compatible} with {g.page_size}-byte pages cannot hold "
                         f"order-{order} blocks (tree depth {g.depth})")
    if pa < 0 or pa > _MASK64 or pa % (g.page_size << order):
        raise ValueError(f"physical address 0x{pa:x} not aligned to order {order}")
    return (1 << (g.order0 - order)) | (pa >> (g.page_shift + order))


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

    def to_json(self) -> dict:
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


def split_pages(pfn: int, nr_pages: int) -> Iterator[tuple[int, int]]:
    """(pfn, order) blocks kho_preserve_pages() records for a contiguous page range
    (__kho_preserve_pages_order(): the largest naturally aligned block that fits)."""
    end = pfn + nr_pages
    while pfn < end:
        tz = (pfn & -pfn).bit_length() - 1 if pfn else 63
        order = min(tz, (end - pfn).bit_length() - 1)
        yield pfn, order
        pfn += 1 << order


def coalesce(blocks: Iterable[tuple[int, int]], page_size: int) -> list[list[int]]:
    """Coalesce (pa, order) blocks (any order) into sorted [pa, order, count] runs."""
    out: list[list[int]] = []
    for pa, order in sorted(blocks, key=lambda b: (-b[1], b[0])):
        size = page_size << order
        if out and out[-1][1] == order and out[-1][0] + out[-1][2] * size == pa:
            out[-1][2] += 1
        else:
            out.append([pa, order, 1])
    return out


class RadixBuilder:
    """Builds a tree exactly as kho_radix_add_page() does, into pages from `alloc`.

    alloc() returns the physical address of a fresh zeroed page; node contents live in
    `self.nodes` ({phys: bytearray}) until the caller writes them out (see write_to).
    """

    def __init__(self, g: RadixGeometry, alloc: Callable[[], int]) -> None:
        self.g = g
        self._alloc = alloc
        self.root = alloc()
        self.nodes: dict[int, bytearray] = {self.root: bytearray(g.page_size)}

    def _new_node(self) -> int:
        phys = self._alloc()
        if phys % self.g.page_size or phys in self.nodes:
            raise ValueError(f"allocator returned bad node page 0x{phys:x}")
        self.nodes[phys] = bytearray(self.g.page_size)
        return phys

    def _leaf_for(self, key: int, create: bool) -> Optional[bytearray]:
        g = self.g
        node = self.root
        for level in range(g.depth - 1, 0, -1):
            idx = (key >> g.shift(level)) & ((1 << g.table_log2) - 1)
            buf = self.nodes[node]
            child = int.from_bytes(buf[idx * 8:idx * 8 + 8], "little")
            if not child:
                if not create:
                    return None
                child = self._new_node()
                buf[idx * 8:idx * 8 + 8] = child.to_bytes(8, "little")
            node = child
        return self.nodes[node]

    def add(self, pa: int, order: int) -> None:
        """Preserve the block of 2^order pages at `pa` (kho_radix_add_page)."""
        key = encode_key(self.g, pa, order)
        leaf = self._leaf_for(key, create=True)
        assert leaf is not None
        bit = key & ((1 << self.g.bitmap_log2) - 1)
        leaf[bit >> 3] |= 1 << (bit & 7)

    def remove(self, pa: int, order: int) -> None:
        """Unpreserve a block (kho_radix_del_page: nodes are never freed)."""
        key = encode_key(self.g, pa, order)
        leaf = self._leaf_for(key, create=False)
        if leaf is not None:
            bit = key & ((1 << self.g.bitmap_log2) - 1)
            leaf[bit >> 3] &= ~(1 << (bit & 7)) & 0xFF

    def add_run(self, pa: int, order: int, count: int) -> None:
        """Preserve `count` consecutive blocks of one order, a leaf at a time."""
        g = self.g
        size = g.page_size << order
        bits_per_leaf = 1 << g.bitmap_log2
        while count > 0:
            key = encode_key(g, pa, order)
            bit = key & (bits_per_leaf - 1)
            n = min(count, bits_per_leaf - bit)
            leaf = self._leaf_for(key, create=True)
            assert leaf is not None
            v = int.from_bytes(leaf, "little") | (((1 << n) - 1) << bit)
            leaf[:] = v.to_bytes(len(leaf), "little")
            pa += n * size
            count -= n

    def add_pages(self, pfn: int, nr_pages: int) -> None:
        """kho_preserve_pages(): a contiguous range of order-0 pages, split into blocks."""
        for p, order in split_pages(pfn, nr_pages):
            self.add(p << self.g.page_shift, order)

    def write_to(self, write: Callable[[int, bytes], None]) -> None:
        """Write every node page through `write(phys, data)`."""
        for phys, buf in self.nodes.items():
            write(phys, bytes(buf))
