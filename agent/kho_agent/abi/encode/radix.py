"""Build a KHO preserved-memory radix tree as kho_radix_add_page() does (abi/radix.py).

Also the two reference helpers the tests compare walks with: `split_pages` (the blocks
kho_preserve_pages() records) and `coalesce` (blocks as RadixWalk reports them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Callable, Optional

from ..radix import _MASK64, RadixGeometry

__all__ = ["encode_key", "RadixBuilder", "split_pages", "coalesce"]


def encode_key(g: RadixGeometry, pa: int, order: int) -> int:
    """kho_radix_encode_key(): the key of a block of 2^order pages at physical `pa`.

    >>> from kho_agent.abi.radix import geometry
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
        self._last_leaf: Optional[tuple[int, bytearray]] = None   # (key >> bitmap_log2, leaf)

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
        """Preserve `count` consecutive blocks of one order, a leaf at a time: only the
        bytes of the leaf the run covers are rewritten, and the last leaf is remembered
        (a page cache's scattered short runs mostly land in the leaf of the run before)."""
        g = self.g
        size = g.page_size << order
        log2 = g.bitmap_log2
        bits_per_leaf = 1 << log2
        while count > 0:
            key = encode_key(g, pa, order)
            bit = key & (bits_per_leaf - 1)
            n = min(count, bits_per_leaf - bit)
            last = self._last_leaf
            if last is not None and last[0] == key >> log2:
                leaf = last[1]
            else:
                found = self._leaf_for(key, create=True)
                assert found is not None
                leaf = found
                self._last_leaf = (key >> log2, leaf)
            lo, hi = bit >> 3, ((bit + n - 1) >> 3) + 1
            v = int.from_bytes(leaf[lo:hi], "little") | (((1 << n) - 1) << (bit - lo * 8))
            leaf[lo:hi] = v.to_bytes(hi - lo, "little")
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
