"""The kernel file a host loads: a compressed arm64 image becomes the raw `Image`.

arm64 `kexec_file_load` takes only the raw Image (arch/arm64/kernel/kexec_image.c
image_probe() checks the "ARM\\x64" magic), while distributions ship `vmlinuz` as an
`Image.gz` or an EFI zboot PE file. The controller unpacks it once per rollout, not the
agent on every host, because:
- the playbook's sha256 pin is checked on the very bytes that are unpacked (they are read
  once, hashed, and decompressed from that copy), and the unpacked Image is written by
  content (`Image-<sha256[:16]>`), so a resumed rollout rebuilds the same file and the agent
  checks the same sha256 on each host;
- the controller has the tools (zstd for zstd zboot images) and the CPU; a host may have
  neither, and a TCG lab guest spends ~15 s of every preflight and stage decompressing a
  kernel in Python, which a raw Image skips (kimage reads its strings in place);
- the agent stays one loader: whatever it is handed is what it loads.

x86 bzImages, raw arm64 Images, vmlinux ELF files and anything unrecognised pass through
unchanged (the agent's preflight says what is wrong with an unknown file on the host).
"""

from __future__ import annotations

import hashlib
import os
import zlib
from dataclasses import dataclass
from typing import Optional

from kho_agent.atomicfile import atomic_write
from kho_agent.errors import KhoAgentError
from kho_agent.kimage import arm64_header, read_bounded, unpack_to_raw, zboot_header

from .errors import InputError

__all__ = ["HEAD", "KernelFile", "needs_unpack", "unpack_kernel", "check_unpacks"]

HEAD = 0x4000
_COMPRESSED = (b"\x1f\x8b\x08", b"\x28\xb5\x2f\xfd", b"\xfd7zXZ\x00", b"\x02\x21\x4c\x18",
               b"BZh", b"\x5d\x00\x00")          # gzip zstd xz lz4 bzip2 lzma: kimage._MAGICS
_MAX_IN = 1 << 30


@dataclass(frozen=True)
class KernelFile:
    """What is pushed to the hosts of one architecture, and what it came from."""

    path: str                          # the file hosts load
    sha256: Optional[str]              # of `path` (what the agent checks); None: a twin image
    source: str                        # the file the playbook names (== path unless unpacked)
    source_sha256: Optional[str]       # the playbook's pin
    unpacked_from: Optional[str] = None   # "EFI zboot" / "compressed" when path was unpacked

    def to_json(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "source": self.source,
                "source_sha256": self.source_sha256, "unpacked_from": self.unpacked_from}


def needs_unpack(head: bytes) -> Optional[str]:
    """"EFI zboot" or "compressed" when a file starting with `head` must be unpacked for
    kexec_file_load; None for a bzImage, a raw arm64 Image or anything else."""
    if arm64_header(head) is not None or head[0x202:0x206] == b"HdrS":
        return None
    if zboot_header(head) is not None:
        return "EFI zboot"
    if any(head.startswith(m) for m in _COMPRESSED):
        return "compressed"
    return None


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(HEAD)


def truncated_gzip(data: bytes) -> bool:
    """True when `data` starts a gzip stream that ends before its end-of-stream marker
    (kimage decompresses what it can, for reading strings; a kernel to boot must be whole)."""
    if not data:
        return False
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    buf = data
    try:
        while buf and not d.eof:
            d.decompress(buf, 64 << 20)       # output dropped: bounded memory
            buf = d.unconsumed_tail
    except zlib.error:
        return False                          # corrupt, not truncated: unpack_to_raw says so
    return not d.eof


def _gzip_part(path: str) -> bytes:
    """The gzip stream of a gzip file or of a gzip EFI zboot image (b"" for others)."""
    with open(path, "rb") as f:
        data = read_bounded(f, _MAX_IN)
    zb = zboot_header(data)
    if zb is not None:
        return (data[zb.payload_offset:zb.payload_offset + zb.payload_size]
                if zb.compression == "gzip" else b"")
    return data if data.startswith(b"\x1f\x8b\x08") else b""


def _raw(path: str, where: str, shown: Optional[str] = None) -> bytes:
    """kimage.unpack_to_raw(path), its errors as one InputError line prefixed by `where`
    (naming `shown` for `path`: the user's file, not our copy of it)."""
    shown = shown or path
    try:
        if truncated_gzip(_gzip_part(path)):
            raise InputError(f"{where}: {shown}: the gzip stream is truncated (did not "
                             "decompress to its end): not a whole kernel image")
        return unpack_to_raw(path)
    except OSError as e:
        raise InputError(f"{where}: {shown}: {e.strerror or e}") from None
    except KhoAgentError as e:
        msg = str(e).replace(path, shown)
        raise InputError(f"{where}: {msg} (kexec_file_load on arm64 takes the raw Image)") from None


def check_unpacks(path: str, where: str) -> Optional[str]:
    """Unpack `path` once to check it can be (InputError naming `where` if not); returns
    needs_unpack()'s verdict."""
    try:
        kind = needs_unpack(_head(path))
    except OSError as e:
        raise InputError(f"{where}: {path}: {e.strerror}") from None
    if kind is not None:
        _raw(path, where)
    return kind


def unpack_kernel(path: str, pin: Optional[str], out_dir: str, where: str) -> KernelFile:
    """The file to push for the kernel at `path` pinned by `pin`: `path` itself, or the raw
    Image unpacked from it into `out_dir` (pin checked on the bytes unpacked)."""
    try:
        kind = needs_unpack(_head(path))
        if kind is None:
            return KernelFile(path, pin, path, pin)
        with open(path, "rb") as f:
            data = read_bounded(f, _MAX_IN)
    except OSError as e:
        raise InputError(f"{where}: {path}: {e.strerror}") from None
    if len(data) > _MAX_IN:
        raise InputError(f"{where}: {path}: larger than {_MAX_IN >> 20} MiB, not a kernel image")
    got = hashlib.sha256(data).hexdigest()
    if pin is not None and got != pin:
        raise InputError(f"{where}: {path} has sha256 {got}, the playbook pins {pin}")
    os.makedirs(out_dir, exist_ok=True)
    copy = os.path.join(out_dir, f"source-{got[:16]}")
    atomic_write(copy, data)
    try:
        raw = _raw(copy, where, path)
    finally:
        os.unlink(copy)
    raw_sha = hashlib.sha256(raw).hexdigest()
    out = os.path.join(out_dir, f"Image-{raw_sha[:16]}")
    atomic_write(out, raw)
    return KernelFile(out, raw_sha, path, pin, kind)
