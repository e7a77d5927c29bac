"""Physical memory of a twin host: ROOT/mem.img (physical address 0 = offset 0), a page
allocator that scatters pages the way a long-running buddy allocator does, and the page
cache (which PFNs hold which file: what pagemap answers).

Every page has an owner (free, reserved, scratch, kernel, page cache, incoming-preserved)
and a dirty bit (written since power-on). `poison()` is what a reboot does to memory the
next kernel does not keep: it becomes other data.

Large folios (THP shmem): `PhysMem.compound` maps the head PFN of each large folio to its
order; /proc/kpageflags shows COMPOUND_HEAD/TAIL and THP for them. A file's page cache
uses PMD-sized folios (order log2(PAGE_SIZE/8): 2 MiB on 4 KiB pages) where the host's
shmem_enabled and the file's madvise hint say so (`wants_huge`, as shmem_huge_global_enabled
in mm/shmem.c), for every folio-sized, folio-aligned range of the file, when RAM has an
aligned free run; elsewhere order 0, scattered.
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
           "PhysMem", "MIB", "CacheEntry", "PageCache", "page_flags", "wants_huge",
           "pmd_order", "THP_SETTINGS", "THP_DEFAULT", "THP_FILE", "thp_file_text",
           "thp_selected", "pfn_runs"]

FREE, RESERVED, SCRATCH, KERNEL, PAGECACHE, INCOMING = range(6)
MIB = 1 << 20
_PROBES = 32
THP_SETTINGS = ("always", "within_size", "advise", "never", "deny", "force")
THP_DEFAULT = "advise"            # the twin's boot default of shmem_enabled
THP_FILE = "sys/kernel/mm/transparent_hugepage/shmem_enabled"   # under the host root


def thp_file_text(selected: str) -> str:
    """/sys/kernel/mm/transparent_hugepage/shmem_enabled with `selected` in brackets."""
    return " ".join(f"[{s}]" if s == selected else s for s in THP_SETTINGS) + "\n"


def thp_selected(text: str) -> str:
    """The selected setting of a shmem_enabled file: "[advise]" or a bare word written to
    it (echo never > shmem_enabled); anything else: the twin's default."""
    words = text.split()
    sel = [w[1:-1] for w in words if w.startswith("[") and w.endswith("]")]
    if sel and sel[0] in THP_SETTINGS:
        return sel[0]
    if len(words) == 1 and words[0] in THP_SETTINGS:
        return words[0]
    return THP_DEFAULT


def wants_huge(setting: str, hint: Optional[str]) -> bool:
    """PMD-sized folios for a shmem file? `setting`: shmem_enabled; `hint`: how the file
    was filled (always/within_size: a MADV_HUGEPAGE mapping, never: MADV_NOHUGEPAGE,
    None: write(2)). The file is sized before it is filled, so within_size is always."""
    if setting == "deny":
        return False
    if setting == "force":
        return True
    if hint == "never":
        return False
    if setting in ("always", "within_size"):
        return True
    return setting == "advise" and hint in ("always", "within_size")


def pmd_order(page_size: int) -> int:
    """The order of a PMD-sized folio: a page table page holds PAGE_SIZE/8 entries."""
    return (page_size // 8).bit_length() - 1


def _ram_fd(path: str, size: int) -> int:
    """A read-write fd of `size` zero bytes of RAM, and `path` naming it for other processes.

    RAM lives in memory (a memfd: shmem pages), as a host's RAM does; `path` is a symlink
    to /proc/PID/fd/N of this process, which the agent opens as the host's /dev/mem (the
    link dangles once the twin is off: RAM is gone with the power). On ext4, as a file
    (before), every first touch of a page of the mapping cost ~15-50 us and every written
    page went to the disk as well; a GiB preserved took tens of seconds. Without
    memfd_create (not Linux) or where the link cannot be made, `path` is the file itself."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("twin-ram", getattr(os, "MFD_CLOEXEC", 1))
        try:
            os.ftruncate(fd, size)
            os.symlink(f"/proc/{os.getpid()}/fd/{fd}", path)
            return fd
        except OSError:
            os.close(fd)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        try:      # blocks allocated now (unwritten, no I/O): a first touch of a sparse
            os.posix_fallocate(fd, 0, size)     # file's page costs ~10x (ext4)
        except OSError:
            pass
    except BaseException:
        os.close(fd)
        raise
    return fd


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
        self.fd = _ram_fd(path, size)                    # power-on: RAM is zero
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._cfr = hasattr(os, "copy_file_range")     # copy_in/copy_out in the kernel
        self.owner = bytearray(self.npages)
        self.dirty = bytearray(self.npages)
        self.rng = random.Random(seed)
        self.compound: dict[int, int] = {}     # head PFN -> order of each large folio

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)

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

    def copy_in(self, src: int, off: int, pa: int, length: int) -> int:
        """Copy up to `length` bytes of file `src` from `off` into RAM at `pa`, in the
        kernel (copy_file_range: page cache to page cache, no page faults on the RAM
        mapping; preadv into the mapping where it is not supported); returns the bytes
        copied (fewer at the file's end). Marks nothing dirty: the caller does."""
        done = 0
        while done < length and self._cfr:
            try:
                n = os.copy_file_range(src, self.fd, length - done, off + done, pa + done)
            except OSError:
                self._cfr = False             # EXDEV, EINVAL, ENOSYS: the mapping instead
                break
            if n <= 0:
                return done
            done += n
        with memoryview(self.map) as ram:
            while done < length:
                n = os.preadv(src, [ram[pa + done:pa + length]], off + done)
                if n <= 0:
                    break
                done += n
        return done

    def copy_out(self, dst: int, off: int, pa: int, length: int) -> None:
        """Write `length` bytes of RAM at `pa` into file `dst` at `off` (copy_file_range,
        else pwrite from the mapping)."""
        done = 0
        while done < length and self._cfr:
            try:
                n = os.copy_file_range(self.fd, dst, length - done, pa + done, off + done)
            except OSError:
                self._cfr = False
                break
            if n <= 0:
                break
            done += n
        with memoryview(self.map) as ram:
            while done < length:
                done += os.pwrite(dst, ram[pa + done:pa + length], off + done)

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
        owner, rng, n = self.owner, self.rng, self.npages
        mark = bytes([kind]) * max_run
        while len(out) < count:
            p = self._random_free()
            run = min(rng.randint(1, max_run), count - len(out))
            seg = owner[p:min(p + run, n)]            # the free pages from p on (FREE == 0)
            k = len(seg) - len(seg.lstrip(b"\0"))
            owner[p:p + k] = mark[:k]
            out += range(p, p + k)
        return out

    def alloc_folio(self, order: int, kind: int = PAGECACHE) -> Optional[int]:
        """The head PFN of a free, naturally aligned run of 2**order pages (a large
        folio), or None when RAM has no such run (the caller falls back to order 0)."""
        n = 1 << order
        want = bytes(n)                                  # FREE == 0
        slots = range(0, self.npages - n + 1, n)
        if not slots:
            return None
        first = self.rng.randrange(len(slots))
        owner = self.owner
        for k in list(range(first, len(slots))) + list(range(first)):
            a = slots[k]
            if owner[a:a + n] == want:
                owner[a:a + n] = bytes([kind]) * n
                self.compound[a] = order
                return a
        return None

    def free(self, pfns: Iterable[int]) -> None:
        compound = self.compound
        for p in pfns:
            self.owner[p] = FREE
            if compound:
                compound.pop(p, None)

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


def pfn_runs(pfns: list[int]) -> list[tuple[int, int, int]]:
    """[(first PFN, first index, pages)] of the runs of consecutive PFNs in `pfns` (file
    order): one comprehension finds the breaks, no per-page Python loop body."""
    n = len(pfns)
    if not n:
        return []
    cuts = [k for k, (a, b) in enumerate(zip(pfns, pfns[1:]), 1) if b != a + 1]
    starts = [0] + cuts
    ends = cuts + [n]
    return [(pfns[a], a, b - a) for a, b in zip(starts, ends)]


@dataclass
class CacheEntry:
    """A file's page cache: the twin's reference to the file and the PFN of each page.

    pins > 0: LUO holds the file (preserved, or retrieved and not yet finished): its
    pages stay where they are.
    """

    fd: int
    pfns: list[int] = field(default_factory=list)
    pins: int = 0
    orders: dict[int, int] = field(default_factory=dict)    # head index -> order (> 0)

    def folios(self, npages: int) -> list[tuple[int, int, int]]:
        """(index, head PFN, order) of each folio of the first `npages` pages."""
        if not self.orders:
            pfns = self.pfns
            return [(i, pfns[i], 0) for i in range(npages)]
        out: list[tuple[int, int, int]] = []
        i = 0
        while i < npages:
            o = self.orders.get(i, 0)
            out.append((i, self.pfns[i], o))
            i += 1 << o
        return out


class PageCache:
    """Which physical pages hold which file's bytes (what /proc/PID/pagemap reports).

    Files are identified by (st_dev, st_ino); the twin keeps a dup of each fd so the
    inode number cannot be reused while it remembers the file. Unpinned files are
    forgotten least-recently-used first beyond `lru` entries (their pages are freed).
    """

    def __init__(self, mem: PhysMem, lru: int = 64, thp_path: Optional[str] = None) -> None:
        self.mem = mem
        self.lru = lru
        self.entries: OrderedDict[tuple[int, int], CacheEntry] = OrderedDict()
        self.thp_path = thp_path                # the host's shmem_enabled file
        self.hints: dict[tuple[int, int], str] = {}   # madvise of the file's fill mapping
        mem.compound.clear()                    # a new kernel: no large folios yet

    def thp_setting(self) -> str:
        """The host's shmem_enabled now (a test may write the file, as root would)."""
        if self.thp_path is None:
            return THP_DEFAULT
        try:
            with open(self.thp_path) as f:
                return thp_selected(f.read())
        except OSError:
            return THP_DEFAULT

    def set_hint(self, fd: int, mode: str) -> None:
        """The file behind `fd` was filled through a mapping with this madvise: its pages
        (if not held by LUO) are laid out again on next use."""
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        self.hints[ident] = mode
        ent = self.entries.get(ident)
        if ent is not None and not ent.pins:
            self.mem.free(ent.pfns)
            ent.pfns, ent.orders = [], {}

    def _grow(self, ident: tuple[int, int], ent: CacheEntry, npages: int) -> None:
        """Pages for indices [len(ent.pfns), npages): large folios where wanted and free."""
        mem = self.mem
        order = pmd_order(mem.page_size)
        huge = order > 0 and wants_huge(self.thp_setting(), self.hints.get(ident))
        i, small = len(ent.pfns), 0
        n = 1 << order
        while i < npages:
            if huge and i % n == 0 and i + n <= npages:
                head = mem.alloc_folio(order)
                if head is not None:
                    if small:
                        ent.pfns += mem.alloc_scattered(small)
                        small = 0
                    ent.orders[len(ent.pfns)] = order
                    ent.pfns += range(head, head + n)
                    i += n
                    continue
            small += 1
            i += 1
        if small:
            ent.pfns += mem.alloc_scattered(small)

    def get(self, fd: int, npages: int) -> tuple[tuple[int, int], CacheEntry]:
        """The entry of the file behind `fd`, with PFNs for at least `npages` pages."""
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        ent = self.entries.get(ident)
        if ent is None:
            ent = self.entries[ident] = CacheEntry(os.dup(fd))
        self.entries.move_to_end(ident)
        if len(ent.pfns) < npages:
            self._grow(ident, ent, npages)
        elif len(ent.pfns) > npages and not ent.pins:
            for idx, o in list(ent.orders.items()):
                if idx + (1 << o) > npages:           # truncated: the folio is split
                    del ent.orders[idx]
                    self.mem.compound.pop(ent.pfns[idx], None)
            self.mem.free(ent.pfns[npages:])
            del ent.pfns[npages:]
        self._evict()
        return ident, ent

    def adopt(self, fd: int, pfns: list[int],
              orders: Optional[dict[int, int]] = None) -> tuple[int, int]:
        """Record a file the kernel built on existing pages (a retrieved memfd); `orders`:
        head index -> order of its large folios."""
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        self.entries[ident] = CacheEntry(fd, list(pfns), pins=1, orders=dict(orders or {}))
        self.mem.set_owner(pfns, PAGECACHE)
        for idx, o in (orders or {}).items():
            self.mem.compound[pfns[idx]] = o
        return ident

    def _evict(self) -> None:
        loose = [k for k, e in self.entries.items() if not e.pins]
        for k in loose[:max(0, len(loose) - self.lru)]:
            ent = self.entries.pop(k)
            self.hints.pop(k, None)
            self.mem.free(ent.pfns)
            os.close(ent.fd)

    def fill(self, fd: int, pfns: list[int], size: int) -> None:
        """Copy the file's first `size` bytes into its pages (zero-padded): run by run of
        consecutive PFNs, copied by the kernel from the file into RAM (PhysMem.copy_in)."""
        ps, mem = self.mem.page_size, self.mem
        runs = pfn_runs(pfns)
        runs.sort()          # in physical order
        zero = b""
        mark = bytes([PAGECACHE])
        for first, i, k in runs:
            pa, want = first * ps, max(0, min(size - i * ps, k * ps))
            got = mem.copy_in(fd, i * ps, pa, want) if want else 0
            if got < k * ps:                                    # past the end: zeros
                if len(zero) < k * ps - got:
                    zero = bytes(k * ps - got)
                mem.map[pa + got:pa + k * ps] = zero[:k * ps - got]
            mem.dirty[first:first + k] = b"\x01" * k
            mem.owner[first:first + k] = mark * k

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


_KPF = {"UPTODATE": 3, "DIRTY": 4, "LRU": 5, "SLAB": 7, "BUDDY": 10, "COMPOUND_HEAD": 15,
        "COMPOUND_TAIL": 16, "NOPAGE": 20, "THP": 22, "RESERVED": 32}
_FLAGS = {FREE: 1 << _KPF["BUDDY"], SCRATCH: 1 << _KPF["BUDDY"],
          RESERVED: 1 << _KPF["RESERVED"], KERNEL: 1 << _KPF["SLAB"],
          PAGECACHE: (1 << _KPF["UPTODATE"]) | (1 << _KPF["DIRTY"]) | (1 << _KPF["LRU"]),
          INCOMING: 0}


_HEAD = (1 << _KPF["COMPOUND_HEAD"]) | (1 << _KPF["THP"])
_TAIL = (1 << _KPF["COMPOUND_TAIL"]) | (1 << _KPF["THP"])


def page_flags(mem: PhysMem, pfns: list[int]) -> list[int]:
    """/proc/kpageflags: pages preserved by the previous kernel and not yet restored
    show no flags at all (lab finding 2); pages of a large folio in the page cache show
    COMPOUND_HEAD or COMPOUND_TAIL, and THP."""
    out = [_FLAGS[mem.owner[p]] if 0 <= p < mem.npages else 1 << _KPF["NOPAGE"]
           for p in pfns]
    comp = mem.compound
    if not comp:
        return out
    orders = set(comp.values())
    for i, p in enumerate(pfns):
        if not 0 <= p < mem.npages or mem.owner[p] != PAGECACHE:
            continue
        if p in comp:
            out[i] |= _HEAD
            continue
        for o in orders:
            head = p & ~((1 << o) - 1)
            if comp.get(head) == o:
                out[i] |= _TAIL
                break
    return out
