"""The rollout as Temporal workflows: the embedded engine's loop, with durable history.

RolloutWorkflow drives the stages: it starts one HostBatchWorkflow per `batch_size` hosts of
a stage (a workflow's history stays bounded however large the fleet), judges the stage's
gate with rollout.judge_gate, and applies the failure policy and pauses. HostBatchWorkflow
drives each of its hosts through lifecycle.steps_from(state), every step but `begin` an
activity on the host's site task queue (kho-fleet-<site>), and keeps the host rows with
statedb's machine (state.transition).

The at-most-once rule: before the kexec the workflow reads the boot marker (an activity),
then records `kexec_requested` in its own state and only then schedules the kexec activity,
with RetryPolicy(maximum_attempts=1); once that activity ended in any way but a refusal by
the agent, the host only waits for a new boot and is verified -- a kexec is never scheduled
twice for a host. A step no worker of the host's site takes within `worker_wait_s` fails the
host ("no worker of site X ..."); until then `kho-fleet status` shows it waiting.

Deterministic: no I/O, time from workflow.now(), every host-touching act an activity.
Signals: abort(reason), proceed() (after a `pause: manual` stage). Queries: status (the
rollout, stages, events and batch ids), hosts (a batch's rows, events, pending steps).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, Optional

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, TimeoutError, TimeoutType

with workflow.unsafe.imports_passed_through():
    from .. import lifecycle
    from ..fleetreport import host_report_path
    from ..playbook import Gate
    from ..rollout import host_result, judge_gate
    from .activities import ACTIVITY, MARKER_STEP
    from .state import WORKFLOW_QUEUE, log, new_host, site_queue, transition
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

    @workflow.run
    async def run(self, inp: dict[str, Any]) -> dict[str, Any]:
        self.inp = inp
        self.aborted = self.aborted or bool(inp.get("aborted"))
        now = _now()
        for h in inp["hosts"]:
            self.rows[h] = new_host(h, inp["stage_idx"], now)
        sem = asyncio.Semaphore(max(1, int(inp["max_parallel"])))

        async def one(name: str) -> None:
            async with sem:
                await self._run_host(name)
        await asyncio.gather(*(one(h) for h in inp["hosts"]))
        return {"results": [host_result(host_row(self.rows[h])) for h in inp["hosts"]]}

    @workflow.signal
    def abort(self, reason: str) -> None:
        self.aborted = True

    @workflow.query(name="hosts")
    def get_hosts(self) -> dict[str, Any]:
        return {"hosts": list(self.rows.values()), "events": self.events,
                "pending": self.pending}

    # --- one host ---------------------------------------------------------------------------
    def _log(self, host: str, event: str, detail: Optional[str] = None) -> None:
        log(self.events, _now(), host, event, detail)

    def _move(self, host: str, state: str, **fields: Any) -> None:
        transition(self.rows[host], state, _now(), self.events, **fields)

    async def _run_host(self, name: str) -> None:
        row = self.rows[name]
        dry = self.inp["mode"] == "dry-run"
        marker: Optional[str] = None
        current = lifecycle.LIFECYCLE[0]
        try:
            for current in lifecycle.steps_from(row["state"]):
                if row["state"] not in current.runs_in:
                    continue
                if dry and not current.in_dry_run:
                    self._log(name, "dry run", f"stopped before {current.name}")
                    return
                if current.abort_point and self.aborted:
                    return
                if current.kind == "begin":
                    if current.to is not None:
                        self._move(name, current.to)
                    continue
                if current.commit_first is not None:
                    out = await self._step(name, MARKER_STEP, None)
                    marker = out["marker"]
                    if self.aborted:                            # aborted meanwhile
                        return
                    self._log(name, "boot_marker", marker)
                    self._move(name, current.commit_first)     # recorded before it is scheduled
                    try:
                        out = await self._step(name, current.name, marker, at_most_once=True)
                    except _Unknown as e:
                        self._log(name, f"{current.name} outcome unknown", str(e))
                        continue                               # wait for the boot, verify
                else:
                    out = await self._step(name, current.name, marker)
                if out.get("finished") is not None:
                    self._finish(name, out["finished"])
                    return
                if current.to is not None:
                    self._move(name, current.to, **out["fields"])
        except _Failed as f:
            self._fail(name, f.phase, f.reason, f.report)

    async def _step(self, name: str, step: str, marker: Optional[str],
                    at_most_once: bool = False) -> dict[str, Any]:
        """Run one step as an activity on the host's site; _Failed when it failed."""
        s = None if step == MARKER_STEP else lifecycle.step(step)
        phase = s.failure_phase if s is not None else "kexec"
        site = self.inp["sites"][name]
        wait = float(self.inp["worker_wait_s"])
        timeout = float(self.inp["timeouts"][name][s.timeout if s is not None else "step"])
        aid = f"{name}/{step}"
        self.pending[name] = {"activity_id": aid, "step": step, "site": site, "since": _now()}
        args = {"rollout": self.inp["rollout"], "playbook": self.inp["playbook"],
                "playbook_sha256": self.inp["playbook_sha256"],
                "inventory": self.inp["inventory"],
                "inventory_sha256": self.inp["inventory_sha256"], "sim_dir": self.inp["sim_dir"],
                "host": name, "step": step, "marker": marker,
                "power_on": self.rows[name]["state"] in lifecycle.states_before_kexec()}
        retry = RetryPolicy(maximum_attempts=1) if at_most_once else RetryPolicy(
            initial_interval=timedelta(seconds=1), maximum_attempts=int(self.inp["attempts"]),
            non_retryable_error_types=["HostFailed"])
        try:
            out: dict[str, Any] = await workflow.execute_activity(
                ACTIVITY, args, task_queue=site_queue(site), activity_id=aid,
                schedule_to_start_timeout=timedelta(seconds=wait),
                start_to_close_timeout=timedelta(seconds=timeout + 120),
                heartbeat_timeout=timedelta(seconds=float(self.inp["heartbeat_s"])),
                retry_policy=retry)
        except ActivityError as e:
            cause = e.cause
            if isinstance(cause, ApplicationError) and cause.type == "HostFailed" \
                    and cause.details:
                d = cause.details[0]
                self._events(name, d.get("events") or [])
                raise _Failed(d["phase"], d["reason"], d.get("report")) from None
            if isinstance(cause, TimeoutError) and cause.type == TimeoutType.SCHEDULE_TO_START:
                raise _Failed(phase, f"no worker of site {site} took the {step} step within "
                              f"{wait:g}s (start kho-fleet worker --site {site})") from None
            why = f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
            if at_most_once:
                raise _Unknown(why) from None
            raise _Failed(phase, f"{step} did not complete: {why}") from None
        finally:
            self.pending.pop(name, None)
        self._events(name, out.get("events") or [])
        return out

    def _events(self, host: str, events: list[dict[str, Any]]) -> None:
        for ev in events:
            log(self.events, float(ev["ts"]), host, ev["event"], ev.get("detail"))

    def _finish(self, name: str, rep: dict) -> None:
        path = host_report_path(name)
        if rep.get("result") == "success":
            self._move(name, "reported", report={**rep, "report_path": path})
        else:
            fail = rep.get("failure") or {"phase": "verify", "reason": "verification failed"}
            self._move(name, "failed", report={**rep, "report_path": path},
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
        hosts: list[str] = st["hosts"]
        size = max(1, int(self.plan["batch_size"]))
        chunks = [hosts[i:i + size] for i in range(0, len(hosts), size)]
        par = max(1, int(st["max_parallel"]))
        started = []
        for k, chunk in enumerate(chunks):
            share = max(1, par // len(chunks) + (1 if k < par % len(chunks) else 0))
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
                   "attempts": p["attempts"], "aborted": self.status == "aborted"}
            handle = await workflow.start_child_workflow(
                BATCH_WORKFLOW, inp, id=bid, task_queue=WORKFLOW_QUEUE)
            b = {"id": bid, "stage_idx": idx, "hosts": chunk, "done": False}
            self.batches.append(b)
            if self.status == "aborted" and not inp["aborted"]:
                await self._abort_batch(bid, self.reason or "aborted")
            started.append((b, handle))
        results: list[dict] = []
        for b, handle in started:
            out = await handle
            b["done"] = True
            results += out["results"]
        return results

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
