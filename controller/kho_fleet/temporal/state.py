"""The Temporal engine's rollout state as plain rows, and a reader over them (pure, no I/O).

A workflow keeps its hosts as dicts with exactly statedb.HostRow's fields and moves them
with `transition`, which applies statedb's state machine and its timestamps (so the
kexec_requested state can be entered once, as in SQLite). `Snapshot` turns a workflow's
rows back into RolloutRow/StageRow/HostRow/Event and answers the reads that
fleetreport.build_fleet_report and `kho-fleet status` make of a StateDB: the fleet report of
either engine is built by the same code, with the same schema.

>>> row = new_host("h1", 0, 10.0)
>>> ev: list = []
>>> transition(row, "preflight", 11.0, ev)
>>> (row["state"], row["attempts"], ev[-1]["detail"])
('preflight', 1, 'pending -> preflight')
>>> from kho_fleet.statedb import IllegalTransition
>>> try:
...     transition(row, "verified", 12.0, ev)
... except IllegalTransition as e:
...     print(str(e).split(" (")[0])
host 'h1': preflight -> verified is not allowed
"""

from __future__ import annotations

import json
from dataclasses import fields as dc_fields
from typing import Any, Optional

from ..lifecycle import Step
from ..statedb import HOST_STATES, Event, HostRow, RolloutRow, StageRow, entering

__all__ = ["WORKFLOW_QUEUE", "site_queue", "new_host", "transition", "log", "Snapshot",
           "HOST_FIELDS", "phase", "phases", "GROUP_MAX", "batch_width", "groups"]

WORKFLOW_QUEUE = "kho-fleet-workflows"      # the rollout workflows' own task queue
HOST_FIELDS = tuple(f.name for f in dc_fields(HostRow))
_SETTABLE = ("last_contact", "kexec_started_at", "back_at", "report", "error")
GROUP_MAX = 50                  # hosts of a batch that one phase activity carries, at most


def batch_width(n_hosts: int, max_parallel: int, batch_size: int) -> int:
    """Hosts per batch workflow in a stage of `n_hosts` run `max_parallel` at a time, when a
    batch runs all of its hosts at once (at most `batch_size`) and the stage runs as many
    batches at once as fit in `max_parallel` (HostBatchWorkflow, RolloutWorkflow._run_stage).

    A stage that fits in max_parallel is cut in batches of `batch_size`, all running at
    once. A larger one in batches of max_parallel / k, k = the fewest batches of at most
    `batch_size` that fill max_parallel: k batches run at once, the next starts when a
    batch's hosts are done and free its slots.

    Why whole batches at once: hosts that start together reach each phase together and share
    its activity (Temporal's cost is per activity); 50 batches of 200 sharing 500 slots ran
    10 hosts each, which started one by one and shared almost nothing (docs/scale.md).

    >>> batch_width(12, 100, 200), batch_width(9999, 500, 200), batch_width(10, 5, 200)
    (200, 166, 5)
    >>> batch_width(100000, 1000, 200), batch_width(3, 1, 200)
    (200, 1)
    """
    par, size = max(1, max_parallel), max(1, batch_size)
    if n_hosts <= par:
        return size
    k = -(-par // size)
    return max(1, par // k)


def groups(jobs: list, most: int = GROUP_MAX) -> list[list]:
    """`jobs` cut into the fewest groups of at most `most`, of near-equal sizes (a lone
    straggler group of 2 after 4 full ones would cost an activity for 2 hosts).

    >>> [len(g) for g in groups(list(range(166)), 50)]
    [42, 42, 41, 41]
    >>> groups([1, 2, 3], 50)
    [[1, 2, 3]]
    """
    n = -(-len(jobs) // max(1, most))
    out, start = [], 0
    for i in range(n):
        size = len(jobs) // n + (1 if i < len(jobs) % n else 0)
        out.append(jobs[start:start + size])
        start += size
    return out


def phase(ahead: list[Step]) -> list[Step]:
    """The steps, from the first of `ahead`, that one activity runs for a host: up to (not
    including) the next step an abort is honoured before, the at-most-once step, or the first
    step that a dry run does not make; the at-most-once step itself starts a phase and runs
    with the steps after it (if its activity is lost, those run again on their own).

    One activity per phase, not per step: Temporal's cost is per activity (its events, its
    workflow task), and the cuts are exactly where the workflow must decide something (abort,
    the commit before the kexec, the end of a dry run), so every rule of the step table holds.
    `begin` is the workflow's own act (no activity) and is not part of a phase.

    >>> from kho_fleet import lifecycle
    >>> [[s.name for s in p] for p in phases(list(lifecycle.LIFECYCLE))]
    ... # doctest: +NORMALIZE_WHITESPACE
    [['begin'], ['preflight'], ['stage', 'preserve', 'snapshot'],
     ['kexec', 'wait_back', 'verify', 'report']]
    >>> [s.name for s in phase(lifecycle.steps_from("kexec_requested"))]
    ['wait_back', 'verify', 'report']
    """
    out = ahead[:1]
    for s in ahead[1:]:
        prev = out[-1]
        if "begin" in (s.kind, prev.kind) or s.abort_point or s.at_most_once \
                or s.in_dry_run != prev.in_dry_run:
            break
        out.append(s)
    return out


def phases(steps: list[Step]) -> list[list[Step]]:
    """`steps` cut into phases (see `phase`)."""
    out: list[list[Step]] = []
    while len(steps) > sum(len(p) for p in out):
        out.append(phase(steps[sum(len(p) for p in out):]))
    return out


def site_queue(site: str) -> str:
    """The task queue of one site's workers: kho-fleet-<site>."""
    return f"kho-fleet-{site}"


def new_host(name: str, stage_idx: int, now: float) -> dict[str, Any]:
    """A pending host row."""
    return {"name": name, "stage_idx": stage_idx, "state": "pending", "attempts": 0,
            "last_contact": None, "kexec_requested_at": None, "kexec_started_at": None,
            "back_at": None, "report": None, "error": None, "updated": now}


def log(events: list, now: float, host: Optional[str], event: str,
        detail: Optional[str] = None) -> None:
    """Append one event (the shape of statedb.Event, without its id)."""
    events.append({"ts": now, "host": host, "event": event, "detail": detail})


def transition(row: dict[str, Any], new_state: str, now: float, events: list,
               **fields: Any) -> None:
    """Move a host row as StateDB.transition moves a host (same checks, same stamps)."""
    bad = set(fields) - set(_SETTABLE)
    if bad:
        raise TypeError(f"transition() got unknown fields {sorted(bad)}")
    host, old = row["name"], row["state"]
    sets = entering(row, new_state, now)
    sets.update(fields)
    row.update(sets)
    detail = f"{old} -> {new_state}"
    if fields.get("error"):
        detail += f": {fields['error']}"
    log(events, now, host, "state", detail)


def _host_row(d: dict[str, Any]) -> HostRow:
    row: dict[str, Any] = {k: d.get(k) for k in HOST_FIELDS}
    if isinstance(row["report"], str):
        row["report"] = json.loads(row["report"])
    return HostRow(**row)


class Snapshot:
    """A rollout's state read from plain rows: the reads fleetreport and `status` make of a
    StateDB (rollout, stages, hosts, host, events, counts)."""

    def __init__(self, rollout: dict[str, Any], stages: list[dict[str, Any]],
                 hosts: list[dict[str, Any]], events: list[dict[str, Any]],
                 path: str = "") -> None:
        self.path = path
        self._rollout = RolloutRow(path=path, **rollout)
        self._stages = [StageRow(**s) for s in stages]
        self._hosts = [_host_row(h) for h in hosts]
        self._by_name = {h.name: h for h in self._hosts}
        ordered = sorted(events, key=lambda e: e["ts"])
        self._events = [Event(id=i + 1, **e) for i, e in enumerate(ordered)]
        self._by_host: dict[Optional[str], list[Event]] = {}
        for e in self._events:              # a host's events without scanning everyone's
            self._by_host.setdefault(e.host, []).append(e)

    def rollout(self) -> RolloutRow:
        return self._rollout

    def stages(self) -> list[StageRow]:
        return list(self._stages)

    def host(self, name: str) -> HostRow:
        return self._by_name[name]

    def hosts(self, stage: Optional[int] = None, state: Optional[str] = None) -> list[HostRow]:
        return [h for h in self._hosts if (stage is None or h.stage_idx == stage)
                and (state is None or h.state == state)]

    def events(self, host: Optional[str] = None) -> list[Event]:
        return list(self._events) if host is None else list(self._by_host.get(host, ()))

    def counts(self, stage: Optional[int] = None) -> dict[str, int]:
        out = dict.fromkeys(HOST_STATES, 0)
        for h in self.hosts(stage=stage):
            out[h.state] += 1
        return out

    def close(self) -> None:
        """Nothing to close (the StateDB interface)."""
