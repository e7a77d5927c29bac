"""The `kexec-metadata` KHO subtree: which kernel kexec'd us, and how many kexecs so far.

Mirrors struct kho_kexec_metadata in include/linux/kho/abi/kexec_metadata.h and
kho_in_kexec_metadata() in kernel/liveupdate/kexec_handover.c (packed: u32 version,
char previous_release[65], u32 kexec_count; version 1).
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import InputError

__all__ = ["NODE_NAME", "METADATA", "METADATA_VERSION", "MetadataError",
           "KexecMetadata", "decode_metadata"]

NODE_NAME = "kexec-metadata"          # KHO_METADATA_NODE_NAME
METADATA = struct.Struct("<I65sI")    # 73 bytes, packed
METADATA_VERSION = 1


class MetadataError(ValueError, InputError):
    """The blob is not a kexec-metadata version this build knows."""


@dataclass
class KexecMetadata:
    """The previous kernel's release and the kexec count since the last cold boot."""

    version: int
    previous_release: str
    kexec_count: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def decode_metadata(blob: bytes) -> KexecMetadata:
    """Decode with the kernel's checks: version first, then the size for that version."""
    if len(blob) < 4:
        raise MetadataError(f"kexec-metadata blob too small ({len(blob)} bytes)")
    (version,) = struct.unpack_from("<I", blob, 0)
    if version != METADATA_VERSION:
        raise MetadataError(f"kexec-metadata version {version} not supported "
                            f"(expected {METADATA_VERSION})")
    if len(blob) < METADATA.size:
        raise MetadataError(f"kexec-metadata blob too small for v{version} "
                            f"({len(blob)} < {METADATA.size})")
    _, release, count = METADATA.unpack_from(blob, 0)
    return KexecMetadata(version, release.split(b"\0", 1)[0].decode("utf-8", "replace"), count)
