"""Chunked digests (chunkdigest.py) and the bad-page narrowing (badpages.py) on real memfds.

Every digest is checked against hashlib over the same bytes; the expected bytes of a
created workload against workload.fill_pattern itself; corruptions are real bytes written
into real memfds, and the report must name exactly those pages.
"""

from __future__ import annotations

import hashlib
import os
import random

import pytest

from kho_agent.badpages import (
    MAX_BAD_PAGES,
    expected_range,
    locate,
    page_diff,
    snapshot_ranges,
    unrestored_pfns,
)
from kho_agent.chunkdigest import (
    digest_bytes,
    digest_fd,
    pack_crcs,
    page_crcs,
    unpack_crcs,
)
from kho_agent.workload import fill_pattern, make_memfd

PS = 4096
CH = 64 * 1024          # small chunks: many of them in a small file


def _chunks(data: bytes, ch: int) -> list[str]:
    return [hashlib.sha256(data[o:o + ch]).hexdigest() for o in range(0, len(data), ch)]


@pytest.fixture
def memfd():
    fds: list[int] = []

    def make(data: bytes) -> int:
        fd = make_memfd("test", data)
        fds.append(fd)
        return fd
    yield make
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("size", [0, 1, PS - 1, CH, CH + 1, 5 * CH + 123])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_digests_equal_hashlib(memfd, size, threads):
    data = random.Random(size).randbytes(size)
    fd = memfd(data)
    got = digest_fd(fd, size, chunk_size=CH, threads=threads, whole=True, page_size=PS)
    assert got.chunks == _chunks(data, CH)
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    assert list(got.page_crcs or []) == list(page_crcs(data, PS))
    mem = digest_bytes(data, chunk_size=CH, threads=threads, whole=True, page_size=PS)
    assert (mem.chunks, mem.sha256) == (got.chunks, got.sha256)
    assert list(mem.page_crcs or []) == list(got.page_crcs or [])
    assert os.lseek(fd, 0, os.SEEK_CUR) == 0            # preadv: the offset is untouched


def test_short_file_is_an_oserror(memfd):
    fd = memfd(b"x" * 1000)
    with pytest.raises(OSError):
        digest_fd(fd, 5000, chunk_size=CH, threads=2)


def test_crcs_round_trip():
    crcs = page_crcs(os.urandom(5 * PS + 7), PS)
    assert list(unpack_crcs(pack_crcs(crcs))) == list(crcs)
    with pytest.raises(ValueError):
        unpack_crcs("abc")


@pytest.mark.parametrize("page_size", [4096, 16384, 65536, 1000])
def test_expected_range_is_fill_pattern(page_size):
    size = 3 * (1 << 20) + 5 * page_size + 77        # past the 1 MiB block, a short tail
    whole = fill_pattern(0x1001, 7, size, page_size)
    rng = random.Random(page_size)
    spans = [(0, size), (size - 100, 100), (1 << 20, 2 * page_size), (page_size - 3, 40)]
    spans += [(o, rng.randrange(1, 3 * page_size))
              for o in (rng.randrange(size) for _ in range(20))]
    for off, n in spans:
        assert expected_range(0x1001, 7, size, off, n, page_size) == whole[off:off + n], (off, n)


def test_page_diff():
    a = bytes(range(256)) * 16
    b = bytearray(a)
    b[5] ^= 0x81
    b[300] = 0
    nbytes, nbits, first = page_diff(a, bytes(b))
    assert (nbytes, nbits) == (2, 2 + bin(300 % 256).count("1"))
    assert first.startswith("0x5: 05060708") and " -> 84060708" in first
    assert page_diff(a, a) == (0, 0, "")


def _located(fd, data, before_chunks, **kw):
    size = len(data)
    pfns = [1000 + i for i in range(-(-size // PS))]
    after = digest_fd(fd, size, chunk_size=CH).chunks
    args = dict(token=0x1001, size=size, chunk_size=CH, chunks_before=before_chunks,
                chunks_after=after, pfns_before=pfns, pfns_after=list(pfns), page_size=PS)
    args.update(kw)
    return locate(fd, **args)


def test_locate_created_names_the_page(memfd):
    size = 40 * PS
    data = fill_pattern(0x1001, 3, size, PS)
    chunks = _chunks(data, CH)
    bad = bytearray(data)
    bad[17 * PS + 0x123] ^= 0x10                 # one bit
    bad[30 * PS:31 * PS] = bytes(PS)             # one page zeroed
    fd = memfd(bytes(bad))
    snap = {"page_size": PS, "blocks": [[1000 * PS, 0, 20]]}   # pages 0..19 in the tree
    got = _located(fd, data, chunks, seed=3, snapshot=snap)
    assert got.total == 2 and not got.bad_chunks
    p17, p30 = got.pages
    assert (p17.offset, p17.pfn_before, p17.pfn_after) == (17 * PS, 1017, 1017)
    assert (p17.bytes_differing, p17.bits_differing, p17.in_snapshot) == (1, 1, True)
    assert p17.first_diff_hex.startswith("0x123: ")
    assert p30.offset == 30 * PS and p30.in_snapshot is False
    assert p30.bytes_differing == PS - bytes(data[30 * PS:31 * PS]).count(0)


def test_locate_adopted_by_page_crcs_and_moved_pfns(memfd):
    size = 20 * PS + 100
    data = os.urandom(size)
    bad = bytearray(data)
    bad[size - 1] ^= 1                           # the short last page
    fd = memfd(bytes(bad))
    pfns = [1000 + i for i in range(21)]
    moved = list(pfns)
    moved[4] = 77                                # same bytes, another frame
    after = digest_fd(fd, size, chunk_size=CH).chunks
    got = locate(fd, token=9, size=size, chunk_size=CH, chunks_before=_chunks(data, CH),
                 chunks_after=after, pfns_before=pfns, pfns_after=moved, page_size=PS,
                 page_crcs_before=pack_crcs(page_crcs(data, PS)))
    assert [(p.offset, p.pfn_before, p.pfn_after) for p in got.pages] == \
        [(4 * PS, 1004, 77), (20 * PS, 1020, 1020)]
    assert got.pages[0].bytes_differing == 0
    assert got.pages[1].bytes_differing is None          # no bytes before: crcs only
    # without crcs or a seed: only the chunk is known
    got = locate(fd, token=9, size=size, chunk_size=CH, chunks_before=_chunks(data, CH),
                 chunks_after=after, pfns_before=pfns, pfns_after=pfns, page_size=PS)
    assert got.total == 0 and got.bad_chunks == [(size - 1) // CH * CH]


def test_locate_is_bounded(memfd):
    size = 200 * PS
    data = fill_pattern(5, 5, size, PS)
    fd = memfd(bytes(size))                      # every page wrong
    got = _located(fd, data, _chunks(data, CH), token=5, seed=5)
    assert got.total == 200 and len(got.pages) == MAX_BAD_PAGES
    assert [p.offset for p in got.pages] == [i * PS for i in range(MAX_BAD_PAGES)]


def test_unrestored_pfns_and_ranges():
    log = ("[ 1.0] memfd_luo: Unable to restore folio at physical address: 1234000\n"
           "[ 1.1] other\n")
    assert unrestored_pfns(log, PS) == [0x1234]
    assert snapshot_ranges({"page_size": PS, "blocks": [[0, 1, 2], [4 * PS, 0, 1]]}) == \
        [(0, 5 * PS)]
    assert snapshot_ranges(None) is None
