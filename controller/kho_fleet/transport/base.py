"""The abstract transport: how the controller runs commands on a host and pushes files to it.

Shaped after pyinfra's connectors (pyinfra-dev/pyinfra, src/pyinfra/connectors/base.py): a
small abstract class — connect, run a command, put a file, get a file — and one module per
kind (`local.py`, `ssh.py`). Everything above this seam (rollout engine, playbooks) is the
same code for a twin host, this machine, and a lab host over SSH.

Commands are argv LISTS, never strings. When an argv has to become a remote shell string
(SSH's exec request is a string the login shell parses), every element — environment
values too — goes through `shlex.quote`; see `shell_command`. The login shell on the host
is assumed to be POSIX (sh, bash, dash, busybox ash).

Errors are one line, name the host and the operation, and never carry secrets
(passwords, key passphrases, environment values)::

    try:
        t.run(["python3", "/var/lib/kho/agent/<sha>/kho-agent.pyz", "preflight", "--json"])
    except HostUnreachable as e:   # connection refused / dropped / timed out
        ...
    except TransportError as e:    # str(e) == "web1: run: ..."
        ...
"""

from __future__ import annotations

import abc
import logging
import os
import posixpath
import re
import secrets
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union

from kho_agent.digest import sha256_file

from ..errors import KhoFleetError

__all__ = [
    "Transport",
    "Result",
    "Placed",
    "TransportError",
    "HostUnreachable",
    "HostKeyError",
    "CommandTimeout",
    "CommandFailed",
    "shell_command",
    "sha256_file",
    "REMOTE_SHA256_SCRIPT",
    "DEFAULT_COMMAND_TIMEOUT",
]

log = logging.getLogger("kho_fleet.transport")

DEFAULT_COMMAND_TIMEOUT = 120.0
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_MAX_DETAIL = 300

PathLike = Union[str, "os.PathLike[str]"]

# `sh -c REMOTE_SHA256_SCRIPT sh FILE`: prints FILE's sha256 (hex) and exits 0; exits 3 when
# FILE is not a regular file. sha256sum reads stdin so odd file names (newline, backslash)
# cannot change its output format; hosts without coreutils fall back to python3's hashlib.
REMOTE_SHA256_SCRIPT = (
    '[ -f "$1" ] || exit 3\n'
    "if command -v sha256sum >/dev/null 2>&1; then\n"
    '  sha256sum < "$1"\n'
    "else\n"
    "  python3 -c 'import hashlib, sys\n"
    "h = hashlib.sha256()\n"
    'with open(sys.argv[1], "rb") as f:\n'
    '    for b in iter(lambda: f.read(1 << 20), b""):\n'
    "        h.update(b)\n"
    "print(h.hexdigest())' \"$1\"\n"
    "fi\n"
)


def _one_line(text: str, limit: int = _MAX_DETAIL) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TransportError(KhoFleetError):
    """A transport operation failed. `str(e)` is one line: "<host>: <op>: <detail>"."""

    def __init__(self, host: str, op: str, detail: str) -> None:
        self.host, self.op, self.detail = host, op, _one_line(detail)
        super().__init__(f"{host}: {op}: {self.detail}")


class HostUnreachable(TransportError):
    """The host did not answer, refused the connection, or the connection dropped
    (e.g. the host is kexec-ing). `reconnect()` / `wait_for_ssh` are the way back."""


class HostKeyError(TransportError):
    """The host's key is unknown (and trust-on-first-use is off) or has CHANGED."""


class CommandTimeout(TransportError):
    """The command did not finish within its timeout; it was killed and its channel closed."""


class CommandFailed(TransportError):
    """run(..., check=True) and the command exited non-zero; `.result` holds its output."""

    def __init__(self, host: str, argv: Sequence[str], result: Result) -> None:
        self.result = result
        self.argv = list(argv)
        tail = result.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        super().__init__(host, "run", f"{argv[0]} exited {result.rc}: {tail[0]}")


@dataclass(frozen=True)
class Result:
    """What a command did. stdout/stderr are decoded UTF-8 (undecodable bytes replaced)."""

    rc: int
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        return self.rc == 0


@dataclass(frozen=True)
class Placed:
    """Where put_content_addressed left a file, and whether it had to upload it.

    `os.fspath(placed)` / `str(placed)` is the remote path."""

    path: str
    sha256: str
    uploaded: bool

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path


def _check_argv(argv: Sequence[object]) -> list:
    if isinstance(argv, (str, bytes)) or not isinstance(argv, Sequence):
        raise TypeError("argv must be a list of strings, not a shell string")
    if not argv:
        raise ValueError("argv is empty")
    out = []
    for a in argv:
        a = os.fspath(a) if isinstance(a, os.PathLike) else a
        if not isinstance(a, str):
            raise TypeError(f"argv elements must be str, got {type(a).__name__}")
        if "\0" in a:
            raise ValueError("argv elements cannot contain NUL")
        out.append(a)
    return out


def _check_env(env: Optional[Mapping[str, str]]) -> dict:
    env = dict(env or {})
    for k, v in env.items():
        if not isinstance(k, str) or not _ENV_NAME.match(k):
            raise ValueError(f"invalid environment variable name {k!r}")
        if not isinstance(v, str) or "\0" in v:
            raise ValueError(f"environment variable {k} must be a str without NUL")
    return env


def shell_command(
    argv: Sequence[str],
    env: Optional[Mapping[str, str]] = None,
    become: Optional[Sequence[str]] = None,
) -> str:
    """The POSIX shell string that runs exactly `argv`, with `env` set, optionally through
    a privilege-escalation prefix (`become`, e.g. ["sudo", "-n", "--"]).

    Every element is quoted with shlex.quote, so spaces, quotes, `$(...)`, `;` and newlines
    reach the program verbatim::

        >>> print(shell_command(["echo", "a b", "$(id)"], {"X": "it's"}))
        env 'X=it'"'"'s' echo 'a b' '$(id)'
    """
    argv = _check_argv(argv)
    env = _check_env(env)
    words = list(become or [])
    if env:
        words += ["env"] + [f"{k}={v}" for k, v in env.items()]
        if "=" in argv[0]:  # env would take "a=b" for an assignment, not the program
            raise ValueError(f"argv[0] cannot contain '=' when env is set: {argv[0]!r}")
    words += argv
    return " ".join(shlex.quote(w) for w in words)


class Transport(abc.ABC):
    """A way to reach one host. Subclasses implement `_connect`, `_exec`, `_put_raw`,
    `get`, `close`, `is_alive`; the rest (argv/env checking, Result, check=, atomic put,
    content-addressed upload) is shared.

    Usable as a context manager (connects on enter, closes on exit). `run` connects lazily
    the first time, but never silently reconnects after a drop: that raises HostUnreachable
    and the caller decides (`reconnect()`), because a drop usually means the host kexec'd.
    """

    kind = "abstract"

    def __init__(self, host: str, *, command_timeout: float = DEFAULT_COMMAND_TIMEOUT) -> None:
        self.host = host
        self.command_timeout = float(command_timeout)
        self._ever_connected = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}>"

    def __enter__(self) -> Transport:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- lifecycle ------------------------------------------------------------------------

    def connect(self) -> None:
        """Open the connection (no-op when already open). Raises HostUnreachable or
        TransportError/HostKeyError."""
        if self._ever_connected and self.is_alive():
            return
        self._connect()
        self._ever_connected = True

    @abc.abstractmethod
    def _connect(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection; safe to call twice."""

    @abc.abstractmethod
    def is_alive(self) -> bool:
        """True when the connection is open (cheap; no round trip)."""

    def reconnect(self) -> None:
        """Drop whatever is left of the connection and open a new one."""
        self.close()
        self._connect()
        self._ever_connected = True

    # --- commands -------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
        check: bool = False,
        stdin: Optional[bytes] = None,
    ) -> Result:
        """Run `argv` on the host (no shell interpretation of its elements) with `env`
        added to the environment. Raises CommandTimeout after `timeout` seconds (the
        command is killed), HostUnreachable if the host is gone, CommandFailed when
        `check` and rc != 0."""
        argv = _check_argv(argv)
        env = _check_env(env)
        timeout = self.command_timeout if timeout is None else float(timeout)
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if not self._ever_connected:
            self.connect()
        log.debug("%s: run %s (env keys %s, timeout %.0fs)", self.host, argv, sorted(env), timeout)
        t0 = time.monotonic()
        rc, out, err = self._exec(argv, env, timeout, stdin)
        res = Result(rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                     time.monotonic() - t0)
        if check and rc != 0:
            raise CommandFailed(self.host, argv, res)
        return res

    @abc.abstractmethod
    def _exec(
        self, argv: list, env: dict, timeout: float, stdin: Optional[bytes]
    ) -> tuple[int, bytes, bytes]:
        """Run argv; return (rc, stdout, stderr). Must honour timeout (CommandTimeout)."""

    def boot_id(self, timeout: Optional[float] = None) -> str:
        """The host's /proc/sys/kernel/random/boot_id: changes on every boot and kexec."""
        return self.run(["cat", "/proc/sys/kernel/random/boot_id"], timeout=timeout,
                        check=True).stdout.strip()

    # --- files ----------------------------------------------------------------------------

    @abc.abstractmethod
    def _put_raw(self, local_path: str, remote_path: str, mode: int) -> None:
        """Upload local_path to remote_path (may be non-atomic) and chmod it."""

    @abc.abstractmethod
    def get(self, remote_path: str, local_path: PathLike) -> None:
        """Download remote_path to local_path (atomically replaced locally)."""

    def put(self, local_path: PathLike, remote_path: str, mode: Optional[int] = None) -> None:
        """Upload a file atomically (temp name in the same directory, then rename). The
        remote directory must exist. mode defaults to the local file's permission bits."""
        local_path = os.fspath(local_path)
        mode = self._mode_of(local_path, mode)
        tmp = self._tmp_name(remote_path)
        try:
            self._put_raw(local_path, tmp, mode)
            self._rename(tmp, remote_path)
        except BaseException:
            self._remove_quietly(tmp)
            raise

    def put_content_addressed(
        self, local_path: PathLike, remote_dir: str, mode: Optional[int] = None
    ) -> Placed:
        """Place local_path at REMOTE_DIR/<sha256>/<basename> and return where.

        Skips the upload when that path already holds the right content (Placed.uploaded
        is False). Otherwise uploads to a temp name beside it, checks the sha256 ON THE HOST
        (sha256sum, or python3 hashlib), and renames into place, so the final path only ever
        holds verified content. A file altered on the host is detected and replaced."""
        local_path = os.fspath(local_path)
        digest = sha256_file(local_path)
        name = os.path.basename(local_path)
        directory = posixpath.join(remote_dir, digest)
        final = posixpath.join(directory, name)
        have = self.remote_sha256(final)
        if have == digest:
            log.debug("%s: %s already present", self.host, final)
            return Placed(final, digest, False)
        if have is not None:
            log.warning("%s: %s has sha256 %s, expected %s: re-uploading",
                        self.host, final, have[:12], digest[:12])
        self._mkdirs(directory)
        tmp = self._tmp_name(final)
        try:
            self._put_raw(local_path, tmp, self._mode_of(local_path, mode))
            got = self.remote_sha256(tmp)
            if got != digest:
                raise TransportError(self.host, "put", f"{final}: sha256 after upload is "
                                     f"{got or 'missing'}, expected {digest}")
            self._rename(tmp, final)
        except BaseException:
            self._remove_quietly(tmp)
            raise
        log.info("%s: uploaded %s", self.host, final)
        return Placed(final, digest, True)

    def remote_sha256(self, remote_path: str) -> Optional[str]:
        """sha256 (hex) of a file on the host, or None when it is not a regular file."""
        res = self.run(["sh", "-c", REMOTE_SHA256_SCRIPT, "sh", remote_path])
        if res.rc == 3:
            return None
        word = res.stdout.split()[:1]
        if res.rc != 0 or not word or not _HEX64.match(word[0]):
            raise TransportError(self.host, "sha256",
                                 f"{remote_path}: rc {res.rc}: {res.stderr or res.stdout}")
        return word[0]

    # Generic remote-file helpers over run(); subclasses may use faster native calls.

    def _mkdirs(self, remote_dir: str) -> None:
        self.run(["mkdir", "-p", "--", remote_dir], check=True)

    def _rename(self, src: str, dst: str) -> None:
        self.run(["mv", "-f", "--", src, dst], check=True)

    def _remove_quietly(self, remote_path: str) -> None:
        try:
            if self.is_alive():
                self.run(["rm", "-f", "--", remote_path], timeout=30)
        except TransportError:
            pass

    @staticmethod
    def _tmp_name(remote_path: str) -> str:
        d, b = posixpath.split(remote_path)
        return posixpath.join(d, f".{b}.tmp-{secrets.token_hex(6)}")

    @staticmethod
    def _mode_of(local_path: str, mode: Optional[int]) -> int:
        return (os.stat(local_path).st_mode & 0o7777) if mode is None else int(mode)
