"""The Temporal engine's host rows move by statedb's machine, and a Snapshot of rows reads like
a StateDB: the fleet report built from either is the same. Pure: no Temporal needed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kho_fleet import lifecycle
from kho_fleet.fleetreport import build_fleet_report
from kho_fleet.statedb import HAPPY_PATH, IllegalTransition, StateDB
from kho_fleet.temporal.state import (
    Snapshot,
    batch_width,
    groups,
    new_host,
    phase,
    phases,
    transition,
)

REPORT = {"schema": "kho-fleet/handover-report/v1", "host": "h1", "result": "success",
          "kernel": {"from": {"release": "7.2.13"}, "to": {"release": "7.2.14"}},
          "workloads": [{"verified": True}], "downtime": {"blackout_s": 0.5}}

# (host, [(state, fields)]): a success, a failure after the kexec, one never started
SCRIPT = [
    ("h1", [(s, {}) for s in HAPPY_PATH[1:-1]] + [("reported", {"report": REPORT})]),
    ("h2", [(s, {}) for s in HAPPY_PATH[1:7]]
     + [("failed", {"error": "boot: did not come back within 2s",
                    "report": {"result": "failed",
                               "failure": {"phase": "boot", "reason": "gone"}}})]),
    ("h3", []),
]


def _both(tmp_path: Path) -> tuple[StateDB, Snapshot]:
    db = StateDB.create(str(tmp_path), playbook_path=__file__, inventory_path=__file__,
                        stages=[("canary", ["h1"]), ("rest", ["h2", "h3"])])
    ro = db.rollout()
    rows = {h: new_host(h, 0 if h == "h1" else 1, ro.created) for h in ("h1", "h2", "h3")}
    events: list = []
    for host, steps in SCRIPT:
        for state, fields in steps:
            db.transition(host, state, **fields)
            transition(rows[host], state, db.host(host).updated, events, **fields)
    for i in (0, 1):
        db.set_stage(i, "running")
    db.set_stage(0, "passed", {"ok": True})
    db.set_stage(1, "failed", {"ok": False})
    db.set_status("halted", "stage rest: gate failed")
    # the rows a workflow would keep, with the times the StateDB stamped
    for h, row in rows.items():
        r = db.host(h)
        row.update(kexec_requested_at=r.kexec_requested_at, kexec_started_at=r.kexec_started_at,
                   back_at=r.back_at, last_contact=r.last_contact, updated=r.updated)
    rollout = {f.name: getattr(db.rollout(), f.name)
               for f in dataclasses.fields(db.rollout()) if f.name != "path"}
    stages = [dataclasses.asdict(s) for s in db.stages()]
    evs = [{"ts": e.ts, "host": e.host, "event": e.event, "detail": e.detail}
           for e in db.events() if e.host is None] + events
    return db, Snapshot(rollout, stages, list(rows.values()), evs)


def test_rows_follow_the_state_machine_like_statedb(tmp_path: Path) -> None:
    db, snap = _both(tmp_path)
    for h in ("h1", "h2", "h3"):
        a, b = db.host(h), snap.host(h)
        assert (a.state, a.attempts, a.error, a.report) == (b.state, b.attempts, b.error, b.report)
        assert [e.detail for e in db.events(h) if e.event == "state"] == \
            [e.detail for e in snap.events(h) if e.event == "state"]
    assert db.counts() == snap.counts()
    assert db.counts(stage=1) == snap.counts(stage=1)


def test_the_fleet_report_of_a_snapshot_is_the_statedbs(tmp_path: Path) -> None:
    db, snap = _both(tmp_path)
    a, b = build_fleet_report(db), build_fleet_report(snap)  # type: ignore[arg-type]
    for f in (a, b):
        f.pop("generated")
    assert a == b
    assert a["failures"] == [{"host": "h2", "stage": "rest", "phase": "boot",
                              "reason": "gone"}]


def test_the_kexec_is_never_requested_twice() -> None:
    row, ev = new_host("h", 0, 0.0), []
    for s in HAPPY_PATH[1:6]:
        transition(row, s, 1.0, ev)
    transition(row, "failed", 2.0, ev, error="kexec: lost")
    with pytest.raises(IllegalTransition, match="never requested twice"):
        transition(row, "preflight", 3.0, ev)          # a retry would kexec again
    with pytest.raises(IllegalTransition, match="pending -> verified"):
        transition(new_host("x", 0, 0.0), "verified", 1.0, ev)


def test_phases_cut_where_the_workflow_decides() -> None:
    """One activity per phase: every step runs in exactly one phase, in the table's order;
    the abort points and the at-most-once step start a phase (the workflow checks an abort
    and commits kexec_requested between phases); a dry run's steps never share a phase with
    others; after an unknown kexec, the rest is a phase without the kexec."""
    table = list(lifecycle.LIFECYCLE)
    cut = phases(table)
    assert [s for p in cut for s in p] == table
    starts = {p[0].name for p in cut}
    for s in table:
        if s.abort_point or s.at_most_once or s.kind == "begin":
            assert s.name in starts, s.name
    for p in cut:
        assert len({s.in_dry_run for s in p}) == 1, [s.name for s in p]
        assert not any(s.at_most_once for s in p[1:]), [s.name for s in p]
    rest = phase(lifecycle.steps_from("kexec_requested"))
    assert rest and not any(s.at_most_once for s in rest)
    assert rest[-1].kind == "finish"


@pytest.mark.parametrize("size", [1, 7, 200])
def test_batches_fill_max_parallel_and_never_exceed_it(size: int) -> None:
    """A stage's batches run all their hosts at once: a batch is at most batch_size hosts, at
    most max_parallel when the stage is larger than max_parallel, and the batches that fit at
    once leave fewer idle slots than there are batches running."""
    for par in (1, 2, 5, 99, 100, 101, 250, 499, 500, 501, 1000):
        for n in (1, par - 1, par, par + 1, 3 * par + 7, 10000):
            if n < 1:
                continue
            w = batch_width(n, par, size)
            assert 1 <= w <= size, (n, par, size, w)
            if n > par:
                assert w <= par and par - (par // w) * w < max(1, par // w), (n, par, size, w)


def test_groups_cover_every_job_once_in_order() -> None:
    for n in (0, 1, 49, 50, 51, 166, 200, 1001):
        for most in (1, 25, 50):
            g = groups(list(range(n)), most)
            assert [j for x in g for j in x] == list(range(n))
            assert all(1 <= len(x) <= most for x in g)
            assert len(g) == -(-n // most)
            assert not g or max(map(len, g)) - min(map(len, g)) <= 1
