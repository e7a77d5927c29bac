"""The handover report (schema kho-fleet/handover-report/v1) and its node_exporter textfile.

Built from the journal carried across the kexec and the verification after it; the
same figures go to a `.prom` file for node_exporter's textfile collector.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from .atomicfile import atomic_write
from .state import AgentState, write_json
from .workload import WorkloadRecord

__all__ = ["SCHEMA", "build_report", "write_report", "prom_text"]

SCHEMA = "kho-fleet/handover-report/v1"
REPORT_FILE = "report.json"
PROM_FILE = "kho-agent.prom"


def _workloads(verify: dict) -> list[WorkloadRecord]:
    journal = verify.get("journal") or {}
    results = {(r["session"], int(r["token"])): r for r in verify.get("results", [])}
    out = []
    for w in journal.get("workloads", []):
        rec = WorkloadRecord(w["session"], int(w["token"]), int(w["size"]), w["sha256"],
                             w["pfn_runs"], w.get("source", "created"))
        r = results.get((rec.session, rec.token))
        if r is None:
            rec.error = "not retrieved"
        else:
            rec.sha256_after = r.get("sha256")
            rec.pfn_runs_after = r.get("pfn_runs")
            rec.error = r.get("error")
        out.append(rec)
    return out


def _verify_failure(verify: dict, incoming: dict, workloads: list[WorkloadRecord]) -> Optional[dict]:
    if not incoming.get("present", False):
        return {"phase": "boot", "reason": (incoming.get("errors") or ["no kho/in"])[0]}
    if verify.get("error"):
        return {"phase": "verify", "reason": verify["error"]}
    lost = [w for w in workloads if not w.verified]
    if not lost:
        return None
    return {"phase": "verify", "reason": "; ".join(
        f"workload {w.session}/{w.token:#x}: " + (w.error or (
            "sha256 differs" if w.sha256_after != w.sha256_before else "PFNs differ"))
        for w in lost)}


def _span(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else round(b - a, 6)


def build_report(verify: Optional[dict], state: AgentState, host: Optional[str] = None) -> dict:
    """The report for this host's current handover (a partial one before/without verify)."""
    verify = verify or {}
    journal = verify.get("journal") or {}
    stamps = journal.get("stamps", {})
    incoming = verify.get("incoming") or {}
    snap = journal.get("snapshot") or {}
    workloads = _workloads(verify) if verify else []
    staged = state.staged or journal.get("kernel_to") or {}
    target = (staged.get("target") or {}) if isinstance(staged, dict) else {}
    running_before = (state.staged or {}).get("running") or journal.get("kernel_from") or {}
    running_after = verify.get("running") or {}
    t_exec = stamps.get("kexec_exec") or stamps.get("kexec")
    t_kernel = verify.get("kernel_boot_time")
    t_agent = verify.get("agent_start")
    t_restored = verify.get("t_restored")

    failure = state.failure
    if failure is None and verify:
        failure = _verify_failure(verify, incoming, workloads)
    if state.aborted:
        result = "aborted"        # refused before kexec: nothing was at risk
    elif failure is not None:
        result = "failed"
    elif verify:
        result = "success"
    else:
        result = "incomplete"     # asked for before the handover was verified

    return {
        "schema": SCHEMA,
        "host": journal.get("host") or host or os.uname().nodename,
        "handover_id": journal.get("handover_id") or state.handover_id,
        "result": result,
        "failure": failure,
        "phase": state.phase,
        "kernel": {
            "from": {"release": running_before.get("release"),
                     "kho_compatible": running_before.get("kho")},
            "to": {"release": verify.get("release") or target.get("release"),
                   "kho_compatible": running_after.get("kho") or target.get("kho"),
                   "image": staged.get("kernel") if isinstance(staged, dict) else None,
                   "sha256": staged.get("sha256") if isinstance(staged, dict) else None},
        },
        "kexec_metadata": incoming.get("metadata"),
        "radix": {
            "snapshot": ({"root": snap.get("root"), "blocks": len(snap.get("blocks", [])),
                          "pages_by_order": snap.get("pages_by_order"),
                          "bytes": snap.get("bytes"), "nodes": snap.get("nodes"),
                          "intact": snap.get("intact"), "memory": snap.get("memory"),
                          "workload_pfns_missing": snap.get("workload_pfns_missing")}
                         if snap else None),
            "incoming": ({"root": incoming.get("root"), "intact": incoming.get("intact"),
                          "valid_nodes": incoming.get("valid_nodes"),
                          "errors": incoming.get("errors", []),
                          "matches_snapshot": incoming.get("matches_snapshot")}
                         if incoming else None),
        },
        "workloads": [{"session": w.session, "token": w.token, "size": w.size,
                       "sha256_before": w.sha256_before, "sha256_after": w.sha256_after,
                       "pfns_identical": w.pfns_identical, "verified": w.verified,
                       "error": w.error, "source": w.source} for w in workloads],
        "downtime": {
            "blackout_s": _span(t_exec, t_restored),
            "kexec_to_kernel_s": _span(t_exec, t_kernel),
            "kernel_to_agent_s": _span(t_kernel, t_agent),
            "agent_to_restored_s": _span(t_agent, t_restored),
        },
        "agent_kexec_s": journal.get("agent_kexec_s"),
        "journal": {"from": "memfd" if verify and not verify.get("journal_error") else
                    ("disk" if journal else None), "error": verify.get("journal_error")},
    }


def _esc(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def prom_text(rep: dict) -> str:
    """node_exporter textfile lines for a report (kho_agent_* metrics)."""
    lab = f'host="{_esc(rep["host"])}",handover_id="{_esc(rep["handover_id"])}"'
    lines = [
        "# HELP kho_agent_handover_info Last handover on this host (value 1).",
        "# TYPE kho_agent_handover_info gauge",
        f'kho_agent_handover_info{{{lab},result="{rep["result"]}",'
        f'from="{_esc(rep["kernel"]["from"]["release"])}",to="{_esc(rep["kernel"]["to"]["release"])}",'
        f'failure_phase="{_esc((rep["failure"] or {}).get("phase", ""))}"}} 1',
        "# HELP kho_agent_handover_success 1 if the last handover verified every workload.",
        "# TYPE kho_agent_handover_success gauge",
        f"kho_agent_handover_success{{{lab}}} {1 if rep['result'] == 'success' else 0}",
    ]
    lines += ["# HELP kho_agent_handover_downtime_seconds Downtime of the last handover by span.",
              "# TYPE kho_agent_handover_downtime_seconds gauge"]
    for span, v in rep["downtime"].items():
        if v is not None:
            lines.append(f'kho_agent_handover_downtime_seconds{{{lab},span="{span[:-2]}"}} {v}')
    ws = rep["workloads"]
    lines += [
        "# HELP kho_agent_workloads Preserved workloads of the last handover.",
        "# TYPE kho_agent_workloads gauge",
        f'kho_agent_workloads{{{lab},state="verified"}} {sum(w["verified"] for w in ws)}',
        f'kho_agent_workloads{{{lab},state="failed"}} {sum(not w["verified"] for w in ws)}',
        "# HELP kho_agent_preserved_bytes Bytes of workload memfds preserved.",
        "# TYPE kho_agent_preserved_bytes gauge",
        f"kho_agent_preserved_bytes{{{lab}}} {sum(w['size'] for w in ws)}",
    ]
    inc = rep["radix"]["incoming"]
    if inc is not None:
        lines += ["# HELP kho_agent_radix_tree_intact 1 if the incoming radix tree was still intact.",
                  "# TYPE kho_agent_radix_tree_intact gauge",
                  f"kho_agent_radix_tree_intact{{{lab}}} {1 if inc['intact'] else 0}"]
    lines += ["# HELP kho_agent_radix_snapshot_present 1 if a pre-kexec radix snapshot was taken.",
              "# TYPE kho_agent_radix_snapshot_present gauge",
              f"kho_agent_radix_snapshot_present{{{lab}}} {0 if rep['radix']['snapshot'] is None else 1}"]
    md = rep.get("kexec_metadata") or {}
    if "kexec_count" in md:
        lines += ["# HELP kho_agent_kexec_count kexec boots since the last cold boot.",
                  "# TYPE kho_agent_kexec_count gauge", f"kho_agent_kexec_count{{{lab}}} {md['kexec_count']}"]
    return "\n".join(lines) + "\n"


def write_report(rep: dict, state_dir: str, textfile_dir: Optional[str] = None) -> None:
    """report.json in the state dir; the .prom file there and in `textfile_dir` if given."""
    write_json(os.path.join(state_dir, REPORT_FILE), rep)
    text = prom_text(rep).encode()
    for d in filter(None, (state_dir, textfile_dir)):
        atomic_write(os.path.join(d, PROM_FILE), text, mode=0o644)
