"""The Kernel seam for a digital-twin host: a simulated Linux 7.2 KHO/LUO kernel.

The twin (controller/kho_fleet/sim/twinkernel.py) runs one server process per host and
keeps the host root current (layout in that module's docstring). This client is stdlib
only: files for what the real kernel exposes as files (/proc, /sys, debugfs), sockets for
/dev/liveupdate and for what needs the kernel (pagemap, kexec). While the twin host is
down or booting, every operation raises KernelError("twin host ... is down/booting").
"""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Mapping
from typing import Optional

from ..errors import InputError
from ..physmem import PhysicalMemory, RawImage
from ..systemdhost import FdStoreUnit, InitSystem
from . import twinproto as proto
from .base import TWIN_ENV, Kernel, KernelError, LiveUpdate, LiveUpdateError, Session

__all__ = ["TwinKernel", "TwinLiveUpdate", "TwinSession", "check_twin_root"]

_DOWN_ERRNOS = (errno.ECONNREFUSED, errno.ENOENT, errno.ECONNRESET, errno.EPIPE)


def _u64(token: int) -> int:
    if not isinstance(token, int) or not 0 <= token < 1 << 64:
        raise ValueError(f"token {token!r} is not a u64")
    return token


class _Fd:
    """A twin kernel object fd (socketpair end) and its request/reply calls."""

    def __init__(self, sock: socket.socket, root: str) -> None:
        self._sock: Optional[socket.socket] = sock
        self._root = root

    def fileno(self) -> int:
        if self._sock is None:
            raise ValueError("fd is closed")
        return self._sock.fileno()

    def _call(self, op: str, label: str, fds: tuple = (), **args: object) -> tuple[dict, list[int]]:
        if self._sock is None:
            raise LiveUpdateError(errno.EBADF, label, "fd is closed")
        try:
            reply, got = proto.call(self._sock, {"op": op, **args}, fds)
        except (proto.WireError, OSError) as e:
            raise KernelError(f"{label}: twin host {self._root} is down/booting "
                              f"(the fd died with the kernel that made it: {e})") from None
        if not reply.get("ok"):
            proto.close_fds(got)
            raise LiveUpdateError(int(reply.get("errno", errno.EIO)), label,
                                  str(reply.get("error", "")))
        return reply, got

    def close(self) -> None:
        """close(2); like the kernel's release, it has taken effect when this returns."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                TwinKernel(self._root).control("sync")
            except KernelError:
                pass                      # host down: nothing left to release


class TwinSession(_Fd, Session):
    """A LUO session fd of a twin host."""

    def __init__(self, sock: socket.socket, root: str, name: str) -> None:
        super().__init__(sock, root)
        self.name = name

    def preserve_fd(self, fd: int, token: int) -> None:
        self._call("preserve_fd", "LIVEUPDATE_SESSION_PRESERVE_FD", (fd,), token=_u64(token))

    def retrieve_fd(self, token: int) -> int:
        _, fds = self._call("retrieve_fd", "LIVEUPDATE_SESSION_RETRIEVE_FD", token=_u64(token))
        if len(fds) != 1:
            proto.close_fds(fds)
            raise KernelError("LIVEUPDATE_SESSION_RETRIEVE_FD: twin replied without an fd")
        os.set_inheritable(fds[0], False)          # the kernel returns it O_CLOEXEC
        return fds[0]

    def finish(self) -> None:
        self._call("finish", "LIVEUPDATE_SESSION_FINISH")

    def get_name(self) -> str:
        reply, _ = self._call("get_name", "LIVEUPDATE_SESSION_GET_NAME")
        return str(reply["name"])


class TwinLiveUpdate(_Fd, LiveUpdate):
    """An open /dev/liveupdate of a twin host (exclusive, like the real device)."""

    def _session(self, op: str, label: str, name: str) -> TwinSession:
        _, fds = self._call(op, label, name=name)
        if len(fds) != 1:
            proto.close_fds(fds)
            raise KernelError(f"{label}: twin replied without a session fd")
        os.set_inheritable(fds[0], False)
        return TwinSession(socket.socket(fileno=fds[0]), self._root, name)

    def create_session(self, name: str) -> Session:
        return self._session("create_session", "LIVEUPDATE_IOCTL_CREATE_SESSION", name)

    def retrieve_session(self, name: str) -> Session:
        return self._session("retrieve_session", "LIVEUPDATE_IOCTL_RETRIEVE_SESSION", name)


def check_twin_root(root: str, where: str = "--twin") -> str:
    """`root` as an absolute path if it is a twin host root, else InputError (no side effects).

    A twin host root is a directory holding the twin's state file (twin.state): the twin
    server writes it from its first boot on and keeps it while the host is off, so it
    marks a root that has been a twin host. Nothing is created or changed here.
    """
    if not root:
        raise InputError(f"{where}: empty path (name a twin host root)")
    path = os.path.abspath(root)
    if not os.path.isdir(path):
        what = "no such directory" if not os.path.lexists(path) else "not a directory"
        raise InputError(f"{where} {root}: {what} (not a twin host root)")
    if not os.path.isfile(os.path.join(path, proto.STATE)):
        raise InputError(f"{where} {root}: not a twin host root (no {proto.STATE}; "
                         f"start a twin there first)")
    return path


class TwinKernel(Kernel):
    """A twin host's kernel, reached through its host root directory."""

    kind = "twin"

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    # --- plumbing -----------------------------------------------------------------------
    def _p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def status(self) -> dict:
        """The twin's state file (state, pid, release, boot_count, kexec_count, faults...)."""
        try:
            with open(self._p(proto.STATE)) as f:
                st = json.load(f)
        except (OSError, ValueError):
            return {"state": "off"}
        pid = st.get("pid")
        if st.get("state") != "off" and pid and not proto.pid_alive(int(pid)):
            st["state"] = "off"
        return st

    def _up(self, what: str) -> None:
        st = self.status().get("state")
        if st != "up":
            raise KernelError(f"{what}: twin host {self.root} is down/booting (state: {st})")

    def _read(self, rel: str) -> str:
        self._up(rel)
        try:
            with open(self._p(rel)) as f:
                return f.read()
        except OSError as e:
            raise KernelError(f"read {self._p(rel)}: {e.strerror}") from None

    def _connect(self, rel: str, what: str) -> socket.socket:
        self._up(what)
        try:
            return proto.connect(self._p(rel))
        except OSError as e:
            if e.errno in _DOWN_ERRNOS:
                raise KernelError(f"{what}: twin host {self.root} is down/booting "
                                  f"({e.strerror})") from None
            raise KernelError(f"{what}: {self._p(rel)}: {e.strerror or e}") from None

    def control(self, op: str, fds: tuple = (), **args: object) -> dict:
        """One request on the control socket; errors raise KernelError with the twin's words."""
        sock = self._connect(proto.CONTROL, op)
        try:
            reply, got = proto.call(sock, {"op": op, **args}, fds)
        except (proto.WireError, OSError) as e:
            raise KernelError(f"{op}: twin host {self.root} is down/booting ({e})") from None
        finally:
            sock.close()
        proto.close_fds(got)
        if not reply.get("ok"):
            raise KernelError(str(reply.get("error", f"{op} failed")))
        return reply

    # --- identity and environment ------------------------------------------------------
    def release(self) -> str:
        return self._read("proc/sys/kernel/osrelease").strip()

    def cmdline(self) -> str:
        return self._read("proc/cmdline").strip()

    def page_size(self) -> int:
        return int(self._read("proc/pagesize"))

    def boot_time(self) -> float:
        return float(self._read("proc/btime"))

    def boot_id(self) -> str:
        return f"twin-boot-{int(self.status().get('boot_count') or 0)}"

    def mem_available(self) -> int:
        for line in self._read("proc/meminfo").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        raise KernelError(f"{self._p('proc/meminfo')}: no MemAvailable line")

    def hostname(self) -> str:
        """A twin host is named by its root directory (the inventory host name)."""
        name = os.path.basename(self.root)
        return os.path.basename(os.path.dirname(self.root)) if name == "host" else name

    def child_env(self, base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
        """Children act on this twin host too: the twin setting goes with them."""
        env = super().child_env(base)
        env[TWIN_ENV] = self.root
        return env

    def state_dir(self) -> str:
        path = self._p("var/lib/kho-agent")
        os.makedirs(path, exist_ok=True)
        return path

    def dmesg(self) -> str:
        """The kernel log of the current boot."""
        return self._read(proto.DMESG)

    # --- debugfs -----------------------------------------------------------------------
    def _debugfs(self, rel: str) -> str:
        parts = [p for p in rel.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise KernelError(f"debugfs path {rel!r} leaves debugfs")
        return os.path.join(self._p("sys/kernel/debug"), *parts)

    def debugfs_mounted(self) -> bool:
        self._up("debugfs")
        return os.path.isdir(self._p("sys/kernel/debug"))

    def read_debugfs(self, rel: str) -> Optional[bytes]:
        path = self._debugfs(rel)
        self._up(f"debugfs {rel}")
        try:
            with open(path, "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError as e:
            raise KernelError(f"read {path}: {e.strerror}") from None

    def list_debugfs(self, rel: str) -> list[str]:
        path = self._debugfs(rel)
        self._up(f"debugfs {rel}")
        try:
            return sorted(os.listdir(path))
        except OSError:
            return []

    # --- live update and memory ---------------------------------------------------------
    def liveupdate_present(self) -> bool:
        self._up("/dev/liveupdate")
        return os.path.exists(self._p(proto.DEV_LIVEUPDATE))

    def open_liveupdate(self) -> LiveUpdate:
        label = "open /dev/liveupdate"
        if not self.liveupdate_present():
            raise LiveUpdateError(errno.ENOENT, label, "no /dev/liveupdate (liveupdate=on?)")
        sock = self._connect(proto.DEV_LIVEUPDATE, label)
        try:
            reply, fds = proto.recv_msg(sock)
        except (proto.WireError, OSError) as e:
            raise KernelError(f"{label}: twin host {self.root} is down/booting ({e})") from None
        finally:
            sock.close()
        if not reply.get("ok") or len(fds) != 1:
            proto.close_fds(fds)
            raise LiveUpdateError(int(reply.get("errno", errno.EIO)), label,
                                  str(reply.get("error", "")))
        os.set_inheritable(fds[0], False)
        return TwinLiveUpdate(socket.socket(fileno=fds[0]), self.root)

    def open_physmem(self) -> PhysicalMemory:
        self._up("physical memory")
        try:
            mem = RawImage(self._p("mem.img"))
        except OSError as e:
            raise KernelError(f"open {self._p('mem.img')}: {e.strerror}") from None
        mem.source = "twin /dev/mem"
        return mem

    def physmem_access(self) -> dict[str, tuple[bool, str]]:
        """A twin serves its RAM image as /dev/mem; it has no /proc/kcore."""
        ok = os.path.isfile(self._p("mem.img"))
        return {"devmem_ram": (ok, f"twin /dev/mem ({self._p('mem.img')})" if ok else
                               f"no {self._p('mem.img')}"),
                "kcore": (False, "a twin host has no /proc/kcore")}

    def lockdown(self) -> Optional[str]:
        """ROOT/sys/kernel/security/lockdown when the twin host has one (tests write it)."""
        from ..capabilities import parse_selected
        try:
            with open(self._p("sys/kernel/security/lockdown")) as f:
                return parse_selected(f.read())
        except OSError:
            return None

    def kernel_config(self) -> Optional[dict[str, str]]:
        """ROOT/boot/config-RELEASE when the twin host has one."""
        from ..capabilities import parse_kconfig
        try:
            with open(self._p(f"boot/config-{self.release()}")) as f:
                return parse_kconfig(f.read())
        except OSError:
            return None

    def memfd_pfns(self, fd: int, size: int) -> list[int]:
        return [int(p) for p in self.control("pagemap", (fd,), size=int(size))["pfns"]]

    def page_flags(self, pfns: list[int]) -> Optional[list[int]]:
        return [int(f) for f in self.control("kpageflags", pfns=[int(p) for p in pfns])["flags"]]

    def shmem_thp(self) -> Optional[str]:
        """The twin's shmem_enabled (ROOT/sys/kernel/mm/transparent_hugepage/shmem_enabled;
        a test may write a bare setting into it, as root would on a real host)."""
        try:
            text = self._read(self.SHMEM_THP.lstrip("/"))
        except KernelError:
            return None
        words = text.split()
        sel = [w[1:-1] for w in words if w.startswith("[") and w.endswith("]")]
        return sel[0] if sel else (words[0] if len(words) == 1 else None)

    def shmem_huge_hint(self, fd: int, mode: str) -> None:
        """Tell the twin how the memfd was filled (it cannot see this process's madvise):
        its page cache then uses large folios as the real kernel would."""
        self.control("shmem_huge", (fd,), mode=str(mode))

    # --- kexec -----------------------------------------------------------------------------
    def kexec_file_load_supported(self) -> bool:
        return True

    def kexec_load(self, kernel: str, initrd: Optional[str], cmdline: Optional[str]) -> None:
        """Load `kernel` on the twin; cmdline None reuses the running kernel's command line
        (the twin server substitutes its own, as Kernel.kexec_load promises)."""
        self.control("kexec_load", kernel=os.path.abspath(kernel),
                     initrd=os.path.abspath(initrd) if initrd else None, cmdline=cmdline)

    def kexec_unload(self) -> None:
        self.control("kexec_unload")

    def kexec_loaded(self) -> bool:
        return self._read("sys/kernel/kexec_loaded").strip() == "1"

    def kexec_exec(self, delay: float = 0.5) -> None:
        """Reboot into the loaded kernel `delay` seconds from now (the call returns first,
        like the lab's detached `sleep 0.5; kexec -e`); every process of the host dies."""
        self.control("kexec_exec", delay=float(delay))

    # --- PID 1: the twin's systemd (controller/kho_fleet/sim/twinsystemd.py) ------------------
    def _systemd(self, op: str, fds: tuple = (), **args: object) -> tuple[dict, list[int]]:
        """A request to the twin's PID 1, keeping the fds of the reply."""
        sock = self._connect(proto.CONTROL, op)
        try:
            reply, got = proto.call(sock, {"op": op, **args}, fds)
        except (proto.WireError, OSError) as e:
            raise KernelError(f"{op}: twin host {self.root} is down/booting ({e})") from None
        finally:
            sock.close()
        if not reply.get("ok"):
            proto.close_fds(got)
            raise KernelError(str(reply.get("error", f"{op} failed")))
        return reply, got

    def init_system(self) -> InitSystem:
        st, _ = self._systemd("systemd_status")
        return InitSystem(str(st.get("name")), st.get("version"), str(st.get("detail", "")))

    def fdstore_units(self) -> list[FdStoreUnit]:
        st, _ = self._systemd("systemd_status")
        return [FdStoreUnit(str(u["unit"]), int(u["count"]), str(u["preserve"]), int(u["max"]),
                            [str(n) for n in u.get("names", [])]) for u in st.get("units", [])]

    def systemd_kexec(self, delay: float = 0.5) -> None:
        """`systemctl kexec` on the twin `delay` seconds from now: its services are stopped,
        its systemd-shutdown preserves the FD stores through LUO, then the loaded kernel."""
        self._systemd("systemd_kexec", delay=float(delay))

    def fdstore_push(self, unit: str, name: str, fd: int,
                     session_name: Optional[str] = None) -> None:
        self._systemd("fdstore_add", (fd,), unit=unit, name=name, session_name=session_name)

    def fdstore_take(self, unit: str) -> list[tuple[str, int]]:
        """What the twin's PID 1 passed this process when it started it as `unit`
        (LISTEN_FDS, as on Linux): nothing for a process that was not started so."""
        from ..systemdhost import listen_fds
        return listen_fds(dict(os.environ), os.getpid())

    def unit_pending(self, unit: str) -> bool:
        """The twin's PID 1 has `unit` queued (an at_boot unit) or running."""
        st, _ = self._systemd("systemd_status")
        return unit in [str(u) for u in st.get("pending", [])]

    def fdstore_remove(self, unit: str, name: str) -> None:
        self._systemd("fdstore_remove", unit=unit, name=name)

    def start_unit(self, unit: str, argv: list[str], env: dict[str, str],
                   keep_config: bool = False, wait: bool = True) -> str:
        """The twin's PID 1 starts `argv` as `unit`, its FD store in LISTEN_FDS."""
        reply, _ = self._systemd("start_unit", unit=unit, argv=list(argv), env=dict(env))
        return f"twin PID 1 started {unit} (pid {reply.get('pid')})"

    def fdstore_peek(self, unit: str) -> list[tuple[str, int]]:
        """(name, fd) of a dup of every fd in `unit`'s store, as PID 1 holds it now (a
        test's look, like `systemd-analyze fdstore` with the fds)."""
        reply, fds = self._systemd("fdstore_take", unit=unit)
        names = [str(n) for n in reply.get("names", [])]
        if len(names) != len(fds):
            proto.close_fds(fds)
            raise KernelError(f"fdstore_take {unit}: {len(names)} names for {len(fds)} fds")
        for fd in fds:
            os.set_inheritable(fd, False)
        return list(zip(names, fds))

    # --- twin extras -------------------------------------------------------------------------
    def adopt_session(self, fd: int, name: str) -> Session:
        """A Session object for an inherited session fd (e.g. in an exec'd holder)."""
        return TwinSession(socket.socket(fileno=fd), self.root, name)

    def set_fault(self, name: str, value: Optional[float] = None, clear: bool = False) -> list[str]:
        """Arm (or clear) a fault by name; returns the armed faults."""
        return list(self.control("fault", name=name, value=value, clear=clear)["faults"])
