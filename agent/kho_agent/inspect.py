"""Decode everything KHO/LUO left in a physical-memory image into one JSON-ready report.

Finds the KHO root FDT (given, or by scanning page-aligned memory for an FDT whose root
compatible is `kho-vN`), walks the radix tree, and decodes kexec-metadata and LUO
(sessions, files, memfd folios, checked against the tree). Schema: docs/inspect-json.md.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

from .abi import luo as luo_abi
from .abi import metadata as md_abi
from .abi.fdt import FDT_MAGIC, FdtError, parse_header
from .abi.kho import KhoRoot, decode_kho_fdt
from .abi.memory import MemoryReadError
from .abi.radix import RadixWalk, geometry, walk_radix
from .abi.versions import UnsupportedAbi, page_shift
from .errors import InputError
from .physmem import PhysicalMemory

__all__ = ["InspectError", "FdtCandidate", "find_kho_fdts", "inspect_memory",
           "covered", "SCHEMA"]

SCHEMA = "kho-fleet/inspect/v1"
_MAGIC = FDT_MAGIC.to_bytes(4, "big")
_SCAN_CHUNK = 16 << 20


class InspectError(InputError):
    """The input cannot be decoded at all (no KHO FDT, unsupported ABI, bad page size)."""


@dataclass
class FdtCandidate:
    """A page-aligned FDT found in memory: its address and decoded root (or why not)."""

    phys: int
    root: Optional[KhoRoot] = None
    error: Optional[str] = None
    walk: Optional[RadixWalk] = field(default=None, repr=False)


def find_kho_fdts(mem: PhysicalMemory, page_size: int, *, limit: int = 256) -> list[FdtCandidate]:
    """Every page-aligned FDT in `mem` whose root compatible starts with "kho-".

    Bounded whatever the dump size or content: memory is read one `_SCAN_CHUNK` window
    at a time (resident: one window plus one page per candidate, and at most `limit`
    candidates kept), and only where the source may hold non-zero bytes
    (`mem.data_ranges()`: holes of sparse files and zero tails of ELF segments are
    skipped, not read). Only the first 4 bytes of each page are compared, so a window
    full of FDT magic costs one candidate check per page, never one per byte.
    """
    found: list[FdtCandidate] = []
    for pos, n in _scan_windows(mem, page_size):
        if len(found) >= limit:
            break
        try:
            chunk = mem.read(pos, n)
        except MemoryReadError:
            # a hole or an unreadable page inside the chunk (/dev/mem refuses some):
            # look at the first bytes of each page instead of skipping 16 MiB
            hits = []
            for page in range(pos, pos + n, page_size):
                try:
                    if mem.read(page, 4) == _MAGIC:
                        hits.append(page)
                except MemoryReadError:
                    continue
        else:
            hits = [pos + off for off in _magic_pages(chunk, page_size)
                    if _may_be_kho_fdt(chunk, off, page_size)]
            del chunk
        for phys in hits:
            if len(found) >= limit:
                break
            cand = _candidate(mem, phys, page_size)
            if cand is not None:
                found.append(cand)
    return found


def _scan_windows(mem: PhysicalMemory, page_size: int) -> Iterator[tuple[int, int]]:
    """(phys, length) windows of at most `_SCAN_CHUNK` bytes, page-aligned, covering
    every page of `mem` whose first bytes may be non-zero, each page once."""
    ranges = mem.ranges
    starts = [r[0] for r in ranges]
    data = mem.data_ranges() if hasattr(mem, "data_ranges") else iter(ranges)
    done = -1
    for lo, hi in data:
        i = bisect.bisect_right(starts, lo) - 1
        if i < 0 or hi <= lo:
            continue
        r_lo, r_hi = ranges[i]
        lo = max(lo - lo % page_size, r_lo, done)    # the page holding the first byte
        lo += -lo % page_size
        hi = min(hi + (-hi % page_size), r_hi)
        while lo < hi:
            n = min(_SCAN_CHUNK, hi - lo)
            yield lo, n
            lo += n
        done = max(done, hi)


def _magic_pages(chunk: bytes, page_size: int) -> list[int]:
    """Offsets (multiples of `page_size`) in `chunk` of the pages that begin with the FDT
    magic: the first 4 bytes of every page are gathered by a strided view, then searched."""
    usable = len(chunk) - len(chunk) % 4
    if usable <= 0:
        return []
    with memoryview(chunk) as mv, mv[:usable] as head, head.cast("I") as words:
        firsts = words[::page_size // 4].tobytes()
    out = []
    j = firsts.find(_MAGIC)
    while j >= 0:
        if j % 4 == 0:
            out.append(j // 4 * page_size)
        j = firsts.find(_MAGIC, j + 1)
    return out


def _may_be_kho_fdt(chunk: bytes, off: int, page_size: int) -> bool:
    """Cheap test on the bytes already read: a plausible totalsize and "kho-v" inside.
    False only when `_candidate` would surely say no (pages full of lying headers)."""
    total = int.from_bytes(chunk[off + 4:off + 8], "big")
    if len(chunk) < off + 8 or not 40 < total <= page_size:
        return len(chunk) < off + 8
    return off + total > len(chunk) or chunk.find(b"kho-v", off, off + total) >= 0


def _candidate(mem: PhysicalMemory, phys: int, page_size: int) -> Optional[FdtCandidate]:
    try:
        head = mem.read(phys, 40)
        total = parse_header(head).totalsize
        if not 40 < total <= page_size:       # kho_add_subtree keeps it within a page
            return None
        blob = mem.read(phys, total)
        if b"kho-v" not in blob:
            return None
        return FdtCandidate(phys, decode_kho_fdt(blob))
    except UnsupportedAbi as e:
        return FdtCandidate(phys, None, str(e))
    except (FdtError, MemoryReadError):
        return None


def covered(ranges: list[tuple[int, int]], phys: int, length: int) -> bool:
    """True if [phys, phys+length) lies inside one of the sorted, merged `ranges`."""
    i = bisect.bisect_right(ranges, (phys, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= phys and phys + length <= ranges[i][1]


def _pick(cands: list[FdtCandidate], mem: PhysicalMemory, page_size: int,
          mmap_root: Optional[int] = None) -> Optional[FdtCandidate]:
    """The candidate whose tree walks best (intact, most nodes); ties: lowest address."""
    usable = [c for c in cands if c.root is not None
              and (mmap_root is None or c.root.memory_map_root == mmap_root)]
    for c in usable:
        assert c.root is not None
        try:
            g = geometry(page_size, c.root.compatible)
        except UnsupportedAbi:
            continue
        c.walk = walk_radix(mem.read, c.root.memory_map_root, g, in_ram=mem.contains)
    scored = [c for c in usable if c.walk is not None]
    if not scored:
        return None
    return max(scored, key=lambda c: (c.walk.intact, c.walk.nodes, -c.phys))  # type: ignore[union-attr]


def _resolve_root(mem: PhysicalMemory, page_size: int, fdt_blob: Optional[bytes], fdt_name: str
                  ) -> tuple[KhoRoot, str, Optional[int], Optional[RadixWalk], list[str]]:
    """(root, source description, phys of the FDT if in memory, walk if done, notes)."""
    notes: list[str] = []
    if fdt_blob is not None:
        try:
            root = decode_kho_fdt(fdt_blob)
            return root, f"file {fdt_name}", None, None, notes
        except UnsupportedAbi as e:
            raise InspectError(f"{fdt_name}: {e}") from None
        except FdtError as strict_err:
            try:
                partial = decode_kho_fdt(fdt_blob, tolerant=True)
            except UnsupportedAbi as e:
                raise InspectError(f"{fdt_name}: {e}") from None
            except FdtError as e:
                raise InspectError(f"{fdt_name}: not a KHO FDT ({e})") from None
            notes.append(f"{fdt_name}: {strict_err}")
            notes += partial.notes
            best = _pick(find_kho_fdts(mem, page_size), mem, page_size,
                         mmap_root=partial.memory_map_root)
            if best is not None and best.root is not None:
                return (best.root, (f"memory 0x{best.phys:x} (complete copy; {fdt_name} is "
                                    "truncated)"), best.phys, best.walk, notes)
            return (partial, (f"file {fdt_name} (truncated; recovered from the structure "
                              "block)"), None, None, notes)
    cands = find_kho_fdts(mem, page_size)
    best = _pick(cands, mem, page_size)
    if best is None or best.root is None:
        bad = [c.error for c in cands if c.error]
        if bad:
            raise InspectError(bad[0])
        raise InspectError(f"no KHO root FDT found in {mem.source} {mem.path} "
                           f"({mem.size >> 20} MiB scanned)")
    others = [c.phys for c in cands if c is not best and c.root is not None]
    if others:
        notes.append("other KHO FDTs in memory at " + ", ".join(f"0x{p:x}" for p in others))
    return best.root, f"memory scan: 0x{best.phys:x}", best.phys, best.walk, notes


def inspect_memory(mem: PhysicalMemory, *, page_size: int = 4096,
                   fdt_blob: Optional[bytes] = None, fdt_name: str = "fdt") -> dict:
    """Decode KHO/LUO state from `mem` into the inspect JSON (docs/inspect-json.md).

    Raises InspectError when nothing can be decoded; a damaged tree or LUO state is
    reported inside the result instead (radix.intact false, errors lists).
    """
    try:
        page_shift(page_size)
    except UnsupportedAbi as e:
        raise InspectError(str(e)) from None
    root, source, fdt_phys, walk, notes = _resolve_root(mem, page_size, fdt_blob, fdt_name)
    g = geometry(page_size, root.compatible)
    if walk is None:
        walk = walk_radix(mem.read, root.memory_map_root, g, in_ram=mem.contains)
    ranges = walk.ranges()
    out: dict = {
        "schema": SCHEMA,
        "memory": {"path": mem.path, "format": mem.source,
                   "ranges": [list(r) for r in mem.ranges], "bytes": mem.size},
        "kho": {"compatible": root.compatible, "root_fdt_source": source,
                "root_fdt_phys": fdt_phys, "memory_map_root": root.memory_map_root,
                "page_size": page_size, "depth": g.depth, "notes": notes + root.notes},
        "subtrees": [{"name": s.name, "phys": s.phys, "size": s.size,
                      "preserved": covered(ranges, s.phys, max(1, s.size or 1))}
                     for s in root.subtrees],
        "kexec_metadata": None,
        "radix": walk.to_json(),
        "luo": None,
    }
    md = root.subtree(md_abi.NODE_NAME)
    if md is not None:
        out["kexec_metadata"] = _metadata(mem, md.phys, md.size)
    lu = root.subtree(luo_abi.NODE_NAME)
    if lu is not None:
        out["luo"] = _luo(mem, lu.phys, lu.size or 0, page_size, ranges)
    return out


def _metadata(mem: PhysicalMemory, phys: int, size: Optional[int]) -> dict:
    try:
        want = md_abi.METADATA.size if size is None else min(size, md_abi.METADATA.size)
        m = md_abi.decode_metadata(mem.read(phys, want))
        return {**m.to_json(), "phys": phys, "error": None}
    except (MemoryReadError, md_abi.MetadataError) as e:
        return {"phys": phys, "error": str(e)}


def _luo(mem: PhysicalMemory, phys: int, size: int, page_size: int,
         ranges: list[tuple[int, int]]) -> dict:
    try:
        st = luo_abi.read_luo(mem.read, phys, size, page_size)
    except (MemoryReadError, ValueError) as e:
        # e.g. the new kernel frees the LUO blob in early boot (lab README finding 5)
        return {"phys": phys, "error": str(e), "sessions": []}
    res = st.to_json()
    res["phys"] = phys
    res["error"] = None
    for sess, sj in zip(st.sessions, res["sessions"]):
        for f, fj in zip(sess.files, sj["files"]):
            if f.memfd is not None and fj["memfd"] is not None:
                missing = [fo.pfn for fo in f.memfd.folios
                           if not covered(ranges, fo.pfn * page_size, page_size)]
                fj["memfd"]["pfns_in_radix"] = not missing and not f.memfd.errors
                fj["memfd"]["pfns_missing_from_radix"] = missing[:64]
    return res
