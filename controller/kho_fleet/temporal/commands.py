"""The Temporal branches of `kho-fleet rollout | status | report | abort` and `kho-fleet worker`.

cli.py parses; these run. Output and exit codes are the embedded engine's: the same fleet
report on stdout with --json, the same summary otherwise, 0 only for a completed rollout
without failures.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from ..metrics import MetricsError, RolloutMetrics
from ..rollout import RolloutError, RolloutFinished, RolloutOptions
from . import client as tc

__all__ = ["target", "rollout", "status", "report", "abort", "worker"]


def target(args: argparse.Namespace) -> tc.TemporalTarget:
    t = tc.TemporalTarget(address=args.temporal_address, namespace=args.namespace)
    if getattr(args, "worker_wait", None) is not None:
        t.worker_wait_s = args.worker_wait
    return t


def rollout(args: argparse.Namespace, opts: RolloutOptions,
            summary: Callable[[dict, str], None]) -> int:
    """Start (or --resume: attach to) a rollout workflow and follow it to its end."""
    t = target(args)

    async def go() -> tuple[dict, bool, str]:
        if args.resume:
            rid = args.resume
        else:
            if not args.playbook or not args.inventory:
                raise RolloutError("rollout needs --playbook and --inventory (or --resume ID)")
            plan = tc.make_plan(args.playbook, args.inventory, opts, t)
            await t.client()                      # unreachable: one line, nothing started
            rid = await tc.start(plan, t)
        if not args.json:
            print(f"rollout {rid}: temporal workflow at {t.address} (namespace {t.namespace}); "
                  f"re-attach with kho-fleet rollout --resume {rid} --engine temporal",
                  file=sys.stderr, flush=True)
        info = await tc.meta(t, rid)
        metrics = RolloutMetrics(rid, str(info.get("name", "")), str(info.get("target", "")))
        server = None
        if args.metrics_port is not None:
            try:
                server = metrics.serve(args.metrics_port, args.metrics_addr)
            except (MetricsError, OSError) as e:
                raise RolloutError(f"--metrics-port {args.metrics_port}: {e} (the rollout goes "
                                   f"on: kho-fleet rollout --resume {rid} --engine "
                                   "temporal)") from None
        try:
            fleet, ended = await tc.attach(t, rid, opts.reports_dir, resume=bool(args.resume),
                                           progress=None if args.json else tc.print_progress,
                                           feed=tc.MetricsFeed(metrics))
            if args.pushgateway:
                try:
                    metrics.push(args.pushgateway)
                except MetricsError as e:
                    print(f"kho-fleet: warning: {e}", file=sys.stderr)
        finally:
            if server is not None:
                server.shutdown()
        return fleet, ended, rid
    if args.metrics_port is not None:
        from ..cli import _check_listen
        _check_listen(args.metrics_addr, args.metrics_port)
    try:
        fleet, _, rid = tc.run(go())
    except RolloutFinished as e:
        print(json.dumps({"id": args.resume, "finished": True, "message": str(e)})
              if args.json else f"kho-fleet: {e}")
        return 0
    if args.json:
        json.dump(fleet, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        import os
        summary(fleet, os.path.join(opts.reports_dir, rid))
    return 0 if fleet["rollout"]["status"] == "completed" and not fleet.get("failures") else 1


def _rid(args: argparse.Namespace, t: tc.TemporalTarget) -> str:
    return args.id if args.id else tc.run(tc.newest(t))


def status(args: argparse.Namespace, show: Callable[..., int]) -> int:
    """`status` of a rollout workflow: the embedded engine's output, plus hosts waiting for a
    worker of their site."""
    t = target(args)

    async def go() -> Any:
        rid = args.id or await tc.newest(t)
        return await tc.snapshot(t, rid, waiting=True)
    snap, waits = tc.run(go())
    return show(snap, args, waits)


def report(args: argparse.Namespace, summary: Callable[[dict, str], None]) -> int:
    """(Re)write the rollout workflow's fleet report and host reports."""
    import os
    t = target(args)

    async def go() -> Any:
        rid = args.id or await tc.newest(t)
        snap, _ = await tc.snapshot(t, rid)
        return snap
    snap = tc.run(go())
    fleet = tc.write_reports(snap, args.reports_dir)
    if args.json:
        json.dump(fleet, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        summary(fleet, os.path.join(args.reports_dir, snap.rollout().id))
    return 0


def abort(args: argparse.Namespace) -> int:
    """Signal the rollout workflow to abort: no host is kexec'd after it; hosts past it finish."""
    t = target(args)

    async def go() -> str:
        rid = args.id or await tc.newest(t)
        await tc.abort(t, rid, args.reason or "aborted by operator")
        return rid
    rid = tc.run(go())
    print(json.dumps({"id": rid, "status": "aborted"}) if args.json
          else f"rollout {rid}: aborted")
    return 0


def worker(args: argparse.Namespace) -> int:
    """Run a site's worker until SIGTERM/SIGINT."""
    from .worker import run_worker
    tc.run(run_worker(target(args), args.site, args.work_dir,
                      max_concurrent=args.max_concurrent))
    return 0
