"""Build a physical-memory image holding byte-exact KHO/LUO handover state.

What a Linux 7.2 kernel has in RAM just before `kexec -e`: the KHO root FDT, the radix
tree of preserved blocks, kexec-metadata, the LUO blob with serialised sessions, and each
memfd's folios and memfd_luo_ser -- all written with the agent's own ABI encoders.
Used by `make demo`, the twin hosts and the tests.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Sequence

from kho_agent.abi import luo as luo_abi
from kho_agent.abi import memfd as memfd_abi
from kho_agent.abi import metadata as md_abi
from kho_agent.abi.kho import KhoSubtree, encode_kho_fdt
from kho_agent.abi.memory import SparseMemory
from kho_agent.abi.radix import RadixBuilder, geometry

__all__ = ["MemfdSpec", "ImageFacts", "pattern", "build_handover_image"]


@dataclass
class MemfdSpec:
    """A memfd workload: LUO token, size in bytes, and the seed of its byte pattern."""

    token: int
    size: int
    seed: int = 0


@dataclass
class ImageFacts:
    """Ground truth about a generated image, for checking what decoders report."""

    page_size: int
    compatible: str
    fdt_phys: int
    radix_root: int
    node_pages: list[int]
    subtrees: dict[str, tuple[int, int]]
    memfd_pfns: dict[int, list[int]] = field(default_factory=dict)
    memfd_sha256: dict[int, str] = field(default_factory=dict)
    preserved: list[tuple[int, int]] = field(default_factory=list)


def pattern(seed: int, size: int) -> bytes:
    """Deterministic pseudo-random bytes for a workload (same seed, same bytes)."""
    return random.Random(seed).randbytes(size)


def build_handover_image(*, ram_bytes: int = 256 << 20, page_size: int = 4096,
                         compatible: str = "kho-v4", release: str = "7.2.13",
                         kexec_count: int = 1, liveupdate_num: int = 1,
                         sessions: Sequence[tuple[str, Sequence[MemfdSpec]]] = (),
                         serialized: bool = True, scatter_seed: int = 1) -> tuple[SparseMemory, ImageFacts]:
    """An image of RAM as the outgoing kernel leaves it.

    serialized=False leaves LUO as in the running kernel (sessions_pa == 0).
    Memfd folios are scattered over RAM (seeded), as the buddy allocator does.
    """
    mem = SparseMemory(ram_bytes, page_size)
    mem.reserve(0, 1 << 20)                 # low memory: firmware, never handed out
    g = geometry(page_size, compatible)
    tree = RadixBuilder(g, mem.alloc_page)
    preserved: list[tuple[int, int]] = []

    def keep(pa: int, order: int = 0) -> None:
        tree.add(pa, order)
        preserved.append((pa, order))

    fdt_pa = mem.alloc_page()                # kho_alloc_preserve(PAGE_SIZE) at boot
    keep(fdt_pa)
    md_pa = mem.alloc_page()
    keep(md_pa)
    mem.write(md_pa, md_abi.encode_metadata(release, kexec_count))
    luo_pa, flbs_pa = mem.alloc_page(), mem.alloc_page()

    rng = random.Random(scatter_seed)
    facts = ImageFacts(page_size, compatible, fdt_pa, tree.root, [], {})
    specs = []
    for name, memfds in sessions:
        files = []
        for spec in memfds:
            data = pattern(spec.seed, spec.size)
            folios = []
            for index in range(-(-spec.size // page_size)):
                pa = _scattered_page(mem, rng)
                mem.write(pa, data[index * page_size:(index + 1) * page_size])
                keep(pa)
                folios.append(memfd_abi.MemfdFolio(pa // page_size,
                                                   memfd_abi.FOLIO_DIRTY | memfd_abi.FOLIO_UPTODATE,
                                                   index))
            ser_pa, extra = memfd_abi.write_memfd(spec.size, folios, page_size,
                                                  mem.alloc_page, mem.write)
            for pa, order in extra:
                keep(pa, order)
            facts.memfd_pfns[spec.token] = [f.pfn for f in folios]
            facts.memfd_sha256[spec.token] = hashlib.sha256(data).hexdigest()
            files.append(luo_abi.FileSpec(memfd_abi.COMPATIBLE, spec.token, ser_pa))
        specs.append(luo_abi.SessionSpec(name, files))
    if serialized:
        _, pages = luo_abi.write_luo(specs, liveupdate_num, page_size, mem.alloc_page,
                                     mem.write, luo_pa=luo_pa, flbs_pa=flbs_pa)
    else:
        _, pages = luo_abi.write_luo([], liveupdate_num, page_size, mem.alloc_page,
                                     mem.write, luo_pa=luo_pa, flbs_pa=flbs_pa)
    for pa in pages:
        keep(pa)
    subtrees = [KhoSubtree(md_abi.NODE_NAME, md_pa, md_abi.METADATA.size),
                KhoSubtree(luo_abi.NODE_NAME, luo_pa, luo_abi.LUO_SER.size)]
    mem.write(fdt_pa, encode_kho_fdt(compatible, tree.root, subtrees))
    tree.write_to(mem.write)
    facts.node_pages = sorted(tree.nodes)
    facts.subtrees = {s.name: (s.phys, s.size or 0) for s in subtrees}
    facts.preserved = preserved
    return mem, facts


def _scattered_page(mem: SparseMemory, rng: random.Random) -> int:
    """A free page at a random address in the lower 3/4 of RAM (node pages come from the top)."""
    ps = mem.page_size
    lo, hi = (mem.base + (1 << 20)) // ps, (mem.base + mem.size * 3 // 4) // ps
    for _ in range(1 << 16):
        pa = rng.randrange(lo, hi) * ps
        if pa not in mem.pages:
            mem.reserve(pa, ps)
            return pa
    raise MemoryError("no free page found for a workload")
