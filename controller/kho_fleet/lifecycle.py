"""The host lifecycle, declared once: which step runs in which state, what it needs, where it
leads, and what may be repeated.

Every engine (the embedded one in rollout.py, a distributed one later) drives this table and
nothing else; statedb.py checks at import that each step's edges are transitions its state
machine allows, so the table and the machine cannot drift apart.

A host runs the steps in order, each one whose `runs_in` holds the host's current state;
after a step succeeds the host enters `to` (None: it stays, the next step runs in the same
state). The one step that must never be repeated is the kexec: its `commit_first` state is
committed *before* it is sent, and statedb refuses to enter that state twice, so a crashed
or retried engine reconnects and verifies instead.

>>> [s.name for s in LIFECYCLE]
['begin', 'preflight', 'stage', 'preserve', 'snapshot', 'kexec', 'wait_back', 'verify', 'report']
>>> [s.name for s in steps_from("up")]
['verify', 'report']
>>> states_before_kexec()
('pending', 'preflight', 'staged', 'preserved', 'snapshotted')
>>> agent_argv(step("stage"), {"kernel": "/k", "initrd": None, "sha256": "ab", "cmdline": None})
['--kernel', '/k', '--sha256', 'ab']
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

__all__ = ["Step", "LIFECYCLE", "STEP_NAMES", "step", "steps_from", "states_before_kexec",
           "happy_path", "agent_argv", "check_against"]


@dataclass(frozen=True)
class Step:
    """One row of the lifecycle table."""

    name: str                          # the agent step (kind "agent"), else the engine's action
    runs_in: tuple[str, ...]           # host states this step runs from
    to: Optional[str]                  # state entered once it succeeded; None: stays
    kind: str = "agent"                # agent | begin (an attempt starts) | wait_back | finish
    args: tuple[tuple[str, Optional[str]], ...] = ()   # (flag, value key); None key: a bare flag
    timeout: str = "step"              # which timeout bounds it: step | kexec | boot | verify
    phase: str = ""                    # the phase a failure is reported in (default: name)
    repeatable: bool = True            # safe to run again after a crash or a retry
    commit_first: Optional[str] = None  # state committed before the step is sent (at most once)
    in_dry_run: bool = False           # part of a dry run (a dry run stops at the first other)
    abort_point: bool = False          # an operator's abort is honoured before this step
    unreachable_ok: bool = False       # the connection dropping during it is expected
    report_on_failure: bool = False    # a failed run still returns the host's report (JSON)

    @property
    def failure_phase(self) -> str:
        return self.phase or self.name

    @property
    def at_most_once(self) -> bool:
        """True for the step whose start is committed first and never repeated (the kexec)."""
        return self.commit_first is not None


LIFECYCLE: tuple[Step, ...] = (
    Step("begin", ("pending",), "preflight", kind="begin", phase="preflight", in_dry_run=True),
    Step("preflight", ("preflight",), None, in_dry_run=True,
         args=(("--kernel", "kernel"), ("--spec", "spec"), ("--page-size", "page_size"),
               ("--initrd", "initrd"), ("--kexec-method", "kexec_method"),
               ("--allow-fdstore-loss", "allow_fdstore_loss"))),
    Step("stage", ("preflight",), "staged", abort_point=True,
         args=(("--kernel", "kernel"), ("--initrd", "initrd"), ("--sha256", "sha256"),
               ("--cmdline", "cmdline"))),
    Step("preserve", ("staged",), "preserved", args=(("--spec", "spec"),)),
    Step("snapshot", ("preserved",), "snapshotted"),
    Step("kexec", ("snapshotted",), "kexec_sent", timeout="kexec",
         args=(("--yes", None), ("--kexec-method", "kexec_method"),
               ("--allow-fdstore-loss", "allow_fdstore_loss")),
         repeatable=False, commit_first="kexec_requested", abort_point=True,
         unreachable_ok=True),
    Step("wait_back", ("kexec_requested", "kexec_sent", "down"), "up", kind="wait_back",
         timeout="boot", phase="boot"),
    Step("verify", ("up",), "verified", timeout="verify", report_on_failure=True,
         args=(("--release-before-verify", "release_before_verify"),)),
    Step("report", ("verified",), "reported", kind="finish", report_on_failure=True),
)
_BY_NAME = {s.name: s for s in LIFECYCLE}
STEP_NAMES = frozenset(_BY_NAME)


def step(name: str) -> Step:
    """The step called `name` (KeyError if there is none)."""
    return _BY_NAME[name]


def steps_from(state: str) -> list[Step]:
    """The steps a host in `state` still has ahead of it, in order."""
    for i, s in enumerate(LIFECYCLE):
        if state in s.runs_in:
            return list(LIFECYCLE[i:])
    return []


def states_before_kexec() -> tuple[str, ...]:
    """States from which a host is driven from its first incomplete step (the kexec is ahead)."""
    out: list[str] = []
    for s in LIFECYCLE:
        if s.at_most_once:
            for st in s.runs_in:
                if st not in out:
                    out.append(st)
            return tuple(out)
        for st in s.runs_in + ((s.to,) if s.to else ()):
            if st not in out:
                out.append(st)
    return tuple(out)


def happy_path() -> tuple[str, ...]:
    """Every state a host passes through when nothing goes wrong, in order."""
    out: list[str] = [LIFECYCLE[0].runs_in[0]]
    for s in LIFECYCLE:
        for st in ((s.commit_first,) if s.commit_first else ()) + ((s.to,) if s.to else ()):
            if st not in out:
                out.append(st)
    return tuple(out)


def agent_argv(s: Step, values: Mapping[str, object]) -> list[str]:
    """The step's agent arguments; a value of None (or False) leaves its flag out, True
    gives the bare flag."""
    argv: list[str] = []
    for flag, key in s.args:
        if key is None:
            argv.append(flag)
            continue
        v = values.get(key)
        if v is True:
            argv.append(flag)
        elif v is not None and v is not False:
            argv += [flag, str(v)]
    return argv


def check_against(transitions: Mapping[str, frozenset[str] | set[str]]) -> None:
    """Raise ValueError unless every edge of the table is an allowed transition.

    Edges: runs_in -> commit_first -> to (or runs_in -> to), for every step.
    """
    for s in LIFECYCLE:
        for st in s.runs_in:
            if st not in transitions:
                raise ValueError(f"lifecycle step {s.name}: unknown state {st!r}")
            first = s.commit_first or s.to
            if first is not None and first not in transitions[st]:
                raise ValueError(f"lifecycle step {s.name}: {st} -> {first} is not allowed")
        if s.commit_first and s.to and s.to not in transitions.get(s.commit_first, ()):
            raise ValueError(f"lifecycle step {s.name}: {s.commit_first} -> {s.to} is not allowed")
