"""The fleet report: JSON figures from a StateDB, Markdown tables, a self-contained HTML page."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from kho_fleet.fleetreport import (
    SCHEMA,
    build_fleet_report,
    controller_timings,
    downtime_summary,
    host_report_path,
    percentile,
    write_fleet_report,
    write_host_report,
)
from kho_fleet.playbook import Gate
from kho_fleet.rollout import judge_gate
from kho_fleet.statedb import StateDB

TARGET = "7.2.1-kho"
EVIL = "<script>alert(1)</script>"
_VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr"}


def agent_report(host: str, result: str = "success", blackout: float = 0.5,
                 verified: int = 2, lost: int = 0, failure: dict = None) -> dict:
    ws = [{"session": "vm", "token": i, "size": 4096, "verified": i < verified}
          for i in range(verified + lost)]
    return {"schema": "kho-fleet/handover-report/v1", "host": host, "result": result,
            "failure": failure, "kernel": {"from": {"release": "7.2.0"}, "to": {"release": TARGET}},
            "radix": {"snapshot": {"root": 1}, "incoming": {"intact": result == "success"}},
            "workloads": ws, "downtime": {"blackout_s": blackout}}


def through_kexec(db: StateDB, host: str, downtime: float = None) -> None:
    """pending -> up: via kexec_sent (controller-timed) when `downtime` is given, else not."""
    for s in ("preflight", "staged", "preserved", "snapshotted", "kexec_requested"):
        db.transition(host, s)
    if downtime is None:
        db.transition(host, "up")               # seen back without kexec_sent: no controller timing
    else:
        db.transition(host, "kexec_sent", kexec_started_at=1000.0)
        db.transition(host, "down")
        db.transition(host, "up", back_at=1000.0 + downtime)


@pytest.fixture
def rollout(tmp_path):
    (tmp_path / "pb.yaml").write_text("name: p\n")
    (tmp_path / "inv.yaml").write_text("all: {}\n")
    db = StateDB.create(str(tmp_path / "rollouts"), playbook_path=str(tmp_path / "pb.yaml"),
                        inventory_path=str(tmp_path / "inv.yaml"), rollout_id="r7",
                        stages=[("canary", ["a1", "a2"]), ("rest", ["b1", "b2", "b3"])])
    db.set_stage(0, "running")
    for h, d in (("a1", 1.0), ("a2", 2.0)):
        through_kexec(db, h, d)
        db.transition(h, "verified")
        db.transition(h, "reported", report=agent_report(h, blackout=d - 0.25))
    db.set_stage(0, "passed", gate=judge_gate(Gate(max_downtime_p95_s=30.0), [
        {"state": "reported", "result": "success", "downtime_s": 1.95, "workloads_ok": True},
        {"state": "reported", "result": "success", "downtime_s": 1.95, "workloads_ok": True}]))
    db.set_stage(1, "running")
    through_kexec(db, "b1")                      # only the agent's blackout: 3.0 s
    db.transition("b1", "verified")
    db.transition("b1", "reported", report=agent_report("b1", blackout=3.0))
    through_kexec(db, "b2", 700.0)
    db.transition("b2", "failed", error="verification failed",
                  report=agent_report("b2", "failed", blackout=650.0, verified=1, lost=1,
                                      failure={"phase": "verify", "reason": EVIL}))
    db.transition("b3", "preflight")
    db.transition("b3", "failed", error="ssh: connection refused & <gone>")
    db.set_stage(1, "failed", gate=judge_gate(Gate(max_failed_hosts=1), [
        {"state": "reported", "result": "success", "downtime_s": 2.0, "workloads_ok": True},
        {"state": "failed", "result": "failed", "downtime_s": None, "workloads_ok": False},
        {"state": "failed", "result": "failed", "downtime_s": None, "workloads_ok": False}]))
    db.set_status("aborted", "stage rest failed its gate")
    yield db
    db.close()


class StrictHTML(HTMLParser):
    """Checks nesting (every non-void tag closed in order) and collects what the tests look at."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[str] = []
        self.hrefs: list[str] = []
        self.svg_rects = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "a":
            self.hrefs.append(a["href"])
        if tag == "rect" and "svg" in self.stack:
            self.svg_rects += 1
        if tag not in _VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data) -> None:
        self.text.append(data)


def parse(text: str) -> StrictHTML:
    p = StrictHTML()
    p.feed(text)
    p.close()
    assert not p.errors and not p.stack, (p.errors, p.stack)
    return p


def test_percentile_and_buckets() -> None:
    assert percentile([5, 1, 4, 2, 3], 50) == 3
    assert percentile([1, 2, 3, 4, 5], 95) == pytest.approx(4.8)
    assert percentile([7.5], 95) == 7.5 and percentile([], 50) is None
    d = downtime_summary([0.5, 0.6, 1.0, 601.0])
    assert [(b["hi"], b["count"]) for b in d["buckets"] if b["count"]] == [
        (0.5, 1), (1, 2), (None, 1)]
    assert host_report_path("../evil/x") == "hosts/_evil_x.json"


def test_fleet_json(rollout) -> None:
    fleet = build_fleet_report(rollout)
    assert fleet["schema"] == SCHEMA
    ro = fleet["rollout"]
    assert (ro["id"], ro["status"], ro["reason"], ro["target"]) == (
        "r7", "aborted", "stage rest failed its gate", TARGET)
    assert ro["finished"] is not None and ro["finished"] >= ro["created"]
    assert ro["hosts_by_state"]["reported"] == 3 and ro["hosts_by_state"]["failed"] == 2
    can, rest = fleet["stages"]
    assert (can["name"], can["status"], can["hosts"], can["succeeded"], can["failed"]) == (
        "canary", "passed", 2, 2, 0)
    assert can["gate"]["criteria"]["max_downtime_p95_s"]["got"] == 1.95
    assert can["downtime"] == {"count": 2, "p50": 1.5, "p95": 1.95, "max": 2.0}
    assert (rest["succeeded"], rest["failed"], rest["skipped"]) == (1, 2, 0)
    # downtimes: a1 1.0, a2 2.0 (controller), b1 3.0 (agent blackout only), b2 700 (controller)
    dt = fleet["downtime"]
    assert (dt["count"], dt["p50"], dt["max"]) == (4, 2.5, 700.0)
    assert dt["p95"] == pytest.approx(3.0 + 0.85 * 697.0)
    assert [(b["hi"], b["count"]) for b in dt["buckets"] if b["count"]] == [
        (1, 1), (2, 1), (5, 1), (None, 1)]
    hosts = {h["name"]: h for h in fleet["hosts"]}
    assert (hosts["a1"]["downtime_s"], hosts["a1"]["blackout_s"]) == (1.0, 0.75)
    assert (hosts["b1"]["downtime_s"], hosts["b1"]["blackout_s"]) == (None, 3.0)
    assert hosts["b2"]["workloads"] == {"verified": 1, "total": 2}
    assert hosts["b2"]["kernel"] == {"from": "7.2.0", "to": TARGET}
    assert hosts["b3"]["workloads"] is None and hosts["b3"]["report"] is None
    assert hosts["a1"]["report"] == "hosts/a1.json"
    assert fleet["failures"] == [
        {"host": "b2", "stage": "rest", "phase": "verify", "reason": EVIL},
        {"host": "b3", "stage": "rest", "phase": "preflight",
         "reason": "ssh: connection refused & <gone>"}]
    assert build_fleet_report(rollout, target="7.3")["rollout"]["target"] == "7.3"


def test_written_reports(rollout, tmp_path) -> None:
    out = str(tmp_path / "report")
    written = []
    for row in rollout.hosts():
        if row.report is not None and row.name != "b1":      # b1's file is never written
            written.append(write_host_report(out, row.name, row.report, controller_timings(row)))
    assert written == ["hosts/a1.json", "hosts/a2.json", "hosts/b2.json"]
    a1 = json.load(open(os.path.join(out, "hosts/a1.json")))
    assert a1["agent"]["result"] == "success" and a1["controller"]["downtime_s"] == 1.0
    assert a1["controller"]["state"] == "reported"

    fleet = build_fleet_report(rollout)
    paths = write_fleet_report(out, fleet)
    assert sorted(os.path.basename(p) for p in paths.values()) == ["fleet.html", "fleet.json",
                                                                   "fleet.md"]
    assert json.load(open(paths["json"])) == fleet

    md = open(paths["md"]).read()
    assert "| stage | status | hosts | succeeded | failed | skipped | gate |" in md
    assert ("| canary | passed | 2 | 2 | 0 | 0 | passed; min_success_ratio 1 (want 1.0); "
            "max_downtime_p95_s 1.95 (want 30.0); all_workloads_verified True (want True) |") in md
    assert "max_failed_hosts 2 (want 1) ✗" in md
    assert "FAILED; min_success_ratio 0.3333 (want 1.0) ✗" in md
    assert "[hosts/a1.json](hosts/a1.json) |" in md and "| hosts/b1.json |" in md
    assert "| [a1](hosts/a1.html) |" in md and "| b1 |" in md
    assert "| host | stage | state | result |" in md and "| b3 | rest | failed | failed |" in md
    assert "| b2 | rest | verify | &lt;script&gt;alert(1)&lt;/script&gt; |" in md
    assert "<script>" not in md

    page = open(paths["html"]).read()
    p = parse(page)
    assert p.tags.count("svg") == 1 and p.svg_rects == 4     # one bar per non-empty bucket
    assert "script" not in p.tags and "link" not in p.tags and "img" not in p.tags
    assert EVIL in "".join(p.text) and EVIL not in page      # shown as text, escaped in source
    assert "http://" not in page and "https://" not in page and "src=" not in page
    pages = [w[:-len(".json")] + ".html" for w in written]   # each host's page (hostpage.py)
    assert sorted(p.hrefs) == sorted(written + pages)        # exactly the files that exist
    for h in p.hrefs:
        assert os.path.isfile(os.path.join(out, h))
    assert "hosts/b1.json" in "".join(p.text)                # named, not linked


def test_empty_rollout_renders(tmp_path) -> None:
    (tmp_path / "pb.yaml").write_text("name: p\n")
    (tmp_path / "inv.yaml").write_text("all: {}\n")
    with StateDB.create(str(tmp_path / "r"), playbook_path=str(tmp_path / "pb.yaml"),
                        inventory_path=str(tmp_path / "inv.yaml"),
                        stages=[("all", ["h1"])]) as db:
        fleet = build_fleet_report(db)
    assert fleet["rollout"]["target"] is None and fleet["rollout"]["finished"] is None
    assert fleet["downtime"]["count"] == 0 and fleet["downtime"]["p95"] is None
    paths = write_fleet_report(str(tmp_path / "out"), fleet)
    p = parse(open(paths["html"]).read())
    assert p.svg_rects == 0 and "no downtime measured" in "".join(p.text)
    assert "None." in open(paths["md"]).read()


def test_html_renders_in_chromium(rollout, tmp_path) -> None:
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                   "google-chrome"))), None)
    if browser is None:
        pytest.skip("no headless chromium installed (optional: renders fleet.html to PNG)")
    out = tmp_path / "report"
    paths = write_fleet_report(str(out), build_fleet_report(rollout))
    png = tmp_path / "fleet.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}",
                    "--window-size=1200,1600", "file://" + paths["html"]],
                   check=True, capture_output=True, timeout=120)
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
