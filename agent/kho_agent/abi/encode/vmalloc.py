"""Preserve a buffer as kho_preserve_vmalloc() does (abi/vmalloc.py)."""

from __future__ import annotations

import struct
from typing import Callable

from ..vmalloc import VMALLOC_ALLOC, KhoVmalloc

__all__ = ["write_vmalloc"]


def write_vmalloc(data: bytes, page_size: int, alloc: Callable[[], int],
                  write: Callable[[int, bytes], None]) -> tuple[KhoVmalloc, list[int]]:
    """Preserve `data` like kho_preserve_vmalloc() (order 0, VM_ALLOC).

    Returns the descriptor and every page to mark preserved (data pages and chunks).
    """
    npages = -(-len(data) // page_size)
    per_chunk = page_size // 8 - 1
    data_pages = []
    for i in range(npages):
        p = alloc()
        write(p, data[i * page_size:(i + 1) * page_size].ljust(page_size, b"\0"))
        data_pages.append(p)
    # kho_preserve_vmalloc starts a new chunk when one fills, so n entries need
    # n // per_chunk + 1 chunks (a full last chunk is followed by an empty one).
    nchunks = npages // per_chunk + 1
    chunks = [alloc() for _ in range(nchunks)]
    for c, pa in enumerate(chunks):
        nxt = chunks[c + 1] if c + 1 < nchunks else 0
        ents = data_pages[c * per_chunk:(c + 1) * per_chunk]
        body = struct.pack(f"<Q{len(ents)}Q", nxt, *ents)
        write(pa, body.ljust(page_size, b"\0"))
    return KhoVmalloc(chunks[0], npages, VMALLOC_ALLOC, 0), data_pages + chunks
