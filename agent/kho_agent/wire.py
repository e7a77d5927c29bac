"""Length-prefixed JSON messages over AF_UNIX stream sockets, with fds passed by SCM_RIGHTS.

Used between agent processes (CLI <-> holder, workload <-> holder). One message:
u32 length (little-endian) + UTF-8 JSON; file descriptors ride on the first sendmsg.
"""

from __future__ import annotations

import array
import json
import socket
import struct
from typing import Any, Optional, Sequence

__all__ = ["WireError", "send_msg", "recv_msg", "connect_unix"]

_LEN = struct.Struct("<I")
_MAX = 64 << 20


class WireError(ConnectionError):
    """The peer went away or sent something that is not a message."""


def send_msg(sock: socket.socket, obj: Any, fds: Sequence[int] = ()) -> None:
    """Send one JSON message, with `fds` attached."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    data = _LEN.pack(len(body)) + body
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", list(fds)).tobytes())]
        sent = sock.sendmsg([data], anc)
        data = data[sent:]
    if data:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise WireError("connection closed mid-message")
        buf += chunk
    return bytes(buf)


def recv_msg(sock: socket.socket, maxfds: int = 16) -> tuple[Any, list[int]]:
    """Receive one message; returns (object, received fds). EOF before a message: WireError."""
    fds = array.array("i")
    msg, anc, _flags, _addr = sock.recvmsg(_LEN.size, socket.CMSG_LEN(maxfds * fds.itemsize))
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    if not msg:
        raise WireError("connection closed")
    if len(msg) < _LEN.size:
        msg += _recv_exact(sock, _LEN.size - len(msg))
    (n,) = _LEN.unpack(msg)
    if n > _MAX:
        for fd in fds:
            _close(fd)
        raise WireError(f"message of {n} bytes is too large")
    try:
        return json.loads(_recv_exact(sock, n)), list(fds)
    except (ValueError, WireError):
        for fd in fds:
            _close(fd)
        raise WireError("malformed message") from None


def _close(fd: int) -> None:
    import os
    try:
        os.close(fd)
    except OSError:
        pass


def connect_unix(path: str, timeout: Optional[float] = None) -> socket.socket:
    """A connected AF_UNIX stream socket (OSError if nobody listens)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError:
        s.close()
        raise
    return s
