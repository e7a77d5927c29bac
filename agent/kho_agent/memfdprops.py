"""What a memfd is, as memfd-v2 carries it across a kexec: size, file position, seals, file
status flags, holes, and folios by order -- read before PRESERVE_FD and after RETRIEVE_FD,
and compared, so a handover that keeps the bytes but loses a seal or the offset fails.

What the kernel promises (mm/memfd_luo.c, linux-source-7.2/7.3) and what we check:
- size, pos (f_pos at freeze), seals (F_GET_SEALS; only MEMFD_LUO_ALL_SEALS), status flags
  (O_RDWR|O_LARGEFILE): identical after.
- folios: every folio is preserved with its order (kho_preserve_folio) and restored as one
  (kho_restore_folio), so the count by order is identical. Counted from pagemap PFNs and
  /proc/kpageflags (KPF_COMPOUND_HEAD/TAIL); where kpageflags is unreadable the count is
  None and the reason is in `folios_note`.
- holes: memfd_pin_folios() at preserve allocates a folio for every index, so the sparse
  layout is NOT kept: holes come back as data that reads as zeros. A hole after the kexec
  where there was data before is a mismatch; a hole filled is what the kernel documents.
  `holes_zero` (after) says whether the bytes of every hole from before read as zeros.

Pure functions at the bottom (folios_by_order, compare); the readers take an fd and leave
its file position where it was. Stdlib only.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Any, Optional

from .kernel import Kernel, KernelError
from .workload import seal_names

__all__ = ["KPF_COMPOUND_HEAD", "KPF_COMPOUND_TAIL", "KPF_THP", "read_seals", "read_holes",
           "holes_are_zero", "read_props", "folios_by_order", "compare", "MAX_HOLES"]

KPF_COMPOUND_HEAD = 1 << 15
KPF_COMPOUND_TAIL = 1 << 16
KPF_THP = 1 << 22
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
MAX_HOLES = 65536          # more are counted as truncated, not listed
_COMPARED = ("size", "pos", "seals", "flags")


def read_seals(fd: int) -> int:
    """F_GET_SEALS (a file that does not support sealing: 0)."""
    try:
        return int(fcntl.fcntl(fd, F_GET_SEALS))
    except OSError as e:
        if e.errno == errno.EINVAL:
            return 0
        raise


def read_holes(fd: int, size: int) -> tuple[list[list[int]], bool]:
    """[[offset, length], ...] of the holes in [0, size) (SEEK_DATA/SEEK_HOLE), and whether
    the list was cut at MAX_HOLES. The file position is restored."""
    pos = os.lseek(fd, 0, os.SEEK_CUR)
    out: list[list[int]] = []
    off = 0
    try:
        while off < size:
            if len(out) >= MAX_HOLES:
                return out, True
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                out.append([off, size - off])          # no data from here to EOF
                break
            if data >= size:
                out.append([off, size - off])
                break
            if data > off:
                out.append([off, data - off])
            off = os.lseek(fd, data, os.SEEK_HOLE)
    finally:
        os.lseek(fd, pos, os.SEEK_SET)
    return out, False


def holes_are_zero(fd: int, holes: list[list[int]]) -> bool:
    """True if every byte of `holes` reads as zero (pread: the position is untouched)."""
    chunk = 1 << 20
    for off, ln in holes:
        end = off + ln
        while off < end:
            raw = os.pread(fd, min(chunk, end - off), off)
            if not raw:
                return False                           # shorter than before: not zeros
            if raw.count(0) != len(raw):
                return False
            off += len(raw)
    return True


def read_props(kernel: Kernel, fd: int, size: int, *, folios: bool = False,
               pfns: Optional[list[int]] = None,
               holes_before: Optional[list[list[int]]] = None) -> dict[str, Any]:
    """The properties of memfd `fd` (its first `size` bytes): size, pos, seals, flags,
    holes; `folios`: also folios_by_order (from `pfns`, or pagemap) and shmem_enabled;
    `holes_before`: also holes_zero (do the holes of before read as zeros now)."""
    st = os.fstat(fd)
    holes, cut = read_holes(fd, min(size, st.st_size))
    out: dict[str, Any] = {
        "size": st.st_size,
        "pos": os.lseek(fd, 0, os.SEEK_CUR),
        "seals": seal_names(read_seals(fd)),
        "flags": fcntl.fcntl(fd, fcntl.F_GETFL),
        "holes": holes,
    }
    if cut:
        out["holes_truncated"] = True
    if holes_before:
        out["holes_zero"] = holes_are_zero(fd, holes_before)
    if folios:
        out["shmem_enabled"] = kernel.shmem_thp()
        try:
            if pfns is None:
                pfns = kernel.memfd_pfns(fd, size)
            flags = kernel.page_flags(pfns) if pfns else []
        except (KernelError, OSError) as e:
            out["folios_by_order"] = None
            out["folios_note"] = f"folios not counted: {e}"
            return out
        if flags is None:
            out["folios_by_order"] = None
            out["folios_note"] = "folios not counted: no /proc/kpageflags"
        else:
            out["folios_by_order"] = folios_by_order(pfns, flags)
    return out


# --- pure ----------------------------------------------------------------------------------

def folios_by_order(pfns: list[int], flags: list[int]) -> dict[str, int]:
    """{"0": n, "9": m, ...}: folios by order of pages in file order (PFN, kpageflags).

    A compound head starts a folio; the tail pages that follow it at consecutive PFNs
    belong to it. A page not present (PFN 0) counts under "absent". A folio that runs past
    the pages looked at counts with the smallest order that covers what was seen.
    """
    out: dict[str, int] = {}
    i, n = 0, min(len(pfns), len(flags))
    while i < n:
        if not pfns[i]:
            out["absent"] = out.get("absent", 0) + 1
            i += 1
            continue
        j = i + 1
        if flags[i] & KPF_COMPOUND_HEAD:
            while (j < n and flags[j] & KPF_COMPOUND_TAIL and not flags[j] & KPF_COMPOUND_HEAD
                   and pfns[j] == pfns[j - 1] + 1):
                j += 1
        key = str((j - i - 1).bit_length())
        out[key] = out.get(key, 0) + 1
        i = j
    return dict(sorted(out.items(), key=lambda kv: (not kv[0].isdigit(), len(kv[0]), kv[0])))


def _span_set(holes: list[list[int]]) -> list[tuple[int, int]]:
    return [(int(o), int(o) + int(n)) for o, n in holes]


def _outside(inner: list[list[int]], outer: list[list[int]]) -> Optional[list[int]]:
    """The first range of `inner` not inside one of `outer`'s ranges, None if none."""
    spans = _span_set(outer)
    for o, n in inner:
        if not any(a <= o and o + n <= b for a, b in spans):
            return [o, n]
    return None


def compare(before: Optional[dict[str, Any]], after: Optional[dict[str, Any]]) -> list[str]:
    """Why the properties after retrieval differ from before, one line each ([] = kept).

    Compared: size, pos (created memfds: `kind` in before), seals, flags exactly;
    folios_by_order where both sides counted
    them; holes: none may appear where there was data (memfd-v2 fills holes at preserve,
    so holes_before -> data is expected), and the old holes must read as zeros.
    """
    if not before or after is None:
        return []
    out: list[str] = []
    for key in _COMPARED:
        if key == "pos" and "kind" not in before:
            continue        # an adopted memfd's workload may move f_pos until the kexec
        if key in before and before.get(key) != after.get(key):
            out.append(f"{key}: {before.get(key)!r} before, {after.get(key)!r} after")
    fb, fa = before.get("folios_by_order"), after.get("folios_by_order")
    if fb is not None and fa is not None and fb != fa:
        out.append(f"folios_by_order: {fb} before, {fa} after")
    hb, ha = before.get("holes"), after.get("holes")
    if isinstance(hb, list) and isinstance(ha, list):
        new = _outside(ha, hb)
        if new is not None:
            out.append(f"holes: [{new[0]}, {new[1]}] is a hole after, data before")
    if after.get("holes_zero") is False:
        out.append("holes: a hole of before does not read as zeros after")
    return out
