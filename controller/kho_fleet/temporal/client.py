"""The controller's side of the Temporal engine: start a rollout workflow, attach to it,
read it (status), abort it, and write its reports.

The client checks the inputs as the embedded engine does (inventory, playbook, stages,
target files) and hands the workflow a plain plan: the hosts of each stage, their sites and
step timeouts, the paths and sha256s of the inputs. Nothing of the rollout lives here: a
killed client loses nothing; `--resume ID --engine temporal` attaches again.

Reports: `snapshot` reads the workflow (its status query, and each host batch's hosts query)
into a state.Snapshot, and `write_reports` builds the fleet report from it with
fleetreport.build_fleet_report -- the embedded engine's code and schema -- and writes the
host reports beside it, as the embedded engine does.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Optional

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

from ..errors import InputError
from ..fleetreport import build_fleet_report, write_fleet_report, write_host_report
from ..hoststeps import step_timeout
from ..inventory import load_inventory
from ..playbook import load_playbook
from ..rollout import DEFAULT_SIM_DIR, RolloutError, RolloutFinished, RolloutOptions
from .codec import data_converter
from .state import WORKFLOW_QUEUE, Snapshot, new_host
from .workflow import ROLLOUT_WORKFLOW

__all__ = ["TemporalTarget", "TemporalError", "make_plan", "start", "attach", "snapshot",
           "abort", "write_reports", "newest", "run"]

DEFAULT_ADDRESS = "127.0.0.1:7233"
Progress = Callable[[str, str, str], None]


class TemporalError(InputError):
    """Temporal cannot be used as asked (unreachable, no such rollout): one line, exit 2."""


@dataclass
class TemporalTarget:
    """Where the rollout workflows live."""

    address: str = DEFAULT_ADDRESS
    namespace: str = "default"
    worker_wait_s: float = 600.0     # a step no worker of its site takes in time fails its host
    heartbeat_s: float = 10.0        # a worker silent this long is lost: its step runs again
    attempts: int = 5                # runs of a repeatable step whose worker was lost
    batch_size: int = 200            # hosts per batch workflow
    _client: Optional[Client] = field(default=None, repr=False)

    async def client(self) -> Client:
        if self._client is None:
            tls = tls_config(os.environ)
            try:
                self._client = await Client.connect(self.address, namespace=self.namespace,
                                                    tls=tls, data_converter=data_converter(),
                                                    connect_timeout=timedelta(seconds=15))
            except Exception as e:  # any failure to connect is one line
                why = _one_line(e)
                if "ConnectionRefused" in why:
                    why = "connection refused"
                raise TemporalError(f"--temporal-address {self.address}: cannot reach Temporal "
                                    f"({why[:300]})") from None
        return self._client


TLS_ENV = ("KHO_FLEET_TEMPORAL_TLS_CA", "KHO_FLEET_TEMPORAL_TLS_CERT",
           "KHO_FLEET_TEMPORAL_TLS_KEY", "KHO_FLEET_TEMPORAL_TLS_SERVER_NAME")


def tls_config(env: Any) -> Any:
    """TLS to the Temporal frontend from the environment (docs/scale.md), or False.

    KHO_FLEET_TEMPORAL_TLS_CA (PEM file; set alone: server TLS with this CA), _CERT and _KEY
    (PEM files: mutual TLS), _SERVER_NAME (the name in the server's certificate);
    KHO_FLEET_TEMPORAL_TLS=1 alone: TLS with the system's CAs."""
    from temporalio.service import TLSConfig
    if not any(env.get(k) for k in TLS_ENV) and env.get("KHO_FLEET_TEMPORAL_TLS") != "1":
        return False

    def read(var: str) -> Optional[bytes]:
        path = env.get(var)
        if not path:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise TemporalError(f"${var} {path}: {e.strerror or e}") from None
    cert, key = read("KHO_FLEET_TEMPORAL_TLS_CERT"), read("KHO_FLEET_TEMPORAL_TLS_KEY")
    if (cert is None) != (key is None):
        raise TemporalError("KHO_FLEET_TEMPORAL_TLS_CERT and KHO_FLEET_TEMPORAL_TLS_KEY go "
                            "together (mutual TLS)")
    return TLSConfig(server_root_ca_cert=read("KHO_FLEET_TEMPORAL_TLS_CA"),
                     domain=env.get("KHO_FLEET_TEMPORAL_TLS_SERVER_NAME") or None,
                     client_cert=cert, client_private_key=key)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def run(coro: Any) -> Any:
    """Run one client coroutine to completion (the CLI is synchronous); an error Temporal
    returns is one line (TemporalError), not a traceback."""
    try:
        return asyncio.run(coro)
    except RPCError as e:
        raise TemporalError(f"Temporal: {_one_line(e)}") from None


_TRANSIENT = (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED,
              RPCStatusCode.RESOURCE_EXHAUSTED)


def transient(e: RPCError) -> bool:
    """An error worth retrying: the server is starting, overloaded or moving shards."""
    return e.status in _TRANSIENT or "shard" in str(e).lower()


async def retrying(call: Callable[[], Any], budget_s: float = 120.0) -> Any:
    """await call(), retrying transient RPC errors for up to `budget_s` seconds."""
    deadline = time.monotonic() + budget_s
    delay = 0.2
    while True:
        try:
            return await call()
        except RPCError as e:
            if not transient(e) or time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def make_plan(playbook_path: str, inventory_path: str, opts: RolloutOptions,
              target: TemporalTarget) -> dict[str, Any]:
    """Check the inputs and build the workflow's plan (nothing touches a host)."""
    inv = load_inventory(inventory_path)
    pb = load_playbook(playbook_path)
    stages = pb.assign_hosts(inv)
    pb.check_files(inv)
    if pb.on_failure == "rollback":
        raise RolloutError(f"{pb.path}: on_failure: rollback is not available with --engine "
                           "temporal yet (use halt or continue, or the embedded engine)")
    sim_dir = opts.sim_dir or DEFAULT_SIM_DIR
    hosts = [h for hs in stages for h in hs]
    return {
        "id": _new_id(), "created": time.time(),
        "meta": {"name": pb.name,
                 "target": pb.target.twin_release or os.path.basename(pb.target.kernel)},
        "playbook": os.path.abspath(pb.path), "playbook_sha256": pb.sha256,
        "inventory": os.path.abspath(inv.path), "inventory_sha256": inv.sha256,
        "options": {"mode": "dry-run" if opts.dry_run else "real",
                    "sim_dir": os.path.abspath(sim_dir), "engine": "temporal"},
        "stages": [{"name": s.name, "hosts": hs, "max_parallel": s.max_parallel,
                    "gate": {"min_success_ratio": s.gate.min_success_ratio,
                             "max_downtime_p95_s": s.gate.max_downtime_p95_s,
                             "all_workloads_verified": s.gate.all_workloads_verified,
                             "max_failed_hosts": s.gate.max_failed_hosts},
                    "pause": s.pause} for s, hs in zip(pb.stages, stages)],
        "on_failure": pb.on_failure,
        "sites": {h: str(inv.hosts[h].vars.get("kho_site", "default")) for h in hosts},
        "timeouts": {h: {w: step_timeout(pb, inv.hosts[h], w)
                         for w in ("step", "kexec", "verify", "boot")} for h in hosts},
        "worker_wait_s": target.worker_wait_s, "heartbeat_s": target.heartbeat_s,
        "attempts": target.attempts, "batch_size": target.batch_size,
    }


async def start(plan: dict[str, Any], target: TemporalTarget) -> str:
    """Start the rollout workflow; its id (the rollout id)."""
    client = await target.client()
    await retrying(lambda: client.start_workflow(ROLLOUT_WORKFLOW, plan, id=plan["id"],
                                                 task_queue=WORKFLOW_QUEUE))
    return str(plan["id"])


async def _handle(target: TemporalTarget, rid: str) -> WorkflowHandle:
    client = await target.client()
    handle = client.get_workflow_handle(rid)
    try:
        await handle.describe()
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            raise TemporalError(f"no rollout {rid!r} in Temporal namespace {target.namespace} "
                                f"at {target.address}") from None
        raise TemporalError(f"rollout {rid}: {_one_line(e)}") from None
    return handle


async def newest(target: TemporalTarget) -> str:
    """The id of the newest rollout workflow in the namespace."""
    client = await target.client()
    best: Optional[tuple[Any, str]] = None
    try:
        async for wf in client.list_workflows(f'WorkflowType="{ROLLOUT_WORKFLOW}"'):
            if best is None or wf.start_time > best[0]:
                best = (wf.start_time, wf.id)
    except RPCError as e:
        raise TemporalError(f"cannot list rollouts: {_one_line(e)}") from None
    if best is None:
        raise TemporalError(f"no rollouts in Temporal namespace {target.namespace} at "
                            f"{target.address}")
    return best[1]


async def snapshot(target: TemporalTarget, rid: str, waiting: bool = False,
                   cache: Optional[dict[str, dict]] = None) -> tuple[Snapshot, dict[str, str]]:
    """The rollout's rows, read from its workflows; with `waiting`, also which hosts have a
    step that no worker of their site has taken yet ({host: "waiting for a worker ..."}).
    `cache` keeps finished batches' rows between calls (reading one replays its history)."""
    client = await target.client()
    handle = await _handle(target, rid)
    st = await handle.query("status")
    rows: dict[str, dict] = {}
    events = list(st["events"])
    waits: dict[str, str] = {}
    for b in st["batches"]:
        bh = client.get_workflow_handle(b["id"])
        q = cache.get(b["id"]) if cache is not None else None
        if q is None:
            q = await bh.query("hosts")
            if cache is not None and b["done"]:
                cache[b["id"]] = q
        rows.update({r["name"]: r for r in q["hosts"]})
        events += q["events"]
        if waiting and q["pending"]:
            desc = await bh.describe()
            scheduled = {a.activity_id: a for a in desc.raw_description.pending_activities
                         if a.state == 1}          # PENDING_ACTIVITY_STATE_SCHEDULED
            for host, p in q["pending"].items():
                a = scheduled.get(p["activity_id"])
                if a is None:
                    continue
                if a.attempt > 1:                  # between two runs of a failed attempt
                    why = a.last_failure.message if a.HasField("last_failure") else "?"
                    waits[host] = (f"retrying {p['step']} (attempt {a.attempt}): "
                                   f"{' '.join(why.split())[:200]}")
                else:
                    waits[host] = f"waiting for a worker of site {p['site']} ({p['step']})"
    created = st["rollout"]["created"]
    ordered = []
    for i, s in enumerate(st["plan_stages"]):
        for h in s["hosts"]:
            ordered.append(rows.get(h) or new_host(h, i, created))
    path = f"temporal://{target.address}/{target.namespace}/{rid}"
    return Snapshot(st["rollout"], st["stages"], ordered, events, path=path), waits


async def abort(target: TemporalTarget, rid: str, reason: str) -> str:
    """Signal the rollout to abort; its status before the signal."""
    handle = await _handle(target, rid)
    desc = await handle.describe()
    st = await handle.query("status")
    status = st["rollout"]["status"]
    if desc.status != WorkflowExecutionStatus.RUNNING or status in ("completed", "aborted",
                                                                    "rolled_back"):
        raise TemporalError(f"rollout {rid} is already {status}")
    await handle.signal("abort", reason)
    return str(status)


def write_reports(snap: Snapshot, reports_dir: str) -> dict:
    """Write the host reports and the fleet report (the embedded engine's files)."""
    out = os.path.join(reports_dir, snap.rollout().id)
    stages = {s.idx: s.name for s in snap.stages()}
    for row in snap.hosts():
        if row.report is None:
            continue
        rep = {k: v for k, v in row.report.items() if k != "report_path"}
        timings = {"stage": stages[row.stage_idx], "state": row.state,
                   "attempts": row.attempts, "kexec_requested_at": row.kexec_requested_at,
                   "last_contact_before_kexec": row.last_contact,
                   "first_contact_after": row.back_at, "downtime_s": row.downtime_s,
                   "events": [{"ts": e.ts, "event": e.event, "detail": e.detail}
                              for e in snap.events(row.name)]}
        write_host_report(out, row.name, rep, timings)
    fleet = build_fleet_report(snap)  # type: ignore[arg-type]  # Snapshot reads like a StateDB
    write_fleet_report(out, fleet)
    return fleet


class MetricsFeed:
    """Feeds a metrics.RolloutMetrics from successive snapshots: the embedded engine's
    metric names and labels, updated as the client sees hosts and stages change."""

    def __init__(self, metrics: Any) -> None:
        self.m = metrics
        self._hosts: dict[str, str] = {}
        self._stages: dict[int, tuple[str, float]] = {}

    def update(self, snap: Snapshot) -> None:
        names = {s.idx: s.name for s in snap.stages()}
        for s in snap.stages():
            hosts = snap.hosts(stage=s.idx)
            done = sum(h.state in ("reported", "failed", "skipped") for h in hosts)
            key = (s.status, done / len(hosts) if hosts else 1.0)
            if s.status == "pending" or self._stages.get(s.idx) == key:
                continue
            if s.idx not in self._stages:           # series exist (at 0) before a failure
                for result in ("success", "failed", "aborted"):
                    self.m["kho_fleet_handovers_total"].labels(result=result,
                                                               stage=s.name).inc(0)
            self._stages[s.idx] = key
            self.m.stage_status(s.idx, s.name, s.status, key[1])
        for h in snap.hosts():
            if self._hosts.get(h.name) == h.state:
                continue
            self._hosts[h.name] = h.state
            stage = names[h.stage_idx]
            if h.state in ("reported", "failed") and h.report is not None:
                rep = {k: v for k, v in h.report.items() if k != "report_path"}
                self.m.handover_finished(h.name, stage, rep, h.downtime_s,
                                         report_path=str(h.report.get("report_path") or ""))
            self.m.host_state(h.name, stage, h.state)
        self.m.update_counts(snap.counts())
        self.m.set_status(snap.rollout().status)


async def meta(target: TemporalTarget, rid: str) -> dict[str, Any]:
    """The rollout's playbook name and target release (for its metrics)."""
    st = await (await _handle(target, rid)).query("status")
    return dict(st.get("meta") or {})


async def attach(target: TemporalTarget, rid: str, reports_dir: str, *,
                 resume: bool = False, progress: Optional[Progress] = None,
                 feed: Optional[MetricsFeed] = None,
                 poll_s: float = 0.5) -> tuple[dict, bool]:
    """Follow the rollout until it ends or halts; write its reports. With `resume`, a rollout
    paused after a stage is told to proceed. (fleet report, whether the workflow ended)."""
    handle = await _handle(target, rid)
    desc = await handle.describe()
    if resume and desc.status != WorkflowExecutionStatus.RUNNING:
        snap, _ = await snapshot(target, rid)
        write_reports(snap, reports_dir)
        r = snap.rollout()
        raise RolloutFinished(f"rollout {rid} is already {r.status}"
                              + (f" ({r.reason})" if r.reason else "") + ": nothing to resume")
    if resume:
        st = await handle.query("status")
        if st["rollout"]["status"] == "halted":
            await handle.signal("proceed")
            for _ in range(100):
                await asyncio.sleep(0.1)
                if (await handle.query("status"))["rollout"]["status"] != "halted":
                    break
    seen: dict[str, str] = {}
    done_batches: dict[str, dict] = {}
    while True:
        t0 = time.monotonic()

        async def read() -> tuple[Any, Snapshot, dict[str, str]]:
            d = await handle.describe()
            sn, w = await snapshot(target, rid, waiting=progress is not None,
                                   cache=done_batches)
            return d, sn, w
        desc, snap, waits = await retrying(read)
        ended = desc.status != WorkflowExecutionStatus.RUNNING
        cost = time.monotonic() - t0
        if feed is not None:
            feed.update(snap)
        if progress is not None:
            for h in snap.hosts():
                key = waits.get(h.name) or h.state
                if seen.get(h.name) != key:
                    seen[h.name] = key
                    progress(h.name, h.state, waits.get(h.name) or (h.error or ""))
        if ended or snap.rollout().status == "halted":      # halted: paused, waiting
            return write_reports(snap, reports_dir), ended
        await asyncio.sleep(max(poll_s, 4 * cost))     # a large fleet is read less often


def print_progress(host: str, state: str, detail: str) -> None:
    """One line per host state change on stderr (the client's progress)."""
    print(f"  {host:<16} {state:<16} {detail}".rstrip(), file=sys.stderr)
