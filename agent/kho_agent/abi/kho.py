"""The KHO root FDT: ABI version, radix-tree root, and the preserved subtrees.

Mirrors include/linux/kho/abi/kexec_handover.h and kho_out_fdt_setup()/kho_add_subtree()
in kernel/liveupdate/kexec_handover.c (linux-source-7.2). u64 properties are stored in the
CPU's byte order (the kernel copies a native u64), i.e. little-endian on x86_64/arm64.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from .fdt import Fdt, FdtError, FdtNode, FdtProperty, parse_fdt
from .versions import KhoAbi, kho_abi

__all__ = [
    "PROP_COMPATIBLE",
    "PROP_MEMORY_MAP",
    "PROP_PRESERVED_DATA",
    "PROP_BLOB_SIZE",
    "KhoFdtError",
    "KhoSubtree",
    "KhoRoot",
    "decode_kho_fdt",
]

PROP_COMPATIBLE = "compatible"
PROP_MEMORY_MAP = "preserved-memory-map"     # KHO_FDT_MEMORY_MAP_PROP_NAME
PROP_PRESERVED_DATA = "preserved-data"       # KHO_SUB_TREE_PROP_NAME
PROP_BLOB_SIZE = "blob-size"                 # KHO_SUB_TREE_SIZE_PROP_NAME (kho-v3+)
_COMPAT_VALUE = re.compile(rb"kho-v[0-9]{1,3}\0")


class KhoFdtError(FdtError):
    """A well-formed FDT that is not a usable KHO root FDT."""


@dataclass
class KhoSubtree:
    """A root subnode: a preserved blob at `phys` of `size` bytes (None: not recorded)."""

    name: str
    phys: int
    size: Optional[int]


@dataclass
class KhoRoot:
    """A decoded KHO root FDT. `recovered` is True when names were inferred (truncated)."""

    compatible: str
    abi: KhoAbi
    memory_map_root: int
    subtrees: list[KhoSubtree] = field(default_factory=list)
    recovered: bool = False
    truncated: bool = False
    notes: list[str] = field(default_factory=list)

    def subtree(self, name: str) -> Optional[KhoSubtree]:
        """The subtree called `name`, or None."""
        for s in self.subtrees:
            if s.name == name:
                return s
        return None


def _root_props(fdt: Fdt, notes: list[str]
                ) -> tuple[Optional[FdtProperty], Optional[FdtProperty], bool]:
    """(compatible, preserved-memory-map, recovered) from the root's properties."""
    root = fdt.root
    compat = root.prop(PROP_COMPATIBLE)
    mmap = root.prop(PROP_MEMORY_MAP)
    recovered = False
    unnamed = [p for p in root.props if p.name is None]
    if compat is None:
        # kho_out_fdt_setup() writes `compatible` first; its value alone identifies it.
        compat = next((p for p in unnamed if _COMPAT_VALUE.fullmatch(p.value)), None)
        if compat is not None:
            recovered = True
            notes.append("root 'compatible' recovered from its value (name unresolved)")
    if mmap is None:
        # ... then the memory map: the only other root property, an 8-byte value.
        mmap = next((p for p in unnamed if len(p.value) == 8 and p is not compat), None)
        if mmap is not None:
            recovered = True
            notes.append("'preserved-memory-map' recovered as the root's 8-byte property")
    return compat, mmap, recovered


def _subtree(node: FdtNode, abi: KhoAbi, notes: list[str]) -> tuple[Optional[KhoSubtree], bool]:
    data = node.prop(PROP_PRESERVED_DATA)
    size = node.prop(PROP_BLOB_SIZE)
    unnamed = [p for p in node.props if p.name is None and len(p.value) == 8]
    # kho_add_subtree() sets preserved-data, then blob-size, but fdt_setprop() inserts
    # each new property first in the node: the structure block holds blob-size first.
    if abi.blob_size and data is None and size is None:
        size = unnamed[0] if unnamed else None
        data = unnamed[1] if len(unnamed) > 1 else None
    elif data is None and unnamed:
        data = unnamed[0]
    elif size is None and abi.blob_size and unnamed:
        size = unnamed[0]
    recovered = any(p is not None and p.name is None for p in (data, size))
    if data is None:
        notes.append(f"subnode {node.name!r} has no {PROP_PRESERVED_DATA}: skipped")
        return None, recovered
    if len(data.value) != 8:
        notes.append(f"subnode {node.name!r}: {PROP_PRESERVED_DATA} is {len(data.value)} bytes")
        return None, recovered
    blob_size: Optional[int] = None
    if size is not None and len(size.value) == 8:
        blob_size = size.u64()
    elif abi.blob_size:
        notes.append(f"subnode {node.name!r}: missing or invalid {PROP_BLOB_SIZE}")
    return KhoSubtree(node.name, data.u64(), blob_size), recovered


def decode_kho_fdt(blob: bytes, *, tolerant: bool = False) -> KhoRoot:
    """Decode a KHO root FDT.

    Raises FdtError for a malformed FDT, UnsupportedAbi for an unknown `kho-vN`, and
    KhoFdtError when the root lacks `compatible` or `preserved-memory-map`. With
    `tolerant`, a truncated blob (debugfs kho/out/fdt) still yields the root compatible
    and memory-map root, recovered from the structure block; `notes` says how.
    """
    fdt = parse_fdt(blob, tolerant=tolerant)
    notes = list(fdt.notes)
    compat, mmap, recovered = _root_props(fdt, notes)
    if compat is None:
        raise KhoFdtError("root node has no 'compatible' property: not a KHO FDT")
    compatible = compat.string()
    if not compatible.startswith("kho-"):
        raise KhoFdtError(f"root compatible {compatible!r} is not a KHO ABI string")
    abi = kho_abi(compatible)
    if mmap is None:
        raise KhoFdtError(f"KHO root FDT ({compatible}) has no '{PROP_MEMORY_MAP}'")
    if len(mmap.value) != 8:
        raise KhoFdtError(f"'{PROP_MEMORY_MAP}' is {len(mmap.value)} bytes, expected 8")
    out = KhoRoot(compatible, abi, mmap.u64(), truncated=fdt.truncated, notes=notes)
    for child in fdt.root.children:
        sub, rec = _subtree(child, abi, notes)
        recovered |= rec
        if sub is not None:
            out.subtrees.append(sub)
    out.recovered = recovered
    return out
