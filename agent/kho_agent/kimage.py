"""What a kernel image will speak: its release and its KHO/LUO/memfd ABI strings.

A kexec across KHO ABI versions silently drops every preserved workload (lab README
finding 7), so the staged kernel is checked before kexec: each ABI string appears once,
NUL-delimited, in the decompressed kernel's .rodata ("kho-v4\\0", "luo-v5\\0",
"memfd-v2\\0"), and the banner "Linux version <release> " names the release.

Handles x86 bzImage (setup header payload_offset/payload_length, see
Documentation/arch/x86/boot.rst), arm64 Image / Image.gz, plain vmlinux, and
payloads in gzip, xz, lzma, bzip2 (stdlib), zstd and lz4 (through the `zstd`/`lz4`
tools when installed; otherwise the result says the ABI is undeterminable).

arm64 (issue 13): a raw `Image` starts with `struct arm64_image_header` (Linux 7.3.4
arch/arm64/include/asm/image.h: le32 code0, code1; le64 text_offset, image_size, flags,
res2-4; magic "ARM\\x64" at 0x38; flags bit 0 big-endian, bits 1-2 page size 1/2/3 =
4K/16K/64K, bit 3 phys_base). `Image.gz` is that file gzipped. An EFI zboot `vmlinuz`
(drivers/firmware/efi/libstub/zboot-header.S) is a PE file: "MZ\\0\\0", "zimg" at 4, le32
payload offset at 8, le32 payload size at 12 (without the 4-byte size appended to zstd
payloads), the compression type as a NUL-terminated string at 0x18 (7.3: "gzip", "zstd";
older kernels also lz4, lzma, xzkern, lzo), the PE header offset at 0x3c; the payload is the
raw Image padded with zeros to image_size. arm64 kexec_file_load takes only the raw Image
(arch/arm64/kernel/kexec_image.c image_probe() checks the magic), so `unpack_to_raw()` gives
the bytes to load.
"""

from __future__ import annotations

import bz2
import lzma
import re
import shutil
import struct
import subprocess
import tempfile
import threading
import zlib
from dataclasses import asdict, dataclass, field
from typing import IO, Optional

from .errors import InputError, KhoAgentError

__all__ = ["KernelImageInfo", "inspect_kernel_image", "abi_strings", "Arm64Header",
           "arm64_header", "ZbootHeader", "zboot_header", "unpack_to_raw"]

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
_MAX_OUT = 512 << 20          # no kernel decompresses to more; bigger is refused, not truncated
_MAX_IN = 1 << 30             # kernel image files we agree to read
_TOOL_TIMEOUT = 120

ARM64_MAGIC = b"ARM\x64"
_ARM64_HDR = struct.Struct("<IIQQQQQQ4sI")            # struct arm64_image_header, 64 bytes
_ARM64_PAGE = {1: 4096, 2: 16384, 3: 65536}           # ARM64_IMAGE_FLAG_PAGE_SIZE_{4K,16K,64K}
_ZBOOT_COMP = {"gzip": "gzip", "zstd": "zstd", "zstd22": "zstd", "lz4": "lz4",
               "lzma": "lzma", "xz": "xz", "xzkern": "xz", "bzip2": "bzip2"}
_PE_MACHINE = {0xAA64: "arm64", 0x8664: "x86_64", 0x5064: "riscv64", 0x6264: "loongarch64"}
_XLF_KERNEL_64 = 1            # bzImage xloadflags bit 0 (Documentation/arch/x86/boot.rst)


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
    arch: Optional[str] = None          # "x86_64" | "arm64" when the header says so
    page_size: Optional[int] = None     # from the arm64 header flags; 4096 on x86_64

    @property
    def determinable(self) -> bool:
        return self.kho is not None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Arm64Header:
    """The fields of `struct arm64_image_header` that matter here."""

    text_offset: int
    image_size: int
    flags: int

    @property
    def big_endian(self) -> bool:
        return bool(self.flags & 1)

    @property
    def page_size(self) -> Optional[int]:
        """4096/16384/65536 from flags bits 1-2; None when 0 ("unspecified", pre-3.17)."""
        return _ARM64_PAGE.get((self.flags >> 1) & 3)


@dataclass(frozen=True)
class ZbootHeader:
    """The EFI zboot header fields (zboot-header.S) and the PE machine of the file."""

    payload_offset: int
    payload_size: int
    comp_type: str                      # as written in the header, e.g. "gzip", "zstd22"
    machine: Optional[str]              # "arm64", ... from the PE header; None if unreadable

    @property
    def compression(self) -> Optional[str]:
        return _ZBOOT_COMP.get(self.comp_type)


def arm64_header(buf: bytes) -> Optional[Arm64Header]:
    """The arm64 Image header at buf[0], or None without the "ARM\\x64" magic at 0x38."""
    if len(buf) < _ARM64_HDR.size or buf[0x38:0x3C] != ARM64_MAGIC:
        return None
    _c0, _c1, text_offset, image_size, flags, *_rest = _ARM64_HDR.unpack_from(buf)
    return Arm64Header(text_offset, image_size, flags)


def zboot_header(buf: bytes) -> Optional[ZbootHeader]:
    """The EFI zboot header at buf[0], or None unless "MZ" at 0 and "zimg" at 4."""
    if len(buf) < 0x40 or buf[:2] != b"MZ" or buf[4:8] != b"zimg":
        return None
    off, size = struct.unpack_from("<II", buf, 8)
    comp = buf[0x18:0x38].split(b"\x00", 1)[0].decode("ascii", "replace")
    (pe,) = struct.unpack_from("<I", buf, 0x3C)
    machine = None
    if pe + 6 <= len(buf) and buf[pe:pe + 4] == b"PE\x00\x00":
        (m,) = struct.unpack_from("<H", buf, pe + 4)
        machine = _PE_MACHINE.get(m, f"{m:#x}")
    return ZbootHeader(off, size, comp, machine)


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
    banner = _BANNER.search(blob)
    out["release"] = banner.group(1).decode("utf-8", "replace") if banner else None
    return out


def _decompress(kind: str, data: bytes) -> Optional[bytes]:
    """Decompress a payload that starts at data[0]; trailing bytes are ignored.

    None when it does not decompress here (corrupt, no tool, or more than _MAX_OUT bytes).
    """
    try:
        if kind == "gzip":
            z = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out = z.decompress(data, _MAX_OUT)
            return None if z.unconsumed_tail else out
        if kind in ("xz", "lzma", "bzip2"):
            d = (bz2.BZ2Decompressor() if kind == "bzip2" else lzma.LZMADecompressor(
                format=lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE))
            out = d.decompress(data, _MAX_OUT)
            return None if not d.eof and not d.needs_input else out
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError):
        return None
    tool = {"zstd": "zstd", "lz4": "lz4"}.get(kind)
    if tool is None or shutil.which(tool) is None:
        return None
    return _tool_decompress(tool, data)


def _tool_decompress(tool: str, data: bytes) -> Optional[bytes]:
    """`tool -dc` over `data`, at most _MAX_OUT bytes of output, killed after a timeout."""
    with tempfile.NamedTemporaryFile(prefix="kimage-") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            p = subprocess.Popen([tool, "-dc", "-q", tmp.name], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        except OSError:
            return None
        timer = threading.Timer(_TOOL_TIMEOUT, p.kill)
        timer.start()
        try:
            assert p.stdout is not None
            out = read_bounded(p.stdout, _MAX_OUT)
        finally:
            timer.cancel()
            p.kill()
            p.stdout.close()   # type: ignore[union-attr]
            p.wait()
    if len(out) > _MAX_OUT:
        return None
    return out or None   # trailing garbage makes the tools exit non-zero


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


def read_bounded(f: IO[bytes], limit: int, chunk: int = 4 << 20) -> bytes:
    """Up to `limit` + 1 bytes of `f`, read in chunks: `f.read(n)` allocates n bytes up front,
    which on a small host (a 1 GiB lab guest) fails with MemoryError for a large bound."""
    parts: list[bytes] = []
    got = 0
    while got <= limit:
        b = f.read(min(chunk, limit + 1 - got))
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def _read_image(path: str) -> bytes:
    with open(path, "rb") as f:
        img = read_bounded(f, _MAX_IN)
    if len(img) > _MAX_IN:
        raise OSError(27, f"larger than {_MAX_IN >> 20} MiB, not a kernel image")   # EFBIG
    return img


def inspect_kernel_image(path: str) -> KernelImageInfo:
    """Find release and ABI strings of the kernel image at `path`.

    Raises OSError if the file cannot be read; an image whose payload cannot be
    decompressed here gives an info with kho=None and a note saying why.
    """
    img = _read_image(path)
    if img[:4] == b"\x7fELF":
        return _found(path, "vmlinux (ELF)", "none", img)
    bz = _bzimage_payload(img)
    if bz is not None:
        start, length = bz
        payload = img[start:start + length]
        kind = next((k for k, m in _MAGICS if payload.startswith(m)), None)
        if kind is None:
            info = KernelImageInfo(path, "bzImage", "unknown",
                                   notes=["bzImage payload compression not recognised"])
        else:
            info = _from_payload(path, "bzImage", kind, payload)
        (version,) = struct.unpack_from("<H", img, 0x206)
        if version >= 0x20C and img[0x236] & _XLF_KERNEL_64:
            info.arch, info.page_size = "x86_64", 4096
        return info
    zb = zboot_header(img)
    if zb is not None:
        return _from_zboot(path, img, zb)
    if arm64_header(img) is not None:
        return _found(path, "arm64 Image", "none", img)
    for kind, magic in _MAGICS:
        if img.startswith(magic):
            return _from_payload(path, "compressed image", kind, img)
    info = _found(path, "raw image", "none", img)
    if info.kho is None:
        # a format with the payload somewhere inside: scan for magics
        for kind, magic in _MAGICS[:5]:
            at = img.find(magic)
            while 0 <= at < len(img):
                out = _decompress(kind, img[at:])
                if out and len(out) > (1 << 20):
                    return _found(path, "image with embedded payload", kind, out)
                at = img.find(magic, at + 1)
    return info


def _zboot_payload(img: bytes, zb: ZbootHeader) -> tuple[Optional[bytes], str]:
    """(payload bytes or None, why not) of a zboot image."""
    end = zb.payload_offset + zb.payload_size
    if zb.payload_size == 0 or zb.payload_offset < 0x40 or end > len(img):
        return None, (f"EFI zboot payload {zb.payload_offset:#x}+{zb.payload_size:#x} "
                      f"outside the {len(img)}-byte file")
    if zb.compression is None:
        return None, f"EFI zboot compression {zb.comp_type!r} not supported here"
    return img[zb.payload_offset:end], ""


def _from_zboot(path: str, img: bytes, zb: ZbootHeader) -> KernelImageInfo:
    payload, why = _zboot_payload(img, zb)
    if payload is None:
        return KernelImageInfo(path, "EFI zboot", zb.comp_type or "unknown", arch=zb.machine,
                               notes=[why + ": KHO ABI undeterminable"])
    info = _from_payload(path, "EFI zboot", zb.compression or "", payload)
    if info.arch is None:
        info.arch = zb.machine
    return info


def _from_payload(path: str, fmt: str, kind: str, payload: bytes) -> KernelImageInfo:
    out = _decompress(kind, payload)
    if out is None:
        return KernelImageInfo(path, fmt, kind, notes=[_undecompressable(kind)])
    if fmt == "compressed image" and arm64_header(out) is not None:
        fmt = "arm64 Image." + {"gzip": "gz", "bzip2": "bz2", "lzma": "lzma"}.get(kind, kind)
    return _found(path, fmt, kind, out)


def _undecompressable(kind: str) -> str:
    tool = {"zstd": "zstd", "lz4": "lz4"}.get(kind)
    if tool and shutil.which(tool) is None:
        return f"{kind} payload: install the `{tool}` tool to read it (KHO ABI undeterminable)"
    return f"{kind} payload did not decompress (KHO ABI undeterminable)"


def _found(path: str, fmt: str, kind: str, blob: bytes) -> KernelImageInfo:
    s = abi_strings(blob)
    info = KernelImageInfo(path, fmt, kind, s["release"], s["kho"], s["luo"], s["memfd"])
    hdr = arm64_header(blob)
    if hdr is not None:
        info.arch, info.page_size = "arm64", hdr.page_size
        if hdr.page_size is None:
            info.notes.append("arm64 header does not state the page size (flags bits 1-2 are 0)")
        if hdr.big_endian:
            info.notes.append("big-endian arm64 kernel")
    if s.get("kho_merged"):
        info.notes.append(f"{info.kho} found only as the tail of a longer string "
                          "(linker string merging)")
    if info.kho is None:
        info.notes.append("no kho-vN string found: KHO ABI undeterminable "
                          "(kernel without CONFIG_KEXEC_HANDOVER?)")
    elif "," in info.kho:
        info.notes.append(f"several KHO ABI strings found: {info.kho}")
    return info


def unpack_to_raw(path: str) -> bytes:
    """The bytes kexec_file_load takes for the kernel image at `path`.

    arm64: the raw Image (a raw Image as is; Image.gz and other whole-file compressions and
    EFI zboot vmlinuz decompressed; the result must carry the arm64 header). x86: a bzImage
    as is (the x86 loader takes bzImages). Raises InputError (exit 2) naming the file for
    anything else or a corrupt payload, KhoAgentError (exit 1) when the payload needs a
    tool this host lacks (zstd/lz4), and OSError when the file cannot be read.
    """
    img = _read_image(path)
    if _bzimage_payload(img) is not None:
        return img
    if arm64_header(img) is not None:
        return img
    zb = zboot_header(img)
    if zb is not None:
        payload, why = _zboot_payload(img, zb)
        if payload is None:
            raise InputError(f"{path}: {why}")
        return _unpacked(path, zb.compression or "", payload, "EFI zboot payload")
    for kind, magic in _MAGICS:
        if img.startswith(magic):
            return _unpacked(path, kind, img, f"{kind} file")
    raise InputError(f"{path}: not an arm64 Image, Image.gz, EFI zboot vmlinuz or x86 bzImage")


def _unpacked(path: str, kind: str, payload: bytes, what: str) -> bytes:
    out = _decompress(kind, payload)
    if out is None:
        tool = {"zstd": "zstd", "lz4": "lz4"}.get(kind)
        if tool and shutil.which(tool) is None:
            raise KhoAgentError(f"{path}: {what} is {kind}: install the `{tool}` tool to unpack "
                                "it (image undeterminable here)")
        raise InputError(f"{path}: {what} ({kind}) did not decompress (corrupt or larger "
                         f"than {_MAX_OUT >> 20} MiB)")
    if arm64_header(out) is None:
        raise InputError(f"{path}: the {what} is not an arm64 Image (no \"ARM\\x64\" at 0x38)")
    return out
