"""Small fake kernel images for twin hosts, decodable by kho_agent.kimage.

`make_kernel_image()` writes what `inspect_kernel_image()` reads in a real bzImage: an
x86 setup header ("HdrS" at 0x202, boot protocol 2.15, setup_sects at 0x1f1,
payload_offset/payload_length at 0x248/0x24c) pointing at a gzip payload. The payload
plays the decompressed vmlinux: the banner "Linux version <release> (kho-fleet twin) #1
SMP" and the KHO/LUO/memfd ABI strings, NUL-delimited as in .rodata, padded with
deterministic filler. fmt="gz" writes the bare gzip stream (an arm64 Image.gz look-alike).
"""

from __future__ import annotations

import gzip
import random
import struct

__all__ = ["IMAGE_SIZE", "make_kernel_image", "kernel_payload"]

IMAGE_SIZE = 64 << 10
_SETUP_SECTS = 4
_BOOT_PROTOCOL = 0x020F


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


def make_kernel_image(path: str, release: str, kho: str = "kho-v4", luo: str = "luo-v5",
                      memfd: str = "memfd-v2", fmt: str = "bzImage") -> str:
    """Write a twin kernel image at `path` ("bzImage" or "gz"); returns `path`."""
    payload = gzip.compress(kernel_payload(release, kho, luo, memfd), mtime=0)
    if fmt == "gz":
        data = payload
    elif fmt == "bzImage":
        setup = bytearray((_SETUP_SECTS + 1) * 512)
        setup[0x1F1] = _SETUP_SECTS
        struct.pack_into("<H", setup, 0x1FE, 0xAA55)
        setup[0x202:0x206] = b"HdrS"
        struct.pack_into("<H", setup, 0x206, _BOOT_PROTOCOL)
        pm_code = b"\x90" * 512            # stands in for the decompressor stub
        struct.pack_into("<II", setup, 0x248, len(pm_code), len(payload))
        data = bytes(setup) + pm_code + payload
        data += bytes(max(0, IMAGE_SIZE - len(data)))
    else:
        raise ValueError(f"unknown image format {fmt!r} (bzImage or gz)")
    with open(path, "wb") as f:
        f.write(data)
    return path
