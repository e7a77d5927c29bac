"""The simulated fleet: power twin hosts on and off for the sim hosts of an inventory.

Twins run as daemons, independent of the controller, so a controller that is killed and
resumed finds its hosts as it left them -- the way real hosts would be.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from typing import Optional

from kho_agent.kernel.twinproto import pid_alive

from ..inventory import Host, Inventory
from .twinkernel import TwinError, start_twin

__all__ = ["DEFAULT_SIM_DIR", "TwinStatus", "twin_root", "twin_status", "ensure_twin",
           "fleet_up", "fleet_down"]

DEFAULT_SIM_DIR = ".sim"


@dataclass
class TwinStatus:
    host: str
    root: str
    state: str          # up | booting | down | off | absent
    pid: Optional[int]
    release: Optional[str]
    boot_count: Optional[int]


def twin_root(host: Host, sim_dir: str = DEFAULT_SIM_DIR) -> str:
    """kho_twin_root, else SIM_DIR/<host>."""
    return os.path.abspath(host.twin_root or os.path.join(sim_dir, host.name))


def twin_status(host: Host, sim_dir: str = DEFAULT_SIM_DIR) -> TwinStatus:
    root = twin_root(host, sim_dir)
    try:
        with open(os.path.join(root, "twin.state")) as f:
            st = json.load(f)
    except (OSError, ValueError):
        st = {}
    state = st.get("state", "absent")
    if state != "off" and st and not pid_alive(st.get("pid")):
        state = "off"
    return TwinStatus(host.name, root, state, st.get("pid"), st.get("release"),
                      st.get("boot_count"))


def ensure_twin(host: Host, sim_dir: str = DEFAULT_SIM_DIR, timeout: float = 30.0) -> TwinStatus:
    """Power the host's twin on (cold boot) unless it is already running."""
    st = twin_status(host, sim_dir)
    if st.state in ("up", "booting", "down"):
        return st
    h = start_twin(st.root, wait=True, timeout=timeout, faults=list(host.sim_faults),
                   ram_mib=host.sim_ram_mib, page_size=host.page_size,
                   release=host.sim_release, kho=host.sim_kho, boot_delay=host.sim_boot_delay,
                   exit_with=0)           # a daemon: it outlives this controller
    h.proc.returncode = 0                 # detach: do not reap or stop it with the handle
    return twin_status(host, sim_dir)


def fleet_up(inv: Inventory, sim_dir: str = DEFAULT_SIM_DIR) -> list[TwinStatus]:
    """Every sim host of `inv` powered on."""
    out = []
    for h in inv.hosts.values():
        if h.transport == "sim":
            try:
                out.append(ensure_twin(h, sim_dir))
            except TwinError as e:
                raise TwinError(f"{h.name}: {e}") from None
    return out


def fleet_down(inv: Inventory, sim_dir: str = DEFAULT_SIM_DIR,
               timeout: float = 10.0) -> list[TwinStatus]:
    """Power every sim host off (SIGTERM, then SIGKILL)."""
    out = []
    for h in inv.hosts.values():
        if h.transport != "sim":
            continue
        st = twin_status(h, sim_dir)
        if pid_alive(st.pid):
            assert st.pid is not None
            os.kill(st.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while pid_alive(st.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(st.pid):
                os.kill(st.pid, signal.SIGKILL)
        out.append(twin_status(h, sim_dir))
    return out
