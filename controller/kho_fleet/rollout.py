"""The rollout engine: stages of hosts through the handover, gates between stages.

Per host: preflight -> stage -> preserve -> snapshot -> kexec -> (down) -> up -> verify ->
report, each transition committed to the rollout's SQLite state before the action it
guards. `kexec_requested` is written before the kexec is sent and can be entered once per
host ever, so a controller killed at any moment resumes (`--resume ID`) without kexec'ing
a host twice: a host found past that point is reconnected and verified.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .agentbuild import build_agent
from .fleetreport import percentile
from .hostaccess import AgentCall, HostAccess, host_access
from .inventory import Inventory, load_inventory
from .playbook import Gate, Playbook, load_playbook
from .statedb import StateDB
from .transport import HostUnreachable, TransportError

__all__ = ["RolloutError", "RolloutOptions", "Rollout", "judge_gate"]

Progress = Callable[[str, str, str], None]      # (host, state, detail)


class RolloutError(Exception):
    """A rollout that cannot start or resume; the message is one line."""


@dataclass
class RolloutOptions:
    rollouts_dir: str = "rollouts"
    reports_dir: str = "reports"
    sim_dir: str = ".sim"
    dry_run: bool = False
    progress: Optional[Progress] = None
    metrics: Any = None                  # metrics.RolloutMetrics, or None


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
    criteria = {"min_success_ratio": {"want": gate.min_success_ratio, "got": round(ratio, 4),
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


class HostFailed(Exception):
    def __init__(self, phase: str, reason: str, report: Optional[dict] = None) -> None:
        super().__init__(reason)
        self.phase = phase
        self.report = report


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
        self._artifacts: Optional[dict[str, str]] = None
        self._lock = threading.Lock()
        self.metrics = opts.metrics
        self._counted = 0.0

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def start(cls, playbook_path: str, inventory_path: str, opts: RolloutOptions) -> "Rollout":
        """Check the inputs and create the rollout's state (nothing touches a host yet)."""
        inv = load_inventory(inventory_path)
        pb = load_playbook(playbook_path)
        stages = pb.assign_hosts(inv)
        pb.target.check_files()
        db = StateDB.create(opts.rollouts_dir, playbook_path=pb.path, inventory_path=inv.path,
                            stages=[(s.name, hosts) for s, hosts in zip(pb.stages, stages)])
        db.log("created", f"playbook {pb.path}, inventory {inv.path}"
               + (" (dry run)" if opts.dry_run else ""))
        return cls(db, pb, inv, opts)

    @classmethod
    def resume(cls, rollout_id: str, opts: RolloutOptions) -> "Rollout":
        """Reopen a rollout; its playbook and inventory must be unchanged."""
        path = os.path.join(opts.rollouts_dir, rollout_id)
        if not os.path.exists(os.path.join(path, "state.db")):
            raise RolloutError(f"no rollout {rollout_id!r} in {opts.rollouts_dir}")
        db = StateDB.open(path)
        row = db.rollout()
        if row.status in ("completed", "aborted", "rolled_back"):
            raise RolloutError(f"rollout {rollout_id} is {row.status}: nothing to resume")
        inv = load_inventory(row.inventory_path)
        pb = load_playbook(row.playbook_path)
        for what, got, want in (("playbook", pb.sha256, row.playbook_sha256),
                                ("inventory", inv.sha256, row.inventory_sha256)):
            if got != want:
                raise RolloutError(f"rollout {rollout_id}: the {what} changed since it started "
                                   f"({row.playbook_path if what == 'playbook' else row.inventory_path})")
        if row.status == "halted":
            db.set_status("running", "resumed")
        db.log("resumed")
        return cls(db, pb, inv, opts)

    # --- artifacts ------------------------------------------------------------------------
    def artifacts(self) -> dict[str, str]:
        """The agent zipapp, the kernel (and initrd) and the workload spec, built once."""
        with self._lock:
            if self._artifacts is None:
                art = os.path.join(self.dir, "artifacts")
                os.makedirs(art, exist_ok=True)
                a: dict[str, str] = {"agent": build_agent(os.path.join(art, "kho-agent.pyz"))[0]}
                t = self.pb.target
                if t.is_twin:
                    from .sim.kernelimage import make_kernel_image
                    a["kernel"] = make_kernel_image(
                        os.path.join(art, f"bzImage-{t.twin_release}"), t.twin_release or "")
                else:
                    a["kernel"] = t.kernel
                if t.initrd:
                    a["initrd"] = t.initrd
                spec = os.path.join(art, "workloads.json")
                with open(spec, "w") as f:
                    json.dump(self.pb.workloads.to_json(), f, indent=1)
                a["spec"] = spec
                self._artifacts = a
            return self._artifacts

    def _access(self, name: str) -> HostAccess:
        host = self.inv.hosts[name]
        root = None
        if host.transport == "sim":
            from .sim.fleet import ensure_twin, twin_root
            root = twin_root(host, self.opts.sim_dir)
            if self.db.resume_action(name) == "run":
                ensure_twin(host, self.opts.sim_dir)
        return host_access(host, twin_root=root, ssh_timeout=self.pb.timeouts.ssh_s)

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
    def _step(self, acc: HostAccess, step: str, *args: str, timeout: float = 300.0) -> AgentCall:
        call = acc.agent(step, *args, timeout=timeout)
        self.db.log(f"agent {step}", f"rc {call.rc} in {call.seconds:.2f}s"
                    + (f": {call.reason}" if call.rc else ""), host=acc.name)
        if call.rc != 0:
            raise HostFailed(step, call.reason, call.json if step in ("verify", "report") else None)
        return call

    def run_host(self, name: str) -> None:
        """Drive one host as far as its state allows; failures end in state `failed`."""
        action = self.db.resume_action(name)
        if action in ("done", "failed"):
            return
        acc: Optional[HostAccess] = None
        phase = "preflight"
        try:
            acc = self._access(name)
            acc.t.connect()
            art = self.artifacts()
            acc.push_agent(art["agent"])
            if action == "run":
                # resume at the first step this host has not completed
                kernel = acc.push(art["kernel"])
                spec = acc.push(art["spec"])
                initrd = acc.push(art["initrd"]) if "initrd" in art else None
                st = self.db.host(name).state
                if st == "pending":
                    self._move(name, "preflight")
                    st = "preflight"
                if st == "preflight":
                    phase = "preflight"
                    self._step(acc, "preflight", "--kernel", kernel, "--spec", spec,
                               "--page-size", str(self.inv.hosts[name].page_size),
                               *(("--initrd", initrd) if initrd else ()))
                    if self.opts.dry_run:
                        self.db.log("dry run", "preflight passed", host=name)
                        return
                    if self._aborted():
                        return
                    phase = "stage"
                    args = ["--kernel", kernel]
                    if initrd:
                        args += ["--initrd", initrd]
                    if self.pb.target.sha256:
                        args += ["--sha256", self.pb.target.sha256]
                    if self.pb.target.cmdline is not None:
                        args += ["--cmdline", self.pb.target.cmdline]
                    self._step(acc, "stage", *args)
                    self._move(name, "staged")
                    st = "staged"
                if st == "staged":
                    phase = "preserve"
                    self._step(acc, "preserve", "--spec", spec)
                    self._move(name, "preserved")
                    st = "preserved"
                if st == "preserved":
                    phase = "snapshot"
                    self._step(acc, "snapshot")
                    self._move(name, "snapshotted")
                if self._aborted():
                    return
                phase = "kexec"
                marker = acc.boot_marker()
                self.db.log("boot_marker", marker, host=name)
                self._move(name, "kexec_requested")           # committed before sending
                t_last = time.time()
                try:
                    self._step(acc, "kexec", "--yes", timeout=self.pb.timeouts.ssh_s + 30)
                except HostUnreachable as e:                   # dropped mid-kexec: it may be gone
                    self.db.log("kexec connection dropped", str(e), host=name)
                self._move(name, "kexec_sent", last_contact=t_last, kexec_started_at=t_last)
            else:
                marker = self._last_marker(name)
                self.db.log("reconnect", f"resuming after kexec (boot marker {marker})", host=name)
            phase = "boot"
            timeout = self.inv.hosts[name].boot_timeout or self.pb.timeouts.boot_s
            state = self.db.host(name).state
            if state in ("kexec_requested", "kexec_sent", "down"):
                try:
                    acc.wait_back(marker, timeout)
                except HostUnreachable:
                    raise HostFailed("boot", f"host did not come back within {timeout:.0f}s "
                                             "after kexec") from None
                self._move(name, "up", back_at=time.time())
            phase = "verify"
            if self.db.host(name).state == "up":
                try:
                    self._step(acc, "verify", timeout=self.pb.timeouts.verify_s)
                except HostFailed as e:
                    if e.report is None:
                        raise
                    # the agent verified and found a problem: its report says which
                    self._finish(name, acc, e.report)
                    return
                self._move(name, "verified")
            self._finish(name, acc, None)
        except HostFailed as e:
            self._fail(name, e.phase, str(e), e.report)
        except (TransportError, OSError) as e:
            self._fail(name, phase, str(e).splitlines()[0] if str(e) else type(e).__name__)
        finally:
            if acc is not None:
                acc.close()

    def _finish(self, name: str, acc: HostAccess, verified: Optional[dict]) -> None:
        rep = self._step(acc, "report").json or verified or {}
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
        out = []
        for h in self.db.hosts(stage=idx):
            rep = h.report or {}
            ws = rep.get("workloads") or []
            out.append({"host": h.name, "state": h.state, "result": rep.get("result") or
                        ("success" if h.state == "reported" else "failed"),
                        "downtime_s": h.downtime_s if h.downtime_s is not None else
                        (rep.get("downtime") or {}).get("blackout_s"),
                        "workloads_ok": bool(ws) and all(w.get("verified") for w in ws)
                        or (not ws and rep.get("result") == "success")})
        return out

    def run(self) -> dict:
        """Drive every stage; returns the fleet report."""
        try:
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
        except KeyboardInterrupt:
            self._set_status("halted", "interrupted: resume with kho-fleet rollout --resume "
                             + self.id)
            raise

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
                acc.t.connect()
                acc.push_agent(self.artifacts()["agent"])
                image = f"/boot/vmlinuz-{release}"
                spec = acc.push(self.artifacts()["spec"])
                for step, args in (("stage", ("--kernel", image)), ("preserve", ("--spec", spec)),
                                   ("snapshot", ())):
                    self._step(acc, step, *args)
                marker = acc.boot_marker()
                try:
                    self._step(acc, "kexec", "--yes")
                except HostUnreachable:
                    pass
                acc.wait_back(marker, self.inv.hosts[name].boot_timeout or self.pb.timeouts.boot_s)
                self._step(acc, "verify", timeout=self.pb.timeouts.verify_s)
                rep = self._step(acc, "report").json
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
        fleet = build_fleet_report(self.db)
        write_fleet_report(self.reports, fleet)
        return fleet
