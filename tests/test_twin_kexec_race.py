"""The agent's `kexec` step still running when the host goes down is not a failed kexec.

The agent asks for the kexec detached (`sleep 0.5; kexec -e` on Linux; the twin's reboot in
0.5 s) and returns; on a loaded machine it may not have exited by then, and the reboot kills
it, as a real kexec kills all of userspace. Over SSH that is a dropped connection; on a sim
host it is the agent process dying by SIGKILL (seen as "kexec: exit -9" failing a host at
load ~13). Here the agent is made to linger at exit on purpose (a sitecustomize on
PYTHONPATH that sleeps at exit in the `kexec` step only), so the twin's reboot always kills
it, and the rollout must still verify the host.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from test_rollout import inventory, playbook, rollout_with_sitecustomize, twin_state

LINGER = '''\
import atexit, sys, time
if sys.argv[1:2] == ["kexec"]:
    atexit.register(time.sleep, 5.0)   # still running when the twin reboots (0.5 s)
'''


def test_agent_killed_by_the_reboot_it_asked_for_is_not_a_failure(sim: Path) -> None:
    inv = inventory(sim, {"t1": None})
    pb = playbook(sim, [{"name": "all", "hosts": "all"}])
    proc = rollout_with_sitecustomize(sim, LINGER, inv, pb)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    st = twin_state(sim, "t1")
    assert st["boot_count"] == 2, st                      # one kexec, exactly
    (rid,) = os.listdir(sim / "reports")
    fleet = json.loads((sim / "reports" / rid / "fleet.json").read_text())
    hosts = fleet["hosts"] if isinstance(fleet["hosts"], list) else list(fleet["hosts"].values())
    assert [(h["state"], h["failure"]) for h in hosts] == [("reported", None)], hosts
    host = json.loads((sim / "reports" / rid / "hosts" / "t1.json").read_text())
    events = [e["detail"] for e in host["controller"]["events"]]
    assert any("kexec step killed by signal 9 as the twin went down" in d for d in events), events
