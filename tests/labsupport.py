"""Helpers for the real-kernel lab tests: where the lab kernels and the rootfs cache are,
read an ELF memory dump by physical address, check coverage of pages by radix-tree blocks,
and walk a (possibly truncated) FDT header.
"""

from __future__ import annotations

import bisect
import json
import mmap
import os
import struct
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kho_agent.abi.fdt import parse_header

PAGE_SIZE = 4096
FDT_MAGIC = 0xD00DFEED

REPO = Path(__file__).resolve().parents[1]
SHARED_LAB = REPO.parent / "shared/lab"             # the prebuilt lab kernels (optional)
KERNEL_A = SHARED_LAB / "bzImage-7.2.13-kho"         # kho-v4, release 7.2.13
KERNEL_B = SHARED_LAB / "bzImage-7.2.13-lab-b"       # the same ABI, release 7.2.13-lab-b
KERNEL_V3 = SHARED_LAB / "bzImage-7.2.13-abi-kho-v3"  # KHO ABI kho-v3: a mismatch
LAB_CACHE = Path(os.environ.get("KHO_LAB_CACHE", REPO / ".lab/cache"))


@dataclass
class ElfCore:
    """A QEMU dump-guest-memory ELF core; read(pa, n) reads guest-physical bytes."""

    path: Path
    loads: list[tuple[int, int, int]] = field(default_factory=list)  # (paddr, filesz, offset)

    def __post_init__(self) -> None:
        self._f = open(self.path, "rb")
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)
        if self._mm[:4] != b"\x7fELF" or self._mm[4] != 2:
            raise ValueError(f"{self.path}: not an ELF64 file")
        phoff = struct.unpack_from("<Q", self._mm, 0x20)[0]
        phentsize, phnum = struct.unpack_from("<HH", self._mm, 0x36)
        for i in range(phnum):
            ph = phoff + i * phentsize
            p_type, _flags, off, _va, pa, filesz = struct.unpack_from("<IIQQQQ", self._mm, ph)
            if p_type == 1:  # PT_LOAD
                self.loads.append((pa, filesz, off))

    def read(self, pa: int, n: int) -> bytes:
        for base, size, off in self.loads:
            if base <= pa and pa + n <= base + size:
                return self._mm[off + pa - base : off + pa - base + n]
        raise KeyError(f"physical range 0x{pa:x}+0x{n:x} is not in the dump")

    def close(self) -> None:
        self._mm.close()
        self._f.close()


@dataclass
class Coverage:
    """Merged, sorted [start, end) byte ranges, from inspect's [phys, order, count] blocks."""

    starts: list[int]
    ends: list[int]

    @classmethod
    def from_blocks(cls, blocks: Iterable[Sequence[int]], page_size: int = PAGE_SIZE) -> Coverage:
        spans = sorted((p, p + c * (page_size << o)) for p, o, c in blocks)
        starts: list[int] = []
        ends: list[int] = []
        for s, e in spans:
            if ends and s <= ends[-1]:
                ends[-1] = max(ends[-1], e)
            else:
                starts.append(s)
                ends.append(e)
        return cls(starts, ends)

    def covers(self, pa: int, n: int = PAGE_SIZE) -> bool:
        i = bisect.bisect_right(self.starts, pa) - 1
        return i >= 0 and pa + n <= self.ends[i]


def root_u64_props(fdt: bytes) -> list[tuple[int, int]]:
    """(nameoff, little-endian value) of each 8-byte property of the root node.

    Tolerates truncation: stops at the first token that runs past the end of `fdt`,
    so it works without the strings block (names stay as offsets).
    """
    hdr = parse_header(fdt)
    p, depth, out = hdr.off_dt_struct, 0, []
    while p + 4 <= len(fdt):
        tok = struct.unpack_from(">I", fdt, p)[0]
        p += 4
        if tok == 1:  # BEGIN_NODE
            end = fdt.find(b"\0", p)
            if end < 0:
                break
            p = (end + 4) & ~3
            depth += 1
        elif tok == 3:  # PROP
            if p + 8 > len(fdt):
                break
            ln, nameoff = struct.unpack_from(">II", fdt, p)
            p += 8
            if p + ln > len(fdt):
                break
            if depth == 1 and ln == 8:
                out.append((nameoff, struct.unpack_from("<Q", fdt, p)[0]))
            p = (p + ln + 3) & ~3
        elif tok == 2:  # END_NODE
            depth -= 1
        elif tok == 4:  # NOP
            continue
        else:  # END or garbage
            break
    return out


# --- lab guests with a Debian rootfs (tests/test_lab_guest.py, tests/test_lab_agent.py) ---------

def lab_guest_skip_reason(kernels: Sequence[Path]) -> str:
    """Why a lab guest cannot run here ("" if it can)."""
    import shutil

    from kho_fleet.lab.qemu import find_qemu
    for k in kernels:
        if not Path(k).is_file():
            return f"lab kernel not found: {k}"
    if find_qemu() is None:
        return "qemu-system-x86_64 not found on PATH"
    if shutil.which("qemu-img") is None:
        return "qemu-img not found (Debian package qemu-utils)"
    return ""


def rootfs_skip_reason(cache: Path, kernel: Path, extra_kernels: Sequence[Path]) -> str:
    """Why the lab rootfs for these kernels cannot be had here ("" if it is cached, or can
    be built: root and debootstrap, or apt-get to install it)."""
    import os
    import shutil

    from kho_fleet.lab.guest import lab_key
    from kho_fleet.lab.rootfs import cached_rootfs
    if cached_rootfs(cache, kernel, lab_key(cache).public,
                     extra_kernels=list(extra_kernels)) is not None:
        return ""
    have_tool = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin")
    if os.geteuid() != 0 or not (have_tool or shutil.which("apt-get")):
        return "no cached lab rootfs, and debootstrap is unavailable (needs root + debootstrap)"
    return ""


def boot_lab_guest(work: Path, cache: Path, kernel: Path, extra_kernels: Sequence[Path],
                   repo: Path, agent_pyz: str):  # -> (LabGuest, note) or raises pytest outcomes
    """Build (or reuse) the cached rootfs, boot a guest on `kernel`, copy the agent zipapp.

    Skips (with the reason printed) when qemu, a kernel or debootstrap is missing."""
    import time

    import pytest

    from kho_fleet.lab.guest import GuestError, LabGuest, lab_key
    from kho_fleet.lab.rootfs import RootfsError, build_rootfs

    why = lab_guest_skip_reason([kernel, *extra_kernels]) or \
        rootfs_skip_reason(cache, kernel, extra_kernels)
    if why:
        print(f"\nlab guest skipped: {why}")
        pytest.skip(why)
    key = lab_key(cache)
    t0 = time.monotonic()
    try:
        image = build_rootfs(cache, kernel, key.public, extra_kernels=list(extra_kernels))
    except RootfsError as e:
        pytest.fail(f"lab rootfs: {e}")
    rootfs_s = time.monotonic() - t0
    from kho_fleet.agentbuild import build_agent
    pyz, _ = build_agent(str(work / "kho-agent.pyz"))     # the product's zipapp (exit codes!)
    g = LabGuest(work, kernel, image, key)
    try:
        boot_s = g.start()
    except GuestError as e:
        g.stop()
        pytest.fail(f"lab guest did not boot: {e}")
    print(f"\nlab guest: rootfs {rootfs_s:.1f}s, boot to SSH {boot_s:.1f}s (port {g.port}, "
          f"serial {g.serial_path})")
    g.put(pyz, agent_pyz)
    return g


def kho_fleet_cli(*args: Any, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    """`kho-fleet ARGS` in a subprocess of this interpreter (stdout, stderr captured as text)."""
    return subprocess.run([sys.executable, "-m", "kho_fleet.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def guest_agent(g: Any, pyz: str, *args: str, timeout: float = 300.0) -> tuple[int, Any, str]:
    """`python3 PYZ ARGS --json` on lab guest `g`: exit code, decoded JSON (None if the
    output is not JSON) and stderr."""
    rc, out, err = g.run(["python3", pyz, *args, "--json"], timeout=timeout)
    try:
        data = json.loads(out) if out.strip() else None
    except ValueError:
        data = None
    return rc, data, err.strip()
