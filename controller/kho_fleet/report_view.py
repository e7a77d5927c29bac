"""Human rendering of a handover report (kho-fleet/handover-report/v1) with rich."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def render_handover(rep: dict[str, Any], console: Console) -> None:
    """One host's handover: verdict, kernels, tree, workloads, downtime."""
    colour = {"success": "green", "failed": "red", "aborted": "yellow"}.get(rep.get("result"), "white")
    console.print(f"[bold]{rep.get('host')}[/] handover {rep.get('handover_id')}: "
                  f"[{colour}]{rep.get('result')}[/]")
    if rep.get("failure"):
        console.print(f"  failed in {rep['failure']['phase']}: {rep['failure']['reason']}",
                      style="red")
    k = rep.get("kernel") or {}
    if k:
        console.print(f"  kernel {k['from'].get('release')} ({k['from'].get('kho_compatible')}) -> "
                      f"{k['to'].get('release')} ({k['to'].get('kho_compatible')})")
    md = rep.get("kexec_metadata") or {}
    if "kexec_count" in md:
        console.print(f"  kexec-metadata: exec from {md['previous_release']} (count {md['kexec_count']})")
    radix = rep.get("radix") or {}
    snap, inc = radix.get("snapshot"), radix.get("incoming")
    if snap:
        console.print(f"  radix snapshot: root 0x{snap['root']:x}, {snap['nodes']} nodes, "
                      f"{(snap['bytes'] or 0) >> 20} MiB preserved")
    if inc:
        console.print(f"  incoming tree: {'intact' if inc['intact'] else 'no longer intact'}"
                      + (f" ({inc['errors'][0]})" if inc.get("errors") else ""))
    ws = rep.get("workloads") or []
    if ws:
        t = Table(title_justify="left")
        for col in ("session", "token", "MiB", "sha256", "PFNs", "verified"):
            t.add_column(col)
        for w in ws:
            t.add_row(w["session"], f"{w['token']:#x}", f"{w['size'] / 2**20:.1f}",
                      "same" if w["sha256_after"] == w["sha256_before"] else "[red]differs[/]",
                      "identical" if w["pfns_identical"] else "[red]moved/lost[/]",
                      "[green]yes[/]" if w["verified"] else f"[red]no[/] {w.get('error') or ''}")
        console.print(t)
    d = rep.get("downtime") or {}
    if d.get("blackout_s") is not None:
        console.print(f"  downtime {d['blackout_s']:.3f}s = kexec->kernel {d['kexec_to_kernel_s']:.3f}s"
                      f" + kernel->agent {d['kernel_to_agent_s']:.3f}s"
                      f" + agent->restored {d['agent_to_restored_s']:.3f}s")
