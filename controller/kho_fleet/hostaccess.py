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
from typing import Any, Callable, Optional

from .inventory import Host
from .transport import HostUnreachable, LocalTransport, Transport, TransportError

__all__ = ["AgentCall", "HostAccess", "host_access"]


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
    """A transport, the agent's directory on the host, and agent invocation.

    With `twin_root`, the "host" is a digital twin reached through that transport (a sim
    host locally, or a twin behind an sshd in the SSH tests): the agent gets
    $KHO_AGENT_TWIN and boots are read from the twin's state file instead of boot_id.
    """

    def __init__(self, host: Host, transport: Transport, *, twin_root: Optional[str] = None,
                 reconnect: Optional[Callable[[], Transport]] = None) -> None:
        self.host = host
        self.name = host.name
        self.t = transport
        self.twin_root = twin_root
        self._reconnect = reconnect
        self.agent_dir = host.agent_dir
        self.pyz: Optional[str] = None

    @property
    def kind(self) -> str:
        return ("sim" if isinstance(self.t, LocalTransport) else "ssh") if self.twin_root else self.t.kind

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
        argv = [self.host.python, self.pyz, step, "--json",
                "--state-dir", os.path.join(self.agent_dir, "state"), *args]
        if isinstance(self.t, LocalTransport) and self.t.root is not None:
            # a sim host: this machine's python; host paths live under the twin's root
            argv = [sys.executable] + [self.t.path(a) if a.startswith("/") else a for a in argv[1:]]
        return argv

    def agent(self, step: str, *args: str, timeout: float = 300.0) -> AgentCall:
        """Run one agent step; HostUnreachable propagates (the host may be kexec'ing)."""
        t0 = time.monotonic()
        env = dict(self.host.agent_env or {})          # inventory kho_agent_env
        if self.twin_root:
            env["KHO_AGENT_TWIN"] = self.twin_root
        r = self.t.run(self._argv(step, args), env=env or None, timeout=timeout)
        try:
            data = json.loads(r.stdout) if r.stdout.strip() else None
        except ValueError:
            data = None
        return AgentCall(step, r.rc, data, r.stderr.strip(), time.monotonic() - t0)

    # --- boots ----------------------------------------------------------------------------
    def _twin_state(self) -> dict:
        assert self.twin_root is not None
        r = self.t.run(["cat", os.path.join(self.twin_root, "twin.state")], timeout=15)
        try:
            return json.loads(r.stdout) if r.rc == 0 else {}
        except ValueError:
            return {}

    def boot_marker(self) -> str:
        """Something that changes with every boot, kexec included."""
        if self.twin_root is None:
            return self.t.boot_id()
        st = self._twin_state()
        if st.get("state") != "up":
            raise HostUnreachable(self.name, "boot marker", f"twin is {st.get('state', 'not running')}")
        return f"twin-boot-{st.get('boot_count')}"

    def wait_back(self, old_marker: Optional[str], timeout: float) -> float:
        """Seconds until the host answers from a boot other than `old_marker`."""
        if self.twin_root is None:
            from .transport.ssh import wait_for_ssh
            assert self._reconnect is not None
            self.t.close()
            secs = wait_for_ssh(self._reconnect, timeout, interval=1.0,
                                previous_boot_id=old_marker)
            self.t = self._reconnect()
            self.t.connect()
            return secs
        t0 = time.monotonic()
        state = "?"
        while time.monotonic() - t0 < timeout:
            try:
                st = self._twin_state()
            except HostUnreachable:            # the connection dropped: reconnect and retry
                st = {}
                self._fresh_transport()
            state = st.get("state", "?")
            if state == "up" and f"twin-boot-{st.get('boot_count')}" != old_marker:
                return time.monotonic() - t0
            if state == "off":
                break
            time.sleep(0.05 if isinstance(self.t, LocalTransport) else 0.5)
        raise HostUnreachable(self.name, "wait for boot", f"did not come back within "
                              f"{timeout:.0f}s (twin state {state})")

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


def host_access(host: Host, *, twin_root: Optional[str] = None,
                ssh_timeout: float = 30.0) -> HostAccess:
    """The access for `host`: a sim host (a twin, locally), SSH (a real host, or a twin
    when kho_twin_root is set), or `local` (this machine)."""
    root = twin_root or host.twin_root
    if host.transport == "sim":
        if root is None:
            raise TransportError(host.name, "connect", "sim host without a twin root")
        return HostAccess(host, LocalTransport(host.name, root=root), twin_root=root)
    if host.transport == "local":
        return HostAccess(host, LocalTransport(host.name), twin_root=root)
    from .transport.ssh import SSHTransport

    def make() -> Transport:
        return SSHTransport.from_hostvars(
            host.name, host.vars, trust_on_first_use=host.ssh_trust == "tofu",
            known_hosts=host.ssh_known_hosts, connect_timeout=ssh_timeout)
    return HostAccess(host, make(), twin_root=root, reconnect=make)
