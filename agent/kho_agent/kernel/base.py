"""The kernel interface: the one seam between the agent and a host's kernel.

Two implementations: real Linux (`linux.py`: ioctls on /dev/liveupdate, debugfs, pagemap,
kexec) and a digital-twin host (`twin.py`: the same operations against a simulated
KHO/LUO kernel, see controller/kho_fleet/sim/). Everything above this seam -- preflight,
preserve, snapshot, kexec, verify, report -- is the same code on both.
"""

from __future__ import annotations

import errno as _errno
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Optional

from ..bootproto import IncomingKho
from ..errors import KhoAgentError
from ..physmem import PhysicalMemory
from ..systemdhost import FdStoreUnit, InitSystem

__all__ = ["KernelError", "LiveUpdateError", "Session", "LiveUpdate", "Kernel", "TWIN_ENV"]

# The environment form of the twin setting (`kho-agent --twin ROOT`). Only the kernel seam
# reads it (kernel.get_kernel) and writes it (Kernel.child_env): nothing else names it.
TWIN_ENV = "KHO_AGENT_TWIN"


class KernelError(KhoAgentError):
    """A kernel-interface operation failed; the message names the operation and path."""


class LiveUpdateError(OSError, KhoAgentError):
    """A /dev/liveupdate operation failed with `errno` (ENOENT, EBUSY, EINVAL, ...)."""

    def __init__(self, err: int, op: str, detail: str = "") -> None:
        msg = f"{op}: {os.strerror(err)}" + (f" ({detail})" if detail else "")
        super().__init__(err, msg)
        self.op = op

    def __str__(self) -> str:
        return self.strerror or ""


class Session(ABC):
    """A LUO session fd: it lives exactly as long as this object's fd stays open.

    Outgoing sessions (create_session) preserve files; incoming ones (retrieve_session)
    give them back after kexec and must be FINISHed, or they are lost when closed.
    """

    name: str

    @abstractmethod
    def fileno(self) -> int:
        """The session fd (keep it open to keep the session)."""

    @abstractmethod
    def preserve_fd(self, fd: int, token: int) -> None:
        """LIVEUPDATE_SESSION_PRESERVE_FD: preserve `fd` (a memfd) under `token`."""

    @abstractmethod
    def retrieve_fd(self, token: int) -> int:
        """LIVEUPDATE_SESSION_RETRIEVE_FD: a new fd for the file preserved as `token`."""

    @abstractmethod
    def finish(self) -> None:
        """LIVEUPDATE_SESSION_FINISH: the session's files are now owned by userspace."""

    @abstractmethod
    def get_name(self) -> str:
        """LIVEUPDATE_SESSION_GET_NAME."""

    @abstractmethod
    def close(self) -> None:
        """Close the session fd."""


class LiveUpdate(ABC):
    """An open /dev/liveupdate (exclusive: a second open fails with EBUSY)."""

    @abstractmethod
    def fileno(self) -> int: ...

    @abstractmethod
    def create_session(self, name: str) -> Session:
        """LIVEUPDATE_IOCTL_CREATE_SESSION (EEXIST if the name is taken)."""

    @abstractmethod
    def retrieve_session(self, name: str) -> Session:
        """LIVEUPDATE_IOCTL_RETRIEVE_SESSION (ENOENT if no such incoming session)."""

    @abstractmethod
    def close(self) -> None: ...


class Kernel(ABC):
    """What the agent needs from a host's kernel. `kind` is "linux" or "twin"."""

    kind: str

    # --- identity and environment ------------------------------------------------------
    @abstractmethod
    def release(self) -> str:
        """uname -r."""

    def hostname(self) -> str:
        """The host's name as reports show it."""
        return os.uname().nodename

    @abstractmethod
    def cmdline(self) -> str:
        """/proc/cmdline."""

    @abstractmethod
    def page_size(self) -> int:
        """The MMU page size in bytes."""

    @abstractmethod
    def boot_time(self) -> float:
        """CLOCK_REALTIME (epoch seconds) at which this kernel started."""

    @abstractmethod
    def boot_id(self) -> str:
        """A token that differs in every boot, kexec included (and is fit for a file name)."""

    @abstractmethod
    def mem_available(self) -> int:
        """MemAvailable in bytes."""

    @abstractmethod
    def state_dir(self) -> str:
        """Where the agent keeps its state on this host (created if missing)."""

    def child_env(self, base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
        """The environment for a process the agent starts (holder, kexec helper): `base`
        (default os.environ) with this kernel's setting, so the child acts on the same
        host as its parent. Linux: no twin setting (a stray $KHO_AGENT_TWIN is dropped)."""
        env = dict(os.environ if base is None else base)
        env.pop(TWIN_ENV, None)
        return env

    # --- debugfs -----------------------------------------------------------------------
    @abstractmethod
    def debugfs_mounted(self) -> bool: ...

    @abstractmethod
    def read_debugfs(self, rel: str) -> Optional[bytes]:
        """Bytes of debugfs file `rel` (e.g. "kho/out/fdt"), None if it does not exist."""

    def list_debugfs(self, rel: str) -> list[str]:
        """Names in debugfs directory `rel` ([] if absent)."""
        return []

    def incoming_kho(self) -> Optional[IncomingKho]:
        """Where the boot protocol put the incoming KHO FDT (x86 setup_data, arm64
        /chosen), for kernels without KHO debugfs; None when this boot has none."""
        return None

    # --- what this kernel lets the agent see (preflight's capabilities) ------------------
    def physmem_access(self) -> dict[str, tuple[bool, str]]:
        """Each way into physical memory, probed: {"devmem_ram": (ok, detail), "kcore":
        (ok, detail)}. This default knows only what open_physmem() gives."""
        try:
            with self.open_physmem() as mem:
                src = mem.source
        except (OSError, KhoAgentError) as e:
            return {"devmem_ram": (False, str(e)), "kcore": (False, str(e))}
        kc = "kcore" in src
        return {"devmem_ram": (not kc, src), "kcore": (kc, src)}

    def lockdown(self) -> Optional[str]:
        """The kernel lockdown mode (none, integrity, confidentiality); None when the
        kernel has no lockdown LSM (/sys/kernel/security/lockdown absent)."""
        return None

    def kernel_config(self) -> Optional[dict[str, str]]:
        """The running kernel's CONFIG_* settings (/proc/config.gz or
        /boot/config-RELEASE), None when neither is readable."""
        return None

    def running_images(self) -> list[str]:
        """Files that may be the running kernel's image (preflight reads its ABI strings
        when debugfs cannot tell): /boot/vmlinuz-RELEASE, then /boot files naming it."""
        return []

    # --- live update and memory ---------------------------------------------------------
    @abstractmethod
    def liveupdate_present(self) -> bool:
        """True if /dev/liveupdate exists (CONFIG_LIVEUPDATE and liveupdate=on)."""

    @abstractmethod
    def open_liveupdate(self) -> LiveUpdate:
        """Open /dev/liveupdate (raises LiveUpdateError EBUSY if someone holds it)."""

    @abstractmethod
    def open_physmem(self) -> PhysicalMemory:
        """This host's physical memory, read-only (`.source` names the way used)."""

    @abstractmethod
    def memfd_pfns(self, fd: int, size: int) -> list[int]:
        """PFN of every page of memfd `fd` (pagemap); 0 where a page is not present."""

    def dmesg(self) -> Optional[str]:
        """The kernel log of this boot, where readable ("KHO: exec from: ...")."""
        return None

    def page_flags(self, pfns: list[int]) -> Optional[list[int]]:
        """/proc/kpageflags of `pfns`, or None where the kernel does not offer it."""
        return None

    # THP for shmem: the host's setting decides (there is no memfd_create flag for it)
    SHMEM_THP = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"

    def shmem_thp(self) -> Optional[str]:
        """The selected value of shmem_enabled ("never", "advise", ...), None without THP."""
        try:
            with open(self.SHMEM_THP) as f:
                text = f.read()
        except OSError:
            return None
        sel = [w[1:-1] for w in text.split() if w.startswith("[") and w.endswith("]")]
        return sel[0] if sel else None

    def shmem_huge_hint(self, fd: int, mode: str) -> None:
        """The memfd behind `fd` was filled through a MADV_HUGEPAGE (mode always,
        within_size) or MADV_NOHUGEPAGE (never) mapping. Linux saw the madvise itself:
        nothing to do; a twin kernel is told, since it cannot see this process's mappings."""
        return None

    # --- PID 1 (systemd): FD stores and `systemctl kexec` (kho_agent.systemdhost) ----------
    def init_system(self) -> InitSystem:
        """What PID 1 is (systemd and its version, or another init)."""
        return InitSystem("unknown", None, "this kernel backend cannot tell")

    def fdstore_units(self) -> list[FdStoreUnit]:
        """The units whose FD store holds fds (`systemctl show`)."""
        return []

    def systemd_kexec(self) -> None:
        """Start `systemctl kexec` into the kernel already loaded (detached)."""
        raise KernelError("systemctl kexec: not supported by this kernel backend")

    def fdstore_push(self, unit: str, name: str, fd: int,
                     session_name: Optional[str] = None) -> None:
        """Put `fd` into `unit`'s FD store as `name` (sd_notify FDSTORE=1); `session_name`
        when `fd` is a LUO session fd (systemd records it as a `luo_session` entry)."""
        raise KernelError("FDSTORE=1: not supported by this kernel backend")

    def fdstore_take(self, unit: str) -> list[tuple[str, int]]:
        """(name, fd) of what PID 1 handed back to `unit` after the kexec (LISTEN_FDS)."""
        return []

    def adopt_session(self, fd: int, name: str) -> Session:
        """A Session for a session fd this process was handed (inherited, or from PID 1)."""
        raise KernelError("adopting a session fd: not supported by this kernel backend")

    def start_unit(self, unit: str, argv: list[str], env: dict[str, str],
                   keep_config: bool = False, wait: bool = True) -> str:
        """Start `argv` as the service `unit` through PID 1 (Type=notify, its FD store
        handed over in LISTEN_FDS); `keep_config`: a unit already configured runs as it
        is; `wait` False: only queue the start. Returns what was done, one line."""
        raise KernelError(f"starting {unit} through PID 1: not supported by this kernel "
                          "backend")

    def point_unit(self, unit: str, argv: list[str], env: dict[str, str]) -> str:
        """Make the installed service `unit` run `argv` with `env` from the next boot on (a
        drop-in); nothing when it is not installed. Returns what was done, one line."""
        return f"{unit}: not configured by this kernel backend"

    def unit_pending(self, unit: str) -> bool:
        """`unit` is queued to start or starting (a boot unit that has not finished yet)."""
        return False

    def notify_ready(self) -> None:
        """sd_notify READY=1 when this process runs as a Type=notify unit (else nothing)."""
        return None

    def fdstore_remove(self, unit: str, name: str) -> None:
        """Drop the fds named `name` from `unit`'s FD store (sd_notify FDSTOREREMOVE=1)."""
        return None

    # --- kexec -----------------------------------------------------------------------------
    @abstractmethod
    def kexec_file_load_supported(self) -> bool: ...

    @abstractmethod
    def kexec_load(self, kernel: str, initrd: Optional[str], cmdline: Optional[str]) -> None:
        """Load `kernel` with the in-kernel file loader (kexec_file_load);
        cmdline None reuses the running kernel's command line."""

    def kexec_file_load_status(self) -> str:
        """Why kexec_file_load is (un)available, in one line."""
        return "available" if self.kexec_file_load_supported() else "unavailable"

    @abstractmethod
    def kexec_unload(self) -> None: ...

    @abstractmethod
    def kexec_loaded(self) -> bool:
        """/sys/kernel/kexec_loaded."""

    @abstractmethod
    def kexec_exec(self) -> None:
        """Start `kexec -e` (detached on a real host, so the caller can still return)."""


def errno_name(err: int) -> str:
    """"ENOENT" for errno.ENOENT, etc."""
    return _errno.errorcode.get(err, str(err))
