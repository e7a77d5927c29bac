"""The real-Linux side of the kernel seam: /proc, debugfs, /dev/liveupdate, pagemap, kexec.

Standard library only (this module ships in the kho-agent zipapp to bare hosts, python>=3.9).

    k = LinuxKernel()
    with k.open_liveupdate() as lu:             # exclusive: a second open is EBUSY
        s = lu.create_session("db-0")           # keep s open until kexec -e
        s.preserve_fd(memfd, token=1)
    k.memfd_pfns(memfd, size)                   # PFNs via /proc/self/pagemap (root)
    k.kexec_load("/boot/vmlinuz-new", None, k.cmdline()); k.kexec_exec()

Interfaces used, by kernel source file (linux-source-7.2):
- /dev/liveupdate ioctls: include/uapi/linux/liveupdate.h (see uapi.py), luo_core.c,
  luo_session.c. Session and retrieved fds come back O_CLOEXEC.
- debugfs kho/{out,in}/...: kernel/liveupdate/kexec_handover_debugfs.c. kho/out/fdt is
  sized when KHO initialises (truncated once subtrees are added) and is not created at all
  in a kernel that was itself booted through KHO (kho_init() returns before adding it).
- /proc/self/pagemap, /proc/kpageflags: Documentation/admin-guide/mm/pagemap.rst.
- kexec_file_load(2): kernel/kexec_file.c; reboot(LINUX_REBOOT_CMD_KEXEC): kernel/reboot.c.

Errors are KernelError, or LiveUpdateError (an OSError with the errno) for /dev/liveupdate;
messages are one line naming the path or operation.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import time
from typing import Optional

from .. import systemdhost
from ..bootproto import IncomingKho, incoming_kho
from ..capabilities import parse_kconfig, parse_selected
from ..physmem import PhysicalMemory, PhysMemError, open_devmem, open_kcore, open_live_memory
from . import uapi
from .base import Kernel, KernelError, LiveUpdate, LiveUpdateError, Session

__all__ = ["LinuxKernel", "LinuxLiveUpdate", "LinuxSession", "STATE_ENV", "DEFAULT_STATE_DIR",
           "KEXEC_FILE_LOAD_NR"]

STATE_ENV = "KHO_AGENT_STATE"
DEFAULT_STATE_DIR = "/var/lib/kho-agent"

# kexec_file_load(2) syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl: 320;
# include/uapi/asm-generic/unistd.h __NR_kexec_file_load: 294 for arm64 and riscv).
KEXEC_FILE_LOAD_NR = {"x86_64": 320, "aarch64": 294, "arm64": 294, "riscv64": 294}
KEXEC_FILE_UNLOAD = 0x1          # include/uapi/linux/kexec.h
KEXEC_FILE_NO_INITRAMFS = 0x4
LINUX_REBOOT_CMD_KEXEC = 0x45584543  # include/uapi/linux/reboot.h

_PM_PRESENT = 1 << 63
_PM_PFN_MASK = (1 << 55) - 1
_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


_LIBC: Optional[ctypes.CDLL] = None


def _libc() -> ctypes.CDLL:
    """This process's C library (glibc or musl), with errno captured for get_errno()."""
    global _LIBC
    if _LIBC is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.syscall.restype = ctypes.c_long
        _LIBC = libc
    return _LIBC


def _ioctl(fd: int, request: int, buf: bytearray, op: str, detail: str = "") -> None:
    try:
        fcntl.ioctl(fd, request, buf, True)
    except OSError as e:
        raise LiveUpdateError(e.errno or errno.EIO, op, detail) from None


class LinuxSession(Session):
    """A LUO session fd (outgoing from create_session, or incoming from retrieve_session).

    The fd is not closed by garbage collection: close() it (or use `with`) explicitly.
    Closing an outgoing session unpreserves its files; closing a retrieved one FINISHes it
    (luo_session_release()), after which its files can no longer be retrieved.
    """

    def __init__(self, fd: int, name: str, incoming: bool) -> None:
        self._fd = fd
        self.name = name
        self.incoming = incoming

    def fileno(self) -> int:
        if self._fd < 0:
            raise LiveUpdateError(errno.EBADF, f"session {self.name!r}", "already closed")
        return self._fd

    def preserve_fd(self, fd: int, token: int) -> None:
        try:
            buf = uapi.pack_fd_token(fd, token)
        except ValueError as e:
            raise LiveUpdateError(errno.EINVAL, "LIVEUPDATE_SESSION_PRESERVE_FD", str(e)) from None
        _ioctl(self.fileno(), uapi.LIVEUPDATE_SESSION_PRESERVE_FD, buf,
               "LIVEUPDATE_SESSION_PRESERVE_FD",
               f"session {self.name!r}, fd {fd}, token {token:#x}")

    def retrieve_fd(self, token: int) -> int:
        try:
            buf = uapi.pack_fd_token(-1, token)
        except ValueError as e:
            raise LiveUpdateError(errno.EINVAL, "LIVEUPDATE_SESSION_RETRIEVE_FD", str(e)) from None
        _ioctl(self.fileno(), uapi.LIVEUPDATE_SESSION_RETRIEVE_FD, buf,
               "LIVEUPDATE_SESSION_RETRIEVE_FD", f"session {self.name!r}, token {token:#x}")
        return uapi.unpack_fd(buf)

    def finish(self) -> None:
        _ioctl(self.fileno(), uapi.LIVEUPDATE_SESSION_FINISH, uapi.pack_finish(),
               "LIVEUPDATE_SESSION_FINISH", f"session {self.name!r}")

    def get_name(self) -> str:
        buf = uapi.pack_get_name()
        _ioctl(self.fileno(), uapi.LIVEUPDATE_SESSION_GET_NAME, buf,
               "LIVEUPDATE_SESSION_GET_NAME", f"session {self.name!r}")
        return uapi.unpack_get_name(buf)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> LinuxSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "incoming" if self.incoming else "outgoing"
        return f"<LinuxSession {self.name!r} {kind} fd={self._fd}>"


class LinuxLiveUpdate(LiveUpdate):
    """An open /dev/liveupdate. Sessions outlive it as long as their own fds stay open."""

    def __init__(self, fd: int, path: str = uapi.LIVEUPDATE_DEVICE) -> None:
        self._fd = fd
        self.path = path

    def fileno(self) -> int:
        if self._fd < 0:
            raise LiveUpdateError(errno.EBADF, self.path, "already closed")
        return self._fd

    def _session(self, request: int, op: str, name: str, incoming: bool) -> LinuxSession:
        try:
            buf = uapi.pack_session_arg(name)
        except ValueError as e:
            raise LiveUpdateError(errno.EINVAL, op, str(e)) from None
        _ioctl(self.fileno(), request, buf, op, f"session {name!r}")
        return LinuxSession(uapi.unpack_session_fd(buf), name, incoming)

    def create_session(self, name: str) -> LinuxSession:
        return self._session(uapi.LIVEUPDATE_IOCTL_CREATE_SESSION,
                             "LIVEUPDATE_IOCTL_CREATE_SESSION", name, incoming=False)

    def retrieve_session(self, name: str) -> LinuxSession:
        return self._session(uapi.LIVEUPDATE_IOCTL_RETRIEVE_SESSION,
                             "LIVEUPDATE_IOCTL_RETRIEVE_SESSION", name, incoming=True)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> LinuxLiveUpdate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError as e:
        raise KernelError(f"cannot read {path} ({what}): {e.strerror or e}") from None


class LinuxKernel(Kernel):
    """The running Linux kernel. Paths are attributes so tests can point them elsewhere."""

    kind = "linux"
    proc = "/proc"
    debugfs_root = "/sys/kernel/debug"
    liveupdate_path = uapi.LIVEUPDATE_DEVICE
    kexec_loaded_path = "/sys/kernel/kexec_loaded"
    devmem_path = "/dev/mem"
    kcore_path = "/proc/kcore"
    lockdown_path = "/sys/kernel/security/lockdown"
    ikconfig_path = "/proc/config.gz"   # CONFIG_IKCONFIG_PROC
    boot_dir = "/boot"
    sysroot = "/"                  # where /sys/kernel/boot_params and the device tree are

    def __init__(self, state_dir: Optional[str] = None, kexec_tool: Optional[str] = "auto") -> None:
        """`kexec_tool`: path of kexec(8), "auto" to search PATH and sbin dirs, or None to
        always use the kexec_file_load / reboot syscalls directly."""
        self._state_dir = state_dir
        if kexec_tool == "auto":
            kexec_tool = shutil.which("kexec") or shutil.which("kexec", path=_SBIN)
        self.kexec_tool = kexec_tool

    # --- identity and environment ------------------------------------------------------
    def release(self) -> str:
        return os.uname().release

    def cmdline(self) -> str:
        return _read_text(f"{self.proc}/cmdline", "kernel command line").rstrip("\n\0 ")

    def page_size(self) -> int:
        return int(os.sysconf("SC_PAGE_SIZE"))

    def boot_id(self) -> str:
        """/proc/sys/kernel/random/boot_id (a fresh UUID every boot); else boot_time()."""
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                token = f.read().strip()
        except OSError:
            token = ""
        if re.fullmatch(r"[0-9a-fA-F-]{8,64}", token):
            return token
        return f"boot-{self.boot_time():.0f}"

    def boot_time(self) -> float:
        """Epoch seconds at which this kernel started: now(CLOCK_REALTIME) - now(CLOCK_BOOTTIME).

        CLOCK_BOOTTIME restarts at 0 in every kernel, kexec included, and counts suspend,
        so this is sub-millisecond precise (it moves if the wall clock is stepped later).
        /proc/stat's btime is the same quantity truncated to whole seconds; /proc/uptime
        has 10 ms resolution: both are fallbacks only.
        """
        clock = getattr(time, "CLOCK_BOOTTIME", None)
        if clock is not None:
            try:
                up = time.clock_gettime(clock)
                return time.time() - up
            except OSError:
                pass
        try:
            up = float(_read_text(f"{self.proc}/uptime", "uptime").split()[0])
            return time.time() - up
        except (KernelError, ValueError, IndexError):
            pass
        for line in _read_text(f"{self.proc}/stat", "boot time").splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
        raise KernelError(f"no boot time: no btime in {self.proc}/stat")

    def mem_available(self) -> int:
        for line in _read_text(f"{self.proc}/meminfo", "MemAvailable").splitlines():
            if line.startswith("MemAvailable:"):
                parts = line.split()
                return int(parts[1]) * (1024 if parts[-1] == "kB" else 1)
        raise KernelError(f"no MemAvailable in {self.proc}/meminfo")

    def state_dir(self) -> str:
        path = self._state_dir or os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as e:
            raise KernelError(f"cannot create state dir {path}: {e.strerror}") from None
        return path

    # --- debugfs -----------------------------------------------------------------------
    def debugfs_mounted(self) -> bool:
        try:
            mounts = _read_text(f"{self.proc}/mounts", "mounts")
        except KernelError:
            return False
        for line in mounts.splitlines():
            f = line.split()
            if len(f) >= 3 and f[2] == "debugfs" and f[1] == self.debugfs_root:
                return True
        return False

    def _debugfs_path(self, rel: str) -> str:
        parts = [p for p in rel.split("/") if p]
        if rel.startswith("/") or any(p in (".", "..") for p in parts):
            raise KernelError(f"bad debugfs path {rel!r} (relative to {self.debugfs_root}, no ..)")
        return os.path.join(self.debugfs_root, *parts)

    def read_debugfs(self, rel: str) -> Optional[bytes]:
        """Bytes of debugfs `rel`; None if it does not exist (or debugfs is not mounted:
        check debugfs_mounted() to tell the two apart)."""
        path = self._debugfs_path(rel)
        try:
            with open(path, "rb", buffering=0) as f:
                chunks = []
                while True:
                    chunk = f.read(1 << 16)
                    if not chunk:
                        break
                    chunks.append(chunk)
                return b"".join(chunks)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except PermissionError:
            raise KernelError(f"cannot read {path}: permission denied (debugfs needs "
                              "root)") from None
        except OSError as e:
            raise KernelError(f"cannot read {path}: {e.strerror or e}") from None

    def list_debugfs(self, rel: str) -> list[str]:
        path = self._debugfs_path(rel)
        try:
            return sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except PermissionError:
            raise KernelError(f"cannot list {path}: permission denied (debugfs needs "
                              "root)") from None
        except OSError as e:
            raise KernelError(f"cannot list {path}: {e.strerror or e}") from None

    # --- live update and memory ---------------------------------------------------------
    def liveupdate_present(self) -> bool:
        return os.path.exists(self.liveupdate_path)

    def open_liveupdate(self) -> LinuxLiveUpdate:
        path = self.liveupdate_path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            err = e.errno or errno.EIO
            why = {
                errno.ENOENT: "missing: kernel without CONFIG_LIVEUPDATE, or booted without "
                              "liveupdate=on",
                errno.EBUSY: "exclusive open: another process holds it",
                errno.EACCES: "permission denied (needs root)",
                errno.EIO: "the kernel could not deserialize the incoming sessions",
            }.get(err, "")
            raise LiveUpdateError(err, f"open {path}", why) from None
        return LinuxLiveUpdate(fd, path)

    def incoming_kho(self) -> Optional[IncomingKho]:
        return incoming_kho(self.sysroot)

    def open_physmem(self) -> PhysicalMemory:
        try:
            return open_live_memory(self.devmem_path, self.kcore_path, f"{self.proc}/iomem")
        except PhysMemError as e:
            raise KernelError(str(e)) from None

    # --- capabilities (preflight) -------------------------------------------------------
    def physmem_access(self) -> dict[str, tuple[bool, str]]:
        """/dev/mem and /proc/kcore, each opened and read at a RAM page above 1 MiB."""
        out: dict[str, tuple[bool, str]] = {}
        for key, path, opener in (
                ("devmem_ram", self.devmem_path,
                 lambda: open_devmem(self.devmem_path, f"{self.proc}/iomem")),
                ("kcore", self.kcore_path, lambda: open_kcore(self.kcore_path))):
            try:
                opener().close()
                out[key] = (True, f"{path} serves System RAM")
            except PhysMemError as e:
                out[key] = (False, str(e))
            except OSError as e:
                out[key] = (False, f"{path}: {e.strerror or e}")
        return out

    def lockdown(self) -> Optional[str]:
        try:
            with open(self.lockdown_path) as f:
                return parse_selected(f.read())
        except OSError:
            return None

    def kernel_config(self) -> Optional[dict[str, str]]:
        import gzip
        try:
            with gzip.open(self.ikconfig_path, "rt", errors="replace") as f:
                return parse_kconfig(f.read())
        except (OSError, EOFError):
            pass
        try:
            with open(os.path.join(self.boot_dir, f"config-{self.release()}"),
                      errors="replace") as f:
                return parse_kconfig(f.read())
        except OSError:
            return None

    def running_images(self) -> list[str]:
        rel = self.release()
        out = [os.path.join(self.boot_dir, f"vmlinuz-{rel}")]
        try:
            names = sorted(os.listdir(self.boot_dir))
        except OSError:
            names = []
        named = [n for n in names if rel in n
                 and not n.startswith(("config-", "System.map-", "initrd", "vmlinuz-"))]
        named.sort(key=lambda n: not n.endswith(rel))      # bzImage-REL before bzImage-REL-x
        out += [os.path.join(self.boot_dir, n) for n in named]
        return [p for p in out if os.path.isfile(p)][:4]

    def memfd_pfns(self, fd: int, size: int) -> list[int]:
        """PFN of each page of the first `size` bytes of memfd `fd` (0: not present).

        Maps the file MAP_SHARED read-only, reads one byte of every page (so each one is
        faulted in and mapped), then reads this process's /proc/self/pagemap: bit 63 =
        present, bits 0-54 = PFN. The kernel zeroes PFNs for readers without CAP_SYS_ADMIN:
        that is reported as an error, never returned as data.
        """
        ps = self.page_size()
        if size <= 0:
            return []
        try:
            st_size = os.fstat(fd).st_size
        except OSError as e:
            raise KernelError(f"memfd_pfns: fd {fd}: {e.strerror}") from None
        if size > st_size:   # touching a page past EOF would SIGBUS this process
            raise KernelError(f"memfd_pfns: fd {fd} is {st_size} bytes, asked for {size}")
        npages = (size + ps - 1) // ps
        length = npages * ps
        libc = _libc()
        addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            err = ctypes.get_errno()
            raise KernelError(f"memfd_pfns: mmap of fd {fd} failed: {os.strerror(err)}")
        try:
            for i in range(npages):          # fault every page in (a read is enough)
                ctypes.string_at(addr + i * ps, 1)
            pagemap = f"{self.proc}/self/pagemap"
            try:
                with open(pagemap, "rb", buffering=0) as f:
                    raw = os.pread(f.fileno(), npages * 8, (addr // ps) * 8)
            except PermissionError:
                raise KernelError(f"cannot read {pagemap}: permission denied (PFNs need "
                                  "root)") from None
            except OSError as e:
                raise KernelError(f"cannot read {pagemap}: {e.strerror}") from None
        finally:
            libc.munmap(addr, length)
        if len(raw) != npages * 8:
            raise KernelError(f"{pagemap}: short read ({len(raw)} of {npages * 8} bytes)")
        entries = struct.unpack(f"={npages}Q", raw)
        pfns = [(e & _PM_PFN_MASK) if e & _PM_PRESENT else 0 for e in entries]
        present = sum(1 for e in entries if e & _PM_PRESENT)
        if present and not any(pfns):
            raise KernelError(f"{pagemap} shows pages present but PFNs zeroed: reading PFNs "
                              "needs CAP_SYS_ADMIN (run as root)")
        return pfns

    def page_flags(self, pfns: list[int]) -> Optional[list[int]]:
        """/proc/kpageflags u64 of each PFN (KPF_* bits), None if the file does not exist."""
        path = f"{self.proc}/kpageflags"
        if not os.path.exists(path):
            return None
        out: list[int] = []
        try:
            with open(path, "rb", buffering=0) as f:
                fd = f.fileno()
                i = 0
                while i < len(pfns):         # one pread per run of consecutive PFNs
                    j = i + 1
                    while j < len(pfns) and pfns[j] == pfns[j - 1] + 1 and j - i < 65536:
                        j += 1
                    raw = os.pread(fd, (j - i) * 8, pfns[i] * 8)
                    if len(raw) != (j - i) * 8:
                        raise KernelError(f"{path}: no entry for PFN {pfns[i] + len(raw) // 8:#x}")
                    out.extend(struct.unpack(f"={j - i}Q", raw))
                    i = j
        except PermissionError:
            raise KernelError(f"cannot read {path}: permission denied (needs root)") from None
        except OSError as e:
            raise KernelError(f"cannot read {path}: {e.strerror}") from None
        return out

    # --- kexec -----------------------------------------------------------------------------
    def _kexec_file_load(self, kernel_fd: int, initrd_fd: int, cmdline: Optional[bytes],
                         flags: int) -> int:
        """Raw kexec_file_load(2); returns 0 or the errno. ENOSYS if the arch is unknown."""
        nr = KEXEC_FILE_LOAD_NR.get(platform.machine())
        if nr is None:
            return errno.ENOSYS
        libc = _libc()
        buf = ctypes.create_string_buffer(cmdline) if cmdline is not None else None
        ret = libc.syscall(ctypes.c_long(nr), ctypes.c_long(kernel_fd), ctypes.c_long(initrd_fd),
                           ctypes.c_ulong(len(cmdline) + 1 if cmdline is not None else 0),
                           buf, ctypes.c_ulong(flags))
        return ctypes.get_errno() if ret != 0 else 0

    def kexec_file_load_status(self) -> str:
        """"ok", or why kexec_file_load cannot be used here.

        Probes the syscall with kernel_fd = -1 (kernel/kexec_file.c: permission and flag
        checks, then EBADF from the fd; nothing is loaded or unloaded): ENOSYS = not built
        in (CONFIG_KEXEC_FILE), EPERM = not root or kernel.kexec_load_disabled = 1.
        """
        err = self._kexec_file_load(-1, -1, None, 0)
        if err in (errno.EBADF, 0):
            return "ok"
        if err == errno.EBUSY:      # another load in progress: the syscall exists
            return "ok"
        if err == errno.ENOSYS:
            if platform.machine() not in KEXEC_FILE_LOAD_NR:
                return f"kexec_file_load: unknown syscall number for {platform.machine()}"
            return "kexec_file_load: not supported by this kernel (CONFIG_KEXEC_FILE)"
        if err == errno.EPERM:
            return ("kexec_file_load: not permitted (needs root; or sysctl "
                    "kernel.kexec_load_disabled is 1)")
        return f"kexec_file_load: {os.strerror(err)}"

    def kexec_file_load_supported(self) -> bool:
        return self.kexec_file_load_status() == "ok"

    def kexec_load(self, kernel: str, initrd: Optional[str], cmdline: Optional[str]) -> None:
        """Load `kernel` (+ `initrd`) for kexec with the in-kernel file loader.

        `cmdline` None reuses the running kernel's command line. Uses `kexec -s -l` when
        kexec-tools is installed, else the kexec_file_load syscall directly.
        """
        for what, path in (("kernel image", kernel), ("initrd", initrd)):
            if path is not None and not os.path.isfile(path):
                raise KernelError(f"kexec load: {what} not found: {path}")
        if self.kexec_tool:
            argv = [self.kexec_tool, "-s", "-l", kernel]
            if initrd:
                argv.append(f"--initrd={initrd}")
            argv.append("--reuse-cmdline" if cmdline is None else f"--command-line={cmdline}")
            self._run_kexec(argv, f"kexec -s -l {kernel}")
            return
        if cmdline is None:
            cmdline = self._reused_cmdline()
        flags = 0 if initrd else KEXEC_FILE_NO_INITRAMFS
        try:
            kfd = os.open(kernel, os.O_RDONLY | os.O_CLOEXEC)
            ifd = os.open(initrd, os.O_RDONLY | os.O_CLOEXEC) if initrd else -1
        except OSError as e:
            raise KernelError(f"kexec load: cannot open {e.filename}: {e.strerror}") from None
        try:
            err = self._kexec_file_load(kfd, ifd, cmdline.encode(), flags)
        finally:
            os.close(kfd)
            if ifd >= 0:
                os.close(ifd)
        if err:
            raise KernelError(f"kexec_file_load {kernel}: {os.strerror(err)}"
                              + (" (signature or image format rejected)" if err in
                                 (errno.EKEYREJECTED, errno.ENOEXEC) else ""))

    def _reused_cmdline(self) -> str:
        # as kexec-tools --reuse-cmdline: drop the boot loader's BOOT_IMAGE= (and crashkernel=)
        words = self.cmdline().split()
        return " ".join(w for w in words if not w.startswith(("BOOT_IMAGE=", "crashkernel=")))

    def _run_kexec(self, argv: list[str], what: str) -> None:
        try:
            res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 timeout=300, env=self.child_env())
        except subprocess.TimeoutExpired:
            raise KernelError(f"{what}: timed out") from None
        except OSError as e:
            raise KernelError(f"{what}: cannot run {argv[0]}: {e.strerror}") from None
        if res.returncode != 0:
            lines = (res.stderr.strip() or res.stdout.strip()).splitlines()
            raise KernelError(f"{what} failed: " + (lines[-1] if lines else
                                                    f"exit status {res.returncode}"))

    def kexec_unload(self) -> None:
        if self.kexec_tool:
            self._run_kexec([self.kexec_tool, "-s", "-u"], "kexec -s -u")
            return
        err = self._kexec_file_load(-1, -1, None, KEXEC_FILE_UNLOAD)
        if err:
            raise KernelError(f"kexec_file_load(KEXEC_FILE_UNLOAD): {os.strerror(err)}")

    def kexec_loaded(self) -> bool:
        """/sys/kernel/kexec_loaded == 1 (False when the file is absent: no kexec support)."""
        try:
            with open(self.kexec_loaded_path) as f:
                return f.read().strip() == "1"
        except FileNotFoundError:
            return False
        except OSError as e:
            raise KernelError(f"cannot read {self.kexec_loaded_path}: {e.strerror}") from None

    def kexec_exec(self, delay: float = 0.5) -> None:
        """Reboot into the loaded kernel `delay` seconds from now, from a detached process.

        Returns at once, so the caller (the holder, an SSH command) can still answer; the
        caller must keep its session fds open until the machine goes down. Uses `kexec -e`
        (which syncs and downs interfaces first) when kexec-tools is installed, else a
        python child calling reboot(LINUX_REBOOT_CMD_KEXEC). Its output goes to
        <state_dir>/kexec-exec.log.
        """
        if not self.kexec_loaded():
            raise KernelError(f"kexec exec: no kernel loaded ({self.kexec_loaded_path} is not 1)")
        delay = max(0.0, float(delay))
        if self.kexec_tool:
            argv = ["/bin/sh", "-c", f'sleep {delay:.3f}; sync; exec "$0" -e', self.kexec_tool]
        else:
            code = (f"import ctypes, os, time; time.sleep({delay!r}); os.sync(); "
                    "libc = ctypes.CDLL(None, use_errno=True); "
                    f"r = libc.reboot({LINUX_REBOOT_CMD_KEXEC:d}); "
                    "raise SystemExit('reboot(LINUX_REBOOT_CMD_KEXEC): ' + "
                    "os.strerror(ctypes.get_errno()))")
            argv = [sys.executable or "python3", "-c", code]
        try:
            log = open(os.path.join(self.state_dir(), "kexec-exec.log"), "ab")
        except (OSError, KernelError):
            log = open(os.devnull, "wb")
        os.sync()
        try:
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True, close_fds=True, env=self.child_env())
        except OSError as e:
            raise KernelError(f"kexec exec: cannot start {argv[0]}: {e.strerror}") from None
        finally:
            log.close()

    # --- PID 1 (kho_agent.systemdhost) ------------------------------------------------------
    def init_system(self) -> systemdhost.InitSystem:
        return systemdhost.linux_init_system()

    def fdstore_units(self) -> list[systemdhost.FdStoreUnit]:
        return systemdhost.linux_fdstore_units()

    def systemd_kexec(self, delay: float = 0.5) -> None:
        """`systemctl kexec` `delay` seconds from now, detached (the caller still answers):
        systemd stops the services, systemd-shutdown preserves the FD stores through LUO,
        then reboots into the kernel already loaded with kexec_file_load."""
        if not self.kexec_loaded():
            raise KernelError(f"systemctl kexec: no kernel loaded ({self.kexec_loaded_path} "
                              "is not 1)")
        argv = ["/bin/sh", "-c", f'sleep {max(0.0, float(delay)):.3f}; exec systemctl kexec']
        try:
            log = open(os.path.join(self.state_dir(), "kexec-exec.log"), "ab")
        except (OSError, KernelError):
            log = open(os.devnull, "wb")
        try:
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True, close_fds=True, env=self.child_env())
        except OSError as e:
            raise KernelError(f"systemctl kexec: cannot start /bin/sh: {e.strerror}") from None
        finally:
            log.close()

    def fdstore_push(self, unit: str, name: str, fd: int,
                     session_name: Optional[str] = None) -> None:
        """sd_notify FDSTORE=1 with FDNAME (this process must run as `unit`, a service with
        FileDescriptorStoreMax > 0; systemd names a LUO session fd's entry itself)."""
        try:
            sent = systemdhost.sd_notify(f"FDSTORE=1\nFDNAME={name}", [fd])
        except OSError as e:
            raise KernelError(f"FDSTORE=1 to $NOTIFY_SOCKET: {e.strerror or e}") from None
        if not sent:
            raise KernelError(f"FDSTORE=1: no $NOTIFY_SOCKET (the holder does not run as "
                              f"{unit})")

    def fdstore_take(self, unit: str) -> list[tuple[str, int]]:
        return systemdhost.listen_fds(dict(os.environ), os.getpid())

    def adopt_session(self, fd: int, name: str) -> Session:
        """A retrieved session fd handed over by another process (PID 1's FD store)."""
        return LinuxSession(fd, name, incoming=True)

    def start_unit(self, unit: str, argv: list[str], env: dict[str, str],
                   keep_config: bool = False, wait: bool = True) -> str:
        """The unit (installed where missing) with a drop-in of `argv` and `env`, then
        `systemctl start` (kho_agent.systemdhost.linux_start_unit)."""
        try:
            return systemdhost.linux_start_unit(unit, argv, env, keep_config, wait)
        except OSError as e:
            raise KernelError(str(e)) from None

    def point_unit(self, unit: str, argv: list[str], env: dict[str, str]) -> str:
        """kho_agent.systemdhost.linux_point_unit: the drop-in, daemon-reload if it changed."""
        try:
            return systemdhost.linux_point_unit(unit, argv, env)
        except OSError as e:
            raise KernelError(str(e)) from None

    def unit_pending(self, unit: str) -> bool:
        """`systemctl is-active` says activating, or a job for it is queued."""
        state = (systemdhost.run_quiet(["systemctl", "is-active", "--", unit]) or "").strip()
        jobs = systemdhost.run_quiet(["systemctl", "list-jobs", "--no-legend", "--", unit])
        return state == "activating" or bool((jobs or "").strip())

    def notify_ready(self) -> None:
        try:
            systemdhost.sd_notify("READY=1")
        except OSError:
            pass                 # not fatal: systemctl start then times out and says so

    def fdstore_remove(self, unit: str, name: str) -> None:
        try:
            systemdhost.sd_notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
        except OSError as e:
            raise KernelError(f"FDSTOREREMOVE=1 to $NOTIFY_SOCKET: {e.strerror or e}") from None

