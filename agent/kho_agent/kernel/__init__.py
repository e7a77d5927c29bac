"""Kernel backends: real Linux, or a digital-twin host when KHO_AGENT_TWIN names its root."""

from __future__ import annotations

import os
from typing import Optional

from .base import Kernel, KernelError, LiveUpdate, LiveUpdateError, Session

__all__ = ["Kernel", "KernelError", "LiveUpdate", "LiveUpdateError", "Session", "get_kernel",
           "TWIN_ENV"]

TWIN_ENV = "KHO_AGENT_TWIN"


def get_kernel(twin_root: Optional[str] = None) -> Kernel:
    """The kernel of this host: a twin if `twin_root` (or $KHO_AGENT_TWIN) is set, else Linux."""
    root = twin_root or os.environ.get(TWIN_ENV)
    if root:
        from .twin import TwinKernel
        return TwinKernel(root)
    from .linux import LinuxKernel
    return LinuxKernel()
