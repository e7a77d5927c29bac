"""Real-kernel lab harness: initramfs builder, QMP client and QEMU runner (stdlib only).

Used by the lab tests to boot a KHO/LUO kernel under QEMU and dump its memory.
"""

from kho_fleet.lab.initramfs import CpioEntry, Initramfs, build_init_initramfs, read_newc
from kho_fleet.lab.qemu import DumpResult, QemuConfig, QemuError, QemuVM, find_qemu
from kho_fleet.lab.qmp import QMPClient, QMPError
from kho_fleet.lab.rootfs import RootfsError, build_rootfs, cached_rootfs
from kho_fleet.lab.guest import GuestError, LabGuest, lab_key

__all__ = [
    "GuestError",
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
