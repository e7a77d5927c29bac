"""The agent's one wire format: length-prefixed JSON objects over AF_UNIX stream sockets,
with file descriptors passed by SCM_RIGHTS.

Both local protocols speak it: CLI/workload <-> holder (holder.py) and agent <-> digital
twin host (kernel/twinproto.py defines the twin's operations on top of it). Stdlib only:
it ships inside the agent zipapp.

One message: u32 length (little-endian), then that many bytes of UTF-8 JSON holding one
object; fds ride on the sendmsg that carries the message's first byte. The receiver is
strict and bounded: at most MAX_MSG bytes of body and MAX_FDS fds per message, memory
grows only with bytes actually received, and anything that is not a whole message
(EOF, an oversized length, bytes that are not UTF-8 JSON of an object, too many fds)
raises WireError after closing every fd that came with it.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any, Optional

from .errors import KhoAgentError

__all__ = ["WireError", "MAX_MSG", "MAX_FDS", "send_msg", "recv_msg", "call", "close_fds",
           "connect_unix"]

MAX_MSG = 256 << 20      # bytes of JSON body in one message (a length above it is refused)
MAX_FDS = 8              # fds attached to one message
_LEN = struct.Struct("<I")
_CHUNK = 1 << 20         # bytes asked of the kernel per read
_FD_SIZE = array.array("i").itemsize


class WireError(ConnectionError, KhoAgentError):
    """The peer went away, or sent something that is not a message (one line of why).

    A ConnectionError (so an OSError): callers that treat a broken socket and a bad
    message alike catch OSError. `closed` is True when the peer closed cleanly between
    messages (nothing of a next message was received)."""

    def __init__(self, msg: str, closed: bool = False) -> None:
        super().__init__(msg)
        self.closed = closed


def close_fds(fds: Sequence[int]) -> None:
    """Close received fds nobody will use (already closed ones are skipped)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def send_msg(sock: socket.socket, obj: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Send one message (a JSON object); `fds` are attached to its first byte.

    WireError if it exceeds MAX_MSG / MAX_FDS or the peer went away."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > MAX_MSG:
        raise WireError(f"message of {len(body)} bytes is too large (at most {MAX_MSG})")
    if len(fds) > MAX_FDS:
        raise WireError(f"message with {len(fds)} fds (at most {MAX_FDS})")
    data = _LEN.pack(len(body)) + body
    try:
        sent = 0
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", list(fds)).tobytes())]
            sent = sock.sendmsg([data], anc)
        if sent < len(data):
            sock.sendall(memoryview(data)[sent:])
    except OSError as e:
        if isinstance(e, WireError):
            raise
        raise WireError(f"send failed: {e.strerror or e}") from None


def _recv_some(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    """Up to `n` bytes (b"" at EOF); fds attached to them are appended to `fds`."""
    try:
        data, anc, flags, _addr = sock.recvmsg(min(n, _CHUNK),
                                               socket.CMSG_SPACE(MAX_FDS * _FD_SIZE))
    except OSError as e:
        raise WireError(f"receive failed: {e.strerror or e}") from None
    for level, kind, raw in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(raw[:len(raw) - len(raw) % _FD_SIZE])
            fds.extend(got)
    if flags & socket.MSG_CTRUNC or len(fds) > MAX_FDS:
        raise WireError(f"message with more than {MAX_FDS} fds")
    return data


def _recv_exact(sock: socket.socket, n: int, fds: list[int], started: bool) -> bytearray:
    """Exactly `n` bytes. EOF before any byte of a message (not `started`): WireError
    with closed=True; EOF later: WireError (mid-message)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = _recv_some(sock, n - len(buf), fds)
        if not chunk:
            if buf or started:
                raise WireError("connection closed mid-message")
            raise WireError("connection closed", closed=True)
        buf += chunk
    return buf


def recv_msg(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """Receive one message: (the JSON object, the fds that came with it).

    WireError for everything that is not a whole valid message (the peer closed, a
    socket error or timeout, a bad length, bad UTF-8/JSON, a non-object, too many fds);
    the fds received with it are closed then."""
    fds: list[int] = []
    try:
        (length,) = _LEN.unpack(_recv_exact(sock, _LEN.size, fds, started=False))
        if length > MAX_MSG:
            raise WireError(f"message of {length} bytes is too large (at most {MAX_MSG})")
        body = _recv_exact(sock, length, fds, started=True)
        try:
            obj = json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError) as e:    # UnicodeDecodeError is a ValueError
            raise WireError(f"malformed message: {type(e).__name__}") from None
        if not isinstance(obj, dict):
            raise WireError(f"malformed message: a JSON {type(obj).__name__}, not an object")
        return obj, fds
    except BaseException:
        close_fds(fds)
        raise


def call(sock: socket.socket, obj: dict[str, Any],
         fds: Sequence[int] = ()) -> tuple[dict[str, Any], list[int]]:
    """Send a request and wait for its reply (WireError if either fails)."""
    send_msg(sock, obj, fds)
    return recv_msg(sock)


def connect_unix(path: str, timeout: Optional[float] = None) -> socket.socket:
    """A connected AF_UNIX stream socket (close-on-exec; OSError if nobody listens)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(timeout)
        s.connect(path)
    except BaseException:
        s.close()
        raise
    return s
