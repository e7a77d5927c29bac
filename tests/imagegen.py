"""Synthetic KHO/LUO physical-memory images for tests and benches (stdlib + kho_agent only).

`build_image()` lays out, in a `SparseMemory`, what a kernel leaves behind at kexec time:
the KHO root FDT page (kexec-metadata and LUO subtrees), the preserved-memory radix tree,
the kexec-metadata blob, the LUO state (sessions, files) and memfds (memfd_luo_ser, the
vmalloc'ed folio array, the folio data pages). Every blob page is marked preserved in the
tree; the tree's own node pages are not (as in the kernel). `facts` records what was put
where so a test can compare a decoder's output with it.

`write_raw()` / `write_elf()` turn the memory into files `kho-fleet inspect` can read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional

from kho_agent.abi import metadata as md_abi
from kho_agent.abi.encode.kho import encode_kho_fdt
from kho_agent.abi.encode.luo import FileSpec, SessionSpec, write_luo
from kho_agent.abi.encode.memfd import write_memfd
from kho_agent.abi.encode.metadata import encode_metadata
from kho_agent.abi.encode.radix import RadixBuilder
from kho_agent.abi.kho import KhoSubtree
from kho_agent.abi.memfd import COMPATIBLE as MEMFD_COMPATIBLE
from kho_agent.abi.memfd import FOLIO_DIRTY, FOLIO_UPTODATE, MemfdFolio
from kho_agent.abi.memory import SparseMemory
from kho_agent.abi.radix import geometry
from kho_agent.physmem import write_elf_core

__all__ = ["DEFAULT_SESSIONS", "build_image", "rewrite_tree", "write_raw", "write_elf",
           "folio_fill"]

# (session name, [(token, memfd size in bytes), ...])
DEFAULT_SESSIONS: Sequence[tuple[str, Sequence[tuple[int, int]]]] = (
    ("vm-state", ((0x1000, 3 * 4096 + 100), (0x2000, 4096))),
    ("empty-memfd", ((7, 0),)),
)


def folio_fill(token: int, index: int, page_size: int) -> bytes:
    """Recognisable contents of folio `index` of the memfd with `token`."""
    tag = f"memfd {token:#x} folio {index} ".encode()
    return (tag * (page_size // len(tag) + 1))[:page_size]


def build_image(page_size: int = 4096, compatible: str = "kho-v4", *,
                mem_pages: int = 1024, base: int = 0,
                release: str = "7.2.13-kho", kexec_count: int = 3, liveupdate_num: int = 1,
                sessions: Sequence[tuple[str, Sequence[tuple[int, int]]]] = DEFAULT_SESSIONS,
                extra_blocks: Optional[Iterable[tuple[int, int]]] = None,
                memblock: bool = False) -> tuple[SparseMemory, dict]:
    """Build a memory image of `mem_pages` pages at `base`; returns (memory, facts).

    extra_blocks: additional (pfn offset from base, order) blocks to preserve (default: a
    few of orders 0..5 near the bottom of memory; the allocator hands out pages top-down).
    memblock: also add a third subtree "memblock" (a tiny FDT blob) after LUO, as a real
    kernel with reserve_mem does; its FDT is then 345 bytes (233 before LUO and memblock).

    facts keys: page_size, compatible, geometry, base, size, fdt_phys, fdt (the root FDT
    bytes), fdt_before_luo (the FDT as it was when only kexec-metadata was added: what
    debugfs kho/out/fdt shows), radix_root, builder (the RadixBuilder, nodes already
    written), blocks (set of preserved (pa, order)), metadata {phys, size, release, count},
    luo {phys, size, liveupdate_num, pages}, memfds [{session, token, ser_pa, size,
    pfns, folio_flags}], node_pages.
    """
    g = geometry(page_size, compatible)
    size = mem_pages * page_size
    mem = SparseMemory(size, page_size, base)
    alloc = mem.alloc_page
    builder = RadixBuilder(g, alloc)
    blocks: set[tuple[int, int]] = set()

    def preserve(pa: int, order: int = 0) -> None:
        builder.add(pa, order)
        blocks.add((pa, order))

    # The root FDT page (kho_out.fdt is a preserved page) and kexec-metadata.
    fdt_pa = alloc()
    preserve(fdt_pa)
    md_pa = alloc()
    md_blob = encode_metadata(release, kexec_count)
    mem.write(md_pa, md_blob)
    preserve(md_pa)

    # memfds: folio data pages, then memfd_luo_ser + folio array (vmalloc).
    memfds: list[dict] = []
    specs: list[SessionSpec] = []
    for sname, files in sessions:
        spec = SessionSpec(sname)
        for token, nbytes in files:
            nfolios = -(-nbytes // page_size)
            folios = []
            for idx in range(nfolios):
                p = alloc()
                mem.write(p, folio_fill(token, idx, page_size))
                preserve(p)
                folios.append(MemfdFolio(p // page_size, FOLIO_DIRTY | FOLIO_UPTODATE, idx))
            ser_pa, pres = write_memfd(nbytes, folios, page_size, alloc, mem.write)
            for pa, order in pres:
                preserve(pa, order)
            spec.files.append(FileSpec(MEMFD_COMPATIBLE, token, ser_pa))
            memfds.append({"session": sname, "token": token, "ser_pa": ser_pa,
                           "size": nbytes, "pfns": [f.pfn for f in folios],
                           "folio_flags": FOLIO_DIRTY | FOLIO_UPTODATE})
        specs.append(spec)

    luo_pa, luo_pages = write_luo(specs, liveupdate_num, page_size, alloc, mem.write)
    for p in luo_pages:
        preserve(p)

    subtrees = [KhoSubtree(md_abi.NODE_NAME, md_pa, len(md_blob))]
    luo_sub = KhoSubtree("LUO", luo_pa, 32)
    memblock_sub = None
    if memblock:
        from kho_agent.abi.encode.fdt import build_fdt
        from kho_agent.abi.fdt import FdtNode, FdtProperty
        mb = build_fdt(FdtNode("", [FdtProperty("compatible", b"memblock-v2\0")]))
        mb_pa = alloc()
        mem.write(mb_pa, mb)
        preserve(mb_pa)
        memblock_sub = KhoSubtree("memblock", mb_pa, len(mb))

    if extra_blocks is None:
        extra_blocks = [(0, 5), (32, 0), (33, 0), (40, 3), (48, 1)]
    for pfn_off, order in extra_blocks:
        preserve(base + pfn_off * page_size, order)

    def sized(subs: list[KhoSubtree]) -> list[KhoSubtree]:
        if g.compatible == "kho-v2":   # no blob-size property before kho-v3
            return [KhoSubtree(s.name, s.phys, None) for s in subs]
        return subs

    fdt_before_luo = encode_kho_fdt(compatible, builder.root, sized(subtrees))
    subtrees.append(luo_sub)
    if memblock_sub is not None:
        subtrees.append(memblock_sub)
    fdt = encode_kho_fdt(compatible, builder.root, sized(subtrees))
    mem.write(fdt_pa, fdt.ljust(page_size, b"\0"))
    builder.write_to(mem.write)

    facts = {
        "page_size": page_size, "compatible": compatible, "geometry": g, "base": base,
        "size": size, "fdt_phys": fdt_pa, "fdt": fdt, "fdt_before_luo": fdt_before_luo,
        "radix_root": builder.root, "builder": builder, "blocks": blocks,
        "metadata": {"phys": md_pa, "size": len(md_blob), "release": release,
                     "count": kexec_count},
        "luo": {"phys": luo_pa, "size": 32, "liveupdate_num": liveupdate_num,
                "pages": luo_pages},
        "memfds": memfds,
        "node_pages": sorted(builder.nodes),
    }
    return mem, facts


def rewrite_tree(mem: SparseMemory, facts: dict) -> None:
    """Write the builder's nodes to memory again (after builder.add()/remove())."""
    facts["builder"].write_to(mem.write)


def write_raw(mem: SparseMemory, path: str) -> None:
    """A flat image of the whole memory (sparse file; unwritten pages read as zeros)."""
    with open(path, "wb") as f:
        f.truncate(mem.size)
        for phys, data in mem.iter_pages():
            f.seek(phys - mem.base)
            f.write(data)


def write_elf(mem: SparseMemory, path: str, *, hole: bool = True) -> None:
    """An ELF core of the memory. With `hole`, the unused middle of memory is left out,
    so the core has two PT_LOAD segments with a gap (every written page must lie outside
    the gap: build_image uses the bottom for extra blocks and allocates top-down)."""
    full = [(mem.base, mem.size)]
    if hole:
        lo = mem.size // 4 // mem.page_size * mem.page_size
        hi = mem.size // 2 // mem.page_size * mem.page_size
        for phys in mem.pages:
            if mem.base + lo <= phys < mem.base + hi:
                raise ValueError(f"page 0x{phys:x} lies in the ELF hole")
        full = [(mem.base, lo), (mem.base + hi, mem.size - hi)]
    write_elf_core(path, [(start, mem.read(start, n)) for start, n in full])

