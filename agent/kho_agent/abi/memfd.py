"""memfd preservation through LUO (`memfd-v2`): the file's size, seals and folio PFNs.

Mirrors include/linux/kho/abi/memfd.h and memfd_luo_preserve() in mm/memfd_luo.c:
struct memfd_luo_ser {u64 pos; u64 size; u32 seals; u32 flags; u64 nr_folios;
struct kho_vmalloc folios} (packed), the vmalloc'ed array holding struct
memfd_luo_folio_ser {u64 pfn:52, flags:12; u64 index} per folio.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from .memory import Reader
from .vmalloc import KHO_VMALLOC, KhoVmalloc, read_vmalloc

__all__ = ["COMPATIBLE", "MEMFD_SER", "FOLIO_SER", "FOLIO_DIRTY", "FOLIO_UPTODATE",
           "MemfdFolio", "Memfd", "decode_memfd_ser", "read_memfd", "folio_pfns"]

COMPATIBLE = "memfd-v2"                       # MEMFD_LUO_FH_COMPATIBLE
MEMFD_SER = struct.Struct("<QQIIQ")          # + struct kho_vmalloc (16 bytes): 48 packed
MEMFD_SER_SIZE = MEMFD_SER.size + KHO_VMALLOC.size
FOLIO_SER = struct.Struct("<QQ")
FOLIO_DIRTY = 1 << 0                          # MEMFD_LUO_FOLIO_DIRTY
FOLIO_UPTODATE = 1 << 1                       # MEMFD_LUO_FOLIO_UPTODATE
_PFN_MASK = (1 << 52) - 1
_MAX_FOLIOS = 1 << 32                          # memfd_pin_folios() caps at UINT_MAX


@dataclass(frozen=True)
class MemfdFolio:
    """One preserved folio: its PFN, flags (DIRTY, UPTODATE), and page offset in the file."""

    pfn: int
    flags: int
    index: int


@dataclass
class Memfd:
    """A decoded memfd_luo_ser plus its folio list (empty if it could not be read)."""

    pos: int
    size: int
    seals: int
    flags: int
    nr_folios: int
    folios_desc: KhoVmalloc
    folios: list[MemfdFolio] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "pos": self.pos, "size": self.size, "seals": self.seals, "flags": self.flags,
            "nr_folios": self.nr_folios,
            "folios": [[f.pfn, f.index, f.flags] for f in self.folios],
            "errors": list(self.errors),
        }


def decode_memfd_ser(raw: bytes) -> Memfd:
    """Decode the 48-byte struct memfd_luo_ser (folio list not followed)."""
    if len(raw) < MEMFD_SER_SIZE:
        raise ValueError(f"memfd_luo_ser needs {MEMFD_SER_SIZE} bytes, got {len(raw)}")
    pos, size, seals, flags, nr = MEMFD_SER.unpack_from(raw, 0)
    return Memfd(pos, size, seals, flags, nr, KhoVmalloc.unpack(raw[MEMFD_SER.size:]))


def read_memfd(read: Reader, ser_pa: int, page_size: int) -> Memfd:
    """Read the memfd_luo_ser at `ser_pa` and its folio array; errors are collected."""
    m = decode_memfd_ser(read(ser_pa, MEMFD_SER_SIZE))
    if m.nr_folios == 0:
        return m
    fits = m.folios_desc.total_pages * page_size // FOLIO_SER.size + 1
    if m.nr_folios > _MAX_FOLIOS or m.nr_folios > fits:
        m.errors.append(f"nr_folios {m.nr_folios} does not fit the folio array "
                        f"({m.folios_desc.total_pages} pages)")
        return m
    raw, errors = read_vmalloc(read, m.folios_desc, page_size, m.nr_folios * FOLIO_SER.size)
    m.errors += errors
    whole = len(raw) - len(raw) % FOLIO_SER.size
    m.folios += [MemfdFolio(word & _PFN_MASK, word >> 52, index)
                 for word, index in FOLIO_SER.iter_unpack(memoryview(raw)[:whole])]
    return m


def folio_pfns(m: Memfd) -> list[int]:
    """PFNs of the memfd's folios in file order (by index)."""
    return [f.pfn for f in sorted(m.folios, key=lambda f: f.index)]

