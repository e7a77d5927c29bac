"""Restore at boot: what the boot-time verify (kho-agent-verify.service) found before it
retrieved anything, who verified, and how long systemd's shutdown took on the old kernel.

After a KHO kexec the boot unit runs `kho-agent verify --at-boot` as early as systemd
allows. Two early reads, in this order, before any RETRIEVE:
1. the incoming radix tree (snapshot.read_incoming), first thing: its node pages were never
   preserved and the new kernel reuses them soon after boot (lab README finding 4), so the
   record says how many of the pre-kexec snapshot's blocks the tree still held, and how
   many seconds after the kernel started it was read;
2. /proc/kpageflags of every preserved page (kpageflags.py): a workload page still
   preserved is neither free (BUDDY) nor on an LRU. This holds even when the tree itself is
   gone: proof that the new kernel honoured the tree.
The record (state dir `boot.json`, the report's `boot`) says which of the two could be
established. The controller, when it reconnects, collects the unit's result (`verify
--collect`) instead of verifying again.

systemd's shutdown on the old kernel: the holder writes a stamp when SIGTERM reaches it
(`systemctl kexec` stopping the holder unit, i.e. the holder's ExecStop point); kexec_exec
-> that stamp is the part of the shutdown before the agent's unit went down, that stamp ->
kernel start the rest (other units, systemd-shutdown's LUO preserve, kexec, early boot).

Pure functions, plus the two small stamp files; the kernel is reached only through the
Kernel seam passed in. Stdlib only.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from .errors import KhoAgentError
from .kpageflags import check_preserved, pfns_of_blocks

__all__ = ["BOOT_FILE", "STOP_STAMP", "VERIFIED_BY_UNIT", "VERIFIED_BY_CONTROLLER",
           "BootRecord", "stamp_holder_stopped", "read_holder_stopped", "tree_record",
           "pages_record", "verdicts", "shutdown_spans"]

BOOT_FILE = "boot.json"
EARLY_FILE = "early.json"              # `kho-agent early`: the same reads, before any unit
STOP_STAMP = "holder-stopped"          # epoch seconds, written at SIGTERM by the holder
VERIFIED_BY_UNIT = "kho-agent-verify.service"
VERIFIED_BY_CONTROLLER = "controller"


@dataclass
class BootRecord:
    """What the verify of this boot found before retrieving, and when (boot.json)."""

    verified_by: str = VERIFIED_BY_CONTROLLER
    kernel_start: Optional[float] = None
    tree: dict[str, Any] = field(default_factory=dict)
    kpageflags: dict[str, Any] = field(default_factory=dict)
    established: list[str] = field(default_factory=list)
    not_established: list[str] = field(default_factory=list)
    holder_stopped: Optional[float] = None
    systemd_shutdown_s: Optional[float] = None     # kexec_exec -> the holder's stop stamp
    stopped_to_kernel_s: Optional[float] = None    # that stamp -> the new kernel's start
    # the same reads made earlier in this boot by `kho-agent early` (an initramfs hook):
    # {"by", "tree", "kpageflags", "established", "not_established"}
    early: Optional[dict[str, Any]] = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --- stamps (the only file I/O here) -------------------------------------------------------

def stamp_holder_stopped(state_dir: str) -> None:
    """Record now as the moment the holder was told to stop (fsync'd: the shutdown goes on
    to unmount and kexec). Never raises: a stop must not fail for a stamp."""
    try:
        path = os.path.join(state_dir, STOP_STAMP)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{time.time():.6f}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def read_holder_stopped(state_dir: str) -> Optional[float]:
    """The holder's stop stamp, None when there is none (or it is not a number)."""
    try:
        with open(os.path.join(state_dir, STOP_STAMP)) as f:
            return float(f.read().strip())
    except (OSError, ValueError):
        return None


# --- pure functions ---------------------------------------------------------------------

def _round(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 6)


def tree_record(incoming: dict[str, Any], t_read: float,
                kernel_start: Optional[float]) -> dict[str, Any]:
    """The early tree read: when (seconds after the kernel started), intact or not, and how
    many of the snapshot's blocks it still held (snapshot.read_incoming's raw dict).

    >>> tree_record({"present": True, "intact": True, "valid_nodes": 3, "blocks_held": 5,
    ...              "blocks_total": 5}, 110.5, 100.0)["read_s_after_kernel_start"]
    10.5
    """
    return {"read_at": t_read,
            "read_s_after_kernel_start": _round(t_read - kernel_start)
            if kernel_start is not None else None,
            "present": bool(incoming.get("present")), "intact": bool(incoming.get("intact")),
            "valid_nodes": incoming.get("valid_nodes"),
            "blocks_held": incoming.get("blocks_held"),
            "blocks_total": incoming.get("blocks_total")}


def pages_record(kernel: Any, snapshot: Optional[dict[str, Any]],
                 workload_pfns: list[int], kernel_start: Optional[float]) -> dict[str, Any]:
    """/proc/kpageflags of every preserved page, before retrieval: the workloads' pages
    (the proof) and, separately, every other page of the snapshot (LUO's and KHO's own
    blobs are freed by their owners early in boot: counted, not judged)."""
    t = time.time()
    out: dict[str, Any] = {"read_at": t,
                           "read_s_after_kernel_start": _round(t - kernel_start)
                           if kernel_start is not None else None}
    ps = kernel.page_size()
    snap_pfns = (pfns_of_blocks(snapshot.get("blocks") or [], ps)
                 if snapshot and not snapshot.get("skipped") else [])
    try:
        wf = kernel.page_flags(workload_pfns) if workload_pfns else []
        rest = sorted(set(snap_pfns) - set(workload_pfns))
        rf = kernel.page_flags(rest) if rest else []
    except (KhoAgentError, OSError) as e:
        out["error"] = f"/proc/kpageflags unreadable: {e}"
        return out
    if wf is None or rf is None:
        out["error"] = "no /proc/kpageflags on this kernel"
        return out
    out["workloads"] = check_preserved(workload_pfns, wf).to_json()
    if snap_pfns:
        out["snapshot_other"] = check_preserved(rest, rf).to_json()
    return out


def verdicts(tree: dict[str, Any], pages: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(established, not established): the tree as the snapshot had it, the preserved
    pages honoured by the new kernel -- one line each.

    >>> ok, no = verdicts({"present": True, "intact": True, "blocks_held": 4,
    ...                    "blocks_total": 4, "read_s_after_kernel_start": 2.0},
    ...                   {"workloads": {"pages": 8, "honoured": True, "reserved": 0,
    ...                                  "no_flags": 8}})
    >>> print("\\n".join(ok)); no
    radix tree: intact 2.0 s after kernel start, 4 of 4 snapshot blocks held
    kpageflags: all 8 workload pages preserved (none free or on an LRU; 8 with no flags, 0 reserved)
    []
    """
    ok: list[str] = []
    no: list[str] = []
    held, total = tree.get("blocks_held"), tree.get("blocks_total")
    when = tree.get("read_s_after_kernel_start")
    at = f" {when:.1f} s after kernel start" if isinstance(when, (int, float)) else ""
    blocks = (f", {held} of {total} snapshot blocks held" if total is not None else
              ", no snapshot to compare with")
    if not tree.get("present"):
        no.append("radix tree: no incoming KHO tree in this kernel")
    elif tree.get("intact") and held == total:
        ok.append(f"radix tree: intact{at}{blocks}")
    else:
        no.append(f"radix tree: not intact when read{at}{blocks}")
    w = pages.get("workloads")
    if pages.get("error"):
        no.append(f"kpageflags: {pages['error']}")
    elif not w or not w.get("pages"):
        no.append("kpageflags: no workload pages to check")
    elif w.get("honoured"):
        ok.append(f"kpageflags: all {w['pages']} workload pages preserved (none free or on "
                  f"an LRU; {w.get('no_flags')} with no flags, {w.get('reserved')} reserved)")
    else:
        bad = w["pages"] - w.get("no_flags", 0) - w.get("reserved", 0)
        no.append(f"kpageflags: {bad} of {w['pages']} workload pages were handed out again "
                  f"(buddy {w.get('buddy')}, lru {w.get('lru')}): "
                  + "; ".join(w.get("examples") or []))
    return ok, no


def shutdown_spans(kexec_exec: Optional[float], stopped: Optional[float],
                   kernel_start: Optional[float]) -> tuple[Optional[float], Optional[float]]:
    """(kexec_exec -> holder stopped, holder stopped -> kernel start), None where the stop
    stamp is not of this handover (not between the two).

    >>> shutdown_spans(100.0, 101.25, 104.0)
    (1.25, 2.75)
    >>> shutdown_spans(100.0, 99.0, 104.0)
    (None, None)
    """
    if kexec_exec is None or stopped is None or not kexec_exec <= stopped:
        return None, None
    if kernel_start is not None and stopped > kernel_start:
        return None, None
    return (_round(stopped - kexec_exec),
            _round(kernel_start - stopped) if kernel_start is not None else None)
