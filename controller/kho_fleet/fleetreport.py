"""The fleet report (schema kho-fleet/fleet-report/v1) of one rollout, built from its StateDB.

Host rows carry the agents' handover reports (kho-fleet/handover-report/v1) in `report`.
Written as fleet.json, fleet.md and one self-contained fleet.html (inline CSS and SVG, no
script, nothing fetched), beside hosts/<host>.json ({"agent": ..., "controller": ...}).

Records: `HostReport` is one hosts/<host>.json; `AgentOutcome` is what the fleet report
reads of a host's handover report (every field's type checked: an InputError naming the
host and the field); `FleetHost` is one row of fleet.json's "hosts". JSON only at the edge.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from kho_agent.atomicfile import atomic_write
from kho_agent.fields import Fields, JsonRecord
from kho_agent.report import Failure

from .errors import InputError
from .metrics import DOWNTIME_BUCKETS, handover_downtime
from .statedb import HostRow, StateDB

__all__ = ["SCHEMA", "percentile", "downtime_summary", "host_report_path", "host_page_path",
           "controller_timings",
           "AgentOutcome", "HostReport", "FleetHost",
           "write_host_report", "build_fleet_report", "render_markdown", "render_html",
           "write_fleet_report"]

SCHEMA = "kho-fleet/fleet-report/v1"
_FINAL = ("completed", "aborted", "rolled_back")
HOSTS_DIR = "hosts"


# -- numbers ---------------------------------------------------------------------------------

def percentile(values: Iterable[float], q: float) -> Optional[float]:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default); None if empty.

    Example: percentile([1, 2, 3, 4, 5], 95) == 4.8.
    """
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return round(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo), 6)


def downtime_summary(values: Sequence[float], buckets: Sequence[float] = DOWNTIME_BUCKETS) -> dict:
    """count, p50, p95, max and per-bucket counts: {lo, hi, count} with lo < v <= hi
    (hi None: above the last bucket)."""
    edges = [0.0, *buckets]
    hist: list[dict[str, Any]] = [{"lo": edges[i], "hi": b, "count": 0}
                                  for i, b in enumerate(buckets)]
    hist.append({"lo": edges[-1], "hi": None, "count": 0})
    for v in values:
        i = next((i for i, b in enumerate(buckets) if v <= b), len(buckets))
        hist[i]["count"] += 1
    return {"count": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "max": round(max(values), 6) if values else None, "buckets": hist}


# -- records ---------------------------------------------------------------------------------

def _fields(raw: Any, where: str) -> Fields:
    """A typed reader of one JSON object whose errors are the controller's InputError."""
    return Fields(raw, where, InputError)


@dataclass
class AgentOutcome:
    """What the fleet report reads of one handover report (kho-fleet/handover-report/v1):
    an agent's, or the short one the controller writes for a host that failed before its
    agent reported. Missing fields are None; a field of the wrong type is an InputError."""

    result: Optional[str] = None
    failure: Optional[Failure] = None
    blackout_s: Optional[float] = None
    kernel_from: Optional[str] = None
    kernel_to: Optional[str] = None
    workloads_verified: int = 0
    workloads_total: int = 0

    @classmethod
    def from_json(cls, raw: Any, where: str = "report") -> AgentOutcome:
        f = _fields(raw, where)
        fail = None
        fr = f.opt_dict("failure")
        if fr:
            ff = _fields(fr, f.at("failure"))
            fail = Failure(ff.opt_text("phase") or "agent", ff.opt_text("reason") or "")
        down = f.opt_dict("downtime")
        kernel = f.opt_dict("kernel")
        kf = _fields(kernel or {}, f.at("kernel"))
        k_from, k_to = (_fields(kf.opt_dict(side) or {}, kf.at(side)).opt_text("release")
                        for side in ("from", "to"))
        ws = f.records("workloads", lambda w, at: _fields(w, at).opt_flag("verified"))
        return cls(result=f.opt_text("result"), failure=fail,
                   blackout_s=_fields(down or {}, f.at("downtime")).opt_number("blackout_s"),
                   kernel_from=k_from, kernel_to=k_to,
                   workloads_verified=sum(1 for v in ws if v), workloads_total=len(ws))


@dataclass
class HostReport(JsonRecord):
    """hosts/<host>.json: the host's handover report, kept as it was written (the agent's
    schema is the agent's), and what the controller saw (controller_timings or the
    engine's own timings). `from_json` also checks what `outcome()` reads of the report."""

    ERROR = InputError
    WHERE = "host report"

    host: str
    agent: Optional[dict[str, Any]] = None
    controller: dict[str, Any] = field(default_factory=dict)

    def outcome(self) -> Optional[AgentOutcome]:
        """The agent's report as the fleet report reads it (None: no report)."""
        return None if self.agent is None else AgentOutcome.from_json(
            self.agent, f"host {self.host}: report")

    def check(self, r: Fields) -> None:
        if self.agent is not None:
            AgentOutcome.from_json(self.agent, r.at("agent"))


@dataclass
class FleetHost:
    """One host's row in fleet.json: where it is, how its handover went, where its report is."""

    name: str
    stage: str
    state: str
    result: Optional[str] = None
    failure: Optional[Failure] = None
    downtime_s: Optional[float] = None        # the controller's measurement
    blackout_s: Optional[float] = None        # the agent's
    kernel_from: Optional[str] = None
    kernel_to: Optional[str] = None
    workloads: Optional[tuple[int, int]] = None   # (verified, total); None: no report
    report: Optional[str] = None              # hosts/<host>.json, when there is a report
    arch: Optional[str] = None                # the inventory's kho_arch (None: unknown)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "stage": self.stage, "state": self.state, "result": self.result,
            "failure": None if self.failure is None else self.failure.to_json(),
            "downtime_s": self.downtime_s, "blackout_s": self.blackout_s,
            "kernel": {"from": self.kernel_from, "to": self.kernel_to},
            "workloads": (None if self.workloads is None else
                          {"verified": self.workloads[0], "total": self.workloads[1]}),
            "report": self.report, "arch": self.arch,
        }


# -- host reports ----------------------------------------------------------------------------

def host_report_path(host: str) -> str:
    """hosts/<host>.json, relative to the report directory (unsafe characters become _)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", host).lstrip(".") or "_"
    return f"{HOSTS_DIR}/{safe}.json"


def controller_timings(row: HostRow) -> dict:
    """What the controller saw of a host: state, attempts, timestamps, downtime_s, error."""
    return {"state": row.state, "attempts": row.attempts, "last_contact": row.last_contact,
            "kexec_requested_at": row.kexec_requested_at,
            "kexec_started_at": row.kexec_started_at, "back_at": row.back_at,
            "downtime_s": None if row.downtime_s is None else round(row.downtime_s, 6),
            "error": row.error}


def _write_text(path: str, text: str) -> None:
    atomic_write(path, text.encode("utf-8"))


def host_page_path(report_rel: str) -> str:
    """hosts/<host>.html (hostpage.py), beside the host report hosts/<host>.json."""
    return re.sub(r"\.json$", "", report_rel) + ".html"


def write_host_report(out_dir: str, host: str, agent_report: Optional[dict],
                      controller: dict) -> str:
    """Write hosts/<host>.json = {"host", "agent", "controller"} and its page hosts/<host>.html;
    returns the JSON's relative path."""
    from .hostpage import render_host_page
    rec = HostReport(host, agent_report, controller)
    rel = host_report_path(host)
    doc = rec.to_json()
    _write_text(os.path.join(out_dir, rel), json.dumps(doc, indent=2, sort_keys=True) + "\n")
    _write_text(os.path.join(out_dir, host_page_path(rel)),
                render_host_page(doc, os.path.basename(rel)))
    return rel


# -- building --------------------------------------------------------------------------------

def _result(row: HostRow, rep: AgentOutcome) -> Optional[str]:
    if row.state == "skipped":
        return "skipped"
    if row.state == "failed":
        return rep.result if rep.result in ("failed", "aborted") else "failed"
    return rep.result


def _failure(db: StateDB, row: HostRow, rep: AgentOutcome) -> Optional[Failure]:
    if rep.failure is not None:
        return rep.failure
    if row.state != "failed":
        return None
    phase = "controller"
    for ev in reversed(db.events(row.name)):
        if ev.event == "state" and ev.detail and " -> failed" in ev.detail:
            phase = ev.detail.split(" -> ", 1)[0]
            break
    return Failure(phase, row.error or "unknown")


def _host(db: StateDB, row: HostRow, stage: str, arch: Optional[str] = None) -> FleetHost:
    rec = HostReport(row.name, row.report)
    rep = rec.outcome() or AgentOutcome()
    return FleetHost(
        name=row.name, stage=stage, state=row.state, result=_result(row, rep), arch=arch,
        failure=_failure(db, row, rep),
        downtime_s=None if row.downtime_s is None else round(row.downtime_s, 6),
        blackout_s=rep.blackout_s, kernel_from=rep.kernel_from, kernel_to=rep.kernel_to,
        workloads=((rep.workloads_verified, rep.workloads_total)
                   if row.report is not None else None),
        report=host_report_path(row.name) if row.report is not None else None)


def _downtimes(hosts: list[FleetHost]) -> list[float]:
    out = []
    for h in hosts:
        d = handover_downtime({"downtime": {"blackout_s": h.blackout_s}}, h.downtime_s)
        if d is not None:
            out.append(d)
    return out


def _inventory_arches(ro: Any) -> dict[str, str]:
    """Each host's kho_arch from the rollout's inventory, if that file is still the one the
    rollout started with (same sha256); {} otherwise (the report then says no arch)."""
    from kho_agent.digest import sha256_file

    from .inventory import load_inventory
    path, pin = getattr(ro, "inventory_path", None), getattr(ro, "inventory_sha256", None)
    try:
        if not path or not pin or sha256_file(path) != pin:
            return {}
        return {n: h.arch for n, h in load_inventory(path).hosts.items()}
    except (InputError, OSError, ValueError):
        return {}


def build_fleet_report(db: StateDB, target: Optional[str] = None,
                       arches: Optional[dict[str, str]] = None) -> dict:
    """The fleet report of `db`'s rollout; `target` defaults to the reports' kernel.to release;
    `arches` (host: kho_arch) to the rollout's inventory's, when it is unchanged."""
    ro = db.rollout()
    stages = db.stages()
    names = {s.idx: s.name for s in stages}
    rows = db.hosts()
    arch = _inventory_arches(ro) if arches is None else arches
    hosts = [_host(db, r, names[r.stage_idx], arch.get(r.name)) for r in rows]
    if target is None:
        releases = Counter(h.kernel_to for h in hosts if h.kernel_to)
        target = releases.most_common(1)[0][0] if releases else None
    finished = None
    if ro.status in _FINAL:
        ev = [e for e in db.events() if e.host is None and e.event == "rollout"]
        finished = ev[-1].ts if ev else None
    stage_out = []
    for s in stages:
        hs = [h for h, r in zip(hosts, rows) if r.stage_idx == s.idx]
        dt = downtime_summary(_downtimes(hs))
        stage_out.append({
            "index": s.idx, "name": s.name, "status": s.status, "hosts": len(hs),
            "succeeded": sum(1 for h in hs if h.result == "success" and h.state == "reported"),
            "failed": sum(1 for h in hs if h.result in ("failed", "aborted")),
            "skipped": sum(1 for h in hs if h.state == "skipped"),
            "gate": s.gate, "started": s.started_at, "finished": s.finished_at,
            "downtime": {k: dt[k] for k in ("count", "p50", "p95", "max")},
        })
    return {
        "schema": SCHEMA,
        "generated": time.time(),
        "rollout": {"id": ro.id, "status": ro.status, "reason": ro.reason,
                    "playbook": ro.playbook_path, "inventory": ro.inventory_path,
                    "created": ro.created, "finished": finished, "target": target,
                    "hosts_by_state": db.counts()},
        "stages": stage_out,
        "hosts": [h.to_json() for h in hosts],
        "failures": [{"host": h.name, "stage": h.stage, **h.failure.to_json()}
                     for h in hosts if h.failure is not None],
        "downtime": downtime_summary(_downtimes(hosts)),
    }


# -- rendering -------------------------------------------------------------------------------

def _ts(t: Optional[float]) -> str:
    return "—" if t is None else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))


def _s(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:.3f} s"


def _bound(b: Optional[float]) -> str:
    return "+Inf" if b is None else f"{b:g}"


def _gate(g: Optional[dict]) -> str:
    """"passed" / "FAILED", then each criterion as name: got (want), x marking misses."""
    if not g:
        return "—"
    if "criteria" not in g:                       # e.g. {"dry_run": true}
        return "; ".join(f"{k}={v}" for k, v in g.items())
    parts = ["passed" if g.get("ok") else "FAILED"]
    for name, c in g["criteria"].items():
        got = f"{c['got']:.4g}" if isinstance(c["got"], float) else c["got"]
        parts.append(f"{name} {got} (want {c['want']}){'' if c['ok'] else ' ✗'}")
    return "; ".join(parts)


def _workloads(w: Optional[dict]) -> str:
    return "—" if w is None else f"{w['verified']}/{w['total']}"


def _kernel(k: dict) -> str:
    if not k["from"] and not k["to"]:
        return "—"
    return f"{k['from'] or '?'} → {k['to'] or '?'}"


def _summary(ro: dict) -> list[tuple[str, str]]:
    return [("status", ro["status"] + (f" ({ro['reason']})" if ro["reason"] else "")),
            ("target", ro["target"] or "—"), ("playbook", ro["playbook"]),
            ("inventory", ro["inventory"]), ("created", _ts(ro["created"])),
            ("finished", _ts(ro["finished"]))]


def _dt_line(dt: dict) -> str:
    return (f"{dt['count']} handovers: p50 {_s(dt['p50'])}, p95 {_s(dt['p95'])}, "
            f"max {_s(dt['max'])}.")


def _stage_cells(s: dict) -> list[str]:
    d = s["downtime"]
    return [s["name"], s["status"], str(s["hosts"]), str(s["succeeded"]), str(s["failed"]),
            str(s["skipped"]), _gate(s["gate"]), _s(d["p50"]), _s(d["p95"]), _s(d["max"])]


_STAGE_COLS = ["stage", "status", "hosts", "succeeded", "failed", "skipped", "gate",
               "downtime p50", "p95", "max"]
_HOST_COLS = ["host", "stage", "state", "result", "downtime", "agent blackout", "arch",
              "kernel", "workloads", "report"]


def _host_cells(h: dict) -> list[str]:
    return [h["name"], h["stage"], h["state"], h["result"] or "—", _s(h["downtime_s"]),
            _s(h["blackout_s"]), h.get("arch") or "—", _kernel(h["kernel"]),
            _workloads(h["workloads"])]


def _md_table(cols: list[str], rows: list[list[str]],
              links: Optional[dict[int, str]] = None,
              first_links: Optional[dict[int, str]] = None) -> list[str]:
    """A Markdown table; `links` {row: relative path} makes that row's last cell a link,
    `first_links` its first cell."""
    def cell(v: str) -> str:
        return html.escape(" ".join(str(v).split()), quote=False).replace("|", "\\|")
    out = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for i, r in enumerate(rows):
        cells = [cell(c) for c in r]
        if links and i in links:
            cells[-1] = f"[{cells[-1]}]({links[i]})"      # host_report_path: URL-safe
        if first_links and i in first_links:
            cells[0] = f"[{cells[0]}]({first_links[i]})"
        out.append("| " + " | ".join(cells) + " |")
    return out


def _linked(rel: Optional[str], out_dir: Optional[str]) -> bool:
    return rel is not None and rel != "" and (
        out_dir is None or os.path.isfile(os.path.join(out_dir, rel)))


def render_markdown(fleet: dict, out_dir: Optional[str] = None) -> str:
    """fleet.md: the rollout, stages, downtime, hosts and failures as Markdown tables.

    Host reports are linked when they exist under `out_dir` (always, when out_dir is None).
    """
    ro, dt = fleet["rollout"], fleet["downtime"]
    out = [f"# Rollout {ro['id']}: {ro['status']}", ""]
    out += _md_table(["field", "value"], [list(kv) for kv in _summary(ro)])
    out += ["", "## Stages", ""]
    out += _md_table(_STAGE_COLS, [_stage_cells(s) for s in fleet["stages"]])
    out += ["", "## Downtime", "",
            _dt_line(dt), ""]
    out += _md_table(["bucket (s)", "hosts"],
                     [[f"{_bound(b['lo'])} – {_bound(b['hi'])}", str(b["count"])]
                      for b in dt["buckets"] if b["count"]])
    out += ["", "## Hosts", ""] + _md_table(
        _HOST_COLS, [_host_cells(h) + [h["report"] or "—"] for h in fleet["hosts"]],
        links={i: h["report"] for i, h in enumerate(fleet["hosts"])
               if _linked(h["report"], out_dir)},
        first_links={i: host_page_path(h["report"]) for i, h in enumerate(fleet["hosts"])
                     if h["report"] and _linked(host_page_path(h["report"]), out_dir)})
    out += ["", "## Failures", ""]
    if fleet["failures"]:
        out += _md_table(["host", "stage", "phase", "reason"],
                         [[f["host"], f["stage"], f["phase"], f["reason"]]
                          for f in fleet["failures"]])
    else:
        out.append("None.")
    return "\n".join(out) + "\n"


def _svg(dt: dict, width: int = 640, height: int = 260) -> str:
    """Inline SVG histogram of the downtime buckets: one <rect> per non-empty bucket."""
    left, right, top, bottom = 48, 12, 16, 56
    bs = dt["buckets"]
    pw, ph = width - left - right, height - top - bottom
    slot = pw / len(bs)
    ymax = max([b["count"] for b in bs] + [1])
    step = max(1, math.ceil(ymax / 4))
    ytop = step * math.ceil(ymax / step)
    e = html.escape
    y0 = top + ph
    out = [(f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="downtime distribution" font-family="sans-serif" font-size="11">'),
           f'<line x1="{left}" y1="{y0}" x2="{left + pw}" y2="{y0}" stroke="#333"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{y0}" stroke="#333"/>']
    for t in range(0, ytop + 1, step):
        y = y0 - ph * t / ytop
        out.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#333"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{t}</text>')
    for i, b in enumerate(bs):
        x = left + i * slot
        label = f"≤{_bound(b['hi'])}" if b["hi"] is not None else f">{_bound(b['lo'])}"
        out.append(f'<text x="{x + slot / 2:.1f}" y="{y0 + 14}" text-anchor="middle">'
                   f'{e(label)}</text>')
        if b["count"]:
            h = ph * b["count"] / ytop
            out.append(f'<rect x="{x + 3:.1f}" y="{y0 - h:.1f}" width="{slot - 6:.1f}" '
                       f'height="{h:.1f}" fill="#4a7fb5"><title>{e(_bound(b["lo"]))}–'
                       f'{e(_bound(b["hi"]))} s: {b["count"]}</title></rect>'
                       f'<text x="{x + slot / 2:.1f}" y="{y0 - h - 3:.1f}" '
                       f'text-anchor="middle">{b["count"]}</text>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 12}" text-anchor="middle">'
               'downtime (s, bucket upper bound)</text>')
    out.append(f'<text x="12" y="{top + ph / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 12 {top + ph / 2:.1f})">hosts</text>')
    if not dt["count"]:
        out.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph / 2:.1f}" '
                   'text-anchor="middle">no downtime measured</text>')
    return "\n".join(out) + "\n</svg>"


_CSS = """body{font-family:sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f0f0f0}.success,.passed,.completed{color:#1a7f37}
.failed,.aborted,.rolled_back{color:#c62828;font-weight:bold}.skipped{color:#888}
td{white-space:nowrap}td.wrap{white-space:normal}
td.reason{font-family:monospace;white-space:pre-wrap}"""


def _html_table(cols: Optional[list[str]], rows: list[list[str]]) -> str:
    """A table of already-escaped <td> cells, with a header row unless `cols` is None."""
    head = "" if cols is None else \
        "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>\n"
    body = "".join("<tr>" + "".join(cells) + "</tr>\n" for cells in rows)
    return f"<table>\n{head}{body}</table>"


def _td(v: Any, cls: Optional[str] = None) -> str:
    c = f' class="{html.escape(cls)}"' if cls else ""
    return f"<td{c}>{html.escape(str(v))}</td>"


def render_html(fleet: dict, out_dir: Optional[str] = None) -> str:
    """fleet.html: self-contained (inline CSS + SVG, no script); host reports are linked when
    they exist under `out_dir` (always, when out_dir is None)."""
    e = html.escape
    ro, dt = fleet["rollout"], fleet["downtime"]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>kho-fleet rollout {e(ro['id'])}</title>", f"<style>{_CSS}</style>",
             "</head><body>",
             (f'<h1>Rollout {e(ro["id"])}: '
              f'<span class="{e(ro["status"])}">{e(ro["status"])}</span></h1>')]
    parts.append(_html_table(None, [[f"<th>{e(k)}</th>", _td(v)] for k, v in _summary(ro)]))
    parts.append("<h2>Stages</h2>")
    parts.append(_html_table(_STAGE_COLS, [
        [_td(c, {1: s["status"], 6: "wrap"}.get(i)) for i, c in enumerate(_stage_cells(s))]
        for s in fleet["stages"]]))
    parts.append("<h2>Downtime</h2>")
    parts.append(f"<p>{e(_dt_line(dt))}</p>")
    parts.append(_svg(dt))
    parts.append("<h2>Hosts</h2>")
    rows = []
    for h in fleet["hosts"]:
        cells = [_td(c, h["result"] if i == 3 else None) for i, c in enumerate(_host_cells(h))]
        rel = h["report"]
        page = host_page_path(rel) if rel else None
        if _linked(page, out_dir):
            cells[0] = f'<td><a href="{e(page or "")}">{e(h["name"])}</a></td>'
        if _linked(rel, out_dir):
            cells.append(f'<td><a href="{e(rel)}">{e(rel)}</a></td>')
        else:
            cells.append(_td(rel or "—"))
        rows.append(cells)
    parts.append(_html_table(_HOST_COLS, rows))
    parts.append("<h2>Failures</h2>")
    if fleet["failures"]:
        parts.append(_html_table(["host", "stage", "phase", "reason"], [
            [_td(f["host"]), _td(f["stage"]), _td(f["phase"]), _td(f["reason"], "reason")]
            for f in fleet["failures"]]))
    else:
        parts.append("<p>None.</p>")
    parts.append(f"<p><small>{e(fleet['schema'])}, generated {e(_ts(fleet['generated']))}"
                 "</small></p></body></html>")
    return "\n".join(parts) + "\n"


def write_fleet_report(out_dir: str, fleet: dict) -> dict[str, str]:
    """Write fleet.json, fleet.md and fleet.html into `out_dir`; their paths by format."""
    paths = {k: os.path.join(out_dir, f"fleet.{k}") for k in ("json", "md", "html")}
    _write_text(paths["json"], json.dumps(fleet, indent=2, sort_keys=True) + "\n")
    _write_text(paths["md"], render_markdown(fleet, out_dir))
    _write_text(paths["html"], render_html(fleet, out_dir))
    return paths
