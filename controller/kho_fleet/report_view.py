"""Human rendering of a handover report (kho-fleet/handover-report/v1) with rich.

The report is read into the agent's record (kho_agent.report.HandoverReport) first, so a
field of the wrong type is one InputError naming it, not a traceback halfway through.
"""

from __future__ import annotations

from typing import Any, Union

from rich.console import Console
from rich.table import Table

from kho_agent.errors import InputError as AgentInputError
from kho_agent.report import HandoverReport

from .errors import InputError

__all__ = ["handover_record", "render_handover"]


def handover_record(rep: Union[HandoverReport, dict[str, Any]],
                    where: str = "handover report") -> HandoverReport:
    """`rep` as a HandoverReport; the controller's InputError naming the field if it is bad."""
    if isinstance(rep, HandoverReport):
        return rep
    try:
        return HandoverReport.from_json(rep, where)
    except AgentInputError as e:
        raise InputError(str(e)) from None


def render_handover(rep: Union[HandoverReport, dict[str, Any]], console: Console) -> None:
    """One host's handover: verdict, kernels, tree, workloads, downtime."""
    r = handover_record(rep)
    colour = {"success": "green", "failed": "red", "aborted": "yellow"}.get(r.result, "white")
    console.print(f"[bold]{r.host}[/] handover {r.handover_id}: [{colour}]{r.result}[/]")
    if r.failure is not None:
        console.print(f"  failed in {r.failure.phase}: {r.failure.reason}", style="red")
    kf, kt = r.kernel.from_, r.kernel.to
    if any(v is not None for v in (kf.release, kf.kho_compatible, kt.release,
                                   kt.kho_compatible, kt.image, kt.sha256)):
        console.print(f"  kernel {kf.release} ({kf.kho_compatible}) -> "
                      f"{kt.release} ({kt.kho_compatible})")
    md = r.kexec_metadata or {}
    if "kexec_count" in md:
        console.print(f"  kexec-metadata: exec from {md.get('previous_release')} "
                      f"(count {md['kexec_count']})")
    snap, inc = r.radix.snapshot, r.radix.incoming
    if snap is not None:
        root = "?" if snap.root is None else f"0x{snap.root:x}"
        console.print(f"  radix snapshot: root {root}, {snap.nodes} nodes, "
                      f"{(snap.bytes or 0) >> 20} MiB preserved")
    if inc is not None:
        console.print(f"  incoming tree: {'intact' if inc.intact else 'no longer intact'}"
                      + (f" ({inc.errors[0]})" if inc.errors else ""))
    if r.workloads:
        t = Table(title_justify="left")
        for col in ("session", "token", "MiB", "sha256", "PFNs", "verified"):
            t.add_column(col)
        for w in r.workloads:
            t.add_row(w.session, f"{w.token:#x}", f"{w.size / 2**20:.1f}",
                      "same" if w.sha256_after == w.sha256_before else "[red]differs[/]",
                      "identical" if w.pfns_identical else "[red]moved/lost[/]",
                      "[green]yes[/]" if w.verified else f"[red]no[/] {w.error or ''}")
        console.print(t)
    d = r.downtime
    if d.blackout_s is not None:
        spans = " + ".join(f"{name} {'?' if v is None else f'{v:.3f}'}s" for name, v in (
            ("kexec->kernel", d.kexec_to_kernel_s), ("kernel->agent", d.kernel_to_agent_s),
            ("agent->restored", d.agent_to_restored_s)))
        console.print(f"  downtime {d.blackout_s:.3f}s = {spans}")
