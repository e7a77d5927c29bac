"""The simulated Linux 7.2 kernel of a twin host: boot, KHO, kexec (LUO in twinluo.py).

Mirrors, from linux-source-7.2: kernel/liveupdate/kexec_handover.c (kho_init,
kho_populate, kho_mem_retrieve, kho_add_subtree, kexec-metadata) and
kexec_handover_debugfs.c. Every byte in memory is written with the agent's own ABI
encoders (kho_agent.abi); nothing here knows about sockets -- twinkernel.py maps
requests to these calls and `Errno` to error replies.

Deliberate simplifications (documented, observable): a memfd's bytes are copied into its
pages at PRESERVE and again at kexec (the real kernel's pinned folios *are* the file, so
in-place writes up to kexec are carried either way); size changes after PRESERVE, which
the real kernel refuses with EPERM, are not enforced and are ignored.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional

from kho_agent.abi import metadata as md_abi
from kho_agent.abi.encode.kho import encode_kho_fdt
from kho_agent.abi.encode.metadata import encode_metadata
from kho_agent.abi.encode.radix import RadixBuilder
from kho_agent.abi.fdt import FdtError, parse_fdt
from kho_agent.abi.kho import KhoSubtree, decode_kho_fdt
from kho_agent.abi.memory import MemoryReadError
from kho_agent.abi.radix import geometry, walk_radix
from kho_agent.abi.versions import KHO_VERSIONS
from kho_agent.atomicfile import atomic_write

from .kernelimage import make_kernel_image
from .twinluo import KERNEL_DATA, Errno, InSession, LuoMixin, OutSession
from .twinmem import (
    FREE,
    INCOMING,
    KERNEL,
    MIB,
    RESERVED,
    SCRATCH,
    THP_DEFAULT,
    THP_FILE,
    PageCache,
    PhysMem,
    Region,
    page_flags,
    thp_file_text,
)

__all__ = ["Errno", "KernelSpec", "Handoff", "TwinHost", "layout", "known_kho",
           "InSession", "OutSession"]


def _param(cmdline: str, key: str) -> Optional[str]:
    val = None
    for word in cmdline.split():
        k, _, v = word.partition("=")
        if k == key:
            val = v
    return val


@dataclass
class KernelSpec:
    """What a booted kernel is: release, ABI strings (None: not built in), command line."""

    release: str
    kho: Optional[str] = "kho-v4"
    luo: Optional[str] = "luo-v5"
    memfd: Optional[str] = "memfd-v2"
    cmdline: str = "root=/dev/vda rw console=ttyS0 kho=on liveupdate=on panic=-1"
    image: Optional[str] = None

    @property
    def kho_enabled(self) -> bool:
        return self.kho is not None and _param(self.cmdline, "kho") in ("on", "1", "y", "Y")

    @property
    def liveupdate_requested(self) -> bool:
        return (self.luo is not None
                and _param(self.cmdline, "liveupdate") in ("on", "1", "y", "Y"))


@dataclass
class Handoff:
    """What kexec carries into the next kernel: the KHO root FDT address (if any)."""

    fdt_phys: Optional[int]
    release: str


def layout(ram: int, page_size: int) -> dict[str, Region]:
    """Fixed physical regions: firmware low memory, the kernel image, two KHO scratch areas."""
    align = max(2 * MIB, page_size)
    scratch = max(align, (ram // 32) // align * align)
    return {"low": Region("low", 0, MIB),
            "kernel": Region("kernel", 16 * MIB, 8 * MIB),
            "scratch_low": Region("scratch-low", 24 * MIB, scratch),
            "scratch_global": Region("scratch-global", ram - 2 * scratch, 2 * scratch)}


class TwinHost(LuoMixin):
    """One host's kernel state: boot, KHO out/in, LUO sessions, kexec. Single-threaded."""

    def __init__(self, root: str, ram: int, page_size: int, seed: int = 0) -> None:
        self.root = root
        self.ps = page_size
        self.mem = PhysMem(os.path.join(root, "mem.img"), ram, page_size, seed)
        self.regions = layout(ram, page_size)
        self.spec = KernelSpec("none")
        self.loaded: Optional[KernelSpec] = None
        self.boot_count = 0
        self.kexec_count = 0          # from kexec-metadata: kexecs since the last cold boot
        self.boot_time = 0.0
        self.last_faults: dict[str, dict] = {}
        self._reset_state()

    def _reset_state(self) -> None:
        self.kho_on = False
        self.liveupdate = False
        self.tree: Optional[RadixBuilder] = None
        self.fdt_pa = 0
        self.subtrees: list[KhoSubtree] = []
        self.out_fdt_len: Optional[int] = None
        self.luo_pa = self.flbs_pa = 0
        self.liveupdate_num = 0
        self.out_sessions: list[OutSession] = []
        self.session_blocks: list[int] = []
        self.busy_idents: dict[tuple[int, int], str] = {}   # luo_preserved_files
        self.cache = PageCache(self.mem, thp_path=self.path(THP_FILE))
        self.in_sessions: list[InSession] = []
        self.in_blocks: list[int] = []
        self.in_pfns: set[int] = set()   # preserved by the previous kernel, not restored
        self.in_order = bytearray()      # per PFN: 1 + the order it was preserved at, or 0
        self.deserialized = False
        self.deser_err = 0

    # --- host files -------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def put(self, rel: str, data: bytes | str) -> None:
        """Atomically replace ROOT/rel (no fsync: a simulated host's files, rewritten often)."""
        atomic_write(self.path(rel), data.encode() if isinstance(data, str) else data,
                     fsync=False)

    def log(self, msg: str) -> None:
        """printk into ROOT/dmesg."""
        with open(self.path("dmesg"), "a") as f:
            f.write(f"[{time.time() - self.boot_time:12.6f}] {msg}\n")

    def _debugfs(self, rel: str, data: Optional[bytes]) -> None:
        rel = "sys/kernel/debug/kho/" + rel
        if data is None:
            try:
                os.unlink(self.path(rel))
            except FileNotFoundError:
                pass
        else:
            self.put(rel, data)

    def refresh_proc(self) -> None:
        """Rewrite /proc/meminfo (free memory changes with every preserve/retrieve)."""
        total = (self.mem.npages - self.mem.owner.count(RESERVED)) * self.ps // 1024
        free = (self.mem.owner.count(FREE) + self.mem.owner.count(SCRATCH)) * self.ps // 1024
        self.put("proc/meminfo", f"MemTotal:       {total} kB\nMemFree:        {free} kB\n"
                                 f"MemAvailable:   {free} kB\n")

    def _write_boot_files(self) -> None:
        s = self.spec
        self.put("proc/cmdline", s.cmdline + "\n")
        self.put("proc/sys/kernel/osrelease", s.release + "\n")
        self.put("proc/btime", f"{self.boot_time:.6f}\n")
        self.put("proc/pagesize", f"{self.ps}\n")
        self.put("sys/kernel/kexec_loaded", "0\n")
        self.put(THP_FILE, thp_file_text(THP_DEFAULT))     # sysfs: back to the boot default
        os.makedirs(self.path("sys/kernel/debug"), exist_ok=True)
        os.makedirs(self.path("var/lib/kho-agent"), exist_ok=True)
        img = self.path(f"boot/vmlinuz-{s.release}")
        if not os.path.exists(img):
            os.makedirs(os.path.dirname(img), exist_ok=True)
            if s.image and os.path.isfile(s.image):
                shutil.copyfile(s.image, img)
            else:
                make_kernel_image(img, s.release, s.kho or "", s.luo or "", s.memfd or "")
        self.refresh_proc()

    # --- KHO out ------------------------------------------------------------------------------
    def alloc_preserve(self) -> int:
        """kho_alloc_preserve(PAGE_SIZE): a zeroed kernel page, marked in the radix tree."""
        assert self.tree is not None
        pa = self.mem.alloc_page(KERNEL)
        self.tree.add(pa, 0)
        return pa

    def unpreserve_free(self, pas: list[int]) -> None:
        assert self.tree is not None
        for pa in pas:
            self.tree.remove(pa, 0)
        self.mem.free(pa // self.ps for pa in pas)

    def sync_tree(self) -> None:
        """The tree is always current (no finalize since kho-v2): write its node pages."""
        if self.tree is not None:
            self.tree.write_to(self.mem.write)

    def _write_fdt(self) -> None:
        assert self.tree is not None and self.spec.kho is not None
        blob = encode_kho_fdt(self.spec.kho, self.tree.root, self.subtrees)
        self.mem.write(self.fdt_pa, blob.ljust(self.ps, b"\0"))
        if self.out_fdt_len is not None:
            # debugfs kho/out/fdt: a blob whose size was fixed in kho_init (finding 3)
            self._debugfs("out/fdt", blob[:self.out_fdt_len])

    def add_subtree(self, name: str, pa: int, size: int) -> None:
        """kho_add_subtree(): a root subnode and debugfs out/sub_fdts/NAME."""
        self.subtrees.append(KhoSubtree(name, pa, size))
        self._write_fdt()
        self._debugfs(f"out/sub_fdts/{name}", self.mem.read(pa, size))

    # --- boot ---------------------------------------------------------------------------------
    def boot(self, spec: KernelSpec, handoff: Optional[Handoff] = None) -> None:
        """Boot `spec`: cold (handoff None) or after kexec, reviving what KHO preserved."""
        self.spec = spec
        self.boot_time = time.time()
        self.boot_count += 1
        self.loaded = None
        shutil.rmtree(self.path("sys/kernel/debug/kho"), ignore_errors=True)
        self.put("dmesg", "")
        self.log(f"Linux version {spec.release} (kho-fleet twin) #1 SMP")
        self.log(f"Command line: {spec.cmdline}")
        old_nodes: list[int] = []
        in_fdt: Optional[bytes] = None
        keep = bytearray(self.mem.npages)
        if handoff is not None and handoff.fdt_phys is not None and spec.kho_enabled:
            in_fdt, old_nodes = self._kho_populate(handoff.fdt_phys, keep)
        # what the old kernel left and the new one does not keep becomes other data
        self.mem.poison(keep, (self.regions["low"], self.regions["kernel"]))
        self._reset_state()
        mem = self.mem
        mem.owner[:] = bytes(mem.npages)
        mem.mark(self.regions["low"], RESERVED)
        mem.mark(self.regions["kernel"], RESERVED)
        mem.mark(self.regions["scratch_low"], SCRATCH)
        mem.mark(self.regions["scratch_global"], SCRATCH)
        kern = self.regions["kernel"].start
        mem.write(kern, f"Linux version {spec.release} (kho-fleet twin) #1 SMP\n".encode()
                  .ljust(self.ps, b"\0"))
        self.in_pfns = {p for p in range(len(keep)) if keep[p]}
        self.in_order = keep
        for pfn in self.in_pfns:
            mem.owner[pfn] = INCOMING
        for i, pa in enumerate(old_nodes):
            # the incoming tree's nodes were never preserved: early boot reuses them
            mem.fill(pa, None if i == 0 else KERNEL_DATA)
            mem.owner[pa // self.ps] = KERNEL
        self.kho_on = spec.kho_enabled
        if spec.liveupdate_requested and not self.kho_on:
            self.log("luo: Disabling liveupdate because KHO is disabled")
        self.liveupdate = spec.liveupdate_requested and self.kho_on
        in_num = self._luo_early_startup(in_fdt) if self.liveupdate else 0
        in_count = 0
        if self.kho_on:
            in_count = self._kho_init(in_fdt)
            if self.liveupdate:
                self._luo_state_setup(in_num)
            if in_fdt is not None:
                self._kho_in_debugfs(in_fdt)
        self.kexec_count = in_count
        self._write_boot_files()

    def _kho_populate(self, fdt_phys: int, keep: bytearray) -> tuple[Optional[bytes], list[int]]:
        """kho_populate() + kho_mem_retrieve(): validate the handover FDT, walk its tree."""
        own = self.spec.kho
        try:
            blob = self.mem.read(fdt_phys, self.ps)
            fdt = parse_fdt(blob)
        except (FdtError, MemoryReadError) as e:
            self.log(f"KHO: setup: handover FDT (0x{fdt_phys:x}) is invalid: {e}")
            self.log("KHO: disabling KHO revival")
            return None, []
        compat = fdt.root.prop("compatible")
        if compat is None or compat.string() != own:
            # fdt_node_check_compatible() returns 1 for "not compatible"
            self.log(f"KHO: setup: handover FDT (0x{fdt_phys:x}) is incompatible with "
                     f"'{own}': 1")
            self.log("KHO: disabling KHO revival")
            return None, []
        root = decode_kho_fdt(blob)
        size = fdt.header.totalsize
        self.log("KHO: found kexec handover data.")
        walk = walk_radix(self.mem.read, root.memory_map_root, geometry(self.ps, own),
                          in_ram=lambda pa, n: 0 <= pa and pa + n <= self.mem.size)
        if not walk.intact:
            self.log(f"KHO: failed to restore preserved memory: {walk.errors[0]}")
            return None, []
        for pa, order, count in walk.blocks:
            first = pa // self.ps
            keep[first:first + (count << order)] = bytes([order + 1]) * (count << order)
        return blob[:size], walk.node_pages

    def _kho_init(self, in_fdt: Optional[bytes]) -> int:
        """kho_init(): the outgoing tree, root FDT page and kexec-metadata; returns the
        incoming kexec count (0 on a cold boot)."""
        assert self.spec.kho is not None
        self.tree = RadixBuilder(geometry(self.ps, self.spec.kho),
                                 lambda: self.mem.alloc_page(KERNEL))
        self.fdt_pa = self.alloc_preserve()
        self._write_fdt()
        in_count = 0
        if in_fdt is not None:
            in_count = self._kho_in_kexec_metadata(in_fdt)
        md_pa = self.alloc_preserve()
        self.mem.write(md_pa, encode_metadata(self.spec.release, in_count + 1))
        self.add_subtree(md_abi.NODE_NAME, md_pa, md_abi.METADATA.size)
        for name, rel in (("scratch_phys", "start"), ("scratch_len", "size")):
            areas = (self.regions["scratch_low"], self.regions["scratch_global"])
            self._debugfs(f"out/{name}", "".join(f"0x{getattr(a, rel):x}\n" for a in areas)
                          .encode())
        os.makedirs(self.path("sys/kernel/debug/kho/out/sub_fdts"), exist_ok=True)
        if in_fdt is None:
            # only a cold boot exposes out/fdt; its size is fixed here (lab finding 3)
            self.out_fdt_len = len(encode_kho_fdt(self.spec.kho, self.tree.root,
                                                  self.subtrees))
            self._write_fdt()
        self.sync_tree()
        return in_count

    def _kho_in_kexec_metadata(self, in_fdt: bytes) -> int:
        sub = decode_kho_fdt(in_fdt).subtree(md_abi.NODE_NAME)
        if sub is None:
            return 0
        try:
            md = md_abi.decode_metadata(self.mem.read(sub.phys, sub.size or 0))
        except (md_abi.MetadataError, MemoryReadError) as e:
            self.log(f"KHO: {e}")
            return 0
        self.log(f"KHO: exec from: {md.previous_release} (count {md.kexec_count})")
        return md.kexec_count

    def _kho_in_debugfs(self, in_fdt: bytes) -> None:
        """kho_in_debugfs_init(): in/fdt (complete) and in/sub_fdts/NAME, read live."""
        self._debugfs("in/fdt", in_fdt)
        os.makedirs(self.path("sys/kernel/debug/kho/in/sub_fdts"), exist_ok=True)
        for sub in decode_kho_fdt(in_fdt).subtrees:
            if sub.size is None:
                continue
            try:
                self._debugfs(f"in/sub_fdts/{sub.name}", self.mem.read(sub.phys, sub.size))
            except MemoryReadError:
                continue

    # --- memory queries -------------------------------------------------------------------
    def pagemap(self, fd: int, size: int) -> list[int]:
        """/proc/PID/pagemap of a mapping of the file behind `fd`."""
        try:
            return self.cache.pagemap(fd, size)
        except ValueError as e:
            raise Errno(errno.EINVAL, f"pagemap: {e}") from None
        except MemoryError:
            raise Errno(errno.ENOMEM, "pagemap: out of memory") from None

    def page_flags(self, pfns: list[int]) -> list[int]:
        return page_flags(self.mem, pfns)

    # --- kexec ----------------------------------------------------------------------------------
    def shutdown(self) -> Handoff:
        """The old kernel stops: every file reference it held is gone."""
        hand = Handoff(self.fdt_pa if self.kho_on else None, self.spec.release)
        for sess in self.out_sessions:
            for f in sess.files:
                os.close(f.fd)
        self.cache.clear()
        self.out_sessions = []
        return hand

    def kexec_load(self, spec: KernelSpec) -> None:
        self.loaded = spec
        self.put("sys/kernel/kexec_loaded", "1\n")

    def kexec_unload(self) -> None:
        self.loaded = None
        self.put("sys/kernel/kexec_loaded", "0\n")


def known_kho(version: Optional[str]) -> bool:
    """True if the twin can run a kernel speaking `version` (or one without KHO)."""
    return version is None or version in KHO_VERSIONS

