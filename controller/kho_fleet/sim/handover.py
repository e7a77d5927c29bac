"""`kho-fleet sim handover`: one full handover on a fresh twin host, through the real agent.

The agent runs as separate processes exactly as it would on a host (each step a
`python -m kho_agent <step> --json`, the holder its own daemon), against a digital-twin
kernel; this module only plays the controller's part: order, waiting for the boot,
and the verdict when the host never comes back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import kho_agent

from .faults import TWIN_FAULTS, Fault, check_placement, parse_fault
from .kernelimage import make_kernel_image
from .twinkernel import TwinError, TwinHandle, start_twin

__all__ = ["SimResult", "agent_env", "run_agent", "drive_handover", "run_sim_handover",
           "workload_spec", "check_sim_fault"]


@dataclass
class SimResult:
    """The handover report plus what the controller saw (step exit codes, timings)."""

    report: dict
    steps: list[dict] = field(default_factory=list)
    root: str = ""


def agent_env(twin_root: str) -> dict[str, str]:
    """Environment for agent processes acting on the twin host at `twin_root`."""
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(kho_agent.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in
                                        env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["KHO_AGENT_TWIN"] = twin_root
    return env


def run_agent(twin_root: str, step: str, *args: str, timeout: float = 300.0) -> dict:
    """Run one agent step; returns {"step", "rc", "json", "stderr", "seconds"}."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "kho_agent", step, "--json", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=agent_env(twin_root), stdin=subprocess.DEVNULL)
    try:
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
    except ValueError:
        out = None
    return {"step": step, "rc": proc.returncode, "json": out,
            "stderr": proc.stderr.strip(), "seconds": round(time.monotonic() - t0, 3)}


def workload_spec(workload_mib: int) -> dict:
    """Two sessions: a VM's RAM (3/4 of the budget, two memfds) and a cache (1/4)."""
    total = max(4, workload_mib) << 20
    vm, cache = total * 3 // 4, total // 4
    return {"sessions": [
        {"name": "vm-ram", "memfds": [{"token": 0x1001, "size": vm - vm // 4, "seed": 1},
                                      {"token": 0x1002, "size": vm // 4, "seed": 2}]},
        {"name": "cache", "memfds": [{"token": 0x2001, "size": cache, "seed": 3}]},
    ]}


def spec_sizes(spec: dict) -> dict[tuple[str, int], int]:
    """{(session, token): size} of a workload_spec() document."""
    return {(s["name"], int(m["token"])): int(m["size"])
            for s in spec["sessions"] for m in s["memfds"]}


def check_sim_fault(text: str, workload_mib: int, page_size: int = 4096) -> Fault:
    """The parsed fault for `kho-fleet sim handover --fault TEXT`; FaultError (one line) if
    it is unknown or names a place that is not in the sim's workloads."""
    f = parse_fault(text)
    check_placement(f, spec_sizes(workload_spec(workload_mib)), page_size,
                    where=f"the sim's workloads ({workload_mib} MiB)")
    return f


def run_sim_handover(workdir: str, *, fault: Union[str, Sequence[str], None] = None,
                     workload_mib: int = 64, boot_delay: float = 0.5,
                     boot_timeout: float = 30.0, page_size: int = 4096,
                     release: str = "7.2.13-twin", target_release: str = "7.2.14-twin",
                     kho: str = "kho-v4") -> SimResult:
    """Power on a fresh twin host under `workdir`, hand its workloads over to a new kernel,
    and return the agent's handover report (or the controller's verdict if it never returns).
    `fault`: one fault text or several (each as `--fault`), all injected together."""
    texts = [] if fault is None else [fault] if isinstance(fault, str) else list(fault)
    parsed = [check_sim_fault(t, workload_mib, page_size) for t in texts]
    root = os.path.abspath(os.path.join(workdir, "host"))
    os.makedirs(workdir, exist_ok=True)
    image = make_kernel_image(os.path.join(workdir, f"bzImage-{target_release}"), target_release,
                              kho="kho-v3" if "abi-mismatch-image" in texts else kho)
    spec_path = os.path.join(workdir, "workloads.json")
    with open(spec_path, "w") as f:
        json.dump(workload_spec(workload_mib), f)
    ram = max(256, workload_mib * 3 + 128)
    # kill-agent-before-finish: the agent retrieves its own journal memfd first: kill it
    # after the second RETRIEVE_FD, i.e. with the first workload retrieved but its session
    # not FINISHed
    faults = ["kill-agent-before-finish=2" if t == "kill-agent-before-finish" else t
              for t, p in zip(texts, parsed) if p.name in TWIN_FAULTS]
    res = SimResult(report={}, root=root)
    with start_twin(root, ram_mib=ram, page_size=page_size, release=release, kho=kho,
                    boot_delay=boot_delay, faults=faults) as twin:
        res.report = drive_handover(twin, image, spec_path, res, boot_timeout=boot_timeout)
    return res


def drive_handover(twin: TwinHandle, image: str, spec_path: str, res: SimResult, *,
                   boot_timeout: float = 30.0) -> dict:
    """Run every agent step on the (up) twin host; returns the final handover report."""
    root = twin.root
    boots = int(twin.state().get("boot_count", 1))
    plan: Sequence[tuple[str, tuple[str, ...]]] = (
        ("preflight", ("--kernel", image, "--spec", spec_path)),
        ("stage", ("--kernel", image)),
        ("preserve", ("--spec", spec_path)),
        ("snapshot", ()),
        ("kexec", ("--yes",)),
    )
    for step, args in plan:
        r = run_agent(root, step, *args)
        res.steps.append(r)
        if r["rc"] != 0:
            return _final_report(root, res)
    verdict = _wait_boot(twin, boot_timeout, boots + 1)
    if verdict is not None:
        rep = _final_report(root, res)
        rep.update(result="failed", failure={"phase": "boot", "reason": verdict})
        return rep
    res.steps.append(run_agent(root, "verify"))
    return _final_report(root, res)


def _wait_boot(twin: TwinHandle, timeout: float, boot_count: int) -> Optional[str]:
    """None once the new kernel (boot number `boot_count`) is up, else why not."""
    try:
        twin.wait_ready(timeout, boot_count=boot_count)
        return None
    except TwinError as e:
        return f"host did not come back within {timeout:.0f}s after kexec ({e})"


def _final_report(root: str, res: SimResult) -> dict[str, Any]:
    r = run_agent(root, "report")
    res.steps.append(r)
    if r["json"] is None:
        return {"schema": "kho-fleet/handover-report/v1", "result": "failed",
                "failure": {"phase": res.steps[-2]["step"] if len(res.steps) > 1 else "report",
                            "reason": r["stderr"] or "no report"}}
    return r["json"]
