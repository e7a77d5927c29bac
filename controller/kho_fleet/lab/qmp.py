"""Minimal synchronous QMP (QEMU Machine Protocol) client over a unix socket.

Handles the greeting, capabilities negotiation, command/response matching by id and async events.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import KhoFleetError


class QMPError(KhoFleetError, RuntimeError):
    """A QMP command failed, timed out, or the connection broke."""


@dataclass
class QMPEvent:
    """An asynchronous QMP event ({"event": ..., "data": ..., "timestamp": ...})."""

    name: str
    data: dict[str, Any]
    timestamp: float


@dataclass
class QMPClient:
    """Connect with `connect()`; then `execute()` commands and `wait_event()` for events."""

    path: Union[str, Path]
    greeting: dict[str, Any] = field(default_factory=dict)
    events: list[QMPEvent] = field(default_factory=list)
    _sock: Optional[socket.socket] = field(default=None, repr=False)
    _buf: bytes = field(default=b"", repr=False)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1), repr=False)

    def connect(self, timeout: float = 10.0) -> dict[str, Any]:
        """Connect (retrying until the socket appears), read the greeting, enter command mode."""
        deadline = time.monotonic() + timeout
        last: Optional[OSError] = None
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            # bounded: QEMU serves one QMP client at a time, a second connect() waits forever
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                sock.connect(str(self.path))
                break
            except OSError as exc:  # not there yet, or not listening yet
                sock.close()
                last = exc
                if time.monotonic() >= deadline:
                    raise QMPError(f"cannot connect to QMP socket {self.path}: {last}") from exc
                time.sleep(0.05)
        self._sock = sock
        try:
            msg = self._read_message(deadline)
            if "QMP" not in msg:
                raise QMPError(f"unexpected QMP greeting: {msg!r}")
            self.greeting = msg["QMP"]
            self.execute("qmp_capabilities", timeout=max(0.1, deadline - time.monotonic()))
        except (QMPError, OSError):
            self.close()     # a retry must not queue behind this connection (seen: arm64 TCG)
            raise
        return self.greeting

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> QMPClient:
        if self._sock is None:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(
        self, command: str, arguments: Optional[dict[str, Any]] = None, timeout: float = 30.0
    ) -> Any:
        """Run one command and return its "return" value; events seen meanwhile are queued."""
        if self._sock is None:
            raise QMPError("QMP client is not connected")
        cmd_id = f"kho-{next(self._ids)}"
        req: dict[str, Any] = {"execute": command, "id": cmd_id}
        if arguments:
            req["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(req).encode() + b"\n")
        except OSError as exc:
            raise QMPError(f"QMP send of {command!r} failed: {exc}") from exc
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read_message(deadline, what=command)
            if "event" in msg:
                self._queue_event(msg)
                continue
            if msg.get("id") != cmd_id:
                continue  # a reply to something we gave up on earlier
            if "error" in msg:
                err = msg["error"]
                raise QMPError(f"QMP {command} failed: {err.get('class')}: {err.get('desc')}")
            return msg.get("return")

    def wait_event(self, name: str, timeout: float = 30.0) -> QMPEvent:
        """Return (and dequeue) the first event called `name`, reading more until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.name == name:
                    return self.events.pop(i)
            if self._sock is None:
                raise QMPError("QMP client is not connected")
            msg = self._read_message(deadline, what=f"event {name}")
            if "event" in msg:
                self._queue_event(msg)

    def _queue_event(self, msg: dict[str, Any]) -> None:
        ts = msg.get("timestamp") or {}
        stamp = float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
        self.events.append(QMPEvent(msg["event"], msg.get("data") or {}, stamp))

    def _read_message(self, deadline: float, what: str = "greeting") -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QMPError(f"timed out waiting for QMP {what}")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout as exc:
                raise QMPError(f"timed out waiting for QMP {what}") from exc
            except OSError as exc:
                raise QMPError(f"QMP connection error while waiting for {what}: {exc}") from exc
            if not chunk:
                raise QMPError(f"QMP connection closed while waiting for {what}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        line = line.strip()
        if not line:
            return self._read_message(deadline, what)
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise QMPError(f"bad QMP message {line[:200]!r}") from exc
        if not isinstance(msg, dict):
            raise QMPError(f"bad QMP message {line[:200]!r}")
        return msg
