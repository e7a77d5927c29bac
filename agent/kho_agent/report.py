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
from .fields import Fields, JsonRecord, is_int
from .journal import IncomingTree, VerifyResult
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

    session: str = ""
    token: int = 0
    size: int = 0
    sha256_before: str = ""
    sha256_after: Optional[str] = None
    pfns_identical: bool = False
    verified: bool = False
    error: Optional[str] = None
    source: str = "created"

    @classmethod
    def of_record(cls, w: WorkloadRecord) -> ReportWorkload:
        return cls(w.session, w.token, w.size, w.sha256_before, w.sha256_after,
                   w.pfns_identical, w.verified, w.error, w.source)


@dataclass
class Downtime(JsonRecord):
    """The blackout (kexec -e to workloads restored) and its three spans, in seconds."""

    WHERE = "downtime"

    blackout_s: Optional[float] = None
    kexec_to_kernel_s: Optional[float] = None
    kernel_to_agent_s: Optional[float] = None
    agent_to_restored_s: Optional[float] = None


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
        r = results.get((rec.session, rec.token))
        if r is None:
            rec.error = "not retrieved"
        else:
            rec.sha256_after = r.sha256
            rec.pfn_runs_after = r.pfn_runs
            rec.error = r.error
        out.append(rec)
    return out


def _verify_failure(verify: VerifyResult, incoming: IncomingTree,
                    workloads: list[WorkloadRecord]) -> Optional[Failure]:
    if not incoming.present:
        return Failure("boot", (incoming.errors or ["no kho/in"])[0])
    if verify.error:
        return Failure("verify", verify.error)
    lost = [w for w in workloads if not w.verified]
    if not lost:
        return None
    return Failure("verify", "; ".join(
        f"workload {w.session}/{w.token:#x}: " + (w.error or (
            "sha256 differs" if w.sha256_after != w.sha256_before else "PFNs differ"))
        for w in lost))


def _span(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else round(b - a, 6)


def handover_report(verify: Optional[VerifyResult], state: AgentState,
                    host: Optional[str] = None) -> HandoverReport:
    """The report for this host's current handover (a partial one before/without verify)."""
    v = verify if verify is not None else VerifyResult()     # not verified: nothing found
    jr = v.journal
    stamps = jr.stamps if jr is not None else {}
    workloads = _workloads(v)
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
        workloads=[ReportWorkload.of_record(w) for w in workloads],
        downtime=Downtime(blackout_s=_span(t_exec, v.t_restored),
                          kexec_to_kernel_s=_span(t_exec, v.kernel_boot_time),
                          kernel_to_agent_s=_span(v.kernel_boot_time, v.agent_start),
                          agent_to_restored_s=_span(v.agent_start, v.t_restored)),
        agent_kexec_s=jr.agent_kexec_s if jr is not None else None,
        journal=JournalSource(
            from_="memfd" if verify is not None and not v.journal_error
            else ("disk" if jr is not None else None),
            error=v.journal_error),
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
