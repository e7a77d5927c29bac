"""The rollout engine: stages of hosts through the handover, gates between stages.

Per host: preflight -> stage -> preserve -> snapshot -> kexec -> (down) -> up -> verify ->
report, each transition committed to the rollout's SQLite state before the action it
guards. `kexec_requested` is written before the kexec is sent and can be entered once per
host ever, so a controller killed at any moment resumes (`--resume ID`) without kexec'ing
a host twice: a host found past that point is reconnected and verified.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional

from . import lifecycle
from .artifacts import Artifacts, build_artifacts
from .errors import InputError
from .fleetreport import percentile
from .hostaccess import AccessOptions, HostAccess, host_access
from .hoststeps import HostFailed, HostRun, HostSteps, StepResult
from .inventory import Inventory, load_inventory
from .playbook import Gate, Playbook, load_playbook
from .statedb import HostRow, StateDB
from .transport import HostUnreachable, TransportError

__all__ = ["RolloutError", "RolloutFinished", "RolloutOptions", "DEFAULT_SIM_DIR", "Rollout",
           "judge_gate", "host_result", "HostFailed"]

Progress = Callable[[str, str, str], None]      # (host, state, detail)


class RolloutError(InputError):
    """A rollout that cannot start or resume; the message is one line."""


class RolloutFinished(RolloutError):
    """`--resume` of a rollout that already ended: nothing to do (not a failure)."""


DEFAULT_SIM_DIR = ".sim"
MODES = ("real", "dry-run")


@dataclass
class RolloutOptions:
    """How to run a rollout. `dry_run` and `sim_dir` change what happens to hosts, so they are
    recorded in the rollout's state at creation and a resume keeps them (`recorded`/`adopt`);
    `sim_dir` None means "the default" (or, on resume, the recorded one)."""

    rollouts_dir: str = "rollouts"
    reports_dir: str = "reports"
    sim_dir: Optional[str] = None
    dry_run: bool = False
    progress: Optional[Progress] = None
    metrics: Any = None                  # metrics.RolloutMetrics, or None

    def recorded(self) -> dict[str, Any]:
        """The options a new rollout records (JSON)."""
        return {"mode": "dry-run" if self.dry_run else "real",
                "sim_dir": os.path.abspath(self.sim_dir or DEFAULT_SIM_DIR)}

    def adopt(self, rollout_id: str, recorded: Optional[dict]) -> None:
        """Take a resumed rollout's recorded options; refuse asks that would change them."""
        if not recorded or recorded.get("mode") not in MODES:
            raise RolloutError(f"rollout {rollout_id}: its state does not record whether it is "
                               "a dry run (made by an older kho-fleet): it cannot be resumed; "
                               "start a new rollout")
        dry = recorded["mode"] == "dry-run"
        if self.dry_run and not dry:
            raise RolloutError(f"rollout {rollout_id} is a real rollout: --dry-run cannot be "
                               "combined with --resume of it (a dry run is a new rollout)")
        sim_dir = recorded.get("sim_dir")
        if (self.sim_dir is not None and isinstance(sim_dir, str)
                and os.path.abspath(self.sim_dir) != sim_dir):
            raise RolloutError(f"rollout {rollout_id}: --sim-dir {self.sim_dir} differs from the "
                               f"recorded {sim_dir}; resume without --sim-dir")
        self.dry_run = dry
        if isinstance(sim_dir, str):
            self.sim_dir = sim_dir


def judge_gate(gate: Gate, results: list[dict]) -> dict:
    """The gate's verdict over a stage's host results ({state, result, downtime_s,
    workloads_ok}); `ok` and every criterion with its measured value."""
    considered = [r for r in results if r["state"] != "skipped"]
    ok_hosts = [r for r in considered if r["result"] == "success"]
    failed = len(considered) - len(ok_hosts)
    ratio = len(ok_hosts) / len(considered) if considered else 1.0
    downs = [r["downtime_s"] for r in considered if r.get("downtime_s") is not None]
    p95 = percentile(downs, 95)
    all_verified = all(r.get("workloads_ok", False) for r in considered)
    criteria: dict[str, dict[str, Any]] = {
        "min_success_ratio": {"want": gate.min_success_ratio, "got": round(ratio, 4),
                              "ok": ratio >= gate.min_success_ratio}}
    if gate.max_downtime_p95_s is not None:
        criteria["max_downtime_p95_s"] = {"want": gate.max_downtime_p95_s, "got": p95,
                                          "ok": p95 is not None and p95 <= gate.max_downtime_p95_s}
    if gate.all_workloads_verified:
        criteria["all_workloads_verified"] = {"want": True, "got": all_verified, "ok": all_verified}
    if gate.max_failed_hosts is not None:
        criteria["max_failed_hosts"] = {"want": gate.max_failed_hosts, "got": failed,
                                        "ok": failed <= gate.max_failed_hosts}
    failing = [k for k, c in criteria.items() if not c["ok"]]
    return {"ok": not failing, "criteria": criteria, "hosts": len(considered),
            "succeeded": len(ok_hosts), "failed": failed,
            "reason": None if not failing else "gate failed: " + ", ".join(
                f"{k} wants {criteria[k]['want']}, got {criteria[k]['got']}" for k in failing)}


def host_result(h: HostRow) -> dict:
    """What a stage's gate judges of one host: {host, state, result, downtime_s,
    workloads_ok} (judge_gate's input; every engine builds it here)."""
    rep = h.report or {}
    ws = rep.get("workloads") or []
    return {"host": h.name, "state": h.state, "result": rep.get("result") or
            ("success" if h.state == "reported" else "failed"),
            "downtime_s": h.downtime_s if h.downtime_s is not None else
            (rep.get("downtime") or {}).get("blackout_s"),
            "workloads_ok": bool(ws) and all(w.get("verified") for w in ws)
            or (not ws and rep.get("result") == "success")}


class Rollout:
    """One rollout: a state DB, its playbook and inventory, and the engine that drives it."""

    def __init__(self, db: StateDB, playbook: Playbook, inventory: Inventory,
                 opts: RolloutOptions) -> None:
        self.db = db
        self.pb = playbook
        self.inv = inventory
        self.opts = opts
        self.id = db.rollout().id
        self.dir = os.path.dirname(db.path)
        self.reports = os.path.join(opts.reports_dir, self.id)
        self._artifacts: Optional[Artifacts] = None
        self._lock = threading.Lock()
        self.metrics = opts.metrics
        self._counted = 0.0

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def start(cls, playbook_path: str, inventory_path: str, opts: RolloutOptions) -> Rollout:
        """Check the inputs and create the rollout's state (nothing touches a host yet)."""
        inv = load_inventory(inventory_path)
        pb = load_playbook(playbook_path)
        stages = pb.assign_hosts(inv)
        pb.check_files(inv)
        if opts.sim_dir is None:
            opts.sim_dir = DEFAULT_SIM_DIR
        db = StateDB.create(opts.rollouts_dir, playbook_path=pb.path, inventory_path=inv.path,
                            stages=[(s.name, hosts) for s, hosts in zip(pb.stages, stages)],
                            options=opts.recorded())
        db.log("created", f"playbook {pb.path}, inventory {inv.path}"
               + (" (dry run)" if opts.dry_run else ""))
        return cls(db, pb, inv, opts)

    @classmethod
    def resume(cls, rollout_id: str, opts: RolloutOptions) -> Rollout:
        """Reopen a rollout in its recorded mode; its playbook and inventory must be unchanged.

        RolloutFinished when it already ended; RolloutError when it cannot be resumed as asked
        (a dry run never becomes a real rollout: that is a new `rollout`)."""
        path = os.path.join(opts.rollouts_dir, rollout_id)
        if not os.path.exists(os.path.join(path, "state.db")):
            raise RolloutError(f"no rollout {rollout_id!r} in {opts.rollouts_dir}")
        db = StateDB.open(path)
        row = db.rollout()
        if row.final:
            raise RolloutFinished(f"rollout {rollout_id} is already {row.status}"
                                  + (f" ({row.reason})" if row.reason else "")
                                  + ": nothing to resume")
        opts.adopt(rollout_id, row.options)
        inv = load_inventory(row.inventory_path)
        pb = load_playbook(row.playbook_path)
        for what, got, want in (("playbook", pb.sha256, row.playbook_sha256),
                                ("inventory", inv.sha256, row.inventory_sha256)):
            if got != want:
                where = row.playbook_path if what == "playbook" else row.inventory_path
                raise RolloutError(f"rollout {rollout_id}: the {what} changed since it started "
                                   f"({where})")
        if row.status == "halted":
            db.set_status("running", "resumed")
        db.log("resumed", "dry run" if opts.dry_run else None)
        return cls(db, pb, inv, opts)

    # --- artifacts ------------------------------------------------------------------------
    def artifacts(self) -> Artifacts:
        """The agent zipapp, the kernel (and initrd) and the workload spec, built once."""
        with self._lock:
            if self._artifacts is None:
                self._artifacts = build_artifacts(self.pb, os.path.join(self.dir, "artifacts"))
            return self._artifacts

    def _access(self, name: str) -> HostAccess:
        acc = host_access(self.inv.hosts[name], AccessOptions(
            sim_dir=self.opts.sim_dir or DEFAULT_SIM_DIR, ssh_timeout=self.pb.timeouts.ssh_s))
        acc.prepare(power_on=self.db.resume_action(name) == "run")
        return acc

    # --- reporting hooks ------------------------------------------------------------------
    def _note(self, host: str, state: str, detail: str = "") -> None:
        if self.opts.progress is not None:
            self.opts.progress(host, state, detail)
        if self.metrics is not None:
            row = self.db.host(host)
            self.metrics.host_state(host, self.pb.stages[row.stage_idx].name, state)
            now = time.monotonic()
            if now - self._counted >= 0.5:      # counts scan every host: at most twice a second
                self._counted = now
                self.metrics.update_counts(self.db.counts())

    def _move(self, host: str, state: str, **fields: Any) -> None:
        self.db.transition(host, state, **fields)
        self._note(host, state)

    # --- one host -------------------------------------------------------------------------
    def _steps(self, name: str, acc: HostAccess) -> HostSteps:
        """The lifecycle's steps on `name`, logging to this rollout's state; the at-most-once
        step's state (and the boot marker) is committed here before that step is sent."""
        def commit_first(state: str, marker: str) -> None:
            self.db.log("boot_marker", marker, host=name)
            self._move(name, state)
        return HostSteps(acc, self.artifacts(), self.pb, self.inv.hosts[name],
                         log=lambda event, detail: self.db.log(event, detail, host=name),
                         commit_first=commit_first)

    def run_host(self, name: str) -> None:
        """Drive one host through the lifecycle table as far as its state allows.

        Each step of `lifecycle.LIFECYCLE` whose `runs_in` holds the host's state runs, and
        its `to` state is committed after it; failures end in state `failed`. A host found
        past the kexec is reconnected to and verified, never kexec'd again."""
        action = self.db.resume_action(name)
        if action in ("done", "failed"):
            return
        acc: Optional[HostAccess] = None
        current = lifecycle.LIFECYCLE[0]
        run = HostRun()
        try:
            acc = self._access(name)
            steps = self._steps(name, acc)
            steps.connect()
            if action == "reconnect_verify":
                run.marker = self._last_marker(name)
                run.resend_kexec = self.db.host(name).state == "kexec_requested"
                self.db.log("reconnect", f"resuming after kexec (boot marker {run.marker})",
                            host=name)
            for current in lifecycle.steps_from(self.db.host(name).state):
                if self.db.host(name).state not in current.runs_in:
                    continue
                if self.opts.dry_run and not current.in_dry_run:
                    self.db.log("dry run", f"stopped before {current.name}", host=name)
                    return
                if current.abort_point and self._aborted():
                    return
                result = steps.perform(current, run)
                if result.done:
                    self._finish(name, result)              # reported or failed: report written
                    return
                if current.to is not None:
                    self._move(name, current.to, **result.fields)
        except HostFailed as e:
            self._fail(name, e.phase, str(e), e.report)
        except (TransportError, OSError) as e:
            self._fail(name, current.failure_phase,
                       str(e).splitlines()[0] if str(e) else type(e).__name__)
        finally:
            if acc is not None:
                acc.close()

    def _finish(self, name: str, result: StepResult) -> None:
        rep = result.finished or {}
        row = self.db.host(name)
        path = self._write_host_report(name, rep)
        if rep.get("result") == "success":
            self._move(name, "reported", report={**rep, "report_path": path})
        else:
            fail = rep.get("failure") or {"phase": "verify", "reason": "verification failed"}
            self.db.transition(name, "failed", report={**rep, "report_path": path},
                               error=f"{fail['phase']}: {fail['reason']}")
            self._note(name, "failed", fail["reason"])
        if self.metrics is not None:
            self.metrics.handover_finished(name, self.pb.stages[row.stage_idx].name, rep,
                                           self.db.host(name).downtime_s, report_path=path)

    def _fail(self, name: str, phase: str, reason: str, report: Optional[dict] = None) -> None:
        row = self.db.host(name)
        rep = report or {"schema": "kho-fleet/handover-report/v1", "host": name,
                         "result": "failed" if row.kexec_requested_at else "aborted",
                         "failure": {"phase": phase, "reason": reason}}
        path = self._write_host_report(name, rep)
        self.db.transition(name, "failed", error=f"{phase}: {reason}",
                           report={**rep, "report_path": path})
        self._note(name, "failed", f"{phase}: {reason}")
        if self.metrics is not None:
            self.metrics.handover_finished(name, self.pb.stages[row.stage_idx].name, rep,
                                           self.db.host(name).downtime_s, report_path=path)

    def _write_host_report(self, name: str, rep: dict) -> str:
        from .fleetreport import write_host_report
        row = self.db.host(name)
        timings = {"stage": self.pb.stages[row.stage_idx].name, "state": row.state,
                   "attempts": row.attempts, "kexec_requested_at": row.kexec_requested_at,
                   "last_contact_before_kexec": row.last_contact,
                   "first_contact_after": row.back_at, "downtime_s": row.downtime_s,
                   "events": [{"ts": e.ts, "event": e.event, "detail": e.detail}
                              for e in self.db.events(name)]}
        return write_host_report(self.reports, name, rep, timings)

    def _last_marker(self, name: str) -> Optional[str]:
        marks = [e.detail for e in self.db.events(name) if e.event == "boot_marker"]
        return marks[-1] if marks else None

    def _aborted(self) -> bool:
        return self.db.rollout().status == "aborted"

    # --- stages ---------------------------------------------------------------------------
    def _stage_results(self, idx: int) -> list[dict]:
        return [host_result(h) for h in self.db.hosts(stage=idx)]

    def run(self) -> dict:
        """Drive every stage; returns the fleet report.

        A rollout never stays `running` after this returns or raises: an interruption or an
        error halts it with the reason (resume with --resume), a finished one is left as is."""
        if self.db.rollout().final:
            return self.write_reports()
        try:
            return self._run()
        except KeyboardInterrupt:
            self.halt("interrupted: resume with kho-fleet rollout --resume " + self.id)
            raise
        except BaseException as e:
            self.halt(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                       f" (resume with kho-fleet rollout --resume {self.id})")
            raise

    def halt(self, reason: str) -> None:
        """Mark a running rollout halted (best effort: the state may be what failed)."""
        try:
            if self.db.rollout().status == "running":
                self._set_status("halted", reason)
        except Exception:
            pass

    def _run(self) -> dict:
        self.artifacts()
        if self.metrics is not None:
            self.metrics.set_status("running")
        for idx, stage in enumerate(self.pb.stages):
            row = self.db.stages()[idx]
            if row.status in ("passed", "failed", "skipped"):
                continue
            if self._aborted():
                break
            hosts = [h.name for h in self.db.hosts(stage=idx)]
            if row.status != "paused":
                if row.status != "running":        # (running: resumed after a crash)
                    self.db.set_stage(idx, "running")
                if self.metrics is not None:       # series exist (at 0) before a first failure
                    for result in ("success", "failed", "aborted"):
                        self.metrics["kho_fleet_handovers_total"].labels(
                            result=result, stage=stage.name).inc(0)
                self._stage_note(idx, "running")
                with ThreadPoolExecutor(max_workers=max(1, stage.max_parallel)) as ex:
                    list(ex.map(self.run_host, hosts))
                if self.opts.dry_run:
                    self.db.set_stage(idx, "passed", {"dry_run": True})
                    continue
                verdict = judge_gate(stage.gate, self._stage_results(idx))
                self.db.set_stage(idx, "passed" if verdict["ok"] else "failed", verdict)
                self._stage_note(idx, "passed" if verdict["ok"] else "failed")
                self.db.log("gate", f"stage {stage.name}: "
                            + ("passed" if verdict["ok"] else verdict["reason"]))
                if not verdict["ok"]:
                    if self.pb.on_failure == "halt":
                        self._set_status("halted", f"stage {stage.name}: {verdict['reason']}")
                        return self.write_reports()
                    if self.pb.on_failure == "rollback":
                        self.rollback(f"stage {stage.name}: {verdict['reason']}")
                        return self.write_reports()
                last = idx == len(self.pb.stages) - 1
                if verdict["ok"] and stage.pause == "manual" and not last:
                    self.db.set_stage(idx, "paused", verdict)
                    self._set_status("halted", f"paused after stage {stage.name}: resume "
                                     f"with kho-fleet rollout --resume {self.id}")
                    return self.write_reports()
                if isinstance(stage.pause, (int, float)) and stage.pause > 0 and not last:
                    time.sleep(float(stage.pause))
            else:
                self.db.set_stage(idx, "passed", row.gate)   # the operator resumed
        if self._aborted():
            return self.write_reports()
        self._set_status("completed", "dry run: preflight only" if self.opts.dry_run else None)
        return self.write_reports()

    def _stage_note(self, idx: int, status: str) -> None:
        if self.metrics is not None:
            hosts = self.db.hosts(stage=idx)
            done = sum(h.state in ("reported", "failed", "skipped") for h in hosts)
            self.metrics.stage_status(idx, self.pb.stages[idx].name, status,
                                      done / len(hosts) if hosts else 1.0)

    def _set_status(self, status: str, reason: Optional[str]) -> None:
        self.db.set_status(status, reason)
        if self.metrics is not None:
            self.metrics.set_status(status)
            self.metrics.update_counts(self.db.counts())

    def rollback(self, reason: str) -> None:
        """Hand every host this rollout moved back to the kernel it came from."""
        done = [h for h in self.db.hosts() if h.state == "reported"]
        self.db.log("rollback", f"{len(done)} host(s): {reason}")

        def back(name: str) -> None:
            row = self.db.host(name)
            frm = ((row.report or {}).get("kernel") or {}).get("from") or {}
            release = frm.get("release")
            acc = self._access(name)
            try:
                steps = self._steps(name, acc)
                steps.connect()
                image = f"/boot/vmlinuz-{release}"
                spec = acc.push(self.artifacts().spec)
                for step, args in (("stage", ("--kernel", image)), ("preserve", ("--spec", spec)),
                                   ("snapshot", ())):
                    steps.agent(step, *args)
                marker = acc.boot_marker()
                try:
                    steps.agent("kexec", "--yes")
                except HostUnreachable:
                    pass
                acc.wait_back(marker, steps.timeout("boot"))
                steps.agent("verify", timeout=steps.timeout("verify"))
                rep = steps.agent("report").json
                self.db.log("rolled back", f"to {release}: {rep.get('result')}", host=name)
            except (HostFailed, TransportError, OSError) as e:
                self.db.log("rollback failed", str(e), host=name)
            finally:
                acc.close()

        with ThreadPoolExecutor(max_workers=max(s.max_parallel for s in self.pb.stages)) as ex:
            list(ex.map(back, [h.name for h in reversed(done)]))
        self._set_status("rolled_back", reason)

    def write_reports(self) -> dict:
        from .fleetreport import build_fleet_report, write_fleet_report
        fleet = build_fleet_report(self.db,
                                   arches={n: h.arch for n, h in self.inv.hosts.items()})
        write_fleet_report(self.reports, fleet)
        return fleet
