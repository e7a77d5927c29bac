"""Where the boot protocol put the INCOMING KHO FDT: x86 setup_data or the arm64 device tree.

A production kernel has no KHO debugfs (no `kho/in/fdt`), but the previous kernel's KHO root
FDT and scratch area still reach the new kernel through the boot protocol, and Linux shows
both in sysfs (Linux 7.3.4 source, read for every layout below):

- x86: kexec_file_load appends a `struct setup_data` of type SETUP_KEXEC_KHO (10) whose
  payload is `struct kho_data { __u64 fdt_addr, fdt_size, scratch_addr, scratch_size; }`
  packed, little-endian (arch/x86/include/uapi/asm/setup_data.h lines 16 and 85-90; written by
  arch/x86/kernel/kexec-bzimage64.c setup_kho(), read by arch/x86/kernel/setup.c add_kho()).
  arch/x86/kernel/ksysfs.c exposes each entry as `/sys/kernel/boot_params/setup_data/<N>/`
  (N decimal, `snprintf(name, 16, "%d", nr)`) with `type` printed as `"0x%x\\n"` (the inner
  type for SETUP_INDIRECT entries) and `data` holding exactly `len` payload bytes.
  setup_kho() writes type and len before it checks that KHO has anything to hand over, so an
  all-zero kho_data means "kexec without KHO" (no incoming FDT), not an error.
- arm64 (and every device-tree architecture): drivers/of/kexec.c kho_add_chosen() adds
  `/chosen/linux,kho-fdt` and `/chosen/linux,kho-scratch` with fdt_appendprop_addrrange(),
  i.e. big-endian cells sized by the root `#address-cells` / `#size-cells` (libfdt: 1 or 2
  each; absent: 2 and 1, the devicetree-spec defaults libfdt's writer uses).
  drivers/of/fdt.c early_init_dt_check_kho() accepts exactly one (address, size) entry in
  each. The live tree is in `/sys/firmware/devicetree/base`.

Both carry the same two ranges: the root FDT (its size is PAGE_SIZE on both paths) and the
SCRATCH TABLE, a kexec segment holding `struct kho_scratch { phys_addr_t addr, size; }[]`
(include/asm-generic/kexec_handover.h; kernel/liveupdate/kexec_handover.c kho_populate():
`scratch_cnt = scratch_len / sizeof(*kho_scratch)`), not a scratch area itself. The areas are
read from that table through physical memory; `decode_scratch_table()` decodes its bytes.

`incoming_kho(root)` reads those files under `root` (a real "/" or a captured tree) with
bounded reads; the decoders below it are pure. Malformed content raises BootProtoError (an
InputError: exit 2) naming the file; an unreadable file raises KhoAgentError (exit 1).
"""

from __future__ import annotations

import os
import re
import stat
import struct
from dataclasses import asdict, dataclass
from typing import Optional

from .errors import InputError, KhoAgentError

__all__ = ["IncomingKho", "BootProtoError", "incoming_kho", "parse_setup_type",
           "decode_kho_data", "decode_cells", "decode_addr_ranges", "decode_scratch_table",
           "SETUP_KEXEC_KHO", "KHO_DATA_SIZE", "SETUP_DATA_DIR", "DT_BASE"]

SETUP_KEXEC_KHO = 10                 # arch/x86/include/uapi/asm/setup_data.h
KHO_DATA = struct.Struct("<4Q")      # struct kho_data, packed, little-endian
KHO_DATA_SIZE = KHO_DATA.size        # 32
SETUP_DATA_DIR = "sys/kernel/boot_params/setup_data"
DT_BASE = "sys/firmware/devicetree/base"
DT_DEFAULT_CELLS = (2, 1)            # (#address-cells, #size-cells) when the root has none
MAX_SETUP_ENTRIES = 256              # real kernels have a handful
MAX_SMALL_FILE = 64                  # type, #cells files
MAX_PROP = 4096                      # data, linux,kho-* properties
_TYPE_RX = re.compile(rb"0x([0-9a-f]{1,8})\n?")
_U64 = (1 << 64) - 1


class BootProtoError(InputError):
    """A boot-protocol file whose content is not what Linux writes there (exit 2)."""


@dataclass(frozen=True)
class IncomingKho:
    """Where the previous kernel's KHO root FDT and scratch table are, as this kernel got them."""

    source: str                 # "setup_data" | "devicetree"
    path: str                   # the file the FDT address came from
    fdt_addr: int               # physical address of the KHO root FDT
    fdt_size: int               # PAGE_SIZE as the kernels write it
    scratch_table_addr: int     # physical address of struct kho_scratch[]
    scratch_table_size: int     # its size in bytes (16 per area on 64-bit)

    def to_json(self) -> dict:
        return asdict(self)


# --- pure decoders ---------------------------------------------------------------------------

def parse_setup_type(text: bytes, where: str = "type") -> int:
    """The setup_data type from a sysfs `type` file (ksysfs.c type_show: "0x%x\\n")."""
    m = _TYPE_RX.fullmatch(text)
    if m is None:
        raise BootProtoError(f"{where}: not a setup_data type (want 0x<hex>): {text[:32]!r}")
    return int(m.group(1), 16)


def decode_kho_data(data: bytes, where: str = "data") -> Optional[tuple[int, int, int, int]]:
    """(fdt_addr, fdt_size, scratch_addr, scratch_size) of a SETUP_KEXEC_KHO payload.

    None when all four are zero (setup_kho() wrote the entry but had no KHO to hand over).
    """
    if len(data) != KHO_DATA_SIZE:
        raise BootProtoError(f"{where}: {len(data)} bytes, struct kho_data has {KHO_DATA_SIZE}")
    fdt_addr, fdt_size, scratch_addr, scratch_size = KHO_DATA.unpack(data)
    if fdt_addr == fdt_size == scratch_addr == scratch_size == 0:
        return None
    _check_range(where, "fdt", fdt_addr, fdt_size)
    _check_range(where, "scratch", scratch_addr, scratch_size)
    return fdt_addr, fdt_size, scratch_addr, scratch_size


def decode_cells(data: Optional[bytes], default: int, where: str = "#cells") -> int:
    """A root `#address-cells`/`#size-cells` value (one big-endian u32; 1 or 2 per libfdt)."""
    if data is None:
        return default
    if len(data) != 4:
        raise BootProtoError(f"{where}: {len(data)} bytes, want one 4-byte cell")
    (n,) = struct.unpack(">I", data)
    if n not in (1, 2):
        raise BootProtoError(f"{where}: {n} cells, KHO ranges need 1 or 2")
    return n


def decode_addr_ranges(data: bytes, addr_cells: int, size_cells: int,
                       where: str = "property") -> tuple[tuple[int, int], ...]:
    """The (address, size) entries of a device-tree address-range property (big-endian).

    Exactly one entry, as drivers/of/fdt.c of_flat_dt_get_addr_size() requires.
    """
    entry = 4 * (addr_cells + size_cells)
    if not data or len(data) % entry:
        raise BootProtoError(f"{where}: {len(data)} bytes, not a multiple of {entry} "
                             f"(#address-cells {addr_cells}, #size-cells {size_cells})")
    if len(data) != entry:
        raise BootProtoError(f"{where}: {len(data) // entry} (address, size) entries, "
                             "the kernel accepts exactly one")
    cells = struct.unpack(f">{addr_cells + size_cells}I", data)
    addr = _join(cells[:addr_cells])
    size = _join(cells[addr_cells:])
    _check_range(where, "range", addr, size)
    return ((addr, size),)


def decode_scratch_table(blob: bytes, where: str = "scratch table") -> tuple[tuple[int, int], ...]:
    """The (address, size) scratch areas in a `struct kho_scratch[]` read from memory (LE u64s).

    Entries of size 0 are left out: the kernel writes one per scratch slot (lowmem,
    global, one per NUMA node) and a slot that got no memory stays (addr, 0) -- seen on
    the lab's 1-node guest: (0x37400000, 120 MiB), (0x3ec00000, 0), (0x30000000, 116 MiB).
    """
    if not blob or len(blob) % 16:
        raise BootProtoError(f"{where}: {len(blob)} bytes, not a whole number of 16-byte "
                             "struct kho_scratch entries")
    areas = tuple((a, n) for a, n in struct.iter_unpack("<QQ", blob) if n)
    if not areas:
        raise BootProtoError(f"{where}: every struct kho_scratch entry has size 0")
    for addr, size in areas:
        _check_range(where, "scratch area", addr, size)
    return areas


def _join(cells: tuple[int, ...]) -> int:
    v = 0
    for c in cells:
        v = (v << 32) | c
    return v


def _check_range(where: str, what: str, addr: int, size: int) -> None:
    if addr == 0 or size == 0:
        raise BootProtoError(f"{where}: {what} address {addr:#x} size {size:#x}: "
                             "zero address or size")
    if addr + size - 1 > _U64:
        raise BootProtoError(f"{where}: {what} {addr:#x}+{size:#x} wraps past 2^64")


# --- reader over a directory tree --------------------------------------------------------------

def _read(path: str, limit: int) -> Optional[bytes]:
    """At most `limit` bytes of the regular file at `path`; None if it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise KhoAgentError(f"{path}: cannot stat: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BootProtoError(f"{path}: not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            data = os.read(fd, limit + 1)
        finally:
            os.close(fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise KhoAgentError(f"{path}: cannot read: {e.strerror}") from None
    if len(data) > limit:
        raise BootProtoError(f"{path}: longer than {limit} bytes")
    return data


def _from_setup_data(root: str) -> Optional[IncomingKho]:
    top = os.path.join(root, SETUP_DATA_DIR)
    try:
        names = os.listdir(top)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise KhoAgentError(f"{top}: cannot list: {e.strerror}") from None
    entries = sorted(int(n) for n in names if n.isdigit() and n.isascii() and len(n) <= 6)
    if len(entries) > MAX_SETUP_ENTRIES:
        raise BootProtoError(f"{top}: {len(entries)} entries, more than {MAX_SETUP_ENTRIES}")
    found: list[IncomingKho] = []
    for n in entries:
        tpath = os.path.join(top, str(n), "type")
        text = _read(tpath, MAX_SMALL_FILE)
        if text is None or parse_setup_type(text, tpath) != SETUP_KEXEC_KHO:
            continue
        dpath = os.path.join(top, str(n), "data")
        data = _read(dpath, MAX_PROP)
        if data is None:
            raise BootProtoError(f"{dpath}: missing for a SETUP_KEXEC_KHO entry")
        kho = decode_kho_data(data, dpath)
        if kho is not None:
            found.append(IncomingKho("setup_data", dpath, *kho))
    if len(found) > 1:
        raise BootProtoError(f"{top}: {len(found)} SETUP_KEXEC_KHO entries with data "
                             f"({', '.join(k.path for k in found)}), expected one")
    return found[0] if found else None


def _from_devicetree(root: str) -> Optional[IncomingKho]:
    base = os.path.join(root, DT_BASE)
    chosen = os.path.join(base, "chosen")
    fpath = os.path.join(chosen, "linux,kho-fdt")
    fdt = _read(fpath, MAX_PROP)
    if fdt is None:
        return None
    spath = os.path.join(chosen, "linux,kho-scratch")
    scratch = _read(spath, MAX_PROP)
    if scratch is None:
        raise BootProtoError(f"{spath}: missing next to {fpath} (the kernel ignores KHO then)")
    apath = os.path.join(base, "#address-cells")
    zpath = os.path.join(base, "#size-cells")
    ac = decode_cells(_read(apath, MAX_SMALL_FILE), DT_DEFAULT_CELLS[0], apath)
    sc = decode_cells(_read(zpath, MAX_SMALL_FILE), DT_DEFAULT_CELLS[1], zpath)
    ((fdt_addr, fdt_size),) = decode_addr_ranges(fdt, ac, sc, fpath)
    ((table_addr, table_size),) = decode_addr_ranges(scratch, ac, sc, spath)
    return IncomingKho("devicetree", fpath, fdt_addr, fdt_size, table_addr, table_size)


def incoming_kho(root: str = "/") -> Optional[IncomingKho]:
    """The incoming KHO FDT location from setup_data (x86) or the device tree (arm64).

    None when this kernel was not booted by a KHO kexec (or the boot protocol did not say).
    setup_data is looked at first; an x86 host with a device tree (SETUP_DTB) rarely has
    `linux,kho-fdt`, and KHO uses setup_data there.
    """
    return _from_setup_data(root) or _from_devicetree(root)
