"""Physical-memory access as the decoders see it: a `read(phys, length)` callable.

The decoders in this package take such a callable and nothing else, so they run the same
over /dev/mem, an ELF core, a raw image, or the in-memory `SparseMemory` below (used by
the encoders, the digital twin and the tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Callable, Optional

from ..errors import InputError

__all__ = ["MemoryReadError", "Reader", "SparseMemory"]

Reader = Callable[[int, int], bytes]


class MemoryReadError(LookupError, InputError):
    """A physical range that the memory source does not hold (unmapped, outside RAM)."""


class SparseMemory:
    """Page-granular physical memory held in a dict; unwritten pages inside `size` read 0.

    `size` bounds the address space like RAM would: reads or writes beyond it fail.
    """

    def __init__(self, size: int, page_size: int = 4096, base: int = 0) -> None:
        if size <= 0 or size % page_size or base % page_size:
            raise ValueError("size and base must be positive multiples of the page size")
        self.page_size = page_size
        self.base = base
        self.size = size
        self.pages: dict[int, bytearray] = {}
        self._next_free = base + size  # simple top-down page allocator

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The [start, end) physical ranges this memory holds."""
        return [(self.base, self.base + self.size)]

    def _check(self, phys: int, length: int) -> None:
        if length < 0 or phys < self.base or phys + length > self.base + self.size:
            raise MemoryReadError(
                f"physical range 0x{phys:x}+0x{length:x} outside memory "
                f"[0x{self.base:x}, 0x{self.base + self.size:x})")

    def read(self, phys: int, length: int) -> bytes:
        """`length` bytes at physical address `phys`."""
        self._check(phys, length)
        ps = self.page_size
        out = bytearray()
        while length:
            page = phys - phys % ps
            off = phys - page
            n = min(length, ps - off)
            data = self.pages.get(page)
            out += data[off:off + n] if data is not None else bytes(n)
            phys += n
            length -= n
        return bytes(out)

    def write(self, phys: int, data: bytes) -> None:
        """Store `data` at physical address `phys`."""
        self._check(phys, len(data))
        ps = self.page_size
        pos = 0
        while pos < len(data):
            page = (phys + pos) - (phys + pos) % ps
            off = phys + pos - page
            n = min(len(data) - pos, ps - off)
            buf = self.pages.get(page)
            if buf is None:
                buf = self.pages[page] = bytearray(ps)
            buf[off:off + n] = data[pos:pos + n]
            pos += n

    def alloc_page(self) -> int:
        """A fresh zeroed page, handed out top-down (like a simple buddy allocator)."""
        while True:
            self._next_free -= self.page_size
            if self._next_free < self.base:
                raise MemoryError("SparseMemory is out of free pages")
            if self._next_free not in self.pages:
                self.pages[self._next_free] = bytearray(self.page_size)
                return self._next_free

    def reserve(self, phys: int, length: int) -> None:
        """Mark pages as used (zero-filled) so alloc_page() never hands them out."""
        ps = self.page_size
        for page in range(phys - phys % ps, phys + length, ps):
            self.pages.setdefault(page, bytearray(ps))

    def iter_pages(self) -> Iterator[tuple[int, bytes]]:
        """(phys, bytes) of every page that was written, in address order."""
        for page in sorted(self.pages):
            yield page, bytes(self.pages[page])

    def get_page(self, phys: int) -> Optional[bytearray]:
        """The live buffer of a written page (None if never written)."""
        return self.pages.get(phys)
