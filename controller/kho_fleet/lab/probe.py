"""Build deploy/lab/kho-probe.c (static /init) and parse its `KHO-PROBE ...` console records.

The record format is documented at the top of kho-probe.c.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from ..errors import KhoFleetError

PAGE_SIZE = 4096
PATTERN_BASE = 0x4B484F0000000000
READY_MARKER = "KHO-PROBE READY"
ERROR_MARKER = "KHO-PROBE ERROR"

_REC = re.compile(r"KHO-PROBE (\S+)(.*)$")


class ProbeError(KhoFleetError, RuntimeError):
    """The probe could not be built, reported an error, or its output is inconsistent."""


@dataclass
class ProbeMemfd:
    """One preserved memfd: its LUO token, size, and PFN ranges as (first_pfn, count)."""

    token: int
    size: int
    pages: int
    ranges: list[tuple[int, int]] = field(default_factory=list)

    def pfns(self) -> list[int]:
        """Every PFN in file order (page i of the memfd is pfns()[i])."""
        return [start + i for start, count in self.ranges for i in range(count)]


@dataclass
class ProbeReport:
    """Everything the probe printed before READY."""

    release: Optional[str]
    memfds: list[ProbeMemfd]
    outfdt: bytes
    errors: list[str]


def page_word(token: int, page: int, word: int) -> int:
    """The u64 the probe wrote at word `word` (0..511) of page `page` of memfd `token`."""
    return PATTERN_BASE ^ (token << 24) ^ (page << 9) ^ word


def compile_probe(
    source: Union[str, Path], out: Union[str, Path], cc: str = "gcc", timeout: float = 120.0
) -> Path:
    """`cc -static -O2` the probe; ProbeError (with the compiler output) if that fails."""
    compiler = shutil.which(cc)
    if compiler is None:
        raise ProbeError(f"{cc} not found")
    cmd = [compiler, "-static", "-O2", "-Wall", "-o", str(out), str(source)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProbeError(f"{' '.join(cmd)}: {exc}") from exc
    if res.returncode != 0:
        raise ProbeError(f"{' '.join(cmd)} failed:\n{(res.stderr or res.stdout).strip()[-2000:]}")
    return Path(out)


def _kv(rest: str) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in rest.split() if "=" in tok)


def parse_probe_output(serial: str) -> ProbeReport:
    """Parse the serial log; ProbeError if records are missing or inconsistent."""
    release: Optional[str] = None
    memfds: dict[int, ProbeMemfd] = {}
    ended: dict[int, tuple[int, int]] = {}
    fdt_chunks: dict[int, bytes] = {}
    fdt_len: Optional[int] = None
    errors: list[str] = []
    for raw in serial.splitlines():
        m = _REC.search(raw)
        if not m:
            continue
        kind, rest = m.group(1), m.group(2).strip()
        if kind == "uname":
            release = _kv(rest).get("release")
        elif kind == "memfd":
            kv = _kv(rest)
            tok = int(kv["token"], 16)
            memfds[tok] = ProbeMemfd(tok, int(kv["size"]), int(kv["pages"]))
        elif kind == "pfns":
            tok_s, _, ranges = rest.partition(" ")
            tok = int(tok_s.split("=", 1)[1], 16)
            if tok not in memfds:
                raise ProbeError(f"pfns before memfd record: {raw!r}")
            for r in ranges.split(","):
                start, count = r.split("+")
                memfds[tok].ranges.append((int(start, 16), int(count, 16)))
        elif kind == "memfd-end":
            kv = _kv(rest)
            ended[int(kv["token"], 16)] = (int(kv["pages"]), int(kv["ranges"]))
        elif kind == "outfdt":
            off_s, _, hexdata = rest.partition(" ")
            fdt_chunks[int(off_s.split("=", 1)[1])] = bytes.fromhex(hexdata.strip())
        elif kind == "outfdt-end":
            fdt_len = int(_kv(rest)["len"])
        elif kind == "ERROR":
            errors.append(rest)
    if errors:
        raise ProbeError(f"probe reported: {'; '.join(errors)}")
    if not memfds:
        raise ProbeError("no memfd records on the console")
    for tok, mf in memfds.items():
        got = sum(c for _, c in mf.ranges)
        if tok not in ended or ended[tok] != (mf.pages, len(mf.ranges)) or got != mf.pages:
            raise ProbeError(
                f"memfd 0x{tok:x}: {got} PFNs in {len(mf.ranges)} ranges, "
                f"expected {mf.pages} (end record {ended.get(tok)}): garbled console?"
            )
    if fdt_len is None:
        raise ProbeError("no outfdt-end record on the console")
    outfdt = bytearray()
    for off in sorted(fdt_chunks):
        if off != len(outfdt):
            raise ProbeError(f"outfdt chunk at {off}, expected {len(outfdt)}: garbled console?")
        outfdt += fdt_chunks[off]
    if len(outfdt) != fdt_len:
        raise ProbeError(f"outfdt: got {len(outfdt)} bytes, probe read {fdt_len}")
    ordered = sorted(memfds.values(), key=lambda m: m.token)
    return ProbeReport(release, ordered, bytes(outfdt), errors)
