"""The blobs KHO subtrees point at: block chains, vmalloc chunk lists, memfd_luo_ser,
LUO state (luo_ser, sessions, files, FLBs) and kexec-metadata -- round trips and hostile
inputs (cycles, bad counts, bad pointers, absurd sizes), always bounded, never a crash."""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kho_agent.abi import luo as luo_abi
from kho_agent.abi.block import HEADER, KHO_MAX_BLOCKS, per_block, read_block_chain
from kho_agent.abi.encode import luo as luo_enc
from kho_agent.abi.encode.block import write_block_chain
from kho_agent.abi.encode.memfd import encode_memfd_ser, write_memfd
from kho_agent.abi.encode.metadata import encode_metadata
from kho_agent.abi.encode.vmalloc import write_vmalloc
from kho_agent.abi.memfd import (
    FOLIO_DIRTY,
    FOLIO_UPTODATE,
    MEMFD_SER_SIZE,
    MemfdFolio,
    decode_memfd_ser,
    folio_pfns,
    read_memfd,
)
from kho_agent.abi.memory import MemoryReadError, SparseMemory
from kho_agent.abi.metadata import METADATA, MetadataError, decode_metadata
from kho_agent.abi.vmalloc import VMALLOC_ALLOC, KhoVmalloc, read_vmalloc, read_vmalloc_pages

PS = 4096


def _mem(pages=512, ps=PS):
    return SparseMemory(pages * ps, ps)


def _hdr(mem, pa, nxt, count):
    mem.write(pa, HEADER.pack(nxt, count))


# --- SparseMemory ------------------------------------------------------------------------

def test_sparse_memory_basics():
    m = SparseMemory(16 * PS, PS, base=0x100000)
    assert m.ranges == [(0x100000, 0x100000 + 16 * PS)]
    assert m.read(0x100000 + 10, 5) == bytes(5)
    m.write(0x100000 + PS - 2, b"abcd")            # straddles two pages
    assert m.read(0x100000 + PS - 2, 4) == b"abcd"
    assert sorted(p for p, _ in m.iter_pages()) == [0x100000, 0x100000 + PS]
    for bad in ((0x100000 - 1, 1), (0x100000 + 16 * PS - 1, 2), (0, 1), (0x100000, -1)):
        with pytest.raises(MemoryReadError):
            m.read(*bad)
    with pytest.raises(MemoryReadError):
        m.write(0x100000 + 16 * PS, b"x")
    m.reserve(0x100000 + 14 * PS, 2 * PS)
    a = m.alloc_page()
    assert a == 0x100000 + 13 * PS and m.get_page(a) == bytearray(PS)
    for _ in range(11):
        m.alloc_page()
    with pytest.raises(MemoryError):
        m.alloc_page()
    for args in ((0, PS), (PS + 1, PS), (PS, PS, 5)):
        with pytest.raises(ValueError):
            SparseMemory(*args)


# --- block chains ------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 200), esize=st.sampled_from([8, 64, 80, 100]))
def test_block_chain_roundtrip(n, esize):
    mem = _mem()
    entries = [bytes([i % 251]) * esize for i in range(n)]
    head, blocks = write_block_chain(entries, esize, PS, mem.alloc_page, mem.write)
    cap = per_block(PS, esize)
    assert len(blocks) == -(-n // cap) and (head == 0) == (n == 0)
    chain = read_block_chain(mem.read, head, esize, PS)
    assert chain.complete and chain.entries == entries and chain.blocks == blocks


def test_block_chain_entry_size_checked():
    mem = _mem()
    with pytest.raises(ValueError):
        write_block_chain([b"x" * 7], 8, PS, mem.alloc_page, mem.write)


def _chain(mem, n_blocks, esize=64, per=3):
    pas = [mem.alloc_page() for _ in range(n_blocks)]
    for i, pa in enumerate(pas):
        _hdr(mem, pa, pas[i + 1] if i + 1 < n_blocks else 0, per)
    return pas


@pytest.mark.parametrize("case", ["self", "loop", "count0", "toolarge", "unaligned",
                                  "outside", "maxblocks"])
def test_block_chain_hostile(case):
    mem = _mem()
    pas = _chain(mem, 4)
    cap = per_block(PS, 64)
    kwargs = {}
    if case == "self":
        _hdr(mem, pas[0], pas[0], 3)
    elif case == "loop":
        _hdr(mem, pas[3], pas[1], 3)
    elif case == "count0":
        _hdr(mem, pas[2], pas[3], 0)
    elif case == "toolarge":
        _hdr(mem, pas[2], pas[3], cap + 1)
    elif case == "unaligned":
        _hdr(mem, pas[1], pas[2] + 16, 3)
    elif case == "outside":
        _hdr(mem, pas[1], 1 << 40, 3)
    elif case == "maxblocks":
        kwargs["max_blocks"] = 2
    t = time.monotonic()
    chain = read_block_chain(mem.read, pas[0], 64, PS, what="test", **kwargs)
    assert time.monotonic() - t < 1
    assert not chain.complete and len(chain.errors) == 1
    want = {"self": 1, "loop": 4, "count0": 2, "toolarge": 2, "unaligned": 2,
            "outside": 2, "maxblocks": 2}[case]
    assert len(chain.blocks) == want and len(chain.entries) == 3 * want
    assert chain.errors[0].startswith("test")


def test_block_chain_count_huge_and_garbage():
    mem = _mem()
    pa = mem.alloc_page()
    _hdr(mem, pa, 0, (1 << 64) - 1)
    chain = read_block_chain(mem.read, pa, 64, PS)
    assert not chain.complete and "invalid entry count" in chain.errors[0]
    assert KHO_MAX_BLOCKS == 10000


# --- vmalloc ----------------------------------------------------------------------------

@pytest.mark.parametrize("ps", [4096, 16384, 65536])
@pytest.mark.parametrize("npages_fn", [lambda per: 0, lambda per: 1, lambda per: per - 1,
                                       lambda per: per, lambda per: per + 3],
                         ids=["0", "1", "per-1", "per", "per+3"])
def test_vmalloc_roundtrip(ps, npages_fn):
    per = ps // 8 - 1
    npages = npages_fn(per) if ps == 4096 else min(npages_fn(per), 3)
    mem = SparseMemory((npages + 16) * ps, ps)
    data = bytes((i * 7) % 256 for i in range(npages * ps - (5 if npages else 0)))
    desc, pages = write_vmalloc(data, ps, mem.alloc_page, mem.write)
    assert desc.total_pages == npages and desc.flags == VMALLOC_ALLOC and desc.order == 0
    # a full last chunk is followed by an empty one (kho_preserve_vmalloc)
    assert len(pages) == npages + npages // per + 1
    got = read_vmalloc_pages(mem.read, desc, ps)
    assert got.errors == [] and len(got.phys) == npages
    assert len(got.chunks) == -(-npages // per)
    back, errors = read_vmalloc(mem.read, desc, ps, len(data))
    assert errors == [] and back == data
    assert KhoVmalloc.unpack(desc.pack()) == desc


def test_vmalloc_chunk_cycle_and_errors():
    mem = _mem()
    data_pages = [mem.alloc_page() for _ in range(3)]
    chunk = mem.alloc_page()
    mem.write(chunk, struct.pack("<4Q", chunk, *data_pages))       # next -> itself
    got = read_vmalloc_pages(mem.read, KhoVmalloc(chunk, 1000, 1, 0), PS)
    assert got.phys == data_pages and got.chunks == [chunk]
    assert any("cycle" in e for e in got.errors)
    # two chunks pointing at each other
    c2 = mem.alloc_page()
    mem.write(chunk, struct.pack("<4Q", c2, *data_pages))
    mem.write(c2, struct.pack("<2Q", chunk, data_pages[0]))
    got = read_vmalloc_pages(mem.read, KhoVmalloc(chunk, 1000, 1, 0), PS)
    assert got.chunks == [chunk, c2] and len(got.phys) == 4 and "cycle" in got.errors[0]
    # unaligned chunk, unreadable chunk, page not aligned to the order, short list
    for first, order, total, msg in ((chunk + 8, 0, 3, "not page-aligned"),
                                     (1 << 40, 0, 3, "unreadable"),
                                     (chunk, 1, 6, "not aligned to order 1")):
        if msg.startswith("not aligned"):
            mem.write(chunk, struct.pack("<2Q", 0, PS * 3))
        got = read_vmalloc_pages(mem.read, KhoVmalloc(first, total, 1, order), PS)
        assert msg in got.errors[0]
    mem.write(chunk, struct.pack("<3Q", 0, *data_pages[:2]).ljust(PS, b"\0"))
    got = read_vmalloc_pages(mem.read, KhoVmalloc(chunk, 3, 1, 0), PS)
    assert got.errors == ["vmalloc lists 2 of 3 entries"]
    # a listed data page outside memory
    mem.write(chunk, struct.pack("<2Q", 0, 1 << 40))
    buf, errors = read_vmalloc(mem.read, KhoVmalloc(chunk, 1, 1, 0), PS, 100)
    assert buf == b"" and "unreadable" in errors[0]


def test_vmalloc_absurd_descriptor_is_bounded():
    mem = _mem()
    chunk = mem.alloc_page()
    mem.write(chunk, struct.pack("<2Q", chunk, PS))
    t = time.monotonic()
    got = read_vmalloc_pages(mem.read, KhoVmalloc(chunk, 2**32 - 1, 0xFFFF, 0xFFFF), PS)
    assert time.monotonic() - t < 1 and got.errors


# --- memfd -------------------------------------------------------------------------------

@pytest.mark.parametrize("nfolios", [0, 1, 5, 300])
def test_memfd_roundtrip(nfolios):
    mem = _mem(1024)
    folios = [MemfdFolio(0xFFFFFFFFFFFFF - i, FOLIO_UPTODATE | (FOLIO_DIRTY if i % 2 else 0),
                         nfolios - 1 - i) for i in range(nfolios)]
    size = max(0, nfolios * PS - 3)
    ser_pa, pres = write_memfd(size, folios, PS, mem.alloc_page, mem.write, pos=17, seals=0xF)
    assert pres[0] == (ser_pa, 0) and all(o == 0 for _, o in pres)
    # ser page + folio array pages + chunk pages
    assert len(pres) == 1 + (-(-nfolios * 16 // PS) + 1 if nfolios else 0)
    m = read_memfd(mem.read, ser_pa, PS)
    assert (m.pos, m.size, m.seals, m.flags, m.nr_folios) == (17, size, 0xF, 0, nfolios)
    assert m.errors == [] and m.folios == folios
    assert folio_pfns(m) == [f.pfn for f in sorted(folios, key=lambda f: f.index)]
    j = m.to_json()
    assert j["folios"] == [[f.pfn, f.index, f.flags] for f in folios]


def test_memfd_ser_layout():
    desc = KhoVmalloc(0x1000, 2, 1, 0)
    raw = encode_memfd_ser(1, 2, 3, 4, 5, desc)
    assert len(raw) == MEMFD_SER_SIZE == 48
    assert raw == struct.pack("<QQIIQQIHH", 1, 2, 3, 4, 5, 0x1000, 2, 1, 0)
    m = decode_memfd_ser(raw)
    assert (m.pos, m.size, m.seals, m.flags, m.nr_folios, m.folios_desc) == (1, 2, 3, 4, 5, desc)
    with pytest.raises(ValueError):
        decode_memfd_ser(raw[:47])


@pytest.mark.parametrize("nr", [2**32 + 1, 2**64 - 1, 10_000])
def test_memfd_absurd_nr_folios(nr):
    mem = _mem()
    ser_pa = mem.alloc_page()
    mem.write(ser_pa, encode_memfd_ser(0, 4096, 0, 0, nr, KhoVmalloc(mem.alloc_page(), 1, 1, 0)))
    t = time.monotonic()
    m = read_memfd(mem.read, ser_pa, PS)
    assert time.monotonic() - t < 1
    assert m.folios == [] and "does not fit" in m.errors[0]


def test_memfd_folio_list_short():
    mem = _mem()
    folios = [MemfdFolio(100 + i, FOLIO_UPTODATE, i) for i in range(4)]
    ser_pa, _ = write_memfd(4 * PS, folios, PS, mem.alloc_page, mem.write)
    raw = bytearray(mem.read(ser_pa, MEMFD_SER_SIZE))
    # claim 300 folios in a 2-page array, but the chunk lists only one page
    struct.pack_into("<Q", raw, 24, 300)
    struct.pack_into("<I", raw, 40, 2)
    mem.write(ser_pa, bytes(raw))
    m = read_memfd(mem.read, ser_pa, PS)
    assert m.folios[:4] == folios and len(m.folios) == PS // 16
    assert m.errors == ["vmalloc lists 1 of 2 entries"]


# --- LUO ---------------------------------------------------------------------------------

def test_decode_luo_ser():
    raw = luo_abi.LUO_SER.pack(b"luo-v5", 3, 0x1000, 0x2000)
    st_ = luo_abi.decode_luo_ser(raw)
    assert (st_.compatible, st_.liveupdate_num, st_.sessions_pa, st_.flbs_pa) == (
        "luo-v5", 3, 0x1000, 0x2000)
    with pytest.raises(ValueError, match="luo-v9"):
        luo_abi.decode_luo_ser(luo_abi.LUO_SER.pack(b"luo-v9", 0, 0, 0))
    with pytest.raises(ValueError, match="too small"):
        luo_abi.decode_luo_ser(raw[:31])
    assert luo_abi.LUO_SER.size == 32 and luo_abi.SESSION_SER.size == 80
    assert luo_abi.FILE_SER.size == 64 and luo_abi.FLB_SER.size == 64


def test_decode_luo_ser_names_undecodable_compatible_in_hex():
    """A non-UTF-8 compatible is meant to be shown as hex (decode_luo_ser's `shown`), but
    errors="replace" turns b"\\xff" into U+FFFD, which isprintable() accepts."""
    with pytest.raises(ValueError, match="ff00000000000000"):
        luo_abi.decode_luo_ser(luo_abi.LUO_SER.pack(b"\xff", 0, 0, 0))
    with pytest.raises(ValueError, match="0000000000000000"):
        luo_abi.decode_luo_ser(bytes(32))


def _luo_image(nsessions=2, nfiles=3, ps=PS):
    mem = SparseMemory(2048 * ps, ps)
    sessions = []
    for s in range(nsessions):
        spec = luo_enc.SessionSpec(f"session-{s}")
        for f in range(nfiles):
            folios = [MemfdFolio(10 + f, FOLIO_UPTODATE, 0)]
            ser_pa, _ = write_memfd(ps, folios, ps, mem.alloc_page, mem.write)
            spec.files.append(luo_enc.FileSpec("memfd-v2", 1000 * s + f, ser_pa))
        spec.files.append(luo_enc.FileSpec("other-handler-v1", 99, 0xdead000))
        sessions.append(spec)
    luo_pa, pages = luo_enc.write_luo(sessions, 7, ps, mem.alloc_page, mem.write)
    return mem, luo_pa, sessions


@pytest.mark.parametrize("nsessions,nfiles", [(0, 0), (1, 0), (2, 3), (60, 1), (1, 80)])
def test_luo_roundtrip(nsessions, nfiles):
    mem, luo_pa, sessions = _luo_image(nsessions, nfiles)
    st_ = luo_abi.read_luo(mem.read, luo_pa, 32, PS)
    assert st_.errors == [] and st_.liveupdate_num == 7 and st_.flbs == []
    assert [s.name for s in st_.sessions] == [s.name for s in sessions]
    for got, want in zip(st_.sessions, sessions):
        assert [(f.compatible, f.token, f.data) for f in got.files] == [
            (f.compatible, f.token, f.data) for f in want.files]
        assert got.count == len(want.files)
        for f in got.files:
            if f.compatible == "memfd-v2":
                assert f.memfd is not None and folio_pfns(f.memfd) == [10 + f.token % 1000]
            else:
                assert f.memfd is None
    j = st_.to_json()
    assert j["compatible"] == "luo-v5" and len(j["sessions"]) == nsessions


def test_read_luo_reads_only_struct_luo_ser():
    """luo_core.c checks blob-size >= sizeof(struct luo_ser) and reads just that struct; the
    blob-size comes from an untrusted FDT, so a huge one must not become a huge read."""
    mem, luo_pa, sessions = _luo_image(1, 1)
    asked = []

    def read(phys, n):
        asked.append(n)
        return mem.read(phys, n)

    st_ = luo_abi.read_luo(read, luo_pa, 1 << 40, PS)
    assert st_.errors == [] and len(st_.sessions) == 1
    assert max(asked) <= PS


def test_luo_no_sessions_note_and_flbs():
    mem = _mem()
    luo_pa, flbs_pa = mem.alloc_page(), mem.alloc_page()
    mem.write(luo_pa, luo_abi.LUO_SER.pack(b"luo-v5", 1, 0, flbs_pa))
    mem.write(flbs_pa, luo_abi.FLB_HEADER.pack(1, 2)
              + luo_abi.FLB_SER.pack(b"flb-a", 0x5000, 3) + luo_abi.FLB_SER.pack(b"flb-b", 0, 0))
    st_ = luo_abi.read_luo(mem.read, luo_pa, 32, PS)
    assert st_.errors == [] and any("no sessions" in n for n in st_.notes)
    assert [(f.name, f.data, f.count) for f in st_.flbs] == [("flb-a", 0x5000, 3), ("flb-b", 0, 0)]
    for pgcnt, count in ((0, 1), (1, 1000), (2000, 1)):
        mem.write(flbs_pa, luo_abi.FLB_HEADER.pack(pgcnt, count))
        st_ = luo_abi.read_luo(mem.read, luo_pa, 32, PS)
        assert st_.flbs == [] and "invalid" in st_.errors[0]
    mem.write(luo_pa, luo_abi.LUO_SER.pack(b"luo-v5", 1, 0, 1 << 40))
    assert "unreadable" in luo_abi.read_luo(mem.read, luo_pa, 32, PS).errors[0]


def test_luo_hostile_chains():
    mem, luo_pa, sessions = _luo_image(2, 2)
    st_ = luo_abi.read_luo(mem.read, luo_pa, 32, PS)
    sess_block = st_.sessions_pa
    files_pa = st_.sessions[0].files_pa
    # file count in the session disagrees with the chain
    raw = bytearray(mem.read(sess_block, PS))
    struct.pack_into("<Q", raw, 16 + 72, 5)
    mem.write(sess_block, bytes(raw))
    st_ = luo_abi.read_luo(mem.read, luo_pa, 32, PS)
    assert any("count says 5" in e for e in st_.errors)
    # the session chain loops on itself; a file chain loops too
    _hdr(mem, sess_block, sess_block, 2)
    _hdr(mem, files_pa, files_pa, 3)
    t = time.monotonic()
    st_ = luo_abi.read_luo(mem.read, luo_pa, 32, PS)
    assert time.monotonic() - t < 1
    assert sum("cycle" in e for e in st_.errors) >= 2 and len(st_.sessions) == 2
    # a memfd whose ser is outside memory is an error, not a crash
    raw = bytearray(mem.read(files_pa, PS))
    struct.pack_into("<Q", raw, 16 + 48, 1 << 40)
    mem.write(files_pa, bytes(raw))
    st_ = luo_abi.read_luo(mem.read, luo_pa, 32, PS)
    assert any("memfd token" in e for e in st_.errors)
    # unknown LUO compatible
    mem.write(luo_pa, b"luo-v6\0\0")
    with pytest.raises(ValueError, match="luo-v6"):
        luo_abi.read_luo(mem.read, luo_pa, 32, PS)


# --- kexec-metadata ----------------------------------------------------------------------

def test_metadata_roundtrip_and_layout():
    blob = encode_metadata("7.2.13-kho", 4)
    assert len(blob) == METADATA.size == 73
    assert blob[:4] == b"\1\0\0\0" and blob[4:14] == b"7.2.13-kho" and blob[-4:] == b"\4\0\0\0"
    m = decode_metadata(blob)
    assert (m.version, m.previous_release, m.kexec_count) == (1, "7.2.13-kho", 4)
    assert m.to_json() == {"version": 1, "previous_release": "7.2.13-kho", "kexec_count": 4}
    long = decode_metadata(encode_metadata("x" * 100, 0))
    assert long.previous_release == "x" * 64                   # strscpy: 64 + NUL
    assert decode_metadata(blob + b"extra").kexec_count == 4


@pytest.mark.parametrize("blob,msg", [
    (b"", "too small"),
    (b"\1\0\0", "too small"),
    (struct.pack("<I", 2) + bytes(69), "version 2"),
    (struct.pack("<I", 0) + bytes(69), "version 0"),
    (encode_metadata("r", 1)[:72], "too small for v1"),
    (struct.pack("<I", 1), "too small for v1"),
])
def test_metadata_errors(blob, msg):
    with pytest.raises(MetadataError, match=msg):
        decode_metadata(blob)
    assert issubclass(MetadataError, ValueError)
