"""The KHO preserved-memory radix tree (kho_agent.abi.radix, versions): hand-computed keys
and geometry, builder -> walker round trips for every page size and ABI version, and a
walker that survives hostile trees (cycles, shared nodes, bad pointers, garbage pages)."""

from __future__ import annotations

import random
import struct
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kho_agent.abi.encode.radix import RadixBuilder, coalesce, encode_key, split_pages
from kho_agent.abi.memory import MemoryReadError, SparseMemory
from kho_agent.abi.radix import RadixWalk, decode_key, geometry, walk_radix
from kho_agent.abi.versions import KHO_VERSIONS, PAGE_SIZES, UnsupportedAbi, kho_abi, page_shift

COMBOS = [(ps, c) for ps in PAGE_SIZES for c in KHO_VERSIONS]
COMBO_IDS = [f"{ps // 1024}K-{c}" for ps, c in COMBOS]
# combinations whose tree holds order-0 keys (all but kho-v2/v3 on 16 KiB pages)
FULL_COMBOS = [c for c in COMBOS if geometry(*c).min_order == 0]
FULL_IDS = [i for c, i in zip(COMBOS, COMBO_IDS) if geometry(*c).min_order == 0]
FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- hand-computed vectors -------------------------------------------------------------

@pytest.mark.parametrize("page_size,compat,depth", [
    (4096, "kho-v2", 6), (4096, "kho-v3", 6), (4096, "kho-v4", 6),
    (16384, "kho-v2", 4), (16384, "kho-v3", 4), (16384, "kho-v4", 5),
    (65536, "kho-v2", 4), (65536, "kho-v3", 4), (65536, "kho-v4", 4),
])
def test_depth_table(page_size, compat, depth):
    g = geometry(page_size, compat)
    assert g.depth == depth
    shift = {4096: 12, 16384: 14, 65536: 16}[page_size]
    assert (g.page_shift, g.order0, g.table_log2, g.bitmap_log2) == (
        shift, 64 - shift, shift - 3, shift + 3)
    # kho-v2/v3 on 16 KiB pages is the one combination that cannot hold order-0 keys
    assert g.min_order == (1 if (page_size, compat) in
                           ((16384, "kho-v2"), (16384, "kho-v3")) else 0)


@pytest.mark.parametrize("page_size,pa,order,key", [
    (4096, 0x1000, 0, (1 << 52) | 1),
    (4096, 0x0, 0, 1 << 52),
    (4096, 0x40000000, 0, (1 << 52) | 0x40000),
    (4096, 0x200000, 9, (1 << 43) | 1),
    (4096, 0x2000, 1, (1 << 51) | 1),
    (4096, (1 << 64) - 4096, 0, (1 << 53) - 1),
    (16384, 0x4000, 0, (1 << 50) | 1),
    (16384, 0x8000, 1, (1 << 49) | 1),
    (16384, 0x40000000, 0, (1 << 50) | 0x10000),
    (65536, 0x10000, 0, (1 << 48) | 1),
    (65536, 0x20000, 1, (1 << 47) | 1),
    (65536, 0x80000, 3, (1 << 45) | 1),
    (65536, 0x20000000, 13, (1 << 35) | 1),
])
def test_key_vectors(page_size, pa, order, key):
    g = geometry(page_size, "kho-v4")
    assert encode_key(g, pa, order) == key
    assert decode_key(g, key) == (pa, order)


def test_key_indices_4k():
    """(1<<52)|1 on 4 KiB pages: bit 1 of a leaf, slot 0 at levels 1-4, slot 2 at the root."""
    g = geometry(4096, "kho-v4")
    key = encode_key(g, 0x1000, 0)
    assert key & ((1 << g.bitmap_log2) - 1) == 1
    assert [(key >> g.shift(lv)) & 511 for lv in range(1, g.depth)] == [0, 0, 0, 0, 2]
    mem = SparseMemory(1 << 24)
    b = RadixBuilder(g, mem.alloc_page)
    b.add(0x1000, 0)
    assert len(b.nodes) == g.depth
    node = b.root
    for lv in range(g.depth - 1, 0, -1):
        slots = struct.unpack("<512Q", b.nodes[node])
        idx = 2 if lv == g.depth - 1 else 0
        assert [i for i, s in enumerate(slots) if s] == [idx]
        node = slots[idx]
    assert b.nodes[node][0] == 0b10 and not any(b.nodes[node][1:])


@pytest.mark.parametrize("compat", ["kho-v2", "kho-v3"])
def test_v2_v3_16k_cannot_encode_order0(compat):
    g = geometry(16384, compat)
    with pytest.raises(ValueError, match="order-0"):
        encode_key(g, 0x4000, 0)
    assert encode_key(g, 0x8000, 1) == (1 << 49) | 1
    b = RadixBuilder(g, SparseMemory(1 << 24, 16384).alloc_page)
    with pytest.raises(ValueError):
        b.add(0x4000, 0)


def test_encode_decode_rejects_bad_input():
    g = geometry(4096)
    for pa, order in ((0x1800, 0), (0x1000, 1), (-4096, 0), (1 << 64, 0)):
        with pytest.raises(ValueError):
            encode_key(g, pa, order)
    for order in (-1, 53):
        with pytest.raises(ValueError):
            encode_key(g, 0, order)
    for key in (0, -1, 1 << 53):
        with pytest.raises(ValueError):
            decode_key(g, key)
    assert decode_key(g, 1) == (0, 52)      # the largest order: one 2^64-byte block


def test_unsupported_abi_and_page_size():
    with pytest.raises(UnsupportedAbi, match="kho-v9"):
        geometry(4096, "kho-v9")
    with pytest.raises(UnsupportedAbi, match="kho-v9"):
        kho_abi("kho-v9")
    with pytest.raises(UnsupportedAbi, match="8192"):
        geometry(8192, "kho-v4")
    with pytest.raises(UnsupportedAbi, match="8192"):
        page_shift(8192)
    assert issubclass(UnsupportedAbi, ValueError)
    assert [page_shift(p) for p in PAGE_SIZES] == [12, 14, 16]
    assert kho_abi("kho-v3").blob_size and not kho_abi("kho-v2").blob_size


def test_split_pages_and_coalesce():
    assert list(split_pages(0, 8)) == [(0, 3)]
    assert list(split_pages(3, 6)) == [(3, 0), (4, 2), (8, 0)]
    assert list(split_pages(1, 0)) == []
    assert coalesce([(0x3000, 0), (0x1000, 0), (0x2000, 0), (0x8000, 3), (0x0, 3)], 4096) == [
        [0x0, 3, 2], [0x1000, 0, 3]]


# --- builder -> walker round trips -------------------------------------------------------

@st.composite
def block_sets(draw, g):
    """Sets of valid (pa, order) blocks: a few clusters anywhere in the 64-bit space plus
    stray blocks of any order (incl. the highest, which live in leaf 0)."""
    pfn_bits = 64 - g.page_shift
    orders = draw(st.lists(st.one_of(st.integers(g.min_order, g.min_order + 12),
                                     st.integers(g.min_order, g.order0)),
                           min_size=1, max_size=3))
    clusters = draw(st.lists(st.one_of(st.integers(0, (1 << pfn_bits) - 1),
                                       st.integers(0, 1 << 20)), min_size=1, max_size=3))
    out = set()
    for _ in range(draw(st.integers(0, 30))):
        order = draw(st.sampled_from(orders))
        base = draw(st.sampled_from(clusters))
        pfn = base + draw(st.integers(0, 3000)) * draw(st.sampled_from([1, 1 << order]))
        pfn = (pfn >> order << order) & ((1 << pfn_bits) - 1)
        out.add((pfn << g.page_shift, order))
    return out


def _build(g, blocks):
    mem = SparseMemory(1 << 40, g.page_size)
    b = RadixBuilder(g, mem.alloc_page)
    for pa, order in blocks:
        b.add(pa, order)
    b.write_to(mem.write)
    return mem, b


def _check_walk(w, g, blocks, builder):
    assert w.errors == [] and w.intact
    want = coalesce(blocks, g.page_size)
    assert sorted(w.blocks) == sorted(want)
    assert w.blocks == want            # both in key order: higher orders first, then by pa
    assert w.pages_by_order == dict(Counter(o for _, o in blocks))
    assert w.preserved_bytes == sum(g.page_size << o for _, o in blocks)
    assert w.nodes == len(builder.nodes) == len(set(w.node_pages))
    assert set(w.node_pages) == set(builder.nodes) and w.node_pages[0] == builder.root


@pytest.mark.parametrize("page_size,compat", COMBOS, ids=COMBO_IDS)
@FAST
@given(data=st.data())
def test_roundtrip_random_blocks(page_size, compat, data):
    g = geometry(page_size, compat)
    blocks = data.draw(block_sets(g))
    mem, b = _build(g, blocks)
    for pa, order in blocks:
        assert decode_key(g, encode_key(g, pa, order)) == (pa, order)
    w = walk_radix(mem.read, b.root, g)
    _check_walk(w, g, blocks, b)
    j = w.to_json()
    assert j["intact"] and j["blocks"] == want_json(blocks, g)
    assert j["pages_by_order"] == {str(o): n for o, n in sorted(w.pages_by_order.items())}
    # removing every block leaves an intact, empty tree (nodes are never freed)
    for pa, order in blocks:
        b.remove(pa, order)
    b.write_to(mem.write)
    w2 = walk_radix(mem.read, b.root, g)
    assert w2.intact and w2.blocks == [] and w2.preserved_bytes == 0
    assert w2.nodes == len(b.nodes)


def want_json(blocks, g):
    return [list(x) for x in coalesce(blocks, g.page_size)]


@pytest.mark.parametrize("page_size,compat", COMBOS, ids=COMBO_IDS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_add_run_matches_add(page_size, compat, data):
    g = geometry(page_size, compat)
    order = data.draw(st.integers(g.min_order, g.min_order + 6), label="order")
    bits = 1 << g.bitmap_log2
    # start just below a leaf boundary so runs cross into the next leaf
    leaf = data.draw(st.integers(1, 1 << 20), label="leaf")
    start_key_off = data.draw(st.integers(0, 80), label="before boundary")
    count = data.draw(st.integers(1, 200), label="count")
    pfn = ((leaf * bits - start_key_off) << order) & ((1 << (64 - g.page_shift)) - 1)
    pfn = pfn >> order << order
    pa = pfn << g.page_shift
    size = g.page_size << order
    if pa + count * size > 1 << 64:
        count = ((1 << 64) - pa) // size
    m1 = SparseMemory(1 << 40, page_size)
    m2 = SparseMemory(1 << 40, page_size)
    b1 = RadixBuilder(g, m1.alloc_page)
    b2 = RadixBuilder(g, m2.alloc_page)
    b1.add_run(pa, order, count)
    for i in range(count):
        b2.add(pa + i * size, order)
    assert {p: bytes(v) for p, v in b1.nodes.items()} == {p: bytes(v) for p, v in b2.nodes.items()}
    b1.write_to(m1.write)
    w = walk_radix(m1.read, b1.root, g)
    assert w.intact and w.blocks == ([[pa, order, count]] if count else [])


@pytest.mark.parametrize("page_size,compat", FULL_COMBOS, ids=FULL_IDS)
@settings(max_examples=40, deadline=None)
@given(pfn=st.integers(0, 1 << 30), nr=st.integers(0, 3000))
def test_add_pages_matches_split_and_covers_range(page_size, compat, pfn, nr):
    g = geometry(page_size, compat)
    m1 = SparseMemory(1 << 40, page_size)
    m2 = SparseMemory(1 << 40, page_size)
    b1 = RadixBuilder(g, m1.alloc_page)
    b2 = RadixBuilder(g, m2.alloc_page)
    b1.add_pages(pfn, nr)
    ref = []
    p = pfn
    while p < pfn + nr:                       # greedy: largest aligned block that fits
        o = 0
        while p % (1 << (o + 1)) == 0 and p + (1 << (o + 1)) <= pfn + nr:
            o += 1
        ref.append((p, o))
        p += 1 << o
    assert list(split_pages(pfn, nr)) == ref
    for p, o in ref:
        b2.add(p << g.page_shift, o)
    assert {k: bytes(v) for k, v in b1.nodes.items()} == {k: bytes(v) for k, v in b2.nodes.items()}
    b1.write_to(m1.write)
    w = walk_radix(m1.read, b1.root, g)
    assert w.intact
    assert w.ranges() == ([(pfn * page_size, (pfn + nr) * page_size)] if nr else [])
    assert w.preserved_bytes == nr * page_size


def test_in_ram_filter_reports_blocks_outside_ram():
    g = geometry(4096)
    blocks = {(0x1000, 0), (0x2000, 0), (0x100000, 4), (0, g.order0 - 1)}
    mem, b = _build(g, blocks)
    w = walk_radix(mem.read, b.root, g, in_ram=lambda pa, n: pa + n <= 0x3000)
    assert not w.intact and len(w.errors) == 2
    assert w.blocks == [[0x1000, 0, 2]]


# --- hostile trees -----------------------------------------------------------------------

def _tree(page_size=4096, compat="kho-v4", size=1 << 26):
    """A small valid tree in a bounded memory: three clusters, leaf-0 high-order blocks."""
    g = geometry(page_size, compat)
    mem = SparseMemory(size, page_size)
    b = RadixBuilder(g, mem.alloc_page)
    ps = page_size
    blocks = {(ps * 3, 0), (ps * 4, 0), (ps * 64, 1), (ps * 256, 3), ((1 << 40), 2)}
    if g.min_order:
        blocks = {(pa, max(o, 1)) for pa, o in blocks if pa % (ps << max(o, 1)) == 0}
    for pa, o in blocks:
        b.add(pa, o)
    b.write_to(mem.write)
    return g, mem, b, blocks


def _slot(mem, node, idx, value):
    mem.write(node + idx * 8, struct.pack("<Q", value))


def _path(g, b, key):
    """Node addresses from the root down to the leaf of `key` (root first)."""
    out = [b.root]
    node = b.root
    for lv in range(g.depth - 1, 0, -1):
        idx = (key >> g.shift(lv)) & ((1 << g.table_log2) - 1)
        node = int.from_bytes(b.nodes[node][idx * 8:idx * 8 + 8], "little")
        out.append(node)
    return out


def _assert_sane(w, mem):
    assert not w.intact and w.errors
    assert len(w.node_pages) == len(set(w.node_pages)) == w.nodes
    assert w.nodes <= mem.size // mem.page_size


@pytest.mark.parametrize("page_size,compat", COMBOS, ids=COMBO_IDS)
def test_cycle_to_root_and_ancestor(page_size, compat):
    g, mem, b, blocks = _tree(page_size, compat)
    pa, o = min(blocks)
    path = _path(g, b, encode_key(g, pa, o))
    good = walk_radix(mem.read, b.root, g)
    assert good.intact
    # the lowest intermediate node points back at the root, and a mid node at its parent
    _slot(mem, path[-2], 7, b.root)
    if len(path) > 3:
        _slot(mem, path[2], 5, path[1])
    w = walk_radix(mem.read, b.root, g)
    _assert_sane(w, mem)
    assert any("already visited" in e for e in w.errors)
    assert w.nodes == good.nodes
    assert sorted(w.blocks) == sorted(good.blocks)     # the real blocks are still found


def test_shared_node():
    g, mem, b, blocks = _tree()
    path = _path(g, b, encode_key(g, 3 * 4096, 0))
    _slot(mem, path[-2], 100, path[-1])            # the same leaf under two slots
    _slot(mem, b.root, 3, path[1])                 # the same subtree under two root slots
    w = walk_radix(mem.read, b.root, g)
    _assert_sane(w, mem)
    assert sum("already visited" in e for e in w.errors) == 2
    assert sorted(w.blocks) == sorted(coalesce(blocks, 4096))


@pytest.mark.parametrize("bad,what", [
    (0x5008, "not page-aligned"),
    (1 << 50, "unreadable"),
    ((1 << 64) - 4096, "unreadable"),
])
def test_bad_pointers(bad, what):
    g, mem, b, blocks = _tree()
    path = _path(g, b, encode_key(g, 3 * 4096, 0))
    _slot(mem, path[2], 9, bad)
    w = walk_radix(mem.read, b.root, g)
    _assert_sane(w, mem)
    assert any(what in e for e in w.errors)
    assert sorted(w.blocks) == sorted(coalesce(blocks, 4096))


def test_root_pointer_outside_memory_or_misaligned():
    g = geometry(4096)
    mem = SparseMemory(1 << 20)
    for root in (1 << 30, 0x123):
        w = walk_radix(mem.read, root, g)
        assert not w.intact and w.nodes == 0 and w.blocks == []


@pytest.mark.parametrize("page_size,compat", FULL_COMBOS, ids=FULL_IDS)
def test_top_level_slot_beyond_key_space(page_size, compat):
    g, mem, b, blocks = _tree(page_size, compat)
    key_bits = min(g.order0 + 1, g.key_bits)
    first_bad = 1 << (key_bits - g.shift(g.depth - 1))
    assert first_bad < page_size // 8
    # hang a copy of a real subtree under the first slot past the key space
    path = _path(g, b, encode_key(g, 3 * page_size, 0))
    _slot(mem, b.root, first_bad, path[1])
    w = walk_radix(mem.read, b.root, g)
    _assert_sane(w, mem)
    assert any("past the key space" in e for e in w.errors)
    assert sorted(w.blocks) == sorted(coalesce(blocks, page_size))


def test_16k_v3_has_no_slot_beyond_key_space():
    g = geometry(16384, "kho-v3")
    assert 1 << (min(g.order0 + 1, g.key_bits) - g.shift(g.depth - 1)) >= 16384 // 8


def test_leaf0_bit0():
    g = geometry(4096)
    mem = SparseMemory(1 << 24)
    b = RadixBuilder(g, mem.alloc_page)
    b.add(0, g.order0 - 1)                  # key 2: lives in leaf 0
    b.write_to(mem.write)
    leaf = _path(g, b, 2)[-1]
    mem.write(leaf, bytes([0b111]))         # key 0 (invalid), key 1 (order 52), key 2
    w = walk_radix(mem.read, b.root, g)
    assert not w.intact and any("bit 0" in e for e in w.errors)
    assert sorted(w.blocks) == sorted([[0, g.order0, 1], [0, g.order0 - 1, 1]])


def test_max_nodes_bound():
    g, mem, b, blocks = _tree()
    w = walk_radix(mem.read, b.root, g, max_nodes=2)
    assert not w.intact and w.nodes == 2
    assert any("walk stopped" in e for e in w.errors)


def test_error_cap_and_suppressed_count():
    g = geometry(4096)
    mem = SparseMemory(1 << 24)
    root = mem.alloc_page()
    mem.write(root, struct.pack("<4Q", 1, 2, 3, 5) + struct.pack("<500Q", *range(9, 4509, 9)))
    w = walk_radix(mem.read, root, g)
    assert not w.intact
    assert len(w.errors) == 64 and w.suppressed_errors > 0
    assert w.to_json()["errors"][-1].startswith("... and ")


def test_reader_short_read_and_foreign_errors():
    g = geometry(4096)

    def short(phys, n):
        return b"\0" * (n - 1)

    w = walk_radix(short, 0, g)
    assert not w.intact and "short read" in w.errors[0]

    def missing(phys, n):
        raise MemoryReadError("nope")

    assert not walk_radix(missing, 0, g).intact


_U64 = st.one_of(st.just(0), st.integers(0, (1 << 64) - 1), st.integers(0, 40))


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fuzzed_node_pages(page_size, data):
    """Random pages whose u64s point at each other (cycles, sharing, misalignment), at
    nothing, or are garbage: the walk ends, never raises, visits each page at most once."""
    compat = data.draw(st.sampled_from(sorted(KHO_VERSIONS)))
    g = geometry(page_size, compat)
    npages = 12
    mem = SparseMemory(npages * page_size, page_size)
    addrs = [i * page_size for i in range(npages)]
    ptr = st.one_of(st.sampled_from(addrs), st.sampled_from(addrs).map(lambda a: a + 8), _U64)
    slots = page_size // 8
    for a in addrs:
        kind = data.draw(st.sampled_from(["pointers", "garbage", "zero", "ones"]))
        if kind == "pointers":
            vals = data.draw(st.dictionaries(st.integers(0, slots - 1), ptr, max_size=8))
            for idx, v in vals.items():
                mem.write(a + idx * 8, struct.pack("<Q", v))
        elif kind == "garbage":
            seed = data.draw(st.integers(0, 2 ** 32))
            mem.write(a, random.Random(seed).randbytes(page_size))
        elif kind == "ones":
            mem.write(a, b"\xff" * page_size)
    root = data.draw(st.one_of(st.sampled_from(addrs), _U64))
    w = walk_radix(mem.read, root, g, in_ram=lambda pa, n: pa + n <= npages * page_size)
    assert len(w.node_pages) == len(set(w.node_pages)) == w.nodes <= npages
    assert w.intact == (not w.errors and not w.suppressed_errors)
    assert w.preserved_bytes == sum(c * (page_size << o) for _, o, c in w.blocks)
    assert sum(w.pages_by_order.values()) == sum(c for _, _, c in w.blocks)
    w.to_json()


# --- the word-wise walker against a straightforward, bit-by-bit reference -----------------

def _reference_walk(read, root, g, in_ram=None, max_nodes=1 << 20):
    """The walker's specification, written plainly: nodes in key order, every leaf bit
    looked at one by one, runs of set bits found bit by bit, blocks coalesced as found.
    Same errors and bounds as walk_radix (the fast walker must match it exactly)."""
    w = RadixWalk(root=root, geometry=g)
    ps = g.page_size
    key_bits = min(g.order0 + 1, g.key_bits)

    def emit(pa, order, n):
        w.pages_by_order[order] = w.pages_by_order.get(order, 0) + n
        w.preserved_bytes += n * (ps << order)
        if w.blocks and w.blocks[-1][1] == order and \
                w.blocks[-1][0] + w.blocks[-1][2] * (ps << order) == pa:
            w.blocks[-1][2] += n
        else:
            w.blocks.append([pa, order, n])

    visited = set()
    stack = [(root, g.depth - 1, 0, "root")]
    while stack:
        phys, level, prefix, origin = stack.pop()
        what = f"level-{level} node 0x{phys:x} ({origin})"
        if phys % ps:
            w.error(f"{what}: pointer not page-aligned")
            continue
        if phys in visited:
            w.error(f"{what}: page already visited (cycle or shared node)")
            continue
        if w.nodes >= max_nodes:
            w.error(f"{what}: more than {max_nodes} node pages, walk stopped")
            break
        visited.add(phys)
        try:
            page = read(phys, ps)
        except MemoryReadError as e:
            w.error(f"{what}: unreadable ({e})")
            continue
        if len(page) != ps:
            w.error(f"{what}: short read ({len(page)} bytes)")
            continue
        w.nodes += 1
        w.node_pages.append(phys)
        if level:
            children = []
            for idx in range(ps // 8):
                child = int.from_bytes(page[idx * 8:idx * 8 + 8], "little")
                if not child:
                    continue
                key = prefix | (idx << g.shift(level))
                if key >> key_bits:
                    w.error(f"{what}: slot {idx} points past the key space "
                            f"(depth {g.depth} for {g.compatible})")
                    continue
                children.append((child, level - 1, key, f"slot {idx} of 0x{phys:x}"))
            stack.extend(reversed(children))
            continue
        runs = _bit_runs(page)
        if not prefix:
            for bit, n in runs:
                for key in range(bit, bit + n):
                    if key == 0:
                        w.error("leaf 0: bit 0 set, a key without an order bit")
                        continue
                    pa, order = decode_key(g, key)
                    if in_ram is not None and not in_ram(pa, ps << order):
                        w.error(f"block 0x{pa:x} order {order} outside RAM")
                        continue
                    emit(pa, order, 1)
            continue
        order = g.order0 - (prefix.bit_length() - 1)
        ss = g.page_shift + order
        base = (prefix << ss) & ((1 << 64) - 1)
        if runs and in_ram is not None:
            lo, hi = runs[0][0], runs[-1][0] + runs[-1][1]
            if not in_ram(base + (lo << ss), (hi - lo) << ss):
                good = []
                for bit, n in runs:
                    if in_ram(base + (bit << ss), n << ss):
                        good.append([bit, n])
                    else:
                        w.error(f"leaf at key 0x{prefix:x}: blocks 0x{base + (bit << ss):x} "
                                f"(order {order}, {n}) outside RAM")
                runs = good
        for bit, n in runs:
            emit(base + (bit << ss), order, n)
    return w


def _bit_runs(page):
    """[first bit, nbits] of each run of set bits of a little-endian bitmap, bit by bit."""
    runs = []
    for bit, c in enumerate(format(int.from_bytes(page, "little"), "b")[::-1]):
        if c == "1":
            if runs and runs[-1][0] + runs[-1][1] == bit:
                runs[-1][1] += 1
            else:
                runs.append([bit, 1])
    return runs


def _same_walk(a, b):
    assert a.to_json() == b.to_json()
    assert (a.node_pages, a.suppressed_errors, a.errors) == (b.node_pages, b.suppressed_errors,
                                                             b.errors)


@st.composite
def leaf_bitmaps(draw, nbytes):
    """Leaf bitmaps of every shape the word-wise decoder distinguishes: empty, all ones,
    a few bits, one bit per word (isolated pages), several bits per word, runs crossing
    word boundaries, full words, random words, alternating bits."""
    nwords = nbytes // 8
    v = 0
    kind = draw(st.sampled_from(["few", "one-per-word", "isolated", "runs", "words", "mixed"]))
    if kind == "few":
        for b in draw(st.lists(st.integers(0, nbytes * 8 - 1), max_size=70)):
            v |= 1 << b
    elif kind == "one-per-word":
        step = draw(st.sampled_from([1, 2, 7, 64]))
        rng = random.Random(draw(st.integers(0, 1 << 32)))
        for j in range(0, nwords, step):
            v |= 1 << (64 * j + rng.randrange(64))
    elif kind == "isolated":                    # random, no two bits adjacent
        rng = random.Random(draw(st.integers(0, 1 << 32)))
        even = range(0, nbytes * 8, 2)
        for b in rng.sample(even, len(even) // draw(st.sampled_from([2, 5, 64, 300]))):
            v |= 1 << b
    elif kind == "runs":
        for start, n in draw(st.lists(st.tuples(st.integers(0, nbytes * 8 - 1),
                                                st.integers(1, 300)), max_size=40)):
            v |= ((1 << n) - 1) << start
    elif kind == "words":
        for j, x in draw(st.dictionaries(st.integers(0, nwords - 1),
                                         st.sampled_from([1, 3, 0x5555555555555555,
                                                          (1 << 64) - 1, 1 << 63, 0x8001]),
                                         max_size=80)).items():
            v |= x << (64 * j)
    else:
        v = int.from_bytes(random.Random(draw(st.integers(0, 1 << 32))).randbytes(nbytes),
                           "little")
        v &= int.from_bytes(random.Random(draw(st.integers(0, 1 << 32))).randbytes(nbytes),
                            "little") if draw(st.booleans()) else -1
    v &= (1 << (nbytes * 8)) - 1
    page = v.to_bytes(nbytes, "little")
    return draw(st.sampled_from([page, bytes(nbytes), b"\xff" * nbytes])) \
        if draw(st.integers(0, 9)) == 0 else page


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_leaf_blocks_word_wise_equals_bit_by_bit(page_size, data):
    from kho_agent.abi.radix import _leaf_blocks
    page = data.draw(leaf_bitmaps(page_size))
    shift = data.draw(st.sampled_from([0, 12, 16, 40]))
    base = data.draw(st.sampled_from([0, 1 << 40, (1 << 64) - (1 << 63)]))
    want = [[base + (bit << shift), 5, n] for bit, n in _bit_runs(page)]
    got, total = _leaf_blocks(page, base, shift, 5)
    assert got == want and total == sum(n for _, _, n in want)


@pytest.mark.parametrize("page_size,compat", COMBOS, ids=COMBO_IDS)
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_walk_equals_reference_on_built_trees(page_size, compat, data):
    """Trees of every order: scattered blocks, isolated pages (one in k), dense runs that
    cross leaves; with and without an in_ram that cuts through them."""
    g = geometry(page_size, compat)
    blocks = data.draw(block_sets(g))
    mem, b = _build(g, blocks)
    order = data.draw(st.integers(g.min_order, min(g.order0, g.min_order + 10)))
    size = page_size << order
    start = data.draw(st.integers(0, 1 << 20)) * size
    run = data.draw(st.integers(0, 500))          # a dense run, crossing leaves
    every = data.draw(st.sampled_from([1, 2, 3, 64, 65]))
    count = data.draw(st.integers(0, 3000))       # then isolated blocks, one in `every`
    if start + (run + 1 + count * every) * size <= 1 << 64:
        b.add_run(start, order, run)
        for i in range(count):
            b.add(start + (run + 1 + i * every) * size, order)
    b.write_to(mem.write)
    _same_walk(walk_radix(mem.read, b.root, g), _reference_walk(mem.read, b.root, g))
    limit = data.draw(st.integers(0, 1 << 64))

    def in_ram(pa, n):
        return pa + n <= limit

    _same_walk(walk_radix(mem.read, b.root, g, in_ram=in_ram),
               _reference_walk(mem.read, b.root, g, in_ram=in_ram))


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_walk_equals_reference_on_garbage_leaves(page_size, data):
    """Valid paths ending in leaves of arbitrary bits (and leaf 0): identical blocks,
    errors and order."""
    compat = data.draw(st.sampled_from(sorted(KHO_VERSIONS)))
    g = geometry(page_size, compat)
    mem = SparseMemory(1 << 40, page_size)
    b = RadixBuilder(g, mem.alloc_page)
    orders = data.draw(st.lists(st.integers(g.min_order, g.order0), min_size=1, max_size=4))
    for o in orders:
        b.add(data.draw(st.integers(0, (1 << (64 - g.page_shift - o)) - 1)) << (g.page_shift + o),
              o)
    b.add(0, g.order0)                        # key 1: makes leaf 0 exist
    b.write_to(mem.write)
    for leaf in _leaves(g, b):
        if data.draw(st.booleans()):
            mem.write(leaf, data.draw(leaf_bitmaps(page_size)))
    limit = data.draw(st.one_of(st.none(), st.integers(0, 1 << 64)))
    in_ram = None if limit is None else (lambda pa, n: pa + n <= limit)
    _same_walk(walk_radix(mem.read, b.root, g, in_ram=in_ram),
               _reference_walk(mem.read, b.root, g, in_ram=in_ram))


def _leaves(g, b):
    """Addresses of the builder's leaf pages (level 0)."""
    out, todo = [], [(b.root, g.depth - 1)]
    while todo:
        node, level = todo.pop()
        if level == 0:
            out.append(node)
            continue
        for child in struct.unpack(f"<{g.page_size // 8}Q", b.nodes[node]):
            if child:
                todo.append((child, level - 1))
    return sorted(out)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_walk_equals_reference_on_fuzzed_pages(page_size, data):
    """The hostile pages of test_fuzzed_node_pages: same errors, same order, same bounds."""
    compat = data.draw(st.sampled_from(sorted(KHO_VERSIONS)))
    g = geometry(page_size, compat)
    npages = 12
    mem = SparseMemory(npages * page_size, page_size)
    addrs = [i * page_size for i in range(npages)]
    ptr = st.one_of(st.sampled_from(addrs), st.sampled_from(addrs).map(lambda a: a + 8), _U64)
    for a in addrs:
        kind = data.draw(st.sampled_from(["pointers", "garbage", "zero", "ones", "bits"]))
        if kind == "pointers":
            for idx, v in data.draw(st.dictionaries(st.integers(0, page_size // 8 - 1), ptr,
                                                    max_size=8)).items():
                mem.write(a + idx * 8, struct.pack("<Q", v))
        elif kind == "garbage":
            mem.write(a, random.Random(data.draw(st.integers(0, 2 ** 32))).randbytes(page_size))
        elif kind == "ones":
            mem.write(a, b"\xff" * page_size)
        elif kind == "bits":
            mem.write(a, data.draw(leaf_bitmaps(page_size)))
    root = data.draw(st.one_of(st.sampled_from(addrs), _U64))
    max_nodes = data.draw(st.sampled_from([1 << 20, 3]))

    def in_ram(pa, n):
        return pa + n <= npages * page_size

    _same_walk(walk_radix(mem.read, root, g, in_ram=in_ram, max_nodes=max_nodes),
               _reference_walk(mem.read, root, g, in_ram=in_ram, max_nodes=max_nodes))


def test_walk_leaves_gc_alone_and_blocks_restore_it():
    """The walk never touches the process-wide collector (a reader called during the walk
    sees it enabled); decoding `blocks` pauses it and restores the caller's state."""
    import gc
    g, mem, b, blocks = _tree()
    seen = []

    def read(pa, n):
        seen.append(gc.isenabled())
        return mem.read(pa, n)

    assert gc.isenabled()
    w = walk_radix(read, b.root, g)
    assert seen and all(seen) and gc.isenabled()
    assert w.blocks == coalesce(blocks, g.page_size) and gc.isenabled()
    gc.disable()
    try:
        w = walk_radix(mem.read, b.root, g)
        assert w.blocks == coalesce(blocks, g.page_size) and not gc.isenabled()
    finally:
        gc.enable()


def test_blocks_are_decoded_once_from_private_copies():
    """Leaves are kept until `blocks` is first read: a reader handing out a buffer it
    reuses (bytearray, then overwritten) cannot change the result; `blocks` is then a
    plain cached list, and to_json/ranges agree with it."""
    g, mem, b, blocks = _tree()
    buf = bytearray(g.page_size)

    def read(pa, n):
        buf[:] = mem.read(pa, n)
        return buf

    w = walk_radix(read, b.root, g)
    buf[:] = b"\xff" * g.page_size
    want = coalesce(blocks, g.page_size)
    assert w.blocks == want and w.blocks is w.blocks
    assert w.to_json()["blocks"] == [list(x) for x in want]
    assert w.ranges() == sorted(w.ranges())
    assert sum(e - s for s, e in w.ranges()) == w.preserved_bytes


def test_walk_decodes_leaves_only_when_asked(monkeypatch):
    """The walk counts leaves without decoding them (the decoder runs when `blocks` is
    read, or for a leaf that is not wholly in RAM); equal walks compare equal."""
    from kho_agent.abi import radix
    g = geometry(4096, "kho-v4")
    mem = SparseMemory(1 << 40, 4096)
    b = RadixBuilder(g, mem.alloc_page)
    pfns = [i * 64 + (i * 7) % 64 for i in range(2000)]     # one page in each 64
    for p in pfns:
        b.add(p * 4096, 0)
    b.write_to(mem.write)
    calls = []
    real = radix._leaf_blocks
    monkeypatch.setattr(radix, "_leaf_blocks", lambda *a: calls.append(1) or real(*a))
    w = walk_radix(mem.read, b.root, g, in_ram=lambda pa, n: True)
    assert calls == [] and w.pages_by_order == {0: 2000} and w.preserved_bytes == 2000 * 4096
    assert w.blocks == [[p * 4096, 0, 1] for p in pfns] and calls
    n = len(calls)
    cut = walk_radix(mem.read, b.root, g, in_ram=lambda pa, n: pa + n <= 1000 * 64 * 4096)
    assert len(calls) == n + 3 and not cut.intact   # the leaf crossing the limit, two beyond
    assert cut.pages_by_order == {0: 1000} and len(cut.blocks) == 1000
    assert walk_radix(mem.read, b.root, g) == w and cut != w


def test_popcount_fallback_for_python_39(monkeypatch):
    """Python 3.9 has no int.bit_count: the bin().count fallback gives the same walks."""
    from kho_agent.abi import radix
    rng = random.Random(5)
    pages = [bytes(4096), b"\xff" * 4096, rng.randbytes(4096),
             (sum(1 << (64 * j + rng.randrange(64)) for j in range(512))).to_bytes(4096, "little"),
             (sum(1 << b for b in rng.sample(range(0, 32768, 2), 300))).to_bytes(4096, "little")]
    for v in (0, 1, (1 << 64) - 1, int.from_bytes(pages[2], "little")):
        assert radix._popcount_bin(v) == bin(v).count("1")
    want = [radix._leaf_blocks(p, 1 << 40, 12, 0) for p in pages]
    monkeypatch.setattr(radix, "_popcount", radix._popcount_bin)
    assert [radix._leaf_blocks(p, 1 << 40, 12, 0) for p in pages] == want
    assert want[3][1] == 512 and want[1] == ([[1 << 40, 0, 32768]], 32768)
