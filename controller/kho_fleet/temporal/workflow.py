"""The rollout as Temporal workflows: the embedded engine's loop, with durable history.

RolloutWorkflow drives the stages: it cuts a stage's hosts into HostBatchWorkflows of at most
`batch_size` hosts (a workflow's history stays bounded however large the fleet) that each
run all of their hosts at once, and starts them as the stage's max_parallel slots allow
(state.batch_width; a batch signals `release` as its slots free up); it judges the stage's
gate with rollout.judge_gate, and applies the failure policy and pauses. HostBatchWorkflow
drives each of its hosts through lifecycle.steps_from(state) a phase at a time
(state.phase: the steps up to the next abort point or at-most-once step), each phase an
activity on the host's site task queue (kho-fleet-<site>) -- `begin` is the workflow's own
-- and keeps the host rows with statedb's machine (state.transition), each step's state
entered with the time the step completed. Hosts of a site ready for the same phase in the
same workflow task share one activity (at most state.GROUP_MAX), except for the kexec's.

The at-most-once rule: the phase before the kexec ends by reading the boot marker; the
workflow then records `kexec_requested` in its own state and only then schedules the kexec
phase (kexec, wait_back, verify, report) for that host alone, with
RetryPolicy(maximum_attempts=1); once that activity ended in any way but a refusal by the
agent, the host only waits for a new boot and is verified (a retryable phase) -- a kexec
step is never scheduled twice for a host. When that activity's outcome is unknown, the wait
asks the agent once more if the host is still in the recorded boot (HostSteps.resend_kexec):
the agent's per-boot claim lets at most one of the two asks kexec. A phase no worker of the
host's site takes within `worker_wait_s` fails the host ("no worker of site X ..."); until
then `kho-fleet status` shows it waiting.

Deterministic: no I/O, time from workflow.now(), every host-touching act an activity.
Signals: abort(reason), proceed() (after a `pause: manual` stage), release (a batch's freed
slots). Queries: status (the rollout, stages, events and batch ids), hosts (a batch's rows,
events, pending steps).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, Optional

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, TimeoutError, TimeoutType

with workflow.unsafe.imports_passed_through():
    from .. import lifecycle
    from ..fleetreport import host_report_path
    from ..playbook import Gate
    from ..rollout import host_result, judge_gate
    from .activities import ACTIVITY, MARKER_STEP
    from .state import (
        WORKFLOW_QUEUE,
        batch_width,
        groups,
        log,
        new_host,
        phase,
        site_queue,
        transition,
    )
    from .state import _host_row as host_row

__all__ = ["RolloutWorkflow", "HostBatchWorkflow", "ROLLOUT_WORKFLOW", "BATCH_WORKFLOW"]

ROLLOUT_WORKFLOW = "KhoRollout"
BATCH_WORKFLOW = "KhoHostBatch"
_ROLLOUT_NEXT = {"running": {"halted", "completed", "aborted"},
                 "halted": {"running", "aborted"}}


def _now() -> float:
    return workflow.now().timestamp()


class _Failed(Exception):
    def __init__(self, phase: str, reason: str, report: Optional[dict] = None) -> None:
        super().__init__(reason)
        self.phase = phase
        self.reason = reason
        self.report = report


class _Unknown(Exception):
    """The at-most-once step ended without an answer (its worker was lost): it may have been
    sent, so it is never sent again; the host is waited for and verified."""


@workflow.defn(name=BATCH_WORKFLOW)
class HostBatchWorkflow:
    """Up to `batch_size` hosts of one stage, each through the lifecycle table."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.pending: dict[str, dict[str, Any]] = {}      # host -> its scheduled step
        self.aborted = False
        self.inp: dict[str, Any] = {}
        self._queues: dict[tuple[str, tuple[str, ...], bool], list[dict[str, Any]]] = {}
        self._seq = 0                                      # activity ids of this batch

    @workflow.run
    async def run(self, inp: dict[str, Any]) -> dict[str, Any]:
        self.inp = inp
        self.aborted = self.aborted or bool(inp.get("aborted"))
        now = _now()
        for h in inp["hosts"]:
            self.rows[h] = new_host(h, inp["stage_idx"], now)
        share = max(1, int(inp["max_parallel"]))
        sem = asyncio.Semaphore(share)
        left = len(inp["hosts"])
        told = 0                        # slots this batch told the rollout it will not use again
        step = -(-share // 8)           # at most 8 signals; an eighth idle at most
        parent = workflow.info().parent
        signals: list[asyncio.Task] = []

        async def one(name: str) -> None:
            nonlocal left, told
            async with sem:
                await self._run_host(name)
            left -= 1
            free = max(0, share - left)     # slots no host of this batch will take again
            if inp.get("release") and parent is not None and left and free - told >= step:
                told = free
                signals.append(asyncio.get_running_loop().create_task(
                    self._release(parent.workflow_id, free)))
        await asyncio.gather(*(one(h) for h in inp["hosts"]))
        await asyncio.gather(*signals)
        return {"results": [host_result(host_row(self.rows[h])) for h in inp["hosts"]]}

    async def _release(self, parent_id: str, free: int) -> None:
        """Tell the rollout that `free` of this batch's slots are free for good (its other
        hosts are all running or done), so it can start its next batch before this one's
        slowest host is done."""
        try:
            await workflow.get_external_workflow_handle(parent_id).signal(
                "release", {"batch": workflow.info().workflow_id, "free": free})
        except Exception:  # the rollout ended (aborted): nothing waits for the slots
            pass

    @workflow.signal
    def abort(self, reason: str) -> None:
        self.aborted = True

    @workflow.query(name="hosts")
    def get_hosts(self) -> dict[str, Any]:
        return {"hosts": list(self.rows.values()), "events": self.events,
                "pending": self.pending}

    # --- one host ---------------------------------------------------------------------------
    def _log(self, host: str, event: str, detail: Optional[str] = None,
             ts: Optional[float] = None) -> None:
        log(self.events, _now() if ts is None else ts, host, event, detail)

    def _move(self, host: str, state: str, ts: Optional[float] = None, **fields: Any) -> None:
        transition(self.rows[host], state, _now() if ts is None else ts, self.events, **fields)

    async def _run_host(self, name: str) -> None:
        """Drive one host through the table, a phase (state.phase) per activity."""
        row = self.rows[name]
        dry = self.inp["mode"] == "dry-run"
        marker: Optional[str] = None
        ahead = lifecycle.steps_from(row["state"])
        i = 0
        try:
            while i < len(ahead):
                current = ahead[i]
                if row["state"] not in current.runs_in:
                    i += 1
                    continue
                if dry and not current.in_dry_run:
                    self._log(name, "dry run", f"stopped before {current.name}")
                    return
                if current.abort_point and self.aborted:
                    return
                if current.kind == "begin":
                    if current.to is not None:
                        self._move(name, current.to)
                    i += 1
                    continue
                steps = phase(ahead[i:])
                i += len(steps)
                names = [s.name for s in steps]
                if i < len(ahead) and ahead[i].at_most_once:
                    names.append(MARKER_STEP)           # read just before the kexec's phase
                if current.commit_first is not None:
                    if marker is None:                  # (the phase before did not read it)
                        out = await self._phase(name, [MARKER_STEP], None)
                        marker = self._apply(name, out)
                        if self.aborted:
                            return
                    self._move(name, current.commit_first)  # recorded before it is scheduled
                    try:
                        out = await self._phase(name, names, marker, at_most_once=True)
                    except _Unknown as e:
                        self._log(name, f"{current.name} outcome unknown", str(e))
                        ahead, i = lifecycle.steps_from(row["state"]), 0
                        continue                        # wait for the boot, verify
                else:
                    out = await self._phase(name, names, marker)
                marker = self._apply(name, out) or marker
                if row["state"] in ("reported", "failed"):
                    return
        except _Failed as f:
            self._fail(name, f.phase, f.reason, f.report)

    def _apply(self, name: str, out: dict[str, Any]) -> Optional[str]:
        """Commit a host's phase result: its events, each completed step's state (at the time
        the step completed), the host's end; _Failed if a step failed. Its boot marker."""
        self._events(name, out.get("events") or [])
        for r in out["done"]:
            if r.get("finished") is not None:
                self._finish(name, r["finished"], float(r["ts"]))
                return None
            to = lifecycle.step(r["step"]).to
            if to is not None:
                self._move(name, to, float(r["ts"]), **r["fields"])
        if out.get("marker") is not None:
            self._log(name, "boot_marker", out["marker"])
        if out.get("failed"):
            f = out["failed"]
            raise _Failed(f["phase"], f["reason"], f.get("report"))
        return out.get("marker")

    async def _phase(self, name: str, steps: list[str], marker: Optional[str],
                     at_most_once: bool = False) -> dict[str, Any]:
        """The host's result of one phase: _Failed when its activity failed (for all of its
        hosts), _Unknown when the at-most-once phase's activity ended without an answer.

        Hosts of the same site that ask for the same phase in the same workflow task share one
        activity (up to GROUP_MAX); the at-most-once phase (the kexec, then boot and verify)
        runs alone: a worker lost in it leaves only that host's kexec unknown, and one host's
        slow boot holds back no other host's report."""
        site = self.inp["sites"][name]
        key = (site, tuple(steps), at_most_once)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        state = self.rows[name]["state"]
        job = {"host": name, "marker": marker, "fut": fut,
               "power_on": state in lifecycle.states_before_kexec(),
               # the kexec's outcome is unknown: the host may never have been told
               "resend_kexec": steps[0] == "wait_back" and state == "kexec_requested"}
        if at_most_once:        # alone: a lost kexec activity leaves one host unknown, not many
            asyncio.get_running_loop().create_task(self._group(key, [job]))
            return await fut
        queue = self._queues.setdefault(key, [])
        queue.append(job)
        if len(queue) == 1:
            asyncio.get_running_loop().create_task(self._flush(key))
        return await fut

    async def _flush(self, key: tuple[str, tuple[str, ...], bool]) -> None:
        """Send the hosts queued for one phase, once every host that became ready in this
        workflow task had its turn to join."""
        for _ in range(3):
            await asyncio.sleep(0)
        for group in groups(self._queues.pop(key)):
            asyncio.get_running_loop().create_task(self._group(key, group))

    async def _group(self, key: tuple[str, tuple[str, ...], bool],
                     jobs: list[dict[str, Any]]) -> None:
        site, steps, at_most_once = key
        first = None if steps[0] == MARKER_STEP else lifecycle.step(steps[0])
        phase_name = first.failure_phase if first is not None else "kexec"
        wait = float(self.inp["worker_wait_s"])
        timeout = max(sum(float(self.inp["timeouts"][j["host"]][
            lifecycle.step(s).timeout if s != MARKER_STEP else "step"]) for s in steps)
            for j in jobs)
        self._seq += 1
        aid = f"{steps[0]}-{self._seq}"
        for j in jobs:
            self.pending[j["host"]] = {"activity_id": aid, "step": steps[0], "site": site,
                                       "since": _now()}
        args = {"rollout": self.inp["rollout"], "playbook": self.inp["playbook"],
                "playbook_sha256": self.inp["playbook_sha256"],
                "inventory": self.inp["inventory"],
                "inventory_sha256": self.inp["inventory_sha256"], "sim_dir": self.inp["sim_dir"],
                "steps": list(steps),
                "hosts": [{"host": j["host"], "marker": j["marker"], "power_on": j["power_on"],
                           "resend_kexec": j["resend_kexec"]} for j in jobs]}
        retry = RetryPolicy(maximum_attempts=1) if at_most_once else RetryPolicy(
            initial_interval=timedelta(seconds=1), maximum_attempts=int(self.inp["attempts"]))
        err: Optional[Exception] = None
        out: dict[str, Any] = {}
        try:
            out = await workflow.execute_activity(
                ACTIVITY, args, task_queue=site_queue(site), activity_id=aid,
                schedule_to_start_timeout=timedelta(seconds=wait),
                start_to_close_timeout=timedelta(seconds=timeout + 120),
                heartbeat_timeout=timedelta(seconds=float(self.inp["heartbeat_s"])),
                retry_policy=retry)
        except ActivityError as e:
            cause = e.cause
            if isinstance(cause, TimeoutError) and cause.type == TimeoutType.SCHEDULE_TO_START:
                err = _Failed(phase_name, f"no worker of site {site} took the {steps[0]} step "
                              f"within {wait:g}s (start kho-fleet worker --site {site})")
            else:
                why = f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
                err = _Unknown(why) if at_most_once else _Failed(
                    phase_name, f"{steps[0]} did not complete: {why}")
        finally:
            for j in jobs:
                self.pending.pop(j["host"], None)
        for j in jobs:
            if err is not None:
                j["fut"].set_exception(err)
            else:
                j["fut"].set_result(out["hosts"][j["host"]])

    def _events(self, host: str, events: list[dict[str, Any]]) -> None:
        for ev in events:
            log(self.events, float(ev["ts"]), host, ev["event"], ev.get("detail"))

    def _finish(self, name: str, rep: dict, ts: Optional[float] = None) -> None:
        path = host_report_path(name)
        if rep.get("result") == "success":
            self._move(name, "reported", ts, report={**rep, "report_path": path})
        else:
            fail = rep.get("failure") or {"phase": "verify", "reason": "verification failed"}
            self._move(name, "failed", ts, report={**rep, "report_path": path},
                       error=f"{fail['phase']}: {fail['reason']}")

    def _fail(self, name: str, phase: str, reason: str, report: Optional[dict] = None) -> None:
        row = self.rows[name]
        rep = report or {"schema": "kho-fleet/handover-report/v1", "host": name,
                         "result": "failed" if row["kexec_requested_at"] else "aborted",
                         "failure": {"phase": phase, "reason": reason}}
        self._move(name, "failed", error=f"{phase}: {reason}",
                   report={**rep, "report_path": host_report_path(name)})


@workflow.defn(name=ROLLOUT_WORKFLOW)
class RolloutWorkflow:
    """One rollout: its stages in order, gates, failure policy, pauses, abort."""

    def __init__(self) -> None:
        self.plan: dict[str, Any] = {}
        self.status = "running"
        self.reason: Optional[str] = None
        self.stages: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.batches: list[dict[str, Any]] = []
        self.proceed_now = False
        self.free = 0                   # slots of the running stage's max_parallel not taken
        self._early: dict[str, int] = {}  # releases of batches not yet seen started

    # --- signals and queries -------------------------------------------------------------
    @workflow.signal
    async def abort(self, reason: str) -> None:
        if self.status not in _ROLLOUT_NEXT:
            return
        self._set_status("aborted", reason)
        log(self.events, _now(), None, "aborted", reason)
        for b in self.batches:
            if not b["done"]:
                await self._abort_batch(b["id"], reason)

    @workflow.signal
    def proceed(self) -> None:
        self.proceed_now = True

    @workflow.signal
    def release(self, msg: dict[str, Any]) -> None:
        """A batch's slots that none of its hosts will take again (HostBatchWorkflow)."""
        bid, free = str(msg.get("batch")), int(msg.get("free") or 0)
        for b in self.batches:
            if b["id"] == bid:
                self._released(b, free)
                return
        # (a signal can be handled before the start of its batch is: kept until it is)
        self._early[bid] = max(free, self._early.get(bid, 0))

    def _released(self, b: dict[str, Any], free: int) -> None:
        more = min(free, b["share"]) - b["released"]
        if more > 0 and not b["done"]:
            b["released"] += more
            self.free += more

    @workflow.query(name="status")
    def get_status(self) -> dict[str, Any]:
        p = self.plan
        return {"rollout": {"id": p.get("id"), "playbook_path": p.get("playbook"),
                            "playbook_sha256": p.get("playbook_sha256"),
                            "inventory_path": p.get("inventory"),
                            "inventory_sha256": p.get("inventory_sha256"),
                            "created": p.get("created"), "status": self.status,
                            "reason": self.reason, "options": p.get("options")},
                "meta": p.get("meta") or {}, "stages": self.stages, "events": self.events,
                "batches": [{"id": b["id"], "stage_idx": b["stage_idx"], "hosts": b["hosts"],
                             "done": b["done"]} for b in self.batches],
                "plan_stages": [{"name": s["name"], "hosts": s["hosts"]}
                                for s in p.get("stages", [])]}

    # --- the rollout ---------------------------------------------------------------------
    @workflow.run
    async def run(self, plan: dict[str, Any]) -> dict[str, Any]:
        self.plan = plan
        n = sum(len(s["hosts"]) for s in plan["stages"])
        log(self.events, float(plan["created"]), None, "rollout",
            f"created with {n} hosts in {len(plan['stages'])} stages")
        self.stages = [{"idx": i, "name": s["name"], "status": "pending", "gate": None,
                        "started_at": None, "finished_at": None}
                       for i, s in enumerate(plan["stages"])]
        dry = plan["options"]["mode"] == "dry-run"
        last_idx = len(plan["stages"]) - 1
        for idx, st in enumerate(plan["stages"]):
            if self.status == "aborted":
                break
            self._set_stage(idx, "running")
            results = await self._run_stage(idx, st)
            if dry:
                self._set_stage(idx, "passed", {"dry_run": True})
                continue
            verdict = judge_gate(Gate(**st["gate"]), results)
            self._set_stage(idx, "passed" if verdict["ok"] else "failed", verdict)
            log(self.events, _now(), None, "gate", f"stage {st['name']}: "
                + ("passed" if verdict["ok"] else verdict["reason"]))
            if self.status == "aborted":
                break
            if not verdict["ok"] and plan["on_failure"] == "halt":
                self._set_status("halted", f"stage {st['name']}: {verdict['reason']}")
                return {"status": self.status, "reason": self.reason}
            if verdict["ok"] and st["pause"] == "manual" and idx != last_idx:
                self._set_stage(idx, "paused", verdict)
                self._set_status("halted", f"paused after stage {st['name']}: resume with "
                                 f"kho-fleet rollout --resume {plan['id']} --engine temporal")
                await workflow.wait_condition(
                    lambda: self.proceed_now or self.status == "aborted")
                if self.status == "aborted":
                    break
                self.proceed_now = False
                self._set_status("running", "resumed")
                self._set_stage(idx, "passed", verdict)
            elif isinstance(st["pause"], (int, float)) and st["pause"] > 0 and idx != last_idx:
                try:
                    await workflow.wait_condition(lambda: self.status == "aborted",
                                                  timeout=timedelta(seconds=float(st["pause"])))
                except asyncio.TimeoutError:
                    pass
        if self.status == "running":
            self._set_status("completed", "dry run: preflight only" if dry else None)
        return {"status": self.status, "reason": self.reason}

    async def _run_stage(self, idx: int, st: dict[str, Any]) -> list[dict]:
        """The stage's hosts in batch workflows (state.batch_width), each running all of its
        hosts at once; a batch starts when the running ones leave it enough of the stage's
        max_parallel slots (a batch frees its slots as its hosts finish, signal `release`, and
        all of them when it ends): never more than max_parallel hosts at once, as with the
        embedded engine's thread pool."""
        hosts: list[str] = st["hosts"]
        par = max(1, int(st["max_parallel"]))
        size = batch_width(len(hosts), par, int(self.plan["batch_size"]))
        chunks = [hosts[i:i + size] for i in range(0, len(hosts), size)]
        self.free = par
        outs: list[list[dict]] = [[] for _ in chunks]
        waits: list[asyncio.Task] = []
        for k, chunk in enumerate(chunks):
            share = len(chunk)

            def fits(need: int = share) -> bool:
                return self.free >= need
            await workflow.wait_condition(fits)
            self.free -= share
            bid = f"{self.plan['id']}.stage-{idx}.batch-{k}"
            p = self.plan
            inp = {"rollout": p["id"], "playbook": p["playbook"],
                   "playbook_sha256": p["playbook_sha256"], "inventory": p["inventory"],
                   "inventory_sha256": p["inventory_sha256"],
                   "sim_dir": p["options"]["sim_dir"], "mode": p["options"]["mode"],
                   "hosts": chunk, "stage_idx": idx, "max_parallel": share,
                   "sites": {h: p["sites"][h] for h in chunk},
                   "timeouts": {h: p["timeouts"][h] for h in chunk},
                   "worker_wait_s": p["worker_wait_s"], "heartbeat_s": p["heartbeat_s"],
                   "attempts": p["attempts"], "aborted": self.status == "aborted",
                   "release": True}
            handle = await workflow.start_child_workflow(
                BATCH_WORKFLOW, inp, id=bid, task_queue=WORKFLOW_QUEUE)
            b = {"id": bid, "stage_idx": idx, "hosts": chunk, "done": False,
                 "share": share, "released": 0}
            self.batches.append(b)
            self._released(b, self._early.pop(bid, 0))
            if self.status == "aborted" and not inp["aborted"]:
                await self._abort_batch(bid, self.reason or "aborted")
            waits.append(asyncio.get_running_loop().create_task(
                self._batch_done(b, handle, outs[k])))
        await asyncio.gather(*waits)
        return [r for out in outs for r in out]

    async def _batch_done(self, b: dict[str, Any], handle: Any, out: list[dict]) -> None:
        """Wait for one batch; its results into `out`, its remaining slots freed."""
        res = await handle
        b["done"] = True
        self.free += b["share"] - b["released"]
        b["released"] = b["share"]
        out += res["results"]

    async def _abort_batch(self, bid: str, reason: str) -> None:
        try:
            await workflow.get_external_workflow_handle(bid).signal("abort", reason)
        except Exception:  # a batch that already ended needs no abort
            pass

    def _set_status(self, status: str, reason: Optional[str]) -> None:
        old = self.status
        if status not in _ROLLOUT_NEXT.get(old, set()):
            return
        self.status, self.reason = status, reason
        log(self.events, _now(), None, "rollout",
            f"{old} -> {status}" + (f": {reason}" if reason else ""))

    def _set_stage(self, idx: int, status: str, gate: Optional[dict] = None) -> None:
        s = self.stages[idx]
        old, now = s["status"], _now()
        s["status"] = status
        if gate is not None:
            s["gate"] = gate
        if status == "running":
            s["started_at"] = now
        if status in ("passed", "failed", "skipped"):
            s["finished_at"] = now
        log(self.events, now, None, "stage", f"{s['name']}: {old} -> {status}")
