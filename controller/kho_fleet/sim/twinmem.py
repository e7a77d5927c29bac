"""Physical memory of a twin host: ROOT/mem.img (physical address 0 = offset 0), a page
allocator that scatters pages the way a long-running buddy allocator does, and the page
cache (which PFNs hold which file: what pagemap answers).

Every page has an owner (free, reserved, scratch, kernel, page cache, incoming-preserved)
and a dirty bit (written since power-on). `poison()` is what a reboot does to memory the
next kernel does not keep: it becomes other data.
"""

from __future__ import annotations

import mmap
import os
import random
import stat
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["FREE", "RESERVED", "SCRATCH", "KERNEL", "PAGECACHE", "INCOMING", "Region",
           "PhysMem", "MIB", "CacheEntry", "PageCache", "page_flags"]

FREE, RESERVED, SCRATCH, KERNEL, PAGECACHE, INCOMING = range(6)
MIB = 1 << 20
_PROBES = 32


@dataclass(frozen=True)
class Region:
    """[start, start+size) of physical memory with a purpose."""

    name: str
    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


class PhysMem:
    """mem.img, mapped read-write, with per-page owners and a scattering allocator."""

    def __init__(self, path: str, size: int, page_size: int, seed: int = 0) -> None:
        if size % page_size:
            raise ValueError("RAM size must be a multiple of the page size")
        self.path = path
        self.size = size
        self.page_size = page_size
        self.npages = size // page_size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)  # power-on: RAM is zero
        try:
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.owner = bytearray(self.npages)
        self.dirty = bytearray(self.npages)
        self.rng = random.Random(seed)

    def close(self) -> None:
        self.map.close()

    # --- bytes ----------------------------------------------------------------------------
    def read(self, pa: int, length: int) -> bytes:
        if pa < 0 or length < 0 or pa + length > self.size:
            from kho_agent.abi.memory import MemoryReadError
            raise MemoryReadError(f"physical 0x{pa:x}+0x{length:x} outside RAM")
        return self.map[pa:pa + length]

    def write(self, pa: int, data: bytes) -> None:
        if pa < 0 or pa + len(data) > self.size:
            raise ValueError(f"write 0x{pa:x}+0x{len(data):x} outside RAM")
        self.map[pa:pa + len(data)] = data
        ps = self.page_size
        first, last = pa // ps, (pa + max(len(data), 1) - 1) // ps
        self.dirty[first:last + 1] = b"\x01" * (last - first + 1)

    # --- ownership ----------------------------------------------------------------------
    def set_owner(self, pfns: Iterable[int], kind: int) -> None:
        for p in pfns:
            self.owner[p] = kind

    def mark(self, region: Region, kind: int) -> None:
        ps = self.page_size
        a, b = region.start // ps, region.end // ps
        self.owner[a:b] = bytes([kind]) * (b - a)

    def free_pages(self) -> int:
        return self.owner.count(FREE)

    def _random_free(self) -> int:
        owner, n, rng = self.owner, self.npages, self.rng
        for _ in range(_PROBES):
            p = rng.randrange(n)
            if owner[p] == FREE:
                return p
        start = rng.randrange(n)
        p = owner.find(FREE, start)
        if p < 0:
            p = owner.find(FREE, 0, start)
        if p < 0:
            raise MemoryError("out of memory")
        return p

    def alloc_page(self, kind: int = KERNEL, zero: bool = True) -> int:
        """The physical address of a fresh page somewhere in free RAM."""
        p = self._random_free()
        self.owner[p] = kind
        if zero:
            self.write(p * self.page_size, bytes(self.page_size))
        return p * self.page_size

    def alloc_scattered(self, count: int, kind: int = PAGECACHE, max_run: int = 8) -> list[int]:
        """`count` PFNs in short contiguous runs at random places (a fragmented buddy)."""
        if count > self.free_pages():
            raise MemoryError(f"out of memory ({count} pages wanted)")
        out: list[int] = []
        owner, rng = self.owner, self.rng
        while len(out) < count:
            p = self._random_free()
            run = min(rng.randint(1, max_run), count - len(out))
            while run and p < self.npages and owner[p] == FREE:
                owner[p] = kind
                out.append(p)
                p += 1
                run -= 1
        return out

    def free(self, pfns: Iterable[int]) -> None:
        for p in pfns:
            self.owner[p] = FREE

    # --- reboot ---------------------------------------------------------------------------
    def poison(self, keep: bytearray, spare: Iterable[Region] = ()) -> int:
        """Overwrite every written page not in `keep` (a per-PFN bytearray, nonzero = keep)
        and outside `spare` with random bytes; returns the number of pages poisoned."""
        ps = self.page_size
        mask = bytearray(self.dirty)
        for r in spare:
            a, b = r.start // ps, r.end // ps
            mask[a:b] = bytes(b - a)
        done = 0
        p = mask.find(1)
        while p >= 0:
            if keep[p]:
                p = mask.find(1, p + 1)
                continue
            q = p
            while q < self.npages and mask[q] and not keep[q]:
                q += 1
            self.map[p * ps:q * ps] = os.urandom((q - p) * ps)
            done += q - p
            p = mask.find(1, q)
        return done

    def fill(self, pa: int, pattern: Optional[bytes] = None) -> None:
        """Overwrite one page: zeros (pattern None) or `pattern` repeated ("kernel data")."""
        ps = self.page_size
        if pattern is None:
            self.write(pa, bytes(ps))
        else:
            self.write(pa, (pattern * (ps // len(pattern) + 1))[:ps])


@dataclass
class CacheEntry:
    """A file's page cache: the twin's reference to the file and the PFN of each page.

    pins > 0: LUO holds the file (preserved, or retrieved and not yet finished): its
    pages stay where they are.
    """

    fd: int
    pfns: list[int] = field(default_factory=list)
    pins: int = 0


class PageCache:
    """Which physical pages hold which file's bytes (what /proc/PID/pagemap reports).

    Files are identified by (st_dev, st_ino); the twin keeps a dup of each fd so the
    inode number cannot be reused while it remembers the file. Unpinned files are
    forgotten least-recently-used first beyond `lru` entries (their pages are freed).
    """

    def __init__(self, mem: PhysMem, lru: int = 64) -> None:
        self.mem = mem
        self.lru = lru
        self.entries: OrderedDict[tuple[int, int], CacheEntry] = OrderedDict()

    def get(self, fd: int, npages: int) -> tuple[tuple[int, int], CacheEntry]:
        """The entry of the file behind `fd`, with PFNs for at least `npages` pages."""
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        ent = self.entries.get(ident)
        if ent is None:
            ent = self.entries[ident] = CacheEntry(os.dup(fd))
        self.entries.move_to_end(ident)
        if len(ent.pfns) < npages:
            ent.pfns += self.mem.alloc_scattered(npages - len(ent.pfns))
        elif len(ent.pfns) > npages and not ent.pins:
            self.mem.free(ent.pfns[npages:])
            del ent.pfns[npages:]
        self._evict()
        return ident, ent

    def adopt(self, fd: int, pfns: list[int]) -> tuple[int, int]:
        """Record a file the kernel built on existing pages (a retrieved memfd)."""
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        self.entries[ident] = CacheEntry(fd, list(pfns), pins=1)
        self.mem.set_owner(pfns, PAGECACHE)
        return ident

    def _evict(self) -> None:
        loose = [k for k, e in self.entries.items() if not e.pins]
        for k in loose[:max(0, len(loose) - self.lru)]:
            ent = self.entries.pop(k)
            self.mem.free(ent.pfns)
            os.close(ent.fd)

    def fill(self, fd: int, pfns: list[int], size: int) -> None:
        """Copy the file's first `size` bytes into its pages (zero-padded)."""
        ps, mem = self.mem.page_size, self.mem
        data = (os.pread(fd, size, 0) if size else b"").ljust(len(pfns) * ps, b"\0")
        for i, pfn in enumerate(pfns):
            mem.map[pfn * ps:(pfn + 1) * ps] = data[i * ps:(i + 1) * ps]
            mem.dirty[pfn] = 1
        mem.set_owner(pfns, PAGECACHE)

    def pagemap(self, fd: int, size: int) -> list[int]:
        """PFN of each page of the file in [0, size), 0 past its end.

        Raises ValueError for a non-regular file, MemoryError when RAM is full.
        """
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        ps = self.mem.page_size
        want = -(-size // ps)
        ent = self.entries.get((st.st_dev, st.st_ino))
        if ent is None or not ent.pins:
            # not held by LUO: its pages follow the file and hold its current bytes
            _, ent = self.get(fd, -(-st.st_size // ps))
            self.fill(fd, ent.pfns, st.st_size)
        n = min(want, len(ent.pfns))
        return ent.pfns[:n] + [0] * (want - n)

    def idents(self) -> set[tuple[int, int]]:
        return set(self.entries)

    def clear(self) -> None:
        """The kernel stops: every file reference is gone."""
        for ent in self.entries.values():
            os.close(ent.fd)
        self.entries.clear()


_KPF = {"UPTODATE": 3, "DIRTY": 4, "LRU": 5, "SLAB": 7, "BUDDY": 10, "NOPAGE": 20,
        "RESERVED": 32}
_FLAGS = {FREE: 1 << _KPF["BUDDY"], SCRATCH: 1 << _KPF["BUDDY"],
          RESERVED: 1 << _KPF["RESERVED"], KERNEL: 1 << _KPF["SLAB"],
          PAGECACHE: (1 << _KPF["UPTODATE"]) | (1 << _KPF["DIRTY"]) | (1 << _KPF["LRU"]),
          INCOMING: 0}


def page_flags(mem: PhysMem, pfns: list[int]) -> list[int]:
    """/proc/kpageflags: pages preserved by the previous kernel and not yet restored
    show no flags at all (lab finding 2)."""
    return [_FLAGS[mem.owner[p]] if 0 <= p < mem.npages else 1 << _KPF["NOPAGE"]
            for p in pfns]
