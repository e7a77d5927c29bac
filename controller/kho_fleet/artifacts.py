"""What a rollout pushes to every host, built once per rollout in its state directory:
the agent zipapp, the target kernel (and initrd) and the workload spec.

A playbook's kernel is a file, or `twin:RELEASE`, which names an image the digital twin
generates; resolving that here keeps the engines free of any host or kernel kind. A playbook
may name one kernel per architecture (`target.kernels`): each becomes its own KernelFile, and
a compressed arm64 image is unpacked to the raw Image kexec_file_load takes (rawkernel.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from kho_agent.atomicfile import atomic_write

from .agentbuild import build_agent
from .playbook import Playbook, Target
from .rawkernel import KernelFile, unpack_kernel

__all__ = ["Artifacts", "KernelFile", "build_artifacts"]


@dataclass(frozen=True)
class Artifacts:
    """Local paths of the files pushed to hosts. `kernels` holds one KernelFile per
    architecture ("*": the playbook's single `kernel:`, for every host); `kernel` is the
    first one's path."""

    agent: str
    kernel: str
    spec: str
    initrd: Optional[str] = None
    kernels: dict[str, KernelFile] = field(default_factory=dict)

    def kernel_for(self, arch: str) -> Optional[KernelFile]:
        """The kernel file for a host of `arch` (None: the playbook names none)."""
        return self.kernels.get(arch) or self.kernels.get("*")


def _kernel(t: Target, art_dir: str) -> KernelFile:
    if t.is_twin:
        from .sim.kernelimage import make_kernel_image
        arm = t.arch == "arm64"
        name = f"{'Image' if arm else 'bzImage'}-{t.twin_release}"
        path = make_kernel_image(os.path.join(art_dir, name), t.twin_release or "",
                                 fmt="Image" if arm else "bzImage")
        return KernelFile(path, None, t.kernel, None)
    return unpack_kernel(t.kernel, t.sha256, os.path.join(art_dir, "kernels"),
                         f"{t.where.get('kernel', t.kernel)}: {t.field_name('kernel')}")


def build_artifacts(pb: Playbook, art_dir: str) -> Artifacts:
    """Build (or rebuild, identically) the rollout's artifacts under `art_dir`."""
    os.makedirs(art_dir, exist_ok=True)
    spec = os.path.join(art_dir, "workloads.json")
    atomic_write(spec, json.dumps(pb.workloads.to_json(), indent=1).encode())
    kernels = {t.arch or "*": _kernel(t, art_dir) for t in pb.targets()}
    atomic_write(os.path.join(art_dir, "kernels.json"),
                 json.dumps({k: v.to_json() for k, v in kernels.items()}, indent=1).encode())
    return Artifacts(agent=build_agent(os.path.join(art_dir, "kho-agent.pyz"))[0],
                     kernel=next(iter(kernels.values())).path, spec=spec,
                     initrd=pb.target.initrd, kernels=kernels)
