"""Flattened devicetree (FDT) reader: strict, bounds-checked, no dependencies.

Follows the devicetree specification v0.4, chapter 5 (the format libfdt implements in
scripts/dtc/libfdt/ of the kernel source). The writer (`build_fdt`, which reproduces the
kernel's KHO root FDT byte for byte) is in abi/encode/fdt.py: only the twin and tests write.

A *tolerant* parse accepts a blob cut short (the real debugfs kho/out/fdt is: its size is
fixed when KHO initialises and later subtrees grow the FDT but not the file). It decodes
what the structure block still holds, leaves unresolvable property names as None, and
says what it recovered in `Fdt.notes`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Optional

from ..errors import InputError

__all__ = [
    "FDT_MAGIC",
    "FdtError",
    "FdtHeader",
    "FdtProperty",
    "FdtNode",
    "Fdt",
    "parse_fdt",
    "parse_header",
]

FDT_MAGIC = 0xD00DFEED
FDT_BEGIN_NODE = 1
FDT_END_NODE = 2
FDT_PROP = 3
FDT_NOP = 4
FDT_END = 9
_HEADER = struct.Struct(">10I")
HEADER_SIZE = _HEADER.size  # 40
_MAX_DEPTH = 64  # libfdt's FDT_MAX_DEPTH is 32; be a little more lenient, still bounded.


class FdtError(ValueError, InputError):
    """The blob is not a well-formed FDT; the message says where."""


@dataclass(frozen=True)
class FdtHeader:
    """The 40-byte FDT header (all fields big-endian u32 on disk)."""

    magic: int
    totalsize: int
    off_dt_struct: int
    off_dt_strings: int
    off_mem_rsvmap: int
    version: int
    last_comp_version: int
    boot_cpuid_phys: int
    size_dt_strings: int
    size_dt_struct: int


@dataclass
class FdtProperty:
    """One property; `name` is None when a tolerant parse could not resolve it."""

    name: Optional[str]
    value: bytes
    nameoff: int = -1

    def u64(self, byteorder: str = "little") -> int:
        """The value as a u64 (KHO stores native-endian u64s: little on x86_64/arm64)."""
        if len(self.value) != 8:
            raise FdtError(f"property {self.name!r} is {len(self.value)} bytes, not a u64")
        return int.from_bytes(self.value, byteorder)  # type: ignore[arg-type]

    def string(self) -> str:
        """The value as a NUL-terminated string."""
        raw = self.value.split(b"\0", 1)[0]
        return raw.decode("utf-8", "replace")


@dataclass
class FdtNode:
    """A node: name, properties in file order, children in file order."""

    name: str
    props: list[FdtProperty] = field(default_factory=list)
    children: list[FdtNode] = field(default_factory=list)

    def prop(self, name: str) -> Optional[FdtProperty]:
        """The property called `name`, or None."""
        for p in self.props:
            if p.name == name:
                return p
        return None

    def child(self, name: str) -> Optional[FdtNode]:
        """The child node called `name`, or None."""
        for c in self.children:
            if c.name == name:
                return c
        return None


@dataclass
class Fdt:
    """A parsed FDT. `truncated` is True when a tolerant parse ran out of bytes."""

    header: FdtHeader
    root: FdtNode
    reserved: list[tuple[int, int]] = field(default_factory=list)
    truncated: bool = False
    notes: list[str] = field(default_factory=list)


def parse_header(blob: bytes) -> FdtHeader:
    """Decode and sanity-check the FDT header (magic, version) of `blob`."""
    if len(blob) < HEADER_SIZE:
        raise FdtError(f"FDT too short for a header: {len(blob)} bytes")
    hdr = FdtHeader(*_HEADER.unpack_from(blob, 0))
    if hdr.magic != FDT_MAGIC:
        raise FdtError(f"bad FDT magic 0x{hdr.magic:08x}")
    if hdr.version < 16 or hdr.last_comp_version > 17:
        raise FdtError(f"unsupported FDT version {hdr.version} (last compatible "
                       f"{hdr.last_comp_version})")
    return hdr


def _cstr(buf: bytes, off: int, end: int, what: str) -> tuple[str, int]:
    """The NUL-terminated string at buf[off:end] and the offset just past its NUL."""
    nul = buf.find(b"\0", off, end)
    if nul < 0:
        raise FdtError(f"unterminated {what} at offset {off}")
    return buf[off:nul].decode("utf-8", "replace"), nul + 1


def _align4(n: int) -> int:
    return (n + 3) & ~3


def parse_fdt(blob: bytes, *, tolerant: bool = False) -> Fdt:
    """Parse an FDT.

    Strict (default): every offset and size is checked against the header and the blob,
    tokens must nest and end with FDT_END, and every name must resolve; any violation
    raises FdtError. The blob may be longer than `totalsize` (a page holding an FDT).

    Tolerant: a blob shorter than `totalsize` is accepted; decoding stops where bytes run
    out, unresolvable property names become None, and `Fdt.notes` says what happened.
    A header that is itself bad still raises FdtError.

    >>> from kho_agent.abi.encode.fdt import build_fdt
    >>> root = FdtNode("", [FdtProperty("compatible", b"kho-v4\\0")])
    >>> parse_fdt(build_fdt(root)).root.prop("compatible").string()
    'kho-v4'
    """
    blob = bytes(blob)
    hdr = parse_header(blob)
    notes: list[str] = []
    avail = len(blob)
    truncated = hdr.totalsize > avail
    if truncated and not tolerant:
        raise FdtError(f"FDT truncated: header totalsize {hdr.totalsize}, have {avail} bytes")
    if hdr.totalsize < HEADER_SIZE:
        raise FdtError(f"FDT totalsize {hdr.totalsize} smaller than its header")
    limit = min(hdr.totalsize, avail)
    if truncated:
        notes.append(f"blob truncated: {avail} of {hdr.totalsize} bytes present")

    struct_size = hdr.size_dt_struct if hdr.version >= 17 else hdr.totalsize - hdr.off_dt_struct
    for name, off, size in (("structure block", hdr.off_dt_struct, struct_size),
                            ("strings block", hdr.off_dt_strings, hdr.size_dt_strings)):
        if off < HEADER_SIZE or off + size > hdr.totalsize:
            raise FdtError(f"{name} [{off}, +{size}) outside totalsize {hdr.totalsize}")
    if hdr.off_dt_struct % 4:
        raise FdtError(f"structure block offset {hdr.off_dt_struct} not 4-aligned")

    s_end = min(hdr.off_dt_struct + struct_size, limit)
    str_off = hdr.off_dt_strings
    str_end_full = str_off + hdr.size_dt_strings
    str_end = min(str_end_full, limit)
    if truncated and str_end < str_end_full:
        have = max(0, str_end - str_off)
        notes.append(f"strings block incomplete: {have} of {hdr.size_dt_strings} bytes")

    reserved = _parse_rsvmap(blob, hdr, limit, tolerant, notes)

    def name_at(nameoff: int) -> Optional[str]:
        if nameoff >= hdr.size_dt_strings:
            raise FdtError(f"property name offset {nameoff} outside strings block")
        at = str_off + nameoff
        if at >= str_end or blob.find(b"\0", at, str_end) < 0:
            if tolerant and truncated:
                return None
            raise FdtError(f"property name at strings offset {nameoff} not terminated")
        return _cstr(blob, at, str_end, "property name")[0]

    root: Optional[FdtNode] = None
    stack: list[FdtNode] = []
    off = hdr.off_dt_struct
    finished = False
    unresolved = 0
    while True:
        if off + 4 > s_end:
            break
        (tag,) = struct.unpack_from(">I", blob, off)
        off += 4
        if tag == FDT_BEGIN_NODE:
            if root is not None and not stack:
                raise FdtError(f"second root node at offset {off - 4}")
            if len(stack) >= _MAX_DEPTH:
                raise FdtError(f"nodes nested deeper than {_MAX_DEPTH}")
            if blob.find(b"\0", off, s_end) < 0:
                break  # name cut off by truncation (strict: caught below)
            name, nxt = _cstr(blob, off, s_end, "node name")
            off = _align4(nxt)
            node = FdtNode(name)
            if stack:
                stack[-1].children.append(node)
            else:
                if name != "":
                    raise FdtError(f"root node has a name {name!r}")
                root = node
            stack.append(node)
        elif tag == FDT_END_NODE:
            if not stack:
                raise FdtError(f"unbalanced FDT_END_NODE at offset {off - 4}")
            stack.pop()
        elif tag == FDT_PROP:
            if not stack:
                raise FdtError(f"property outside any node at offset {off - 4}")
            if off + 8 > s_end:
                break
            plen, nameoff = struct.unpack_from(">II", blob, off)
            off += 8
            if off + plen > hdr.off_dt_struct + struct_size:
                raise FdtError(f"property of {plen} bytes at offset {off - 12} overruns "
                               "the structure block")
            if off + plen > s_end:
                break
            value = blob[off:off + plen]
            off = _align4(off + plen)
            pname = name_at(nameoff)
            if pname is None:
                unresolved += 1
            stack[-1].props.append(FdtProperty(pname, value, nameoff))
        elif tag == FDT_NOP:
            continue
        elif tag == FDT_END:
            if stack:
                raise FdtError(f"FDT_END inside node {stack[-1].name!r}")
            finished = True
            break
        else:
            raise FdtError(f"unknown FDT token 0x{tag:x} at offset {off - 4}")

    if root is None:
        raise FdtError("no root node in structure block")
    if not finished:
        if not (tolerant and truncated):
            raise FdtError("structure block ends without FDT_END")
        notes.append(f"structure block cut at offset {off}: "
                     f"{len(stack)} node(s) left open, later nodes missing")
    if unresolved:
        notes.append(f"{unresolved} property name(s) unresolved (strings block missing)")
    return Fdt(hdr, root, reserved, truncated, notes)


def _parse_rsvmap(blob: bytes, hdr: FdtHeader, limit: int, tolerant: bool,
                  notes: list[str]) -> list[tuple[int, int]]:
    """The memory reservation block: (address, size) pairs up to a (0, 0) terminator."""
    out: list[tuple[int, int]] = []
    off = hdr.off_mem_rsvmap
    if off % 8 or off < HEADER_SIZE:
        raise FdtError(f"reservation map offset {off} invalid")
    bound = min(hdr.off_dt_struct if hdr.off_dt_struct > off else hdr.totalsize, limit)
    while True:
        if off + 16 > bound:
            if tolerant and limit < hdr.totalsize:
                notes.append("reservation map cut short")
                return out
            raise FdtError("reservation map not terminated")
        addr, size = struct.unpack_from(">QQ", blob, off)
        off += 16
        if addr == 0 and size == 0:
            return out
        out.append((addr, size))

