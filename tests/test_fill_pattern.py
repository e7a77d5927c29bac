"""fill_pattern (kho_agent.workload) is a stable format: the fast join-of-pieces build must
give exactly the bytes of the page-by-page build it replaced (kept here as the reference),
for every seed, token, size and page size, and fail the same way on bad arguments."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kho_agent.workload import fill_pattern


def reference_pattern(token: int, seed: int, size: int, page_size: int = 4096) -> bytes:
    """fill_pattern as it was before issue 14: a seeded 1 MiB block repeated, each page
    stamped with struct.pack_into('<QQ', token, page index)."""
    block = random.Random(seed).randbytes(1 << 20)
    reps = -(-size // len(block))
    data = bytearray(block * reps)
    del data[size:]
    stamp = struct.Struct("<QQ")
    for i in range(size // page_size):
        stamp.pack_into(data, i * page_size, token, i)
    return bytes(data)


SIZES = st.one_of(st.integers(0, 3 << 20), st.sampled_from([
    0, 1, 15, 16, 4095, 4096, 4097, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 5 << 20,
    (5 << 20) + 4096 + 17]))
TOKENS = st.one_of(st.integers(0, (1 << 64) - 1), st.sampled_from([0, 1, 0x1001,
                                                                   (1 << 64) - 1]))


@settings(max_examples=80, deadline=None)
@given(token=TOKENS, seed=st.integers(-(1 << 70), 1 << 70), size=SIZES,
       page_size=st.sampled_from([4096, 16384, 65536, 16, 24, 512, 1 << 20, 3 << 20]))
def test_identical_to_the_page_by_page_reference(token, seed, size, page_size):
    got = fill_pattern(token, seed, size, page_size)
    assert type(got) is bytes
    assert got == reference_pattern(token, seed, size, page_size)


def test_default_page_size_and_known_stamps():
    data = fill_pattern(0x1001, 7, (3 << 20) + 100)
    assert data == reference_pattern(0x1001, 7, (3 << 20) + 100)
    for i in (0, 1, 255, 256, 767):
        assert struct.unpack_from("<QQ", data, i * 4096) == (0x1001, i)
    # page 256 repeats the block (not the stamp) of page 0
    assert data[256 * 4096 + 16:257 * 4096] == data[16:4096]


@pytest.mark.parametrize("args", [
    (-1, 1, 8192), (1 << 64, 1, 8192),          # tokens that are not u64
    (4, 4, 4096 * 5, 8),                        # stamps overrunning the buffer
    (4, 4, 100, 0),                             # page size 0
])
def test_bad_arguments_fail_as_before(args):
    with pytest.raises(Exception) as want:
        reference_pattern(*args)
    with pytest.raises(want.type) as got:
        fill_pattern(*args)
    assert str(got.value) == str(want.value)
