"""Real-kernel lab harness: initramfs builder, QMP client, QEMU runner, Debian rootfs,
SSH-reachable guests, the lab fleet (guests that outlive `kho-fleet lab up`) and kernels.

Used by `kho-fleet lab` (kho_fleet/labcmd.py) and the lab tests to boot KHO/LUO kernels
under QEMU, roll kernels across them and dump their memory.
"""

from kho_fleet.lab.fleet import GuestRecord, LabError, LabFleet
from kho_fleet.lab.guest import GuestError, LabGuest, lab_key
from kho_fleet.lab.initramfs import CpioEntry, Initramfs, build_init_initramfs, read_newc
from kho_fleet.lab.qemu import DumpResult, QemuConfig, QemuError, QemuVM, find_qemu
from kho_fleet.lab.qmp import QMPClient, QMPError
from kho_fleet.lab.rootfs import RootfsError, build_rootfs, cached_rootfs

__all__ = [
    "GuestError",
    "GuestRecord",
    "LabError",
    "LabFleet",
    "LabGuest",
    "RootfsError",
    "build_rootfs",
    "cached_rootfs",
    "lab_key",
    "CpioEntry",
    "DumpResult",
    "Initramfs",
    "QMPClient",
    "QMPError",
    "QemuConfig",
    "QemuError",
    "QemuVM",
    "build_init_initramfs",
    "find_qemu",
    "read_newc",
]
