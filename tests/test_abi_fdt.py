"""FDT reader/writer (kho_agent.abi.fdt) and the KHO root FDT (kho_agent.abi.kho): libfdt
cross-checks, a byte-exact reproduction of what the kernel writes, tolerant decoding of a
truncated debugfs kho/out/fdt, and fuzzing (only FdtError / UnsupportedAbi may escape)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kho_agent.abi.encode.fdt import build_fdt
from kho_agent.abi.encode.kho import encode_kho_fdt
from kho_agent.abi.fdt import (
    FDT_MAGIC,
    Fdt,
    FdtError,
    FdtNode,
    FdtProperty,
    parse_fdt,
    parse_header,
)
from kho_agent.abi.kho import KhoFdtError, KhoSubtree, decode_kho_fdt
from kho_agent.abi.versions import UnsupportedAbi

try:
    import libfdt
except ImportError:  # pragma: no cover - pylibfdt is a test extra
    libfdt = None

needs_libfdt = pytest.mark.skipif(libfdt is None, reason="pylibfdt (import libfdt) not installed")
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PAGE = 4096

MD = KhoSubtree("kexec-metadata", 0x7ffe000, 73)
LUO = KhoSubtree("LUO", 0x7ff5000, 32)
MEMBLOCK = KhoSubtree("memblock", 0x7ff0000, 120)


def u64(v: int) -> bytes:
    return v.to_bytes(8, "little")


# --- reader / writer basics ----------------------------------------------------------------

def _sample_tree() -> FdtNode:
    return FdtNode("", [FdtProperty("compatible", b"test,board\0"),
                        FdtProperty("#address-cells", struct.pack(">I", 2)),
                        FdtProperty("empty", b"")],
                   [FdtNode("cpus", [FdtProperty("n", b"\x01\x02\x03")],
                            [FdtNode("cpu@0", [FdtProperty("compatible", b"arm,a53\0")])]),
                    FdtNode("memory@40000000", [FdtProperty("reg", u64(1) + u64(2))])])


def _shape(node: FdtNode):
    return (node.name, [(p.name, bytes(p.value)) for p in node.props],
            [_shape(c) for c in node.children])


def test_build_parse_roundtrip():
    tree = _sample_tree()
    blob = build_fdt(tree, reserved=[(0x1000, 0x2000), (0x80000000, 0x100000)],
                     boot_cpuid_phys=3)
    fdt = parse_fdt(blob)
    assert _shape(fdt.root) == _shape(tree)
    assert fdt.reserved == [(0x1000, 0x2000), (0x80000000, 0x100000)]
    h = fdt.header
    assert (h.magic, h.version, h.last_comp_version, h.boot_cpuid_phys) == (FDT_MAGIC, 17, 16, 3)
    assert h.totalsize == len(blob) and not fdt.truncated and fdt.notes == []
    # a page holding the FDT parses the same
    assert _shape(parse_fdt(blob + bytes(PAGE)).root) == _shape(tree)
    assert fdt.root.child("cpus").child("cpu@0").prop("compatible").string() == "arm,a53"
    assert fdt.root.prop("missing") is None and fdt.root.child("nope") is None


def test_build_strings_order():
    tree = FdtNode("", [FdtProperty("a", b""), FdtProperty("b", b"")])
    blob = build_fdt(tree, strings=["b", "unused", "a"])
    h = parse_header(blob)
    assert blob[h.off_dt_strings:h.off_dt_strings + h.size_dt_strings] == b"b\0a\0"
    assert [(p.name, p.nameoff) for p in parse_fdt(blob).root.props] == [("a", 2), ("b", 0)]


def test_property_accessors():
    assert FdtProperty("x", u64(0x1234)).u64() == 0x1234
    assert FdtProperty("x", u64(0x1234)).u64("big") == 0x3412 << 48
    assert FdtProperty("x", b"kho-v4\0junk").string() == "kho-v4"
    with pytest.raises(FdtError, match="not a u64"):
        FdtProperty("x", b"1234").u64()
    with pytest.raises(FdtError):
        build_fdt(FdtNode("", [FdtProperty(None, b"")]))


def _with_header(blob: bytes, **fields) -> bytes:
    names = ["magic", "totalsize", "off_dt_struct", "off_dt_strings", "off_mem_rsvmap",
             "version", "last_comp_version", "boot_cpuid_phys", "size_dt_strings",
             "size_dt_struct"]
    vals = list(struct.unpack_from(">10I", blob))
    for k, v in fields.items():
        vals[names.index(k)] = v
    return struct.pack(">10I", *vals) + blob[40:]


@pytest.mark.parametrize("mutate,msg", [
    (lambda b: b[:39], "too short"),
    (lambda b: _with_header(b, magic=0xD00DFEEE), "bad FDT magic"),
    (lambda b: _with_header(b, version=15), "version"),
    (lambda b: _with_header(b, last_comp_version=18), "version"),
    (lambda b: b[:-1], "truncated"),
    (lambda b: _with_header(b, totalsize=30), "smaller than its header"),
    (lambda b: _with_header(b, off_dt_struct=10), "structure block"),
    (lambda b: _with_header(b, size_dt_strings=10_000), "strings block"),
    (lambda b: _with_header(b, off_mem_rsvmap=44), "reservation map"),
])
def test_strict_errors(mutate, msg):
    blob = build_fdt(_sample_tree())
    with pytest.raises(FdtError, match=msg):
        parse_fdt(mutate(blob))


def _raw_fdt(struct_words: bytes, strings: bytes = b"") -> bytes:
    rsv = bytes(16)
    off_struct = 40 + len(rsv)
    total = off_struct + len(struct_words) + len(strings)
    hdr = struct.pack(">10I", FDT_MAGIC, total, off_struct, off_struct + len(struct_words), 40,
                      17, 16, 0, len(strings), len(struct_words))
    return hdr + rsv + struct_words + strings


def _w(*vals) -> bytes:
    return struct.pack(f">{len(vals)}I", *vals)


@pytest.mark.parametrize("body,strings,msg", [
    (_w(1, 0, 2), b"", "without FDT_END"),
    (_w(1, 0, 2, 2, 9), b"", "unbalanced"),
    (_w(1, 0, 9), b"", "FDT_END inside"),
    (_w(3, 0, 0, 9), b"a\0", "outside any node"),
    (_w(1, 0, 2, 1, 0, 2, 9), b"", "second root"),
    (_w(1, 0, 7, 2, 9), b"", "unknown FDT token"),
    (_w(9), b"", "no root node"),
    (_w(1) + b"ab\0\0" + _w(2, 9), b"", "root node has a name"),
    (_w(1, 0, 3, 100, 0, 2, 9), b"a\0", "overruns"),
    (_w(1, 0, 3, 0, 5, 2, 9), b"a\0", "outside strings block"),
    (_w(1, 0, 3, 0, 0, 2, 9), b"ab", "not terminated"),
    (_w(1) + b"abcd", b"", "no root node"),
    (_w(*([1, 0] * 70)), b"", "deeper"),
])
def test_strict_structure_errors(body, strings, msg):
    with pytest.raises(FdtError, match=msg):
        parse_fdt(_raw_fdt(body, strings))


def test_nop_tokens_and_v16_header():
    blob = _raw_fdt(_w(4, 1, 0, 4, 3, 1, 0) + b"x\0\0\0" + _w(4, 2, 9), b"p\0")
    fdt = parse_fdt(blob)
    assert fdt.root.props[0].name == "p" and fdt.root.props[0].value == b"x"
    v16 = _with_header(blob, version=16, size_dt_struct=0)
    assert _shape(parse_fdt(v16).root) == _shape(fdt.root)


# --- KHO root FDT --------------------------------------------------------------------------

@pytest.mark.parametrize("compat", ["kho-v2", "kho-v3", "kho-v4"])
def test_kho_encode_decode(compat):
    subs = [MD, LUO]
    if compat == "kho-v2":
        subs = [KhoSubtree(s.name, s.phys, None) for s in subs]
    blob = encode_kho_fdt(compat, 0x1234000, subs)
    root = decode_kho_fdt(blob)
    assert ((root.compatible, root.memory_map_root, root.abi.compatible)
            == (compat, 0x1234000, compat))
    assert not root.recovered and not root.truncated and root.notes == []
    # kho_add_subtree() puts the newest subtree first
    assert [(s.name, s.phys, s.size) for s in root.subtrees] == [
        (s.name, s.phys, s.size) for s in reversed(subs)]
    assert root.subtree("LUO").phys == LUO.phys and root.subtree("nope") is None


def test_kho_encode_refusals():
    with pytest.raises(UnsupportedAbi, match="kho-v9"):
        encode_kho_fdt("kho-v9", 0)
    with pytest.raises(ValueError, match="blob size"):
        encode_kho_fdt("kho-v4", 0, [KhoSubtree("LUO", 0x1000, None)])


def _kho_tree(compat: str, mmap_value: bytes = u64(0x1000), extra_root=(), children=()) -> bytes:
    props = [FdtProperty("compatible", compat.encode() + b"\0")] if compat else []
    if mmap_value is not None:
        props.append(FdtProperty("preserved-memory-map", mmap_value))
    return build_fdt(FdtNode("", props + list(extra_root), list(children)))


def test_kho_decode_errors():
    with pytest.raises(UnsupportedAbi, match="kho-v9"):
        decode_kho_fdt(_kho_tree("kho-v9"))
    with pytest.raises(KhoFdtError, match="no 'compatible'"):
        decode_kho_fdt(_kho_tree(""))
    with pytest.raises(KhoFdtError, match="not a KHO ABI"):
        decode_kho_fdt(_kho_tree("vendor,board"))
    with pytest.raises(KhoFdtError, match="preserved-memory-map"):
        decode_kho_fdt(_kho_tree("kho-v4", None))
    with pytest.raises(KhoFdtError, match="expected 8"):
        decode_kho_fdt(_kho_tree("kho-v4", b"\0" * 4))
    # odd subnodes are skipped with a note, not fatal
    root = decode_kho_fdt(_kho_tree("kho-v4", children=[
        FdtNode("nodata", [FdtProperty("blob-size", u64(8))]),
        FdtNode("short", [FdtProperty("preserved-data", b"\0" * 4)]),
        FdtNode("nosize", [FdtProperty("preserved-data", u64(0x5000))]),
    ]))
    assert [(s.name, s.phys, s.size) for s in root.subtrees] == [("nosize", 0x5000, None)]
    assert len(root.notes) == 3


# --- libfdt cross-checks -------------------------------------------------------------------

def _libfdt_tree(blob: bytes):
    """(name, [(prop, value)], [children]) of the tree as libfdt sees it."""
    f = libfdt.Fdt(bytes(blob))
    assert libfdt.fdt_check_full(bytearray(blob), len(blob)) == 0

    def node(off):
        props = []
        p = f.first_property_offset(off, [libfdt.NOTFOUND])
        while p >= 0:
            prop = f.get_property_by_offset(p)
            props.append((prop.name, bytes(prop)))
            p = f.next_property_offset(p, [libfdt.NOTFOUND])
        kids = []
        c = f.first_subnode(off, [libfdt.NOTFOUND])
        while c >= 0:
            kids.append(node(c))
            c = f.next_subnode(c, [libfdt.NOTFOUND])
        return (f.get_name(off), props, kids)

    return node(0)


_NAME = st.text("abcdefghijklmnopqrstuvwxyz0123456789,._+-", min_size=1, max_size=12)
_PROPS = st.dictionaries(_NAME, st.binary(max_size=24), max_size=4).map(
    lambda d: [FdtProperty(k, v) for k, v in d.items()])


def _unique_children(nodes):
    seen, out = set(), []
    for n in nodes:
        if n.name not in seen:
            seen.add(n.name)
            out.append(n)
    return out


_TREES = st.recursive(
    st.builds(FdtNode, _NAME, _PROPS),
    lambda kids: st.builds(FdtNode, _NAME, _PROPS,
                           st.lists(kids, max_size=4).map(_unique_children)),
    max_leaves=12)
_ROOTS = st.builds(lambda props, kids: FdtNode("", props, _unique_children(kids)),
                   _PROPS, st.lists(_TREES, max_size=4))


@needs_libfdt
@settings(max_examples=60, deadline=None)
@given(tree=_ROOTS, rsv=st.lists(st.tuples(st.integers(1, 2**64 - 1), st.integers(1, 2**64 - 1)),
                                 max_size=3))
def test_build_fdt_passes_libfdt(tree, rsv):
    blob = build_fdt(tree, reserved=rsv)
    assert _libfdt_tree(blob) == _shape(tree)
    f = libfdt.Fdt(blob)
    assert f.num_mem_rsv() == len(rsv)
    assert [f.get_mem_rsv(i) for i in range(len(rsv))] == [[a, s] for a, s in rsv]
    assert _shape(parse_fdt(blob).root) == _shape(tree)


def _fdtsw_build(tree: FdtNode, rsv=(), pack: bool = False) -> bytes:
    """`tree` written with libfdt's sequential-write API (FdtSw), optionally fdt_pack()ed."""
    sw = libfdt.FdtSw(1 << 16)
    for a, s in rsv:
        sw.add_reservemap_entry(a, s)
    sw.finish_reservemap()

    def emit(n):
        sw.begin_node(n.name)
        for p in n.props:
            sw.property(p.name, p.value)
        for c in n.children:
            emit(c)
        sw.end_node()

    emit(tree)
    f = sw.as_fdt()
    if pack:
        f.pack()
    return bytes(f.as_bytearray()[:f.totalsize()])


@needs_libfdt
@settings(max_examples=60, deadline=None)
@given(tree=_ROOTS, rsv=st.lists(st.tuples(st.integers(1, 2**64 - 1), st.integers(1, 2**64 - 1)),
                                 max_size=3))
def test_parse_fdtsw_output(tree, rsv):
    blob = _fdtsw_build(tree, rsv)
    fdt = parse_fdt(blob)
    assert _shape(fdt.root) == _libfdt_tree(blob) == _shape(tree)
    assert fdt.reserved == list(rsv)
    # fdt_create() puts the reservation map at FDT_ALIGN(40, 16) = 48; fdt_pack() moves it
    # to 40, the layout build_fdt writes. Given libfdt's strings order (reverse order of
    # first use in FdtSw), build_fdt then reproduces the packed blob byte for byte.
    assert fdt.header.off_mem_rsvmap == 48
    names = set()
    todo = [tree]
    while todo:
        n = todo.pop()
        names |= {p.name for p in n.props}
        todo += n.children
    if any(a != b and a.endswith(b) for a in names for b in names):
        return   # libfdt shares string tails ("0" inside "00"); build_fdt does not
    packed = _fdtsw_build(tree, rsv, pack=True)
    h = parse_header(packed)
    strings = packed[h.off_dt_strings:h.off_dt_strings + h.size_dt_strings].split(b"\0")[:-1]
    assert build_fdt(tree, reserved=rsv, strings=[s.decode() for s in strings]) == packed


@needs_libfdt
@pytest.mark.parametrize("compat", ["kho-v2", "kho-v3", "kho-v4"])
def test_encode_kho_fdt_read_by_libfdt(compat):
    subs = ([MD, LUO] if compat != "kho-v2"
            else [KhoSubtree(s.name, s.phys, None) for s in (MD, LUO)])
    blob = encode_kho_fdt(compat, 0xABC000, subs)
    f = libfdt.Fdt(blob)
    assert f.getprop(0, "compatible").as_str() == compat
    assert int.from_bytes(bytes(f.getprop(0, "preserved-memory-map")), "little") == 0xABC000
    for s in subs:
        off = f.subnode_offset(0, s.name)
        assert int.from_bytes(bytes(f.getprop(off, "preserved-data")), "little") == s.phys
        if s.size is not None:
            assert int.from_bytes(bytes(f.getprop(off, "blob-size")), "little") == s.size
        else:
            assert f.getprop(off, "blob-size", [libfdt.NOTFOUND]) == -libfdt.NOTFOUND
    assert _libfdt_tree(blob) == _shape(parse_fdt(blob).root)


def kernel_kho_fdt(compat: str, mmap_root: int, subtrees) -> bytes:
    """The root FDT as Linux writes it, using libfdt the way kexec_handover.c does.

    kho_out_fdt_setup(): fdt_create(PAGE_SIZE), fdt_finish_reservemap, begin_node(""),
    property_string(compatible), property(preserved-memory-map, native u64), end_node,
    fdt_finish. kho_add_subtree(): fdt_open_into(fdt, fdt, PAGE_SIZE), fdt_add_subnode(0,
    name), fdt_setprop(preserved-data), fdt_setprop(blob-size), fdt_pack.
    pylibfdt has no Fdt.open_into(); Fdt.resize(PAGE_SIZE) is fdt_open_into() into a fresh
    PAGE_SIZE buffer, which lays the tree out exactly as the in-place call does.
    """
    sw = libfdt.FdtSw(PAGE)
    sw.finish_reservemap()
    sw.begin_node("")
    sw.property_string("compatible", compat)
    sw.property("preserved-memory-map", u64(mmap_root))
    sw.end_node()
    f = sw.as_fdt()
    for s in subtrees:
        f.resize(PAGE)
        off = f.add_subnode(0, s.name)
        f.setprop(off, "preserved-data", u64(s.phys))
        if s.size is not None:
            f.setprop(off, "blob-size", u64(s.size))
        f.pack()
    return bytes(f.as_bytearray()[:f.totalsize()])


@needs_libfdt
def test_kernel_fdt_sizes():
    """Sanity of the reproduction: 233 bytes after kexec-metadata, 345 with LUO and
    memblock -- the sizes seen on a real 7.2 kernel's debugfs kho/out/fdt."""
    assert len(kernel_kho_fdt("kho-v4", 0x1000, [MD])) == 233
    assert len(kernel_kho_fdt("kho-v4", 0x1000, [MD, LUO, MEMBLOCK])) == 345


@needs_libfdt
@pytest.mark.parametrize("compat", ["kho-v3", "kho-v4"])
@pytest.mark.parametrize("subs", [[], [MD], [MD, LUO], [MD, LUO, MEMBLOCK]],
                         ids=["root", "md", "md+luo", "md+luo+memblock"])
def test_encode_kho_fdt_byte_identical_to_kernel(compat, subs):
    want = kernel_kho_fdt(compat, 0x10_2030_4000, subs)
    got = encode_kho_fdt(compat, 0x10_2030_4000, subs)
    assert got == want


@needs_libfdt
def test_encode_kho_fdt_byte_identical_to_kernel_v2():
    subs = [KhoSubtree(s.name, s.phys, None) for s in (MD, LUO)]
    assert encode_kho_fdt("kho-v2", 0x5000, subs) == kernel_kho_fdt("kho-v2", 0x5000, subs)


@needs_libfdt
def test_decode_kernel_written_fdt():
    blob = kernel_kho_fdt("kho-v4", 0x4000, [MD, LUO, MEMBLOCK])
    root = decode_kho_fdt(blob)
    assert root.memory_map_root == 0x4000
    assert {(s.name, s.phys, s.size) for s in root.subtrees} == {
        (s.name, s.phys, s.size) for s in (MD, LUO, MEMBLOCK)}


# --- tolerant decoding of a truncated kho/out/fdt ----------------------------------------------

def _cut_checks(blob: bytes, cut: int):
    with pytest.raises(FdtError, match="truncated"):
        parse_fdt(blob[:cut])
    with pytest.raises(FdtError):
        decode_kho_fdt(blob[:cut])
    fdt = parse_fdt(blob[:cut], tolerant=True)
    assert fdt.truncated and fdt.notes
    root = decode_kho_fdt(blob[:cut], tolerant=True)
    assert root.compatible == "kho-v4" and root.memory_map_root == 0x7fff000
    assert root.recovered and root.truncated and root.notes
    return root


def test_tolerant_truncated_345_to_233():
    """The real-kernel case: debugfs sized the file when only kexec-metadata was there
    (233 bytes); LUO and memblock grew the FDT to 345 -- the cut falls inside the
    structure block (in the kexec-metadata node) and no property name resolves."""
    blob = encode_kho_fdt("kho-v4", 0x7fff000, [MD, LUO, MEMBLOCK])
    assert len(blob) == 345
    h = parse_header(blob)
    assert h.off_dt_struct < 233 < h.off_dt_struct + h.size_dt_struct
    root = _cut_checks(blob, 233)
    assert any("structure block cut" in n for n in root.notes)
    names = {s.name for s in root.subtrees}
    assert {"memblock", "LUO"} <= names and "kexec-metadata" not in names


@pytest.mark.parametrize("cut", [233, 240, 260, 284])
def test_tolerant_cut_in_strings_block(cut):
    blob = encode_kho_fdt("kho-v4", 0x7fff000, [MD, LUO])
    assert len(blob) == 285
    root = _cut_checks(blob, cut)
    assert {s.name for s in root.subtrees} == {"kexec-metadata", "LUO"}


@needs_libfdt
@pytest.mark.parametrize("subs,cut", [([MD, LUO], 233), ([MD, LUO, MEMBLOCK], 233)],
                         ids=["285-to-233", "345-to-233"])
def test_tolerant_recovers_subtrees_of_kernel_written_fdt(subs, cut):
    """Recovery of unnamed subnode properties must follow the kernel's layout: fdt_setprop()
    inserts a new property at the start of the node, so kho_add_subtree()'s
    preserved-data-then-blob-size leaves blob-size FIRST in the structure block."""
    blob = kernel_kho_fdt("kho-v4", 0x7fff000, subs)
    root = _cut_checks(blob, cut)
    got = {s.name: (s.phys, s.size) for s in root.subtrees}
    for s in subs:
        if s.name in got:
            assert got[s.name] == (s.phys, s.size), s.name
    assert "LUO" in got


def test_tolerant_bad_header_still_raises():
    blob = encode_kho_fdt("kho-v4", 0x1000, [MD])
    with pytest.raises(FdtError):
        parse_fdt(b"\0" * 100, tolerant=True)
    with pytest.raises(FdtError):
        parse_fdt(blob[:30], tolerant=True)
    with pytest.raises(UnsupportedAbi, match="kho-v9"):
        decode_kho_fdt(encode_kho_fdt("kho-v4", 0x1000, [MD]).replace(b"kho-v4", b"kho-v9")[:100],
                       tolerant=True)


# --- fuzzing -----------------------------------------------------------------------------

def _only_fdt_errors(blob: bytes):
    for tolerant in (False, True):
        try:
            fdt = parse_fdt(blob, tolerant=tolerant)
        except FdtError:
            pass
        else:
            assert isinstance(fdt, Fdt)
        try:
            decode_kho_fdt(blob, tolerant=tolerant)
        except (FdtError, UnsupportedAbi):
            pass


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(blob):
    _only_fdt_errors(blob)


@FUZZ
@given(hdr=st.lists(st.integers(0, 400), min_size=10, max_size=10),
       version=st.sampled_from([16, 17]), body=st.binary(max_size=400))
def test_fuzz_plausible_headers(hdr, version, body):
    hdr[0], hdr[5], hdr[6] = FDT_MAGIC, version, 16
    _only_fdt_errors(struct.pack(">10I", *hdr) + body)


_VALID = [
    encode_kho_fdt("kho-v4", 0x7fff000, [MD, LUO, MEMBLOCK]),
    encode_kho_fdt("kho-v2", 0x1000, [KhoSubtree("LUO", 0x2000, None)]),
    build_fdt(_sample_tree(), reserved=[(1, 2)]),
]
_TOKENS = st.sampled_from([0, 1, 2, 3, 4, 9, 0xFFFFFFFF, 0x80000000, 7])


@FUZZ
@given(which=st.sampled_from(range(len(_VALID))),
       bytes_=st.lists(st.tuples(st.integers(0, 344), st.integers(0, 255)), max_size=6),
       words=st.lists(st.tuples(st.integers(0, 86), st.one_of(_TOKENS, st.integers(0, 2**32 - 1))),
                      max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 345)),
       grow=st.binary(max_size=64))
def test_fuzz_mutated_valid_fdts(which, bytes_, words, cut, grow):
    blob = bytearray(_VALID[which])
    for pos, val in bytes_:
        if pos < len(blob):
            blob[pos] = val
    for idx, val in words:
        if idx * 4 + 4 <= len(blob):
            blob[idx * 4:idx * 4 + 4] = struct.pack(">I", val)
    if cut is not None:
        del blob[cut:]
    _only_fdt_errors(bytes(blob) + grow)
