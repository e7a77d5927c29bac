"""The twin protocol: the operations a digital-twin host (kho_fleet.sim.twinkernel)
serves, and the names of its sockets and files.

Stdlib only (it ships inside the agent zipapp). Messages are the agent's one wire format
(kho_agent.wire: u32 length + a UTF-8 JSON object over AF_UNIX, fds by SCM_RIGHTS, one
size limit, one error type WireError); this module adds only what is the twin's own.

Requests are {"op": NAME, ...}; replies are {"ok": true, ...} or
{"ok": false, "errno": N, "error": "one line"}. Sockets of a twin host root:

- ROOT/dev/liveupdate: connect = open(2). The reply carries the device "fd" (one end of
  a socketpair) or errno EBUSY. On the device fd: create_session / retrieve_session
  {"name"} -> a session fd (another socketpair end). On a session fd: preserve_fd
  {"token"} + the memfd, retrieve_fd {"token"} -> a memfd, finish, get_name.
  Closing every copy of a device or session fd is its release (the twin sees EOF).
- ROOT/twin.sock (control, what a host does without userspace help): status, sync
  (every earlier close(2) has been released), pagemap {"size"} + an fd -> {"pfns"},
  kpageflags {"pfns"} -> {"flags"}, shmem_huge {"mode"} + a memfd (how it was filled:
  madvise of its mapping), kexec_load {"kernel", "initrd", "cmdline"},
  kexec_unload, kexec_exec {"delay"}, fault {"name", "value", "clear"} (the twin judges
  the name: kho_fleet/sim/faults.py).
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any, Optional

from ..wire import MAX_FDS, MAX_MSG, WireError, call, close_fds, connect_unix, recv_msg, send_msg

__all__ = ["WireError", "MAX_MSG", "MAX_FDS", "DEV_LIVEUPDATE", "CONTROL", "STATE",
           "DMESG", "send_msg", "recv_msg", "peer_pid", "connect", "call",
           "close_fds", "reply_error", "pid_alive"]

DEV_LIVEUPDATE = "dev/liveupdate"   # the /dev/liveupdate emulation (socket)
CONTROL = "twin.sock"               # the control socket
STATE = "twin.state"                # JSON: state (up/booting/down/off), pid, release, ...
DMESG = "dmesg"                     # the kernel log of the current boot


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
    return connect_unix(path, timeout)


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
