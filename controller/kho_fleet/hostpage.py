"""One host's handover as a page a person reads: hosts/<host>.html beside hosts/<host>.json.

`render_host_page` is pure: what hosts/<host>.json holds ({"host", "agent", "controller"},
fleetreport.HostReport) in, one self-contained HTML page out (inline CSS and SVG, no script,
nothing fetched), like fleet.html. fleetreport.write_host_report writes it with the JSON.

Sections, each drawn only when the report carries what it needs, so older agents' reports and
the controller's short report of a host that failed before its agent reported render too:
- summary: result, failure (phase and reason), kernels, handover id, blackout and downtime;
- timeline: one bar per agent step from the report's `stamps` (each step ends at its stamp
  and starts where the previous one ended), the blackout (kexec -e to restored) shaded;
  without stamps, the controller's view from its events ("agent STEP: rc N in Xs", and
  kexec_sent to up);
- the blackout split kexec -> kernel -> agent -> restored -> verified from `downtime`;
- workloads: verdict, PFNs, sha256, properties before/after (mismatches marked), bad pages;
- bad pages of each failed workload: where in the memfd, PFN before/after, bytes and bits
  differing, the first difference, whether the PFN was in the pre-kexec radix snapshot;
- the radix snapshot (before) and the incoming tree (after); what could not be checked;
- the controller's record (state, attempts, events).

Everything shown comes from agents and inventories: every value is escaped, and a field of
an unexpected type is shown as absent, never trusted (the page is written for every host
report, so rendering must not raise on what the JSON holds). Objects are shown in key
order, so the page is a function of the JSON's content. Long lists are bounded: the JSON
keeps everything.
"""

from __future__ import annotations

import html
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["STEP_ORDER", "Bar", "timeline_bars", "blackout_segments", "render_host_page",
           "page_name"]

# the agent's stamps, in handover order (report `stamps`: {step: epoch seconds}); a step's
# stamp is when it completed
STEP_ORDER = ("preflight", "stage", "preserve", "snapshot", "kexec", "kexec_exec",
              "kernel_start", "agent_start", "restored", "verified")
MAX_WORKLOAD_ROWS = 200          # failed workloads first, then verified ones up to this
MAX_BAD_PAGE_WORKLOADS = 20      # workloads whose bad pages get a table
MAX_EVENTS = 200
MAX_TEXT = 300                   # characters of one free-text value (errors, reasons)
_AGENT_EVENT = re.compile(r"rc (-?\d+) in ([0-9.]+)s")
e = html.escape


# -- reading JSON defensively ----------------------------------------------------------------

def _d(v: Any) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def _l(v: Any) -> Sequence[Any]:
    return v if isinstance(v, list) else []


def _num(v: Any) -> Optional[float]:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def _int(v: Any) -> Optional[int]:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _str(v: Any) -> Optional[str]:
    return v if isinstance(v, str) else None


def _bool(v: Any) -> Optional[bool]:
    return v if isinstance(v, bool) else None


# -- formatting ------------------------------------------------------------------------------

def _dur(s: Optional[float]) -> str:
    """A duration: ms below a second, s below two minutes, else m and s."""
    if s is None:
        return "—"
    if abs(s) < 0.01:
        return f"{s * 1000:.1f} ms"
    if abs(s) < 1:
        return f"{s * 1000:.0f} ms"
    if abs(s) < 120:
        return f"{s:.2f} s"
    return f"{int(s // 60)} min {s % 60:.0f} s"


def _size(n: Optional[int]) -> str:
    if n is None:
        return "—"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.2f} {unit}"
    return f"{n} B"


def _hex(n: Optional[int]) -> str:
    return "—" if n is None else f"{n:#x}"


def _yes(b: Optional[bool]) -> str:
    return "—" if b is None else ("yes" if b else "no")


def _clip(s: str, n: int = MAX_TEXT) -> str:
    return s if len(s) <= n else s[:n - 1] + "…"


def _value(v: Any, n: int = 80) -> str:
    """A property value compactly: {order: count} as "0:12 9:2", lists as JSON, bounded."""
    if isinstance(v, Mapping):
        s = " ".join(f"{k}:{_value(v[k], 20)}" for k in sorted(v, key=str)) or "{}"
    elif isinstance(v, (list, tuple)):
        s = json.dumps(v, separators=(",", ":"), default=str)
    elif isinstance(v, bool) or v is None:
        s = json.dumps(v)
    else:
        s = str(v)
    return _clip(s, n)


def _flags(v: Any) -> str:
    """File flags (O_*) in octal, as fcntl.h spells them (0o100002: O_LARGEFILE | O_RDWR)."""
    return f"{v:#o}" if _int(v) is not None else _value(v)


def page_name(host: str) -> str:
    """The host report's file name stem (fleetreport.host_report_path's rule)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", host).lstrip(".") or "_"


def _workload_name(w: Mapping[str, Any]) -> str:
    tok = _int(w.get("token"))
    return f"{_str(w.get('session')) or '?'}/{_hex(tok) if tok is not None else '?'}"


# -- the timeline ----------------------------------------------------------------------------

@dataclass
class Bar:
    """One step on the timeline: `start`..`end` in epoch seconds; kind picks its colour
    (prep, exec, blackout, verify, failed)."""

    label: str
    start: float
    end: float
    kind: str


def _stamp_bars(stamps: Mapping[str, Any]) -> list[Bar]:
    pts = sorted((t, STEP_ORDER.index(k) if k in STEP_ORDER else len(STEP_ORDER), k)
                 for k, v in stamps.items() if (t := _num(v)) is not None)
    t_exec = _num(stamps.get("kexec_exec"))
    t_rest = _num(stamps.get("restored"))
    bars = []
    prev: Optional[float] = None
    for t, _, name in pts:
        if t_exec is None or t < t_exec:
            kind = "prep"
        elif t == t_exec:
            kind = "exec"
        elif t_rest is None or t <= t_rest:
            kind = "blackout"
        else:
            kind = "verify"
        bars.append(Bar(name, t if prev is None else prev, t, kind))
        prev = t
    return bars


def _controller_bars(events: Sequence[Any]) -> list[Bar]:
    bars = []
    down: Optional[float] = None
    for ev in events:
        ev = _d(ev)
        ts, name, detail = _num(ev.get("ts")), _str(ev.get("event")), _str(ev.get("detail"))
        if ts is None or name is None:
            continue
        if name.startswith("agent ") and detail and (m := _AGENT_EVENT.match(detail)):
            dur = float(m.group(2))
            bars.append(Bar(name[6:], ts - dur, ts, "prep" if m.group(1) == "0" else "failed"))
        elif name == "state" and detail and detail.endswith("-> kexec_sent"):
            down = ts
        elif name == "state" and detail and detail.endswith("-> up") and down is not None:
            bars.append(Bar("down (kexec_sent → up)", down, ts, "blackout"))
            down = None
    return bars


def timeline_bars(agent: Mapping[str, Any], controller: Mapping[str, Any]
                  ) -> tuple[list[Bar], str]:
    """The bars of the timeline and where they came from ("agent", "controller" or "")."""
    bars = _stamp_bars(_d(agent.get("stamps")))
    if bars:
        return bars, "agent"
    bars = _controller_bars(_l(controller.get("events")))
    return bars, "controller" if bars else ""


def _ticks(span: float, n: int = 8) -> float:
    """A 1/2/5 x 10^k tick step giving at most `n` ticks over `span`."""
    raw = max(span, 1e-6) / n
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


_COLOURS = {"prep": "#4a7fb5", "exec": "#7a4ab5", "blackout": "#d9822b", "verify": "#1a7f37",
            "failed": "#c62828"}


def _timeline_svg(bars: list[Bar], width: int = 1000) -> str:
    left, right, top, row = 150, 90, 24, 22
    t0 = min(b.start for b in bars)
    t1 = max(b.end for b in bars)
    span = max(t1 - t0, 1e-3)
    pw = width - left - right
    height = top + row * len(bars) + 10

    def x(t: float) -> float:
        return left + (t - t0) / span * pw

    out = [(f'<svg class="timeline" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="handover timeline" '
           'font-family="sans-serif" font-size="11">')]
    ex = [b for b in bars if b.kind == "exec"]
    bl = [b for b in bars if b.kind == "blackout"]
    if bl:           # the blackout: from kexec -e (or the first dark step's start) to restored
        a = ex[0].end if ex else bl[0].start
        b_end = max(b.end for b in bl)
        out.append(f'<rect class="band" x="{x(a):.1f}" y="{top - 6}" '
                   f'width="{max(x(b_end) - x(a), 1):.1f}" height="{height - top - 2}" '
                   f'fill="#fbe9d7"><title>blackout {e(_dur(b_end - a))}</title></rect>'
                   f'<text x="{(x(a) + x(b_end)) / 2:.1f}" y="{top - 9}" text-anchor="middle" '
                   f'fill="#a0561a">blackout {e(_dur(b_end - a))}</text>')
    step = _ticks(span)
    k = 0
    while k * step <= span + 1e-9:
        tx = x(t0 + k * step)
        out.append(f'<line x1="{tx:.1f}" y1="{top - 4}" x2="{tx:.1f}" y2="{height - 8}" '
                   f'stroke="#ddd"/><text x="{tx:.1f}" y="{height}" text-anchor="middle" '
                   f'fill="#666">{e(_dur(k * step) if k else "0")}</text>')
        k += 1
    for i, b in enumerate(bars):
        y = top + i * row
        x0, x1 = x(b.start), x(b.end)
        w = max(x1 - x0, 2.0)
        took = _dur(b.end - b.start) if b.end > b.start else "done"   # the first stamp
        out.append(f'<text x="{left - 8}" y="{y + 14}" text-anchor="end">{e(_clip(b.label, 24))}'
                   '</text>'
                   f'<rect class="bar {e(b.kind)}" x="{x0:.1f}" y="{y + 3}" width="{w:.1f}" '
                   f'height="{row - 6}" fill="{_COLOURS.get(b.kind, "#888")}">'
                   f'<title>{e(b.label)}: {e(took)}</title></rect>'
                   f'<text x="{x0 + w + 4:.1f}" y="{y + 14}">{e(took)}</text>')
    return "\n".join(out) + "\n</svg>"


# -- the blackout split ----------------------------------------------------------------------

def blackout_segments(downtime: Mapping[str, Any]) -> list[tuple[str, float]]:
    """kexec -> kernel -> agent -> restored -> verified, in seconds, from the report's
    `downtime` (spans it does not have are left out)."""
    k2k, k2a = _num(downtime.get("kexec_to_kernel_s")), _num(downtime.get("kernel_to_agent_s"))
    a2r = _num(downtime.get("agent_to_restored_s"))
    restored, verified = _num(downtime.get("restored_s")), _num(downtime.get("verified_s"))
    if a2r is None and restored is not None and k2k is not None and k2a is not None:
        a2r = restored - k2k - k2a
    if restored is None and k2k is not None and k2a is not None and a2r is not None:
        restored = k2k + k2a + a2r
    r2v = None if restored is None or verified is None else verified - restored
    segs = [("kexec → kernel", k2k), ("kernel → agent", k2a), ("agent → restored", a2r),
            ("restored → verified", r2v)]
    return [(name, max(v, 0.0)) for name, v in segs if v is not None]


_SEG_COLOURS = ("#7a4ab5", "#d9822b", "#e0b030", "#1a7f37")
_SEG_NAMES = ("kexec → kernel", "kernel → agent", "agent → restored", "restored → verified")


def _blackout_svg(segs: list[tuple[str, float]], blackout: Optional[float],
                  width: int = 1000) -> str:
    left, right, top, bar_h = 10, 10, 22, 30
    total = max(sum(v for _, v in segs), blackout or 0.0, 1e-6)
    pw = width - left - right
    height = top + bar_h + 22
    out = [(f'<svg class="split" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="blackout split" '
           'font-family="sans-serif" font-size="11">')]
    xpos = float(left)
    for name, v in segs:
        w = pw * v / total
        colour = _SEG_COLOURS[_SEG_NAMES.index(name)] if name in _SEG_NAMES else "#888"
        out.append(f'<rect class="seg" x="{xpos:.1f}" y="{top}" width="{max(w, 1):.1f}" '
                   f'height="{bar_h}" fill="{colour}"><title>{e(name)}: {e(_dur(v))}</title>'
                   '</rect>')
        if w > 70:
            out.append(f'<text x="{xpos + w / 2:.1f}" y="{top + bar_h / 2 + 4:.1f}" '
                       f'text-anchor="middle" fill="#fff">{e(_dur(v))}</text>')
        xpos += w
    if blackout is not None:
        bx = left + pw * blackout / total
        out.append(f'<line x1="{bx:.1f}" y1="{top - 6}" x2="{bx:.1f}" y2="{top + bar_h + 6}" '
                   f'stroke="#c62828" stroke-width="2"/><text x="{min(bx, width - 60):.1f}" '
                   f'y="{top - 9}" text-anchor="middle" fill="#c62828">'
                   f'blackout {e(_dur(blackout))}</text>')
    out.append(f'<text x="{left}" y="{height - 4}" fill="#666">0 = kexec -e</text>'
               f'<text x="{width - right}" y="{height - 4}" text-anchor="end" fill="#666">'
               f'{e(_dur(total))}</text>')
    return "\n".join(out) + "\n</svg>"


# -- HTML pieces -----------------------------------------------------------------------------

_CSS = """body{font-family:sans-serif;margin:2em;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.num{text-align:right}
.success,.passed,.verified{color:#1a7f37}.incomplete,.warn{color:#a0561a}
.failed,.aborted,.bad{color:#c62828;font-weight:bold}
.mono{font-family:monospace}.fail-box{border:2px solid #c62828;background:#fdecea;
padding:.5em 1em;margin:1em 0;white-space:pre-wrap;font-family:monospace}
.sw{display:inline-block;width:.9em;height:.9em;vertical-align:middle;margin-right:.4em}
.note{color:#666}nav a{margin-right:1.5em}
details{margin:.5em 0 1.5em}summary{cursor:pointer}"""


def _td(v: Any, cls: Optional[str] = None, title: Optional[str] = None) -> str:
    c = f' class="{e(cls)}"' if cls else ""
    t = f' title="{e(title)}"' if title else ""
    return f"<td{c}{t}>{e(str(v))}</td>"


def _table(cols: Optional[Sequence[str]], rows: Sequence[Sequence[str]],
           cls: Optional[str] = None) -> str:
    """A table of already-rendered <td> cells, with a header row unless `cols` is None."""
    c = f' class="{e(cls)}"' if cls else ""
    head = "" if cols is None else \
        "<tr>" + "".join(f"<th>{e(x)}</th>" for x in cols) + "</tr>\n"
    body = "".join("<tr>" + "".join(r) + "</tr>\n" for r in rows)
    return f"<table{c}>\n{head}{body}</table>"


def _kv(pairs: Sequence[tuple[str, str]], cls: Optional[dict[str, str]] = None) -> str:
    cls = cls or {}
    return _table(None, [[f"<th>{e(k)}</th>", _td(v, cls.get(k))] for k, v in pairs])


# -- sections --------------------------------------------------------------------------------

def _summary(host: str, agent: Mapping[str, Any], ctl: Mapping[str, Any]) -> list[str]:
    kernel = _d(agent.get("kernel"))
    kf, kt = _d(kernel.get("from")), _d(kernel.get("to"))
    down = _d(agent.get("downtime"))
    journal = _d(agent.get("journal"))
    md = _d(agent.get("kexec_metadata"))

    def k(side: Mapping[str, Any]) -> str:
        rel, kho = _str(side.get("release")), _str(side.get("kho_compatible"))
        return (rel or "?") + (f" ({kho})" if kho else "")

    pairs = [("result", _str(agent.get("result")) or "no report"),
             ("handover", _str(agent.get("handover_id")) or "—"),
             ("agent phase", _str(agent.get("phase")) or "—")]
    if kf or kt:
        pairs.append(("kernel", f"{k(kf)} → {k(kt)}"))
    if _str(kt.get("sha256")):
        pairs.append(("image sha256", str(kt.get("sha256"))))
    pairs += [("blackout (agent)", _dur(_num(down.get("blackout_s")))),
              ("downtime (controller)", _dur(_num(ctl.get("downtime_s"))))]
    if _str(ctl.get("stage")):
        pairs.append(("stage", str(ctl.get("stage"))))
    if _str(ctl.get("state")):
        pairs.append(("controller state", str(ctl.get("state"))))
    if _str(journal.get("from")) or _str(journal.get("error")):
        pairs.append(("journal read from", (_str(journal.get("from")) or "—") + (
            f" ({_clip(str(journal.get('error')))})" if _str(journal.get("error")) else "")))
    if _int(md.get("kexec_count")) is not None:
        pairs.append(("kexec boots since cold boot", str(md.get("kexec_count"))))
    res = _str(agent.get("result")) or ""
    out = [_kv(pairs, {"result": res})]
    fail = _d(agent.get("failure"))
    if fail:
        out.append(f'<div class="fail-box">{e(_str(fail.get("phase")) or "?")}: '
                   f'{e(_clip(_str(fail.get("reason")) or "", 4 * MAX_TEXT))}</div>')
    return out


def _timeline(agent: Mapping[str, Any], ctl: Mapping[str, Any]) -> list[str]:
    out = ["<h2>Timeline</h2>"]
    bars, source = timeline_bars(agent, ctl)
    if not bars:
        return out + ['<p class="note">No step timings in this report.</p>']
    if source == "agent":
        out.append('<p class="note">The agent\'s stamps: each step ends at its stamp and '
                   'starts where the previous one ended; the shaded band is the blackout '
                   '(kexec -e to workloads restored).</p>')
    else:
        out.append('<p class="note">The controller\'s view (this report has no agent stamps): '
                   'each agent command as the controller ran it, and the host\'s time between '
                   'kexec and answering again.</p>')
    out.append(_timeline_svg(bars))
    return out


def _split(agent: Mapping[str, Any]) -> list[str]:
    down = _d(agent.get("downtime"))
    segs = blackout_segments(down)
    out = ["<h2>Blackout</h2>"]
    if not segs:
        return out + ['<p class="note">No downtime spans in this report.</p>']
    blackout = _num(down.get("blackout_s"))
    out.append(_blackout_svg(segs, blackout))
    total = sum(v for _, v in segs) or 1.0
    rows = []
    for name, v in segs:
        colour = _SEG_COLOURS[_SEG_NAMES.index(name)] if name in _SEG_NAMES else "#888"
        rows.append([f'<td><span class="sw" style="background:{colour}"></span>{e(name)}</td>',
                     _td(_dur(v), "num"), _td(f"{100 * v / total:.0f} %", "num")])
    out.append(_table(["span (from kexec -e)", "time", "share"], rows))
    return out


def _props_cell(w: Mapping[str, Any]) -> str:
    before, after = _d(w.get("props_before")), _d(w.get("props_after"))
    mismatch = {str(x) for x in _l(w.get("props_mismatch"))}
    if not before and not after:
        return "<td>—</td>"
    lines = []
    for key in sorted(set(before) | set(after), key=str):
        b, a = before.get(key), after.get(key)
        bad = key in mismatch or (key in before and key in after and b != a)
        fmt = _flags if key == "flags" else _value
        text = fmt(b) if key in before and (key not in after or a == b) else \
            f"{fmt(b) if key in before else '—'} → {fmt(a)}"
        cls = ' class="bad"' if bad else ""
        lines.append(f"<span{cls}>{e(str(key))}: {e(text)}</span>")
    for key in sorted(mismatch - {str(k) for k in set(before) | set(after)}):
        lines.append(f'<span class="bad">{e(key)}: differs</span>')
    return '<td class="mono">' + "<br>".join(lines) + "</td>"


def _verdict(w: Mapping[str, Any]) -> tuple[str, str]:
    if w.get("verified") is True:
        return "verified", "verified"
    err = _str(w.get("error"))
    if err:
        return f"FAILED: {_clip(err, 120)}", "failed"
    mis = _l(w.get("props_mismatch"))
    if mis:
        return "FAILED: " + _clip(", ".join(map(str, mis)) + " differ", 120), "failed"
    if w.get("sha256_after") is not None and w.get("sha256_after") != w.get("sha256_before"):
        return "FAILED: bytes differ", "failed"
    if w.get("pfns_identical") is False:
        return "FAILED: PFNs differ", "failed"
    return "FAILED", "failed"


def _bad_count(w: Mapping[str, Any]) -> Optional[int]:
    total, listed = _int(w.get("bad_pages_total")), len(_l(w.get("bad_pages")))
    if total is None:
        return listed if "bad_pages" in w else None
    return max(total, listed)


def _workloads(ws: Sequence[Mapping[str, Any]]) -> list[str]:
    out = ["<h2>Workloads</h2>"]
    if not ws:
        return out + ['<p class="note">No workloads in this report.</p>']
    ok = sum(1 for w in ws if w.get("verified") is True)
    out.append(f"<p>{ok} of {len(ws)} verified, "
               f"{e(_size(sum(_int(w.get('size')) or 0 for w in ws)))} preserved.</p>")
    shown = [w for w in ws if w.get("verified") is not True]
    shown += [w for w in ws if w.get("verified") is True][:max(0, MAX_WORKLOAD_ROWS - len(shown))]
    rows = []
    for w in shown:
        verdict, cls = _verdict(w)
        before, after = _str(w.get("sha256_before")) or "", _str(w.get("sha256_after"))
        if after is None:
            sha = _td(before[:12] + " → —" if before else "—", "mono", before)
        elif after == before:
            sha = _td(f"{before[:12]} (same)", "mono", before)
        else:
            sha = (f'<td class="mono" title="{e(before)} → {e(after)}">{e(before[:12])} → '
                   f'<span class="bad">{e(after[:12])}</span></td>')
        pfns = {True: "same", False: "moved", None: "—"}[_bool(w.get("pfns_identical"))]
        bad = _bad_count(w)
        rows.append([_td(_workload_name(w), "mono"), _td(_str(w.get("source")) or "—"),
                     _td(_size(_int(w.get("size"))), "num"), _td(verdict, cls),
                     _td(pfns, "bad" if pfns == "moved" else None), sha, _props_cell(w),
                     _td("—" if bad is None else str(bad), "num bad" if bad else "num")])
    out.append(_table(["workload", "source", "size", "verdict", "PFNs", "sha256",
                       "properties", "bad pages"], rows))
    if len(shown) < len(ws):
        out.append(f'<p class="note">… and {len(ws) - len(shown)} more verified workloads '
                   "(the JSON lists them all).</p>")
    return out


def _strip_svg(size: int, offsets: list[int], width: int = 1000) -> str:
    """The memfd as a strip [0, size), a red tick at each bad page's offset."""
    left, right, h = 10, 10, 34
    pw = width - left - right
    out = [(f'<svg class="strip" width="{width}" height="{h + 14}" '
           f'viewBox="0 0 {width} {h + 14}" role="img" aria-label="bad pages in the memfd" '
           'font-family="sans-serif" font-size="11">'),
           (f'<rect x="{left}" y="4" width="{pw}" height="{h - 8}" fill="#eef3f8" '
           'stroke="#999"/>')]
    for off in offsets:
        x = left + pw * min(max(off, 0), size) / size
        out.append(f'<rect class="badtick" x="{x:.1f}" y="4" width="2" height="{h - 8}" '
                   f'fill="#c62828"><title>{e(_hex(off))}</title></rect>')
    out.append(f'<text x="{left}" y="{h + 10}" fill="#666">0</text>'
               f'<text x="{width - right}" y="{h + 10}" text-anchor="end" fill="#666">'
               f'{e(_size(size))}</text>')
    return "\n".join(out) + "\n</svg>"


def _bad_pages(ws: Sequence[Mapping[str, Any]]) -> list[str]:
    hit = [w for w in ws if _l(w.get("bad_pages")) or _l(w.get("bad_chunks"))
           or (_int(w.get("bad_pages_total")) or 0) > 0]
    if not hit:
        return []
    out = ["<h2>Bad pages</h2>"]
    for w in hit[:MAX_BAD_PAGE_WORKLOADS]:
        pages = [_d(p) for p in _l(w.get("bad_pages"))]
        total = _bad_count(w) or 0
        out.append(f'<h3 class="mono">{e(_workload_name(w))}: {total} bad page'
                   f'{"" if total == 1 else "s"}'
                   + (f" (the first {len(pages)} listed)" if len(pages) < total else "")
                   + "</h3>")
        size = _int(w.get("size"))
        offs = [o for o in (_int(p.get("offset")) for p in pages) if o is not None]
        if size and offs:
            out.append(_strip_svg(size, offs))
        rows = []
        for p in pages:
            pb, pa = _int(p.get("pfn_before")), _int(p.get("pfn_after"))
            moved = pb is not None and pa is not None and pb != pa
            bytes_, bits = _int(p.get("bytes_differing")), _int(p.get("bits_differing"))
            rows.append([_td(_hex(_int(p.get("offset"))), "mono num"),
                         _td(_hex(pb), "mono num"),
                         _td(_hex(pa), "mono num bad" if moved else "mono num"),
                         _td("—" if bytes_ is None else bytes_, "num"),
                         _td("—" if bits is None else bits, "num"),
                         _td(_clip(_str(p.get("first_diff_hex")) or "—", 120), "mono"),
                         _td(_yes(_bool(p.get("in_snapshot"))))])
        if rows:
            out.append(_table(["offset", "PFN before", "PFN after", "bytes differing",
                               "bits differing", "first difference (offset: before -> after)",
                               "PFN in snapshot"], rows))
        chunks = [c for c in map(_int, _l(w.get("bad_chunks"))) if c is not None]
        if chunks:
            out.append(f'<p class="mono">chunks not narrowed to pages: '
                       f'{e(", ".join(_hex(c) for c in chunks[:32]))}'
                       f'{" …" if len(chunks) > 32 else ""}</p>')
    if len(hit) > MAX_BAD_PAGE_WORKLOADS:
        out.append(f'<p class="note">… and {len(hit) - MAX_BAD_PAGE_WORKLOADS} more workloads '
                   "with bad pages (see the JSON).</p>")
    return out


def _radix(agent: Mapping[str, Any]) -> list[str]:
    radix = _d(agent.get("radix"))
    snap, inc = _d(radix.get("snapshot")), _d(radix.get("incoming"))
    if not snap and not inc:
        return []
    out = ["<h2>Radix tree</h2>"]
    if snap:
        pbo = _d(snap.get("pages_by_order"))
        orders = sorted(((int(o), c) for o, c in pbo.items()
                         if str(o).isdigit() and _int(c) is not None), key=lambda x: x[0])
        pages = sum(c << o for o, c in orders) if orders else None
        missing = _d(snap.get("workload_pfns_missing"))
        miss = {str(k): len(_l(missing[k])) for k in sorted(missing, key=str)}
        pairs = [("root", _hex(_int(snap.get("root")))),
                 ("nodes", str(_int(snap.get("nodes")) if _int(snap.get("nodes")) is not None
                               else "—")),
                 ("blocks", str(_int(snap.get("blocks")) if _int(snap.get("blocks")) is not None
                                else "—")),
                 ("preserved folios by order", " ".join(f"order {o}: {c}" for o, c in orders)
                  or "—"),
                 ("preserved pages", "—" if pages is None else f"{pages} ({_size(pages * 4096)})"),
                 ("tree bytes read", _size(_int(snap.get("bytes")))),
                 ("intact", _yes(_bool(snap.get("intact")))),
                 ("read from", _str(snap.get("memory")) or "—")]
        if missing:
            pairs.append(("workload PFNs missing from the tree",
                          "; ".join(f"{k}: {n}" for k, n in miss.items() if n) or "none"))
        out.append("<h3>Snapshot (before kexec)</h3>")
        out.append(_kv(pairs, {"intact": "failed" if snap.get("intact") is False else "",
                               "workload PFNs missing from the tree":
                               "failed" if any(miss.values()) else ""}))
    if inc:
        pairs = [("root", _hex(_int(inc.get("root")))),
                 ("intact", _yes(_bool(inc.get("intact")))),
                 ("valid nodes", str(_int(inc.get("valid_nodes"))
                                     if _int(inc.get("valid_nodes")) is not None else "—")),
                 ("matches the snapshot", _yes(_bool(inc.get("matches_snapshot")))),
                 ("FDT from", _str(inc.get("fdt_source")) or "—")]
        out.append("<h3>Incoming tree (after kexec)</h3>")
        out.append(_kv(pairs))
        errs = [_clip(str(x)) for x in _l(inc.get("errors"))][:20]
        if errs:
            out.append('<ul class="note">' + "".join(f"<li>{e(x)}</li>" for x in errs) + "</ul>")
    return out


def _checks(agent: Mapping[str, Any]) -> list[str]:
    caps = _d(agent.get("capabilities"))
    nc = [_clip(str(x)) for x in _l(agent.get("not_checked"))]
    if not caps and not nc:
        return []
    out = ["<h2>What could be checked</h2>"]
    if caps:
        out.append(_kv([(str(k), "unknown" if caps[k] is None else _value(caps[k]))
                        for k in sorted(caps, key=str)]))
    if nc:
        out.append("<p>Not checked:</p><ul>" + "".join(
            f'<li class="warn">{e(x)}</li>' for x in nc[:50]) + "</ul>")
    return out


def _ctl_value(key: str, v: Any) -> str:
    """A controller field: *_s as a duration, epoch seconds as UTC time, else as it is."""
    n = _num(v)
    if n is not None and key.endswith("_s"):
        return _dur(n)
    if n is not None and 1e9 < n < 1e11:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(n)) + f".{int(n % 1 * 1000):03d}Z"
    return _clip(_value(v, MAX_TEXT))


def _controller(ctl: Mapping[str, Any]) -> list[str]:
    if not ctl:
        return []
    out = ["<h2>Controller</h2>"]
    pairs = [(str(k), _ctl_value(str(k), ctl[k])) for k in sorted(ctl, key=str)
             if k != "events" and ctl[k] is not None and not isinstance(ctl[k], (dict, list))]
    if pairs:
        out.append(_kv(pairs))
    events = [_d(ev) for ev in _l(ctl.get("events"))]
    if events:
        t0 = next((t for t in (_num(ev.get("ts")) for ev in events) if t is not None), None)
        rows = []
        for ev in events[:MAX_EVENTS]:
            ts = _num(ev.get("ts"))
            rows.append([_td("—" if ts is None or t0 is None else f"+{ts - t0:.3f} s", "num"),
                         _td(_clip(str(ev.get("event", "")), 60)),
                         _td(_clip(str(ev.get("detail") or "")))])
        more = (f'<p class="note">… and {len(events) - MAX_EVENTS} more (see the JSON).</p>'
                if len(events) > MAX_EVENTS else "")
        out.append(f"<details><summary>{len(events)} events</summary>"
                   + _table(["time", "event", "detail"], rows) + more + "</details>")
    return out


def render_host_page(report: Mapping[str, Any], json_name: Optional[str] = None) -> str:
    """hosts/<host>.html for one hosts/<host>.json record ({"host", "agent", "controller"}).

    `json_name`: the JSON file's name, linked from the page (default: the host's)."""
    rec = _d(report)
    agent, ctl = _d(rec.get("agent")), _d(rec.get("controller"))
    host = _str(rec.get("host")) or _str(agent.get("host")) or "?"
    json_name = json_name or page_name(host) + ".json"
    result = _str(agent.get("result")) or "no report"
    ws = [_d(w) for w in _l(agent.get("workloads"))]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>kho-fleet host {e(host)}: {e(result)}</title>", f"<style>{_CSS}</style>",
             "</head><body>",
             (f'<nav><a href="../fleet.html">← fleet report</a>'
             f'<a href="{e(json_name)}">{e(json_name)}</a></nav>'),
             (f'<h1>Host <span class="mono">{e(host)}</span>: '
             f'<span class="{e(result)}">{e(result)}</span></h1>')]
    parts += _summary(host, agent, ctl)
    parts += _timeline(agent, ctl)
    parts += _split(agent)
    parts += _workloads(ws)
    parts += _bad_pages(ws)
    parts += _radix(agent)
    parts += _checks(agent)
    parts += _controller(ctl)
    parts.append(f"<p><small>{e(_str(agent.get('schema')) or 'no agent report')}"
                 "</small></p></body></html>")
    return "\n".join(parts) + "\n"
