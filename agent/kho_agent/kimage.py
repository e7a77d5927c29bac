"""What a kernel image will speak: its release and its KHO/LUO/memfd ABI strings.

A kexec across KHO ABI versions silently drops every preserved workload (lab README
finding 7), so the staged kernel is checked before kexec: each ABI string appears once,
NUL-delimited, in the decompressed kernel's .rodata ("kho-v4\\0", "luo-v5\\0",
"memfd-v2\\0"), and the banner "Linux version <release> " names the release.

Handles x86 bzImage (setup header payload_offset/payload_length, see
Documentation/arch/x86/boot.rst), arm64 Image / Image.gz, plain vmlinux, and
payloads in gzip, xz, lzma, bzip2 (stdlib), zstd and lz4 (through the `zstd`/`lz4`
tools when installed; otherwise the result says the ABI is undeterminable).
"""

from __future__ import annotations

import bz2
import lzma
import re
import shutil
import struct
import subprocess
import zlib
from dataclasses import asdict, dataclass, field
from typing import Optional

__all__ = ["KernelImageInfo", "inspect_kernel_image", "abi_strings"]

_MAGICS = [  # (name, magic) of compressed payloads, most common first
    ("gzip", b"\x1f\x8b\x08"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("xz", b"\xfd7zXZ\x00"),
    ("lz4", b"\x02\x21\x4c\x18"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00"),
]
_ABI = {
    "kho": re.compile(rb"(.)(kho-v[0-9]{1,3})\x00", re.S),
    "luo": re.compile(rb"(.)(luo-v[0-9]{1,3})\x00", re.S),
    "memfd": re.compile(rb"(.)(memfd-v[0-9]{1,3})\x00", re.S),
}
_WORDCHAR = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-+")
_BANNER = re.compile(rb"Linux version ([^\s\x00]{1,64}) ")
_MAX_OUT = 512 << 20


@dataclass
class KernelImageInfo:
    """Release and ABI strings found in a kernel image (None: not found)."""

    path: str
    format: str
    compression: str
    release: Optional[str] = None
    kho: Optional[str] = None
    luo: Optional[str] = None
    memfd: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    @property
    def determinable(self) -> bool:
        return self.kho is not None

    def to_json(self) -> dict:
        return asdict(self)


def abi_strings(blob: bytes) -> dict[str, Optional[str]]:
    """The release and kho/luo/memfd ABI strings in a decompressed kernel.

    A string that stands alone (not preceded by a name character) wins. Failing that,
    the tail of a longer string counts: the linker merges a string literal into the
    tail of an equal-suffixed one (seen: "kho-v3" kept only inside the release
    "7.2.13-abi-kho-v3"). Several distinct values are joined with commas.
    """
    out: dict[str, Optional[str]] = {}
    for key, rx in _ABI.items():
        alone: set[str] = set()
        tails: set[str] = set()
        for m in rx.finditer(blob):
            (alone if m.group(1)[0] not in _WORDCHAR else tails).add(m.group(2).decode())
        found = sorted(alone or tails)
        out[key] = ",".join(found) if found else None
        if not alone and tails:
            out[key + "_merged"] = "yes"
    m = _BANNER.search(blob)
    out["release"] = m.group(1).decode("utf-8", "replace") if m else None
    return out


def _decompress(kind: str, data: bytes) -> Optional[bytes]:
    """Decompress a payload that starts at data[0]; trailing bytes are ignored."""
    try:
        if kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, _MAX_OUT)
        if kind in ("xz", "lzma"):
            fmt = lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE
            return lzma.LZMADecompressor(format=fmt).decompress(data, _MAX_OUT)
        if kind == "bzip2":
            return bz2.BZ2Decompressor().decompress(data)
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError):
        return None
    tool = {"zstd": ["zstd", "-dc", "-q"], "lz4": ["lz4", "-dc", "-q"]}.get(kind)
    if tool is None or shutil.which(tool[0]) is None:
        return None
    try:
        res = subprocess.run(tool, input=data, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout or None   # trailing garbage makes the tools exit non-zero


def _bzimage_payload(img: bytes) -> Optional[tuple[int, int]]:
    """(offset, length) of an x86 bzImage's compressed payload, from its setup header."""
    if len(img) < 0x250 or img[0x202:0x206] != b"HdrS":
        return None
    (version,) = struct.unpack_from("<H", img, 0x206)
    if version < 0x208:
        return None
    setup_sects = img[0x1F1] or 4
    off, length = struct.unpack_from("<II", img, 0x248)
    start = (setup_sects + 1) * 512 + off
    if start + length > len(img) or length == 0:
        return None
    return start, length


def inspect_kernel_image(path: str) -> KernelImageInfo:
    """Find release and ABI strings of the kernel image at `path`.

    Raises OSError if the file cannot be read; an image whose payload cannot be
    decompressed here gives an info with kho=None and a note saying why.
    """
    with open(path, "rb") as f:
        img = f.read()
    if img[:4] == b"\x7fELF":
        return _found(path, "vmlinux (ELF)", "none", img)
    bz = _bzimage_payload(img)
    if bz is not None:
        start, length = bz
        payload = img[start:start + length]
        kind = next((k for k, m in _MAGICS if payload.startswith(m)), None)
        if kind is None:
            return KernelImageInfo(path, "bzImage", "unknown",
                                   notes=["bzImage payload compression not recognised"])
        return _from_payload(path, "bzImage", kind, payload)
    for kind, magic in _MAGICS:
        if img.startswith(magic):
            return _from_payload(path, "compressed image", kind, img)
    info = _found(path, "raw image", "none", img)
    if info.kho is None:
        # e.g. an EFI zboot or a format with the payload somewhere inside: scan for magics
        for kind, magic in _MAGICS[:5]:
            at = img.find(magic)
            while 0 <= at < len(img):
                out = _decompress(kind, img[at:])
                if out and len(out) > (1 << 20):
                    return _found(path, "image with embedded payload", kind, out)
                at = img.find(magic, at + 1)
    return info


def _from_payload(path: str, fmt: str, kind: str, payload: bytes) -> KernelImageInfo:
    out = _decompress(kind, payload)
    if out is None:
        tool = {"zstd": "zstd", "lz4": "lz4"}.get(kind)
        why = (f"{kind} payload: install the `{tool}` tool to read it" if tool and
               shutil.which(tool) is None else f"{kind} payload did not decompress")
        return KernelImageInfo(path, fmt, kind, notes=[why])
    return _found(path, fmt, kind, out)


def _found(path: str, fmt: str, kind: str, blob: bytes) -> KernelImageInfo:
    s = abi_strings(blob)
    info = KernelImageInfo(path, fmt, kind, s["release"], s["kho"], s["luo"], s["memfd"])
    if s.get("kho_merged"):
        info.notes.append(f"{info.kho} found only as the tail of a longer string "
                          "(linker string merging)")
    if info.kho is None:
        info.notes.append("no kho-vN string found: KHO ABI undeterminable "
                          "(kernel without CONFIG_KEXEC_HANDOVER?)")
    elif "," in info.kho:
        info.notes.append(f"several KHO ABI strings found: {info.kho}")
    return info
