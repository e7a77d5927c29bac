"""Workload memfds: the spec of what to preserve, a seeded fill pattern, hashing and PFN runs.

A spec (JSON; YAML too when PyYAML happens to be installed) lists sessions of memfds:
{"sessions": [{"name": "vm-ram", "memfds": [{"token": 4097, "size": "64MiB", "seed": 1},
{"token": 4098, "adopt": true}]}]}. `adopt` memfds are handed to the holder by the real
workload over its unix socket (SCM_RIGHTS) instead of being created.

Workload kinds (issue 14): every property memfd-v2 carries can be set, and is checked
after the kexec (memfdprops.py):
- `seals: [seal, shrink, grow, write, future_write, exec]` (or the F_SEAL_* bits as an
  integer): added after the fill; the memfd is created with MFD_ALLOW_SEALING. Without
  `seals` a memfd is created as before (no MFD_ALLOW_SEALING: the kernel sets F_SEAL_SEAL).
- `huge: always|within_size|never`: Linux has no memfd_create flag for THP shmem (MFD_HUGETLB
  is hugetlbfs, which LUO refuses); the host's /sys/kernel/mm/transparent_hugepage/
  shmem_enabled decides. The agent fills such a memfd through a shared mapping with
  MADV_HUGEPAGE (always, within_size: huge folios where shmem_enabled is always,
  within_size, advise or force; the file is sized before the fill, so both give the same
  folios) or MADV_NOHUGEPAGE (never: order 0 unless shmem_enabled is force). The report
  counts the folios by order before and after.
- `holes: [[offset, length], ...]` or `{every: S, length: L, offset: O}`: ranges never
  written (they read as zeros; the fill pattern is zeroed there, so sha256 covers it).
- `position: N | end`: the file offset set after the fill (memfd-v2 carries f_pos).
A session entry may generate memfds and sessions: `files: N` (1..1000) adds N memfds made
from `file:` (a memfd template: size, seed, seals, huge, holes, position) with tokens
`token_base + i` (default 0); `sessions: N` (1..100) makes the entry N sessions named
`NAME-0` .. `NAME-<N-1>`, each with the same memfds. parse_spec expands both into concrete
memfds, so everything after it (holder, journal, report) sees plain sessions and memfds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import random
import re
import struct
import sys
from array import array
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from .errors import InputError

__all__ = ["SpecError", "MemfdSpec", "SessionSpec", "WorkloadSpec", "parse_size", "load_spec",
           "parse_spec", "decode_spec", "make_memfd", "fill_pattern", "hash_fd", "pfn_runs",
           "runs_to_pfns", "WorkloadRecord", "AGENT_SESSION", "JOURNAL_TOKEN", "SEALS",
           "HUGE_MODES", "MAX_FILES", "MAX_SESSIONS", "seal_names", "expected_bytes",
           "create_memfd", "create_pattern_memfd"]

AGENT_SESSION = "kho-agent"      # the agent's own LUO session (journal memfd)
JOURNAL_TOKEN = 0x4B484F4A       # "KHOJ"
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?i?B?)?\s*$", re.I)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# F_SEAL_* (include/uapi/linux/fcntl.h); all of them are in MEMFD_LUO_ALL_SEALS
SEALS = {"seal": 0x1, "shrink": 0x2, "grow": 0x4, "write": 0x8, "future_write": 0x10,
         "exec": 0x20}
ALL_SEALS = 0x3F
MFD_ALLOW_SEALING = 0x2
HUGE_MODES = ("always", "within_size", "never")
MAX_FILES = 1000              # generated memfds per session entry (`files: N`)
MAX_SESSIONS = 100            # generated sessions per session entry (`sessions: N`)
MAX_TOTAL_MEMFDS = 20000      # after expansion (each one an open fd in the holder)
MAX_HOLES = 4096              # per memfd
MAX_MEMFD_BYTES = 1 << 40     # per memfd
MAX_POSITION = (1 << 63) - 1  # MAX_LFS_FILESIZE


class SpecError(ValueError, InputError):
    """A bad workload spec; the message names the file and field."""


def parse_size(v: Any, where: str) -> int:
    """Bytes from 4096, "64MiB", "1G", ... (binary units)."""
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise SpecError(f"{where}: not a size: {v!r:.40} (e.g. 4096, 64MiB, 1GiB)")
    if isinstance(v, int) and v >= 0:
        return v
    m = _SIZE.match(str(v))
    if not m:
        raise SpecError(f"{where}: not a size: {v!r} (e.g. 4096, 64MiB, 1GiB)")
    unit = (m.group(2) or "").upper().replace("I", "").replace("B", "") or ""
    return int(m.group(1)) * _UNITS[unit]


@dataclass
class MemfdSpec:
    """One memfd to preserve; seals/huge/holes/position are its workload kind."""

    token: int
    size: int = 0
    seed: int = 0
    adopt: bool = False
    seals: Optional[int] = None          # F_SEAL_* bits; None: created without ALLOW_SEALING
    huge: Optional[str] = None           # always, within_size, never; None: plain write()
    holes: list[list[int]] = field(default_factory=list)    # [[offset, length], ...], sorted
    position: int = 0                    # file offset after the fill

    @property
    def kind(self) -> dict[str, Any]:
        """The requested properties, as the journal records them next to what was found."""
        out: dict[str, Any] = {}
        if self.seals is not None:
            out["seals"] = seal_names(self.seals)
        if self.huge is not None:
            out["huge"] = self.huge
        if self.holes:
            out["holes"] = [list(h) for h in self.holes]
        if self.position:
            out["position"] = self.position
        return out


@dataclass
class SessionSpec:
    name: str
    memfds: list[MemfdSpec] = field(default_factory=list)


@dataclass
class WorkloadSpec:
    sessions: list[SessionSpec] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(m.size for s in self.sessions for m in s.memfds)

    def to_json(self) -> dict:
        return asdict(self)


def _utf8_len(name: str) -> int:
    """Length of `name` in UTF-8 bytes; -1 if it cannot be encoded (lone surrogates)."""
    try:
        return len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return -1


def seal_names(bits: int) -> list[str]:
    """["seal", "write", ...] of F_SEAL_* bits (unknown bits as hex)."""
    out = [n for n, b in SEALS.items() if bits & b]
    rest = bits & ~ALL_SEALS
    return out + ([f"{rest:#x}"] if rest else [])


def _int(v: Any) -> Optional[int]:
    """An integer from an int or a "0x..." / decimal string, else None."""
    if isinstance(v, str):
        try:
            return int(v, 0)
        except ValueError:
            return None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _count(s: dict, key: str, top: int, where: str) -> Optional[int]:
    if key not in s:
        return None
    n = s[key]
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= top:
        raise SpecError(f"{where}.{key}: must be an integer in 1..{top}, got {n!r:.40}")
    return n


def _seals(v: Any, where: str) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        if not 0 <= v <= ALL_SEALS:
            raise SpecError(f"{where}: F_SEAL_* bits must be within {ALL_SEALS:#x} "
                            f"(memfd-v2 preserves no others), got {v:#x}")
        return v
    if not isinstance(v, list):
        raise SpecError(f"{where}: a list of seal names ({', '.join(SEALS)}) is required")
    bits = 0
    for i, name in enumerate(v):
        b = SEALS.get(name.lower().replace("-", "_")) if isinstance(name, str) else None
        if b is None:
            raise SpecError(f"{where}[{i}]: unknown seal {name!r:.40} "
                            f"(known: {', '.join(SEALS)})")
        bits |= b
    return bits


def _holes(v: Any, size: int, where: str) -> list[list[int]]:
    """[[offset, length], ...] from a list of pairs or an {every, length, offset} pattern:
    sorted, non-overlapping, non-empty, inside the file."""
    if isinstance(v, dict):
        unknown = sorted(set(v) - {"every", "length", "offset"})
        if unknown:
            raise SpecError(f"{where}.{unknown[0]}: unknown key (known: every, length, offset)")
        every = parse_size(v.get("every", 0), f"{where}.every")
        length = parse_size(v.get("length", 0), f"{where}.length")
        start = parse_size(v.get("offset", 0), f"{where}.offset")
        if every <= 0 or not 0 < length <= every:
            raise SpecError(f"{where}: needs every > 0 and 0 < length <= every")
        if start < size and (size - start + every - 1) // every > MAX_HOLES:
            raise SpecError(f"{where}: more than {MAX_HOLES} holes in {size} bytes")
        pairs = [[o, min(length, size - o)] for o in range(start, size, every)]
    elif isinstance(v, list):
        if len(v) > MAX_HOLES:
            raise SpecError(f"{where}: {len(v)} holes: at most {MAX_HOLES}")
        pairs = []
        for i, h in enumerate(v):
            if not isinstance(h, list) or len(h) != 2:
                raise SpecError(f"{where}[{i}]: expected [offset, length]")
            pairs.append([parse_size(h[0], f"{where}[{i}][0]"),
                          parse_size(h[1], f"{where}[{i}][1]")])
    else:
        raise SpecError(f"{where}: expected a list of [offset, length] or "
                        f"{{every, length, offset}}")
    end = 0
    for i, (off, ln) in enumerate(pairs):
        if ln <= 0 or off < end or off + ln > size:
            raise SpecError(f"{where}[{i}]: hole [{off}, {ln}] is empty, overlaps the one "
                            f"before, or ends past the size ({size})")
        end = off + ln
    return pairs


_MEMFD_KEYS = ("token", "size", "seed", "adopt", "seals", "huge", "holes", "position")
_TEMPLATE_KEYS = ("size", "seed", "seals", "huge", "holes", "position")


def _memfd(m: dict, tok: int, where: str, seed_default: int) -> MemfdSpec:
    """The MemfdSpec of mapping `m` (token already checked)."""
    adopt = m.get("adopt", False)
    if not isinstance(adopt, bool):
        raise SpecError(f"{where}.adopt: must be true or false, got {adopt!r:.40}")
    size = 0 if adopt else parse_size(m.get("size", 0), f"{where}.size")
    if not adopt and size <= 0:
        raise SpecError(f"{where}.size: must be > 0 (or set adopt: true)")
    if size > MAX_MEMFD_BYTES:
        raise SpecError(f"{where}.size: {size} bytes: at most {MAX_MEMFD_BYTES} bytes (1 TiB) "
                        "per memfd")
    seed = m.get("seed", seed_default)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise SpecError(f"{where}.seed: must be an integer")
    kinds = [k for k in ("seals", "huge", "holes", "position")
             if m.get(k) not in (None, [], 0)]
    if adopt and kinds:
        raise SpecError(f"{where}.{kinds[0]}: an adopted memfd is the workload's own "
                        f"(its properties are recorded, not set)")
    seals = None if m.get("seals") is None else _seals(m["seals"], f"{where}.seals")
    huge = m.get("huge")
    if huge is not None and huge not in HUGE_MODES:
        raise SpecError(f"{where}.huge: must be one of {', '.join(HUGE_MODES)}, "
                        f"got {huge!r:.40}")
    holes = [] if m.get("holes") in (None, []) else _holes(m["holes"], size, f"{where}.holes")
    pos = m.get("position", 0)
    if pos == "end":
        pos = size
    elif pos is None:
        pos = 0
    else:
        pos = parse_size(pos, f"{where}.position")
        if pos > MAX_POSITION:
            raise SpecError(f"{where}.position: at most {MAX_POSITION}")
    return MemfdSpec(tok, size, seed, adopt, seals, huge, holes, pos)


def _check_keys(m: dict, known: tuple[str, ...], where: str) -> None:
    for k in m:
        if k not in known:
            raise SpecError(f"{where}.{k}: unknown key (known: {', '.join(known)})")


def _session_memfds(s: dict, w: str, name: str) -> list[MemfdSpec]:
    """The memfds of session entry `s`: its `memfds` list plus `files: N` generated ones."""
    tokens: set[int] = set()
    out: list[MemfdSpec] = []
    memfds = s.get("memfds") or []
    if not isinstance(memfds, list):
        raise SpecError(f"{w}.memfds: expected a list, got {type(memfds).__name__}")
    for j, m in enumerate(memfds):
        wm = f"{w}.memfds[{j}]"
        if not isinstance(m, dict):
            raise SpecError(f"{wm}: expected a mapping")
        _check_keys(m, _MEMFD_KEYS, wm)
        tok = _int(m.get("token"))
        if tok is None or not 0 <= tok < 1 << 64:
            raise SpecError(f"{wm}.token: an integer token (u64) is required")
        if tok in tokens:
            raise SpecError(f"{wm}.token: {tok} used twice in session {name!r}")
        tokens.add(tok)
        out.append(_memfd(m, tok, wm, tok))
    nfiles = _count(s, "files", MAX_FILES, w)
    if nfiles is None:
        if "file" in s or "token_base" in s:
            raise SpecError(f"{w}.files: required with file/token_base (how many memfds)")
        return out
    tmpl = s.get("file", {"size": 4096})
    if not isinstance(tmpl, dict):
        raise SpecError(f"{w}.file: expected a mapping (a memfd template)")
    _check_keys(tmpl, _TEMPLATE_KEYS, f"{w}.file")
    base = _int(s.get("token_base", 0))
    if base is None or not 0 <= base or base + nfiles > 1 << 64:
        raise SpecError(f"{w}.token_base: an integer token (u64) is required")
    first = _memfd({"size": 4096, **tmpl}, base, f"{w}.file", base)
    seed0 = tmpl.get("seed")
    for i in range(nfiles):
        tok = base + i
        if tok in tokens:
            raise SpecError(f"{w}.token_base: generated token {tok} is also in memfds")
        out.append(MemfdSpec(tok, first.size, tok if seed0 is None else first.seed + i,
                             False, first.seals, first.huge, [list(h) for h in first.holes],
                             first.position))
    return out


def parse_spec(raw: Any, where: str = "spec") -> WorkloadSpec:
    """Validate a decoded spec, naming the offending field in errors; `files: N` and
    `sessions: N` are expanded into concrete memfds and sessions."""
    if not isinstance(raw, dict) or not isinstance(raw.get("sessions"), list):
        raise SpecError(f"{where}: expected a mapping with a 'sessions' list")
    out = WorkloadSpec()
    seen_names: set[str] = set()
    total = 0
    for i, s in enumerate(raw["sessions"]):
        w = f"{where}: sessions[{i}]"
        if not isinstance(s, dict):
            raise SpecError(f"{w}: expected a mapping")
        _check_keys(s, ("name", "memfds", "files", "file", "token_base", "sessions"), w)
        name = s.get("name")
        if not isinstance(name, str) or not name.isprintable() or not 0 < _utf8_len(name) < 64:
            raise SpecError(f"{w}.name: a printable name of 1..63 UTF-8 bytes is required")
        nsess = _count(s, "sessions", MAX_SESSIONS, w)
        names = [name] if nsess is None else [f"{name}-{k}" for k in range(nsess)]
        if not 0 < _utf8_len(names[-1]) < 64:
            raise SpecError(f"{w}.name: {names[-1]!r} (generated by sessions: {nsess}) "
                            f"is longer than 63 UTF-8 bytes")
        memfds = _session_memfds(s, w, name)
        total += len(memfds) * len(names)
        if total > MAX_TOTAL_MEMFDS:
            raise SpecError(f"{w}: {total} memfds in all: at most {MAX_TOTAL_MEMFDS}")
        for n in names:
            if n == AGENT_SESSION or n in seen_names:
                raise SpecError(f"{w}.name: {n!r} is reserved or used twice")
            seen_names.add(n)
            out.sessions.append(SessionSpec(n, memfds if n == names[0] else [
                MemfdSpec(m.token, m.size, m.seed, m.adopt, m.seals, m.huge,
                          [list(h) for h in m.holes], m.position) for m in memfds]))
    return out


def decode_spec(data: bytes, path: str) -> Any:
    """The decoded document of spec file `path`: UTF-8 JSON, or YAML if PyYAML is installed
    on this host. SpecError names the file for bytes that are neither."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not a text file (invalid UTF-8 at byte {e.start})") from None
    if "\0" in text:
        raise SpecError(f"{path}: not a text file (NUL byte at {text.index(chr(0))})")
    try:
        return json.loads(text)
    except RecursionError:
        raise SpecError(f"{path}: not JSON (nested too deeply)") from None
    except ValueError as je:
        try:
            import yaml
        except ImportError:
            raise SpecError(f"{path}: not JSON ({je}); YAML needs PyYAML on this host") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as ye:
            raise SpecError(f"{path}: bad YAML: {str(ye).splitlines()[0]}") from None
        except (ValueError, TypeError, RecursionError) as ye:   # constructors (dates, ...)
            raise SpecError(f"{path}: bad YAML: {ye}") from None


def load_spec(path: str) -> WorkloadSpec:
    """Read and validate a spec file; SpecError names the file (and the field)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SpecError(f"{path}: {e.strerror or e}") from None
    return parse_spec(decode_spec(data, path), path)


_PATTERN_BLOCK = 1 << 20


def fill_pattern(token: int, seed: int, size: int, page_size: int = 4096) -> bytes:
    """Deterministic bytes: a seeded 1 MiB block repeated, each page stamped with
    (token, page index) as two little-endian u64 so a misplaced page is as detectable as
    a flipped bit. A stable format: journals and the verify side depend on these bytes.

    At memory speed: the result is written once, by one bytes.join of per-page pieces
    (a 16-byte stamp sliced from one array of all stamps, then the rest of the page as
    one of the block's memoryviews) -- no per-page Python arithmetic, no intermediate copies.
    """
    block = random.Random(seed).randbytes(_PATTERN_BLOCK)
    pieces = _pattern_pieces(block, token, size, page_size)
    if pieces is None:
        return _fill_pattern_slow(block, token, size, page_size)
    return b"".join(pieces)


def _pattern_pieces(block: bytes, token: int, size: int, page_size: int) -> Optional[list[Any]]:
    """The fill pattern as a list of buffers to concatenate (fill_pattern's fast path), or
    None where only the page loop applies (odd page sizes, tokens that are not u64)."""
    npages = size // page_size
    if not (npages > 0 and 16 <= page_size <= _PATTERN_BLOCK
            and _PATTERN_BLOCK % page_size == 0 and 0 <= token < 1 << 64):
        return None
    stamps = array("Q", [token]) * (2 * npages)
    stamps[1::2] = array("Q", range(npages))
    if sys.byteorder != "little":
        stamps.byteswap()
    sv, bv = stamps.tobytes(), memoryview(block)    # 16-byte bytes stamps: small objects
    ends = range(16, 16 * npages + 16, 16)
    per_block = _PATTERN_BLOCK // page_size
    bodies = [bv[o + 16:o + page_size] for o in range(0, _PATTERN_BLOCK, page_size)]
    pieces: list[Any] = [b""] * (2 * npages)
    pieces[0::2] = map(sv.__getitem__, map(slice, range(0, 16 * npages, 16), ends))
    pieces[1::2] = bodies * (npages // per_block) + bodies[:npages % per_block]
    tail = size - npages * page_size
    if tail:
        start = npages * page_size % _PATTERN_BLOCK
        pieces.append(bv[start:start + tail])
    return pieces


def _fill_pattern_slow(block: bytes, token: int, size: int, page_size: int) -> bytes:
    """fill_pattern() for the cases the fast path leaves out (odd page sizes, tokens
    that are not u64: struct raises as it always did), page by page."""
    data = bytearray(block * -(-size // len(block)))
    del data[size:]
    stamp = struct.Struct("<QQ")
    for i in range(size // page_size):
        stamp.pack_into(data, i * page_size, token, i)
    return bytes(data)


def make_memfd(name: str, data: bytes) -> int:
    """A memfd holding `data` (written, so every page is allocated)."""
    fd = os.memfd_create(name, getattr(os, "MFD_CLOEXEC", 1))
    try:
        view = memoryview(data)
        off = 0
        while off < len(view):
            off += os.write(fd, view[off:off + (8 << 20)])
        os.lseek(fd, 0, os.SEEK_SET)
        return fd
    except BaseException:
        os.close(fd)
        raise


def expected_bytes(m: MemfdSpec, page_size: int) -> bytes:
    """The bytes memfd `m` holds: the fill pattern, zeros in its holes."""
    data = fill_pattern(m.token, m.seed, m.size, page_size)
    if not m.holes:
        return data
    buf = bytearray(data)
    for off, ln in m.holes:
        buf[off:off + ln] = bytes(ln)
    return bytes(buf)


def _segments(size: int, holes: list[list[int]]) -> list[tuple[int, int]]:
    """[(offset, end)] of the bytes outside `holes` (sorted, non-overlapping)."""
    out, at = [], 0
    for off, ln in holes:
        if off > at:
            out.append((at, off))
        at = off + ln
    if at < size:
        out.append((at, size))
    return out


def create_pattern_memfd(name: str, m: MemfdSpec, page_size: int) -> Optional[int]:
    """create_memfd(name, m, expected_bytes(m, page_size)) without the bytes in between:
    the pattern's pieces are gathered straight into the memfd by pwritev (one copy of
    the data instead of two, and no second buffer of the memfd's size). For memfds with
    neither holes nor `huge` (those are written through create_memfd); None for them,
    and where the pattern has no fast form."""
    if m.holes or m.huge is not None or m.adopt:
        return None
    pieces = _pattern_pieces(random.Random(m.seed).randbytes(_PATTERN_BLOCK), m.token,
                             m.size, page_size)
    if pieces is None:
        return None
    flags = getattr(os, "MFD_CLOEXEC", 1) | (MFD_ALLOW_SEALING if m.seals is not None else 0)
    fd = os.memfd_create(name, flags)
    try:
        os.ftruncate(fd, m.size)
        per = max(1, min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024))
        off = 0
        for k in range(0, len(pieces), per):
            batch = pieces[k:k + per]
            want = sum(len(b) for b in batch)
            got = os.pwritev(fd, batch, off)
            if got < want:                          # short write: the rest one by one
                rest = memoryview(b"".join(batch))[got:]
                while len(rest):
                    rest = rest[os.pwrite(fd, rest, off + want - len(rest)):]
            off += want
        return _position_and_seal(fd, m)
    except BaseException:
        os.close(fd)
        raise


def _position_and_seal(fd: int, m: MemfdSpec) -> int:
    """The last steps of making a workload memfd: its file position, then its seals."""
    os.lseek(fd, m.position, os.SEEK_SET)
    if m.seals:
        fcntl.fcntl(fd, getattr(fcntl, "F_ADD_SEALS", 1033), m.seals)
    return fd


def create_memfd(name: str, m: MemfdSpec, data: bytes) -> int:
    """A memfd of spec `m` holding `data` (expected_bytes): written outside its holes
    (through a MADV_HUGEPAGE / MADV_NOHUGEPAGE mapping for `huge`), positioned, sealed."""
    flags = getattr(os, "MFD_CLOEXEC", 1) | (MFD_ALLOW_SEALING if m.seals is not None else 0)
    fd = os.memfd_create(name, flags)
    try:
        view = memoryview(data)
        os.ftruncate(fd, len(data))
        segs = _segments(len(data), m.holes)
        if m.huge is not None and len(data):
            with mmap.mmap(fd, len(data), mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE) as mm:
                advice = (getattr(mmap, "MADV_NOHUGEPAGE", 15) if m.huge == "never"
                          else getattr(mmap, "MADV_HUGEPAGE", 14))
                try:
                    mm.madvise(advice)
                except OSError:
                    pass            # a kernel without THP: order-0 folios, the report says so
                for a, b in segs:
                    mm[a:b] = view[a:b]
        else:
            for a, b in segs:
                off = a
                while off < b:
                    off += os.pwrite(fd, view[off:min(b, off + (8 << 20))], off)
        return _position_and_seal(fd, m)
    except BaseException:
        os.close(fd)
        raise


def hash_fd(fd: int, size: Optional[int] = None) -> str:
    """sha256 of a file's first `size` bytes (default: all).

    preadv into one reused 8 MiB buffer: cheaper than faulting in a fresh mmap
    (bench/verify_throughput.py), and it leaves the file offset alone.
    """
    if size is None:
        size = os.fstat(fd).st_size
    h = hashlib.sha256()
    buf = memoryview(bytearray(min(size, 8 << 20) or 1))
    off = 0
    while off < size:
        n = os.preadv(fd, [buf[:min(len(buf), size - off)]], off)
        if n <= 0:
            raise OSError(f"memfd shorter than {size} bytes (read {off})")
        h.update(buf[:n])
        off += n
    return h.hexdigest()


def pfn_runs(pfns: list[int]) -> list[list[int]]:
    """[[first_pfn, count], ...] of consecutive PFNs, in file order."""
    out: list[list[int]] = []
    for p in pfns:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1][1] += 1
        else:
            out.append([p, 1])
    return out


def runs_to_pfns(runs: list[list[int]]) -> list[int]:
    return [p + i for p, n in runs for i in range(n)]


@dataclass
class WorkloadRecord:
    """What the agent knows about one preserved memfd, before and after the handover."""

    session: str
    token: int
    size: int
    sha256_before: str
    pfn_runs_before: list[list[int]]
    source: str = "created"
    sha256_after: Optional[str] = None
    pfn_runs_after: Optional[list[list[int]]] = None
    error: Optional[str] = None
    props_before: Optional[dict[str, Any]] = None     # memfdprops.read_props (+ "kind")
    props_after: Optional[dict[str, Any]] = None
    props_mismatch: list[str] = field(default_factory=list)   # memfdprops.compare

    @property
    def pfns_identical(self) -> bool:
        return self.pfn_runs_after is not None and self.pfn_runs_after == self.pfn_runs_before

    @property
    def verified(self) -> bool:
        return (self.error is None and self.sha256_after == self.sha256_before
                and self.pfns_identical and not self.props_mismatch)
