"""`make demo`: a rollout of playbooks/demo.yaml across the simulated fleet (inventory/sim.yaml).

Eight digital-twin hosts run the real agent against a simulated KHO/LUO kernel: a canary,
a batch of three, then the rest four at a time -- and one host (twin-b2) whose preserved
page is corrupted during the kexec, which the agent catches and the reports show.
"""

from __future__ import annotations

import os
import sys
import time

from .cli import main as cli_main
from .inventory import load_inventory
from .sim.fleet import fleet_down

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    inventory = os.path.join(REPO, "inventory", "sim.yaml")
    playbook = os.path.join(REPO, "playbooks", "demo.yaml")
    sim_dir = os.path.join(REPO, ".sim")
    t0 = time.monotonic()
    try:
        rc = cli_main(["rollout", "--playbook", playbook, "--inventory", inventory,
                       "--sim-dir", sim_dir,
                       "--rollouts-dir", os.path.join(REPO, "rollouts"),
                       "--reports-dir", os.path.join(REPO, "reports")])
    finally:
        fleet_down(load_inventory(inventory), sim_dir)      # leave no twin running
    print(f"demo: done in {time.monotonic() - t0:.0f}s; twin-b2's corrupted page was expected "
          "(the demo injects it). Try: kho-fleet status, kho-fleet sim handover --fault lost-page")
    return 0 if rc in (0, 1) else rc


if __name__ == "__main__":
    sys.exit(main())
