"""Preflight: can this host hand its workloads over to the staged kernel right now?

Checks KHO, LUO, kexec_file_load, debugfs, physical-memory access, scratch size, free
memory and page size, and -- the one that silently loses everything if wrong -- that
the staged kernel speaks the running kernel's KHO/LUO/memfd ABI (lab README finding 7).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Optional

from .abi import luo as luo_abi
from .abi.fdt import FdtError
from .abi.kho import decode_kho_fdt
from .abi.versions import UnsupportedAbi
from .kernel import Kernel, KernelError
from .kimage import inspect_kernel_image

__all__ = ["Check", "PreflightResult", "running_abi", "preflight"]


@dataclass
class Check:
    """One preflight check: ok, a one-line detail, and whether failing it blocks kexec."""

    name: str
    ok: bool
    detail: str
    blocking: bool = True


@dataclass
class PreflightResult:
    checks: list[Check] = field(default_factory=list)
    running: dict = field(default_factory=dict)
    target: Optional[dict] = None

    @property
    def ok(self) -> bool:
        return all(c.ok or not c.blocking for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and c.blocking]

    def add(self, name: str, ok: bool, detail: str, blocking: bool = True) -> Check:
        c = Check(name, ok, detail, blocking)
        self.checks.append(c)
        return c

    def to_json(self) -> dict:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks],
                "running": self.running, "target": self.target}


def running_abi(kernel: Kernel) -> dict:
    """The running kernel's KHO/LUO ABI strings and where they were read from.

    kho: debugfs kho/out/fdt (cold boot; may be truncated), else kho/in/fdt (a KHO boot:
    the kernel only accepts its own version), else the running image in /boot.
    luo: the LUO blob in debugfs kho/out/sub_fdts/LUO.
    """
    out: dict = {"release": kernel.release(), "kho": None, "kho_source": None,
                 "luo": None, "memfd": None}
    for rel in ("kho/out/fdt", "kho/in/fdt"):
        blob = kernel.read_debugfs(rel)
        if blob:
            try:
                out["kho"] = decode_kho_fdt(blob, tolerant=True).compatible
                out["kho_source"] = f"debugfs {rel}"
                break
            except (FdtError, UnsupportedAbi) as e:
                out["kho_error"] = f"debugfs {rel}: {e}"
    blob = kernel.read_debugfs("kho/out/sub_fdts/LUO")
    if blob:
        try:
            out["luo"] = luo_abi.decode_luo_ser(blob).compatible
        except ValueError:
            pass
    image = f"/boot/vmlinuz-{out['release']}"
    if (kernel.kind == "linux" and os.path.exists(image)
            and (out["kho"] is None or out["luo"] is None)):
        try:
            info = inspect_kernel_image(image)
            out["kho"] = out["kho"] or info.kho
            out["kho_source"] = out["kho_source"] or image
            out["luo"] = out["luo"] or info.luo
            out["memfd"] = info.memfd
        except OSError:
            pass
    return out


def _scratch(kernel: Kernel) -> list[tuple[int, int]]:
    phys = (kernel.read_debugfs("kho/out/scratch_phys") or b"").split()
    lens = (kernel.read_debugfs("kho/out/scratch_len") or b"").split()
    return [(int(p, 16), int(n, 16)) for p, n in zip(phys, lens)]


def preflight(kernel: Kernel, *, kernel_image: Optional[str] = None,
              initrd: Optional[str] = None, workload_bytes: int = 0,
              page_size: Optional[int] = None, allow_unknown_abi: bool = False) -> PreflightResult:
    """Run every check; nothing here changes the host."""
    r = PreflightResult()
    cmdline = kernel.cmdline()
    kho_dir = kernel.list_debugfs("kho")
    r.add("debugfs", kernel.debugfs_mounted(), "debugfs mounted" if kernel.debugfs_mounted()
          else "debugfs not mounted at /sys/kernel/debug (mount -t debugfs none /sys/kernel/debug)")
    r.add("kho", bool(kho_dir),
          f"KHO enabled (debugfs kho/: {', '.join(sorted(kho_dir))})" if kho_dir else
          "KHO not enabled: no debugfs kho/ (CONFIG_KEXEC_HANDOVER and kho=on"
          + ("" if "kho=on" in cmdline.split() else "; kho=on is not on the command line") + ")")
    lu = kernel.liveupdate_present()
    r.add("liveupdate", lu, "/dev/liveupdate present" if lu else
          "/dev/liveupdate missing (CONFIG_LIVEUPDATE and liveupdate=on"
          + ("" if "liveupdate=on" in cmdline.split()
             else "; liveupdate=on is not on the command line") + ")")
    kx = kernel.kexec_file_load_supported()
    r.add("kexec_file_load", kx, "kexec_file_load available" if kx else
          f"kexec_file_load unavailable: {kernel.kexec_file_load_status()}")
    try:
        with kernel.open_physmem() as mem:
            first = mem.ranges[0][0]
            mem.read(first, 8)
            r.add("physmem", True, f"physical memory readable through {mem.source}")
    except (OSError, KernelError) as e:
        r.add("physmem", False, f"physical memory not readable: {e}")
    ps = kernel.page_size()
    r.add("page_size", page_size in (None, ps),
          f"page size {ps}" if page_size in (None, ps) else
          f"page size {ps}, but the inventory says {page_size}")
    avail = kernel.mem_available()
    need = int(workload_bytes * 1.1)
    r.add("memory", avail >= need, f"MemAvailable {avail >> 20} MiB, workloads need "
          f"{need >> 20} MiB")
    r.running = running_abi(kernel)
    if kernel_image is not None:
        _target_checks(r, kernel, kernel_image, initrd, allow_unknown_abi)
    return r


def _target_checks(r: PreflightResult, kernel: Kernel, image: str, initrd: Optional[str],
                   allow_unknown_abi: bool) -> None:
    try:
        info = inspect_kernel_image(image)
    except OSError as e:
        r.add("target_image", False, f"{image}: {e.strerror}")
        return
    r.target = info.to_json()
    sizes = os.path.getsize(image) + (os.path.getsize(initrd) if initrd else 0)
    scratch = _scratch(kernel)
    if scratch:
        total = sum(n for _, n in scratch)
        largest = max(n for _, n in scratch)
        biggest = max(os.path.getsize(image), os.path.getsize(initrd) if initrd else 0)
        ok = total >= sizes and largest >= biggest
        r.add("scratch", ok, f"KHO scratch {total >> 20} MiB in {len(scratch)} region(s), "
              f"largest {largest >> 20} MiB; kernel+initrd {sizes >> 20} MiB")
    else:
        r.add("scratch", False, "no KHO scratch regions (debugfs kho/out/scratch_len)")
    run = r.running
    if info.kho is None or run.get("kho") is None:
        which = "staged kernel" if info.kho is None else "running kernel"
        why = ("; ".join(info.notes) if info.kho is None
               else run.get("kho_error", "no KHO FDT found"))
        r.add("abi", allow_unknown_abi, f"KHO ABI of the {which} undeterminable ({why})"
              + ("; allowed by --allow-unknown-abi" if allow_unknown_abi else ""))
        return
    problems = [f"{k.upper()} {run[k]} -> {info_v}" for k, info_v in
                (("kho", info.kho), ("luo", info.luo), ("memfd", info.memfd))
                if run.get(k) and info_v and run[k] != info_v]
    if problems:
        r.add("abi", False, f"ABI mismatch: running {run['release']} speaks {run['kho']}, "
              f"staged {info.release or image} speaks {info.kho} ("
              + ", ".join(problems) + "): the new kernel would drop every preserved workload")
    else:
        r.add("abi", True, f"ABI compatible: {run['kho']}"
              + (f", {run['luo']}" if run.get("luo") else "")
              + f" (running from {run['kho_source']}; staged {info.release})")
