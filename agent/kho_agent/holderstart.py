"""Start the holder: forked (kexec -e hosts), or as the systemd unit kho-agent-holder.service
(systemd-method hosts).

Under `systemctl kexec` the holder must hand its LUO session fds to PID 1 (sd_notify
FDSTORE=1) and close /dev/liveupdate before systemd-shutdown opens it. PID 1 takes FDSTORE
messages only from a unit's own processes, through the $NOTIFY_SOCKET it gives them: a
holder forked by the agent has none ("no $NOTIFY_SOCKET"). So on a systemd-method host the
agent asks PID 1 to start the holder as kho-agent-holder.service (Type=notify,
FileDescriptorStoreMax=, FileDescriptorStorePreserve=yes; Kernel.start_unit installs the
unit where missing and a drop-in with this agent's paths), and in the next kernel PID 1
hands the stored sessions to the holder it starts again, in LISTEN_FDS.

Stdlib only; the host is reached through the Kernel seam.
"""

from __future__ import annotations

import os
import sys
import time

from .holder import NO_HOLDER, HolderClient, HolderError, holder_client, spawn_holder
from .kernel import Kernel, KernelError
from .systemdhost import HOLDER_UNIT

__all__ = ["start_holder", "holder_command", "PASSED_ENV"]

# The agent environment a holder unit gets (the rest of the agent's environment is the
# SSH session's, not the unit's business): fault injection and debugging knobs.
PASSED_ENV = ("KHO_AGENT_FAULT", "KHO_FLEET_DEBUG")


def holder_command(state_dir: str, kernel: Kernel) -> tuple[list[str], dict[str, str]]:
    """argv and environment of a holder for `state_dir` on `kernel`'s host: this python,
    this agent's code (the zipapp or the package directory) on PYTHONPATH, the kernel's
    own setting (a twin host's root)."""
    import kho_agent
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(kho_agent.__file__)))
    env = kernel.child_env({k: os.environ[k] for k in PASSED_ENV if k in os.environ})
    env["PYTHONPATH"] = pkg_root
    return ([sys.executable or "/usr/bin/python3", "-m", "kho_agent", "holder",
             "--state-dir", os.path.abspath(state_dir)], env)


def start_holder(state_dir: str, kernel: Kernel, via_unit: bool, timeout: float = 90.0,
                 after_kexec: bool = False) -> HolderClient:
    """A client of a new holder: forked (`via_unit` False, holder.spawn_holder) or started
    by PID 1 as kho-agent-holder.service (`after_kexec`: as configured before the kexec,
    no daemon-reload early in the boot). HolderError (NO_HOLDER) names what failed."""
    if not via_unit:
        return spawn_holder(state_dir, kernel, timeout)
    argv, env = holder_command(state_dir, kernel)
    try:
        how = kernel.start_unit(HOLDER_UNIT, argv, env, keep_config=after_kexec)
    except KernelError as e:
        raise HolderError(f"cannot start the holder as {HOLDER_UNIT}: {e}", NO_HOLDER) from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = holder_client(state_dir)
        if c is not None:
            return c
        time.sleep(0.05)
    raise HolderError(f"{HOLDER_UNIT} did not answer within {timeout:.0f}s ({how})", NO_HOLDER)
