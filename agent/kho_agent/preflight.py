"""Preflight: can this host hand its workloads over to the staged kernel right now?

Checks KHO, LUO, kexec_file_load, physical-memory access, scratch size, free memory and
page size, whether the kernel insists on signed kexec images, and -- the one that silently
loses everything if wrong -- that the staged kernel speaks the running kernel's
KHO/LUO/memfd ABI (lab README finding 7). It tells the truth about the host: what it has
(`capabilities`: KHO debugfs, /dev/mem RAM, /proc/kcore, lockdown, signed kexec) and what
could not be checked for want of it (`not_checked`), which the report carries; a missing
debugfs or /dev/mem is not a failure (bytes and PFNs need neither).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Optional

from .abi import luo as luo_abi
from .abi.fdt import FdtError
from .abi.kho import decode_kho_fdt
from .abi.versions import UnsupportedAbi
from .bootproto import BootProtoError, decode_scratch_table
from .capabilities import SNAPSHOT_SKIPPED, Capabilities, kexec_sig_policy, pe_signature_size
from .errors import KhoAgentError
from .kernel import Kernel, KernelError
from .kimage import inspect_kernel_image
from .snapshot import incoming_fdt
from .systemdhost import decide

__all__ = ["Check", "PreflightResult", "running_abi", "probe_capabilities", "preflight"]


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
    capabilities: Optional[Capabilities] = None
    not_checked: list[str] = field(default_factory=list)
    kexec_method: Optional[dict] = None        # systemdhost.MethodDecision.to_json()

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
                "running": self.running, "target": self.target,
                "capabilities": None if self.capabilities is None
                else self.capabilities.to_json(),
                "not_checked": list(self.not_checked), "kexec_method": self.kexec_method}


def running_abi(kernel: Kernel) -> dict:
    """The running kernel's KHO/LUO ABI strings and where they were read from.

    kho: debugfs kho/out/fdt (cold boot; may be truncated), else kho/in/fdt (a KHO boot:
    the kernel only accepts its own version), else the running image in /boot, else the
    incoming FDT the boot protocol handed over (setup_data / device tree, read through
    physical memory: a production kernel has no KHO debugfs).
    luo: the LUO blob in debugfs kho/out/sub_fdts/LUO, else the running image.
    """
    out: dict = {"release": kernel.release(), "kho": None, "kho_source": None,
                 "luo": None, "memfd": None}
    for rel in ("kho/out/fdt", "kho/in/fdt"):
        blob = _debugfs(kernel, rel)
        if blob:
            try:
                out["kho"] = decode_kho_fdt(blob, tolerant=True).compatible
                out["kho_source"] = f"debugfs {rel}"
                break
            except (FdtError, UnsupportedAbi) as e:
                out["kho_error"] = f"debugfs {rel}: {e}"
    blob = _debugfs(kernel, "kho/out/sub_fdts/LUO")
    if blob:
        try:
            out["luo"] = luo_abi.decode_luo_ser(blob).compatible
        except ValueError:
            pass
    if out["kho"] is None or out["luo"] is None:
        for image in kernel.running_images():
            try:
                info = inspect_kernel_image(image)
            except OSError:
                continue
            if info.release != out["release"]:
                continue
            out["kho"] = out["kho"] or info.kho
            out["kho_source"] = out["kho_source"] or image
            out["luo"] = out["luo"] or info.luo
            out["memfd"] = info.memfd
            break
    if out["kho"] is None:
        blob, source = incoming_fdt(kernel)
        if blob:
            try:
                out["kho"] = decode_kho_fdt(blob, tolerant=True).compatible
                out["kho_source"] = f"incoming FDT, {source}"
            except (FdtError, UnsupportedAbi) as e:
                out["kho_error"] = f"incoming FDT, {source}: {e}"
    return out


def _debugfs(kernel: Kernel, rel: str) -> Optional[bytes]:
    try:
        return kernel.read_debugfs(rel)
    except KernelError:
        return None


def _scratch(kernel: Kernel) -> tuple[list[tuple[int, int]], str]:
    """This kernel's KHO scratch areas and where they were read: debugfs, else (a KHO
    boot) the incoming scratch table, which this kernel took over as its own."""
    phys = (_debugfs(kernel, "kho/out/scratch_phys") or b"").split()
    lens = (_debugfs(kernel, "kho/out/scratch_len") or b"").split()
    if phys and lens:
        return [(int(p, 16), int(n, 16)) for p, n in zip(phys, lens)], "debugfs"
    try:
        where = kernel.incoming_kho()
        if where is None or not 0 < where.scratch_table_size <= 1 << 16:
            return [], ""
        with kernel.open_physmem() as mem:
            blob = mem.read(where.scratch_table_addr, where.scratch_table_size)
        return list(decode_scratch_table(blob)), f"incoming scratch table ({where.source})"
    except (KhoAgentError, OSError, BootProtoError):
        return [], ""


def probe_capabilities(kernel: Kernel) -> tuple[Capabilities, dict[str, str]]:
    """The running kernel's capabilities and a one-line detail for each."""
    try:
        kho_dir = kernel.list_debugfs("kho")
    except KernelError:
        kho_dir = []
    access = kernel.physmem_access()
    devmem, devmem_why = access.get("devmem_ram", (False, "not probed"))
    kcore, kcore_why = access.get("kcore", (False, "not probed"))
    lock = kernel.lockdown()
    sig, sig_why = kexec_sig_policy(kernel.kernel_config(), lock)
    caps = Capabilities(kho_debugfs=bool(kho_dir), devmem_ram=devmem, kcore=kcore,
                        lockdown=lock, kexec_sig_required=sig)
    return caps, {"kho_debugfs": ", ".join(sorted(kho_dir)), "devmem_ram": devmem_why,
                  "kcore": kcore_why, "kexec_sig_required": sig_why}


def preflight(kernel: Kernel, *, kernel_image: Optional[str] = None,
              initrd: Optional[str] = None, workload_bytes: int = 0,
              page_size: Optional[int] = None, allow_unknown_abi: bool = False,
              kexec_method: Optional[str] = None,
              allow_fdstore_loss: bool = False) -> PreflightResult:
    """Run every check; nothing here changes the host. `kexec_method` (auto, systemd,
    direct; None skips the check) adds the kexec-method check (kho_agent.systemdhost)."""
    r = PreflightResult()
    cmdline = kernel.cmdline()
    caps, why = probe_capabilities(kernel)
    r.capabilities = caps
    mounted = kernel.debugfs_mounted()
    r.add("debugfs", mounted, "debugfs mounted" if mounted else
          "debugfs not mounted at /sys/kernel/debug (not needed: the boot protocol and "
          "physical memory are read instead)", blocking=False)
    lu = kernel.liveupdate_present()
    if caps.kho_debugfs:
        r.add("kho", True, f"KHO enabled (debugfs kho/: {why['kho_debugfs']})")
    elif lu:
        r.add("kho", True, "KHO enabled (no KHO debugfs; /dev/liveupdate exists, and LUO "
              "only registers it when KHO is on)")
    else:
        r.add("kho", False, "KHO not enabled: no debugfs kho/ and no /dev/liveupdate "
              "(CONFIG_KEXEC_HANDOVER and kho=on"
              + ("" if "kho=on" in cmdline.split() else "; kho=on is not on the command line")
              + ")")
    r.add("liveupdate", lu, "/dev/liveupdate present" if lu else
          "/dev/liveupdate missing (CONFIG_LIVEUPDATE and liveupdate=on"
          + ("" if "liveupdate=on" in cmdline.split()
             else "; liveupdate=on is not on the command line") + ")")
    kx = kernel.kexec_file_load_supported()
    r.add("kexec_file_load", kx, "kexec_file_load available" if kx else
          f"kexec_file_load unavailable: {kernel.kexec_file_load_status()}")
    mem_detail = (f"/dev/mem: {'RAM readable' if caps.devmem_ram else why['devmem_ram']}; "
                  f"/proc/kcore: {'readable' if caps.kcore else why['kcore']}")
    r.add("physmem", caps.physmem, ("physical memory readable (" if caps.physmem else
                                    "no physical-memory access (") + mem_detail + ")",
          blocking=False)
    if not caps.physmem:
        r.not_checked.append(f"{SNAPSHOT_SKIPPED} ({mem_detail})")
    r.add("lockdown", True, f"kernel lockdown: {caps.lockdown}" if caps.lockdown else
          "no kernel lockdown (no /sys/kernel/security/lockdown)", blocking=False)
    ps = kernel.page_size()
    r.add("page_size", page_size in (None, ps),
          f"page size {ps}" if page_size in (None, ps) else
          f"page size {ps}, but the inventory says {page_size}")
    avail = kernel.mem_available()
    need = int(workload_bytes * 1.1)
    r.add("memory", avail >= need, f"MemAvailable {avail >> 20} MiB, workloads need "
          f"{need >> 20} MiB")
    r.running = running_abi(kernel)
    if kexec_method is not None:
        d = decide(kernel, kexec_method, allow_fdstore_loss)
        r.kexec_method = d.to_json()
        others = ", ".join(f"{u.unit} ({u.count}, preserve={u.preserve})" for u in d.fdstores)
        r.add("kexec_method", d.ok, (d.refused or f"{d.method}: {d.why}")
              + (f"; FD stores: {others}" if others else "; no other unit keeps an FD store"))
    if kernel_image is not None:
        _target_checks(r, kernel, kernel_image, initrd, allow_unknown_abi, why)
    elif caps.kexec_sig_required is None:
        r.not_checked.append("signed-kexec policy not known: " + why["kexec_sig_required"])
    # carried with the running kernel's record into the journal, so the report after
    # the kexec still says what the old kernel could not show
    r.running["capabilities"] = caps.to_json()
    r.running["not_checked"] = list(r.not_checked)
    return r


def _target_checks(r: PreflightResult, kernel: Kernel, image: str, initrd: Optional[str],
                   allow_unknown_abi: bool, why: dict[str, str]) -> None:
    try:
        info = inspect_kernel_image(image)
        with open(image, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        r.add("target_image", False, f"{image}: {e.strerror}")
        return
    r.target = info.to_json()
    _signature_check(r, image, head, why["kexec_sig_required"])
    sizes = os.path.getsize(image) + (os.path.getsize(initrd) if initrd else 0)
    scratch, source = _scratch(kernel)
    if scratch:
        total = sum(n for _, n in scratch)
        largest = max(n for _, n in scratch)
        biggest = max(os.path.getsize(image), os.path.getsize(initrd) if initrd else 0)
        ok = total >= sizes and largest >= biggest
        r.add("scratch", ok, f"KHO scratch {total >> 20} MiB in {len(scratch)} region(s), "
              f"largest {largest >> 20} MiB (from {source}); kernel+initrd {sizes >> 20} MiB")
    elif r.capabilities is not None and r.capabilities.kho_debugfs:
        r.add("scratch", False, "no KHO scratch regions (debugfs kho/out/scratch_len)")
    else:
        r.add("scratch", False, "KHO scratch size not checked: no KHO debugfs and no "
              "incoming scratch table (cold boot)", blocking=False)
        r.not_checked.append("KHO scratch size not checked: no KHO debugfs "
                             "(kho/out/scratch_len) and no incoming scratch table")
    run = r.running
    if info.kho is None or run.get("kho") is None:
        which = "staged kernel" if info.kho is None else "running kernel"
        reason = ("; ".join(info.notes) if info.kho is None
                  else run.get("kho_error", "no KHO FDT found"))
        r.add("abi", allow_unknown_abi, f"KHO ABI of the {which} undeterminable ({reason})"
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


def _signature_check(r: PreflightResult, image: str, head: bytes, policy: str) -> None:
    """A kernel that refuses unsigned kexec images gets a signed one, or preflight says so
    (kexec_file_load would fail with EKEYREJECTED / EPERM at stage, after the work)."""
    required = r.capabilities.kexec_sig_required if r.capabilities is not None else None
    sig = pe_signature_size(head)
    signed = f"{sig}-byte PE signature" if sig else "no signature"
    if required is True:
        if sig:
            r.add("kexec_sig", True, f"signed kexec images required ({policy}); {image} "
                  f"carries a {signed} (its key is checked by the kernel at stage)")
        else:
            what = "not a PE image" if sig is None else signed
            r.add("kexec_sig", False, f"the running kernel requires signed kexec images "
                  f"({policy}), and {image} is not signed ({what}): kexec_file_load would "
                  "refuse it; sign it (sbsign) with a key the kernel trusts")
    elif required is None:
        r.add("kexec_sig", False, f"signed-kexec policy unknown ({policy}); {image} has "
              f"{signed if sig is not None else 'no PE header'}", blocking=False)
        r.not_checked.append(f"signed-kexec policy not known: {policy}")
    else:
        r.add("kexec_sig", True, f"unsigned kexec images accepted ({policy})")
