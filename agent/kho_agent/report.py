"""The handover report (schema kho-fleet/handover-report/v1) and its node_exporter textfile.

Built from the journal carried across the kexec and the verification after it
(journal.VerifyResult); the same figures go to a `.prom` file for node_exporter's
textfile collector. The report is a `HandoverReport` record; JSON only at the edge:
`to_json()` gives the stable schema (docs, the controller and tests read it),
`HandoverReport.from_json()` reads one back with every field's type checked (a missing
field takes its default: the controller also writes short reports of its own).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar, Union

from .atomicfile import atomic_write
from .badpages import BadPage
from .capabilities import INCOMING_NOT_WALKED, Capabilities
from .fields import Fields, JsonRecord, is_int
from .journal import IncomingTree, VerifyResult, WorkloadResult
from .memfdprops import compare as compare_props
from .state import AgentState, write_json
from .workload import WorkloadRecord

__all__ = ["SCHEMA", "Failure", "KernelFrom", "KernelTo", "Kernels", "RadixSnapshot",
           "RadixIncoming", "Radix", "ReportWorkload", "Downtime", "JournalSource",
           "HandoverReport", "handover_report", "build_report", "write_report", "prom_text"]

SCHEMA = "kho-fleet/handover-report/v1"
REPORT_FILE = "report.json"
PROM_FILE = "kho-agent.prom"
RESULTS = ("success", "failed", "aborted", "incomplete")
R = TypeVar("R", bound=JsonRecord)


@dataclass
class Failure(JsonRecord):
    """Why a handover failed: the phase (state.PHASES, or the controller's) and one line."""

    WHERE = "failure"

    phase: str
    reason: str


@dataclass
class KernelFrom(JsonRecord):
    """The kernel the handover left."""

    WHERE = "kernel.from"

    release: Optional[str] = None
    kho_compatible: Optional[str] = None


@dataclass
class KernelTo(JsonRecord):
    """The kernel the handover went to, and the image staged for it."""

    WHERE = "kernel.to"

    release: Optional[str] = None
    kho_compatible: Optional[str] = None
    image: Optional[str] = None
    sha256: Optional[str] = None


@dataclass
class Kernels(JsonRecord):
    WHERE = "kernel"

    from_: KernelFrom = field(default_factory=KernelFrom, metadata={"json": "from"})
    to: KernelTo = field(default_factory=KernelTo)


def _runs_of_pfns(v: Any) -> bool:
    return isinstance(v, list) and all(is_int(x) for x in v)


@dataclass
class RadixSnapshot(JsonRecord):
    """The pre-kexec radix snapshot, summarised (the blocks counted, not listed)."""

    WHERE = "radix.snapshot"

    root: Optional[int] = None
    blocks: int = 0
    pages_by_order: Optional[dict[str, int]] = None
    bytes: Optional[int] = None
    nodes: Optional[int] = None
    intact: Optional[bool] = None
    memory: Optional[str] = None
    workload_pfns_missing: Optional[dict[str, list[int]]] = None

    @classmethod
    def of_snapshot(cls, snap: dict[str, Any], where: str) -> RadixSnapshot:
        """The summary of a snapshot.take_snapshot() record (its `blocks` a list)."""
        f = Fields(snap, where)
        return cls(**cls._common(f),
                   blocks=len(f.list_of("blocks", lambda b: isinstance(b, list), "a block")))

    @staticmethod
    def _common(f: Fields) -> dict[str, Any]:
        pbo = f.opt_dict("pages_by_order")
        missing = f.opt_dict("workload_pfns_missing")
        if pbo is not None:
            pbo = f.dict_of("pages_by_order", is_int, "an integer")
        if missing is not None:
            missing = f.dict_of("workload_pfns_missing", _runs_of_pfns, "a list of PFNs")
        return {"root": f.opt_integer("root"), "pages_by_order": pbo,
                "bytes": f.opt_integer("bytes"), "nodes": f.opt_integer("nodes"),
                "intact": f.opt_flag("intact"), "memory": f.opt_text("memory"),
                "workload_pfns_missing": missing}


@dataclass
class RadixIncoming(JsonRecord):
    """The incoming radix tree after the kexec: still intact, and the same as before?"""

    WHERE = "radix.incoming"

    root: Optional[int] = None
    intact: bool = False
    valid_nodes: int = 0
    errors: list[str] = field(default_factory=list)
    matches_snapshot: Optional[bool] = None
    fdt_source: Optional[str] = None     # debugfs, or the boot protocol (setup_data / DT)

    @classmethod
    def of_incoming(cls, inc: IncomingTree) -> RadixIncoming:
        return cls(root=inc.root, intact=inc.intact, valid_nodes=inc.valid_nodes,
                   errors=list(inc.errors), matches_snapshot=inc.matches_snapshot,
                   fdt_source=inc.fdt_source)


@dataclass
class Radix(JsonRecord):
    WHERE = "radix"

    snapshot: Optional[RadixSnapshot] = None
    incoming: Optional[RadixIncoming] = None


@dataclass
class ReportWorkload(JsonRecord):
    """One workload's verdict: same bytes (sha256) in the same pages (PFNs)?"""

    WHERE = "workload"
    OMIT_NONE = ("sha256_from",)

    session: str = ""
    token: int = 0
    size: int = 0
    sha256_before: str = ""
    sha256_after: Optional[str] = None
    pfns_identical: bool = False
    verified: bool = False
    error: Optional[str] = None
    source: str = "created"
    # where the bytes went wrong (badpages.py): the first MAX_BAD_PAGES pages by offset,
    # all of them counted; chunks that differ but could not be narrowed to pages
    bad_pages: list[BadPage] = field(default_factory=list)
    bad_pages_total: int = 0
    bad_chunks: list[int] = field(default_factory=list)
    sha256_from: Optional[str] = None     # "chunks": sha256_after inferred (all chunks match)
    # memfd-v2 properties (memfdprops.py): size, pos, seals, flags, holes, folios_by_order
    # before PRESERVE_FD and after RETRIEVE_FD, and what differs (a mismatch fails)
    props_before: Optional[dict[str, Any]] = None
    props_after: Optional[dict[str, Any]] = None
    props_mismatch: list[str] = field(default_factory=list)

    @classmethod
    def of_record(cls, w: WorkloadRecord) -> ReportWorkload:
        return cls(w.session, w.token, w.size, w.sha256_before, w.sha256_after,
                   w.pfns_identical, w.verified, w.error, w.source,
                   props_before=w.props_before, props_after=w.props_after,
                   props_mismatch=list(w.props_mismatch))


@dataclass
class Downtime(JsonRecord):
    """The blackout (kexec -e to workloads restored) and its three spans, in seconds."""

    WHERE = "downtime"
    OMIT_NONE = ("systemd_shutdown_s",)       # only after a systemctl kexec

    blackout_s: Optional[float] = None
    kexec_to_kernel_s: Optional[float] = None
    kernel_to_agent_s: Optional[float] = None
    agent_to_restored_s: Optional[float] = None
    restored_s: Optional[float] = None     # kexec -e -> every fd retrieved and handed back
    verified_s: Optional[float] = None     # kexec -e -> every workload's bytes checked
    # systemctl kexec -> SIGTERM reached the holder unit (its stop stamp): systemd's shutdown
    # on the old kernel up to the agent's own unit (bootrestore.py); None for kexec -e
    systemd_shutdown_s: Optional[float] = None


@dataclass
class JournalSource(JsonRecord):
    """Where the journal was read from (memfd, or the disk copy) and why not the memfd."""

    WHERE = "journal"

    from_: Optional[str] = field(default=None, metadata={"json": "from"})
    error: Optional[str] = None


@dataclass
class HandoverReport(JsonRecord):
    """One host's handover: the verdict, why it failed, kernels, radix tree, workloads,
    downtime (schema kho-fleet/handover-report/v1)."""

    WHERE = "report"

    host: str
    handover_id: str
    result: str                     # success, failed, aborted or incomplete
    failure: Optional[Failure] = None
    phase: str = "new"
    kernel: Kernels = field(default_factory=Kernels)
    kexec_metadata: Optional[dict[str, Any]] = None    # abi.metadata's record, or {"error"}
    radix: Radix = field(default_factory=Radix)
    workloads: list[ReportWorkload] = field(default_factory=list)
    downtime: Downtime = field(default_factory=Downtime)
    agent_kexec_s: Optional[float] = None
    journal: JournalSource = field(default_factory=JournalSource)
    stamps: dict[str, float] = field(default_factory=dict)    # step -> epoch seconds
    empty_sessions: list[str] = field(default_factory=list)   # preserved with no files
    sessions_lost: dict[str, str] = field(default_factory=dict)   # of those: lost, why
    # the old kernel's capabilities as preflight found them, and what was not checked for
    # want of one (capabilities.py: e.g. "radix snapshot skipped: no physical-memory access")
    capabilities: Optional[Capabilities] = None
    not_checked: list[str] = field(default_factory=list)
    # how the old kernel was left (systemdhost): "systemd" (systemctl kexec) or "direct"
    # (kexec -e), and per unit its preserved FD-store fds before and after ({unit, before,
    # after, lost}): a direct kexec loses them, systemd carries them
    kexec_method: Optional[str] = None
    fdstores: list[dict[str, Any]] = field(default_factory=list)
    # restore at boot (bootrestore.BootRecord): who verified (kho-agent-verify.service or
    # the controller), the early tree read and the kpageflags check before retrieval, which
    # of the two was established, systemd's shutdown spans
    boot: Optional[dict[str, Any]] = None
    schema: str = SCHEMA

    def to_json(self) -> dict[str, Any]:
        """The stable JSON form (the keys and types the controller and docs rely on)."""
        out = super().to_json()
        return {"schema": out.pop("schema"), **out}      # the schema first, as it always was

    def check(self, r: Fields) -> None:
        if self.result not in RESULTS:
            raise r.error(f"{r.at('result')}: expected one of {', '.join(RESULTS)}, "
                          f"got {self.result!r:.40}")


# --- building -------------------------------------------------------------------------------

@dataclass
class _Abi(JsonRecord):
    """The two fields of a preflight ABI record (running_abi, a preflight target) we read."""

    release: Optional[str] = None
    kho: Optional[str] = None


@dataclass
class _Staged(JsonRecord):
    """The staged kernel: state.staged, or the journal's kernel_to ({kernel, sha256, target})."""

    kernel: Optional[str] = None
    sha256: Optional[str] = None
    target: Optional[_Abi] = None


def _read(cls: type[R], raw: Optional[dict[str, Any]], where: str) -> R:
    """`cls` from another module's record (None: all defaults)."""
    return cls() if raw is None else cls.from_json(raw, where)


def _workloads(verify: VerifyResult) -> list[WorkloadRecord]:
    results = {(r.session, r.token): r for r in verify.results}
    out = []
    for w in (verify.journal.workloads if verify.journal is not None else []):
        rec = WorkloadRecord(w.session, w.token, w.size, w.sha256, w.pfn_runs, w.source)
        rec.props_before = w.props
        r = results.get((rec.session, rec.token))
        if r is None:
            rec.error = "not retrieved"
        else:
            rec.sha256_after = r.sha256
            rec.pfn_runs_after = r.pfn_runs
            rec.error = r.error
            rec.props_after = r.props
            rec.props_mismatch = compare_props(w.props, r.props)
        out.append(rec)
    return out


def _verify_failure(verify: VerifyResult, incoming: IncomingTree,
                    workloads: list[WorkloadRecord]) -> Optional[Failure]:
    if not incoming.present:
        return Failure("boot", (incoming.errors or ["no kho/in"])[0])
    if verify.error:
        return Failure("verify", verify.error)
    lost = [w for w in workloads if not w.verified]
    if not lost and verify.sessions_lost:
        return Failure("verify", "; ".join(f"empty session {n!r}: {why}"
                                           for n, why in sorted(verify.sessions_lost.items())))
    if not lost:
        return None
    found = {(r.session, r.token): r for r in verify.results}
    return Failure("verify", "; ".join(
        f"workload {w.session}/{w.token:#x}: " + (w.error or (
            "sha256 differs" if w.sha256_after != w.sha256_before
            else "PFNs differ" if not w.pfns_identical
            else "properties differ: " + "; ".join(w.props_mismatch)))
        + _bad_pages_note(found.get((w.session, w.token)))
        for w in lost))


def _bad_pages_note(r: Optional[WorkloadResult]) -> str:
    """" (N bad pages, first at offset 0x..., PFN 0x...)" when pages are named."""
    if r is None or not r.bad_pages_total:
        return ""
    first = r.bad_pages[0] if r.bad_pages else None
    n = r.bad_pages_total
    return (f" ({n} bad page{'s' if n != 1 else ''}"
            + (f", first at offset {first.offset:#x}" if first is not None else "")
            + (f", PFN {first.pfn_before:#x}" if first is not None
               and first.pfn_before is not None else "") + ")")


def _report_workload(w: WorkloadRecord, r: Optional[WorkloadResult]) -> ReportWorkload:
    rw = ReportWorkload.of_record(w)
    if r is not None:
        rw.bad_pages, rw.bad_pages_total = list(r.bad_pages), r.bad_pages_total
        rw.bad_chunks, rw.sha256_from = list(r.bad_chunks), r.sha256_from
    return rw


def _stamps(stamps: dict[str, float], v: VerifyResult) -> dict[str, float]:
    """The handover's timeline: the journal's stamps (the steps before the kexec, kexec,
    kexec_exec), then kernel_start, agent_start, restored, released, verified."""
    out = dict(stamps)
    for name, t in (("kernel_start", v.kernel_boot_time), ("agent_start", v.agent_start),
                    ("restored", v.t_restored), ("released", v.t_released),
                    ("verified", v.t_verified)):
        if t is not None:
            out[name] = t
    return out


def _capabilities(running: Optional[dict[str, Any]], snap: Optional[dict[str, Any]],
                  incoming: Optional[IncomingTree]) -> tuple[Optional[Capabilities], list[str]]:
    """The old kernel's capabilities (carried in its running-ABI record) and every line of
    what was not checked: preflight's, a skipped snapshot, an incoming tree not walked."""
    caps = None
    notes: list[str] = []
    if running is not None:
        f = Fields(running, "journal: kernel_from")
        raw = f.opt_dict("capabilities")
        caps = None if raw is None else Capabilities.from_json(raw, f.at("capabilities"))
        notes += f.list_of("not_checked", lambda x: isinstance(x, str), "a string")
    if snap and isinstance(snap.get("skipped"), str):
        notes.append(snap["skipped"])
    if incoming is not None:
        notes += [e for e in incoming.errors if e.startswith(INCOMING_NOT_WALKED)]
    return caps, list(dict.fromkeys(notes))


def _span(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else round(b - a, 6)


def handover_report(verify: Optional[VerifyResult], state: AgentState,
                    host: Optional[str] = None) -> HandoverReport:
    """The report for this host's current handover (a partial one before/without verify)."""
    v = verify if verify is not None else VerifyResult()     # not verified: nothing found
    jr = v.journal
    stamps = jr.stamps if jr is not None else {}
    workloads = _workloads(v)
    results = {(r.session, r.token): r for r in v.results}
    # the staged kernel: this agent's own record of it, else the journal's (after a kexec
    # into a kernel whose state dir started empty)
    staged = (_read(_Staged, state.staged, "state: staged") if state.staged
              else _read(_Staged, jr.kernel_to if jr is not None else None, "journal: kernel_to"))
    running_before = (_read(_Abi, state.staged.get("running"), "state: staged.running")
                      if state.staged and state.staged.get("running")
                      else _read(_Abi, jr.kernel_from if jr is not None else None,
                                 "journal: kernel_from"))
    target = staged.target or _Abi()
    running_after = _read(_Abi, v.running, "verify: running")
    t_exec = stamps.get("kexec_exec") or stamps.get("kexec")

    failure = Failure.from_json(state.failure, "state: failure") if state.failure else None
    if failure is None and verify is not None:
        failure = _verify_failure(v, v.incoming or IncomingTree(), workloads)
    if state.aborted:
        result = "aborted"        # refused before kexec: nothing was at risk
    elif failure is not None:
        result = "failed"
    elif verify is not None:
        result = "success"
    else:
        result = "incomplete"     # asked for before the handover was verified

    snap = jr.snapshot if jr is not None else None
    caps, not_checked = _capabilities(
        state.staged.get("running") if state.staged and state.staged.get("running")
        else (jr.kernel_from if jr is not None else None), snap, v.incoming)
    return HandoverReport(
        host=(jr.host if jr is not None and jr.host else None) or host or os.uname().nodename,
        handover_id=(jr.handover_id if jr is not None and jr.handover_id else None)
        or state.handover_id,
        result=result, failure=failure, phase=state.phase,
        kernel=Kernels(
            KernelFrom(running_before.release, running_before.kho),
            KernelTo(release=v.release or target.release,
                     kho_compatible=running_after.kho or target.kho,
                     image=staged.kernel, sha256=staged.sha256)),
        kexec_metadata=v.incoming.metadata if v.incoming is not None else None,
        radix=Radix(
            snapshot=RadixSnapshot.of_snapshot(snap, "journal: snapshot") if snap else None,
            incoming=(RadixIncoming.of_incoming(v.incoming) if v.incoming is not None
                      else None)),
        workloads=[_report_workload(w, results.get((w.session, w.token))) for w in workloads],
        downtime=Downtime(blackout_s=_span(t_exec, v.t_restored),
                          kexec_to_kernel_s=_span(t_exec, v.kernel_boot_time),
                          kernel_to_agent_s=_span(v.kernel_boot_time, v.agent_start),
                          agent_to_restored_s=_span(v.agent_start, v.t_restored),
                          restored_s=_span(t_exec, v.t_restored),
                          verified_s=_span(t_exec, v.t_verified)),
        agent_kexec_s=jr.agent_kexec_s if jr is not None else None,
        journal=JournalSource(
            from_="memfd" if verify is not None and not v.journal_error
            else ("disk" if jr is not None else None),
            error=v.journal_error),
        stamps=_stamps(stamps, v) if verify is not None else dict(stamps),
        empty_sessions=list(jr.empty_sessions) if jr is not None else [],
        sessions_lost=dict(v.sessions_lost),
        capabilities=caps, not_checked=not_checked,
    )


def build_report(verify: Union[VerifyResult, dict[str, Any], None], state: AgentState,
                 host: Optional[str] = None) -> dict[str, Any]:
    """handover_report() at the JSON edge: verify.json's content in, the report's JSON out."""
    if isinstance(verify, dict):
        verify = VerifyResult.from_json(verify, "verify")
    return handover_report(verify, state, host).to_json()


# --- the node_exporter textfile -------------------------------------------------------------

def _esc(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def _report(rep: Union[HandoverReport, dict[str, Any]]) -> HandoverReport:
    return rep if isinstance(rep, HandoverReport) else HandoverReport.from_json(rep)


def prom_text(rep: Union[HandoverReport, dict[str, Any]]) -> str:
    """node_exporter textfile lines for a report (kho_agent_* metrics)."""
    r = _report(rep)
    lab = f'host="{_esc(r.host)}",handover_id="{_esc(r.handover_id)}"'
    lines = [
        "# HELP kho_agent_handover_info Last handover on this host (value 1).",
        "# TYPE kho_agent_handover_info gauge",
        (f'kho_agent_handover_info{{{lab},result="{r.result}",'
         f'from="{_esc(r.kernel.from_.release)}",to="{_esc(r.kernel.to.release)}",'
         f'failure_phase="{_esc(r.failure.phase if r.failure is not None else "")}"}} 1'),
        "# HELP kho_agent_handover_success 1 if the last handover verified every workload.",
        "# TYPE kho_agent_handover_success gauge",
        f"kho_agent_handover_success{{{lab}}} {1 if r.result == 'success' else 0}",
    ]
    lines += ["# HELP kho_agent_handover_downtime_seconds Downtime of the last handover by span.",
              "# TYPE kho_agent_handover_downtime_seconds gauge"]
    for span, v in r.downtime.to_json().items():
        if v is not None:
            lines.append(f'kho_agent_handover_downtime_seconds{{{lab},span="{span[:-2]}"}} {v}')
    ws = r.workloads
    lines += [
        "# HELP kho_agent_workloads Preserved workloads of the last handover.",
        "# TYPE kho_agent_workloads gauge",
        f'kho_agent_workloads{{{lab},state="verified"}} {sum(w.verified for w in ws)}',
        f'kho_agent_workloads{{{lab},state="failed"}} {sum(not w.verified for w in ws)}',
        "# HELP kho_agent_preserved_bytes Bytes of workload memfds preserved.",
        "# TYPE kho_agent_preserved_bytes gauge",
        f"kho_agent_preserved_bytes{{{lab}}} {sum(w.size for w in ws)}",
    ]
    inc = r.radix.incoming
    if inc is not None:
        lines += [("# HELP kho_agent_radix_tree_intact 1 if the incoming radix tree was still "
                   "intact."),
                  "# TYPE kho_agent_radix_tree_intact gauge",
                  f"kho_agent_radix_tree_intact{{{lab}}} {1 if inc.intact else 0}"]
    lines += ["# HELP kho_agent_radix_snapshot_present 1 if a pre-kexec radix snapshot was taken.",
              "# TYPE kho_agent_radix_snapshot_present gauge",
              f"kho_agent_radix_snapshot_present{{{lab}}} {0 if r.radix.snapshot is None else 1}"]
    md = r.kexec_metadata or {}
    if "kexec_count" in md:
        lines += ["# HELP kho_agent_kexec_count kexec boots since the last cold boot.",
                  "# TYPE kho_agent_kexec_count gauge",
                  f"kho_agent_kexec_count{{{lab}}} {md['kexec_count']}"]
    return "\n".join(lines) + "\n"


def write_report(rep: Union[HandoverReport, dict[str, Any]], state_dir: str,
                 textfile_dir: Optional[str] = None) -> None:
    """report.json in the state dir; the .prom file there and in `textfile_dir` if given."""
    r = _report(rep)
    write_json(os.path.join(state_dir, REPORT_FILE), r.to_json())
    text = prom_text(r).encode()
    for d in filter(None, (state_dir, textfile_dir)):
        atomic_write(os.path.join(d, PROM_FILE), text, mode=0o644)
