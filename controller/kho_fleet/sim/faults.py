"""The one registry of the simulator's fault names.

Faults are controller-side only: the twin server (twinserver.py) interprets the twin
faults, `kho-fleet sim handover` (handover.py) also injects the image fault itself, and
the inventory's kho_sim_faults and the CLI's --fault are checked against this list. The
agent never interprets a fault: it passes a name through to the twin's control socket
(TwinKernel.set_fault) and the twin judges it, so the agent zipapp does not carry this.
"""

from __future__ import annotations

__all__ = ["TWIN_FAULTS", "IMAGE_FAULTS", "ALL_FAULTS"]

# Injected by the twin host (TwinConfig.faults, `twinkernel --fault`, the control op
# "fault"); they persist until cleared. Value (NAME=N): slow-boot seconds, and the
# RETRIEVE_FD count for kill-agent-before-finish.
TWIN_FAULTS: tuple[str, ...] = (
    "kexec-load-fails",          # kexec_file_load fails with ENOMEM
    "never-returns",             # the host stays down after kexec -e
    "slow-boot",                 # the next kernel takes longer to come up
    "bitflip",                   # one bit of a preserved page flips across kexec
    "lost-page",                 # one preserved page drops out of the KHO tree
    "abi-mismatch",              # the next kernel speaks another KHO ABI than staged
    "kill-agent-before-finish",  # the /dev/liveupdate holder dies before FINISH
)

# Injected by the controller through what it stages (no twin involvement).
IMAGE_FAULTS: tuple[str, ...] = (
    "abi-mismatch-image",        # the staged image speaks kho-v3: stage must refuse it
)

ALL_FAULTS: tuple[str, ...] = TWIN_FAULTS + IMAGE_FAULTS
