"""The host page (hosts/<host>.html, hostpage.py): written beside each host report by a real
twin rollout run through the CLI (one host verified, one with a bit flipped during its kexec),
linked from fleet.html and fleet.md; its sections, escaping of what agents and inventories
wrote, reports with and without the newer fields (stamps, bad pages, properties, checks), and
the page as headless Chromium draws it (one launch per run; skipped, saying why, without it).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

from kho_fleet.fleetreport import write_host_report
from kho_fleet.hostpage import STEP_ORDER, blackout_segments, render_host_page
from kho_fleet.inventory import InventoryError, load_inventory
from kho_fleet.sim.fleet import fleet_down

EVIL = "<script>alert('x')</script>&\""
GOOD, BAD = "hp-good", "hp-bad"
_VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr"}


# -- a real rollout --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rollout_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """reports/<id>/ of a twin rollout run through the CLI: GOOD verifies, BAD gets a bit
    flipped in a preserved page during its kexec (twin fault `bitflip`)."""
    tmp = tmp_path_factory.mktemp("hostpage")
    inv = tmp / "inventory.yaml"
    inv.write_text(yaml.safe_dump({"all": {
        "vars": {"kho_transport": "sim", "kho_boot_timeout": 20, "kho_sim_boot_delay": 0.1,
                 "kho_sim_ram_mib": 96},
        "hosts": {GOOD: None, BAD: {"kho_sim_faults": ["bitflip"]}}}}))
    pb = tmp / "playbook.yaml"
    pb.write_text(yaml.safe_dump({
        "name": "host page", "hosts": "all", "target": {"kernel": "twin:7.2.14-twin"},
        "workloads": {"sessions": [{"name": "vm-ram", "memfds": [
            {"token": 0x1001, "size": "3MiB", "seed": 1},
            {"token": 0x1002, "size": "1MiB", "seed": 2}]}]},
        "stages": [{"name": "all", "hosts": "all",
                    "gate": {"min_success_ratio": 0.5, "all_workloads_verified": False}}],
        "on_failure": "continue", "timeouts": {"ssh_s": 15, "boot_s": 20, "verify_s": 60}},
        sort_keys=False))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "kho_fleet.cli", "rollout", "--playbook", str(pb),
             "--inventory", str(inv), "--rollouts-dir", str(tmp / "rollouts"),
             "--reports-dir", str(tmp / "reports"), "--sim-dir", str(tmp / "sim")],
            capture_output=True, text=True, timeout=300, cwd=tmp)
        assert proc.returncode in (0, 1), proc.stderr          # 1: a host failed, as meant
        (rid,) = os.listdir(tmp / "reports")
        yield tmp / "reports" / rid
    finally:
        try:
            fleet_down(load_inventory(str(inv)), str(tmp / "sim"))
        except (OSError, InventoryError):
            pass


def host_json(rollout_dir: Path, host: str) -> dict:
    return json.loads((rollout_dir / "hosts" / f"{host}.json").read_text())


def with_new_fields(rec: dict) -> dict:
    """`rec` with the report fields the other helpers are adding (the shared contract), where
    the real report does not have them yet: stamps, restored_s/verified_s, bad pages of the
    failed workload, properties, capabilities. Real values win."""
    rec = copy.deepcopy(rec)
    agent = rec["agent"]
    down = agent["downtime"]
    k2k, k2a, a2r = (down["kexec_to_kernel_s"], down["kernel_to_agent_s"],
                     down["agent_to_restored_s"])
    down.setdefault("restored_s", round(k2k + k2a + a2r, 6))
    down.setdefault("verified_s", round(down["restored_s"] + 0.35, 6))
    t = rec["controller"]["events"][0]["ts"]
    gaps = (0.22, 0.23, 0.65, 0.27, 0.2, 0.02, k2k, k2a, a2r, down["verified_s"]
            - down["restored_s"])
    stamps = {}
    for step, gap in zip(STEP_ORDER, gaps):
        t += gap
        stamps[step] = t
    agent.setdefault("stamps", stamps)
    for w in agent["workloads"]:
        props = {"size": w["size"], "pos": 0, "seals": 0, "flags": 0,
                 "folios_by_order": {"0": w["size"] // 4096}, "holes": []}
        w.setdefault("props_before", props)
        w.setdefault("props_after", props)
        w.setdefault("props_mismatch", [])
        if not w["verified"] and not w.get("bad_pages"):
            w["bad_pages"] = [
                {"offset": 0x5000, "pfn_before": 0x12345, "pfn_after": 0x12345,
                 "bytes_differing": 1, "bits_differing": 1,
                 "first_diff_hex": "0x3a: 5c11 -> 5d11", "in_snapshot": True},
                {"offset": 0x2ff000, "pfn_before": 0x13000, "pfn_after": 0x14000,
                 "bytes_differing": 0, "bits_differing": 0, "first_diff_hex": "",
                 "in_snapshot": False}]
            w["bad_pages_total"] = 3
    agent.setdefault("capabilities", {"kho_debugfs": True, "devmem_ram": True, "kcore": False,
                                      "lockdown": "none", "kexec_sig_required": False})
    agent.setdefault("not_checked", [])
    return rec


# -- reading the page back -------------------------------------------------------------------

class Page(HTMLParser):
    """Checks nesting (every non-void tag closed in order); collects tags, rect classes,
    links, headings, text, and each table's rows (as lists of cell texts)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[str] = []
        self.rects: list[str] = []
        self.hrefs: list[str] = []
        self.headings: list[str] = []
        self.text: list[str] = []
        self.tables: list[list[list[str]]] = []
        self._cell: Optional[list[str]] = None
        self._heading: Optional[list[str]] = None
        self.cell_classes: list[tuple[str, str]] = []
        self._cls = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "a":
            self.hrefs.append(a.get("href") or "")
        if tag == "rect":
            self.rects.append(a.get("class") or "")
        if tag == "table":
            self.tables.append([])
        if tag == "tr":
            self.tables[-1].append([])
        if tag in ("td", "th"):
            self._cell, self._cls = [], a.get("class") or ""
        if tag in ("h1", "h2", "h3"):
            self._heading = []
        if tag not in _VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag in ("td", "th") and self._cell is not None:
            text = "".join(self._cell)
            self.tables[-1][-1].append(text)
            self.cell_classes.append((text, self._cls))
            self._cell = None
        if tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append("".join(self._heading))
            self._heading = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._heading is not None:
            self._heading.append(data)

    def table_after(self, heading: str) -> list[list[str]]:
        """The rows of the first table whose header row starts with `heading`."""
        return next(t for t in self.tables if t and t[0] and t[0][0] == heading)


def parse(text: str) -> Page:
    p = Page()
    p.feed(text)
    p.close()
    assert not p.errors and not p.stack, (p.errors, p.stack)
    assert "script" not in p.tags and "link" not in p.tags and "img" not in p.tags
    assert "http://" not in text and "https://" not in text and "src=" not in text
    return p


# -- tests -----------------------------------------------------------------------------------

def test_rollout_writes_linked_pages(rollout_dir: Path) -> None:
    fleet = parse((rollout_dir / "fleet.html").read_text())
    md = (rollout_dir / "fleet.md").read_text()
    for host in (GOOD, BAD):
        page = rollout_dir / "hosts" / f"{host}.html"
        assert f"hosts/{host}.html" in fleet.hrefs and f"hosts/{host}.json" in fleet.hrefs
        assert f"| [{host}](hosts/{host}.html) |" in md
        p = parse(page.read_text())
        assert p.hrefs == ["../fleet.html", f"{host}.json"]       # back, and the raw JSON
        for h in p.hrefs:
            assert (page.parent / h).is_file()
        # the page is the JSON's: re-rendering hosts/<host>.json gives the same bytes
        assert render_host_page(host_json(rollout_dir, host)) == page.read_text()


def test_success_page(rollout_dir: Path) -> None:
    rec = host_json(rollout_dir, GOOD)
    p = parse((rollout_dir / "hosts" / f"{GOOD}.html").read_text())
    assert p.headings[0] == f"Host {GOOD}: success"
    assert {"Timeline", "Blackout", "Workloads", "Radix tree", "Controller"} <= set(p.headings)
    assert "Bad pages" not in p.headings
    assert p.tags.count("svg") == 2 and "bad" not in " ".join(p.rects)
    # the timeline: one bar per step, from the agent's stamps, else the controller's events
    stamps = rec["agent"].get("stamps")
    n_bars = len(stamps) if stamps else 1 + sum(
        1 for ev in rec["controller"]["events"] if ev["event"].startswith("agent "))
    assert sum(1 for c in p.rects if c.startswith("bar ")) == n_bars
    assert sum(1 for c in p.rects if c == "seg") == len(blackout_segments(rec["agent"]["downtime"]))
    rows = p.table_after("workload")
    assert len(rows) == 1 + len(rec["agent"]["workloads"])
    assert [r[3] for r in rows[1:]] == ["verified", "verified"]
    assert {r[0] for r in rows[1:]} == {"vm-ram/0x1001", "vm-ram/0x1002"}
    snap = rec["agent"]["radix"]["snapshot"]
    assert f"{snap['root']:#x}" in "".join(p.text)


def test_failed_page(rollout_dir: Path) -> None:
    """The bit-flipped host: the failure, the failed workload, its bad pages (the real ones
    when the agent reports them; the contract's fields added otherwise) and the new fields."""
    real = host_json(rollout_dir, BAD)
    p = parse((rollout_dir / "hosts" / f"{BAD}.html").read_text())
    reason = real["agent"]["failure"]["reason"]
    assert p.headings[0] == f"Host {BAD}: failed" and reason in "".join(p.text)
    verdicts = {r[0]: r[3] for r in p.table_after("workload")[1:]}
    assert verdicts["vm-ram/0x1002"] == "verified"
    assert verdicts["vm-ram/0x1001"].startswith("FAILED")

    rec = with_new_fields(real)
    page = render_host_page(rec)
    p = parse(page)
    agent = rec["agent"]
    assert sum(1 for c in p.rects if c.startswith("bar ")) == len(agent["stamps"])
    assert sum(1 for c in p.rects if c == "band") == 1                 # the blackout shaded
    assert "Timeline" in p.headings and "The agent's stamps" in page
    assert [r[0] for r in p.table_after("span (from kexec -e)")[1:]] == [
        "kexec → kernel", "kernel → agent", "agent → restored", "restored → verified"]
    (bad,) = [w for w in agent["workloads"] if not w["verified"]]
    assert "Bad pages" in p.headings
    assert any(h.startswith(f"vm-ram/{bad['token']:#x}: {bad['bad_pages_total']} bad page")
               for h in p.headings)
    rows = p.table_after("offset")[1:]
    assert [r[0] for r in rows] == [f"{bp['offset']:#x}" for bp in bad["bad_pages"]]
    assert [r[1] for r in rows] == [f"{bp['pfn_before']:#x}" for bp in bad["bad_pages"]]
    assert p.rects.count("badtick") == len(bad["bad_pages"])
    moved = [bp for bp in bad["bad_pages"] if bp["pfn_before"] != bp["pfn_after"]]
    assert sum(1 for t, c in p.cell_classes if "bad" in c.split() and t in
               {f"{bp['pfn_after']:#x}" for bp in moved}) == len(moved)
    assert "What could be checked" in p.headings


def test_properties_and_checks_marked() -> None:
    rec = {"host": "h", "agent": {"result": "failed", "workloads": [
        {"session": "s", "token": 1, "size": 8192, "verified": False,
         "props_before": {"seals": 5, "size": 8192, "flags": 0o100002},
         "props_after": {"seals": 1, "size": 8192, "flags": 0o100002},
         "props_mismatch": ["seals"]}],
        "not_checked": ["radix snapshot skipped: no physical-memory access"],
        "capabilities": {"devmem_ram": False}}}
    p = parse(render_host_page(rec))
    assert ("seals: 5 → 1", "bad") in [(t, c) for t, c in _spans(render_host_page(rec))]
    assert ("size: 8192", "") in _spans(render_host_page(rec))
    assert ("flags: 0o100002", "") in _spans(render_host_page(rec))   # O_LARGEFILE | O_RDWR
    assert p.table_after("workload")[1][3] == "FAILED: seals differ"
    assert "radix snapshot skipped: no physical-memory access" in "".join(p.text)


def _spans(page: str) -> list[tuple[str, str]]:
    """(text, class) of each <span> in the properties cells."""
    out = []

    class S(HTMLParser):
        cur: Optional[list[str]] = None
        cls = ""

        def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
            if tag == "span":
                self.cur, self.cls = [], dict(attrs).get("class") or ""

        def handle_endtag(self, tag: str) -> None:
            if tag == "span" and self.cur is not None:
                out.append(("".join(self.cur), self.cls))
                self.cur = None

        def handle_data(self, data: str) -> None:
            if self.cur is not None:
                self.cur.append(data)
    S().feed(page)
    return out


def test_hostile_values_escaped(rollout_dir: Path, tmp_path: Path) -> None:
    rec = with_new_fields(host_json(rollout_dir, BAD))
    rec["host"] = rec["agent"]["host"] = EVIL
    agent = rec["agent"]
    agent["failure"]["reason"] = EVIL
    agent["result"] = EVIL
    agent["kernel"]["to"]["release"] = EVIL
    agent["radix"]["incoming"]["errors"] = [EVIL]
    agent["not_checked"] = [EVIL]
    agent["capabilities"][EVIL] = EVIL
    agent["stamps"][EVIL] = agent["stamps"]["verified"] + 0.1
    w = agent["workloads"][0]
    w["session"], w["error"], w["source"] = EVIL, EVIL, EVIL
    w["props_before"][EVIL] = EVIL
    w["props_mismatch"] = [EVIL]
    for bp in w.get("bad_pages") or []:
        bp["first_diff_hex"] = EVIL
    rec["controller"]["events"].append({"ts": 1.0, "event": EVIL, "detail": EVIL})
    rec["controller"]["error"] = EVIL
    rel = write_host_report(str(tmp_path), EVIL, rec["agent"], rec["controller"])
    page_path = tmp_path / (rel[:-len(".json")] + ".html")
    assert page_path.parent == tmp_path / "hosts"          # the name cannot leave hosts/
    page = page_path.read_text()
    p = parse(page)
    assert "<script" not in page and "alert('x')" not in page
    text = "".join(p.text)
    assert text.count(EVIL) >= 10                          # shown as text, escaped in source
    assert p.headings[0] == f"Host {EVIL}: {EVIL}"
    assert p.hrefs == ["../fleet.html", os.path.basename(rel)]


@pytest.mark.parametrize("agent", [
    None,                                                  # no agent report at all
    {"schema": "kho-fleet/handover-report/v1", "host": "h", "result": "aborted",
     "failure": {"phase": "preflight", "reason": "ssh: connection refused"}},  # controller's
    {"result": 3, "failure": "x", "kernel": [], "downtime": {"blackout_s": "1"},
     "stamps": {"kexec": "no", "verified": None, "x": True}, "workloads": "many",
     "radix": {"snapshot": {"pages_by_order": {"x": "y", "0": None}, "root": "r"},
               "incoming": []}, "capabilities": 7, "not_checked": "one"},
    {"workloads": [1, None, {"token": "zz", "size": True, "verified": "yes",
                             "bad_pages": [1, None, {"offset": "0"}], "bad_pages_total": -1,
                             "props_before": [], "props_after": {"a": {"b": [1, 2]}},
                             "bad_chunks": ["0x0", 4096]}],
     "downtime": {"kexec_to_kernel_s": float("nan"), "kernel_to_agent_s": 0.2,
                  "restored_s": 1.0, "verified_s": 0.5}},
])
def test_short_and_malformed_reports_render(agent: Any) -> None:
    """Old reports, the controller's short ones and wrong types: a page, never an exception."""
    ctl = {"state": "failed", "error": "preflight: ssh", "events": [
        {"ts": 10.0, "event": "agent preflight", "detail": "rc 1 in 0.5s: no"},
        {"ts": "x"}, 5, {"ts": 11.0, "event": "state", "detail": "kexec_requested -> kexec_sent"},
        {"ts": 13.0, "event": "state", "detail": "down -> up"}]}
    p = parse(render_host_page({"host": "h", "agent": agent, "controller": ctl}))
    assert p.headings[0].startswith("Host h: ")
    assert {"Timeline", "Blackout", "Workloads", "Controller"} <= set(p.headings)
    assert sum(1 for c in p.rects if c.startswith("bar ")) == 2      # preflight, and down
    assert "bar failed" in p.rects
    parse(render_host_page({}))
    parse(render_host_page({"host": 5, "agent": [], "controller": "x"}))


# -- in a browser ----------------------------------------------------------------------------

def decode_png(data: bytes) -> tuple[int, int, int, list[bytes]]:
    """(width, height, bytes per pixel, rows) of an 8-bit, non-interlaced RGB/RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, ihdr = 8, [], None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + n
    assert ihdr is not None
    w, h, depth, ctype, _, _, interlace = ihdr
    assert depth == 8 and ctype in (2, 6) and interlace == 0, ihdr
    bpp = 3 if ctype == 2 else 4
    raw, stride = zlib.decompress(b"".join(idat)), w * bpp
    prev, rows = bytearray(stride), []
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if f == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif f == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev))
        elif f == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif f == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) \
                    & 0xFF
        rows.append(bytes(line))
        prev = line
    return w, h, bpp, rows


@pytest.fixture(scope="module")
def screenshot(rollout_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The failed host's page (with the contract's fields where the report lacks them) drawn
    by headless Chromium into a PNG in the test's tmp dir: one launch per run."""
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    if browser is None:
        pytest.skip("no headless chromium on PATH (Debian package `chromium`): "
                    "the host page is not drawn")
    tmp = tmp_path_factory.mktemp("shot")
    page = tmp / "host.html"                   # self-contained: it can live anywhere
    page.write_text(render_host_page(with_new_fields(host_json(rollout_dir, BAD))))
    png = tmp / "host.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    f"--user-data-dir={tmp / 'profile'}", f"--screenshot={png}",
                    "--window-size=1200,1600", "--hide-scrollbars", page.as_uri()],
                   check=True, capture_output=True, timeout=180)
    print(f"host page screenshot: {png}")
    return png


def test_page_renders_in_chromium(screenshot: Path) -> None:
    w, h, bpp, rows = decode_png(screenshot.read_bytes())
    assert (w, h) == (1200, 1600)
    pixels = {bytes(r[i:i + 3]) for r in rows[::4] for i in range(0, len(r), bpp * 2)}
    assert len(pixels) > 50, "a (nearly) blank page"
    ink = sum(1 for r in rows[::4] for i in range(0, len(r), bpp * 4) if r[i:i + 3] != b"\xff" * 3)
    assert ink > 0.02 * (w // 4) * (h // 4), "almost nothing drawn"
    # the SVG and CSS colours made it to the screen: timeline bars, blackout, failure box
    for colour in ("4a7fb5", "d9822b", "fdecea", "7a4ab5"):
        assert bytes.fromhex(colour) in pixels, f"#{colour} not drawn"


def test_long_lists_are_bounded() -> None:
    """A thousand workloads: the failed one first, then verified ones up to 200 rows."""
    ws = [{"session": "s", "token": i, "size": 4096, "verified": i != 700} for i in range(1000)]
    p = parse(render_host_page({"host": "h", "agent": {"result": "failed", "workloads": ws}}))
    rows = p.table_after("workload")[1:]
    assert len(rows) == 200 and rows[0][0] == "s/0x2bc" and rows[0][3].startswith("FAILED")
    assert "… and 800 more verified workloads (the JSON lists them all)." in "".join(p.text)
    assert "1 of 1000" not in "".join(p.text) and "999 of 1000 verified" in "".join(p.text)
