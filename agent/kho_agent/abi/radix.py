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

The walk keeps each leaf in its compact form (the bitmap page itself, exact: one bit per
block) and counts it with popcount; `RadixWalk.blocks`, one `[pa, order, count]` list per
run, is decoded word by word from those bitmaps the first time it is asked for. Callers
that only need `intact`, `nodes`, `errors` or the counts (scoring candidate trees, the
incoming tree's state) never pay for one Python list per preserved block.

The builder (RadixBuilder, encode_key) is in abi/encode/radix.py: only the twin and tests
build trees.
"""

from __future__ import annotations

import gc
import struct
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import compress
from operator import add, and_, neg, sub, xor
from typing import Any, Callable, Optional, Union

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
_MAX_ERRORS = 64
# part of a walk's result: a leaf to decode (pa of bit 0, order, shift of one bit, bitmap)
# or runs already decoded ([pa, order, count] lists)
_Segment = Union[tuple[int, int, int, bytes], list[list[int]]]


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
    2^order pages starting at `phys`, in key order (higher orders first); decoded from
    the walk's compact leaves on first access, then a plain list.
    pages_by_order: number of preserved blocks ("pages" of that order) per order.
    node_pages: physical addresses of every node page read (root first).
    """

    root: int
    geometry: RadixGeometry
    intact: bool = True
    errors: list[str] = field(default_factory=list)
    nodes: int = 0
    node_pages: list[int] = field(default_factory=list)
    pages_by_order: dict[int, int] = field(default_factory=dict)
    preserved_bytes: int = 0
    suppressed_errors: int = 0
    # what the walk found, in key order: a leaf still to decode (pa of bit 0, order,
    # shift of one bit, bitmap page) or runs already decoded; `blocks` once decoded
    _segments: list[_Segment] = field(default_factory=list, repr=False, compare=False)
    _blocks: Optional[list[list[int]]] = field(default=None, repr=False, compare=False)

    @property
    def blocks(self) -> list[list[int]]:
        """The coalesced [phys, order, count] runs (decoded once, then cached)."""
        if self._blocks is None:
            # one small acyclic list per run: on trees of isolated pages the cyclic
            # collector's passes over them cost as much as building them, so it is
            # paused while they are built and restored (in a finally) right after
            paused = gc.isenabled()
            if paused:
                gc.disable()
            try:
                self._blocks = _decode_segments(self._segments, self.geometry.page_size)
            finally:
                if paused:
                    gc.enable()
            self._segments = []               # the bitmaps are not needed any more
        return self._blocks

    def __eq__(self, other: object) -> bool:
        """Field by field as a dataclass, with `blocks` (decoded) in place of the leaves."""
        if not isinstance(other, RadixWalk):
            return NotImplemented
        return (self.root, self.geometry, self.intact, self.errors, self.nodes,
                self.node_pages, self.blocks, self.pages_by_order, self.preserved_bytes,
                self.suppressed_errors) == (
            other.root, other.geometry, other.intact, other.errors, other.nodes,
            other.node_pages, other.blocks, other.pages_by_order, other.preserved_bytes,
            other.suppressed_errors)

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


def _decode_segments(segments: Sequence[_Segment], page_size: int) -> list[list[int]]:
    """The walk's segments as one coalesced list of [pa, order, count] runs.

    Within a segment runs never touch (a zero bit, or the walker's coalescing, separates
    them); only a segment's first run may continue the last run of the one before.
    """
    out: list[list[int]] = []
    for seg in segments:
        runs = _leaf_blocks(seg[3], seg[0], seg[2], seg[1])[0] if isinstance(seg, tuple) else seg
        if not runs:
            continue
        first = runs[0]
        prev = out[-1] if out else None
        if prev is not None and prev[1] == first[1] and \
                prev[0] + prev[2] * (page_size << first[1]) == first[0]:
            prev[2] += first[2]
            out += runs[1:]
        else:
            out += runs
    return out


class _Emitter:
    """Coalesces (pa, order, count) runs found one by one (leaf 0) into one segment."""

    def __init__(self, walk: RadixWalk) -> None:
        self.walk = walk
        self.ps = walk.geometry.page_size
        self.runs: list[list[int]] = []
        walk._segments.append(self.runs)

    def run(self, pa: int, order: int, count: int) -> None:
        w = self.walk
        w.pages_by_order[order] = w.pages_by_order.get(order, 0) + count
        size = self.ps << order
        w.preserved_bytes += count * size
        last = self.runs[-1] if self.runs else None
        if last is not None and last[1] == order and last[0] + last[2] * size == pa:
            last[2] += count
        else:
            self.runs.append([pa, order, count])


def _set_bits(words: Sequence[int], first: int = 0, bits: int = -1) -> list[int]:
    """`first` + the index of every set bit of little-endian 64-bit `words` (word j holds
    bits 64j..64j+63), ascending. `bits`: their popcount if known.

    Word by word and in C: itertools.compress drops the zero words, then each round peels
    the lowest set bit of every remaining word (x & -x, bit_length) in one map pass.
    Rounds are bounded by the densest word (<= 64); the result is sorted once.
    """
    idx = list(compress(range(first - 1, first - 1 + 64 * len(words), 64), words))
    nz = list(compress(words, words))
    if bits == len(nz):                       # one bit per word: one pass, no sort
        return list(map(add, idx, map(_BIT_LENGTH, nz)))
    out: list[int] = []
    while idx:
        low = list(map(and_, nz, map(neg, nz)))
        out += map(add, idx, map(_BIT_LENGTH, low))
        rest = list(map(xor, nz, low))
        idx = list(compress(idx, rest))
        nz = list(compress(rest, rest))
    out.sort()
    return out


def _leaf_blocks(leaf: bytes, base: int = 0, shift: int = 0, order: int = 0
                 ) -> tuple[list[list[int]], int]:
    """The runs of set bits in a little-endian leaf bitmap as [base + (bit << shift),
    order, nbits] lists (bit: a run's first bit), in order, and the number of set bits.

    Word by word, never bit by bit: with the bitmap as one int x, x & (x >> 1) == 0 means
    every run is one bit (isolated blocks); if moreover every non-zero 64-bit word holds
    one bit (popcount == non-zero words), a word's bit is its bit_length and each list is
    built in one pass. A few adjacent pairs are joined after the fact; otherwise the run
    starts x & ~(x << 1) and ends x & ~(x >> 1) are located with _set_bits. Leaves with
    at most _FEW_BITS bits take a short Python loop over their non-zero words.
    """
    nbytes = len(leaf)
    zeros, ones = _constant_pages(nbytes)
    if leaf == zeros:
        return [], 0
    if leaf == ones:                          # one run over the whole leaf
        return [[base, order, nbytes * 8]], nbytes * 8
    unpack = _unpacker(nbytes)
    words = unpack(leaf)
    v = int.from_bytes(leaf, "little")
    nbits = _popcount(v)
    if nbits <= _FEW_BITS:                    # a few bits: a short loop over their words
        out: list[list[int]] = []
        for j in compress(range(len(words)), words):
            x = words[j]
            while x:
                low = x & -x
                x ^= low
                bit = (j << 6) + low.bit_length() - 1
                pa = base + (bit << shift)
                if out and out[-1][2] == bit - out[-1][3]:
                    out[-1][2] += 1           # [pa, order, n, first bit] until the end
                else:
                    out.append([pa, order, 1, bit])
        for run in out:
            del run[3]
        return out, nbits
    if not v & (v >> 1):                      # isolated bits
        nz = list(compress(words, words))
        if nbits == len(nz):                  # one bit per non-zero word
            wstep = 64 << shift
            first = base - (1 << shift)       # bit_length is the bit's index + 1
            bl = _BIT_LENGTH
            out = [[wb + (bl(x) << shift), order, 1]
                   for wb, x in zip(compress(range(first, first + wstep * len(words), wstep),
                                             words), nz)]
        else:
            out = [[base + (b << shift), order, 1] for b in _set_bits(words, 0, nbits)]
        return out, len(out)
    adjacent = v & (v >> 1)                   # bit i: bits i and i+1 are both set
    if _popcount(adjacent) <= _FEW_BITS:      # mostly isolated: join the few neighbours
        bits = _set_bits(words, 0, nbits)
        out = [[base + (b << shift), order, 1] for b in bits]
        for b in reversed(_set_bits(unpack(adjacent.to_bytes(nbytes, "little")))):
            i = bisect_left(bits, b)          # descending: later entries already joined
            out[i][2] += out[i + 1][2]
            del out[i + 1]
        return out, nbits
    starts = v & ~(v << 1)
    nruns = _popcount(starts)
    firsts = _set_bits(unpack(starts.to_bytes(nbytes, "little")), 0, nruns)
    ends = _set_bits(unpack((v & ~(v >> 1)).to_bytes(nbytes, "little")), 1, nruns)
    lengths = list(map(sub, ends, firsts))
    out = [[base + (b << shift), order, n] for b, n in zip(firsts, lengths)]
    return out, sum(lengths)


def _constant_pages(nbytes: int) -> tuple[bytes, bytes]:
    """An all-zero and an all-ones page of `nbytes`, cached."""
    pair = _CONSTANT_PAGES.get(nbytes)
    if pair is None:
        pair = _CONSTANT_PAGES[nbytes] = (bytes(nbytes), b"\xff" * nbytes)
    return pair


def _unpacker(nbytes: int) -> Callable[[bytes], tuple[int, ...]]:
    """struct unpack of `nbytes` (a multiple of 8) as little-endian u64 words, cached."""
    fn = _UNPACKERS.get(nbytes)
    if fn is None:
        fn = _UNPACKERS[nbytes] = struct.Struct(f"<{nbytes // 8}Q").unpack
    return fn


def _popcount_bin(v: int) -> int:
    """Set bits of v >= 0 on Python < 3.10 (no int.bit_count)."""
    return bin(v).count("1")


_UNPACKERS: dict[int, Callable[[bytes], tuple[int, ...]]] = {}
_CONSTANT_PAGES: dict[int, tuple[bytes, bytes]] = {}
_FEW_BITS = 64          # up to this many set bits a leaf is decoded by a Python loop
_BIT_LENGTH = int.bit_length
_popcount: Callable[[int], int] = getattr(int, "bit_count", _popcount_bin)


def walk_radix(read: Reader, root: int, g: RadixGeometry, *,
               in_ram: Optional[Callable[[int, int], bool]] = None,
               max_nodes: int = 1 << 20) -> RadixWalk:
    """Walk the tree whose root node is at physical `root`, validating as it goes.

    read: reads physical memory (raises MemoryReadError outside it).
    in_ram: optional check that a preserved block [pa, pa+len) lies in RAM.
    max_nodes: bound on node pages read (the walk stops with an error beyond it).

    Never raises for bad trees: cycles, shared or misaligned nodes, unreadable pointers,
    slots beyond the key space, key-less bits and blocks outside RAM become errors.

    Memory: each non-empty leaf page is kept (as read) until `blocks` is decoded; at most
    max_nodes pages, and never more than the lists they decode to. The garbage collector
    is left alone: the walk allocates a few objects per node, not per block (decoding
    `blocks` later pauses it for the duration, see RadixWalk.blocks).
    """
    w = RadixWalk(root=root, geometry=g)
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
            _walk_leaf(page, prefix, g, w, in_ram)
            continue
        shift = g.shift(level)
        children: list[tuple[int, int, int, str]] = []
        if page != _constant_pages(ps)[0]:
            ptrs = unpack(page)
            for idx in compress(range(slots), ptrs):    # non-zero slots only, found in C
                child = ptrs[idx]
                key = prefix | (idx << shift)
                if key >> key_bits:
                    w.error(f"{what}: slot {idx} points past the key space "
                            f"(depth {g.depth} for {g.compatible})")
                    continue
                children.append((child, level - 1, key, f"slot {idx} of 0x{phys:x}"))
        stack.extend(reversed(children))
    return w


def _walk_leaf(page: bytes, prefix: int, g: RadixGeometry, w: RadixWalk,
               in_ram: Optional[Callable[[int, int], bool]]) -> None:
    """Count one leaf bitmap whose keys start at `prefix` and keep it for `blocks`.

    No per-block work unless a block lies outside RAM: the set bits are counted with one
    popcount, the lowest and highest give the span checked against RAM; only a leaf that
    is not wholly in RAM is decoded now, to name (and drop) the blocks outside it.
    """
    if not prefix:
        _walk_leaf0(page, g, w, in_ram)
        return
    # every key in this leaf shares prefix's order bit: one order for the leaf
    order = g.order0 - (prefix.bit_length() - 1)
    ss = g.page_shift + order
    base = (prefix << ss) & _MASK64
    nbytes = len(page)
    zeros, ones = _constant_pages(nbytes)
    if page == zeros:
        return
    if page == ones:
        total, lo, end = nbytes * 8, 0, nbytes * 8
    else:
        v = int.from_bytes(page, "little")
        total = _popcount(v)
        end = v.bit_length()                          # one past the highest set bit
        i = nbytes - len(page.lstrip(b"\0"))          # the first non-zero byte
        lo = (i << 3) + (page[i] & -page[i]).bit_length() - 1
    seg: _Segment = (base, order, ss, page if type(page) is bytes else bytes(page))
    if in_ram is not None and not in_ram(base + (lo << ss), (end - lo) << ss):
        runs, total = _leaf_blocks(page, base, ss, order)    # [[pa, order, n], ...]
        good = []
        for run in runs:
            pa, _, n = run
            if in_ram(pa, n << ss):
                good.append(run)
            else:
                total -= n
                w.error(f"leaf at key 0x{prefix:x}: blocks 0x{pa:x} "
                        f"(order {order}, {n}) outside RAM")
        if not good:
            return
        seg = good
    w._segments.append(seg)
    w.pages_by_order[order] = w.pages_by_order.get(order, 0) + total
    w.preserved_bytes += total * (g.page_size << order)


def _walk_leaf0(page: bytes, g: RadixGeometry, w: RadixWalk,
                in_ram: Optional[Callable[[int, int], bool]]) -> None:
    """The lowest leaf mixes (absurdly) high orders: decode its keys one by one."""
    ps = g.page_size
    emit = _Emitter(w)
    for bit, _, n in _leaf_blocks(page)[0]:
        for key in range(bit, bit + n):
            if key == 0:
                w.error("leaf 0: bit 0 set, a key without an order bit")
                continue
            pa, order = decode_key(g, key)
            if in_ram is not None and not in_ram(pa, ps << order):
                w.error(f"block 0x{pa:x} order {order} outside RAM")
                continue
            emit.run(pa, order, 1)
