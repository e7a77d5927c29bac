"""Write KHO serialization block chains (abi/block.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

from ..block import HEADER, per_block

__all__ = ["write_block_chain"]


def write_block_chain(entries: Sequence[bytes], entry_size: int, page_size: int,
                      alloc: Callable[[], int],
                      write: Callable[[int, bytes], None]) -> tuple[int, list[int]]:
    """Write `entries` as a chain (blocks filled in order); returns (head_pa, blocks).

    An empty list gives head 0 and no blocks, as the kernel leaves it.
    """
    cap = per_block(page_size, entry_size)
    chunks = [entries[i:i + cap] for i in range(0, len(entries), cap)]
    blocks = [alloc() for _ in chunks]
    for i, chunk in enumerate(chunks):
        nxt = blocks[i + 1] if i + 1 < len(blocks) else 0
        body = bytearray(HEADER.pack(nxt, len(chunk)))
        for e in chunk:
            if len(e) != entry_size:
                raise ValueError(f"entry of {len(e)} bytes, expected {entry_size}")
            body += e
        body += bytes(page_size - len(body))
        write(blocks[i], bytes(body))
    return (blocks[0] if blocks else 0), blocks
