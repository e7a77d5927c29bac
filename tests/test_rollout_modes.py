"""A rollout's mode is part of its state: a dry run stays dry across an interruption and a
resume, a finished rollout is not resumed, a rollout that dies is halted (never left
`running`), and options that would touch hosts are checked before anything starts.

Real twins, the real CLI in subprocesses, the real SQLite state.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from diskstate import snapshot as _tree
from test_rollout import cli, inventory, playbook, twin_state

from kho_fleet.rollout import Rollout, RolloutError, RolloutOptions
from kho_fleet.statedb import StateDB


def _state(db: StateDB) -> tuple:
    """What a rollout's state says (rows and log), independent of SQLite's WAL bytes."""
    return db.rollout(), db.stages(), db.hosts(), db.events()


def _only_rollout(tmp: Path) -> str:
    (rid,) = os.listdir(tmp / "rollouts")
    return rid


def _state_db(tmp: Path) -> StateDB:
    return StateDB.open(str(tmp / "rollouts" / _only_rollout(tmp)))


def _two_stage_dry_run(sim: Path) -> tuple[Path, Path]:
    # the second stage's twins take 10 s to power on, so a Ctrl-C sent once the canary
    # stage has passed lands while that stage runs (a dry run does not pause between stages)
    inv = inventory(sim, {"c1": None, "r1": {"kho_sim_boot_delay": 10},
                          "r2": {"kho_sim_boot_delay": 10}})
    pb = playbook(sim, [{"name": "canary", "hosts": 1, "pause": 60},
                        {"name": "rest", "hosts": "rest", "max_parallel": 2}])
    return inv, pb


def test_interrupted_dry_run_resumes_as_a_dry_run(sim: Path) -> None:
    """The safety finding: Ctrl-C a dry run, resume it: it must stay a dry run (no host is
    staged, preserved or kexec'd)."""
    inv, pb = _two_stage_dry_run(sim)
    proc = subprocess.Popen([sys.executable, "-m", "kho_fleet.cli", "rollout", "--dry-run",
                             "--playbook", str(pb), "--inventory", str(inv), "--json",
                             "--rollouts-dir", str(sim / "rollouts"),
                             "--reports-dir", str(sim / "reports"), "--sim-dir", str(sim / "sim")],
                            cwd=sim, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:       # wait for the canary stage to pass
            if (sim / "rollouts").is_dir() and os.listdir(sim / "rollouts"):
                try:
                    stages = _state_db(sim).stages()
                except Exception:               # not created yet
                    stages = []
                if stages and stages[0].status == "passed":
                    break
            time.sleep(0.2)
        else:
            pytest.fail("the canary stage of the dry run never passed")
        proc.send_signal(signal.SIGINT)          # Ctrl-C during the second stage
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    db = _state_db(sim)
    row = db.rollout()
    assert row.status == "halted" and "interrupted" in (row.reason or ""), row
    assert row.options and row.options["mode"] == "dry-run"
    rid = row.id

    p = cli(sim, "rollout", "--resume", rid, "--json")       # no --dry-run: the mode is recorded
    assert p.returncode == 0, p.stderr
    fleet = json.loads(p.stdout)
    assert fleet["rollout"]["status"] == "completed", fleet["rollout"]
    for h in ("c1", "r1", "r2"):
        t = twin_state(sim, h)
        assert t["boot_count"] == 1 and not t["kexec_loaded"], (h, t)
    events = [e.event for e in db.events()]
    assert "agent stage" not in events and "agent kexec" not in events
    assert not any(e.event.startswith("agent preserve") for e in db.events())

    # resuming it again: already finished, one line, exit 0, nothing changes
    before = _state(db)
    p = cli(sim, "rollout", "--resume", rid)
    assert p.returncode == 0, p.stderr
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert len(lines) == 1 and "already completed" in lines[0], lines
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr
    assert _state(db) == before


def test_resume_cannot_change_the_mode_or_the_twins(sim: Path) -> None:
    inv, pb = _two_stage_dry_run(sim)
    real = Rollout.start(str(pb), str(inv), RolloutOptions(
        str(sim / "rollouts"), str(sim / "reports"), str(sim / "sim")))
    real.halt("test: halted before it ran")
    before = _state(real.db)
    p = cli(sim, "rollout", "--resume", real.id, "--dry-run")
    assert p.returncode == 2 and "--dry-run cannot be combined" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = subprocess.run([sys.executable, "-m", "kho_fleet.cli", "rollout", "--resume", real.id,
                        "--rollouts-dir", str(sim / "rollouts"), "--sim-dir", str(sim / "other")],
                       capture_output=True, text=True, cwd=sim)
    assert p.returncode == 2 and "differs from the recorded" in p.stderr, p.stderr
    assert _state(real.db) == before
    assert not (sim / "other").exists() and not (sim / "sim").exists()   # no twin was touched


def test_a_rollout_without_a_recorded_mode_is_not_resumed(sim: Path) -> None:
    """A state file of an older kho-fleet (no options): resuming could not know it is a dry run."""
    inv, pb = _two_stage_dry_run(sim)
    ro = Rollout.start(str(pb), str(inv), RolloutOptions(
        str(sim / "rollouts"), str(sim / "reports"), str(sim / "sim"), dry_run=True))
    ro.halt("test")
    ro.db.close()
    with sqlite3.connect(ro.db.path) as c:
        c.execute("UPDATE rollout SET options = NULL")
    with pytest.raises(RolloutError, match="does not record whether it is a dry run"):
        Rollout.resume(ro.id, RolloutOptions(str(sim / "rollouts"), str(sim / "reports")))
    p = cli(sim, "rollout", "--resume", ro.id)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (sim / "sim").exists()


def test_a_rollout_that_dies_is_halted_with_the_reason(sim: Path) -> None:
    inv, pb = _two_stage_dry_run(sim)
    ro = Rollout.start(str(pb), str(inv), RolloutOptions(
        str(sim / "rollouts"), str(sim / "reports"), str(sim / "sim")))
    (Path(ro.dir) / "artifacts").write_text("not a directory")      # artifacts cannot be built
    with pytest.raises(OSError):
        ro.run()
    row = ro.db.rollout()
    assert row.status == "halted" and row.reason and row.reason.startswith("error: "), row
    assert "--resume" in row.reason
    p = cli(sim, "status", ro.id)
    assert p.returncode == 0 and "halted" in p.stdout


def test_corrupt_state_db_is_named(sim: Path) -> None:
    d = sim / "rollouts" / "20260101-000000-abcdef"
    d.mkdir(parents=True)
    (d / "state.db").write_bytes(b"SQLite format 3\0" + os.urandom(4000))
    before = _tree(sim / "rollouts")
    for args in (("status", d.name), ("report", d.name), ("abort", d.name),
                 ("rollout", "--resume", d.name)):
        p = cli(sim, *args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and str(d / "state.db") in lines[0], (args, lines)
        assert "internal error" not in p.stderr
    assert _tree(sim / "rollouts") == before


@pytest.mark.parametrize("extra,needle", [
    (("--metrics-port", "99999"), "--metrics-port"),
    (("--metrics-port", "-1"), "--metrics-port"),
    (("--metrics-port", "80", "--metrics-addr", "no such host.invalid"), "--metrics-addr"),
    (("--pushgateway", "localhost:9091"), "--pushgateway"),
    (("--pushgateway", "ftp://x/"), "--pushgateway"),
    (("--pushgateway", "http://:9091"), "--pushgateway"),
    (("--pushgateway", "http://h:99999/"), "--pushgateway"),
])
def test_bad_options_touch_nothing(sim: Path, extra: tuple[str, ...], needle: str) -> None:
    inv, pb = _two_stage_dry_run(sim)
    p = cli(sim, "rollout", "--playbook", str(pb), "--inventory", str(inv), *extra)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr
    assert not (sim / "rollouts").exists() and not (sim / "sim").exists()


@pytest.mark.parametrize("option", ["--rollouts-dir", "--reports-dir", "--sim-dir"])
def test_a_directory_option_naming_a_file(sim: Path, option: str) -> None:
    inv, pb = _two_stage_dry_run(sim)
    f = sim / "plain-file"
    f.write_text("x")
    dirs = {"--rollouts-dir": str(sim / "rollouts"), "--reports-dir": str(sim / "reports"),
            "--sim-dir": str(sim / "sim")}
    dirs[option] = str(f / "sub") if option == "--sim-dir" else str(f)
    argv = [sys.executable, "-m", "kho_fleet.cli", "rollout", "--playbook", str(pb),
            "--inventory", str(inv)]
    for k, v in dirs.items():
        argv += [k, v]
    p = subprocess.run(argv, capture_output=True, text=True, cwd=sim)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0] and str(f) in lines[0], lines
    assert f.read_text() == "x" and not (sim / "rollouts").exists()
