"""Rollout state: transitions, kexec-at-most-once, resume semantics, crashes, threads."""

from __future__ import annotations

import hashlib
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import pytest

from kho_fleet.statedb import (
    HAPPY_PATH,
    HOST_STATES,
    IllegalTransition,
    StateDB,
    StateError,
    list_rollouts,
)


def make(tmp_path, stages=None, rid: str = "r1") -> StateDB:
    pb = tmp_path / "pb.yaml"
    inv = tmp_path / "inv.yaml"
    if not pb.exists():
        pb.write_text("name: p\n")
        inv.write_text("all: {}\n")
    stages = stages or [("canary", ["h1"]), ("rest", ["h2", "h3"])]
    return StateDB.create(str(tmp_path / "rollouts"), playbook_path=str(pb),
                          inventory_path=str(inv), stages=stages, rollout_id=rid)


def drive(db: StateDB, host: str, upto: str) -> None:
    cur = db.host(host).state
    for s in HAPPY_PATH[HAPPY_PATH.index(cur) + 1:HAPPY_PATH.index(upto) + 1]:
        db.transition(host, s)


def test_create_open_and_rows(tmp_path) -> None:
    with make(tmp_path) as db:
        r = db.rollout()
        assert (r.id, r.status, r.reason) == ("r1", "running", None)
        assert r.playbook_sha256 == hashlib.sha256(b"name: p\n").hexdigest()
        assert r.inventory_path == str(tmp_path / "inv.yaml")
        assert [(s.idx, s.name, s.status) for s in db.stages()] == [
            (0, "canary", "pending"), (1, "rest", "pending")]
        assert [(h.name, h.stage_idx, h.state) for h in db.hosts()] == [
            ("h1", 0, "pending"), ("h2", 1, "pending"), ("h3", 1, "pending")]
        assert [h.name for h in db.hosts(stage=1)] == ["h2", "h3"]
        assert db.counts()["pending"] == 3 and db.counts(stage=0)["pending"] == 1
        assert set(db.counts()) == set(HOST_STATES)
        mode = db._conn().execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
    path = tmp_path / "rollouts" / "r1" / "state.db"
    assert path.is_file() and not (tmp_path / "rollouts" / "r1" / "state.db.new").exists()
    for p in (str(path), str(path.parent)):
        with StateDB.open(p) as db2:
            assert db2.rollout_id == "r1"
    with pytest.raises(StateError, match="already exists"):
        make(tmp_path)
    with pytest.raises(StateError, match="no such rollout"):
        StateDB.open(str(tmp_path / "nope"))
    with pytest.raises(StateError, match="more than one stage"):
        make(tmp_path, [("a", ["x"]), ("b", ["x"])], rid="r2")


def test_happy_path_stamps_times_and_logs(tmp_path) -> None:
    with make(tmp_path) as db:
        drive(db, "h1", "snapshotted")
        assert db.needs_kexec("h1") and db.resume_action("h1") == "run"
        h = db.transition("h1", "kexec_requested")
        assert h.kexec_requested_at is not None and h.kexec_started_at is None
        assert not db.needs_kexec("h1") and db.resume_action("h1") == "reconnect_verify"
        h = db.transition("h1", "kexec_sent")
        db.transition("h1", "down")
        h = db.transition("h1", "up", back_at=h.kexec_started_at + 2.5)
        assert h.downtime_s == pytest.approx(2.5)
        db.transition("h1", "verified")
        h = db.transition("h1", "reported", report={"ok": True, "memfds": 2})
        assert h.report == {"ok": True, "memfds": 2} and h.attempts == 1
        assert h.last_contact is not None and db.resume_action("h1") == "done"
        ev = [e.detail for e in db.events("h1")]
        assert ev[0] == "pending -> preflight" and ev[-1] == "verified -> reported"
        assert len(ev) == len(HAPPY_PATH) - 1
        assert db.events()[0].event == "rollout"
        db.touch("h2", last_contact=123.0, error="slow")
        assert (db.host("h2").last_contact, db.host("h2").error) == (123.0, "slow")
        assert db.counts()["reported"] == 1


def test_illegal_transitions(tmp_path) -> None:
    with make(tmp_path) as db:
        with pytest.raises(IllegalTransition,
                           match=r"host 'h1': pending -> verified is not allowed"):
            db.transition("h1", "verified")
        with pytest.raises(StateError, match="unknown host state 'rebooting'"):
            db.transition("h1", "rebooting")
        with pytest.raises(StateError, match="host 'nope' is not in rollout r1"):
            db.transition("nope", "preflight")
        with pytest.raises(TypeError, match="unknown fields"):
            db.transition("h1", "preflight", state="up")
        drive(db, "h1", "kexec_requested")
        for again in ("kexec_requested", "snapshotted", "preflight"):
            with pytest.raises(IllegalTransition):
                db.transition("h1", again)
        db.transition("h1", "failed", error="lost")
        assert db.resume_action("h1") == "failed" and not db.needs_kexec("h1")
        with pytest.raises(IllegalTransition, match="kexec was already requested"):
            db.transition("h1", "preflight")                         # no retry after kexec
        with pytest.raises(IllegalTransition):
            db.transition("h2", "reported")
        assert db.host("h2").state == "pending"                      # nothing half-written


def test_retry_before_kexec_and_skip(tmp_path) -> None:
    with make(tmp_path) as db:
        drive(db, "h2", "preserved")
        db.transition("h2", "failed", error="preserve timed out")
        assert db.host("h2").error == "preserve timed out"
        h = db.transition("h2", "preflight")
        assert h.attempts == 2 and h.error is None and db.needs_kexec("h2")
        db.transition("h3", "skipped")
        assert db.resume_action("h3") == "done"
        with pytest.raises(IllegalTransition):
            db.transition("h3", "preflight")


def test_resume_action_for_every_state(tmp_path) -> None:
    want = {"pending": "run", "preflight": "run", "staged": "run", "preserved": "run",
            "snapshotted": "run", "kexec_requested": "reconnect_verify",
            "kexec_sent": "reconnect_verify", "down": "reconnect_verify",
            "up": "reconnect_verify", "verified": "reconnect_verify", "reported": "done"}
    with make(tmp_path, [("all", ["h"])]) as db:
        for state in HAPPY_PATH:
            if state != "pending":
                db.transition("h", state)
            assert db.resume_action("h") == want[state], state
            assert db.needs_kexec("h") == (want[state] == "run"), state


def test_observation_shortcuts(tmp_path) -> None:
    with make(tmp_path) as db:
        drive(db, "h1", "kexec_requested")
        assert db.transition("h1", "up").back_at is not None       # back without seen down
        drive(db, "h2", "kexec_sent")
        db.transition("h2", "up")


def test_rollout_and_stage_status(tmp_path) -> None:
    with make(tmp_path) as db:
        db.set_stage(0, "running")
        s = db.set_stage(0, "paused", gate={"passed": True, "downtime_p95_s": 1.5})
        assert s.gate == {"passed": True, "downtime_p95_s": 1.5} and s.started_at
        s = db.set_stage(0, "passed")
        assert s.gate["passed"] and s.finished_at
        with pytest.raises(IllegalTransition, match=r"stage 0 \(canary\): passed -> running"):
            db.set_stage(0, "running")
        db.set_stage(1, "skipped")
        r = db.set_status("halted", "gate failed: canary")
        assert (r.status, r.reason) == ("halted", "gate failed: canary")
        db.set_status("running")
        db.set_status("completed")
        with pytest.raises(IllegalTransition, match="completed -> running"):
            db.set_status("running")
        with pytest.raises(StateError, match="unknown rollout status"):
            db.set_status("done")
        assert "running -> halted: gate failed: canary" in [e.detail for e in db.events()]


def test_list_rollouts(tmp_path) -> None:
    assert list_rollouts(str(tmp_path / "rollouts")) == []
    make(tmp_path, rid="b").close()
    time.sleep(0.01)
    db = make(tmp_path, rid="a")
    db.set_status("aborted", "operator")
    db.close()
    (tmp_path / "rollouts" / "junk").mkdir()
    (tmp_path / "rollouts" / "bad").mkdir()
    (tmp_path / "rollouts" / "bad" / "state.db").write_bytes(b"not sqlite")
    rows = list_rollouts(str(tmp_path / "rollouts"))
    assert [(r.id, r.status) for r in rows] == [("b", "running"), ("a", "aborted")]
    assert rows[0].path.endswith("rollouts/b/state.db")


# --- crashes -----------------------------------------------------------------------------

def run_child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=30)


def test_crash_mid_transaction_leaves_previous_state(tmp_path) -> None:
    db = make(tmp_path)
    drive(db, "h1", "snapshotted")
    db.close()
    path = str(tmp_path / "rollouts" / "r1" / "state.db")
    # the child starts the kexec_requested write but dies before COMMIT
    p = run_child(f"""
        import os, sqlite3
        c = sqlite3.connect({path!r}, isolation_level=None)
        c.execute("BEGIN IMMEDIATE")
        c.execute("UPDATE host SET state = 'kexec_requested', kexec_requested_at = 1 "
                  "WHERE name = 'h1'")
        c.execute("INSERT INTO event(ts, host, event, detail) VALUES (1, 'h1', 'state', 'x')")
        os._exit(9)
        """)
    assert p.returncode == 9, p.stderr
    with StateDB.open(path) as db:
        h = db.host("h1")
        assert h.state == "snapshotted" and h.kexec_requested_at is None
        assert db.resume_action("h1") == "run" and db.needs_kexec("h1")
        assert db.events("h1")[-1].detail == "preserved -> snapshotted"
        db.transition("h1", "kexec_requested")                  # not locked by the dead child


def test_crash_after_kexec_requested_never_kexecs_again(tmp_path) -> None:
    db = make(tmp_path)
    drive(db, "h1", "snapshotted")
    db.close()
    path = str(tmp_path / "rollouts" / "r1" / "state.db")
    p = run_child(f"""
        import os
        from kho_fleet.statedb import StateDB
        db = StateDB.open({path!r})
        db.transition("h1", "kexec_requested")
        os._exit(7)                        # killed before the kexec command goes out
        """)
    assert p.returncode == 7, p.stderr
    with StateDB.open(path) as db:
        assert db.host("h1").state == "kexec_requested"
        assert not db.needs_kexec("h1") and db.resume_action("h1") == "reconnect_verify"
        with pytest.raises(IllegalTransition):
            db.transition("h1", "kexec_requested")


def test_sigkill_during_a_busy_run_is_consistent(tmp_path) -> None:
    hosts = [f"h{i:02d}" for i in range(60)]
    db = make(tmp_path, [("all", hosts)])
    db.close()
    path = str(tmp_path / "rollouts" / "r1" / "state.db")
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from kho_fleet.statedb import HAPPY_PATH, StateDB
        db = StateDB.open({path!r})
        for h in {hosts!r}:
            for s in HAPPY_PATH[1:]:
                db.transition(h, s)
                time.sleep(0.001)      # >= 0.6 s in all: the kill lands mid-run
        """)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.01)
        with closing(sqlite3.connect(path)) as c:
            n = c.execute("SELECT count(*) FROM event").fetchone()[0]
        if n > 40:
            break
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read()
    with StateDB.open(path) as db:
        assert db._conn().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = db.hosts()
        moved = [h for h in rows if h.state != "pending"]
        assert moved and [h.state for h in rows if h.state == "pending"]   # stopped midway
        for h in rows:
            ev = db.events(h.name)
            if h.state == "pending":
                assert ev == []
                continue
            assert ev[-1].detail.endswith(f"-> {h.state}")             # log matches the row
            assert len(ev) == HAPPY_PATH.index(h.state)
            past = HAPPY_PATH.index(h.state) >= HAPPY_PATH.index("kexec_requested")
            assert (h.kexec_requested_at is not None) == past
            assert db.needs_kexec(h.name) == (not past)


# --- threads -----------------------------------------------------------------------------

def test_concurrent_writers_from_threads(tmp_path) -> None:
    hosts = [f"h{i}" for i in range(24)]
    with make(tmp_path, [("a", hosts[:12]), ("b", hosts[12:])]) as db:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda h: drive(db, h, "reported"), hosts))
        assert db.counts()["reported"] == 24
        assert len([e for e in db.events() if e.event == "state"]) == 24 * (len(HAPPY_PATH) - 1)


def test_racing_kexec_requests_only_one_wins(tmp_path) -> None:
    with make(tmp_path) as db:
        drive(db, "h1", "snapshotted")
        barrier = threading.Barrier(8)
        wins, losses = [], []

        def go(_: int) -> None:
            barrier.wait()
            try:
                db.transition("h1", "kexec_requested")
                wins.append(1)
            except IllegalTransition:
                losses.append(1)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(go, range(8)))
        assert (len(wins), len(losses)) == (1, 7)
        assert [e.detail for e in db.events("h1")].count("snapshotted -> kexec_requested") == 1
