"""Serialise Live Update Orchestrator state as a kernel does at kexec time (abi/luo.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..luo import FILE_SER, FLB_HEADER, LUO_SER, SESSION_SER
from .block import write_block_chain

__all__ = ["FileSpec", "SessionSpec", "write_luo"]


@dataclass
class FileSpec:
    """A file to serialise: handler compatible, token, and the phys of its handler data."""

    compatible: str
    token: int
    data: int


@dataclass
class SessionSpec:
    name: str
    files: list[FileSpec] = field(default_factory=list)


def write_luo(sessions: Sequence[SessionSpec], liveupdate_num: int, page_size: int,
              alloc: Callable[[], int], write: Callable[[int, bytes], None], *,
              luo_pa: Optional[int] = None, flbs_pa: Optional[int] = None) -> tuple[int, list[int]]:
    """Serialise LUO as a kernel does at kexec time; returns (luo_ser phys, pages used).

    luo_pa / flbs_pa: pages the kernel allocated at boot (new ones if None). Pages
    returned are every page written (all must be preserved).
    """
    pages: list[int] = []
    if luo_pa is None:
        luo_pa = alloc()
    if flbs_pa is None:
        flbs_pa = alloc()
    pages += [luo_pa, flbs_pa]
    write(flbs_pa, FLB_HEADER.pack(1, 0).ljust(page_size, b"\0"))
    entries = []
    for s in sessions:
        fents = [FILE_SER.pack(f.compatible.encode(), f.data, f.token) for f in s.files]
        files_pa, blocks = write_block_chain(fents, FILE_SER.size, page_size, alloc, write)
        pages += blocks
        entries.append(SESSION_SER.pack(s.name.encode(), files_pa, len(s.files)))
    sessions_pa, blocks = write_block_chain(entries, SESSION_SER.size, page_size, alloc, write)
    pages += blocks
    write(luo_pa, LUO_SER.pack(b"luo-v5", liveupdate_num, sessions_pa, flbs_pa)
          .ljust(page_size, b"\0"))
    return luo_pa, pages
