"""Physical-memory readers (kho_agent.physmem): raw images, ELF cores (write_elf_core and
hand-made ones), truncated and foreign files, format detection, /dev/mem and /proc/kcore
when this machine lets us read them."""

from __future__ import annotations

import os
import struct

import pytest

from kho_agent.abi.memory import MemoryReadError
from kho_agent.physmem import (
    DevMem,
    ElfCore,
    KCore,
    PhysMemError,
    RawImage,
    Segment,
    open_live_memory,
    open_memory,
    system_ram_ranges,
    write_elf_core,
)

PS = 4096


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) % 256 for i in range(n))


def _elf(path, segs, *, order="<", cls=2, phentsize=56, extra_phdrs=()):
    """A hand-made ELF64 core: segs = [(paddr, data, memsz)], laid out back to back."""
    phnum = len(segs) + len(extra_phdrs)
    ehdr = struct.pack(order + "4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", cls,
                       1 if order == "<" else 2, 1, 0, 0, b"\0" * 7, 4, 62, 1, 0, 64, 0, 0,
                       64, phentsize, phnum, 0, 0, 0)
    off = 64 + phentsize * phnum
    phdrs = b""
    body = b""
    for paddr, data, memsz in segs:
        phdrs += struct.pack(order + "IIQQQQQQ", 1, 6, off + len(body), 0, paddr, len(data),
                             memsz, 0).ljust(phentsize, b"\0")
        body += data
    for ph in extra_phdrs:
        phdrs += struct.pack(order + "IIQQQQQQ", *ph).ljust(phentsize, b"\0")
    with open(path, "wb") as f:
        f.write(ehdr + phdrs + body)


# --- raw images --------------------------------------------------------------------------

@pytest.mark.parametrize("base", [None, 0, 0x40000000])
def test_raw_image(tmp_path, base):
    data = _pattern(8 * PS, 1)
    p = tmp_path / "mem.raw"
    p.write_bytes(data)
    b = base or 0
    with (RawImage(str(p), base) if base is not None else RawImage(str(p))) as mem:
        assert mem.ranges == [(b, b + 8 * PS)] and mem.size == 8 * PS
        assert mem.read(b + 100, 5000) == data[100:5100]
        assert mem.read(b + 8 * PS - 1, 1) == data[-1:]
        assert mem.read(b, 0) == b""
        assert mem.contains(b, 8 * PS) and not mem.contains(b, 8 * PS + 1)
        for phys, n in ((b + 8 * PS - 1, 2), (b + 8 * PS, 1), (-1, 1), (b, -1)):
            with pytest.raises(PhysMemError):
                mem.read(phys, n)
        if b:
            with pytest.raises(PhysMemError, match="not in raw image"):
                mem.read(0, 1)
    with open_memory(str(p), base) as mem:
        assert isinstance(mem, RawImage) and mem.ranges[0][0] == b
        assert mem.read(b, 16) == data[:16]
    assert issubclass(PhysMemError, MemoryReadError)


def test_raw_image_close_twice(tmp_path):
    p = tmp_path / "m"
    p.write_bytes(b"x" * PS)
    mem = RawImage(str(p))
    mem.close()
    mem.close()


# --- ELF cores ---------------------------------------------------------------------------

def test_write_elf_core_segments_gaps_and_merging(tmp_path):
    a, b, c, d = (_pattern(PS, i) for i in range(4))
    path = str(tmp_path / "core.elf")
    # b directly follows a (merged into one PT_LOAD); c after a gap; d far away
    write_elf_core(path, [(0x10000 + PS, b), (0x10000, a), (0x20000, c), (1 << 40, d)],
                   machine=183)
    raw = open(path, "rb").read()
    assert raw[:4] == b"\x7fELF" and struct.unpack_from("<H", raw, 18)[0] == 183
    for use_mmap in (True, False):
        with ElfCore(path, use_mmap=use_mmap) as mem:
            assert [(s.phys, s.size) for s in mem.segments] == [
                (0x10000, 2 * PS), (0x20000, PS), (1 << 40, PS)]
            assert mem.ranges == [(0x10000, 0x10000 + 2 * PS), (0x20000, 0x20000 + PS),
                                  (1 << 40, (1 << 40) + PS)]
            assert mem.read(0x10000 + PS - 8, 16) == a[-8:] + b[:8]
            assert mem.read(0x20000, PS) == c and mem.read(1 << 40, PS) == d
            for phys, n in ((0x10000 + 2 * PS, 1), (0x20000 - 1, 2), (0x20000 + PS - 4, 8),
                            (0, 1), (1 << 41, 1)):
                with pytest.raises(PhysMemError):
                    mem.read(phys, n)
            assert mem.contains(0x10000, 2 * PS) and not mem.contains(0x10000, 2 * PS + 1)


def test_elf_adjacent_segments_memsz_and_skipped_headers(tmp_path):
    """Two PT_LOADs back to back (read across them), memsz > filesz (zeros), and headers
    the reader must skip: not PT_LOAD, p_paddr == -1, memsz == 0."""
    a, b = _pattern(PS, 5), _pattern(PS, 6)
    path = str(tmp_path / "adj.elf")
    _elf(path, [(0x100000, a, PS), (0x100000 + PS, b, 3 * PS)],
         extra_phdrs=[(4, 0, 0, 0, 0x900000, 0, 100, 0),            # PT_NOTE
                      (1, 0, 0, 0, (1 << 64) - 1, 0, PS, 0),         # no physical address
                      (1, 0, 0, 0, 0x800000, 0, 0, 0)])              # empty
    with ElfCore(path) as mem:
        assert len(mem.segments) == 2
        assert mem.ranges == [(0x100000, 0x100000 + 4 * PS)]
        assert mem.read(0x100000 + PS - 3, 6) == a[-3:] + b[:3]
        assert mem.read(0x100000 + 2 * PS - 2, 4) == b[-2:] + b"\0\0"
        assert mem.read(0x100000 + 3 * PS, PS) == bytes(PS)
        with pytest.raises(PhysMemError):
            mem.read(0x100000 + 4 * PS - 1, 2)


def test_big_endian_elf(tmp_path):
    path = str(tmp_path / "be.elf")
    _elf(path, [(0x2000, b"hello world!" * 10, 120)], order=">")
    with ElfCore(path) as mem:
        assert mem.read(0x2000, 12) == b"hello world!"


def test_truncated_elf(tmp_path):
    path = str(tmp_path / "t.elf")
    a, b = _pattern(PS, 1), _pattern(PS, 2)
    write_elf_core(path, [(0x1000, a), (0x10000, b)])
    full = os.path.getsize(path)
    # cut in the middle of the second segment: what is there reads, the rest is missing
    os.truncate(path, full - PS // 2)
    with open_memory(path) as mem:
        assert isinstance(mem, ElfCore)
        assert mem.read(0x1000, PS) == a and mem.read(0x10000, PS // 2) == b[:PS // 2]
        with pytest.raises(PhysMemError):
            mem.read(0x10000 + PS // 2 - 1, 2)
    # cut before the second segment's data: only the first remains
    os.truncate(path, full - PS)
    with ElfCore(path) as mem:
        assert mem.ranges == [(0x1000, 0x1000 + PS)]
    # cut inside the program header table / the ELF header
    for size, msg in ((64 + 60, "program header table truncated"), (40, "not an ELF file")):
        os.truncate(path, size)
        with pytest.raises(PhysMemError, match=msg):
            ElfCore(path)
        with pytest.raises(PhysMemError, match=msg):
            open_memory(path)


@pytest.mark.parametrize("kind,msg", [
    ("notelf", "not an ELF file"),
    ("elf32", "only 64-bit"),
    ("badorder", "data encoding"),
    ("phentsize", "unsupported program header table"),
    ("noload", "no PT_LOAD"),
])
def test_bad_elf(tmp_path, kind, msg):
    path = str(tmp_path / "bad")
    if kind == "notelf":
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
    elif kind == "elf32":
        _elf(path, [(0, b"x", 1)], cls=1)
    elif kind == "badorder":
        _elf(path, [(0, b"x", 1)])
        raw = bytearray(open(path, "rb").read())
        raw[5] = 3
        open(path, "wb").write(raw)
    elif kind == "phentsize":
        _elf(path, [(0, b"x", 1)], phentsize=32)
    elif kind == "noload":
        _elf(path, [], extra_phdrs=[(4, 0, 0, 0, 0, 0, 0, 0)])
    with pytest.raises(PhysMemError, match=msg):
        ElfCore(path)


# --- detection -----------------------------------------------------------------------------

def test_open_memory_detection(tmp_path):
    elf = str(tmp_path / "core")
    write_elf_core(elf, [(0x5000, b"E" * PS)])
    raw = str(tmp_path / "raw")
    open(raw, "wb").write(b"R" * PS)
    with open_memory(elf) as m:
        assert isinstance(m, ElfCore) and m.source == "ELF core" and m.read(0x5000, 1) == b"E"
    with open_memory(raw) as m:
        assert isinstance(m, RawImage) and m.source == "raw image" and m.read(0, 1) == b"R"
    with pytest.raises(PhysMemError, match="--memory-base"):
        open_memory(elf, 0x1000)
    empty = str(tmp_path / "empty")
    open(empty, "wb").close()
    with pytest.raises(PhysMemError, match="empty file"):
        open_memory(empty)
    with pytest.raises(PhysMemError, match="No such file"):
        open_memory(str(tmp_path / "missing"))
    with pytest.raises(PhysMemError):
        open_memory(str(tmp_path))                 # a directory


def test_system_ram_ranges(tmp_path):
    iomem = tmp_path / "iomem"
    iomem.write_text("00000000-00000fff : Reserved\n"
                     "00001000-0009fbff : System RAM\n"
                     "  01000000-0220bb07 : Kernel code\n"
                     "00100000-bfffffff : System RAM\n"
                     "100000000-63fffffff : System RAM\n"
                     "00000000-00000000 : System RAM\n")
    assert system_ram_ranges(str(iomem)) == [(0x1000, 0x9fc00), (0x100000, 0xc0000000),
                                             (0x100000000, 0x640000000)]


def test_devmem_reader_over_a_file(tmp_path):
    """DevMem maps each System RAM range at its own offset: any file stands in for /dev/mem."""
    path = tmp_path / "fake-mem"
    data = _pattern(0x6000, 9)
    path.write_bytes(data)
    with DevMem(str(path), ranges=[(0x1000, 0x3000), (0x4000, 0x6000)]) as mem:
        assert mem.source == "/dev/mem"
        assert mem.read(0x1000, 0x2000) == data[0x1000:0x3000]
        assert mem.read(0x5000, 16) == data[0x5000:0x5010]
        with pytest.raises(PhysMemError):
            mem.read(0x3000, 1)
        with pytest.raises(PhysMemError):
            mem.read(0x0, 1)
    with pytest.raises(PhysMemError, match="System RAM"):
        DevMem(str(path), ranges=[])


def _first_ram_probe():
    try:
        ranges = system_ram_ranges()
    except OSError as e:
        pytest.skip(f"/proc/iomem unreadable: {e}")
    if not ranges or ranges[0][0] == 0 and ranges[0][1] == 0:
        pytest.skip("/proc/iomem shows no System RAM addresses (not root?)")
    lo, hi = ranges[-1]
    return lo + 0x1000 if hi - lo > 0x2000 else lo


def test_live_kcore():
    if not os.path.exists("/proc/kcore"):
        pytest.skip("/proc/kcore does not exist on this machine "
                    "(container or no CONFIG_PROC_KCORE)")
    probe = _first_ram_probe()
    try:
        mem = KCore()
        data = mem.read(probe, 64)
    except (OSError, PhysMemError) as e:
        pytest.skip(f"/proc/kcore not readable here: {e}")
    with mem:
        assert len(data) == 64 and mem.source == "/proc/kcore"


def test_live_devmem():
    if not os.path.exists("/dev/mem"):
        pytest.skip("/dev/mem does not exist on this machine")
    probe = _first_ram_probe()
    try:
        mem = DevMem()
        data = mem.read(probe, 64)
    except (OSError, PhysMemError) as e:
        pytest.skip(f"/dev/mem refuses RAM here (CONFIG_STRICT_DEVMEM?): {e}")
    with mem:
        assert len(data) == 64


def test_open_live_memory_reports_both_sources():
    try:
        mem = open_live_memory()
    except PhysMemError as e:
        assert "/dev/mem" in str(e) and "/proc/kcore" in str(e)
    else:
        with mem:
            assert mem.source in ("/dev/mem", "/proc/kcore")


def test_segment_end():
    assert Segment(0x1000, 0x2000, 0, 0).end == 0x3000


def test_fdt_scan_survives_an_unreadable_page_in_its_chunk(tmp_path) -> None:
    """An unreadable page in the same 16 MiB scan chunk as the KHO root FDT must not hide
    the FDT (seen on the real kernel: /dev/mem refused a page inside System RAM and the
    whole chunk was skipped). /dev/mem is absent here, so a raw image refuses one page."""
    from kho_agent.abi.encode.kho import encode_kho_fdt
    from kho_agent.abi.kho import KhoSubtree
    from kho_agent.inspect import find_kho_fdts
    from kho_agent.physmem import PhysMemError, RawImage

    class RefusingImage(RawImage):
        def read(self, phys: int, length: int) -> bytes:
            if phys <= (8 << 20) < phys + length:
                raise PhysMemError(f"physical 0x{phys:x}: refused")
            return super().read(phys, length)

    fdt = encode_kho_fdt("kho-v4", 0x200000, [KhoSubtree("LUO", 0x300000, 32)])
    img = bytearray(16 << 20)
    img[12 << 20:(12 << 20) + len(fdt)] = fdt
    raw = tmp_path / "ram.img"
    raw.write_bytes(bytes(img))
    with RefusingImage(str(raw)) as mem:
        found = find_kho_fdts(mem, 4096)
    assert [c.phys for c in found] == [12 << 20]
    assert found[0].root is not None and found[0].root.memory_map_root == 0x200000


# --- the live sources as a production kernel serves them (issue 12) ----------------------------

IOMEM_X86 = ("00000000-00000fff : Reserved\n"
             "00001000-00003fff : System RAM\n"           # below 1 MiB: strict /dev/mem's zeros
             "00100000-00107fff : System RAM\n")


def test_probe_addr_skips_the_first_mib(tmp_path):
    """x86 STRICT_DEVMEM serves RAM below 1 MiB (as zeros) and refuses the rest: a probe
    of the first RAM page would pass and every real read fail. The probe is above 1 MiB."""
    from kho_agent.physmem import probe_addr
    path = tmp_path / "mem"
    path.write_bytes(bytes(0x108000))
    with DevMem(str(path), ranges=[(0x1000, 0x4000), (0x100000, 0x108000)]) as mem:
        assert probe_addr(mem) == 0x100000
    with DevMem(str(path), ranges=[(0x1000, 0x4000)]) as mem:
        assert probe_addr(mem) == 0x1000              # no RAM above 1 MiB: the first page


def test_open_devmem_refuses_a_source_that_fails_above_1mib(tmp_path):
    """A /dev/mem stand-in that holds only the first MiB (reads beyond it come back short,
    as strict /dev/mem refuses them): open_devmem says it refuses System RAM, and
    open_live_memory falls back to the kcore stand-in, an ELF core as /proc/kcore is."""
    from kho_agent.physmem import open_devmem, open_kcore
    iomem = tmp_path / "iomem"
    iomem.write_text(IOMEM_X86)
    short = tmp_path / "strict-mem"
    short.write_bytes(bytes(0x4000))                  # nothing at 0x100000
    with pytest.raises(PhysMemError, match=r"refuses System RAM \(read at 0x100000"):
        open_devmem(str(short), str(iomem))
    full = tmp_path / "mem"
    full.write_bytes(_pattern(0x108000, 3))
    with open_devmem(str(full), str(iomem)) as mem:
        assert mem.read(0x100000, 8) == _pattern(0x108000, 3)[0x100000:0x100008]
    # kcore: the direct map and the kernel text (inside it) carry p_paddr
    kcore = tmp_path / "kcore"
    ram = _pattern(0x8000, 5)
    _elf(kcore, [(0x1000, bytes(0x3000), 0x3000), (0x100000, ram, 0x8000),
                 (0x102000, ram[0x2000:0x3000], 0x1000)])
    with open_kcore(str(kcore)) as mem:
        assert mem.read(0x102000, 16) == ram[0x2000:0x2010]
    with open_live_memory(str(short), str(kcore), str(iomem)) as mem:
        assert isinstance(mem, KCore) and mem.source == "/proc/kcore"
        assert mem.read(0x100000, 0x8000) == ram
    with pytest.raises(PhysMemError) as ei:
        open_live_memory(str(short), str(tmp_path / "nokcore"), str(iomem))
    assert "refuses System RAM" in str(ei.value) and "nokcore" in str(ei.value)
