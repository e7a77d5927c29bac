"""Serialise a memfd as memfd_luo_preserve() does (abi/memfd.py)."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from typing import Callable

from ..memfd import _PFN_MASK, FOLIO_SER, MEMFD_SER, MemfdFolio
from ..vmalloc import KhoVmalloc
from .vmalloc import write_vmalloc

__all__ = ["encode_memfd_ser", "write_memfd", "write_memfd_array", "folio_array"]


def encode_memfd_ser(pos: int, size: int, seals: int, flags: int, nr_folios: int,
                     folios: KhoVmalloc) -> bytes:
    """The packed struct memfd_luo_ser."""
    return MEMFD_SER.pack(pos, size, seals, flags, nr_folios) + folios.pack()


def write_memfd(size: int, folios: Sequence[MemfdFolio], page_size: int,
                alloc: Callable[[], int], write: Callable[[int, bytes], None], *,
                pos: int = 0, seals: int = 0) -> tuple[int, list[tuple[int, int]]]:
    """Serialise a memfd as memfd_luo_preserve() does; folio data pages are the caller's.

    Returns (phys of memfd_luo_ser, [(pa, order)] to preserve: the ser page and the
    folio-array vmalloc pages; the folios themselves are preserved by the caller).
    """
    arr = b"".join(FOLIO_SER.pack((f.pfn & _PFN_MASK) | (f.flags << 52), f.index)
                   for f in folios)
    return write_memfd_array(size, len(folios), arr, page_size, alloc, write,
                             pos=pos, seals=seals)


def folio_array(pfns: Sequence[int], indices: Sequence[int], flags: int) -> bytes:
    """The packed folio array (struct memfd_luo_folio_ser[]) of folios with one set of
    `flags`: what write_memfd packs from MemfdFolio objects, built from two int lists
    without an object per folio (a GiB of order-0 pages is 262,144 folios)."""
    words = array("Q", bytes(16 * len(pfns)))
    flag = flags << 52
    words[0::2] = array("Q", [(p & _PFN_MASK) | flag for p in pfns])
    words[1::2] = array("Q", indices)
    if sys.byteorder != "little":
        words.byteswap()
    return words.tobytes()


def write_memfd_array(size: int, nr_folios: int, arr: bytes, page_size: int,
                      alloc: Callable[[], int], write: Callable[[int, bytes], None], *,
                      pos: int = 0, seals: int = 0) -> tuple[int, list[tuple[int, int]]]:
    """write_memfd() with the folio array already packed (`arr`: `nr_folios` entries)."""
    ser_pa = alloc()
    preserve: list[tuple[int, int]] = [(ser_pa, 0)]
    if nr_folios:
        desc, pages = write_vmalloc(arr, page_size, alloc, write)
        preserve += [(p, 0) for p in pages]
    else:
        desc = KhoVmalloc(0, 0, 0, 0)
    write(ser_pa, encode_memfd_ser(pos, size, seals, 0, nr_folios, desc).ljust(page_size, b"\0"))
    return ser_pa, preserve
