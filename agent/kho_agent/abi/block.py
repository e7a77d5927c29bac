"""KHO serialization block chains: page-sized blocks linked by physical address.

Mirrors struct kho_block_header_ser in include/linux/kho/abi/block.h and
kho_block_set_restore() in kernel/liveupdate/kho_block.c: each block is one page, a
{u64 next; u64 count} header followed by `count` packed entries; next == 0 ends the
chain; the kernel caps a chain at KHO_MAX_BLOCKS and refuses cycles and bad counts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .memory import MemoryReadError, Reader

__all__ = ["HEADER", "KHO_MAX_BLOCKS", "BlockChain", "per_block", "read_block_chain"]

HEADER = struct.Struct("<QQ")   # struct kho_block_header_ser (packed)
KHO_MAX_BLOCKS = 10000


def per_block(page_size: int, entry_size: int) -> int:
    """count_per_block of KHO_BLOCK_SET_INIT: entries that fit after the header."""
    return (page_size - HEADER.size) // entry_size


@dataclass
class BlockChain:
    """Entries read from a chain, the block addresses, and what went wrong (if anything)."""

    entries: list[bytes] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.errors


def read_block_chain(read: Reader, head_pa: int, entry_size: int, page_size: int, *,
                     what: str = "block chain", max_blocks: int = KHO_MAX_BLOCKS) -> BlockChain:
    """Read every entry of the chain starting at `head_pa` (0: an empty chain).

    Stops, with an error, at a cycle, an unaligned or unreadable block, a count of 0 or
    more than fits a block (the kernel's own checks), or after `max_blocks` blocks.
    """
    out = BlockChain()
    cap = per_block(page_size, entry_size)
    seen: set[int] = set()
    pa = head_pa
    while pa:
        where = f"{what} block 0x{pa:x}"
        if pa % page_size:
            out.errors.append(f"{where}: not page-aligned")
            break
        if pa in seen:
            out.errors.append(f"{where}: visited twice (cycle)")
            break
        if len(seen) >= max_blocks:
            out.errors.append(f"{what}: more than {max_blocks} blocks")
            break
        seen.add(pa)
        try:
            page = read(pa, page_size)
        except MemoryReadError as e:
            out.errors.append(f"{where}: unreadable ({e})")
            break
        nxt, count = HEADER.unpack_from(page, 0)
        if count == 0 or count > cap:
            out.errors.append(f"{where}: invalid entry count {count} (1..{cap})")
            break
        out.blocks.append(pa)
        for i in range(count):
            off = HEADER.size + i * entry_size
            out.entries.append(bytes(page[off:off + entry_size]))
        pa = nxt
    return out
