"""Wire protocol between a digital-twin host (kho_fleet.sim.twinkernel) and its clients.

Stdlib only (it ships inside the agent zipapp). Every message is a u32 little-endian
length followed by a UTF-8 JSON object, over AF_UNIX SOCK_STREAM; file descriptors ride
along as SCM_RIGHTS on the sendmsg that carries the message's first byte.

Requests are {"op": NAME, ...}; replies are {"ok": true, ...} or
{"ok": false, "errno": N, "error": "one line"}. Sockets of a twin host root:

- ROOT/dev/liveupdate: connect = open(2). The reply carries the device "fd" (one end of
  a socketpair) or errno EBUSY. On the device fd: create_session / retrieve_session
  {"name"} -> a session fd (another socketpair end). On a session fd: preserve_fd
  {"token"} + the memfd, retrieve_fd {"token"} -> a memfd, finish, get_name.
  Closing every copy of a device or session fd is its release (the twin sees EOF).
- ROOT/twin.sock (control, what a host does without userspace help): status,
  pagemap {"size"} + an fd -> {"pfns"}, kpageflags {"pfns"} -> {"flags"},
  kexec_load {"kernel", "initrd", "cmdline"}, kexec_unload, kexec_exec {"delay"},
  fault {"name", "value", "clear"}.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any, Optional, Sequence

__all__ = ["ProtocolError", "MAX_MSG", "MAX_FDS", "DEV_LIVEUPDATE", "CONTROL", "STATE",
           "DMESG", "FAULTS", "send_msg", "recv_msg", "peer_pid", "connect", "call",
           "close_fds", "reply_error"]

DEV_LIVEUPDATE = "dev/liveupdate"   # the /dev/liveupdate emulation (socket)
CONTROL = "twin.sock"               # the control socket
STATE = "twin.state"                # JSON: state (up/booting/down/off), pid, release, ...
DMESG = "dmesg"                     # the kernel log of the current boot

# Fault names accepted by the twin (CLI --fault and the control op "fault").
FAULTS = ("kexec-load-fails", "never-returns", "slow-boot", "bitflip", "lost-page",
          "abi-mismatch", "kill-agent-before-finish")

MAX_MSG = 256 << 20
MAX_FDS = 8
_LEN = struct.Struct("<I")


class ProtocolError(ConnectionError):
    """The peer closed the connection or sent something that is not a message."""


def close_fds(fds: Sequence[int]) -> None:
    """Close received fds nobody will use."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def send_msg(sock: socket.socket, obj: dict, fds: Sequence[int] = ()) -> None:
    """Send one message; `fds` are attached to its first byte."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    data = _LEN.pack(len(body)) + body
    sent = socket.send_fds(sock, [data], list(fds)) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def _recv_some(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    data, got, _flags, _addr = socket.recv_fds(sock, min(n, 1 << 20), MAX_FDS)
    fds.extend(got)
    return data


def recv_msg(sock: socket.socket) -> tuple[dict, list[int]]:
    """Receive one message and the fds attached to it.

    Raises EOFError if the peer closed before sending anything, ProtocolError if it
    closed mid-message or sent garbage (received fds are closed then).
    """
    fds: list[int] = []
    buf = bytearray()
    try:
        while len(buf) < _LEN.size:
            chunk = _recv_some(sock, _LEN.size - len(buf), fds)
            if not chunk:
                if buf:
                    raise ProtocolError("connection closed mid-message")
                raise EOFError("connection closed")
            buf += chunk
        (length,) = _LEN.unpack(buf)
        if length > MAX_MSG:
            raise ProtocolError(f"message of {length} bytes is too large")
        body = bytearray()
        while len(body) < length:
            chunk = _recv_some(sock, length - len(body), fds)
            if not chunk:
                raise ProtocolError("connection closed mid-message")
            body += chunk
        obj = json.loads(body.decode())
        if not isinstance(obj, dict):
            raise ProtocolError("message is not a JSON object")
        return obj, fds
    except (ProtocolError, EOFError, ValueError, OSError) as e:
        close_fds(fds)
        if isinstance(e, ValueError):
            raise ProtocolError(f"bad message: {e}") from None
        raise


def peer_pid(sock: socket.socket) -> Optional[int]:
    """The pid of the process that connected (SO_PEERCRED), None if unknown."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", raw)[0]
        return pid or None
    except OSError:
        return None


def connect(path: str, timeout: Optional[float] = 30.0) -> socket.socket:
    """Connect to a twin socket (raises OSError: ECONNREFUSED/ENOENT when it is down)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(path)
    except BaseException:
        s.close()
        raise
    return s


def call(sock: socket.socket, obj: dict, fds: Sequence[int] = ()) -> tuple[dict, list[int]]:
    """Send a request and wait for its reply."""
    send_msg(sock, obj, fds)
    return recv_msg(sock)


def reply_error(err: int, msg: str) -> dict[str, Any]:
    """An error reply."""
    return {"ok": False, "errno": err, "error": msg}


def pid_alive(pid: Optional[int]) -> bool:
    """True while `pid` runs; a zombie (reaped here if it is our child) counts as gone."""
    if not pid:
        return False
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
