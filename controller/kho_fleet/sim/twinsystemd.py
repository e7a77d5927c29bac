"""The twin host's PID 1: a systemd (>= 262) that keeps units' FD stores and carries the
preserved ones through LUO at `systemctl kexec` -- and loses them at a bare `kexec -e`.

What PID 1 is comes from the host's disk, `ROOT/etc/twin-init.json`
(`{"name": "systemd", "version": 262}`); without it PID 1 is a plain `init` (no FD
stores, no `systemctl kexec`), so twin hosts that do not ask for systemd behave as before.

Control requests (kho_agent.kernel.twin, twinproto's control socket):
- `systemd_status` -> {name, version, detail, units: [{unit, count, preserve, max, names}]}
- `start_unit` {unit, argv, env, preserve, max} -> {pid}: `systemctl start UNIT` of a
  Type=notify service: PID 1 starts `argv` with the unit's FD store at fds 3.. and
  LISTEN_PID / LISTEN_FDS / LISTEN_FDNAMES in its environment (sd_listen_fds), and that
  process is the unit's main process.
- `fdstore_add` {unit, name, session_name} + one fd: sd_notify FDSTORE=1. Only the unit's
  main process may send it (NotifyAccess=main; a process that was not started as the unit
  has no $NOTIFY_SOCKET on Linux): anything else is refused with EPERM. A LUO session fd
  comes with its `session_name` (systemd's `luo_session` entry).
- `fdstore_remove` {unit, name}: sd_notify FDSTOREREMOVE=1 (same rule).
- `fdstore_take` {unit} -> names + dups of every fd in the store (a test's look at it).
- `systemd_kexec` {delay}: `systemctl kexec` into the loaded kernel.

ROOT/etc/twin-init.json may also name units PID 1 starts at every boot after a kexec, as
systemd starts kho-agent-verify.service early in the boot:
`"at_boot": {"kho-agent-verify.service": {"argv": [...], "env": {...}}}`; their output
goes to ROOT/var/log/UNIT.log.

`systemctl kexec`, as systemd 262's shutdown does it (src/shared/luo-util.c): services are
stopped (SIGTERM to each unit's main process, SIGKILL to what is left after a grace time),
then systemd-shutdown opens /dev/liveupdate (EBUSY if a
process still holds it: every store is lost), creates the session `systemd`, preserves each
plain FD-store fd of a unit with FileDescriptorStorePreserve=yes at tokens 1.. and a JSON
mapping memfd at token 0 (`{"version": 1, "units": {UNIT: {"fdstore": [{"type": "fd",
"name", "token"} | {"type": "luo_session", "name", "sessionName"}]}}}`); session fds are
only recorded: their sessions survive on their own. The next boot's PID 1 retrieves the
mapping, every fd and every recorded session, FINISHes `systemd` and gives each unit its
store back. A `kexec -e` (kexec_exec) skips all of it: every FD store is lost, and dmesg
says which.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from kho_agent.kernel import twinproto as proto

from .twinluo import Errno

if TYPE_CHECKING:
    from .twinserver import TwinServer

__all__ = ["TwinSystemd", "FdEntry", "Unit", "INIT_FILE", "SESSION", "MAPPING_TOKEN"]

log = logging.getLogger("kho_fleet.sim.twinsystemd")

INIT_FILE = "etc/twin-init.json"
SESSION = "systemd"          # LUO_SESSION_NAME
MAPPING_TOKEN = 0            # LUO_MAPPING_INDEX
LUO_MIN_VERSION = 262
STOP_GRACE_S = 5.0           # TimeoutStopSec before SIGKILL, short for a twin

# Starts a unit's process with its FD store at fds 3.. (sd_listen_fds): argv[1] is the JSON
# list of the fds the twin server passed, argv[2:] the unit's command line.
_LISTEN_SHIM = """import fcntl, json, os, sys
fds = json.loads(sys.argv[1]); n = len(fds)
hi = [fcntl.fcntl(f, fcntl.F_DUPFD_CLOEXEC, 3 + n) for f in fds]
for f in fds:
    os.close(f)
for i, f in enumerate(hi):
    os.dup2(f, 3 + i)
    os.close(f)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execvp(sys.argv[2], sys.argv[2:])
"""


@dataclass
class FdEntry:
    """One fd in a unit's store (`session_name`: it is that LUO session's fd)."""

    name: str
    fd: int
    session_name: Optional[str] = None


@dataclass
class Unit:
    """A service's FD store as PID 1 keeps it."""

    name: str
    preserve: str = "yes"
    max: int = 16
    fds: list[FdEntry] = field(default_factory=list)
    main: Optional[subprocess.Popen] = None     # the main process PID 1 started

    @property
    def main_pid(self) -> Optional[int]:
        """The main process while it runs (reaped here: PID 1 is its parent)."""
        if self.main is None or self.main.poll() is not None:
            return None
        return self.main.pid

    def to_json(self) -> dict[str, Any]:
        return {"unit": self.name, "count": len(self.fds), "preserve": self.preserve,
                "max": self.max, "names": [e.name for e in self.fds]}


class TwinSystemd:
    """PID 1 of a twin host, living in the twin server process (it survives kexec as the
    hardware does; what it held in the old kernel is dropped at every kexec)."""

    def __init__(self, server: TwinServer) -> None:
        self.srv = server
        self.units: dict[str, Unit] = {}
        self.via_systemd = False
        self.queued: set[str] = set()       # at_boot units not started yet

    # --- what PID 1 is --------------------------------------------------------------------
    def init(self) -> tuple[str, Optional[int], str]:
        path = os.path.join(self.srv.root, INIT_FILE)
        try:
            with open(path) as f:
                raw = json.load(f)
            name = str(raw.get("name") or "init")
            ver = raw.get("version")
            return name, ver if isinstance(ver, int) else None, f"twin {INIT_FILE}"
        except (OSError, ValueError, AttributeError):
            return "init", None, f"twin: no {INIT_FILE} (PID 1 is a plain init)"

    def _luo_capable(self) -> bool:
        name, ver, _ = self.init()
        return name == "systemd" and ver is not None and ver >= LUO_MIN_VERSION

    def _log(self, msg: str) -> None:
        if self.srv.host is not None:
            self.srv.host.log(msg)
        log.info("%s", msg)

    # --- control requests -------------------------------------------------------------------
    def op(self, op: str, msg: dict, fds: list[int]) -> Optional[tuple[dict, list[int]]]:
        """Serve `op` if it is PID 1's; None otherwise."""
        if op == "systemd_status":
            name, ver, detail = self.init()
            return {"ok": True, "name": name, "version": ver, "detail": detail,
                    "units": [u.to_json() for _, u in sorted(self.units.items())],
                    "pending": sorted(self.queued | {n for n, u in self.units.items()
                                                     if u.main_pid is not None})}, []
        if op not in ("fdstore_add", "fdstore_take", "fdstore_remove", "start_unit",
                      "systemd_kexec"):
            return None
        if self.init()[0] != "systemd":
            raise Errno(errno.EHOSTDOWN, f"{op}: PID 1 is not systemd on this twin host "
                        f"(write {INIT_FILE})")
        if op == "start_unit":
            return self._start_unit(msg)
        if op in ("fdstore_add", "fdstore_remove"):
            unit = str(msg.get("unit") or "")
            if not unit.endswith(".service"):
                raise Errno(errno.EINVAL, f"{op}: unit {unit!r} is not a service")
            got = self.units.get(unit)
            main = got.main_pid if got is not None else None
            if main is None or self.srv.request_pid != main:
                raise Errno(errno.EPERM, f"{op}: no $NOTIFY_SOCKET: pid "
                            f"{self.srv.request_pid} does not run as {unit} (its main "
                            f"process is {main or 'not running'}; start it through PID 1)")
            assert got is not None
            u = got
        if op == "fdstore_remove":
            name = str(msg.get("name") or "")
            gone = [e for e in u.fds if e.name == name]
            for e in gone:
                os.close(e.fd)
                u.fds.remove(e)
            return {"ok": True, "removed": len(gone)}, []
        if op == "fdstore_add":
            if len(fds) != 1:
                raise Errno(errno.EBADF, "fdstore_add needs exactly one fd")
            if len(u.fds) >= u.max:
                raise Errno(errno.EXFULL, f"{unit}: FileDescriptorStoreMax={u.max} reached")
            sname = msg.get("session_name")
            u.fds.append(FdEntry(str(msg.get("name") or "stored"), os.dup(fds[0]),
                                 str(sname) if sname else None))
            return {"ok": True, "count": len(u.fds)}, []
        if op == "fdstore_take":
            got = self.units.get(str(msg.get("unit")))
            if got is None:
                return {"ok": True, "names": []}, []
            out = [(e.name, os.dup(e.fd)) for e in got.fds]
            self.srv._post.append(lambda: proto.close_fds([fd for _, fd in out]))
            return {"ok": True, "names": [n for n, _ in out]}, [fd for _, fd in out]
        # systemd_kexec
        h = self.srv.host
        assert h is not None
        if not self._luo_capable():
            self._log("systemd: systemctl kexec without LUO support: FD stores are not kept")
        if h.loaded is None:
            raise Errno(errno.EINVAL, "systemctl kexec: no kernel loaded (kexec_file_load "
                        "first)")
        self.srv._after(max(0.0, float(msg.get("delay") or 0.0)), self._systemctl_kexec)
        return {"ok": True}, []

    def _start_unit(self, msg: dict) -> tuple[dict, list[int]]:
        """`systemctl start UNIT`: its process, the FD store at fds 3.. (LISTEN_FDS)."""
        unit = str(msg.get("unit") or "")
        if not unit.endswith(".service"):
            raise Errno(errno.EINVAL, f"start_unit: unit {unit!r} is not a service")
        argv = msg.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise Errno(errno.EINVAL, "start_unit: argv must be a non-empty list of strings")
        u = self.units.setdefault(unit, Unit(unit, str(msg.get("preserve") or "yes"),
                                             int(msg.get("max") or 4096)))
        if u.main_pid is not None:
            return {"ok": True, "pid": u.main_pid, "already": True}, []
        return {"ok": True, "pid": self._spawn(u, argv, msg.get("env") or {})}, []

    def _spawn(self, u: Unit, argv: list[str], env: dict) -> int:
        fds = [e.fd for e in u.fds]
        penv = {str(k): str(v) for k, v in dict(env).items()}
        penv.pop("LISTEN_PID", None)
        if fds:
            penv["LISTEN_FDS"] = str(len(fds))
            penv["LISTEN_FDNAMES"] = ":".join(e.name for e in u.fds)
            argv = [sys.executable, "-c", _LISTEN_SHIM, json.dumps(fds), *argv]
        logdir = os.path.join(self.srv.root, "var/log")
        os.makedirs(logdir, exist_ok=True)
        with open(os.path.join(logdir, f"{u.name}.log"), "ab") as log:
            try:
                u.main = subprocess.Popen(argv, env=penv, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=log, pass_fds=tuple(fds),
                                          start_new_session=True)
            except OSError as e:
                raise Errno(e.errno or errno.ENOEXEC, f"start {u.name}: {argv[0]}: "
                            f"{e.strerror}") from None
        self._log(f"systemd[1]: Started {u.name} (pid {u.main.pid}"
                  + (f", {len(fds)} fds from its store" if fds else "") + ").")
        return u.main.pid

    def _at_boot(self) -> dict[str, Any]:
        """twin-init.json's `at_boot` units ({} when none)."""
        try:
            with open(os.path.join(self.srv.root, INIT_FILE)) as f:
                at_boot = json.load(f).get("at_boot") or {}
        except (OSError, ValueError, AttributeError):
            return {}
        return at_boot if isinstance(at_boot, dict) else {}

    def _start_boot_units(self) -> None:
        """The units twin-init.json's `at_boot` names (kho-agent-verify.service)."""
        self.queued = set()
        if self.srv.state != "up":
            return
        for name, body in sorted(self._at_boot().items()):
            u = self.units.setdefault(name, Unit(name, "no", 0))
            try:
                self._spawn(u, list(body["argv"]), dict(body.get("env") or {}))
            except (Errno, KeyError, TypeError) as err:
                self._log(f"systemd[1]: Failed to start {name}: {err}")

    # --- kexec ----------------------------------------------------------------------------------
    def _systemctl_kexec(self) -> None:
        """Stop the units (SIGTERM to their main processes; the server keeps serving while
        they exit, as PID 1 does), then the rest as systemd-shutdown."""
        srv, h = self.srv, self.srv.host
        if h is None or h.loaded is None or srv.state != "up":
            return
        self._log("systemd[1]: Stopping services for kexec.")
        mains = [u.main for u in self.units.values()
                 if u.main is not None and u.main_pid is not None]
        for p in mains:
            try:
                p.send_signal(signal.SIGTERM)
            except OSError:
                pass
        end = time.monotonic() + STOP_GRACE_S

        def wait() -> None:
            if any(p.poll() is None for p in mains) and time.monotonic() < end:
                srv._after(0.02, wait)
                return
            self._shutdown()
        wait()

    def _shutdown(self) -> None:
        srv, h = self.srv, self.srv.host
        if h is None or h.loaded is None or srv.state != "up":
            return
        victims = srv._victims()
        srv._kill(victims, "systemctl kexec: stopping services")
        end = time.monotonic() + 5
        while any(proto.pid_alive(p) for p in victims) and time.monotonic() < end:
            time.sleep(0.01)
        srv._drain_eofs()                 # the killed processes' fds are closed now
        if self._luo_capable() and h.liveupdate:
            self._preserve_stores()
        self.via_systemd = True
        try:
            srv._kexec()
        finally:
            self.via_systemd = False
            self._drop_all(None)
            for u in self.units.values():
                if u.main is not None:
                    u.main.poll()             # killed with the old kernel: reap it
                    u.main = None

    def _preserve_stores(self) -> None:
        """systemd-shutdown: session `systemd`, tokens 1.., the mapping at token 0."""
        srv, h = self.srv, self.srv.host
        assert h is not None
        if srv.device is not None:
            self._log("systemd-shutdown[1]: Failed to open /dev/liveupdate: Device or "
                      "resource busy")
            return
        try:
            h.device_open()
            sess = h.create_session(SESSION)
        except Errno as err:
            self._log(f"systemd-shutdown[1]: Failed to create LUO session '{SESSION}': {err}")
            return
        token = MAPPING_TOKEN + 1
        units: dict[str, Any] = {}
        for name, u in sorted(self.units.items()):
            if u.preserve != "yes":
                continue
            entries: list[dict[str, Any]] = []
            for e in u.fds:
                if e.session_name:
                    entries.append({"type": "luo_session", "name": e.name,
                                    "sessionName": e.session_name})
                    continue
                try:
                    h.preserve_fd(sess, token, e.fd)
                except Errno as why:
                    self._log(f"systemd-shutdown[1]: Failed to preserve LUO fd (name "
                              f"'{e.name}') with token {token}, will be lost across kexec: "
                              f"{why}")
                    continue
                entries.append({"type": "fd", "name": e.name, "token": token})
                token += 1
            if entries:
                units[name] = {"fdstore": entries}
        text = json.dumps({"version": 1, "units": units}).encode()
        mfd = os.memfd_create("luo-mapping", os.MFD_CLOEXEC)
        try:
            os.write(mfd, text)
            h.preserve_fd(sess, MAPPING_TOKEN, mfd)
        finally:
            os.close(mfd)
        self._log(f"systemd-shutdown[1]: Preserved fd stores in LUO session '{SESSION}' "
                  "for kexec.")

    def before_kexec(self) -> None:
        """Called by the twin's reboot(KEXEC) after the last close(2)s: a `kexec -e` that
        did not come through systemctl kexec never ran systemd-shutdown."""
        if self.via_systemd:
            return
        lost = {n: len(u.fds) for n, u in self.units.items() if u.fds}
        if lost:
            self._log("kexec -e: systemd-shutdown did not run; FD stores lost: " +
                      ", ".join(f"{n} ({c})" for n, c in sorted(lost.items())))

    def _drop_all(self, keep: Optional[set[int]]) -> None:
        """The old kernel's fds are gone: every store empties (units stay declared)."""
        for u in self.units.values():
            for e in u.fds:
                if keep is None or e.fd not in keep:
                    try:
                        os.close(e.fd)
                    except OSError:
                        pass
            u.fds = []

    def after_kexec(self) -> None:
        """The direct path: after reboot(KEXEC), nothing PID 1 held survives."""
        if not self.via_systemd:
            self._drop_all(None)
        for u in self.units.values():
            if u.main is not None:
                u.main.poll()
                u.main = None

    # --- boot -------------------------------------------------------------------------------------
    def after_boot(self) -> None:
        """PID 1 of the new kernel: take the `systemd` session back, refill the stores."""
        h = self.srv.host
        if h is None or self.init()[0] != "systemd":
            return
        if h.kexec_count:
            self.queued = set(self._at_boot())
            self.srv._after(0.0, self._start_boot_units)    # once the host is up
        if not h.liveupdate:
            return
        insess = next((s for s in h.in_sessions if s.name == SESSION), None)
        if insess is None:
            return
        try:
            h.device_open()
            s = h.retrieve_session(SESSION)
            mfd = h.retrieve_fd(s, MAPPING_TOKEN)
            mapping = json.loads(os.pread(mfd, os.fstat(mfd).st_size, 0) or b"{}")
        except (Errno, OSError, ValueError) as err:
            self._log(f"systemd[1]: Failed to restore fd stores from LUO: {err}")
            return
        restored = 0
        for unit, body in sorted((mapping.get("units") or {}).items()):
            u = self.units.setdefault(unit, Unit(unit))
            for ent in body.get("fdstore", []):
                try:
                    if ent.get("type") == "fd":
                        fd = os.dup(h.retrieve_fd(s, int(ent["token"])))
                        u.fds.append(FdEntry(str(ent["name"]), fd))
                    elif ent.get("type") == "luo_session":
                        fd = self._session_fd(h.retrieve_session(str(ent["sessionName"])))
                        u.fds.append(FdEntry(str(ent["name"]), fd, str(ent["sessionName"])))
                    restored += 1
                except (Errno, OSError, KeyError, ValueError) as err:
                    self._log(f"systemd[1]: {unit}: fd store entry {ent!r:.60} lost: {err}")
        h.finish(s)
        if s in h.in_sessions:
            h.in_sessions.remove(s)
        self._log(f"systemd[1]: Restored {restored} fd store entries from LUO session "
                  f"'{SESSION}'.")

    def _session_fd(self, sess: Any) -> int:
        """A session fd for a session PID 1 retrieved (the twin's socketpair fd object)."""
        from .twinserver import Conn
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.settimeout(5)
        self.srv.client_inodes.add(os.fstat(theirs.fileno()).st_ino)
        self.srv._register(Conn("session", ours, sess))
        return theirs.detach()
