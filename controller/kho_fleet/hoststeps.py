"""One host's lifecycle steps, carried out through its HostAccess: what every engine runs.

The step table (lifecycle.py) says which step runs when; this module says what running one
means on a host -- the agent call with the step's arguments (the pushed files), its timeout,
waiting for the next boot, the final report -- without committing anything. The engine that
owns the state (rollout.py with SQLite, temporal/ with a workflow's history) commits: it
passes `commit_first`, called with the at-most-once step's state and the host's boot marker
*before* that step is sent, and it enters a step's `to` state once `perform` returned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from . import lifecycle
from .artifacts import Artifacts
from .errors import KhoFleetError
from .hostaccess import AgentCall, HostAccess
from .inventory import Host
from .playbook import Playbook
from .transport import HostUnreachable

__all__ = ["HostFailed", "HostRun", "StepResult", "HostSteps", "step_timeout"]

Log = Callable[[str, str], None]                 # (event, detail)
CommitFirst = Callable[[str, str], None]         # (state, boot marker)


class HostFailed(KhoFleetError):
    """A step failed on the host: the phase it is reported in, why, and the agent's report
    when the step still returned one (a failed verify)."""

    def __init__(self, phase: str, reason: str, report: Optional[dict] = None) -> None:
        super().__init__(reason)
        self.phase = phase
        self.report = report


@dataclass
class HostRun:
    """What one drive of a host carries between its steps."""

    marker: Optional[str] = None             # the boot marker before the kexec
    resend_kexec: bool = False               # resumed after kexec_requested: see resend_kexec
    values: Optional[dict[str, Any]] = None  # the agent steps' named arguments (pushed files)
    report: Optional[dict] = None


@dataclass
class StepResult:
    """A step's outcome: the fields for entering its `to` state, or -- `finished` -- the
    host's final agent report (the handover is over: success or a failed verification)."""

    fields: dict[str, Any] = field(default_factory=dict)
    finished: Optional[dict] = None

    @property
    def done(self) -> bool:
        return self.finished is not None


def step_timeout(pb: Playbook, host: Host, which: str) -> float:
    """Seconds that bound a step of kind `which` (lifecycle.Step.timeout) on `host`."""
    t = pb.timeouts
    return {"step": 300.0, "kexec": t.ssh_s + 30, "verify": t.verify_s,
            "boot": host.boot_timeout or t.boot_s}[which]


class HostSteps:
    """The lifecycle's steps on one connected host (`connect()` first)."""

    def __init__(self, acc: HostAccess, artifacts: Artifacts, playbook: Playbook, host: Host, *,
                 log: Optional[Log] = None, commit_first: Optional[CommitFirst] = None) -> None:
        self.acc = acc
        self.art = artifacts
        self.pb = playbook
        self.host = host
        self._log = log or (lambda event, detail: None)
        self._commit_first = commit_first

    def connect(self) -> None:
        """Connect and push the agent (content-addressed: once per host)."""
        self.acc.t.connect()
        self.acc.push_agent(self.art.agent)

    def timeout(self, which: str) -> float:
        return step_timeout(self.pb, self.host, which)

    def values(self) -> dict[str, Any]:
        """The named arguments of the lifecycle's agent steps (the files are pushed): the
        kernel of the host's architecture (kho_arch), unpacked to what kexec_file_load takes,
        with the sha256 of that file."""
        arch = self.host.arch
        t, k = self.pb.target_for(arch), self.art.kernel_for(arch)
        if t is None or k is None:          # assign_hosts refuses this before a rollout starts
            raise HostFailed("preflight", f"host {self.host.name!r} has kho_arch: {arch}, and "
                             f"the playbook names no {arch} kernel")
        return {"kernel": self.acc.push(k.path), "spec": self.acc.push(self.art.spec),
                "initrd": self.acc.push(t.initrd) if t.initrd else None,
                "page_size": self.host.page_size, "sha256": k.sha256, "cmdline": t.cmdline,
                "release_before_verify": self.pb.release_before_verify,
                **self.kexec_values()}

    def kexec_values(self) -> dict[str, Any]:
        """The kexec step's named arguments (no files): the playbook's kexec_method wins
        over the host's kho_kexec_method."""
        return {"kexec_method": self.pb.kexec_method or self.host.kexec_method,
                "allow_fdstore_loss": self.pb.allow_fdstore_loss}

    def agent(self, step: str, *args: str, timeout: float = 300.0) -> AgentCall:
        """Run one agent step; HostFailed unless it exited 0 (with the agent's report when
        the step is one whose failure still reports)."""
        call = self.acc.agent(step, *args, timeout=timeout)
        self._log(f"agent {step}", f"rc {call.rc} in {call.seconds:.2f}s"
                  + (f": {call.reason}" if call.rc else ""))
        if call.rc != 0:
            keeps = step in lifecycle.STEP_NAMES and lifecycle.step(step).report_on_failure
            raise HostFailed(step, call.reason, call.json if keeps else None)
        return call

    def final_report(self, verified: Optional[dict]) -> dict:
        """The agent's handover report (`report` step), else the verify step's."""
        return self.agent("report").json or verified or {}

    def collect_verify(self) -> Optional[StepResult]:
        """The result of the verify kho-agent-verify.service ran early in this boot
        (`verify --collect`, waiting for it if it still runs), None when it did not run
        (exit 3; an agent without --collect: exit 2) and the controller verifies itself."""
        call = self.acc.agent("verify", "--collect", timeout=self.timeout("verify"))
        self._log("agent verify --collect", f"rc {call.rc} in {call.seconds:.2f}s"
                  + (f": {call.reason}" if call.rc else ""))
        boot = (call.json or {}).get("boot") or {}
        if call.rc == 0:
            self._log("verify collected", f"verified by {boot.get('verified_by', '?')}")
            return StepResult()
        if call.rc == 1 and call.json is not None:
            return StepResult(finished=self.final_report(call.json))   # it found a problem
        return None

    def resend_kexec(self, run: HostRun) -> None:
        """On resume after kexec_requested: a host still answering from the boot recorded
        before the kexec may never have been told to kexec (the engine died in between).
        Ask again; the agent's claim makes it at most once per boot and handover (exit 4:
        it had already started, so only wait). A host in another boot, or not answering,
        is left to wait_back."""
        try:
            now = self.acc.boot_marker()
        except HostUnreachable:
            return
        if run.marker is None or now != run.marker:
            return
        s = lifecycle.step("kexec")
        try:
            call = self.acc.agent(s.name, *lifecycle.agent_argv(s, self.kexec_values()),
                                  timeout=self.timeout(s.timeout))
        except HostUnreachable as e:               # it went down: the kexec is under way
            self._log("kexec re-sent, connection dropped", str(e))
            return
        if call.rc == 4:
            self._log("kexec already started", call.reason or "the agent's claim is there")
        elif call.rc != 0:
            try:
                gone = self.acc.boot_marker() != run.marker
            except HostUnreachable:
                gone = True
            if not gone:
                raise HostFailed(s.name, call.reason)
            self._log("kexec under way", f"the host left boot {run.marker} meanwhile "
                      f"({call.reason})")
        else:
            self._log("kexec re-sent", f"host was still in boot {run.marker}: the kexec had "
                      "not reached it")

    def perform(self, s: lifecycle.Step, run: HostRun) -> StepResult:
        """Carry out step `s` (HostFailed, TransportError or OSError when it fails)."""
        if s.kind == "begin":
            return StepResult()
        if s.kind == "wait_back":
            if run.resend_kexec:
                run.resend_kexec = False
                self.resend_kexec(run)
            timeout = self.timeout("boot")
            try:
                self.acc.wait_back(run.marker, timeout)
            except HostUnreachable:
                raise HostFailed(s.failure_phase, f"host did not come back within {timeout:.0f}s "
                                 "after kexec") from None
            return StepResult({"back_at": time.time()})
        if s.kind == "finish":
            return StepResult(finished=self.final_report(run.report))
        if s.args and run.values is None:
            run.values = self.values()
        if s.name == "verify":
            collected = self.collect_verify()
            if collected is not None:
                return collected
        fields: dict[str, Any] = {}
        if s.commit_first is not None:                     # the at-most-once step: commit first
            run.marker = self.acc.boot_marker()
            if self._commit_first is None:
                raise HostFailed(s.failure_phase, f"{s.name} is only sent after its state is "
                                 "committed, and this engine commits none")
            self._commit_first(s.commit_first, run.marker)
            t_last = time.time()
            fields = {"last_contact": t_last, "kexec_started_at": t_last}
        try:
            self.agent(s.name, *lifecycle.agent_argv(s, run.values or {}),
                       timeout=self.timeout(s.timeout))
        except HostUnreachable as e:
            if not s.unreachable_ok:
                raise
            self._log(f"{s.name} connection dropped", str(e))
        except HostFailed as e:
            if s.report_on_failure and e.report is not None:
                # the agent ran the step and found a problem: its report says which
                return StepResult(finished=self.final_report(e.report))
            raise
        return StepResult(fields)
