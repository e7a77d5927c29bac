"""Workload memfds: the spec of what to preserve, a seeded fill pattern, hashing and PFN runs.

A spec (JSON; YAML too when PyYAML happens to be installed) lists sessions of memfds:
{"sessions": [{"name": "vm-ram", "memfds": [{"token": 4097, "size": "64MiB", "seed": 1},
{"token": 4098, "adopt": true}]}]}. `adopt` memfds are handed to the holder by the real
workload over its unix socket (SCM_RIGHTS) instead of being created.
"""

from __future__ import annotations

import hashlib
import json
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
           "runs_to_pfns", "WorkloadRecord", "AGENT_SESSION", "JOURNAL_TOKEN"]

AGENT_SESSION = "kho-agent"      # the agent's own LUO session (journal memfd)
JOURNAL_TOKEN = 0x4B484F4A       # "KHOJ"
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?i?B?)?\s*$", re.I)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


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
    token: int
    size: int = 0
    seed: int = 0
    adopt: bool = False


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


def parse_spec(raw: Any, where: str = "spec") -> WorkloadSpec:
    """Validate a decoded spec, naming the offending field in errors."""
    if not isinstance(raw, dict) or not isinstance(raw.get("sessions"), list):
        raise SpecError(f"{where}: expected a mapping with a 'sessions' list")
    out = WorkloadSpec()
    seen_names: set[str] = set()
    for i, s in enumerate(raw["sessions"]):
        w = f"{where}: sessions[{i}]"
        if not isinstance(s, dict):
            raise SpecError(f"{w}: expected a mapping")
        name = s.get("name")
        if not isinstance(name, str) or not name.isprintable() or not 0 < _utf8_len(name) < 64:
            raise SpecError(f"{w}.name: a printable name of 1..63 UTF-8 bytes is required")
        if name == AGENT_SESSION or name in seen_names:
            raise SpecError(f"{w}.name: {name!r} is reserved or used twice")
        seen_names.add(name)
        sess = SessionSpec(name)
        tokens: set[int] = set()
        memfds = s.get("memfds") or []
        if not isinstance(memfds, list):
            raise SpecError(f"{w}.memfds: expected a list, got {type(memfds).__name__}")
        for j, m in enumerate(memfds):
            wm = f"{w}.memfds[{j}]"
            if not isinstance(m, dict):
                raise SpecError(f"{wm}: expected a mapping")
            tok = m.get("token")
            if isinstance(tok, str):
                try:
                    tok = int(tok, 0)
                except ValueError:
                    tok = None
            if not isinstance(tok, int) or isinstance(tok, bool) or not 0 <= tok < 1 << 64:
                raise SpecError(f"{wm}.token: an integer token (u64) is required")
            if tok in tokens:
                raise SpecError(f"{wm}.token: {tok} used twice in session {name!r}")
            tokens.add(tok)
            adopt = m.get("adopt", False)
            if not isinstance(adopt, bool):
                raise SpecError(f"{wm}.adopt: must be true or false, got {adopt!r:.40}")
            size = 0 if adopt else parse_size(m.get("size", 0), f"{wm}.size")
            if not adopt and size <= 0:
                raise SpecError(f"{wm}.size: must be > 0 (or set adopt: true)")
            seed = m.get("seed", tok)
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise SpecError(f"{wm}.seed: must be an integer")
            sess.memfds.append(MemfdSpec(tok, size, seed, adopt))
        out.sessions.append(sess)
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
    npages = size // page_size
    if not (npages > 0 and 16 <= page_size <= _PATTERN_BLOCK
            and _PATTERN_BLOCK % page_size == 0 and 0 <= token < 1 << 64):
        return _fill_pattern_slow(block, token, size, page_size)
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
    return b"".join(pieces)


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

    @property
    def pfns_identical(self) -> bool:
        return self.pfn_runs_after is not None and self.pfn_runs_after == self.pfn_runs_before

    @property
    def verified(self) -> bool:
        return (self.error is None and self.sha256_after == self.sha256_before
                and self.pfns_identical)
