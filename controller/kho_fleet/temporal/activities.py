"""The host-phase activity: a few lifecycle steps on a few hosts, run by a worker of their site.

The workflow names a phase (consecutive steps of the lifecycle table, state.phase) and the
hosts of one site that are ready for it at the same moment (at most state.GROUP_MAX); this
runs each host's steps with hoststeps.HostSteps -- the code the embedded engine runs --
concurrently in the worker's thread pool, and returns per host what the workflow commits:
each completed step's fields (or the host's final report) with the time it completed, the
events it logged, the boot marker when the phase ends with reading it, and the failure that
stopped the host, if any. A host's failure is its own (the others of the call go on); only a
worker lost mid-phase (its heartbeats stop) makes Temporal run the phase again, and the
kexec phase's retry policy forbids even that.

Why several steps and several hosts per activity: Temporal's cost is per activity and per
workflow task (events persisted, tasks matched, payloads converted), not per host step; one
activity per step and host cost 60-80 ms of worker CPU per host (docs/scale.md).

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

from .. import lifecycle
from ..artifacts import Artifacts, build_artifacts
from ..errors import KhoFleetError
from ..hostaccess import AccessOptions, HostAccess, host_access
from ..hoststeps import HostFailed, HostRun, HostSteps
from ..inventory import Inventory, load_inventory
from ..playbook import Playbook, load_playbook
from ..transport import TransportError

__all__ = ["HostStepActivities", "ACTIVITY", "MARKER_STEP", "HEARTBEAT_S"]

ACTIVITY = "kho_host_phase"
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

    def run_host(self, inp: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
        """Run one host's steps of the phase (blocking); see the module docstring."""
        events: list[dict[str, Any]] = []
        done: list[dict[str, Any]] = []
        name = job["host"]
        marker: Optional[str] = None
        current: str = inp["steps"][0]

        def log(event: str, detail: str) -> None:
            events.append({"ts": time.time(), "event": event, "detail": detail})

        def committed(state: str, marker: str) -> None:
            """Nothing to commit: the workflow recorded `state` (and logged the boot marker)
            before it scheduled this phase -- its at-most-once rule."""

        def failed(phase: str, reason: str, report: Optional[dict] = None) -> dict[str, Any]:
            return {"done": done, "marker": marker, "events": events,
                    "failed": {"phase": phase, "reason": reason, "report": report}}

        def phase_of(step: str) -> str:
            return "kexec" if step == MARKER_STEP else lifecycle.step(step).failure_phase
        acc: Optional[HostAccess] = None
        try:
            ro = self._rollout(inp)
            if name not in ro.inv.hosts:
                raise KhoFleetError(f"host {name!r} is not in {inp['inventory']}")
            host = ro.inv.hosts[name]
            acc = host_access(host, AccessOptions(sim_dir=inp["sim_dir"],
                                                  ssh_timeout=ro.pb.timeouts.ssh_s))
            acc.prepare(power_on=bool(job.get("power_on")))
            steps = HostSteps(acc, ro.art, ro.pb, host, log=log, commit_first=committed)
            steps.connect()
            run = HostRun(marker=job.get("marker"), resend_kexec=bool(job.get("resend_kexec")))
            for current in inp["steps"]:
                if current == MARKER_STEP:
                    marker = acc.boot_marker()
                    continue
                res = steps.perform(lifecycle.step(current), run)
                done.append({"step": current, "fields": res.fields, "finished": res.finished,
                             "ts": time.time()})
                if res.finished is not None:
                    break
            return {"done": done, "marker": marker, "events": events, "failed": None}
        except HostFailed as e:
            return failed(e.phase, str(e), e.report)
        except (TransportError, OSError, KhoFleetError) as e:
            return failed(phase_of(current), _one_line(e))
        finally:
            if acc is not None:
                acc.close()

    @activity.defn(name=ACTIVITY)
    async def host_phase(self, inp: dict[str, Any]) -> dict[str, Any]:
        """Run the phase for each host in the thread pool, heartbeating so a lost worker is
        noticed in seconds. {"hosts": {name: result}}."""
        loop = asyncio.get_running_loop()
        futs = {loop.run_in_executor(self._pool, self.run_host, inp, job): job["host"]
                for job in inp["hosts"]}
        pending = set(futs)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=HEARTBEAT_S)
            if pending:
                activity.heartbeat()
        return {"hosts": {futs[f]: f.result() for f in futs}}
