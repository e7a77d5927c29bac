"""What a host's kernel lets the agent see and do, and what it could not check because of it.

A production kernel is not the lab's debug build: no KHO debugfs, `/dev/mem` refusing RAM
(CONFIG_STRICT_DEVMEM), perhaps kernel lockdown and signed-kexec enforcement. Preflight
probes these (kernel seam: `Kernel.physmem_access`, `lockdown`, `kernel_config`) and the
handover report carries the result as its top-level `capabilities`, with `not_checked`
saying in one line each what was skipped because of a missing capability -- instead of
failing the handover or pretending. Bytes and PFNs never need any of these (pagemap).

Pure functions only (the probes live behind the kernel seam); stdlib, Python 3.9.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Optional

from .fields import JsonRecord

__all__ = ["Capabilities", "parse_selected", "parse_kconfig", "kexec_sig_policy",
           "pe_signature_size", "NO_PHYSMEM", "SNAPSHOT_SKIPPED", "INCOMING_NOT_WALKED"]

# The not_checked lines other modules write (the report and tests match on these prefixes).
NO_PHYSMEM = "no physical-memory access"
SNAPSHOT_SKIPPED = "radix snapshot skipped: " + NO_PHYSMEM
INCOMING_NOT_WALKED = "incoming radix tree not walked: " + NO_PHYSMEM

_OPTION = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")
LOCKDOWN_MODES = ("none", "integrity", "confidentiality")


@dataclass
class Capabilities(JsonRecord):
    """The running kernel as preflight found it (None: could not be told)."""

    WHERE = "capabilities"

    kho_debugfs: bool = False            # debugfs kho/ (CONFIG_KEXEC_HANDOVER_DEBUGFS)
    devmem_ram: bool = False             # /dev/mem serves System RAM (no STRICT_DEVMEM)
    kcore: bool = False                  # /proc/kcore readable (root, not locked down)
    lockdown: Optional[str] = None       # none / integrity / confidentiality; None: no LSM
    kexec_sig_required: Optional[bool] = None   # unsigned kexec images refused?

    @property
    def physmem(self) -> bool:
        """Some way into physical memory (the radix snapshot and the tree walks need one)."""
        return self.devmem_ram or self.kcore


def parse_selected(text: str) -> Optional[str]:
    """The bracketed choice of a sysfs/securityfs selector ("none [integrity] ..." ->
    "integrity"); None when nothing is bracketed."""
    sel = [w[1:-1] for w in text.split() if w.startswith("[") and w.endswith("]")]
    return sel[0] if sel else None


def parse_kconfig(text: str) -> dict[str, str]:
    """CONFIG_* settings of a kernel .config ("n" for `# CONFIG_X is not set`)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        m = _OPTION.match(line)
        if m:
            out[m.group(1)] = m.group(2).strip('"')
            continue
        m = _UNSET.match(line)
        if m:
            out[m.group(1)] = "n"
    return out


def kexec_sig_policy(config: Optional[dict[str, str]], lockdown: Optional[str]
                     ) -> tuple[Optional[bool], str]:
    """(does kexec_file_load refuse unsigned images?, why), from the kernel's config and
    lockdown mode; None when neither tells (no config readable).

    kernel/kexec_file.c kimage_validate_signature() (Linux 7.3): only built with
    CONFIG_KEXEC_SIG; a failed check is fatal when `sig_enforce` (CONFIG_KEXEC_SIG_FORCE,
    or set at boot by IMA's arch policy under UEFI Secure Boot), or when the kernel is
    locked down (LOCKDOWN_KEXEC: integrity and confidentiality) and IMA does not appraise.
    """
    cfg = config or {}
    if config is not None and cfg.get("CONFIG_KEXEC_SIG", "n") == "n":
        return False, "CONFIG_KEXEC_SIG is not set: kexec images are not signature-checked"
    if cfg.get("CONFIG_KEXEC_SIG_FORCE") == "y":
        return True, "CONFIG_KEXEC_SIG_FORCE=y"
    if lockdown in ("integrity", "confidentiality"):
        return True, f"kernel lockdown is {lockdown!r} (LOCKDOWN_KEXEC refuses unsigned images)"
    if cfg.get("CONFIG_IMA_ARCH_POLICY") == "y":
        return None, ("CONFIG_IMA_ARCH_POLICY=y: signatures are enforced when booted with "
                      "UEFI Secure Boot, which is not checked here")
    if config is None:
        return None, ("no kernel config readable (/proc/config.gz, /boot/config-RELEASE)"
                      + ("" if lockdown else " and no lockdown file"))
    return False, "CONFIG_KEXEC_SIG_FORCE is not set" + (
        f" and lockdown is {lockdown!r}" if lockdown else "")


def pe_signature_size(head: bytes) -> Optional[int]:
    """Bytes of the Authenticode certificate table of a PE image (x86 bzImage, arm64 Image
    with the EFI stub): 0 when unsigned, None when `head` (the first 4 KiB suffice) is not a
    PE image. The table is data directory 4 (IMAGE_DIRECTORY_ENTRY_SECURITY)."""
    if len(head) < 0x40 or head[:2] != b"MZ":
        return None
    (pe,) = struct.unpack_from("<I", head, 0x3C)
    if pe + 24 > len(head) or head[pe:pe + 4] != b"PE\0\0":
        return None
    opt = pe + 24
    if opt + 2 > len(head):
        return None
    (magic,) = struct.unpack_from("<H", head, opt)
    base = {0x20B: 112, 0x10B: 96}.get(magic)     # PE32+ / PE32: where the directories start
    if base is None:
        return None
    (ndirs,) = struct.unpack_from("<I", head, opt + base - 4)
    entry = opt + base + 4 * 8
    if ndirs <= 4 or entry + 8 > len(head):
        return 0
    _addr, size = struct.unpack_from("<II", head, entry)
    return size
