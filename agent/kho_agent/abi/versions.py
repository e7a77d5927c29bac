"""The KHO / LUO / memfd ABI versions kho-fleet understands, and why each one changed.

Every version difference lives here (like drgn keeps layout changes in one place); the
decoders ask this module instead of testing version strings themselves.
Kernel source: include/linux/kho/abi/kexec_handover.h, luo.h, memfd.h (linux-source-7.2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InputError

__all__ = [
    "UnsupportedAbi",
    "KhoAbi",
    "KHO_VERSIONS",
    "LUO_VERSIONS",
    "MEMFD_VERSIONS",
    "PAGE_SIZES",
    "kho_abi",
    "page_shift",
    "KHO_COMPAT_RE",
]


class UnsupportedAbi(ValueError, InputError):
    """An ABI version (or page size) this build does not know; the message names it."""


@dataclass(frozen=True)
class KhoAbi:
    """One KHO root-FDT ABI version.

    compatible: the root node's `compatible` string, e.g. "kho-v4".
    blob_size: subnodes carry `blob-size` (kho-v3+); in kho-v2 every blob was an FDT.
    depth_plus_one: the radix DEPTH formula counts the order bit (kho-v4 fix).
    """

    compatible: str
    version: int
    blob_size: bool
    depth_plus_one: bool
    note: str


# kho-v2: "stateless KHO" -- the radix tree replaced the xarray + serialize/finalize step.
#         Root: compatible, preserved-memory-map; subnodes: preserved-data (phys of an FDT).
# kho-v3: blobs need not be FDTs any more, so subnodes gain `blob-size` (u64).
# kho-v4 (Linux 7.2): same properties as v3; KHO_TREE_MAX_DEPTH became
#         DIV_ROUND_UP(ORDER0 - BITMAP_LOG2 + 1, TABLE_LOG2) + 1 so the order bit of an
#         order-0 key always has a table slot (v2/v3 dropped the "+ 1": on 16 KiB pages the
#         tree was one level short).
KHO_VERSIONS: dict[str, KhoAbi] = {
    "kho-v2": KhoAbi("kho-v2", 2, blob_size=False, depth_plus_one=False,
                     note="stateless KHO: radix tree, FDT-only subtrees"),
    "kho-v3": KhoAbi("kho-v3", 3, blob_size=True, depth_plus_one=False,
                     note="subnodes gain blob-size (raw blobs)"),
    "kho-v4": KhoAbi("kho-v4", 4, blob_size=True, depth_plus_one=True,
                     note="Linux 7.2: radix depth counts the order bit"),
}

# LUO root blob (struct luo_ser, packed) -- luo-v1 was an FDT with a luo-session node.
LUO_VERSIONS = ("luo-v5",)
# memfd file handler (struct memfd_luo_ser) compatible strings.
MEMFD_VERSIONS = ("memfd-v2",)

# KHO_BLOCK_SIZE == PAGE_SIZE; live update across page sizes is not supported by KHO.
PAGE_SIZES = (4096, 16384, 65536)

KHO_COMPAT_RE = re.compile(rb"kho-v[0-9]{1,3}")


def kho_abi(compatible: str) -> KhoAbi:
    """Look up a KHO root `compatible` string; refuse unknown ones by name.

    >>> kho_abi("kho-v4").version
    4
    """
    try:
        return KHO_VERSIONS[compatible]
    except KeyError:
        known = ", ".join(KHO_VERSIONS)
        raise UnsupportedAbi(
            f"unsupported KHO ABI {compatible!r} (this build knows {known})") from None


def page_shift(page_size: int) -> int:
    """log2 of a supported page size (4 KiB, 16 KiB or 64 KiB); others are refused."""
    if page_size not in PAGE_SIZES:
        raise UnsupportedAbi(
            f"unsupported page size {page_size} (supported: 4096, 16384, 65536)")
    return page_size.bit_length() - 1
