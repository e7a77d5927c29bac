"""kho_agent.bootproto: the incoming KHO FDT from x86 setup_data and the arm64 device tree.

The fake sysfs trees below are built from the layouts in the Linux 7.3.4 source
(/work/src/linux-source-7.3/…):
- arch/x86/include/uapi/asm/setup_data.h:16 `#define SETUP_KEXEC_KHO 10`, :85-90
  `struct kho_data { __u64 fdt_addr; __u64 fdt_size; __u64 scratch_addr; __u64 scratch_size; }
  __attribute__((packed))` (little-endian on x86);
- arch/x86/kernel/ksysfs.c:164/166 type_show `sprintf(buf, "0x%x\\n", …)`, :278 entry directory
  name `"%d"`, setup_data_data_read() returns the `len` payload bytes;
- arch/x86/kernel/kexec-bzimage64.c:284-290 setup_kho() sets type/len before the "have KHO?"
  check (so an all-zero kho_data is a kexec without KHO);
- drivers/of/kexec.c:284-289 kho_add_chosen(): fdt_appendprop_addrrange() of
  "linux,kho-fdt" (fdt, PAGE_SIZE) and "linux,kho-scratch" (mem, bufsz) in /chosen,
  big-endian cells per the root #address-cells/#size-cells (scripts/dtc/libfdt/fdt_addresses.c:
  defaults 2 and 1, 1 or 2 cells each); drivers/of/fdt.c:643-655 exactly one entry.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kho_agent.bootproto import (
    BootProtoError,
    IncomingKho,
    decode_addr_ranges,
    decode_cells,
    decode_kho_data,
    decode_scratch_table,
    incoming_kho,
    parse_setup_type,
)
from kho_agent.errors import InputError, KhoAgentError

FDT, FDT_SIZE, SCR, SCR_SIZE = 0x1_2345_6000, 0x1000, 0x8000_0000, 0x0400_0000


def kho_data(fdt=FDT, fsz=FDT_SIZE, scr=SCR, ssz=SCR_SIZE) -> bytes:
    return struct.pack("<QQQQ", fdt, fsz, scr, ssz)


def setup_tree(root: Path, entries: list[tuple[int, bytes]], *, fmt: str = "0x%x\n") -> Path:
    """/sys/kernel/boot_params/setup_data/<N>/{type,data} as ksysfs.c lays it out."""
    top = root / "sys/kernel/boot_params/setup_data"
    top.mkdir(parents=True)
    for n, (typ, data) in enumerate(entries):
        d = top / str(n)
        d.mkdir()
        (d / "type").write_bytes((fmt % typ).encode())
        (d / "data").write_bytes(data)
    return top


def dt_tree(root: Path, fdt: bytes | None, scratch: bytes | None,
            cells: tuple[int | None, int | None] = (2, 2)) -> Path:
    """/sys/firmware/devicetree/base with root #cells and /chosen/linux,kho-*."""
    base = root / "sys/firmware/devicetree/base"
    (base / "chosen").mkdir(parents=True)
    for name, n in zip(("#address-cells", "#size-cells"), cells):
        if n is not None:
            (base / name).write_bytes(struct.pack(">I", n))
    if fdt is not None:
        (base / "chosen/linux,kho-fdt").write_bytes(fdt)
    if scratch is not None:
        (base / "chosen/linux,kho-scratch").write_bytes(scratch)
    return base


def be_range(addr: int, size: int, ac: int = 2, sc: int = 2) -> bytes:
    def cells(v: int, n: int) -> bytes:
        return v.to_bytes(4 * n, "big")
    return cells(addr, ac) + cells(size, sc)


# --- x86 setup_data ---------------------------------------------------------------------------

def test_setup_data_finds_type_10_among_others(tmp_path: Path) -> None:
    top = setup_tree(tmp_path, [(9, b"\x11" * 32), (1, b"\x00" * 40), (10, kho_data())])
    kho = incoming_kho(str(tmp_path))
    assert kho == IncomingKho("setup_data", str(top / "2" / "data"), FDT, FDT_SIZE, SCR, SCR_SIZE)
    assert kho.to_json()["source"] == "setup_data"


def test_setup_data_without_kho_entry_or_with_empty_one_is_none(tmp_path: Path) -> None:
    setup_tree(tmp_path / "a", [(9, b"\x11" * 32)])
    assert incoming_kho(str(tmp_path / "a")) is None
    # setup_kho() writes type 10 and len 32 even when KHO has nothing to hand over
    setup_tree(tmp_path / "b", [(10, bytes(32))])
    assert incoming_kho(str(tmp_path / "b")) is None
    assert incoming_kho(str(tmp_path / "nothing-here")) is None


@pytest.mark.parametrize("data,why", [
    (kho_data()[:31], "31 bytes"),
    (kho_data() + b"\x00", "33 bytes"),
    (b"", "0 bytes"),
    (kho_data(fdt=0), "zero address"),
    (kho_data(ssz=0), "zero address or size"),
    (kho_data(fdt=(1 << 64) - 8, fsz=0x1000), "wraps"),
])
def test_setup_data_malformed_payload_names_the_file(tmp_path: Path, data: bytes, why: str) -> None:
    top = setup_tree(tmp_path, [(10, data)])
    with pytest.raises(BootProtoError, match=why) as e:
        incoming_kho(str(tmp_path))
    assert str(top / "0" / "data") in str(e.value)
    assert isinstance(e.value, InputError) and e.value.exit_code == 2


@pytest.mark.parametrize("text", [b"10\n", b"0xA\n", b"a", b"0x\n", b"0x1234567890\n",
                                  b"\xff\xfe", b" 0xa"])
def test_setup_data_garbage_type(tmp_path: Path, text: bytes) -> None:
    top = setup_tree(tmp_path, [(10, kho_data())])
    (top / "0" / "type").write_bytes(text)
    with pytest.raises(BootProtoError, match="0/type"):
        incoming_kho(str(tmp_path))


def test_setup_data_bounded_reads_and_odd_files(tmp_path: Path) -> None:
    top = setup_tree(tmp_path, [(10, kho_data())])
    (top / "0" / "data").write_bytes(b"\x00" * (1 << 20))   # 1 MiB: read stops at the bound
    with pytest.raises(BootProtoError, match="longer than 4096 bytes"):
        incoming_kho(str(tmp_path))
    (top / "0" / "data").unlink()
    with pytest.raises(BootProtoError, match="missing for a SETUP_KEXEC_KHO"):
        incoming_kho(str(tmp_path))
    os.mkfifo(top / "0" / "data")                          # would block a plain open()
    with pytest.raises(BootProtoError, match="not a regular file"):
        incoming_kho(str(tmp_path))


def test_setup_data_two_kho_entries_refused(tmp_path: Path) -> None:
    setup_tree(tmp_path, [(10, kho_data()), (10, kho_data(fdt=FDT + 0x1000))])
    with pytest.raises(BootProtoError, match="2 SETUP_KEXEC_KHO entries"):
        incoming_kho(str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file anyway")
def test_setup_data_unreadable_is_a_host_error(tmp_path: Path) -> None:
    top = setup_tree(tmp_path, [(10, kho_data())])
    (top / "0" / "data").chmod(0)
    with pytest.raises(KhoAgentError, match="cannot read") as e:
        incoming_kho(str(tmp_path))
    assert e.value.exit_code == 1


# --- arm64 device tree ------------------------------------------------------------------------

@pytest.mark.parametrize("ac,sc", [(2, 2), (2, 1), (1, 1), (1, 2)])
def test_devicetree_cells(tmp_path: Path, ac: int, sc: int) -> None:
    fdt, scr = (0x4123_4000, 0x1000), (0x5000_0000, 0x0200_0000)
    base = dt_tree(tmp_path, be_range(*fdt, ac, sc), be_range(*scr, ac, sc), (ac, sc))
    kho = incoming_kho(str(tmp_path))
    assert kho == IncomingKho("devicetree", str(base / "chosen/linux,kho-fdt"), *fdt, *scr)


def test_devicetree_default_cells_and_64bit_address(tmp_path: Path) -> None:
    # no #address-cells/#size-cells: the devicetree-spec defaults 2 and 1 (libfdt's writer)
    dt_tree(tmp_path, be_range(0x8_4000_0000, 0x1000, 2, 1), be_range(0x8_0000_0000, 1 << 28, 2, 1),
            (None, None))
    kho = incoming_kho(str(tmp_path))
    assert kho is not None
    assert (kho.fdt_addr, kho.scratch_table_addr, kho.scratch_table_size) == (
        0x8_4000_0000, 0x8_0000_0000, 1 << 28)


def test_devicetree_without_kho_is_none(tmp_path: Path) -> None:
    dt_tree(tmp_path, None, None)
    assert incoming_kho(str(tmp_path)) is None


FDT_OK, SCR_OK = be_range(0x4000_0000, 0x1000), be_range(1 << 30, 1 << 24)


@pytest.mark.parametrize("fdt,scratch,cells,match,fname", [
    (FDT_OK[:12], SCR_OK, (2, 2), "12 bytes", "linux,kho-fdt"),
    (be_range(0x4000_0000, 0x1000), b"", (2, 2), "0 bytes", "linux,kho-scratch"),
    (FDT_OK * 2, SCR_OK, (2, 2), "2 .address, size. entries", "linux,kho-fdt"),
    (be_range(0x4000_0000, 0x1000), None, (2, 2), "missing", "linux,kho-scratch"),
    (be_range(0, 0x1000), be_range(1 << 30, 1 << 24), (2, 2), "zero address", "linux,kho-fdt"),
    (FDT_OK, SCR_OK, (3, 2), "3 cells", "#address-cells"),
    (be_range(0x4000_0000, 0x1000), be_range(1 << 30, 1 << 24), (2, 0), "0 cells", "#size-cells"),
])
def test_devicetree_malformed(tmp_path: Path, fdt, scratch, cells, match: str, fname: str) -> None:
    dt_tree(tmp_path, fdt, scratch, cells)
    with pytest.raises(BootProtoError, match=match) as e:
        incoming_kho(str(tmp_path))
    assert fname in str(e.value)


def test_devicetree_cells_file_garbage(tmp_path: Path) -> None:
    base = dt_tree(tmp_path, be_range(0x4000_0000, 0x1000), be_range(1 << 30, 1 << 24))
    (base / "#size-cells").write_bytes(b"\x00\x00\x02")
    with pytest.raises(BootProtoError, match="#size-cells: 3 bytes"):
        incoming_kho(str(tmp_path))


def test_setup_data_wins_over_devicetree(tmp_path: Path) -> None:
    setup_tree(tmp_path, [(10, kho_data())])
    dt_tree(tmp_path, be_range(0x4000_0000, 0x1000), be_range(1 << 30, 1 << 24))
    kho = incoming_kho(str(tmp_path))
    assert kho is not None and kho.source == "setup_data"
    setup_tree(tmp_path / "x", [(9, b"")])
    dt_tree(tmp_path / "x", be_range(0x4000_0000, 0x1000), be_range(1 << 30, 1 << 24))
    kho = incoming_kho(str(tmp_path / "x"))
    assert kho is not None and kho.source == "devicetree"


def test_scratch_table() -> None:
    # include/asm-generic/kexec_handover.h: struct kho_scratch { phys_addr_t addr, size; }
    table = struct.pack("<4Q", 0x1_0000_0000, 64 << 20, 0x4000_0000, 16 << 20)
    assert decode_scratch_table(table) == ((0x1_0000_0000, 64 << 20), (0x4000_0000, 16 << 20))
    with pytest.raises(BootProtoError, match="24 bytes"):
        decode_scratch_table(table[:24])
    # a slot that got no memory stays (addr, 0): left out, as the kernel skips it
    assert decode_scratch_table(table + struct.pack("<2Q", 0x3EC0_0000, 0)) == (
        (0x1_0000_0000, 64 << 20), (0x4000_0000, 16 << 20))
    with pytest.raises(BootProtoError, match="every struct kho_scratch entry has size 0"):
        decode_scratch_table(table[:8] + bytes(8))
    with pytest.raises(BootProtoError, match="zero address or size"):
        decode_scratch_table(bytes(8) + table[8:16])


# --- trees captured from the lab guests (tests/data) ------------------------------------------

DATA = Path(__file__).parent / "data"
PROD_BOOT = DATA / "x86-7.3.4-prod-kho-boot"


def test_captured_setup_data_of_a_kho_boot() -> None:
    """/sys/kernel/boot_params/setup_data of the lab's 7.3.4-prod guest right after the
    kexec from 7.2.13 (2026-12-03): entry 0 is SETUP_RNG_SEED (9) with its payload already
    consumed (0 bytes), entry 1 SETUP_KEXEC_KHO (10). Read as the agent reads /."""
    top = PROD_BOOT / "sys/kernel/boot_params/setup_data"
    assert parse_setup_type((top / "0/type").read_bytes()) == 9
    assert (top / "0/data").read_bytes() == b""
    assert parse_setup_type((top / "1/type").read_bytes()) == 10
    kho = incoming_kho(str(PROD_BOOT))
    assert kho == IncomingKho("setup_data", str(top / "1/data"), 0x18BA000, 0x1000,
                              0x3EBF0000, 0x30)


def test_captured_fdt_and_scratch_table_agree_with_setup_data() -> None:
    """What setup_data points at, read through /proc/kcore on the same guest: the KHO root
    FDT (kho-v4, whole within fdt_size) and the scratch table (3 slots, one empty)."""
    from kho_agent.abi.kho import decode_kho_fdt
    kho = incoming_kho(str(PROD_BOOT))
    assert kho is not None
    fdt = (PROD_BOOT / "kho-root-fdt.bin").read_bytes()
    assert len(fdt) <= kho.fdt_size
    root = decode_kho_fdt(fdt)
    assert root.compatible == "kho-v4" and root.memory_map_root > 0
    assert {s.name for s in root.subtrees} >= {"kexec-metadata", "LUO"}
    table = (PROD_BOOT / "kho-scratch-table.bin").read_bytes()
    assert len(table) == kho.scratch_table_size
    assert decode_scratch_table(table) == ((0x3740_0000, 120 << 20), (0x3000_0000, 116 << 20))


# --- fuzz the pure decoders -------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_fuzz_kho_data(blob: bytes) -> None:
    try:
        out = decode_kho_data(blob, "f")
    except BootProtoError as e:
        assert str(e).startswith("f: ")
        return
    assert len(blob) == 32
    assert out is None or (out == struct.unpack("<4Q", blob) and 0 not in out)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.integers(1, 2), st.integers(1, 2))
def test_fuzz_addr_ranges(blob: bytes, ac: int, sc: int) -> None:
    try:
        ((addr, size),) = decode_addr_ranges(blob, ac, sc, "p")
    except BootProtoError as e:
        assert str(e).startswith("p: ")
        return
    assert len(blob) == 4 * (ac + sc) and addr and size
    assert be_range(addr, size, ac, sc) == blob


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=16), st.integers(0, 1 << 32).map(lambda v: b"0x%x\n" % v)))
def test_fuzz_type_and_cells(blob: bytes) -> None:
    try:
        t = parse_setup_type(blob, "t")
        assert blob.rstrip(b"\n") == b"0x%x" % t
    except BootProtoError as e:
        assert str(e).startswith("t: ")
    try:
        assert decode_cells(blob, 2, "c") in (1, 2)
    except BootProtoError as e:
        assert str(e).startswith("c: ")


ARM64_BOOT = DATA / "arm64-7.2.13-kho-boot"


def test_captured_devicetree_of_an_arm64_kho_boot() -> None:
    """/sys/firmware/devicetree/base of the arm64 lab guest (Image-7.2.13-kho under
    qemu-system-aarch64 -M virt) right after a KHO kexec into the same kernel (2026-12-03;
    `KHO: exec from: 7.2.13 (count 1)`): 2 address and 2 size cells; /chosen carries the
    FDT's and the scratch table's (address, size). Read as the agent reads /."""
    kho = incoming_kho(str(ARM64_BOOT))
    top = ARM64_BOOT / "sys/firmware/devicetree/base/chosen"
    assert kho == IncomingKho("devicetree", str(top / "linux,kho-fdt"), 0x42E1F000, 0x1000,
                              0x7C7F0000, 0x30)
    assert (top / "linux,booted-from-kexec").exists()
