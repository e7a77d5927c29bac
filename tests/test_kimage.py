"""Kernel-image ABI detection: real lab bzImages (when present) and synthetic images."""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

import pytest

from kho_agent.kimage import abi_strings, inspect_kernel_image

LAB = Path(__file__).resolve().parents[1].parent / "shared" / "lab"


def _vmlinux(release: str, kho: str = "kho-v4", pad: int = 1 << 16) -> bytes:
    body = (b"\x00" * 64 + f"Linux version {release} (x@y) #1 SMP\n".encode() + b"\x00"
            + b"preserved-data\x00blob-size\x00" + kho.encode() + b"\x00compatible\x00"
            + b"LUO\x00luo-v5\x00" + b"\xff" * 8 + b"memfd-v2\x00")
    return body + b"\x00" * (pad - len(body))


def _bzimage(payload: bytes) -> bytes:
    setup_sects = 4
    img = bytearray((setup_sects + 1) * 512)
    img[0x1F1] = setup_sects
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, 0x20F)
    struct.pack_into("<II", img, 0x248, 0x100, len(payload))
    img += b"\x00" * 0x100 + payload + b"\x00" * 64
    return bytes(img)


@pytest.mark.parametrize("compress,fmt", [(gzip.compress, "gzip"), (lzma.compress, "xz")])
def test_bzimage_payloads(tmp_path: Path, compress, fmt: str) -> None:
    p = tmp_path / "bzImage"
    p.write_bytes(_bzimage(compress(_vmlinux("7.3.0-test", "kho-v4"))))
    info = inspect_kernel_image(str(p))
    assert (info.format, info.compression) == ("bzImage", fmt)
    assert (info.release, info.kho, info.luo, info.memfd) == ("7.3.0-test", "kho-v4", "luo-v5", "memfd-v2")


def test_plain_gzip_and_vmlinux_and_unknown(tmp_path: Path) -> None:
    gz = tmp_path / "Image.gz"
    gz.write_bytes(gzip.compress(_vmlinux("6.99-arm", "kho-v3")))
    assert inspect_kernel_image(str(gz)).kho == "kho-v3"
    raw = tmp_path / "Image"
    raw.write_bytes(_vmlinux("6.99-arm", "kho-v2"))
    assert inspect_kernel_image(str(raw)).kho == "kho-v2"
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x01" * 4096)
    info = inspect_kernel_image(str(junk))
    assert info.kho is None and not info.determinable and "undeterminable" in info.notes[0]


def test_tail_merged_string_counts_but_standalone_wins() -> None:
    # the linker keeps "kho-v3" only as the tail of the release string (seen on the lab image)
    merged = b"\x00release\x007.2.13-abi-kho-v3\x00other\x00"
    assert abi_strings(merged)["kho"] == "kho-v3"
    both = merged + b"\x00kho-v4\x00"
    assert abi_strings(both)["kho"] == "kho-v4"
    assert abi_strings(b"\x00kho-v4\x00\x00kho-v5\x00")["kho"] == "kho-v4,kho-v5"


@pytest.mark.parametrize("name,release,kho", [
    ("bzImage-7.2.13-kho", "7.2.13", "kho-v4"),
    ("bzImage-7.2.13-lab-b", "7.2.13-lab-b", "kho-v4"),
    ("bzImage-7.2.13-abi-kho-v3", "7.2.13-abi-kho-v3", "kho-v3"),
])
def test_real_lab_images(name: str, release: str, kho: str) -> None:
    path = LAB / name
    if not path.is_file():
        pytest.skip(f"lab kernel not found: {path}")
    info = inspect_kernel_image(str(path))
    assert (info.release, info.kho, info.luo, info.memfd) == (release, kho, "luo-v5", "memfd-v2")
