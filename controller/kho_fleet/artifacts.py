"""What a rollout pushes to every host, built once per rollout in its state directory:
the agent zipapp, the target kernel (and initrd) and the workload spec.

A playbook's kernel is a file, or `twin:RELEASE`, which names an image the digital twin
generates; resolving that here keeps the engines free of any host or kernel kind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from kho_agent.atomicfile import atomic_write

from .agentbuild import build_agent
from .playbook import Playbook

__all__ = ["Artifacts", "build_artifacts"]


@dataclass(frozen=True)
class Artifacts:
    """Local paths of the files pushed to hosts."""

    agent: str
    kernel: str
    spec: str
    initrd: Optional[str] = None


def _kernel(pb: Playbook, art_dir: str) -> str:
    t = pb.target
    if t.is_twin:
        from .sim.kernelimage import make_kernel_image
        return make_kernel_image(os.path.join(art_dir, f"bzImage-{t.twin_release}"),
                                 t.twin_release or "")
    return t.kernel


def build_artifacts(pb: Playbook, art_dir: str) -> Artifacts:
    """Build (or rebuild, identically) the rollout's artifacts under `art_dir`."""
    os.makedirs(art_dir, exist_ok=True)
    spec = os.path.join(art_dir, "workloads.json")
    atomic_write(spec, json.dumps(pb.workloads.to_json(), indent=1).encode())
    return Artifacts(agent=build_agent(os.path.join(art_dir, "kho-agent.pyz"))[0],
                     kernel=_kernel(pb, art_dir), spec=spec, initrd=pb.target.initrd)
