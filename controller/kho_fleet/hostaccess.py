"""One inventory host as the rollout engine sees it: push files, run agent steps, and tell
which boot the host is in -- over SSH for real hosts, locally for digital twins.

The engine never branches on the kind of host: `host_access` chooses the kind once (the
seam), and each kind's differences live in its own HostAccess (a twin's in sim/access.py).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .inventory import Host
from .transport import LocalTransport, Transport, TransportError

__all__ = ["AccessOptions", "AgentCall", "HostAccess", "host_access"]


@dataclass
class AgentCall:
    """One agent step on a host: exit code, its JSON (or None), one-line stderr, seconds."""

    step: str
    rc: int
    json: Any
    stderr: str
    seconds: float

    @property
    def reason(self) -> str:
        """Why the step failed, in one line."""
        if isinstance(self.json, dict):
            fail = self.json.get("failure")
            if isinstance(fail, dict) and fail.get("reason"):
                return str(fail["reason"])
            bad = [c["detail"] for c in self.json.get("checks", []) if not c.get("ok")
                   and c.get("blocking", True)]
            if bad:
                return "; ".join(bad)
        return self.stderr.strip().splitlines()[-1] if self.stderr.strip() else f"exit {self.rc}"


@dataclass(frozen=True)
class AccessOptions:
    """Settings of the host kinds, opaque to the engines (they pass them through)."""

    sim_dir: str = ".sim"           # where sim hosts' twins live (unless kho_twin_root)
    ssh_timeout: float = 30.0       # seconds to connect over SSH


class HostAccess:
    """A transport, the agent's directory on the host, agent invocation, and boots.

    This base class is a real host: boots are the kernel's boot_id, read over the
    transport. Other kinds of host (a digital twin) subclass it; `host_access` picks.
    """

    def __init__(self, host: Host, transport: Transport, *,
                 reconnect: Optional[Callable[[], Transport]] = None) -> None:
        self.host = host
        self.name = host.name
        self.t = transport
        self._reconnect = reconnect
        self.agent_dir = host.agent_dir
        self.pyz: Optional[str] = None

    @property
    def kind(self) -> str:
        return self.t.kind

    def prepare(self, power_on: bool) -> None:
        """Make the host reachable before connecting (nothing to do for a real host)."""

    # --- files ---------------------------------------------------------------------------
    def push(self, local: str) -> str:
        """Upload into the content-addressed store on the host (skipped if present)."""
        return self.t.put_content_addressed(local, os.path.join(self.agent_dir, "store")).path

    def push_agent(self, pyz: str) -> str:
        self.pyz = self.push(pyz)
        return self.pyz

    # --- agent ----------------------------------------------------------------------------
    def agent_env(self) -> dict[str, str]:
        """The environment of the agent's runs (the inventory's kho_agent_env)."""
        return dict(self.host.agent_env or {})

    def _argv(self, step: str, args: tuple[str, ...]) -> list[str]:
        assert self.pyz is not None, "push_agent() first"
        return [self.host.python, self.pyz, step, "--json",
                "--state-dir", os.path.join(self.agent_dir, "state"), *args]

    def agent(self, step: str, *args: str, timeout: float = 300.0) -> AgentCall:
        """Run one agent step; HostUnreachable propagates (the host may be kexec'ing)."""
        t0 = time.monotonic()
        env = self.agent_env()
        r = self.t.run(self._argv(step, args), env=env or None, timeout=timeout)
        try:
            data = json.loads(r.stdout) if r.stdout.strip() else None
        except ValueError:
            data = None
        return AgentCall(step, r.rc, data, r.stderr.strip(), time.monotonic() - t0)

    # --- boots ----------------------------------------------------------------------------
    def boot_marker(self) -> str:
        """Something that changes with every boot, kexec included."""
        return self.t.boot_id()

    def wait_back(self, old_marker: Optional[str], timeout: float) -> float:
        """Seconds until the host answers from a boot other than `old_marker`."""
        from .transport.ssh import wait_for_ssh
        assert self._reconnect is not None
        self.t.close()
        secs = wait_for_ssh(self._reconnect, timeout, interval=1.0, previous_boot_id=old_marker)
        self.t = self._reconnect()
        self.t.connect()
        return secs

    def _fresh_transport(self) -> None:
        if self._reconnect is not None:
            try:
                self.t.close()
                t = self._reconnect()
                t.connect()
                self.t = t
            except TransportError:
                pass

    def close(self) -> None:
        self.t.close()


def host_access(host: Host, opts: AccessOptions = AccessOptions()) -> HostAccess:
    """The access for `host`, chosen once by its inventory vars: a digital twin (a sim host,
    or kho_twin_root behind SSH or locally), SSH (a real host) or `local` (this machine)."""
    from .transport.ssh import SSHTransport

    def make() -> Transport:
        return SSHTransport.from_hostvars(
            host.name, host.vars, trust_on_first_use=host.ssh_trust == "tofu",
            known_hosts=host.ssh_known_hosts, connect_timeout=opts.ssh_timeout)
    if host.transport == "sim" or host.twin_root is not None:
        from .sim.access import twin_access
        return twin_access(host, opts, make if host.transport == "ssh" else None)
    if host.transport == "local":
        return HostAccess(host, LocalTransport(host.name))
    return HostAccess(host, make(), reconnect=make)
