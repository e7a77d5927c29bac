"""The twin host server: sockets, timers and process control around a TwinHost.

See twinkernel.py for the host root layout, the CLI and start_twin(). One thread, one
selector loop: listening sockets (dev/liveupdate, twin.sock), kernel object fds (the
server ends of socketpairs handed out as the device fd and session fds), control
connections, and timers (boot completion, a scheduled kexec).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import select
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

from kho_agent.atomicfile import atomic_write
from kho_agent.kernel import twinproto as proto
from kho_agent.kimage import inspect_kernel_image

from .faults import TWIN_FAULTS, Fault, FaultError
from .faults import parse_fault as parse_fault_text
from .twinhost import Errno, InSession, KernelSpec, OutSession, TwinHost, known_kho
from .twinsystemd import TwinSystemd

__all__ = ["TwinError", "TwinConfig", "TwinServer", "check_fault", "parse_fault"]

_PAGE_SIZES = (4096, 16384, 65536)
PAGE_FAULTS = ("bitflip", "lost-page", "zero-page", "swap-pages", "drop-folio", "stale-page")
_SUN_PATH_MAX = 107
log = logging.getLogger("kho_fleet.twin")


class TwinError(Exception):
    """A twin host could not be started or configured; the message is one line."""


@dataclass
class TwinConfig:
    """Everything a twin host is started with."""

    root: str
    ram_mib: int = 256
    page_size: int = 4096
    release: str = "7.2.13-twin"
    kho: str = "kho-v4"
    cmdline: str = KernelSpec("x").cmdline
    boot_delay: float = 1.0
    faults: dict[str, Optional[float]] = field(default_factory=dict)
    seed: int = 0
    outside_pids: list[int] = field(default_factory=list)
    exit_with: Optional[int] = None

    def check(self) -> None:
        """Raise TwinError naming the first bad setting."""
        if self.ram_mib < 64:
            raise TwinError(f"--ram-mib {self.ram_mib}: at least 64 MiB")
        if self.page_size not in _PAGE_SIZES:
            raise TwinError(f"--page-size {self.page_size}: one of 4096, 16384, 65536")
        if not known_kho(self.kho):
            raise TwinError(f"--kho {self.kho!r}: the twin emulates kho-v2, kho-v3, kho-v4")
        if self.boot_delay < 0:
            raise TwinError("--boot-delay must be >= 0")
        for name in self.faults:
            check_fault(name)
        root = os.path.abspath(self.root)
        if len(os.path.join(root, proto.DEV_LIVEUPDATE)) > _SUN_PATH_MAX:
            raise TwinError(f"--root {root}: too long for AF_UNIX socket paths")
        if os.path.exists(root) and not os.path.isdir(root):
            raise TwinError(f"--root {root}: not a directory")
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as e:
            raise TwinError(f"--root {root}: {e.strerror}") from None
        if not os.access(root, os.W_OK | os.X_OK):
            raise TwinError(f"--root {root}: not writable")


def check_fault(name: str) -> str:
    """`name` if it is a twin fault (bare, or placed: faults.parse_fault), else TwinError."""
    try:
        parse_fault_text(name, TWIN_FAULTS)
    except FaultError as e:
        raise TwinError(str(e)) from None
    return name


def _starttime(pid: int) -> Optional[str]:
    """Field 22 of /proc/PID/stat: tells a pid from a later process reusing it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclass
class Conn:
    """A server-side socket: the device fd, a session fd, or a control connection."""

    kind: str
    sock: socket.socket
    session: OutSession | InSession | None = None


class TwinServer:
    """The twin host: sockets and timers around a TwinHost (single-threaded)."""

    def __init__(self, cfg: TwinConfig) -> None:
        self.cfg = cfg
        self.root = os.path.abspath(cfg.root)
        self.faults = dict(cfg.faults)
        self.sel = selectors.DefaultSelector()
        self.listeners: dict[str, socket.socket] = {}
        self.conns: dict[int, Conn] = {}
        self.device: Optional[Conn] = None
        self.peers: dict[int, Optional[str]] = {}
        self.client_inodes: set[int] = set()
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self.state = "booting"
        self.stopping = False
        self.retrieves_this_boot = 0
        self.host: Optional[TwinHost] = None
        self.exempt = {os.getpid(), os.getppid(), 1, *cfg.outside_pids}
        self._post: list[Callable[[], None]] = []
        self.request_pid: Optional[int] = None    # the peer of the request being served
        self.systemd = TwinSystemd(self)          # PID 1: FD stores, systemctl kexec

    # --- lifecycle -------------------------------------------------------------------------
    def run(self) -> int:
        self._lock()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd)
        self.sel.register(rfd, selectors.EVENT_READ, None)
        cfg = self.cfg
        self.host = TwinHost(self.root, cfg.ram_mib << 20, cfg.page_size, cfg.seed)
        self._write_state()
        spec = KernelSpec(cfg.release, cfg.kho, "luo-v5", "memfd-v2", cfg.cmdline)
        self.host.boot(spec)
        log.info("cold boot: %s (%s)", spec.release, spec.kho)
        self._after(cfg.boot_delay, self._come_up)
        try:
            while not self.stopping:
                self._tick()
        finally:
            if self.host is not None:
                self._kill(self._victims(), "power off")      # the host's processes die
            self._close_all()
            for name in (proto.DEV_LIVEUPDATE, proto.CONTROL):
                self._unlink(name)
            self.state = "off"
            self._write_state()
        return 0

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _lock(self) -> None:
        self._lockf = open(os.path.join(self.root, "twin.lock"), "w")
        try:
            fcntl.flock(self._lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise TwinError(f"--root {self.root}: another twin host is running there") from None

    def _tick(self) -> None:
        now = time.monotonic()
        timeout = 0.5
        if self.timers:
            timeout = max(0.0, min(timeout, min(t for t, _ in self.timers) - now))
        for key, _ in self.sel.select(timeout):
            if key.data is None:
                try:
                    os.read(key.fd, 512)
                except OSError:
                    pass
            else:
                key.data()
        now = time.monotonic()
        due = [t for t in self.timers if t[0] <= now]
        self.timers = [t for t in self.timers if t[0] > now]
        for _, fn in sorted(due, key=lambda t: t[0]):
            fn()
        if self.cfg.exit_with and not proto.pid_alive(self.cfg.exit_with):
            log.info("pid %d is gone: powering off", self.cfg.exit_with)
            self.stopping = True

    def _after(self, delay: float, fn: Callable[[], None]) -> None:
        self.timers.append((time.monotonic() + delay, fn))

    def _write_state(self) -> None:
        h = self.host
        st: dict[str, Any] = {"state": self.state, "pid": os.getpid(), "root": self.root,
                              "faults": sorted(self.faults), "updated": time.time()}
        if h is not None:
            st.update(release=h.spec.release, kho=h.spec.kho if h.kho_on else None,
                      boot_count=h.boot_count, kexec_count=h.kexec_count,
                      boot_time=h.boot_time, kexec_loaded=h.loaded is not None,
                      loaded=h.loaded.release if h.loaded else None,
                      liveupdate=h.liveupdate, last_faults=h.last_faults)
        # rewritten on every state change: atomic against a crash, no fsync (a power cut
        # ends the simulated host too)
        atomic_write(os.path.join(self.root, proto.STATE), json.dumps(st).encode(), fsync=False)

    def _come_up(self) -> None:
        assert self.host is not None
        self.retrieves_this_boot = 0
        self.systemd.after_boot()
        self._listen(proto.CONTROL, self._accept_control)
        if self.host.liveupdate:
            self._listen(proto.DEV_LIVEUPDATE, self._accept_device)
        else:
            self._unlink(proto.DEV_LIVEUPDATE)
        self.state = "up"
        self._write_state()
        log.info("up: %s", self.host.spec.release)

    # --- sockets -----------------------------------------------------------------------------
    def _unlink(self, rel: str) -> None:
        try:
            os.unlink(os.path.join(self.root, rel))
        except FileNotFoundError:
            pass

    def _listen(self, rel: str, handler: Callable[[socket.socket], None]) -> None:
        path = os.path.join(self.root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._unlink(rel)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(64)
        self.listeners[rel] = s
        self.sel.register(s, selectors.EVENT_READ, lambda: handler(s))

    def _stop_listening(self) -> None:
        """Sockets refuse connections (the files stay: connect gets ECONNREFUSED)."""
        for s in self.listeners.values():
            self.sel.unregister(s)
            s.close()
        self.listeners.clear()

    def _register(self, conn: Conn) -> None:
        self.conns[conn.sock.fileno()] = conn
        self.sel.register(conn.sock, selectors.EVENT_READ, lambda: self._readable(conn))

    def _drop(self, conn: Conn) -> None:
        self.conns.pop(conn.sock.fileno(), None)
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _close_all(self) -> None:
        self._stop_listening()
        for conn in list(self.conns.values()):
            self._drop(conn)
        self.device = None
        self.client_inodes.clear()
        self.peers.clear()

    def _peer(self, sock: socket.socket) -> None:
        pid = proto.peer_pid(sock)
        if pid and pid not in self.exempt:
            self.peers[pid] = _starttime(pid)

    def _hand_out(self, conn_sock: socket.socket, kind: str, reply: dict,
                  session: OutSession | InSession | None = None) -> None:
        """Make a kernel object fd: one socketpair end is sent, the other is ours."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.settimeout(5)              # a stalled half-message must not hang the host
        self.client_inodes.add(os.fstat(theirs.fileno()).st_ino)
        conn = Conn(kind, ours, session)
        self._register(conn)
        try:
            proto.send_msg(conn_sock, reply, [theirs.fileno()])
        finally:
            theirs.close()
        if kind == "device":
            self.device = conn

    def _drain_eofs(self) -> None:
        """Release every device/session fd whose last copy is closed, before serving
        anything else: close(2) releases synchronously on a real kernel."""
        conns = [c for c in self.conns.values() if c.kind != "control"]
        if not conns:
            return
        poll = select.poll()
        for c in conns:
            poll.register(c.sock, select.POLLIN)
        ready = {fd for fd, _ in poll.poll(0)}
        for conn in conns:
            if conn.sock.fileno() not in ready:
                continue
            try:
                data = conn.sock.recv(1, socket.MSG_PEEK)       # readable: never blocks
            except OSError:
                data = b""
            if not data:
                self._release(conn)

    def _accept_device(self, lst: socket.socket) -> None:
        """open(/dev/liveupdate): exclusive (luo_open)."""
        sock, _ = lst.accept()
        self._drain_eofs()
        try:
            self._peer(sock)
            sock.settimeout(5)
            if self.device is not None:
                proto.send_msg(sock, proto.reply_error(errno.EBUSY, "/dev/liveupdate is open"))
                return
            assert self.host is not None
            try:
                self.host.device_open()
            except Errno as e:
                proto.send_msg(sock, proto.reply_error(e.errno, str(e)))
                return
            self._hand_out(sock, "device", {"ok": True})
        except OSError as e:
            log.warning("open /dev/liveupdate: %s", e)
        finally:
            sock.close()

    def _accept_control(self, lst: socket.socket) -> None:
        sock, _ = lst.accept()
        self._peer(sock)
        sock.settimeout(5)
        self._register(Conn("control", sock))

    def _readable(self, conn: Conn) -> None:
        try:
            msg, fds = proto.recv_msg(conn.sock)
        except OSError:                  # a WireError too: the peer closed or sent garbage
            self._release(conn)
            return
        self._drain_eofs()
        if conn.sock.fileno() not in self.conns:
            proto.close_fds(fds)
            return
        self.request_pid = proto.peer_pid(conn.sock)    # who asks (PID 1's NotifyAccess=main)
        try:
            reply, out_fds = self._dispatch(conn, msg, fds)
        except Errno as e:
            reply, out_fds = proto.reply_error(e.errno, str(e)), []
        except Exception as e:  # a bad request must not kill the host
            log.exception("request %r failed", msg.get("op"))
            reply, out_fds = proto.reply_error(errno.EIO, f"twin internal error: {e}"), []
        finally:
            proto.close_fds(fds)
        if not isinstance(reply, _Handed):
            try:
                proto.send_msg(conn.sock, reply, out_fds)
            except OSError:
                self._release(conn)
        if self.host is not None and self.state == "up":
            self.host.refresh_proc()
        post, self._post = self._post, []
        for fn in post:
            fn()

    def _release(self, conn: Conn) -> None:
        """Every copy of the fd is closed: the kernel object's release()."""
        self._drop(conn)
        if conn.kind == "device" and self.device is conn:
            self.device = None
        elif conn.kind == "session" and conn.session is not None and self.host is not None:
            self.host.release_session(conn.session)
            self.host.refresh_proc()

    # --- requests ----------------------------------------------------------------------------
    def _dispatch(self, conn: Conn, msg: dict, fds: list[int]) -> tuple[Any, list[int]]:
        op = str(msg.get("op"))
        h = self.host
        assert h is not None
        if conn.kind == "device":
            name = msg.get("name")
            if not isinstance(name, str):
                raise Errno(errno.EINVAL, "name missing")
            if op == "create_session":
                sess: OutSession | InSession = h.create_session(name)
            elif op == "retrieve_session":
                sess = h.retrieve_session(name)
            else:
                raise Errno(errno.EINVAL, f"unknown /dev/liveupdate ioctl {op!r}")
            self._hand_out(conn.sock, "session", {"ok": True, "name": name}, sess)
            return _Handed(), []
        if conn.kind == "session":
            return self._session_op(conn, op, msg, fds)
        return self._control_op(op, msg, fds)

    def _session_op(self, conn: Conn, op: str, msg: dict, fds: list[int]) -> tuple[dict, list[int]]:
        h, sess = self.host, conn.session
        assert h is not None and sess is not None
        incoming_ops = ("retrieve_fd", "finish")
        if op in incoming_ops and not sess.incoming or op == "preserve_fd" and sess.incoming:
            raise Errno(errno.EINVAL, f"{op} is not valid on an "
                        f"{'incoming' if sess.incoming else 'outgoing'} session")
        if op == "get_name":
            return {"ok": True, "name": sess.name}, []
        if op == "finish":
            assert isinstance(sess, InSession)
            h.finish(sess)
            return {"ok": True}, []
        token = msg.get("token")
        if not isinstance(token, int) or not 0 <= token < 1 << 64:
            raise Errno(errno.EINVAL, "token must be a u64")
        if op == "preserve_fd":
            if len(fds) != 1:
                raise Errno(errno.EBADF, "preserve_fd needs exactly one fd")
            assert isinstance(sess, OutSession)
            h.preserve_fd(sess, token, fds[0])
            return {"ok": True}, []
        if op == "retrieve_fd":
            assert isinstance(sess, InSession)
            fd = h.retrieve_fd(sess, token)
            self.retrieves_this_boot += 1
            # kill-agent-before-finish[=N]: right after the N-th RETRIEVE_FD of the boot
            nth = int(self.faults.get("kill-agent-before-finish") or 1)
            if "kill-agent-before-finish" in self.faults and self.retrieves_this_boot == nth:
                self._post.append(self._kill_device_holder)
            return {"ok": True}, [fd]
        raise Errno(errno.EINVAL, f"unknown session ioctl {op!r}")

    def _control_op(self, op: str, msg: dict, fds: list[int]) -> tuple[dict, list[int]]:
        h = self.host
        assert h is not None
        if op == "status":
            return {"ok": True, **self._status()}, []
        pid1 = self.systemd.op(op, msg, fds)
        if pid1 is not None:
            return pid1
        if op == "sync":                     # every earlier close(2) has been released
            return {"ok": True}, []
        if op == "pagemap":
            if len(fds) != 1:
                raise Errno(errno.EBADF, "pagemap needs exactly one fd")
            return {"ok": True, "pfns": h.pagemap(fds[0], int(msg.get("size", 0)))}, []
        if op == "kpageflags":
            return {"ok": True, "flags": h.page_flags([int(p) for p in msg.get("pfns", [])])}, []
        if op == "shmem_huge":               # how a memfd was filled (madvise of its mapping)
            if len(fds) != 1:
                raise Errno(errno.EBADF, "shmem_huge needs exactly one fd")
            h.cache.set_hint(fds[0], str(msg.get("mode")))
            return {"ok": True}, []
        if op == "kexec_load":
            h.kexec_load(self._load_spec(msg))
            self._write_state()
            return {"ok": True, "release": h.loaded.release if h.loaded else None}, []
        if op == "kexec_unload":
            h.kexec_unload()
            self._write_state()
            return {"ok": True}, []
        if op == "kexec_exec":
            if h.loaded is None:
                raise Errno(errno.EINVAL, "kexec -e: no kernel loaded (kexec_file_load first)")
            delay = float(msg.get("delay") or 0.0)
            self._after(max(0.0, delay), self._kexec)
            return {"ok": True, "in": delay}, []
        if op == "fault":
            name = check_fault_errno(str(msg.get("name")))
            if msg.get("clear"):
                self.faults.pop(name, None)
            else:
                val = msg.get("value")
                self.faults[name] = float(val) if val is not None else None
            self._write_state()
            return {"ok": True, "faults": sorted(self.faults)}, []
        raise Errno(errno.EINVAL, f"unknown control op {op!r}")

    def _status(self) -> dict:
        with open(os.path.join(self.root, proto.STATE)) as f:
            return json.load(f)

    def _load_spec(self, msg: dict) -> KernelSpec:
        """kexec_file_load(): read the image like the kernel's loader would."""
        path = str(msg.get("kernel") or "")
        where = f"kexec_file_load {path}"
        if "kexec-load-fails" in self.faults:
            raise Errno(errno.ENOMEM, f"{where}: Cannot allocate memory "
                        "(twin fault kexec-load-fails)")
        if not os.path.isfile(path):
            raise Errno(errno.ENOENT, f"{where}: No such file or directory")
        initrd = msg.get("initrd")
        if initrd and not os.path.isfile(str(initrd)):
            raise Errno(errno.ENOENT, f"{where}: initrd {initrd}: No such file or directory")
        try:
            info = inspect_kernel_image(path)
        except OSError as e:
            raise Errno(e.errno or errno.EIO, f"{where}: {e.strerror}") from None
        if info.release is None:
            raise Errno(errno.ENOEXEC, f"{where}: not a bootable kernel image "
                        f"(no 'Linux version' banner; {'; '.join(info.notes) or info.format})")
        kho = info.kho.split(",")[0] if info.kho else None
        if not known_kho(kho):
            raise Errno(errno.ENOEXEC, f"{where}: speaks KHO ABI {kho!r}, which the twin "
                        "cannot emulate")
        cmdline = msg.get("cmdline")
        assert self.host is not None
        return KernelSpec(info.release, kho, info.luo, info.memfd,
                          str(cmdline) if cmdline is not None else self.host.spec.cmdline,
                          path)

    # --- kexec ------------------------------------------------------------------------------
    def _kexec(self) -> None:
        """reboot(LINUX_REBOOT_CMD_KEXEC): serialize, kill the old world, boot the new one."""
        h = self.host
        if h is None or h.loaded is None or self.state != "up":
            return
        target = h.loaded
        self._drain_eofs()              # sessions closed before reboot() are gone
        self.systemd.before_kexec()     # kexec -e: systemd-shutdown never ran
        self.state = "booting"
        self._stop_listening()
        self._write_state()
        h.last_faults = {}
        stale = self._stale_copies()      # the pages as PRESERVE_FD copied them, before the
        h.serialize()                     # freeze copies each file into its folios again
        self._page_faults(stale)
        self._kill(self._victims(), f"kexec -> {target.release}")
        self._close_all()
        handoff = h.shutdown()
        self.systemd.after_kexec()
        if "abi-mismatch" in self.faults and target.kho is not None:
            other = "kho-v3" if target.kho != "kho-v3" else "kho-v4"
            target = replace(target, kho=other)
            h.last_faults["abi-mismatch"] = {"kho": other}
        if "never-returns" in self.faults:
            self.state = "down"
            self._write_state()
            log.info("never-returns: the host stays down")
            return
        delay = self.cfg.boot_delay
        if "slow-boot" in self.faults:
            val = self.faults["slow-boot"]
            delay = val if val is not None else delay * 10
        h.boot(target, handoff)
        self._write_state()
        self._after(delay, self._come_up)

    def _stale_copies(self) -> dict[str, tuple[list[tuple[str, int, int, int]], bytes]]:
        """For each stale-page fault: its place and the page's bytes as they are in RAM
        now, i.e. as PRESERVE_FD copied the file into its folios (the freeze copies it
        again). Random places are drawn here, once, with the twin's seeded rng."""
        h = self.host
        assert h is not None
        out: dict[str, tuple[list[tuple[str, int, int, int]], bytes]] = {}
        for text in sorted(self.faults):
            f = parse_fault_text(text, TWIN_FAULTS)
            if f.name != "stale-page":
                continue
            try:
                where = self._place(f)
            except Errno:
                continue                                 # said again by _page_fault
            out[text] = (where, h.mem.read(where[0][3] * h.ps, h.ps))
        return out

    def _page_faults(self, stale: Optional[dict[str, tuple[list[tuple[str, int, int, int]],
                                                            bytes]]] = None) -> None:
        """The page faults, applied to the serialized memory before the next kernel reads
        it: at a named place (faults.py), else at a seeded random preserved page. What
        was done is in last_faults under the fault's text (offset: bytes into the memfd
        for a placed fault, into the page for a bare bitflip, as it always was).
        `stale`: _stale_copies() taken before the freeze."""
        h = self.host
        assert h is not None
        stale = stale or {}
        pages = h.preserved_data_pages()
        if not pages:
            return
        rng = h.mem.rng
        if "lost-page" in self.faults:
            token, pfn = pages[rng.randrange(len(pages))]
            h.drop_from_tree(pfn)
            h.last_faults["lost-page"] = {"token": token, "pfn": pfn}
            pages = [p for p in pages if p[1] != pfn] or pages
        if "bitflip" in self.faults:
            token, pfn = pages[rng.randrange(len(pages))]
            off = rng.randrange(h.ps)
            bit = rng.randrange(8)
            pa = pfn * h.ps + off
            h.mem.write(pa, bytes([h.mem.read(pa, 1)[0] ^ (1 << bit)]))
            h.last_faults["bitflip"] = {"token": token, "pfn": pfn, "offset": off, "bit": bit}
        for text in sorted(self.faults):
            f = parse_fault_text(text, TWIN_FAULTS)
            if f.name in ("bitflip", "lost-page") and f.place is None:
                continue                                       # done above, as before
            if f.name in PAGE_FAULTS:
                try:
                    h.last_faults[text] = self._page_fault(f, stale.get(text))
                except Errno as e:
                    log.warning("fault %s: %s", text, e)
                    h.last_faults[text] = {"error": str(e)}

    def _place(self, f: Fault) -> list[tuple[str, int, int, int]]:
        """[(session, token, offset, pfn)] the fault strikes: its place, or random pages
        (two of one memfd for swap-pages). Errno ENOENT for a place that is not preserved."""
        h = self.host
        assert h is not None
        ps, rng = h.ps, h.mem.rng
        files = [(s.name, fl) for s in h.out_sessions for fl in s.files if fl.pfns]
        if f.place is None:
            many = [(n, fl) for n, fl in files if len(fl.pfns) > 1]
            pool = many if f.name == "swap-pages" else files
            if not pool:
                raise Errno(errno.ENOENT, "no preserved memfd to fault")
            name, fl = pool[rng.randrange(len(pool))]
            idx = rng.sample(range(len(fl.pfns)), 2 if f.name == "swap-pages" else 1)
            offs = [i * ps + (rng.randrange(ps) if f.name == "bitflip" else 0) for i in idx]
        else:
            p = f.place
            hit = next((fl for n, fl in files if n == p.session and fl.token == p.token), None)
            if hit is None:
                raise Errno(errno.ENOENT, f"no preserved memfd {p.session}/{p.token:#x}")
            name, fl, offs = p.session, hit, list(p.offsets)
            bad = [o for o in offs if o // ps >= len(fl.pfns)]
            if bad:
                raise Errno(errno.ENOENT, f"offset {bad[0]:#x} is past the end of "
                            f"{name}/{fl.token:#x} ({len(fl.pfns)} pages)")
        return [(name, fl.token, o, fl.pfns[o // ps]) for o in offs]

    def _page_fault(self, f: Fault, stale: Optional[tuple[list[tuple[str, int, int, int]],
                                                          bytes]] = None) -> dict[str, Any]:
        h = self.host
        assert h is not None
        ps, mem = h.ps, h.mem
        where = stale[0] if stale is not None else self._place(f)
        name, token, off, pfn = where[0]
        out: dict[str, Any] = {"session": name, "token": token, "offset": off, "pfn": pfn}
        pa = pfn * ps
        if f.name == "bitflip":
            bit = mem.rng.randrange(8)
            at = pa + off % ps
            mem.write(at, bytes([mem.read(at, 1)[0] ^ (1 << bit)]))
            out["bit"] = bit
        elif f.name == "zero-page":
            mem.write(pa, bytes(ps))
        elif f.name == "stale-page":
            old, how = stale_copy(mem.read(pa, ps), stale[1] if stale is not None else None)
            mem.write(pa, old)
            out["stale"] = how
        elif f.name == "swap-pages":
            _, _, off2, pfn2 = where[1]
            a, b = mem.read(pa, ps), mem.read(pfn2 * ps, ps)
            mem.write(pa, b)
            mem.write(pfn2 * ps, a)
            out.update(offsets=[off, off2], pfns=[pfn, pfn2])
        elif f.name == "drop-folio":
            h.drop_from_tree(pfn)
        out["page_offset"] = off - off % ps
        return out

    def _victims(self) -> set[int]:
        """Processes of the old kernel: peers, and holders of twin fds or known memfds."""
        out = {pid for pid, start in self.peers.items() if _starttime(pid) == start}
        assert self.host is not None
        idents = self.host.cache.idents() | {f.ident for s in self.host.out_sessions
                                             for f in s.files}
        socks = {f"socket:[{ino}]" for ino in self.client_inodes}
        out |= _fd_holders(socks, idents)
        return out - self.exempt

    def _kill(self, pids: set[int], why: str) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        log.info("%s: killed %s", why, sorted(pids))

    def _kill_device_holder(self) -> None:
        """Fault kill-agent-before-finish: the /dev/liveupdate holder dies now."""
        victims: set[int] = set()
        if self.device is not None:
            ino = {f"socket:[{i}]" for i in self.client_inodes}
            victims = _fd_holders(ino, set()) - self.exempt
        assert self.host is not None
        # recorded before the kill: whoever sees the holder die may read the state at once
        self.host.last_faults["kill-agent-before-finish"] = {"pids": sorted(victims)}
        self._write_state()
        self._kill(victims, "kill-agent-before-finish")


def stale_copy(now: bytes, at_preserve: Optional[bytes]) -> tuple[bytes, str]:
    """(an old copy of a page whose bytes are `now`, where it came from).

    "preserve": the page as PRESERVE_FD copied it (`at_preserve`), when the workload wrote
    the page since: the freeze missed its last writes (as if the folio had been migrated
    after PRESERVE_FD and the preserved folio array still named the old frame).
    "cacheline": the page was not written since PRESERVE_FD (the twin's own workloads write
    every page once, before it), and the twin never saw the page's earlier versions (the
    writes are the host kernel's). It stands in an old copy that is neither the current
    bytes nor zeros: the page one 64-byte cache line behind (its bytes rotated by 64), or,
    for a page of one repeated byte, that byte inverted."""
    if at_preserve is not None and at_preserve != now:
        return at_preserve, "preserve"
    old = now[64:] + now[:64]
    if old == now:
        old = bytes(b ^ 0xFF for b in now)
    return old, "cacheline"


class _Handed(dict):
    """Marker: the reply was already sent with the new fd."""


def check_fault_errno(name: str) -> str:
    try:
        return check_fault(name)
    except TwinError as e:
        raise Errno(errno.EINVAL, str(e)) from None


def _fd_holders(links: set[str], idents: set[tuple[int, int]]) -> set[int]:
    """Pids with an fd whose /proc link is in `links`, or a memfd whose (dev, ino) is in
    `idents`."""
    out: set[int] = set()
    if not links and not idents:
        return out
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        base = f"/proc/{name}/fd"
        try:
            fds = os.listdir(base)
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{base}/{fd}")
                if link in links:
                    out.add(int(name))
                    break
                if idents and link.startswith("/memfd:"):
                    st = os.stat(f"{base}/{fd}")
                    if (st.st_dev, st.st_ino) in idents:
                        out.add(int(name))
                        break
            except OSError:
                continue
    return out


def parse_fault(text: str) -> tuple[str, Optional[float]]:
    """"NAME", "NAME=SECONDS" (slow-boot) or a placed "NAME@SESSION/TOKEN:OFFSET"
    (faults.py) -> (key, value): a placed fault is keyed by its whole text."""
    try:
        f = parse_fault_text(text, TWIN_FAULTS)
    except FaultError as e:
        raise TwinError(str(e)) from None
    return (text, None) if f.place is not None else (f.name, f.value)
