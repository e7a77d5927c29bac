"""Kernel-image ABI detection: real lab bzImages (when present) and synthetic images.

The synthetic arm64 files follow the Linux 7.3.4 source: struct arm64_image_header
(arch/arm64/include/asm/image.h: le32 code0, code1; le64 text_offset, image_size, flags,
res2, res3, res4; le32 magic "ARM\\x64" at 0x38, res5; flags bits 1-2 = page size 1/2/3 for
4K/16K/64K, arch/arm64/kernel/image.h __HEAD_FLAG_PAGE_SIZE = (PAGE_SHIFT - 10) / 2) and the
EFI zboot header (drivers/firmware/efi/libstub/zboot-header.S: "MZ", "zimg" at 4, le32
payload offset at 8 and size at 12, COMP_TYPE string at 0x18, LINUX_PE_MAGIC at 0x38, PE
header offset at 0x3c; Makefile.zboot: payload = Image padded to image_size, zstd payloads
followed by a 4-byte size not counted in the header).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import lzma
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kho_agent.errors import InputError, KhoAgentError
from kho_agent.kimage import (
    abi_strings,
    arm64_header,
    inspect_kernel_image,
    unpack_to_raw,
    zboot_header,
)

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
    assert ((info.release, info.kho, info.luo, info.memfd)
            == ("7.3.0-test", "kho-v4", "luo-v5", "memfd-v2"))


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


# --- arm64: raw Image, Image.gz, EFI zboot vmlinuz --------------------------------------------

PAGE_FLAG = {4096: 1, 16384: 2, 65536: 3}


def _arm64_image(release: str, page_size: int = 4096, kho: str = "kho-v4") -> bytes:
    body = bytearray(_vmlinux(release, kho))
    flags = (PAGE_FLAG[page_size] << 1) | (1 << 3)          # LE, page size, phys_base
    struct.pack_into("<IIQQQQQQ4sI", body, 0, 0xFA405A4D, 0x14000000, 0, len(body) + 4096,
                     flags, 0, 0, 0, b"ARM\x64", 0x40)
    return bytes(body)


def _zboot(raw: bytes, comp_type: str, compress, size_len: int = 0,
           machine: int = 0xAA64) -> bytes:
    (image_size,) = struct.unpack_from("<Q", raw, 16)
    padded = raw + b"\x00" * (image_size - len(raw))       # Makefile.zboot copy_and_pad
    payload = compress(padded)
    head = bytearray(0x1000)
    head[0:4] = b"MZ\x00\x00"
    head[4:8] = b"zimg"
    struct.pack_into("<II", head, 8, len(head), len(payload))
    head[0x18:0x18 + len(comp_type)] = comp_type.encode()
    struct.pack_into("<II", head, 0x38, 0x818223CD, 0x40)
    head[0x40:0x44] = b"PE\x00\x00"
    struct.pack_into("<H", head, 0x44, machine)
    tail = struct.pack("<I", len(padded)) if size_len else b""
    return bytes(head) + payload + tail + b"\x00" * 512


@pytest.mark.parametrize("page_size", [4096, 16384, 65536])
def test_arm64_raw_image(tmp_path: Path, page_size: int) -> None:
    raw = _arm64_image("7.3.4-arm", page_size)
    p = tmp_path / "Image"
    p.write_bytes(raw)
    info = inspect_kernel_image(str(p))
    assert (info.format, info.compression, info.arch, info.page_size) == (
        "arm64 Image", "none", "arm64", page_size)
    assert (info.release, info.kho, info.luo, info.memfd) == (
        "7.3.4-arm", "kho-v4", "luo-v5", "memfd-v2")
    assert unpack_to_raw(str(p)) == raw
    hdr = arm64_header(raw)
    assert hdr is not None and hdr.image_size == len(raw) + 4096 and not hdr.big_endian


def test_arm64_header_without_page_size(tmp_path: Path) -> None:
    raw = bytearray(_arm64_image("7.3.4-arm"))
    struct.pack_into("<Q", raw, 24, 0)                     # flags 0: "unspecified"
    p = tmp_path / "Image"
    p.write_bytes(raw)
    info = inspect_kernel_image(str(p))
    assert info.arch == "arm64" and info.page_size is None
    assert any("page size" in n for n in info.notes)


def test_arm64_image_gz(tmp_path: Path) -> None:
    raw = _arm64_image("7.3.4-gz", 16384, "kho-v3")
    p = tmp_path / "Image.gz"
    p.write_bytes(gzip.compress(raw))
    info = inspect_kernel_image(str(p))
    assert (info.format, info.compression, info.arch, info.page_size, info.kho) == (
        "arm64 Image.gz", "gzip", "arm64", 16384, "kho-v3")
    assert unpack_to_raw(str(p)) == raw


@pytest.mark.parametrize("comp_type,compress,kind", [
    ("gzip", gzip.compress, "gzip"),
    ("xzkern", lzma.compress, "xz"),
])
def test_arm64_zboot_stdlib(tmp_path: Path, comp_type: str, compress, kind: str) -> None:
    raw = _arm64_image("7.3.4-zboot", 65536)
    p = tmp_path / "vmlinuz"
    p.write_bytes(_zboot(raw, comp_type, compress))
    hdr = zboot_header(p.read_bytes())
    assert hdr is not None
    assert (hdr.comp_type, hdr.compression, hdr.machine) == (comp_type, kind, "arm64")
    info = inspect_kernel_image(str(p))
    assert (info.format, info.compression, info.arch, info.page_size) == (
        "EFI zboot", kind, "arm64", 65536)
    assert (info.release, info.kho) == ("7.3.4-zboot", "kho-v4")
    out = unpack_to_raw(str(p))
    assert out[:len(raw)] == raw and set(out[len(raw):]) <= {0} and arm64_header(out) is not None


def _zstd(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-c", "-3"], input=data, capture_output=True,
                          check=True).stdout


@pytest.mark.skipif(shutil.which("zstd") is None, reason="the zstd tool is not installed here")
def test_arm64_zboot_zstd_with_and_without_tool(tmp_path: Path, monkeypatch) -> None:
    raw = _arm64_image("7.3.4-zstd")
    p = tmp_path / "vmlinuz"
    p.write_bytes(_zboot(raw, "zstd", _zstd, size_len=4))
    info = inspect_kernel_image(str(p))
    assert (info.compression, info.arch, info.release, info.kho) == (
        "zstd", "arm64", "7.3.4-zstd", "kho-v4")
    assert unpack_to_raw(str(p))[:len(raw)] == raw
    # the same file on a host without zstd: undeterminable, and unpacking says why
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    info = inspect_kernel_image(str(p))
    assert info.kho is None and "install the `zstd` tool" in info.notes[0]
    assert "undeterminable" in info.notes[0]
    with pytest.raises(KhoAgentError, match="install the `zstd` tool") as e:
        unpack_to_raw(str(p))
    assert e.value.exit_code == 1 and str(p) in str(e.value)


def test_arm64_bad_images(tmp_path: Path) -> None:
    raw = _arm64_image("7.3.4-bad")
    z = bytearray(_zboot(raw, "gzip", gzip.compress))
    outside = tmp_path / "outside"
    struct.pack_into("<I", z, 12, len(z))                  # payload runs past the file
    outside.write_bytes(z)
    info = inspect_kernel_image(str(outside))
    assert info.kho is None and "outside" in info.notes[0]
    with pytest.raises(InputError, match="outside"):
        unpack_to_raw(str(outside))
    lzo = tmp_path / "lzo"
    lzo.write_bytes(_zboot(raw, "lzo", gzip.compress))
    assert "'lzo' not supported" in inspect_kernel_image(str(lzo)).notes[0]
    corrupt = bytearray(_zboot(raw, "gzip", gzip.compress))
    corrupt[0x1000 + 20:0x1000 + 60] = b"\xAA" * 40
    (tmp_path / "corrupt").write_bytes(corrupt)
    with pytest.raises(InputError, match="did not decompress") as e:
        unpack_to_raw(str(tmp_path / "corrupt"))
    assert str(tmp_path / "corrupt") in str(e.value) and e.value.exit_code == 2
    x86gz = tmp_path / "vmlinux.gz"
    x86gz.write_bytes(gzip.compress(_vmlinux("7.3.4")))
    with pytest.raises(InputError, match="not an arm64 Image"):
        unpack_to_raw(str(x86gz))
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x01" * 4096)
    with pytest.raises(InputError, match="not an arm64 Image, Image.gz, EFI zboot"):
        unpack_to_raw(str(junk))


def test_bzimage_arch_and_unpack_passthrough(tmp_path: Path) -> None:
    img = bytearray(_bzimage(gzip.compress(_vmlinux("7.3.4-x"))))
    p = tmp_path / "bzImage"
    p.write_bytes(img)
    assert inspect_kernel_image(str(p)).arch is None        # no XLF_KERNEL_64: not claimed
    img[0x236] = 1                                          # xloadflags XLF_KERNEL_64
    p.write_bytes(img)
    info = inspect_kernel_image(str(p))
    assert (info.arch, info.page_size) == ("x86_64", 4096)
    assert unpack_to_raw(str(p)) == bytes(img)


_SMALL_ZBOOT = _zboot(_arm64_image("7.3.4-fuzz"), "gzip", gzip.compress)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 0x7F), st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzz_zboot_header_bytes(tmp_path: Path, flips: list[tuple[int, int]]) -> None:
    img = bytearray(_SMALL_ZBOOT)
    for at, val in flips:
        img[at] = val
    p = tmp_path / "fz"
    p.write_bytes(img)
    info = inspect_kernel_image(str(p))                     # never raises on content
    assert info.kho in (None, "kho-v4")
    try:
        out = unpack_to_raw(str(p))
    except (InputError, KhoAgentError) as e:
        assert str(p) in str(e)
    else:
        assert arm64_header(out) is not None or out == bytes(img)


# --- real images -----------------------------------------------------------------------------

def _lab_sha256(name: str) -> Optional[str]:
    sums = LAB / "SHA256SUMS"
    if not sums.is_file():
        return None
    for line in sums.read_text().splitlines():
        digest, _, fname = line.partition("  ")
        if fname.strip() == name:
            return digest
    return None


def test_real_arm64_lab_image(tmp_path: Path) -> None:
    path = LAB / "arm64" / "Image-7.2.13-kho"
    if not path.is_file():
        pytest.skip(f"arm64 lab kernel not found: {path}")
    raw = path.read_bytes()
    want = _lab_sha256("arm64/Image-7.2.13-kho")
    assert want is not None and hashlib.sha256(raw).hexdigest() == want
    info = inspect_kernel_image(str(path))
    assert (info.format, info.arch, info.page_size) == ("arm64 Image", "arm64", 4096)
    assert (info.release, info.kho, info.luo, info.memfd) == (
        "7.2.13", "kho-v4", "luo-v5", "memfd-v2")
    assert unpack_to_raw(str(path)) == raw
    # the same kernel as a distribution would ship it: Image.gz and a gzip EFI zboot vmlinuz
    gz = tmp_path / "Image.gz"
    gz.write_bytes(gzip.compress(raw, 1))
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(_zboot(raw, "gzip", lambda b: gzip.compress(b, 1)))
    for p, fmt in ((gz, "arm64 Image.gz"), (vmlinuz, "EFI zboot")):
        i = inspect_kernel_image(str(p))
        assert (i.format, i.arch, i.page_size, i.release, i.kho) == (
            fmt, "arm64", 4096, "7.2.13", "kho-v4")
        assert unpack_to_raw(str(p))[:len(raw)] == raw


def _kernel_73() -> Optional[Path]:
    cands = [LAB / "bzImage-7.3.4-prod"]
    cands += [Path(p) for p in sorted(glob.glob("/work/src/kernels/*7.3*"))]
    built = "/work/src/linux-source-7.3*/B/arch/x86/boot/bzImage"
    cands += [Path(p) for p in sorted(glob.glob(built))]
    return next((p for p in cands if p.is_file()), None)


def test_real_73_bzimage() -> None:
    path = _kernel_73()
    if path is None:
        pytest.skip("no 7.3 bzImage: not in ../shared/lab/bzImage-7.3.4-prod, /work/src/kernels/ "
                    "or /work/src/linux-source-7.3*/B/arch/x86/boot/bzImage")
    info = inspect_kernel_image(str(path))
    assert info.format == "bzImage" and info.arch == "x86_64" and info.release is not None
    assert info.release.startswith("7.3.4")
    assert (info.kho, info.luo, info.memfd) == ("kho-v4", "luo-v5", "memfd-v2")
