"""KHO vmalloc preservation: a descriptor and a chain of page-sized chunks of page addresses.

Mirrors struct kho_vmalloc, kho_vmalloc_chunk and kho_preserve_vmalloc()/
kho_restore_vmalloc() in include/linux/kho/abi/kexec_handover.h and
kernel/liveupdate/kexec_handover.c: a chunk is {u64 next; u64 phys[]} filling one page,
`phys` zero-terminated; each entry is 2^order contiguous pages.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .memory import MemoryReadError, Reader

__all__ = ["KHO_VMALLOC", "VMALLOC_ALLOC", "VMALLOC_HUGE_VMAP", "KhoVmalloc",
           "VmallocPages", "read_vmalloc_pages", "read_vmalloc"]

KHO_VMALLOC = struct.Struct("<QIHH")   # first (phys), total_pages, flags, order
VMALLOC_ALLOC = 0x0001                  # KHO_VMALLOC_ALLOC
VMALLOC_HUGE_VMAP = 0x0002              # KHO_VMALLOC_HUGE_VMAP
_MAX_CHUNKS = 1 << 16


@dataclass
class KhoVmalloc:
    """struct kho_vmalloc: where the chunk list starts and what it describes."""

    first: int
    total_pages: int
    flags: int
    order: int

    @classmethod
    def unpack(cls, raw: bytes) -> KhoVmalloc:
        return cls(*KHO_VMALLOC.unpack_from(raw, 0))

    def pack(self) -> bytes:
        return KHO_VMALLOC.pack(self.first, self.total_pages, self.flags, self.order)


@dataclass
class VmallocPages:
    """The physical addresses a vmalloc preservation lists, and the chunk pages."""

    phys: list[int] = field(default_factory=list)
    chunks: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def read_vmalloc_pages(read: Reader, desc: KhoVmalloc, page_size: int) -> VmallocPages:
    """Follow the chunk list of `desc`; bounded, cycle-safe, every pointer checked."""
    out = VmallocPages()
    per_chunk = page_size // 8 - 1
    step = page_size << desc.order
    want = -(-desc.total_pages // (1 << desc.order)) if desc.total_pages else 0
    seen: set[int] = set()
    pa = desc.first
    while pa and len(out.phys) < want:
        if pa % page_size or pa in seen or len(seen) >= _MAX_CHUNKS:
            why = "not page-aligned" if pa % page_size else "cycle or too many chunks"
            out.errors.append(f"vmalloc chunk 0x{pa:x}: {why}")
            break
        seen.add(pa)
        try:
            page = read(pa, page_size)
        except MemoryReadError as e:
            out.errors.append(f"vmalloc chunk 0x{pa:x}: unreadable ({e})")
            break
        out.chunks.append(pa)
        words = struct.unpack_from(f"<{per_chunk + 1}Q", page, 0)
        for p in words[1:]:
            if not p or len(out.phys) >= want:
                break
            if p % step:
                out.errors.append(f"vmalloc chunk 0x{pa:x}: page 0x{p:x} "
                                  f"not aligned to order {desc.order}")
                return out
            out.phys.append(p)
        pa = words[0]
    if len(out.phys) < want and not out.errors:
        out.errors.append(f"vmalloc lists {len(out.phys)} of {want} entries")
    return out


def read_vmalloc(read: Reader, desc: KhoVmalloc, page_size: int,
                 length: int) -> tuple[bytes, list[str]]:
    """The first `length` bytes of the preserved vmalloc area, and any errors."""
    pages = read_vmalloc_pages(read, desc, page_size)
    step = page_size << desc.order
    buf = bytearray()
    errors = list(pages.errors)
    for p in pages.phys:
        if len(buf) >= length:
            break
        try:
            buf += read(p, min(step, length - len(buf)))
        except MemoryReadError as e:
            errors.append(f"vmalloc page 0x{p:x}: unreadable ({e})")
            break
    return bytes(buf[:length]), errors
