"""Snapshot the outgoing radix tree just before kexec, and read the incoming one back.

The tree's node pages are not preserved across kexec (lab README finding 4): the new
kernel walks them in early boot and then reuses them. So the agent walks the live tree
through physical memory before `kexec -e`, carries the result across in its journal,
and after boot reports truthfully whether the incoming tree is still intact.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from .abi.fdt import FdtError
from .abi.kho import KhoRoot, decode_kho_fdt
from .abi.memory import MemoryReadError
from .abi.radix import RadixWalk, geometry, walk_radix
from .abi.versions import UnsupportedAbi
from .capabilities import INCOMING_NOT_WALKED, SNAPSHOT_SKIPPED
from .errors import KhoAgentError
from .inspect import InspectError, covered, find_kho_fdts
from .kernel import Kernel, KernelError
from .physmem import PhysicalMemory

__all__ = ["outgoing_root", "pick_outgoing_fdt", "take_snapshot", "incoming_fdt", "read_incoming"]


def outgoing_root(kernel: Kernel, mem: PhysicalMemory) -> tuple[KhoRoot, str, Optional[int]]:
    """The running kernel's complete outgoing KHO root FDT: (root, source, phys).

    debugfs kho/out/fdt is truncated once subtrees are added, and absent after a KHO
    boot, so the complete copy is found in memory: matched by the debugfs file's
    `preserved-memory-map` when there is one, else the best walking candidate that is
    not the incoming FDT.
    """
    ps = kernel.page_size()
    want: Optional[int] = None
    blob = kernel.read_debugfs("kho/out/fdt")
    if blob:
        try:
            root = decode_kho_fdt(blob)
            return root, "debugfs kho/out/fdt", None
        except (FdtError, UnsupportedAbi):
            try:
                want = decode_kho_fdt(blob, tolerant=True).memory_map_root
            except (FdtError, UnsupportedAbi) as e:
                raise InspectError(f"debugfs kho/out/fdt unreadable: {e}") from None
    inb, _ = incoming_fdt(kernel)
    found = pick_outgoing_fdt(mem, ps, want=want, incoming=inb)
    if found is None:
        raise InspectError("outgoing KHO root FDT not found in memory"
                           + (f" (debugfs kho/out/fdt names root 0x{want:x})" if want else ""))
    root, phys = found
    src = ("memory (debugfs kho/out/fdt is truncated)" if want is not None
           else "memory scan (no debugfs kho/out/fdt: KHO boot)")
    return root, f"{src} at 0x{phys:x}", phys


def _fdt_bytes(blob: bytes) -> bytes:
    """`blob` cut to its FDT header's totalsize (a page-rounded read carries a tail)."""
    total = int.from_bytes(blob[4:8], "big") if len(blob) >= 8 else 0
    return blob[:total] if 0 < total <= len(blob) else blob


def pick_outgoing_fdt(mem: PhysicalMemory, page_size: int, *, want: Optional[int] = None,
                      incoming: Optional[bytes] = None) -> Optional[tuple[KhoRoot, int]]:
    """The running kernel's outgoing root FDT among the KHO FDTs in `mem`: (root, phys).

    `want`: the radix root debugfs names (a truncated kho/out/fdt), when there is one.
    `incoming`: this boot's incoming FDT, which is not the outgoing one. It is told apart by
    its bytes, never by the radix root it names: the incoming tree's node pages are freed
    soon after boot, and the new kernel's outgoing tree may take the very page its root was
    on (seen on the lab after several handovers on one guest) -- two FDTs then name the
    same root, and only the incoming one is to be skipped. Among the rest, the candidate
    whose tree walks intact with the most nodes wins (lower address on a tie).
    """
    skip = _fdt_bytes(incoming) if incoming else None
    best: Optional[tuple[tuple[bool, int, int], KhoRoot, int]] = None
    for c in find_kho_fdts(mem, page_size):
        if c.root is None:
            continue
        if want is not None and c.root.memory_map_root != want:
            continue
        if skip is not None:
            try:
                if bytes(mem.read(c.phys, len(skip))) == skip:
                    continue
            except MemoryReadError:
                pass
        w = walk_radix(mem.read, c.root.memory_map_root, geometry(page_size, c.root.compatible),
                       in_ram=mem.contains)
        score = (w.intact, w.nodes, -c.phys)
        if best is None or score > best[0]:
            best = (score, c.root, c.phys)
    return None if best is None else (best[1], best[2])


def _summary(w: RadixWalk) -> dict:
    return {"root": w.root, "intact": w.intact, "errors": w.errors[:16], "nodes": w.nodes,
            "node_pages": w.node_pages, "blocks": w.blocks,
            "pages_by_order": {str(k): v for k, v in sorted(w.pages_by_order.items())},
            "bytes": w.preserved_bytes}


def take_snapshot(kernel: Kernel, workload_pfns: Optional[dict[str, list[int]]] = None) -> dict:
    """Walk the live outgoing tree; say whether every workload PFN is in it.

    Without any way into physical memory (/dev/mem refusing RAM and no /proc/kcore) the
    snapshot is skipped, not failed: the record says so in `skipped` (the report's
    not_checked), and the workloads are still checked by bytes and PFNs after the kexec.
    """
    ps = kernel.page_size()
    try:
        live = kernel.open_physmem()
    except KernelError as e:
        return {"skipped": f"{SNAPSHOT_SKIPPED} ({e})", "root": None, "blocks": [],
                "memory": None, "page_size": ps, "taken_at": time.time()}
    with live as mem:
        root, source, phys = outgoing_root(kernel, mem)
        w = walk_radix(mem.read, root.memory_map_root, geometry(ps, root.compatible),
                       in_ram=mem.contains)
        snap = _summary(w)
        snap.update({"compatible": root.compatible, "fdt_source": source, "fdt_phys": phys,
                     "memory": mem.source, "page_size": ps, "taken_at": time.time(),
                     "subtrees": {s.name: [s.phys, s.size] for s in root.subtrees}})
    if workload_pfns is not None:
        ranges = w.ranges()
        missing = {key: [p for p in pfns if not covered(ranges, p * ps, ps)][:16]
                   for key, pfns in workload_pfns.items()}
        snap["workload_pfns_missing"] = {k: v for k, v in missing.items() if v}
    return snap


_MAX_FDT = 1 << 20     # a KHO root or sub FDT is a few KiB; anything larger is not one


def incoming_fdt(kernel: Kernel) -> tuple[Optional[bytes], str]:
    """The incoming KHO root FDT and where it came from.

    The boot protocol first (x86 setup_data, arm64 /chosen: every KHO kernel has it; the
    address read through physical memory), so a production kernel and the lab's debug one
    are read the same way; debugfs kho/in/fdt when that cannot be had (no physical-memory
    access), and as a cross-check when both exist (a disagreement is named in the source).
    """
    debug = kernel.read_debugfs("kho/in/fdt")
    try:
        where = kernel.incoming_kho()
    except KhoAgentError as e:
        return (debug, "debugfs kho/in/fdt") if debug else (
            None, f"unreadable boot protocol entry: {e}")
    if where is None or not 0 < where.fdt_size <= _MAX_FDT:
        return (debug, "debugfs kho/in/fdt") if debug else (None, "none")
    try:
        with kernel.open_physmem() as mem:
            data = mem.read(where.fdt_addr, where.fdt_size)
    except (KhoAgentError, OSError) as e:
        if debug:
            return debug, f"debugfs kho/in/fdt ({where.source} FDT unreadable: {e})"
        return None, f"unreadable {where.source} FDT at 0x{where.fdt_addr:x}: {e}"
    source = f"{where.source} {where.path} (0x{where.fdt_addr:x}, via {mem.source})"
    if debug:
        total = int.from_bytes(data[4:8], "big") if len(data) >= 8 else 0
        same = 0 < total <= len(data) and data[:total] == debug[:total]
        source += (", same as debugfs kho/in/fdt" if same
                   else ", DIFFERS from debugfs kho/in/fdt (debugfs used)")
        if not same:
            return debug, source
    return data, source


def _subtree_blob(kernel: Kernel, root: Any, name: str) -> Optional[bytes]:
    """A sub-FDT the incoming root points at, read through physical memory (no debugfs)."""
    for s in root.subtrees:
        if s.name == name and s.size and 0 < s.size <= _MAX_FDT:
            try:
                with kernel.open_physmem() as mem:
                    return bytes(mem.read(s.phys, s.size))
            except (KhoAgentError, OSError):
                return None
    return None


def read_incoming(kernel: Kernel, snapshot: Optional[dict]) -> dict:
    """After boot: the incoming KHO FDT, kexec-metadata, and the state of the old tree.

    Returns {"present", "compatible", "root", "intact", "valid_nodes", "errors",
    "metadata", "matches_snapshot"}; present=False when the new kernel has no kho/in
    (not a KHO boot, or the handover FDT was refused -- e.g. an ABI mismatch).
    """
    from .abi.metadata import MetadataError, decode_metadata
    blob, source = incoming_fdt(kernel)
    if not blob:
        return {"present": False, "root": None, "intact": False, "valid_nodes": 0,
                "errors": [("no incoming KHO FDT (neither debugfs kho/in/fdt nor the boot "
                            "protocol's setup_data / device tree): the new kernel did not take "
                            "the handover (not a KHO boot, or it refused the handover FDT)")]
                + ([source] if source.startswith("unreadable") else []),
                "metadata": None, "fdt_source": None}
    try:
        root = decode_kho_fdt(blob)
    except (FdtError, UnsupportedAbi) as e:
        return {"present": True, "root": None, "intact": False, "valid_nodes": 0,
                "errors": [f"{source}: {e}"], "metadata": None, "fdt_source": source}
    md = None
    mblob = kernel.read_debugfs("kho/in/sub_fdts/kexec-metadata")
    if not mblob:
        mblob = _subtree_blob(kernel, root, "kexec-metadata")
    if mblob:
        try:
            md = decode_metadata(mblob).to_json()
        except MetadataError as e:
            md = {"error": str(e)}
    ps = kernel.page_size()
    if snapshot is not None and snapshot.get("skipped"):
        snapshot = None                   # no snapshot was taken: nothing to compare with
    try:
        live = kernel.open_physmem()
    except KernelError as e:
        return {"present": True, "compatible": root.compatible, "root": root.memory_map_root,
                "intact": False, "valid_nodes": 0, "errors": [f"{INCOMING_NOT_WALKED} ({e})"],
                "metadata": md, "matches_snapshot": None, "fdt_source": source}
    with live as mem:
        w = walk_radix(mem.read, root.memory_map_root, geometry(ps, root.compatible),
                       in_ram=mem.contains)
    errors: list[str] = list(w.errors[:16])
    out = {"present": True, "compatible": root.compatible, "root": root.memory_map_root,
           "intact": w.intact, "valid_nodes": w.nodes, "errors": errors,
           "metadata": md, "matches_snapshot": None, "fdt_source": source}
    # A walk that "succeeds" over a reused root page (zeroed: no children) is not the old
    # tree: the tree is intact only if it still holds what was preserved -- every block
    # of the pre-kexec snapshot, or at least the blobs the incoming FDT points at.
    ranges = w.ranges()
    if snapshot is not None and snapshot.get("root") != root.memory_map_root:
        errors.append(f"incoming root 0x{root.memory_map_root:x} is not the "
                             f"snapshot's 0x{snapshot.get('root', 0):x}")
        out["matches_snapshot"] = False
        out["blocks_held"], out["blocks_total"] = 0, len(snapshot.get("blocks", []))
    elif snapshot is not None:
        want = snapshot.get("blocks", [])
        have = sum(1 for p, o, c in want if covered(ranges, p, c * (ps << o)))
        out["matches_snapshot"] = have == len(want)
        out["blocks_held"], out["blocks_total"] = have, len(want)     # early read (bootrestore)
        if have != len(want):
            errors.append(f"walk found {have} of {len(want)} snapshot block runs")
    missing = [s.name for s in root.subtrees if not covered(ranges, s.phys, max(1, s.size or 1))]
    if missing:
        errors.append("preserved blobs not in the tree: " + ", ".join(missing))
    if out["matches_snapshot"] is False or missing:
        out["intact"] = False
    if not out["intact"]:
        errors.append("tree no longer intact: its node pages were never preserved "
                             "and the new kernel has reused them; the pre-kexec snapshot "
                             "is the record")
    return out


