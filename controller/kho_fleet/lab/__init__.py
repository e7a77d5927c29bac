"""Real-kernel lab harness: initramfs builder, QMP client and QEMU runner (stdlib only).

Used by the lab tests to boot a KHO/LUO kernel under QEMU and dump its memory.
"""

from kho_fleet.lab.initramfs import CpioEntry, Initramfs, build_init_initramfs, read_newc
from kho_fleet.lab.qemu import DumpResult, QemuConfig, QemuError, QemuVM, find_qemu
from kho_fleet.lab.qmp import QMPClient, QMPError

__all__ = [
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
