"""How the controller reaches hosts: run an argv, put/get files, content-addressed uploads.

pyinfra-style: `base.Transport` is the small abstract connector; `local.LocalTransport`
(this machine and the twin hosts) and `ssh.SSHTransport` (lab hosts, paramiko) are the two
kinds. `transport_for(name, hostvars)` picks one from inventory host vars.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import (
    DEFAULT_COMMAND_TIMEOUT,
    CommandFailed,
    CommandTimeout,
    HostKeyError,
    HostUnreachable,
    Placed,
    Result,
    Transport,
    TransportError,
    sha256_file,
    shell_command,
)
from .local import LocalTransport

__all__ = [
    "Transport",
    "Result",
    "Placed",
    "TransportError",
    "HostUnreachable",
    "HostKeyError",
    "CommandTimeout",
    "CommandFailed",
    "LocalTransport",
    "SSHTransport",
    "wait_for_ssh",
    "transport_for",
    "shell_command",
    "sha256_file",
    "DEFAULT_COMMAND_TIMEOUT",
]


def __getattr__(name: str) -> Any:  # paramiko is imported only when SSH is used
    if name in ("SSHTransport", "wait_for_ssh"):
        from . import ssh

        return getattr(ssh, name)
    raise AttributeError(name)


def transport_for(name: str, hostvars: Mapping[str, object], **overrides: Any) -> Transport:
    """ansible_connection "local" -> LocalTransport (kho_root: the twin host's tree);
    anything else ("ssh", "paramiko", unset) -> SSHTransport.from_hostvars."""
    conn = str(hostvars.get("ansible_connection") or "ssh").lower()
    if conn == "local":
        become = str(hostvars.get("ansible_become", "")).lower() in ("1", "yes", "true")
        kw: dict = {"become": become}
        if hostvars.get("kho_root"):
            kw["root"] = str(hostvars["kho_root"])
        kw.update(overrides)
        return LocalTransport(name, **kw)
    if conn not in ("ssh", "paramiko", "smart"):
        raise TransportError(name, "inventory", f"ansible_connection {conn!r} is not supported "
                             "(use ssh or local)")
    from .ssh import SSHTransport

    return SSHTransport.from_hostvars(name, hostvars, **overrides)
