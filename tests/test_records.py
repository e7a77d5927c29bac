"""Typed records in the middle of the tree: journal, verify result, handover and host report.

Each record turns into JSON only at the edge (`to_json`) and reads back with every field's
type checked (`from_json`): a round trip gives the same record and the same JSON; a field
with the wrong type -- any field -- gives one InputError whose message names that field.
A real twin handover, driven through the `kho-fleet` CLI, writes a report that loads back
into the record unchanged.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kho_agent.errors import InputError as AgentInputError
from kho_agent.journal import (
    IncomingTree,
    Journal,
    JournalTail,
    JournalWorkload,
    VerifyResult,
    WorkloadResult,
    parse_memfd,
    read_disk,
)
from kho_agent.report import (
    Downtime,
    Failure,
    HandoverReport,
    JournalSource,
    KernelFrom,
    Kernels,
    KernelTo,
    Radix,
    RadixIncoming,
    RadixSnapshot,
    ReportWorkload,
    build_report,
    handover_report,
    prom_text,
)
from kho_agent.state import AgentState
from kho_fleet.errors import InputError as FleetInputError
from kho_fleet.fleetreport import AgentOutcome, HostReport, write_host_report
from kho_fleet.report_view import handover_record, render_handover

REPO = Path(__file__).resolve().parents[1]


# --- full samples: every field set, none null (so each field's own type is exercised) -----

def journal_sample() -> Journal:
    return Journal(
        handover_id="h1", host="n1",
        kernel_from={"release": "7.2.13", "kho": "kho-v4"},
        kernel_to={"kernel": "/boot/vmlinuz-b", "sha256": "ab" * 32,
                   "target": {"release": "7.2.13-b", "kho": "kho-v4"}},
        snapshot={"root": 4096, "blocks": [[0, 0, 1]], "pages_by_order": {"0": 1},
                  "bytes": 4096, "nodes": 6, "intact": True, "memory": "/dev/mem",
                  "workload_pfns_missing": {"vm/1": [12]}},
        stamps={"snapshot": 99.5, "kexec_exec": 100.0},
        workloads=[JournalWorkload("vm", 1, 4096, "aa", [[10, 1]], "adopted")],
        agent_kexec_s=0.25)


def verify_sample() -> VerifyResult:
    return VerifyResult(
        incoming=IncomingTree(present=True, compatible="kho-v4", root=4096, intact=False,
                              valid_nodes=1, errors=["reused"],
                              metadata={"previous_release": "7.2.13", "kexec_count": 1,
                                        "version": 1},
                              matches_snapshot=False,
                              fdt_source="setup_data /sys/kernel/boot_params/setup_data/1"),
        journal=journal_sample(), journal_error="journal memfd not retrieved: gone",
        results=[WorkloadResult("vm", 1, "aa", 4096, [[10, 1]], "FINISH: busy")],
        error="retrieval failed", agent_start=105.0, kernel_boot_time=103.0, t_restored=105.5,
        release="7.2.13-b", running={"release": "7.2.13-b", "kho": "kho-v4"})


def report_sample() -> HandoverReport:
    return HandoverReport(
        host="n1", handover_id="h1", result="failed", failure=Failure("verify", "lost"),
        phase="verify",
        kernel=Kernels(KernelFrom("7.2.13", "kho-v4"),
                       KernelTo("7.2.13-b", "kho-v4", "/boot/vmlinuz-b", "ab" * 32)),
        kexec_metadata={"previous_release": "7.2.13", "kexec_count": 1},
        radix=Radix(RadixSnapshot(4096, 1, {"0": 1}, 4096, 6, True, "/dev/mem",
                                  {"vm/1": [12]}),
                    RadixIncoming(4096, False, 1, ["reused"], False, "debugfs kho/in/fdt")),
        workloads=[ReportWorkload("vm", 1, 4096, "aa", "bb", True, False, "sha256 differs",
                                  "created")],
        downtime=Downtime(5.5, 3.0, 2.0, 0.5), agent_kexec_s=0.25,
        journal=JournalSource("disk", "journal memfd not retrieved: gone"),
        kexec_method="direct")


RECORDS: list[tuple[str, Callable[[], Any], Callable[[Any, str], Any]]] = [
    ("journal", journal_sample, Journal.from_json),
    ("tail", lambda: JournalTail("h1", {"kexec": 1.5}, 0.25), JournalTail.from_json),
    ("result", lambda: WorkloadResult("vm", 1, "aa", 4096, [[10, 1]], "x"),
     WorkloadResult.from_json),
    ("verify", verify_sample, VerifyResult.from_json),
    ("report", report_sample, HandoverReport.from_json),
]


@pytest.mark.parametrize("name,make,load", RECORDS, ids=[r[0] for r in RECORDS])
def test_round_trip(name: str, make: Callable[[], Any], load: Callable[[Any, str], Any]) -> None:
    rec = make()
    raw = rec.to_json()
    back = load(json.loads(json.dumps(raw)), name)
    assert back == rec and back.to_json() == raw


# --- every field with a wrong type: one InputError naming it ------------------------------

# Other modules' records carried inside ours as they are: only their being an object is
# checked, not what is in them.
OPAQUE = {"journal": ("kernel_from.", "kernel_to.", "snapshot."),
          "verify": ("running.", "incoming.metadata.", "journal.kernel_from.",
                     "journal.kernel_to.", "journal.snapshot."),
          "report": ("kexec_metadata.",)}


def leaves(v: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, value) of every field, nested ones included; a [pfn, count] pair is one leaf."""
    if isinstance(v, dict):
        for k, x in v.items():
            p = f"{path}.{k}" if path else k
            yield p, x
            yield from leaves(x, p)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            if isinstance(x, list):          # a pair of a list of runs: checked as one
                yield f"{path}[{i}]", x
                continue
            yield f"{path}[{i}]", x
            yield from leaves(x, f"{path}[{i}]")


def wrong(v: Any) -> Any:
    """A JSON value of another type than `v`."""
    return 12345 if isinstance(v, (str, list, dict)) else "not-that"


def replaced(raw: Any, path: str, value: Any) -> Any:
    out = copy.deepcopy(raw)
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    cur = out
    for p in parts[:-1]:
        cur = cur[int(p[1:-1])] if p.startswith("[") else cur[p]
    last = parts[-1]
    if last.startswith("["):
        cur[int(last[1:-1])] = value
    else:
        cur[last] = value
    return out


def field_of(path: str) -> str:
    """`path` up to its last named field (a list item is named by its list)."""
    return re.sub(r"(\[\d+\])+$", "", path)


def _cases() -> Iterator[tuple[str, Callable[[Any, str], Any], dict, str]]:
    for name, make, load in RECORDS:
        raw = make().to_json()
        for path, _ in leaves(raw):
            if not any(path.startswith(p) for p in OPAQUE.get(name, ())):
                yield name, load, raw, path


CASES = list(_cases())


@pytest.mark.parametrize("name,load,raw,path", CASES,
                         ids=[f"{c[0]}:{c[3]}" for c in CASES])
def test_every_field_with_a_wrong_type_is_named(name: str, load: Callable[[Any, str], Any],
                                                raw: dict, path: str) -> None:
    old = eval_path(raw, path)
    bad = replaced(raw, path, wrong(old))
    with pytest.raises(AgentInputError) as ei:
        load(bad, f"{name}.json")
    msg = str(ei.value)
    assert msg.startswith(f"{name}.json: {field_of(path)}"), msg
    assert "\n" not in msg


def eval_path(raw: Any, path: str) -> Any:
    cur = raw
    for p in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        cur = cur[int(p[1:-1])] if p.startswith("[") else cur[p]
    return cur


def test_not_an_object_and_a_bad_result_are_named() -> None:
    with pytest.raises(AgentInputError, match=r"^r.json: expected an object, got list"):
        HandoverReport.from_json([], "r.json")
    raw = report_sample().to_json()
    raw["result"] = "maybe"
    with pytest.raises(AgentInputError, match=r"r.json: result: expected one of success"):
        HandoverReport.from_json(raw, "r.json")
    with pytest.raises(AgentInputError, match="token: expected an integer, got true/false"):
        JournalWorkload.from_json({"session": "s", "token": True}, "w")


def test_journal_memfd_lines() -> None:
    j = journal_sample()
    body = json.dumps(j.to_json() | {"agent_kexec_s": None}).encode()
    tail = json.dumps(JournalTail("h1", {"kexec_exec": 101.0}, 0.5).to_json()).encode()
    got = parse_memfd(body + b"\n" + tail + b"\n")
    assert got.stamps == {**j.stamps, "kexec_exec": 101.0} and got.agent_kexec_s == 0.5
    other = json.dumps(JournalTail("h2", {"kexec_exec": 1.0}).to_json()).encode()
    assert parse_memfd(body + b"\n" + other).stamps == j.stamps     # another handover's tail
    with pytest.raises(ValueError, match="not a kho-fleet journal"):
        parse_memfd(b'{"schema": "x"}')
    bad = j.to_json()
    bad["workloads"][0]["size"] = "big"
    with pytest.raises(AgentInputError, match=r"memfd: workloads\[0\]\.size: expected an integer"):
        parse_memfd(json.dumps(bad).encode())


def test_report_from_verify_record_matches_the_dict_edge() -> None:
    ver = verify_sample()
    ver.error = None
    state = AgentState(handover_id="h1", phase="verify")
    rep = handover_report(ver, state)
    assert rep.to_json() == build_report(ver.to_json(), state)
    assert rep.result == "failed" and rep.failure == Failure(
        "verify", "workload vm/0x1: FINISH: busy")
    assert rep.downtime == Downtime(5.5, 3.0, 2.0, 0.5, restored_s=5.5)   # no t_verified
    assert rep.journal == JournalSource("disk", "journal memfd not retrieved: gone")
    assert rep.radix.snapshot is not None and rep.radix.snapshot.blocks == 1
    assert HandoverReport.from_json(rep.to_json()) == rep
    assert prom_text(rep) == prom_text(rep.to_json())


# --- the controller's host report -----------------------------------------------------------

def test_host_report_round_trip_and_outcome(tmp_path: Path) -> None:
    agent = report_sample().to_json()
    ctrl = {"state": "failed", "downtime_s": 1.5}
    rel = write_host_report(str(tmp_path), "n1", agent, ctrl)
    raw = json.loads((tmp_path / rel).read_text())
    rec = HostReport.from_json(raw, rel)
    assert rec == HostReport("n1", agent, ctrl) and rec.to_json() == raw
    got = rec.outcome()
    assert got == AgentOutcome("failed", Failure("verify", "lost"), 5.5, "7.2.13",
                               "7.2.13-b", 0, 1)
    short = {"schema": "kho-fleet/handover-report/v1", "host": "n2", "result": "aborted",
             "failure": {"phase": "preflight", "reason": "ssh: refused"}}
    out = HostReport("n2", short).outcome()
    assert out is not None and (out.result, out.workloads_total, out.kernel_to) == (
        "aborted", 0, None)


@pytest.mark.parametrize("path", ["host", "agent", "controller", "agent.result",
                                  "agent.failure", "agent.failure.phase", "agent.failure.reason",
                                  "agent.downtime", "agent.downtime.blackout_s", "agent.kernel",
                                  "agent.kernel.from", "agent.kernel.from.release",
                                  "agent.kernel.to.release", "agent.workloads",
                                  "agent.workloads[0]", "agent.workloads[0].verified"])
def test_host_report_wrong_types_are_named(path: str) -> None:
    raw = HostReport("n1", report_sample().to_json(), {"state": "reported"}).to_json()
    bad = replaced(raw, path, wrong(eval_path(raw, path)))
    with pytest.raises(FleetInputError) as ei:
        HostReport.from_json(bad, "hosts/n1.json")
    assert str(ei.value).startswith(f"hosts/n1.json: {field_of(path)}"), str(ei.value)


def test_report_view_names_a_bad_field_with_the_controllers_error() -> None:
    raw = report_sample().to_json()
    raw["downtime"]["blackout_s"] = "long"
    with pytest.raises(FleetInputError, match=r"downtime.blackout_s: expected a number"):
        handover_record(raw)


# --- generated records --------------------------------------------------------------------

_text = st.text(max_size=12)
_opt_text = st.none() | _text
_int = st.integers(min_value=-(2 ** 63), max_value=2 ** 64)
_num = st.none() | st.floats(allow_nan=False, allow_infinity=False) | _int
_runs = st.lists(st.lists(_int, min_size=2, max_size=2), max_size=3)
_obj = st.none() | st.dictionaries(_text, _int | _text, max_size=3)

reports = st.builds(
    HandoverReport, host=_text, handover_id=_text,
    result=st.sampled_from(["success", "failed", "aborted", "incomplete"]),
    failure=st.none() | st.builds(Failure, _text, _text), phase=_text,
    kernel=st.builds(Kernels, st.builds(KernelFrom, _opt_text, _opt_text),
                     st.builds(KernelTo, _opt_text, _opt_text, _opt_text, _opt_text)),
    kexec_metadata=_obj,
    radix=st.builds(
        Radix,
        st.none() | st.builds(RadixSnapshot, st.none() | _int, _int,
                              st.none() | st.dictionaries(_text, _int, max_size=3),
                              st.none() | _int, st.none() | _int, st.none() | st.booleans(),
                              _opt_text, st.none() | st.dictionaries(
                                  _text, st.lists(_int, max_size=3), max_size=2)),
        st.none() | st.builds(RadixIncoming, st.none() | _int, st.booleans(), _int,
                              st.lists(_text, max_size=3), st.none() | st.booleans())),
    workloads=st.lists(st.builds(ReportWorkload, _text, _int, _int, _text, _opt_text,
                                 st.booleans(), st.booleans(), _opt_text, _text), max_size=3),
    downtime=st.builds(Downtime, _num, _num, _num, _num), agent_kexec_s=_num,
    journal=st.builds(JournalSource, _opt_text, _opt_text), schema=_text)

journals = st.builds(
    Journal, handover_id=_text, host=_opt_text, kernel_from=_obj, kernel_to=_obj, snapshot=_obj,
    stamps=st.dictionaries(_text, st.floats(allow_nan=False, allow_infinity=False), max_size=3),
    workloads=st.lists(st.builds(JournalWorkload, _text, _int, _int, _text, _runs, _text),
                       max_size=3),
    agent_kexec_s=_num)

verifies = st.builds(
    VerifyResult,
    incoming=st.none() | st.builds(IncomingTree, st.booleans(), _opt_text, st.none() | _int,
                                   st.booleans(), _int, st.lists(_text, max_size=2), _obj,
                                   st.none() | st.booleans()),
    journal=st.none() | journals, journal_error=_opt_text,
    results=st.lists(st.builds(WorkloadResult, _text, _int, _opt_text, st.none() | _int,
                               st.none() | _runs, _opt_text), max_size=3),
    error=_opt_text, agent_start=_num, kernel_boot_time=_num, t_restored=_num,
    release=_opt_text, running=_obj)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rep=reports)
def test_generated_reports_round_trip(rep: HandoverReport) -> None:
    raw = json.loads(json.dumps(rep.to_json()))
    assert HandoverReport.from_json(raw) == rep and HandoverReport.from_json(raw).to_json() == raw


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ver=verifies)
def test_generated_verify_results_round_trip(ver: VerifyResult) -> None:
    raw = json.loads(json.dumps(ver.to_json()))
    assert VerifyResult.from_json(raw) == ver and VerifyResult.from_json(raw).to_json() == raw


@settings(max_examples=100, deadline=None)
@given(rep=reports)
def test_generated_reports_round_trip_through_a_host_report(rep: HandoverReport) -> None:
    raw = json.loads(json.dumps(HostReport("n1", rep.to_json(), {"state": "x"}).to_json()))
    rec = HostReport.from_json(raw)
    assert rec.to_json() == raw and HandoverReport.from_json(rec.agent) == rep


# --- a real twin handover through the CLI ---------------------------------------------------

def test_twin_handover_report_loads_back_unchanged(tmp_path: Path) -> None:
    work = tmp_path / "twin"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "agent"), str(REPO / "controller")])}
    p = subprocess.run([sys.executable, "-m", "kho_fleet.cli", "sim", "handover",
                        "--workload-mib", "4", "--workdir", str(work), "--json"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO))
    assert p.returncode == 0, p.stderr[-2000:]
    printed = json.loads(p.stdout)
    state = next(work.glob("**/var/lib/kho-agent"))        # the twin host's root under work
    on_disk = json.loads((state / "report.json").read_text())
    for raw in (printed, on_disk):
        rec = HandoverReport.from_json(raw, "report.json")
        assert rec.to_json() == raw, "the report JSON does not survive its record"
        assert rec.result == "success" and rec.workloads and all(
            w.verified for w in rec.workloads)
    # verify.json and the journal on disk load into their records too
    ver = VerifyResult.from_json(json.loads((state / "verify.json").read_text()), "verify.json")
    assert ver.journal is not None and ver.journal.handover_id == printed["handover_id"]
    assert ver.to_json() == json.loads((state / "verify.json").read_text())
    disk = read_disk(str(state))
    assert disk is not None and disk.handover_id == printed["handover_id"]
    assert [w.session for w in disk.workloads] == [w["session"] for w in printed["workloads"]]
    buf = io.StringIO()
    from rich.console import Console
    render_handover(printed, Console(file=buf, width=120))
    assert "success" in buf.getvalue() and "downtime" in buf.getvalue()
