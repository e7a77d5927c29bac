"""One inventory host as the rollout engine sees it: push files, run agent steps, and tell
which boot the host is in -- over SSH for real hosts, locally for digital twins.

The engine never branches on the kind of host; only this module (and sim/fleet.py for
powering twins on) knows the difference.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

from .inventory import Host
from .transport import HostUnreachable, LocalTransport, Transport, TransportError

__all__ = ["AgentCall", "HostAccess", "SSHHostAccess", "TwinHostAccess", "host_access"]


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


class HostAccess:
    """Base: a transport, the agent's directory on the host, and agent invocation."""

    kind = "host"

    def __init__(self, host: Host, transport: Transport) -> None:
        self.host = host
        self.name = host.name
        self.t = transport
        self.agent_dir = host.agent_dir
        self.pyz: Optional[str] = None

    # --- files ---------------------------------------------------------------------------
    def push(self, local: str) -> str:
        """Upload into the content-addressed store on the host (skipped if present)."""
        return self.t.put_content_addressed(local, os.path.join(self.agent_dir, "store")).path

    def push_agent(self, pyz: str) -> str:
        self.pyz = self.push(pyz)
        return self.pyz

    # --- agent ----------------------------------------------------------------------------
    def _argv(self, step: str, args: tuple[str, ...]) -> list[str]:
        assert self.pyz is not None, "push_agent() first"
        return [self.host.python, self.pyz, step, "--json",
                "--state-dir", os.path.join(self.agent_dir, "state"), *args]

    def _env(self) -> Optional[dict[str, str]]:
        return None

    def agent(self, step: str, *args: str, timeout: float = 300.0) -> AgentCall:
        """Run one agent step; HostUnreachable propagates (the host may be kexec'ing)."""
        t0 = time.monotonic()
        r = self.t.run(self._argv(step, args), env=self._env(), timeout=timeout)
        try:
            data = json.loads(r.stdout) if r.stdout.strip() else None
        except ValueError:
            data = None
        return AgentCall(step, r.rc, data, r.stderr.strip(), time.monotonic() - t0)

    # --- boots ----------------------------------------------------------------------------
    def boot_marker(self) -> str:
        """Something that changes with every boot, kexec included."""
        raise NotImplementedError

    def wait_back(self, old_marker: Optional[str], timeout: float) -> float:
        """Seconds until the host answers from a boot other than `old_marker`."""
        raise NotImplementedError

    def close(self) -> None:
        self.t.close()


class SSHHostAccess(HostAccess):
    """A real host over SSH (known_hosts verified unless the inventory says tofu)."""

    kind = "ssh"

    def __init__(self, host: Host, ssh_timeout: float = 30.0) -> None:
        from .transport.ssh import SSHTransport
        self._make = lambda: SSHTransport.from_hostvars(
            host.name, host.vars, trust_on_first_use=host.ssh_trust == "tofu",
            connect_timeout=ssh_timeout)
        super().__init__(host, self._make())

    def boot_marker(self) -> str:
        return self.t.boot_id()

    def wait_back(self, old_marker: Optional[str], timeout: float) -> float:
        from .transport.ssh import wait_for_ssh
        self.t.close()
        secs = wait_for_ssh(self._make, timeout, interval=1.0, previous_boot_id=old_marker)
        self.t = self._make()
        self.t.connect()
        return secs


class TwinHostAccess(HostAccess):
    """A digital-twin host: the agent runs here, with $KHO_AGENT_TWIN naming the twin."""

    kind = "sim"

    def __init__(self, host: Host, twin_root: str) -> None:
        self.root = os.path.abspath(twin_root)
        super().__init__(host, LocalTransport(host.name, root=self.root))

    def _argv(self, step: str, args: tuple[str, ...]) -> list[str]:
        argv = super()._argv(step, args)
        # this machine's python; host paths live under the twin's root
        return [sys.executable] + [self.t.path(a) if a.startswith("/") else a  # type: ignore[attr-defined]
                                   for a in argv[1:]]

    def _env(self) -> dict[str, str]:
        return {"KHO_AGENT_TWIN": self.root}

    def _state(self) -> dict:
        try:
            with open(os.path.join(self.root, "twin.state")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def boot_marker(self) -> str:
        st = self._state()
        if st.get("state") != "up":
            raise HostUnreachable(f"{self.name}: twin is {st.get('state', 'not running')}")
        return str(st.get("boot_count"))

    def wait_back(self, old_marker: Optional[str], timeout: float) -> float:
        t0 = time.monotonic()
        while True:
            st = self._state()
            if st.get("state") == "up" and str(st.get("boot_count")) != old_marker:
                return time.monotonic() - t0
            if st.get("state") == "off":
                raise HostUnreachable(f"{self.name}: twin powered off")
            if time.monotonic() - t0 > timeout:
                raise HostUnreachable(f"{self.name}: did not come back within {timeout:.0f}s "
                                      f"(twin state {st.get('state', '?')})")
            time.sleep(0.05)


def host_access(host: Host, *, twin_root: Optional[str] = None,
                ssh_timeout: float = 30.0) -> HostAccess:
    """The access for `host`: a twin (sim) or SSH; `local` is this machine over no SSH."""
    if host.transport == "sim":
        if twin_root is None:
            raise TransportError(f"{host.name}: sim host without a twin root")
        return TwinHostAccess(host, twin_root)
    if host.transport == "local":
        return HostAccess(host, LocalTransport(host.name))
    return SSHHostAccess(host, ssh_timeout)
