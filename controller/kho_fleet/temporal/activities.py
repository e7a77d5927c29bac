"""The host-step activity: one lifecycle step on one host, run by a worker of the host's site.

The workflow names the step; this runs it with hoststeps.HostSteps -- the code the embedded
engine runs -- and returns what the workflow commits: the fields for the step's `to` state,
or the host's final report, plus the events it logged. A failed step is a non-retryable
ApplicationError (type HostFailed) carrying its phase, reason and the agent's report; only a
worker lost mid-step (its heartbeats stop) makes Temporal run a step again, and the kexec's
retry policy forbids even that.

The worker loads the rollout's inventory and playbook by the paths the workflow carries and
refuses them if their sha256 differs from the rollout's (they changed since it started);
artifacts are built once per rollout in the worker's work directory.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

from temporalio import activity
from temporalio.exceptions import ApplicationError

from .. import lifecycle
from ..artifacts import Artifacts, build_artifacts
from ..errors import KhoFleetError
from ..hostaccess import AccessOptions, HostAccess, host_access
from ..hoststeps import HostFailed, HostRun, HostSteps
from ..inventory import Inventory, load_inventory
from ..playbook import Playbook, load_playbook
from ..transport import TransportError

__all__ = ["HostStepActivities", "ACTIVITY", "MARKER_STEP", "HEARTBEAT_S"]

ACTIVITY = "kho_host_step"
MARKER_STEP = "boot_marker"        # not a lifecycle step: read the boot marker before the kexec
HEARTBEAT_S = 1.0


@dataclass
class _Rollout:
    inv: Inventory
    pb: Playbook
    art: Artifacts


def _one_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class HostStepActivities:
    """The activities of one worker process (site `site`), with their per-rollout caches."""

    def __init__(self, site: str, work_dir: str, threads: int = 64) -> None:
        self.site = site
        self.work_dir = os.path.abspath(work_dir)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kho-step")
        self._lock = threading.Lock()
        self._rollouts: dict[str, _Rollout] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _rollout(self, inp: dict[str, Any]) -> _Rollout:
        """The rollout's inputs, loaded and checked once; its artifacts built once."""
        rid = inp["rollout"]
        with self._lock:
            ro = self._rollouts.get(rid)
            if ro is not None:
                return ro
            inv = load_inventory(inp["inventory"])
            pb = load_playbook(inp["playbook"])
            for what, got, want, path in (("inventory", inv.sha256, inp["inventory_sha256"],
                                           inp["inventory"]),
                                          ("playbook", pb.sha256, inp["playbook_sha256"],
                                           inp["playbook"])):
                if got != want:
                    raise KhoFleetError(f"the {what} changed since rollout {rid} started "
                                        f"({path})")
            art = build_artifacts(pb, os.path.join(self.work_dir, rid, self.site, "artifacts"))
            ro = self._rollouts[rid] = _Rollout(inv, pb, art)
            return ro

    def run_step(self, inp: dict[str, Any]) -> dict[str, Any]:
        """Run one step (blocking); see the module docstring for the result."""
        events: list[dict[str, Any]] = []
        name, step = inp["host"], inp["step"]
        s: Optional[lifecycle.Step] = None if step == MARKER_STEP else lifecycle.step(step)
        phase = s.failure_phase if s is not None else "kexec"

        def log(event: str, detail: str) -> None:
            events.append({"ts": time.time(), "event": event, "detail": detail})

        def committed(state: str, marker: str) -> None:
            """Nothing to commit: the workflow recorded `state` (and logged the boot marker)
            before it scheduled this step -- its at-most-once rule."""

        def failed(phase: str, reason: str, report: Optional[dict] = None) -> ApplicationError:
            return ApplicationError(reason, {"phase": phase, "reason": reason, "report": report,
                                             "events": events},
                                    type="HostFailed", non_retryable=True)
        acc: Optional[HostAccess] = None
        try:
            ro = self._rollout(inp)
            if name not in ro.inv.hosts:
                raise KhoFleetError(f"host {name!r} is not in {inp['inventory']}")
            host = ro.inv.hosts[name]
            acc = host_access(host, AccessOptions(sim_dir=inp["sim_dir"],
                                                  ssh_timeout=ro.pb.timeouts.ssh_s))
            acc.prepare(power_on=bool(inp.get("power_on")))
            steps = HostSteps(acc, ro.art, ro.pb, host, log=log, commit_first=committed)
            steps.connect()
            if s is None:
                return {"marker": acc.boot_marker(), "events": events}
            res = steps.perform(s, HostRun(marker=inp.get("marker")))
            return {"fields": res.fields, "finished": res.finished, "events": events,
                    "ts": time.time()}
        except HostFailed as e:
            raise failed(e.phase, str(e), e.report) from None
        except (TransportError, OSError) as e:
            raise failed(phase, _one_line(e)) from None
        except KhoFleetError as e:
            raise failed(phase, _one_line(e)) from None
        finally:
            if acc is not None:
                acc.close()

    @activity.defn(name=ACTIVITY)
    async def host_step(self, inp: dict[str, Any]) -> dict[str, Any]:
        """Run the step in a thread, heartbeating so a lost worker is noticed in seconds."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, self.run_step, inp)
        while True:
            done, _ = await asyncio.wait({fut}, timeout=HEARTBEAT_S)
            if done:
                return fut.result()
            activity.heartbeat()
