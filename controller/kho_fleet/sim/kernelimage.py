"""Small fake kernel images for twin hosts, decodable by kho_agent.kimage.

`make_kernel_image()` writes what `inspect_kernel_image()` reads in a real bzImage: an
x86 setup header ("HdrS" at 0x202, boot protocol 2.15, setup_sects at 0x1f1,
payload_offset/payload_length at 0x248/0x24c) pointing at a gzip payload. The payload
plays the decompressed vmlinux: the banner "Linux version <release> (kho-fleet twin) #1
SMP" and the KHO/LUO/memfd ABI strings, NUL-delimited as in .rodata, padded with
deterministic filler. fmt="gz" writes the bare gzip stream of that payload.

arm64 (issue 13): fmt="Image" writes a raw arm64 Image -- `struct arm64_image_header`
(text_offset, image_size, flags with the page size in bits 1-2 and phys_base in bit 3, magic
"ARM\x64" at 0x38) followed by the payload, uncompressed, as in a real Image; "Image.gz" is
that file gzipped; "zboot" is an EFI zboot vmlinuz around it (drivers/firmware/efi/libstub/
zboot-header.S: "MZ", "zimg" at 4, payload offset and size at 8 and 12, "gzip" at 0x18, a PE
header with machine 0xaa64), which kexec_file_load does not take before it is unpacked.
`x86_64=True` sets a bzImage's XLF_KERNEL_64 load flag, so kimage reports its arch.
"""

from __future__ import annotations

import gzip
import random
import struct

__all__ = ["IMAGE_SIZE", "FORMATS", "make_kernel_image", "kernel_payload", "arm64_image"]

IMAGE_SIZE = 64 << 10
_SETUP_SECTS = 4
_BOOT_PROTOCOL = 0x020F
FORMATS = ("bzImage", "gz", "Image", "Image.gz", "zboot")
_ARM64_PAGE_FLAG = {4096: 1, 16384: 2, 65536: 3}
_ZBOOT_PAYLOAD_AT = 0x200


def kernel_payload(release: str, kho: str = "kho-v4", luo: str = "luo-v5",
                   memfd: str = "memfd-v2", size: int = IMAGE_SIZE) -> bytes:
    """The "decompressed vmlinux": banner, ABI strings and filler (`size` bytes)."""
    head = (f"Linux version {release} (kho-fleet twin) #1 SMP\n".encode() + b"\0"
            + b"\0".join(s.encode() for s in (kho, luo, memfd) if s) + b"\0")
    rng = random.Random(release)
    filler = bytes(rng.randrange(0x20, 0x7F) if i % 16 else 0
                   for i in range(max(0, size - len(head) - 32)))
    # filler: printable runs separated by NULs; a leading non-NUL byte keeps any run
    # that happens to look like "kho-v1" from being a standalone string
    return b"\x90" * 16 + head + filler + b"\0" * 16


def arm64_image(payload: bytes, page_size: int = 4096) -> bytes:
    """A raw arm64 Image: the 64-byte header, then `payload` (the "kernel text")."""
    if page_size not in _ARM64_PAGE_FLAG:
        raise ValueError(f"arm64 page size {page_size}: one of 4096, 16384, 65536")
    size = 64 + len(payload)
    flags = (_ARM64_PAGE_FLAG[page_size] << 1) | (1 << 3)      # page size, phys_base anywhere
    hdr = struct.pack("<IIQQQQQQ4sI", 0x91005A4D, 0x14000000, 0, size, flags, 0, 0, 0,
                      b"ARM\x64", 0)
    return hdr + payload


def _zboot(raw: bytes) -> bytes:
    """An EFI zboot PE file whose gzip payload is `raw`."""
    comp = gzip.compress(raw, mtime=0)
    head = bytearray(_ZBOOT_PAYLOAD_AT)
    head[0:4] = b"MZ\0\0"
    head[4:8] = b"zimg"
    struct.pack_into("<II", head, 8, _ZBOOT_PAYLOAD_AT, len(comp))
    head[0x18:0x1D] = b"gzip\0"
    pe = 0x40
    struct.pack_into("<I", head, 0x3C, pe)
    head[pe:pe + 4] = b"PE\0\0"
    struct.pack_into("<H", head, pe + 4, 0xAA64)
    return bytes(head) + comp


def make_kernel_image(path: str, release: str, kho: str = "kho-v4", luo: str = "luo-v5",
                      memfd: str = "memfd-v2", fmt: str = "bzImage", *,
                      page_size: int = 4096, x86_64: bool = False) -> str:
    """Write a twin kernel image at `path` (a FORMATS entry); returns `path`."""
    raw = kernel_payload(release, kho, luo, memfd)
    if fmt in ("Image", "Image.gz", "zboot"):
        img = arm64_image(raw, page_size)
        data = {"Image": img, "Image.gz": gzip.compress(img, mtime=0),
                "zboot": _zboot(img) if fmt == "zboot" else b""}[fmt]
    elif fmt == "gz":
        data = gzip.compress(raw, mtime=0)
    elif fmt == "bzImage":
        payload = gzip.compress(raw, mtime=0)
        setup = bytearray((_SETUP_SECTS + 1) * 512)
        setup[0x1F1] = _SETUP_SECTS
        struct.pack_into("<H", setup, 0x1FE, 0xAA55)
        setup[0x202:0x206] = b"HdrS"
        struct.pack_into("<H", setup, 0x206, _BOOT_PROTOCOL)
        if x86_64:
            setup[0x236] |= 1                # XLF_KERNEL_64
        pm_code = b"\x90" * 512            # stands in for the decompressor stub
        struct.pack_into("<II", setup, 0x248, len(pm_code), len(payload))
        data = bytes(setup) + pm_code + payload
        data += bytes(max(0, IMAGE_SIZE - len(data)))
    else:
        raise ValueError(f"unknown image format {fmt!r} ({', '.join(FORMATS)})")
    with open(path, "wb") as f:
        f.write(data)
    return path
