"""`kho-fleet worker --site NAME`: the process that runs a site's host steps.

It polls the site's task queue (kho-fleet-<site>) for host-step activities and, unless told
otherwise, the workflows' queue (kho-fleet-workflows) for workflow tasks: any worker can
advance a rollout's workflow, only a worker of its site touches a host. SIGTERM or SIGINT
stops it gracefully; a SIGKILLed worker's steps run again on another worker of the site once
its heartbeats stop (never the kexec).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from typing import Any, Optional

from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from .activities import HostStepActivities
from .client import TemporalTarget
from .state import WORKFLOW_QUEUE, site_queue
from .workflow import HostBatchWorkflow, RolloutWorkflow

__all__ = ["run_worker"]


async def run_worker(target: TemporalTarget, site: str, work_dir: str, *,
                     max_concurrent: int = 64, workflows: bool = True,
                     sandboxed: bool = False, stop: Optional[asyncio.Event] = None) -> None:
    """Run until SIGTERM/SIGINT (or `stop` is set).

    Workflow code runs without the SDK's sandbox unless `sandboxed`: the sandbox re-creates
    the workflow's modules for each workflow and runs every activation through restricted
    proxies, which was a third of the worker's CPU per host (docs/scale.md). It guards against
    non-deterministic workflow code; ours (workflow.py and the pure modules it imports:
    lifecycle, state, rollout.judge_gate) does no I/O, reads time only from workflow.now()
    and runs every host-touching act as an activity."""
    client = await target.client()
    acts = HostStepActivities(site, work_dir, threads=max_concurrent)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    workers = [Worker(client, task_queue=site_queue(site), activities=[acts.host_phase],
                      max_concurrent_activities=max_concurrent)]
    if workflows:
        extra: dict[str, Any] = {} if sandboxed else {
            "workflow_runner": UnsandboxedWorkflowRunner()}
        workers.append(Worker(client, task_queue=WORKFLOW_QUEUE,
                              workflows=[RolloutWorkflow, HostBatchWorkflow], **extra))
    try:
        async with contextlib.AsyncExitStack() as stack:
            for w in workers:
                await stack.enter_async_context(w)
            print(f"kho-fleet worker: site {site}: polling {site_queue(site)}"
                  + (f" and {WORKFLOW_QUEUE}" if workflows else "")
                  + f" at {target.address} (namespace {target.namespace})",
                  file=sys.stderr, flush=True)
            await stop.wait()
    finally:
        acts.close()
    print(f"kho-fleet worker: site {site}: stopped", file=sys.stderr, flush=True)
