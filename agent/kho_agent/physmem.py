"""Physical-memory readers: raw images, ELF cores (QEMU dumps, vmcore), /proc/kcore, /dev/mem.

One interface, `read(phys, length) -> bytes`, so the ABI decoders never know the source.
Each reader knows which physical ranges it holds and raises PhysMemError (a
MemoryReadError) for anything else. /dev/mem is opened read-only, always.
`data_ranges()` says where non-zero bytes can be at all (holes of sparse files and the
zero tail of ELF segments are left out), so a scan of a dump costs what the dump holds.
`write_elf_core` writes the ELF cores the tests and the digital twin use.

Resident memory stays bounded whatever the dump size: reads of `_PREAD_MIN` bytes or
more go through pread (nothing stays mapped), and the pages the mmap fast path for small
reads has touched are dropped (MADV_DONTNEED) every `_MAP_BUDGET` bytes.
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import stat
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from .abi.memory import MemoryReadError

__all__ = ["PhysMemError", "Segment", "PhysicalMemory", "RawImage", "ElfCore", "KCore",
           "DevMem", "open_memory", "open_live_memory", "open_devmem", "open_kcore",
           "probe_addr", "system_ram_ranges", "write_elf_core"]

_ELF_MAGIC = b"\x7fELF"
_PT_LOAD = 1
_NO_PADDR = (1 << 64) - 1
_PREAD_MIN = 64 << 10     # reads this long or longer use pread, not the mapping
_MAP_BUDGET = 32 << 20    # bytes of mapped pages touched before they are dropped


class PhysMemError(MemoryReadError):
    """A physical range the source does not hold, or a source that cannot be used."""


@dataclass(frozen=True)
class Segment:
    """`size` bytes of physical memory at `phys`; the first `filesz` are at `offset`."""

    phys: int
    size: int
    offset: int
    filesz: int

    @property
    def end(self) -> int:
        return self.phys + self.size


class PhysicalMemory:
    """Reads physical memory from a file through a sorted list of segments."""

    source: str = "memory"
    sparse_aware: bool = False    # True: the fd is a plain file that SEEK_DATA can ask

    def __init__(self, path: str, segments: Sequence[Segment], fd: int,
                 use_mmap: bool) -> None:
        self.path = path
        self.segments = sorted((s for s in segments if s.size > 0), key=lambda s: s.phys)
        self._starts = [s.phys for s in self.segments]
        self._fd = fd
        self._map: Optional[mmap.mmap] = None
        self._touched = 0         # bytes read through the mapping since the last drop
        if use_mmap and os.fstat(fd).st_size > 0:
            self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> PhysicalMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """Merged [start, end) physical ranges held."""
        out: list[tuple[int, int]] = []
        for s in self.segments:
            if out and s.phys <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], s.end))
            else:
                out.append((s.phys, s.end))
        return out

    @property
    def size(self) -> int:
        return sum(e - s for s, e in self.ranges)

    def contains(self, phys: int, length: int) -> bool:
        """True if [phys, phys+length) lies entirely in memory this source holds."""
        for s, e in self.ranges:
            if s <= phys and phys + length <= e:
                return True
        return False

    def _segment(self, phys: int) -> Optional[Segment]:
        i = bisect.bisect_right(self._starts, phys) - 1
        if i >= 0 and phys < self.segments[i].end:
            return self.segments[i]
        # overlapping segments (kcore's text inside the direct map) are rare: scan back
        for seg in reversed(self.segments[:max(i, 0)]):
            if seg.phys <= phys < seg.end:
                return seg
        return None

    def _file_read(self, offset: int, length: int) -> bytes:
        """File bytes: small reads from the mapping (fast for tree walks), large ones by
        pread so that a scan of a large dump leaves no pages mapped in this process."""
        if self._map is None or length >= _PREAD_MIN:
            return os.pread(self._fd, length, offset)
        self._touched += length + mmap.PAGESIZE
        if self._touched > _MAP_BUDGET:
            self._drop_mapped()
        return self._map[offset:offset + length]

    def _drop_mapped(self) -> None:
        """Unmap the pages of the mapping touched so far (they stay in the page cache)."""
        self._touched = 0
        if self._map is not None and hasattr(self._map, "madvise"):
            try:
                self._map.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass

    def data_ranges(self) -> Iterator[tuple[int, int]]:
        """[start, end) physical ranges that may hold non-zero bytes, by segment in
        address order (ranges of overlapping segments may overlap).

        Everything else this source holds reads as zeros: p_memsz beyond p_filesz, and
        holes of a sparse plain file (found with SEEK_DATA/SEEK_HOLE, one pair of lseek
        calls per extent, nothing kept). Without SEEK_DATA the whole file counts as data.
        """
        for seg in self.segments:
            if seg.filesz <= 0:
                continue
            if not self.sparse_aware:
                yield seg.phys, seg.phys + min(seg.filesz, seg.size)
                continue
            for off, end in self._file_extents(seg.offset, seg.offset + min(seg.filesz, seg.size)):
                yield seg.phys + (off - seg.offset), seg.phys + (end - seg.offset)

    def _file_extents(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """The data extents of the file within [start, end) (holes left out)."""
        pos = start
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
                hole = os.lseek(self._fd, data, os.SEEK_HOLE)
            except OSError as e:
                if e.errno == errno.ENXIO:      # no data at or after pos
                    return
                yield pos, end                  # SEEK_DATA unsupported: all of it is data
                return
            if data >= end:
                return
            if hole <= data:                    # cannot happen on a sane filesystem
                yield data, end
                return
            yield data, min(hole, end)
            pos = hole

    def read(self, phys: int, length: int) -> bytes:
        """`length` bytes at physical address `phys` (PhysMemError if any are missing)."""
        if length < 0 or phys < 0:
            raise PhysMemError(f"bad read 0x{phys:x}+{length}")
        seg = self._segment(phys) if length else None
        if seg is not None and phys + length <= seg.phys + min(seg.filesz, seg.size):
            # all in one segment's file bytes: the common case, no copy into a buffer
            try:
                chunk = self._file_read(seg.offset + phys - seg.phys, length)
            except OSError as e:
                raise PhysMemError(f"reading physical 0x{phys:x} from {self.path}: "
                                   f"{e.strerror}") from None
            if len(chunk) != length:
                raise PhysMemError(f"physical 0x{phys:x}: short read from {self.path}")
            return chunk
        out = bytearray()
        pos, left = phys, length
        while left:
            seg = self._segment(pos)
            if seg is None:
                raise PhysMemError(f"physical 0x{pos:x} not in {self.source} {self.path}")
            n = min(left, seg.end - pos)
            rel = pos - seg.phys
            infile = max(0, min(n, seg.filesz - rel))
            if infile:
                try:
                    chunk = self._file_read(seg.offset + rel, infile)
                except OSError as e:
                    raise PhysMemError(f"reading physical 0x{pos:x} from {self.path}: "
                                       f"{e.strerror}") from None
                if len(chunk) != infile:
                    raise PhysMemError(f"physical 0x{pos:x}: short read from {self.path}")
                out += chunk
            out += bytes(n - infile)      # p_memsz beyond p_filesz reads as zeros
            pos += n
            left -= n
        return bytes(out)


class RawImage(PhysicalMemory):
    """A flat image of physical memory starting at `base` (0 unless told otherwise)."""

    source = "raw image"

    def __init__(self, path: str, base: int = 0) -> None:
        fd = os.open(path, os.O_RDONLY)
        st = os.fstat(fd)
        self.sparse_aware = stat.S_ISREG(st.st_mode) and not path.startswith(("/proc/", "/sys/"))
        super().__init__(path, [Segment(base, st.st_size, 0, st.st_size)], fd, use_mmap=True)


def _parse_elf(head: bytes, path: str) -> tuple[str, int, int, int]:
    """(struct byte order, e_phoff, e_phentsize, e_phnum) of an ELF64 file header."""
    if len(head) < 64 or head[:4] != _ELF_MAGIC:
        raise PhysMemError(f"{path}: not an ELF file")
    if head[4] != 2:
        raise PhysMemError(f"{path}: only 64-bit ELF cores are supported")
    order = {1: "<", 2: ">"}.get(head[5])
    if order is None:
        raise PhysMemError(f"{path}: bad ELF data encoding {head[5]}")
    (e_phoff,) = struct.unpack_from(order + "Q", head, 0x20)
    e_phentsize, e_phnum = struct.unpack_from(order + "HH", head, 0x36)
    return order, e_phoff, e_phentsize, e_phnum


class ElfCore(PhysicalMemory):
    """An ELF core whose PT_LOAD headers carry physical addresses (p_paddr).

    QEMU's dump-guest-memory (paging=false) and vmcores are of this kind.
    """

    source = "ELF core"

    def __init__(self, path: str, *, use_mmap: bool = True) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            segs = self._load_segments(fd, path)
        except BaseException:
            os.close(fd)
            raise
        self.sparse_aware = (stat.S_ISREG(os.fstat(fd).st_mode)
                             and not path.startswith(("/proc/", "/sys/")))
        super().__init__(path, segs, fd, use_mmap=use_mmap)

    @staticmethod
    def _load_segments(fd: int, path: str) -> list[Segment]:
        head = os.pread(fd, 64, 0)
        order, phoff, phentsize, phnum = _parse_elf(head, path)
        if phnum == 0xFFFF or phentsize < 56 or phnum > 65535:
            raise PhysMemError(f"{path}: unsupported program header table "
                               f"(phnum {phnum}, entsize {phentsize})")
        table = os.pread(fd, phentsize * phnum, phoff)
        if len(table) != phentsize * phnum:
            raise PhysMemError(f"{path}: program header table truncated")
        size = os.fstat(fd).st_size
        is_regular = stat.S_ISREG(os.fstat(fd).st_mode) and size > 0
        segs = []
        for i in range(phnum):
            p_type, _flags, off, _vaddr, paddr, filesz, memsz, _align = struct.unpack_from(
                order + "IIQQQQQQ", table, i * phentsize)
            if p_type != _PT_LOAD or paddr == _NO_PADDR or memsz == 0:
                continue
            if is_regular and off + filesz > size and not path.startswith("/proc/"):
                filesz = max(0, size - off)   # a truncated dump: the rest is missing
                memsz = filesz
            segs.append(Segment(paddr, memsz, off, filesz))
        if not segs:
            raise PhysMemError(f"{path}: ELF file has no PT_LOAD segments with physical addresses")
        return segs


class KCore(ElfCore):
    """/proc/kcore: the direct-map and kernel-text PT_LOADs carry p_paddr (root only)."""

    source = "/proc/kcore"

    def __init__(self, path: str = "/proc/kcore") -> None:
        super().__init__(path, use_mmap=False)
        self.sparse_aware = False     # procfs answers SEEK_DATA with "all data" at best


def system_ram_ranges(iomem: str = "/proc/iomem") -> list[tuple[int, int]]:
    """[start, end) of every top-level "System RAM" entry (addresses need root)."""
    out = []
    with open(iomem) as f:
        for line in f:
            if line.startswith(" ") or "System RAM" not in line:
                continue
            span = line.split(":", 1)[0].strip()
            lo, hi = (int(x, 16) for x in span.split("-"))
            if hi:
                out.append((lo, hi + 1))
    return out


class DevMem(PhysicalMemory):
    """/dev/mem, read-only, limited to System RAM (works without CONFIG_STRICT_DEVMEM)."""

    source = "/dev/mem"

    def __init__(self, path: str = "/dev/mem",
                 ranges: Optional[Iterable[tuple[int, int]]] = None) -> None:
        spans = list(ranges) if ranges is not None else system_ram_ranges()
        if not spans:
            raise PhysMemError("no System RAM ranges visible in /proc/iomem (need root)")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        segs = [Segment(s, e - s, s, e - s) for s, e in spans]
        super().__init__(path, segs, fd, use_mmap=False)


def open_memory(path: str, base: Optional[int] = None) -> PhysicalMemory:
    """Open a memory image, detecting its format: ELF core (incl. /proc/kcore), /dev/mem,
    else a raw image starting at `base` (default 0).

    Raises PhysMemError with a one-line reason when the file cannot be used.
    """
    try:
        if os.path.realpath(path) == "/dev/mem":
            return DevMem(path)
        if os.path.realpath(path) == "/proc/kcore":
            return KCore(path)
        with open(path, "rb") as f:
            head = f.read(4)
        if head == _ELF_MAGIC:
            if base is not None:
                raise PhysMemError(f"{path}: --memory-base applies to raw images, not ELF cores")
            return ElfCore(path)
        if os.path.getsize(path) == 0:
            raise PhysMemError(f"{path}: empty file")
        return RawImage(path, base or 0)
    except PhysMemError:
        raise
    except OSError as e:
        raise PhysMemError(f"{path}: {e.strerror or e}") from None


_LOW_MEM = 0x100000     # x86 /dev/mem serves the first MiB of RAM as zeros even when strict


def probe_addr(mem: PhysicalMemory) -> int:
    """A RAM address to test a live source with: the first page at or above 1 MiB.

    With CONFIG_STRICT_DEVMEM, x86 devmem_is_allowed() lets RAM below 1 MiB be read (as
    zeros) and refuses everything above it, so a probe of the first RAM page would pass
    and every real read would then fail.
    """
    for lo, hi in mem.ranges:
        at = max(lo, _LOW_MEM)
        if at + 8 <= hi:
            return at
    return mem.ranges[0][0]


def open_devmem(path: str = "/dev/mem", iomem: str = "/proc/iomem") -> DevMem:
    """/dev/mem over /proc/iomem's System RAM, checked to really serve RAM above 1 MiB."""
    try:
        ranges = system_ram_ranges(iomem)
    except OSError as e:
        raise PhysMemError(f"{iomem}: {e.strerror or e}") from None
    mem = DevMem(path, ranges)
    try:
        at = probe_addr(mem)
        try:
            mem.read(at, 8)
        except PhysMemError as e:
            raise PhysMemError(f"{path} refuses System RAM (read at 0x{at:x}: "
                               f"{str(e).rsplit(': ', 1)[-1]}; CONFIG_STRICT_DEVMEM)") from None
    except BaseException:
        mem.close()
        raise
    return mem


def open_kcore(path: str = "/proc/kcore") -> KCore:
    """/proc/kcore, checked to be readable and to map System RAM."""
    mem = KCore(path)
    try:
        at = probe_addr(mem)
        mem.read(at, 8)
    except BaseException:
        mem.close()
        raise
    return mem


def open_live_memory(devmem: str = "/dev/mem", kcore: str = "/proc/kcore",
                     iomem: str = "/proc/iomem") -> PhysicalMemory:
    """The running kernel's physical memory: /dev/mem if it serves RAM, else /proc/kcore.

    `.source` says which one was used (distribution kernels set CONFIG_STRICT_DEVMEM,
    which makes /dev/mem refuse RAM).
    """
    errors = []
    try:
        return open_devmem(devmem, iomem)
    except (OSError, PhysMemError) as e:
        errors.append(f"{devmem}: {_why(e)}")
    try:
        return open_kcore(kcore)
    except (OSError, PhysMemError) as e:
        errors.append(f"{kcore}: {_why(e)}")
    raise PhysMemError("no readable physical memory (" + "; ".join(errors) + ")")


def _why(e: BaseException) -> str:
    """An OSError's strerror (no repeated path), else the message."""
    if isinstance(e, OSError) and not isinstance(e, PhysMemError) and e.strerror:
        return e.strerror
    return str(e)


def write_elf_core(path: str, chunks: Iterable[tuple[int, bytes]], *,
                   machine: int = 62) -> None:
    """Write an ELF64 core with one PT_LOAD per (phys, data) chunk (p_paddr = phys).

    Adjacent chunks are merged. machine 62 is EM_X86_64 (183 = EM_AARCH64).
    """
    merged: list[list[Any]] = []   # [phys, bytearray]
    for phys, data in sorted(chunks, key=lambda c: c[0]):
        if merged and merged[-1][0] + len(merged[-1][1]) == phys:
            merged[-1][1] += data
        else:
            merged.append([phys, bytearray(data)])
    phnum = len(merged)
    ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", _ELF_MAGIC, 2, 1, 1, 0, 0, b"\0" * 7,
                       4, machine, 1, 0, 64, 0, 0, 64, 56, phnum, 0, 0, 0)
    offset = 64 + 56 * phnum
    offset = (offset + 4095) & ~4095
    phdrs = bytearray()
    for phys, data in merged:
        phdrs += struct.pack("<IIQQQQQQ", _PT_LOAD, 6, offset, 0, phys, len(data), len(data), 0)
        offset += len(data)
    with open(path, "wb") as f:
        f.write(ehdr)
        f.write(phdrs)
        f.seek((64 + 56 * phnum + 4095) & ~4095)
        for _, data in merged:
            f.write(data)
