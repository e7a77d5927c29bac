"""Write a flattened devicetree laid out as libfdt lays it out (see abi/fdt.py).

KHO writes its root FDT with libfdt's sequential-write API, then grows it with
fdt_add_subnode()/fdt_setprop(); `build_fdt` reproduces that byte for byte (encode/kho.py).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import Optional

from ..fdt import (
    _HEADER,
    FDT_BEGIN_NODE,
    FDT_END,
    FDT_END_NODE,
    FDT_MAGIC,
    FDT_PROP,
    HEADER_SIZE,
    FdtError,
    FdtNode,
    _align4,
)

__all__ = ["build_fdt"]


def _walk_names(node: FdtNode) -> Iterator[str]:
    stack = [node]
    while stack:
        n = stack.pop()
        for p in n.props:
            if p.name is None:
                raise FdtError("cannot write a property without a name")
            yield p.name
        stack.extend(reversed(n.children))


def build_fdt(root: FdtNode, *, strings: Optional[Iterable[str]] = None,
              reserved: Iterable[tuple[int, int]] = (), boot_cpuid_phys: int = 0,
              rsvmap_offset: int = HEADER_SIZE) -> bytes:
    """Serialise `root` as a packed version-17 FDT, laid out as libfdt lays it out.

    Layout: header | reservation map (8-aligned, at 40) | structure | strings.
    `strings` fixes the order of the strings block (libfdt's sequential-write API adds
    strings in reverse order of first use); names not listed follow in order of first use.
    """
    used = list(dict.fromkeys(_walk_names(root)))
    table = [s for s in dict.fromkeys(strings or ()) if s in used]
    table += [s for s in used if s not in table]
    offsets: dict[str, int] = {}
    sblob = bytearray()
    for s in table:
        offsets[s] = len(sblob)
        sblob += s.encode() + b"\0"

    body = bytearray()
    # explicit stack of (node, entered) pairs: bounded, no recursion
    work: list[tuple[FdtNode, bool]] = [(root, False)]
    while work:
        node, entered = work.pop()
        if entered:
            body += struct.pack(">I", FDT_END_NODE)
            continue
        name = node.name.encode() + b"\0"
        body += struct.pack(">I", FDT_BEGIN_NODE) + name + b"\0" * (_align4(len(name)) - len(name))
        for p in node.props:
            assert p.name is not None
            body += struct.pack(">III", FDT_PROP, len(p.value), offsets[p.name])
            body += p.value + b"\0" * (_align4(len(p.value)) - len(p.value))
        work.append((node, True))
        for c in reversed(node.children):
            work.append((c, False))
    body += struct.pack(">I", FDT_END)

    rsv = bytearray()
    for addr, size in reserved:
        rsv += struct.pack(">QQ", addr, size)
    rsv += b"\0" * 16
    if rsvmap_offset < HEADER_SIZE or rsvmap_offset % 8:
        raise ValueError(f"reservation map offset {rsvmap_offset} invalid")
    off_rsv = rsvmap_offset  # fdt_pack(): 40; fdt_create() before packing: 48
    off_struct = off_rsv + len(rsv)
    off_strings = off_struct + len(body)
    total = off_strings + len(sblob)
    hdr = _HEADER.pack(FDT_MAGIC, total, off_struct, off_strings, off_rsv, 17, 16,
                       boot_cpuid_phys, len(sblob), len(body))
    return bytes(hdr + bytes(off_rsv - HEADER_SIZE) + rsv + body + sblob)
