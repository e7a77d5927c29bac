"""Twin kernel images decode like real ones (kho_agent.kimage)."""

from __future__ import annotations

import pytest

from kho_agent.kimage import inspect_kernel_image
from kho_fleet.sim.kernelimage import IMAGE_SIZE, make_kernel_image


@pytest.mark.parametrize("fmt,kind", [("bzImage", "bzImage"), ("gz", "compressed image")])
def test_image_decodes_to_release_and_abi(tmp_path, fmt, kind):
    path = make_kernel_image(str(tmp_path / "vmlinuz"), "7.2.13-abi-kho-v3", kho="kho-v3",
                             luo="luo-v5", memfd="memfd-v2", fmt=fmt)
    info = inspect_kernel_image(path)
    assert (info.format, info.compression) == (kind, "gzip")
    assert (info.release, info.kho, info.luo, info.memfd) == \
        ("7.2.13-abi-kho-v3", "kho-v3", "luo-v5", "memfd-v2")
    assert info.notes == []


def test_bzimage_header_and_size(tmp_path):
    path = make_kernel_image(str(tmp_path / "bz"), "7.2.13-twin")
    data = open(path, "rb").read()
    assert len(data) == IMAGE_SIZE and data[0x202:0x206] == b"HdrS"
    assert int.from_bytes(data[0x206:0x208], "little") >= 0x208
    assert make_kernel_image(str(tmp_path / "bz2"), "7.2.13-twin") and \
        open(tmp_path / "bz2", "rb").read() == data                 # deterministic


def test_image_without_kho_is_undeterminable(tmp_path):
    info = inspect_kernel_image(make_kernel_image(str(tmp_path / "k"), "6.1.0", kho=""))
    assert info.release == "6.1.0" and info.kho is None


def test_bad_format(tmp_path):
    with pytest.raises(ValueError, match="unknown image format"):
        make_kernel_image(str(tmp_path / "k"), "7.2", fmt="zImage")
