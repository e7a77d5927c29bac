"""LocalTransport: this machine, and the digital twin's hosts.

Commands run with subprocess — argv as given, no shell — in their own session, so a
timeout kills the whole process group. put/get are file copies. With `root`, every
*remote path* (put, get, put_content_addressed, remote_sha256) is resolved under that
directory, so each twin host gets its own filesystem tree with the same content-addressed
layout as a real host; argv is passed unchanged (translate paths with `.path()`)::

    t = LocalTransport("twin-3", root="/tmp/fleet/twin-3")
    placed = t.put_content_addressed("dist/kho-agent.pyz", "/var/lib/kho/agent")
    t.run(["python3", t.path(placed.path), "preflight", "--json"])
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from typing import Optional

from kho_agent.atomicfile import atomic_open

from .base import (
    CommandTimeout,
    PathLike,
    Transport,
    TransportError,
    sha256_file,
)

__all__ = ["LocalTransport"]


class LocalTransport(Transport):
    kind = "local"

    def __init__(
        self,
        host: str = "localhost",
        *,
        root: Optional[PathLike] = None,
        become: bool = False,
        become_user: Optional[str] = None,
        command_timeout: float = 120.0,
    ) -> None:
        super().__init__(host, command_timeout=command_timeout)
        self.root = os.path.abspath(os.fspath(root)) if root is not None else None
        self.become = bool(become)
        self.become_user = become_user
        self._open = False

    def path(self, remote_path: str) -> str:
        """The local path standing for `remote_path` on this host (under `root`, if set)."""
        if self.root is None:
            return remote_path
        norm = os.path.normpath("/" + remote_path.lstrip("/"))
        return os.path.join(self.root, norm.lstrip("/"))

    # --- lifecycle ------------------------------------------------------------------------

    def _connect(self) -> None:
        if self.root is not None:
            os.makedirs(self.root, exist_ok=True)
        self._open = True

    def close(self) -> None:
        self._open = False

    def is_alive(self) -> bool:
        return self._open

    # --- commands -------------------------------------------------------------------------

    def _become_prefix(self) -> list:
        if not self.become:
            return []
        if os.geteuid() == 0 and self.become_user in (None, "root"):
            return []
        return ["sudo", "-n"] + (["-u", self.become_user] if self.become_user else []) + ["--"]

    def _exec(
        self, argv: list, env: dict, timeout: float, stdin: Optional[bytes]
    ) -> tuple[int, bytes, bytes]:
        prefix = self._become_prefix()
        if prefix and env:
            argv = prefix + ["env"] + [f"{k}={v}" for k, v in env.items()] + argv
            full_env = None
        else:
            argv = prefix + argv
            full_env = {**os.environ, **env} if env else None
        try:
            p = subprocess.Popen(
                argv,
                env=full_env,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except FileNotFoundError:  # what a shell would say (rc 127), as over SSH
            return 127, b"", f"{argv[0]}: command not found\n".encode()
        except PermissionError:
            return 126, b"", f"{argv[0]}: permission denied\n".encode()
        try:
            out, err = p.communicate(input=stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill(p)
            raise CommandTimeout(self.host, "run",
                                 f"{argv[0]}: no exit after {timeout:g}s; killed") from None
        except BaseException:
            self._kill(p)
            raise
        return p.returncode, out, err

    @staticmethod
    def _kill(p: subprocess.Popen) -> None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.communicate()

    # --- files ----------------------------------------------------------------------------

    def _put_raw(self, local_path: str, remote_path: str, mode: int) -> None:
        dst = self.path(remote_path)
        try:
            shutil.copyfile(local_path, dst)
            os.chmod(dst, mode)
        except OSError as e:
            raise TransportError(self.host, "put", f"{remote_path}: {e.strerror or e}") from None

    def get(self, remote_path: str, local_path: PathLike) -> None:
        try:
            with open(self.path(remote_path), "rb") as src, atomic_open(local_path) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except OSError as e:
            raise TransportError(self.host, "get", f"{remote_path}: {e.strerror or e}") from None

    def remote_sha256(self, remote_path: str) -> Optional[str]:
        p = self.path(remote_path)
        try:
            return sha256_file(p) if os.path.isfile(p) else None
        except OSError as e:
            raise TransportError(self.host, "sha256", f"{remote_path}: {e.strerror or e}") from None

    def _mkdirs(self, remote_dir: str) -> None:
        try:
            os.makedirs(self.path(remote_dir), exist_ok=True)
        except OSError as e:
            raise TransportError(self.host, "mkdir", f"{remote_dir}: {e.strerror or e}") from None

    def _rename(self, src: str, dst: str) -> None:
        try:
            os.replace(self.path(src), self.path(dst))
        except OSError as e:
            raise TransportError(self.host, "rename", f"{dst}: {e.strerror or e}") from None

    def _remove_quietly(self, remote_path: str) -> None:
        try:
            os.unlink(self.path(remote_path))
        except OSError:
            pass
