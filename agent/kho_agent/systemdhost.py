"""systemd on the host: is PID 1 a LUO-aware systemd, which units keep FD stores that
survive a kexec, and which kexec method a handover should use.

systemd >= 262 is itself a LUO user: at `systemctl kexec`, systemd-shutdown opens
/dev/liveupdate, creates the session `systemd`, preserves every FD-store memfd of the
units with `FileDescriptorStorePreserve=yes` (token 0 is a JSON mapping memfd; LUO session
fds found in an FD store are recorded as `luo_session` entries and survive as their own
sessions), and the next boot's PID 1 hands them back (../shared/lab/README.md, "systemd
>= 262 carries FD stores through LUO"). A bare `kexec -e` bypasses all of that: every
such FD store is lost. So a handover picks its method:

- `systemd`: PID 1 is systemd >= 262 (LUO support) -> `systemctl kexec`;
- `direct`: anything else -> `kexec -e`, refused on a host with preservable FD stores
  unless the playbook says `allow_fdstore_loss: true` (never destroy state nobody handed
  us);
- `auto` (the default): `systemd` when PID 1 can, else `direct`.

Pure functions (parsing `systemctl` output, the decision) at the bottom; the Linux I/O
(`/proc/1/comm`, `systemctl`, sd_notify) is the few functions marked so. Stdlib only.
"""

from __future__ import annotations

import array
import os
import re
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Optional

__all__ = ["LUO_MIN_VERSION", "METHODS", "InitSystem", "FdStoreUnit", "MethodDecision",
           "parse_systemctl_version", "parse_show", "fdstore_units_from_show",
           "choose_method", "fdstore_counts", "count_memfds", "linux_init_system",
           "linux_fdstore_units",
           "sd_notify", "listen_fds", "HOLDER_UNIT", "HOLDER_FDSTORE_MAX", "holder_unit_text",
           "holder_dropin_text", "systemd_quote", "linux_start_unit", "HOLDER_UNIT_PATH",
           "HOLDER_DROPIN_PATH", "VERIFY_UNIT", "UNIT_DIRS", "linux_point_unit"]

LUO_MIN_VERSION = 262           # the first systemd whose shutdown preserves FD stores via LUO
METHODS = ("auto", "systemd", "direct")
HOLDER_UNIT = "kho-agent-holder.service"    # the unit whose FD store keeps the agent's sessions
HOLDER_FDSTORE_MAX = 4096                   # one session fd per preserved LUO session, with room
# The agent installs the holder unit itself where none is installed (deploy/systemd has the
# same unit for the standard layout), and always a drop-in with this host's paths: the
# zipapp lives in a content-addressed store, so its path changes with every agent version.
# Both under /etc: the unit must exist in the next boot too, when PID 1 gives the FD store
# back (a transient `systemd-run` unit, or one under /run, would be gone by then).
HOLDER_UNIT_PATH = "/etc/systemd/system/" + HOLDER_UNIT
HOLDER_DROPIN_PATH = "/etc/systemd/system/" + HOLDER_UNIT + ".d/50-kho-agent-paths.conf"
# The boot unit (deploy/systemd/kho-agent-verify.service), installed by the operator: `stage`
# points it at the agent that stages the handover with the same kind of drop-in (its copy
# of the agent, byte-compiled: kho_agent.bootcopy), so the verify at boot is run by the
# agent that preserved, and starts without compiling itself.
VERIFY_UNIT = "kho-agent-verify.service"
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
             "/usr/lib/systemd/system", "/lib/systemd/system")
DROPIN_NAME = "50-kho-agent-paths.conf"
_SHOW_PROPS = ("Id", "FileDescriptorStorePreserve", "FileDescriptorStoreMax",
               "NFileDescriptorStore")
_SYSTEMCTL_TIMEOUT = 30.0


@dataclass
class InitSystem:
    """What PID 1 is: `name` (systemd, init, ...), systemd's version (None otherwise) and
    whether that systemd preserves FD stores through LUO at `systemctl kexec`."""

    name: str
    version: Optional[int] = None
    detail: str = ""

    @property
    def is_systemd(self) -> bool:
        return self.name == "systemd"

    @property
    def luo(self) -> bool:
        return self.is_systemd and self.version is not None and self.version >= LUO_MIN_VERSION

    def to_json(self) -> dict:
        return {"name": self.name, "version": self.version, "luo": self.luo,
                "detail": self.detail}


@dataclass
class FdStoreUnit:
    """One unit's FD store: `count` fds held by PID 1 (NFileDescriptorStore), `preserve`
    (FileDescriptorStorePreserve: no, yes, restart), `max` (FileDescriptorStoreMax) and,
    where known, the fd names."""

    unit: str
    count: int
    preserve: str = "no"
    max: int = 0
    names: list[str] = field(default_factory=list)
    memfds: Optional[int] = None     # of `count`, memfds (LUO preserves only those); None:
    #                                  not known, every fd is counted

    @property
    def preservable(self) -> bool:
        """A kexec through systemd carries it (and a bare kexec -e loses it): preserve=yes
        and at least one fd LUO can preserve (a memfd; journald's sockets and udevd's
        inotify fd, which a stock sid host keeps with preserve=yes, are not)."""
        n = self.count if self.memfds is None else self.memfds
        return n > 0 and self.preserve == "yes"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class MethodDecision:
    """The kexec method chosen for this host and why; `refused` when preflight must stop."""

    requested: str
    method: str
    why: str
    refused: Optional[str] = None
    fdstores: list[FdStoreUnit] = field(default_factory=list)
    init: Optional[InitSystem] = None

    @property
    def ok(self) -> bool:
        return self.refused is None

    def to_json(self) -> dict:
        return {"requested": self.requested, "method": self.method, "why": self.why,
                "refused": self.refused, "init": None if self.init is None
                else self.init.to_json(), "fdstores": [u.to_json() for u in self.fdstores]}


# --- pure functions ---------------------------------------------------------------------------

def parse_systemctl_version(text: str) -> Optional[int]:
    """The major version from `systemctl --version` ("systemd 262 (262.1-1)" -> 262).

    >>> parse_systemctl_version("systemd 262 (262.1-1)\\n+PAM +AUDIT")
    262
    >>> parse_systemctl_version("no systemd here") is None
    True
    """
    m = re.match(r"\s*systemd\s+(\d+)\b", text)
    return int(m.group(1)) if m else None


def parse_show(text: str) -> list[dict[str, str]]:
    """`systemctl show -p A -p B UNIT...` output: one dict per unit (blank-line separated).

    >>> parse_show("Id=a.service\\nNFileDescriptorStore=1\\n\\nId=b.service\\n")
    [{'Id': 'a.service', 'NFileDescriptorStore': '1'}, {'Id': 'b.service'}]
    """
    out: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if cur:
                out.append(cur)
                cur = {}
            continue
        k, sep, v = line.partition("=")
        if sep:
            cur[k.strip()] = v.strip()
    if cur:
        out.append(cur)
    return out


def _int(v: Optional[str]) -> int:
    try:
        return int(v or 0)
    except ValueError:
        return 0


def fdstore_units_from_show(rows: Sequence[dict[str, str]]) -> list[FdStoreUnit]:
    """The units that hold fds in their FD store (NFileDescriptorStore > 0), by name.

    >>> [u.unit for u in fdstore_units_from_show([
    ...     {"Id": "p.service", "NFileDescriptorStore": "1", "FileDescriptorStorePreserve": "yes"},
    ...     {"Id": "q.service", "NFileDescriptorStore": "0"}])]
    ['p.service']
    """
    units = [FdStoreUnit(r.get("Id", "?"), _int(r.get("NFileDescriptorStore")),
                         r.get("FileDescriptorStorePreserve", "no") or "no",
                         _int(r.get("FileDescriptorStoreMax")))
             for r in rows]
    return sorted((u for u in units if u.count > 0), key=lambda u: u.unit)


def fdstore_counts(units: Sequence[FdStoreUnit]) -> dict[str, int]:
    """{unit: preservable fds in its store} of the preservable FD stores."""
    return {u.unit: u.count if u.memfds is None else u.memfds
            for u in units if u.preservable}


def _luo_preservable(row: Sequence[str]) -> bool:
    """A `systemd-analyze fdstore` row LUO carries at `systemctl kexec`: a memfd, or a LUO
    session fd (a `luo_session` entry). A memfd named at creation shows `/memfd:NAME
    (deleted)`, but one LUO restored in an earlier kexec shows `/ (deleted)` (sid lab,
    2026-12-03: memfd-v2 does not carry the name): so every regular file on an internal
    (major 0, e.g. shmem) mount counts too -- when unsure, count: a store wrongly counted
    only refuses `direct`, one wrongly left out is lost."""
    words = list(row)
    if any(w.startswith("/memfd:") or "[luo_session]" in w for w in words):
        return True
    return len(words) >= 3 and words[1] == "reg" and words[2].startswith("0:")


def count_memfds(analyze: str) -> tuple[int, list[str]]:
    """(fds LUO preserves -- memfds and LUO session fds --, names of all rows) in
    `systemd-analyze fdstore UNIT` output.

    >>> count_memfds("FDNAME TYPE DEVNO INODE RDEVNO PATH FLAGS\\n"
    ...              "stored sock 0:9 3157 - socket:[3157] rw\\n"
    ...              "probe reg 0:1 5 - /memfd:probe (deleted) rw\\n")
    (1, ['stored', 'probe'])
    >>> count_memfds("FDNAME TYPE DEVNO INODE RDEVNO PATH        FLAGS\\n"
    ...              "probe  reg  0:1      10 -      / (deleted) rw\\n")   # restored by LUO
    (1, ['probe'])
    >>> count_memfds("FDNAME TYPE DEVNO INODE RDEVNO PATH FLAGS\\n"
    ...              "inotify a_inode 0:16 1061 - anon_inode:inotify r\\n"
    ...              "luo-x a_inode 0:16 7 - anon_inode:[luo_session] rw\\n")
    (1, ['inotify', 'luo-x'])
    """
    rows = [ln.split() for ln in analyze.splitlines()[1:] if ln.split()]
    return sum(1 for r in rows if _luo_preservable(r)), [r[0] for r in rows]


def choose_method(requested: str, init: InitSystem, units: Sequence[FdStoreUnit],
                  allow_fdstore_loss: bool, *, holder_unit: str = HOLDER_UNIT) -> MethodDecision:
    """The kexec method for `requested` (auto, systemd, direct) on a host whose PID 1 is
    `init` with these FD stores (the agent's own holder unit is not counted: its state goes
    over LUO either way).

    >>> sd = InitSystem("systemd", 262)
    >>> choose_method("auto", sd, [], False).method
    'systemd'
    >>> choose_method("auto", InitSystem("systemd", 252), [], False).method
    'direct'
    >>> d = choose_method("direct", sd, [FdStoreUnit("p.service", 1, "yes")], False)
    >>> d.ok, d.method
    (False, 'direct')
    >>> choose_method("direct", sd, [FdStoreUnit("p.service", 1, "yes")], True).ok
    True
    """
    others = [u for u in units if u.unit != holder_unit]
    lose = [u for u in others if u.preservable]
    what = (f"PID 1 is systemd {init.version}" if init.is_systemd and init.version is not None
            else "PID 1 is systemd (version unknown)" if init.is_systemd
            else f"PID 1 is {init.name}")
    if requested not in METHODS:
        return MethodDecision(requested, "direct", what, f"unknown kexec method {requested!r} "
                              f"(one of {', '.join(METHODS)})", others, init)
    if requested == "systemd" and not init.luo:
        return MethodDecision(requested, "systemd", what, f"kexec method systemd needs PID 1 "
                              f"to be systemd >= {LUO_MIN_VERSION} (LUO support); {what}",
                              others, init)
    if requested == "auto":
        method = "systemd" if init.luo else "direct"
        why = (f"auto: {what} (>= {LUO_MIN_VERSION}: systemd-shutdown preserves FD stores "
               "through LUO) -> systemctl kexec" if init.luo else
               f"auto: {what}, not systemd >= {LUO_MIN_VERSION} -> kexec -e")
    else:
        method = requested
        why = (f"requested: {requested} ({what})")
    refused = None
    if method == "direct" and lose:
        names = ", ".join(f"{u.unit} ({u.count} fd{'s' if u.count != 1 else ''})"
                          for u in lose)
        if allow_fdstore_loss:
            why += f"; FD stores lost by kexec -e, allowed by allow_fdstore_loss: {names}"
        else:
            refused = (f"kexec -e would lose the preserved FD stores of {names} "
                       "(systemd-shutdown never runs); use kexec_method: systemd on a "
                       "systemd >= 262 host, or set allow_fdstore_loss: true in the playbook")
    return MethodDecision(requested, method, why, refused, others, init)


def listen_fds(env: dict[str, str], pid: int) -> list[tuple[str, int]]:
    """(name, fd) of the fds systemd passed this process (sd_listen_fds: LISTEN_PID,
    LISTEN_FDS, LISTEN_FDNAMES; fds start at 3).

    >>> listen_fds({"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}, 7)
    [('a', 3), ('b', 4)]
    >>> listen_fds({"LISTEN_PID": "8", "LISTEN_FDS": "2"}, 7)
    []
    """
    if env.get("LISTEN_PID") != str(pid):
        return []
    n = _int(env.get("LISTEN_FDS"))
    names = (env.get("LISTEN_FDNAMES") or "").split(":")
    return [(names[i] if i < len(names) and names[i] else "unknown", 3 + i) for i in range(n)]


def systemd_quote(argv: Sequence[str]) -> str:
    """An ExecStart= command line for `argv`: each word in double quotes, with `\\`, `"`,
    `$` and `%` escaped as systemd.service(5) and systemd.unit(5) specifiers want.

    >>> systemd_quote(["/usr/bin/python3", "-m", "kho_agent", "a b%c$d"])
    '"/usr/bin/python3" "-m" "kho_agent" "a b%%c$$d"'
    """
    def q(w: str) -> str:
        w = w.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
        return f'"{w}"'
    return " ".join(q(w) for w in argv)


_HOLDER_EXEC = ("/usr/bin/python3 /var/lib/kho-agent/kho-agent.pyz holder "
                "--state-dir /var/lib/kho-agent/state")     # the drop-in replaces it


def holder_unit_text() -> str:
    """kho-agent-holder.service as the agent installs it where none is installed (the same
    settings as deploy/systemd/kho-agent-holder.service; ExecStart comes from the drop-in)."""
    return f"""# Written by kho-agent: deploy/systemd/kho-agent-holder.service, same settings.
# The holder: the one process that owns /dev/liveupdate and the agent's LUO sessions. Before
# `systemctl kexec` it puts every session fd into this unit's FD store (sd_notify FDSTORE=1)
# and closes the device, so systemd-shutdown can preserve them; PID 1 gives them back in
# LISTEN_FDS when the unit starts in the next kernel.
[Unit]
Description=kho-agent: LUO session holder
DefaultDependencies=no
After=systemd-remount-fs.service
RequiresMountsFor=/var/lib/kho-agent
Conflicts=shutdown.target
Before=shutdown.target

[Service]
Type=notify
NotifyAccess=main
FileDescriptorStoreMax={HOLDER_FDSTORE_MAX}
FileDescriptorStorePreserve=yes
ExecStart={_HOLDER_EXEC}
LimitNOFILE=1048576
# the workloads' blackout waits for it early in the next boot (deploy/systemd: same values)
CPUWeight=1000
IOWeight=1000
Nice=-10
TimeoutStartSec=5min
TimeoutStopSec=30s
"""


def holder_dropin_text(argv: Sequence[str], env: dict[str, str],
                       unit: str = HOLDER_UNIT) -> str:
    """The drop-in that points `unit` (the holder unit, or the boot unit) at this agent
    (its python, its zipapp, copy or package directory, its state dir, its environment)."""
    lines = [f"# Written by kho-agent: this host's agent paths for {unit}.",
             "[Service]", "ExecStart=", f"ExecStart={systemd_quote(argv)}"]
    def env_word(w: str) -> str:           # no $ expansion in Environment=, specifiers yes
        return '"' + w.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'
    lines += [f"Environment={env_word(f'{k}={v}')}" for k, v in sorted(env.items())]
    return "\n".join(lines) + "\n"


# --- Linux I/O --------------------------------------------------------------------------------

def _systemctl(args: Sequence[str]) -> Optional[str]:
    """stdout of `systemctl ARGS`, None when systemctl is missing or fails."""
    return _run(["systemctl", *args])


def run_quiet(argv: Sequence[str]) -> Optional[str]:
    """stdout of `argv` whatever its exit status (`systemctl is-active` exits 3 for
    inactive), None when it cannot run."""
    try:
        res = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=_SYSTEMCTL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout


def _run(argv: Sequence[str]) -> Optional[str]:
    """stdout of `argv` (a list: every argument passed as is, never through a shell),
    None when the program is missing or fails."""
    try:
        res = subprocess.run(list(argv), stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=_SYSTEMCTL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


def linux_init_system(proc: str = "/proc") -> InitSystem:
    """PID 1 of this host: /proc/1/comm, and `systemctl --version` when it is systemd."""
    try:
        with open(os.path.join(proc, "1/comm")) as f:
            name = f.read().strip() or "unknown"
    except OSError as e:
        return InitSystem("unknown", None, f"{proc}/1/comm: {e.strerror}")
    if name != "systemd":
        return InitSystem(name, None, f"{proc}/1/comm: {name}")
    out = _systemctl(["--version"])
    ver = parse_systemctl_version(out or "")
    return InitSystem("systemd", ver, "systemctl --version: " +
                      ((out or "failed").splitlines() or ["?"])[0])


def linux_fdstore_units() -> list[FdStoreUnit]:
    """Every loaded service with fds in its FD store (`systemctl show` per service)."""
    listing = _systemctl(["list-units", "--type=service", "--all", "--plain", "--no-legend",
                          "--no-pager"])
    if not listing:
        return []
    names = [ln.split()[0] for ln in listing.splitlines() if ln.split()]
    names = [n for n in names if n.endswith(".service")]
    units: list[FdStoreUnit] = []
    for i in range(0, len(names), 64):
        args = ["show", "--no-pager"] + [f"--property={p}" for p in _SHOW_PROPS]
        out = _systemctl(args + ["--", *names[i:i + 64]])
        if out:
            units += fdstore_units_from_show(parse_show(out))
    for u in units:
        if u.preserve == "yes":
            rows = _run(["systemd-analyze", "fdstore", "--", u.unit])
            if rows is not None:
                u.memfds, u.names = count_memfds(rows)
    return sorted(units, key=lambda u: u.unit)


def _write_if_changed(path: str, text: str) -> bool:
    """Write `text` to `path` (0644, atomically) unless it holds it already; True if written."""
    try:
        with open(path) as f:
            if f.read() == text:
                return False
    except OSError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True


def linux_start_unit(unit: str, argv: Sequence[str], env: dict[str, str],
                     keep_config: bool = False, wait: bool = True) -> str:
    """Start `unit` (the holder unit) running `argv` with `env` through systemd: the unit
    file where none is loaded, the drop-in with these paths, daemon-reload when anything
    changed, then `systemctl start` (which returns once the holder said READY=1).
    `keep_config`: a drop-in already there stays as it is (after the kexec: no
    daemon-reload early in the boot, and the holder is the agent that preserved); `wait`
    False: `systemctl start --no-block` (the start is only queued). Returns
    what was done, one line; raises OSError with systemctl's own words when it fails."""
    did = []
    show = _systemctl(["show", "--property=LoadState,FragmentPath", "--", unit]) or ""
    props = (parse_show(show) or [{}])[0]
    if props.get("LoadState") != "loaded" and _write_if_changed(
            "/etc/systemd/system/" + unit, holder_unit_text()):
        did.append(f"installed /etc/systemd/system/{unit}")
    dropin = f"/etc/systemd/system/{unit}.d/{DROPIN_NAME}"
    if not (keep_config and os.path.exists(dropin)) and _write_if_changed(
            dropin, holder_dropin_text(argv, env)):
        did.append(f"wrote {dropin}")
    if did and _systemctl(["daemon-reload"]) is None:
        raise OSError(f"systemctl daemon-reload failed after: {'; '.join(did)}")
    try:
        res = subprocess.run(["systemctl", "start", *([] if wait else ["--no-block"]), "--",
                              unit], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise OSError(f"systemctl start {unit}: {e}") from None
    if res.returncode != 0:
        raise OSError(f"systemctl start {unit}: "
                      f"{(res.stderr.strip().splitlines() or ['failed'])[-1]}")
    return "; ".join(did + [f"systemctl start {'' if wait else '--no-block '}{unit}"])


def linux_point_unit(unit: str, argv: Sequence[str], env: dict[str, str],
                     unit_dirs: Sequence[str] = UNIT_DIRS) -> str:
    """Point the installed `unit` (the boot unit) at `argv` and `env` with the drop-in,
    daemon-reload when it changed, so the next boot's PID 1 runs them. Nothing when the
    unit is not installed (the controller then verifies after the boot). Returns what was
    done, one line; raises OSError with the path or systemctl's failure."""
    if not any(os.path.isfile(os.path.join(d, unit)) for d in unit_dirs):
        return f"{unit} is not installed: nothing to point"
    dropin = f"/etc/systemd/system/{unit}.d/{DROPIN_NAME}"
    if not _write_if_changed(dropin, holder_dropin_text(argv, env, unit)):
        return f"{dropin}: already points at this agent"
    if _systemctl(["daemon-reload"]) is None:
        raise OSError(f"systemctl daemon-reload failed after writing {dropin}")
    return f"wrote {dropin}"


def sd_notify(message: str, fds: Sequence[int] = (), env: Optional[dict[str, str]] = None) -> bool:
    """Send `message` (e.g. "FDSTORE=1\\nFDNAME=x") to $NOTIFY_SOCKET with `fds` attached
    (SCM_RIGHTS), as sd_pid_notify_with_fds() does; False when there is no socket."""
    path = (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(path)
        anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
               if fds else [])
        s.sendmsg([message.encode()], anc)
    return True


def decide(kernel: object, requested: str, allow_fdstore_loss: bool) -> MethodDecision:
    """choose_method() over what `kernel` (a kho_agent.kernel.Kernel) reports of PID 1 and
    the FD stores; a failure to ask is one line in `why`, never a traceback."""
    try:
        init = kernel.init_system()              # type: ignore[attr-defined]
    except Exception as e:
        init = InitSystem("unknown", None, f"cannot tell: {e}")
    try:
        units = kernel.fdstore_units()           # type: ignore[attr-defined]
    except Exception as e:
        init.detail += f"; FD stores unknown: {e}"
        units = []
    return choose_method(requested, init, units, allow_fdstore_loss)
