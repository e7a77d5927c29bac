"""/proc/kpageflags: decode the u64 of each page and check that preserved pages were honoured.

/proc/kpageflags holds one native-endian u64 per PFN, bit numbers from
include/uapi/linux/kernel-page-flags.h (KPF_*; bits 32 and up are the "kernel hacking"
flags fs/proc/page.c also exports). A page the previous kernel preserved through KHO and
that nobody has restored yet is, in the new kernel, **not in the buddy allocator** (it was
never freed to it) and **not on an LRU** (no page cache or anonymous memory got it): lab
finding 2 saw such pages with no flags at all; a kernel may also mark them RESERVED. A page
with BUDDY or LRU set was handed out again: the new kernel did not honour the tree there.

Pure functions only (the bytes come from Kernel.page_flags or a file). Stdlib only.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

__all__ = ["KPF", "decode", "parse_kpageflags", "PreservedPagesCheck", "check_preserved",
           "names_of", "pfns_of_blocks"]

# include/uapi/linux/kernel-page-flags.h and fs/proc/page.c (KPF_RESERVED and up)
KPF: dict[str, int] = {
    "LOCKED": 0, "ERROR": 1, "REFERENCED": 2, "UPTODATE": 3, "DIRTY": 4, "LRU": 5,
    "ACTIVE": 6, "SLAB": 7, "WRITEBACK": 8, "RECLAIM": 9, "BUDDY": 10, "MMAP": 11,
    "ANON": 12, "SWAPCACHE": 13, "SWAPBACKED": 14, "COMPOUND_HEAD": 15,
    "COMPOUND_TAIL": 16, "HUGE": 17, "UNEVICTABLE": 18, "HWPOISON": 19, "NOPAGE": 20,
    "KSM": 21, "THP": 22, "OFFLINE": 23, "ZERO_PAGE": 24, "IDLE": 25, "PGTABLE": 26,
    "RESERVED": 32, "MLOCKED": 33, "MAPPEDTODISK": 34, "PRIVATE": 35, "PRIVATE_2": 36,
    "OWNER_PRIVATE": 37, "ARCH": 38, "UNCACHED": 39, "SOFTDIRTY": 40, "ARCH_2": 41,
}
_BIT = {v: k for k, v in KPF.items()}
# What a preserved page not yet retrieved may show: nothing (lab finding 2), RESERVED, or
# the shape of the folio it belongs to. Any other flag means someone uses the page: free
# (BUDDY), on an LRU, page cache (UPTODATE, DIRTY, ACTIVE, SWAPBACKED -- a shmem page just
# written shows those before it reaches an LRU), slab, absent (NOPAGE)...
_ALLOWED = ("RESERVED", "COMPOUND_HEAD", "COMPOUND_TAIL")


def decode(flags: int) -> list[str]:
    """The KPF names set in one u64 (unknown bits as "BIT<n>").

    >>> decode(0x38)
    ['UPTODATE', 'DIRTY', 'LRU']
    >>> decode((1 << 32) | (1 << 50))
    ['RESERVED', 'BIT50']
    """
    return [_BIT.get(b, f"BIT{b}") for b in range(64) if flags >> b & 1]


def names_of(flags: int) -> str:
    """"A|B" of decode(), "none" for 0.

    >>> names_of(0), names_of(1 << 10)
    ('none', 'BUDDY')
    """
    return "|".join(decode(flags)) or "none"


def parse_kpageflags(raw: bytes, byteorder: str = sys.byteorder) -> list[int]:
    """The u64s of a /proc/kpageflags read (8 bytes per PFN, the host's byte order).

    >>> parse_kpageflags(bytes([0x38, 0, 0, 0, 0, 0, 0, 0]) * 2, "little")
    [56, 56]
    """
    if len(raw) % 8:
        raise ValueError(f"kpageflags: {len(raw)} bytes is not a whole number of u64s")
    fmt = ("<" if byteorder == "little" else ">") + f"{len(raw) // 8}Q"
    return list(struct.unpack(fmt, raw))


@dataclass
class PreservedPagesCheck:
    """/proc/kpageflags of pages the previous kernel preserved, read before any retrieval:
    `honoured` when none of them is free (BUDDY), on an LRU or otherwise in use (any flag
    but RESERVED and the folio's shape)."""

    pages: int = 0
    no_flags: int = 0          # what lab finding 2 saw for every preserved page
    reserved: int = 0
    buddy: int = 0
    lru: int = 0
    other_bad: int = 0         # any other flag of a page in use (page cache, slab, NOPAGE..)
    #                            (buddy, lru and other_bad count flags: a page may be in two)
    honoured: bool = False
    examples: list[str] = field(default_factory=list)   # "pfn 0x..: FLAGS" of bad pages

    def to_json(self) -> dict:
        return asdict(self)


def check_preserved(pfns: Sequence[int], flags: Sequence[int],
                    max_examples: int = 8) -> PreservedPagesCheck:
    """Classify the kpageflags of preserved `pfns` (same order as `flags`).

    >>> c = check_preserved([1, 2, 3], [0, 1 << 32, 1 << 10])
    >>> c.pages, c.no_flags, c.reserved, c.buddy, c.honoured, c.examples
    (3, 1, 1, 1, False, ['pfn 0x3: BUDDY'])
    >>> check_preserved([5, 6], [0, 1 << 15]).honoured
    True
    >>> check_preserved([5], [0x4018]).other_bad      # UPTODATE|DIRTY|SWAPBACKED: in use
    1
    """
    if len(pfns) != len(flags):
        raise ValueError(f"{len(pfns)} PFNs but {len(flags)} kpageflags entries")
    c = PreservedPagesCheck(pages=len(pfns))
    buddy, lru = 1 << KPF["BUDDY"], 1 << KPF["LRU"]
    other = ((1 << 64) - 1) & ~(buddy | lru | sum(1 << KPF[n] for n in _ALLOWED))
    for pfn, f in zip(pfns, flags):
        c.no_flags += f == 0
        c.reserved += bool(f >> KPF["RESERVED"] & 1)
        bad = False
        if f & buddy:
            c.buddy += 1
            bad = True
        if f & lru:
            c.lru += 1
            bad = True
        if f & other:
            c.other_bad += 1
            bad = True
        if bad and len(c.examples) < max_examples:
            c.examples.append(f"pfn {pfn:#x}: {names_of(f)}")
    c.honoured = bool(pfns) and not (c.buddy or c.lru or c.other_bad)
    return c


def pfns_of_blocks(blocks: Iterable[Sequence[int]], page_size: int,
                   limit: int = 1 << 22) -> list[int]:
    """Every PFN of a radix snapshot's [phys, order, count] blocks (at most `limit`).

    >>> pfns_of_blocks([[0x2000, 1, 1], [0x10000, 0, 2]], 4096)
    [2, 3, 16, 17]
    """
    out: list[int] = []
    for phys, order, count in blocks:
        first = phys // page_size
        n = count << order
        out.extend(range(first, first + min(n, limit - len(out))))
        if len(out) >= limit:
            break
    return out
