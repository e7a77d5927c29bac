"""Write the KHO root FDT as kho_out_fdt_setup()/kho_add_subtree() do (abi/kho.py)."""

from __future__ import annotations

from collections.abc import Sequence

from ..fdt import FdtNode, FdtProperty
from ..kho import PROP_BLOB_SIZE, PROP_COMPATIBLE, PROP_MEMORY_MAP, PROP_PRESERVED_DATA, KhoSubtree
from ..versions import kho_abi
from .fdt import build_fdt

__all__ = ["encode_kho_fdt"]


def encode_kho_fdt(compatible: str, memory_map_root: int,
                   subtrees: Sequence[KhoSubtree] = ()) -> bytes:
    """Write a KHO root FDT exactly as Linux does, given subtrees in the order added.

    kho_out_fdt_setup() creates the root with libfdt's sequential-write API (strings
    block in reverse order of first use), and each kho_add_subtree() inserts its node
    right after the root's properties -- so the newest subtree comes first.
    """
    abi = kho_abi(compatible)
    root = FdtNode("", [
        FdtProperty(PROP_COMPATIBLE, compatible.encode() + b"\0"),
        FdtProperty(PROP_MEMORY_MAP, memory_map_root.to_bytes(8, "little")),
    ])
    for sub in reversed(list(subtrees)):
        props = [FdtProperty(PROP_PRESERVED_DATA, sub.phys.to_bytes(8, "little"))]
        if abi.blob_size:
            if sub.size is None:
                raise ValueError(f"{compatible} subtree {sub.name!r} needs a blob size")
            # fdt_setprop() inserts a new property first in the node: blob-size (set
            # second by kho_add_subtree) precedes preserved-data.
            props.insert(0, FdtProperty(PROP_BLOB_SIZE, sub.size.to_bytes(8, "little")))
        root.children.append(FdtNode(sub.name, props))
    order = [PROP_MEMORY_MAP, PROP_COMPATIBLE, PROP_PRESERVED_DATA]
    if abi.blob_size:
        order.append(PROP_BLOB_SIZE)
    # Until the first kho_add_subtree() (whose fdt_pack() moves it to 40) the root FDT keeps
    # fdt_create()'s layout: the reservation map at FDT_ALIGN(40, 16) = 48.
    return build_fdt(root, strings=order, rsvmap_offset=48 if not subtrees else 40)
