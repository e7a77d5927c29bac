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

from . import bootcopy
from .holder import NO_HOLDER, HolderClient, HolderError, holder_client, spawn_holder
from .kernel import Kernel, KernelError
from .systemdhost import HOLDER_UNIT, VERIFY_UNIT

__all__ = ["start_holder", "queue_holder_unit", "holder_command", "agent_command",
           "point_boot_unit", "PASSED_ENV"]

# The agent environment a holder unit gets (the rest of the agent's environment is the
# SSH session's, not the unit's business): fault injection and debugging knobs.
PASSED_ENV = ("KHO_AGENT_FAULT", "KHO_FLEET_DEBUG")


def agent_command(state_dir: str, kernel: Kernel,
                  *args: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment of `kho-agent ARGS --state-dir STATE_DIR` started by PID 1 on
    `kernel`'s host: this python, this agent's code (its byte-compiled copy, the zipapp
    or the package directory: bootcopy.code_root) on PYTHONPATH, the kernel's own setting
    (a twin host's root)."""
    env = kernel.child_env({k: os.environ[k] for k in PASSED_ENV if k in os.environ})
    env["PYTHONPATH"] = bootcopy.code_root()
    # -S: no site-packages (the agent is stdlib-only), one import pass less in the boot
    return ([sys.executable or "/usr/bin/python3", "-S", "-m", "kho_agent", *args,
             "--state-dir", os.path.abspath(state_dir)], env)


def holder_command(state_dir: str, kernel: Kernel) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the holder unit for `state_dir`."""
    return agent_command(state_dir, kernel, "holder")


def point_boot_unit(state_dir: str, kernel: Kernel) -> str:
    """Point the boot unit, where installed, at this agent: the next boot's verify is run
    by the agent that preserved, from its byte-compiled copy. One line of what was done."""
    argv, env = agent_command(state_dir, kernel, "verify", "--at-boot", "--json",
                              "--compact")
    try:
        return kernel.point_unit(VERIFY_UNIT, argv, env)
    except KernelError as e:
        return f"{VERIFY_UNIT}: not pointed at this agent ({e})"


def queue_holder_unit(state_dir: str, kernel: Kernel) -> str:
    """Ask PID 1 to start the holder unit without waiting for it (in the boot, as it was
    configured before the kexec): its interpreter starts while the agent reads the
    incoming state, and start_holder() later finds it serving. One line: what was done."""
    argv, env = holder_command(state_dir, kernel)
    try:
        return kernel.start_unit(HOLDER_UNIT, argv, env, keep_config=True, wait=False)
    except KernelError as e:
        return f"{HOLDER_UNIT}: not queued ({e}); started when needed"


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
