"""A controller killed right after committing `kexec_requested` -- before the kexec left it.

`kexec_requested` is committed before the kexec is sent, so the host of such a controller is
still in its old boot and was never told to kexec. The resumed rollout must neither wait for a
boot that never comes (the CI failure of stop 18: "did not come back within 20s") nor risk a
second kexec: it asks the agent again, and the agent's per-boot claim decides.

The crash is placed exactly: a sitecustomize on the controller's PYTHONPATH SIGKILLs the
controller process as soon as `kexec_requested` is committed for host k1.
"""

from __future__ import annotations

import json
from pathlib import Path

from test_rollout import (
    _one_rollout,
    cli,
    inventory,
    playbook,
    rollout_with_sitecustomize,
    twin_state,
)

CRASH = '''\
import os, signal
import kho_fleet.statedb as _s
_orig = _s.StateDB.transition
def _transition(self, host, new_state, **fields):
    row = _orig(self, host, new_state, **fields)
    if new_state == "kexec_requested" and host == "k1":
        os.kill(os.getpid(), signal.SIGKILL)     # committed, and nothing sent yet
    return row
_s.StateDB.transition = _transition
'''


def _run_until_crash(sim: Path) -> None:
    inv = inventory(sim, {"k1": None})
    pb = playbook(sim, [{"name": "all", "hosts": "all"}])
    proc = rollout_with_sitecustomize(sim, CRASH, inv, pb)
    assert proc.returncode == -9, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert {h.state for h in _one_rollout(sim).hosts()} == {"kexec_requested"}
    assert twin_state(sim, "k1")["boot_count"] == 1           # never told to kexec


def test_resume_sends_the_kexec_that_never_left(sim: Path) -> None:
    _run_until_crash(sim)
    rid = _one_rollout(sim).rollout().id
    p = cli(sim, "rollout", "--resume", rid, "--json")
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-2000:])
    assert json.loads(p.stdout)["rollout"]["status"] == "completed"
    assert twin_state(sim, "k1")["boot_count"] == 2            # one kexec, exactly
    details = [(e.event, e.detail) for e in _one_rollout(sim).events()]
    assert any(ev == "kexec re-sent" for ev, _ in details), details


def test_a_kexec_already_claimed_in_this_boot_is_not_sent_twice(sim: Path) -> None:
    """The other half: the first ask had reached the agent (its claim is there), the host is
    merely slow to go down. The agent answers exit 4 and sends nothing; the host, never
    leaving its boot here, fails after the boot timeout instead of being kexec'd twice."""
    _run_until_crash(sim)
    state_dir = sim / "sim" / "k1" / "var" / "lib" / "kho-agent" / "state"
    st = json.loads((state_dir / "state.json").read_text())
    claim = state_dir / f"kexec-claim.{st['handover_id']}.twin-boot-1"
    claim.write_text("0\n")                    # as the first ask leaves it
    rid = _one_rollout(sim).rollout().id
    p = cli(sim, "rollout", "--resume", rid, "--json")
    assert p.returncode == 1, (p.stdout[-3000:], p.stderr[-2000:])
    (f,) = json.loads(p.stdout)["failures"]
    assert f["phase"] == "boot" and "did not come back" in f["reason"], f
    assert twin_state(sim, "k1")["boot_count"] == 1            # nothing sent twice
    details = [(e.event, e.detail) for e in _one_rollout(sim).events()]
    assert any(ev == "kexec already started" and "not sent twice" in d
               for ev, d in details), details
