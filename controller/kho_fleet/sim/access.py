"""A digital twin as the rollout engine's host: the twin's side of the host-access seam.

A twin host is reached like any other (locally for `kho_transport: sim`, over SSH for a
twin behind an sshd), but its "kernel" is the twin: the agent is pointed at the twin root,
boots are read from the twin's state file instead of the kernel's boot_id, and a sim host
is powered on by the controller when a rollout needs it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Optional

from kho_agent.kernel import TWIN_ENV
from kho_agent.kernel.twinproto import STATE

from ..hostaccess import AccessOptions, AgentCall, HostAccess
from ..inventory import Host
from ..transport import HostUnreachable, LocalTransport, Transport
from .fleet import ensure_twin, twin_root

__all__ = ["TwinAccess", "twin_access"]


class TwinAccess(HostAccess):
    """A host whose kernel is a digital twin rooted at `root` (on the host's side)."""

    def __init__(self, host: Host, transport: Transport, root: str, opts: AccessOptions, *,
                 reconnect: Optional[Callable[[], Transport]] = None) -> None:
        super().__init__(host, transport, reconnect=reconnect)
        self.root = root
        self._opts = opts

    @property
    def kind(self) -> str:
        return "sim" if self._local_root() else "ssh"

    def _local_root(self) -> bool:
        return isinstance(self.t, LocalTransport) and self.t.root is not None

    def prepare(self, power_on: bool) -> None:
        """Power a sim host's twin on when the rollout will drive it."""
        if power_on and self.host.transport == "sim":
            ensure_twin(self.host, self._opts.sim_dir)

    def agent_env(self) -> dict[str, str]:
        return {**super().agent_env(), TWIN_ENV: self.root}

    def _argv(self, step: str, args: tuple[str, ...]) -> list[str]:
        argv = super()._argv(step, args)
        if isinstance(self.t, LocalTransport) and self.t.root is not None:
            # a sim host: this machine's python; host paths live under the twin's root
            argv = [sys.executable] + [self.t.path(a) if a.startswith("/") else a
                                       for a in argv[1:]]
        return argv

    def agent(self, step: str, *args: str, timeout: float = 300.0) -> AgentCall:
        """As on any host; but an agent `kexec` step that the twin's reboot killed (it kills
        every process of the old kernel, as a real kexec does) is a dropped connection, as
        it is over SSH on a real host: on a loaded machine the step may not have exited
        within the detached kexec's 0.5 s, and that is not a failed kexec."""
        before = self._twin_state().get("boot_count") if step == "kexec" else None
        call = super().agent(step, *args, timeout=timeout)
        if step == "kexec" and call.rc < 0:
            st = self._twin_state()
            if st.get("state") != "up" or st.get("boot_count") != before:
                raise HostUnreachable(self.name, "run", f"agent kexec step killed by signal "
                                      f"{-call.rc} as the twin went down (kexec)")
        return call

    def _twin_state(self) -> dict:
        r = self.t.run(["cat", os.path.join(self.root, STATE)], timeout=15)
        try:
            st = json.loads(r.stdout) if r.rc == 0 else {}
        except ValueError:
            return {}
        return st if isinstance(st, dict) else {}

    def boot_marker(self) -> str:
        st = self._twin_state()
        if st.get("state") != "up":
            raise HostUnreachable(self.name, "boot marker",
                                  f"twin is {st.get('state', 'not running')}")
        return f"twin-boot-{st.get('boot_count')}"

    def wait_back(self, old_marker: Optional[str], timeout: float) -> float:
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
            time.sleep(0.05 if self._local_root() else 0.5)
        raise HostUnreachable(self.name, "wait for boot", f"did not come back within "
                              f"{timeout:.0f}s (twin state {state})")


def twin_access(host: Host, opts: AccessOptions,
                make_ssh: Optional[Callable[[], Transport]]) -> TwinAccess:
    """A sim host (its twin, locally) or a twin behind SSH (kho_twin_root set)."""
    if host.transport == "sim":
        root = twin_root(host, opts.sim_dir)
        return TwinAccess(host, LocalTransport(host.name, root=root), root, opts)
    assert host.twin_root is not None
    if host.transport == "local":
        return TwinAccess(host, LocalTransport(host.name), host.twin_root, opts)
    assert make_ssh is not None
    return TwinAccess(host, make_ssh(), host.twin_root, opts, reconnect=make_ssh)
