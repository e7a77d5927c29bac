"""Kernel backends: real Linux, or a digital-twin host.

The twin setting (`kho-agent --twin ROOT`, or $KHO_AGENT_TWIN) is resolved here, once:
get_kernel() picks the backend, and the chosen Kernel hands the same setting to every
process the agent starts (Kernel.child_env()), so a child never falls back to the real
/dev/liveupdate of this machine when its parent acts on a twin.
"""

from __future__ import annotations

import os
from typing import Optional

from .base import TWIN_ENV, Kernel, KernelError, LiveUpdate, LiveUpdateError, Session

__all__ = ["Kernel", "KernelError", "LiveUpdate", "LiveUpdateError", "Session", "get_kernel",
           "twin_setting", "TWIN_ENV"]


def twin_setting(twin_root: Optional[str] = None) -> tuple[Optional[str], str]:
    """(root, where it came from) of the twin setting: `twin_root` (the --twin option)
    wins over $KHO_AGENT_TWIN; (None, "") when neither is set. An empty --twin is bad
    input, an empty variable counts as unset."""
    if twin_root is not None:
        return twin_root, "--twin"
    env = os.environ.get(TWIN_ENV)
    if env:
        return env, f"${TWIN_ENV}"
    return None, ""


def get_kernel(twin_root: Optional[str] = None) -> Kernel:
    """The kernel of this host: the twin host at `twin_root` (or $KHO_AGENT_TWIN) when
    set -- checked to be a twin host root, InputError otherwise -- else Linux."""
    root, where = twin_setting(twin_root)
    if root is not None:
        from .twin import TwinKernel, check_twin_root
        return TwinKernel(check_twin_root(root, where))
    from .linux import LinuxKernel
    return LinuxKernel()
