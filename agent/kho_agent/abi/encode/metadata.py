"""Write the `kexec-metadata` KHO subtree blob (abi/metadata.py)."""

from __future__ import annotations

from ..metadata import METADATA, METADATA_VERSION

__all__ = ["encode_metadata"]


def encode_metadata(previous_release: str, kexec_count: int) -> bytes:
    """The blob a kernel of release `previous_release` writes (strscpy: NUL-terminated)."""
    raw = previous_release.encode()[:64]
    return METADATA.pack(METADATA_VERSION, raw, kexec_count)
