"""arm64 on the real-kernel lab: one arm64 guest (qemu-system-aarch64 -M virt -cpu max, TCG)
and one x86 guest in ONE rollout whose playbook names a kernel per architecture.

Skipped, with the reason, when qemu-system-aarch64, the shared kernels or the arm64 root
filesystem are absent. The arm64 root filesystem is not built here: its debootstrap second
stage runs inside a first guest boot (~17 min under TCG), so build it once with
`kho-fleet lab build-rootfs --arch arm64 --kernel ../shared/lab/arm64/Image-7.2.13-kho`
(the same --cache as KHO_LAB_CACHE). Guests are shared by the module and always put down.

- a) the mixed rollout: the x86 guest 7.2.13 -> 7.2.13-lab-b, the arm64 guest 7.2.13 ->
  7.2.13 (the only arm64 image prebuilt: a live update into the same kernel); workloads
  verified byte- and page-identical on both, kexec-metadata "7.2.13, count 1" on both, the
  fleet report's arch column;
- b) the arm64 ABI-mismatch image (`Image-7.2.13-abi-kho-v3`, not prebuilt: ~23 min to build)
  refused at preflight -- skipped with the reason while it is absent;
- c) `kho-fleet lab dump` of the arm64 guest (ELF EM_AARCH64) and `kho-fleet inspect --memory`
  of it: finds the KHO FDT with the guest's 4 KiB pages.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from labsupport import (
    KERNEL_A,
    KERNEL_B,
    LAB_CACHE,
    SHARED_LAB,
    kho_fleet_cli,
    lab_guest_skip_reason,
    rootfs_skip_reason,
)

from kho_agent.digest import sha256_file

ARM = SHARED_LAB / "arm64/Image-7.2.13-kho"
ARM_V3 = SHARED_LAB / "arm64/Image-7.2.13-abi-kho-v3"
X86, A64 = "lab-1", "lab-arm64-1"
WORKLOADS = {"sessions": [{"name": "vm-ram", "memfds": [{"token": 0x1001, "size": "16MiB",
                                                          "seed": 11}]},
                          {"name": "cache", "memfds": [{"token": 0x2001, "size": "4MiB",
                                                         "seed": 12}]}]}
FIGURES: dict[str, Any] = {}


def arm64_rootfs_skip_reason() -> str:
    """Why the arm64 guests cannot run here ("" if they can)."""
    from kho_fleet.lab.guest import lab_key
    from kho_fleet.lab.rootfs import cached_rootfs
    if shutil.which("qemu-system-aarch64") is None:
        return "qemu-system-aarch64 not found (Debian package qemu-system-arm)"
    if not ARM.is_file():
        return f"arm64 lab kernel not found: {ARM}"
    if cached_rootfs(LAB_CACHE, ARM, lab_key(LAB_CACHE).public, arch="arm64") is None:
        return (f"no cached arm64 rootfs in {LAB_CACHE}: build it once with `kho-fleet lab "
                f"build-rootfs --arch arm64 --kernel {ARM} --cache {LAB_CACHE}` (~17 min: "
                "the debootstrap second stage runs in an arm64 guest under TCG)")
    return ""


def cli(*args: Any, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return kho_fleet_cli(*args, timeout=timeout)


@dataclass
class Lab:
    work: Path
    inventory: Path
    seen: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """`lab up 1` (x86) and `lab up 1 --arch arm64`, one inventory; both put down at the end."""
    why = (lab_guest_skip_reason([KERNEL_A, KERNEL_B]) or arm64_rootfs_skip_reason()
           or rootfs_skip_reason(LAB_CACHE, KERNEL_A, [KERNEL_B]))
    if why:
        print(f"\nlab arm64 skipped: {why}")
        pytest.skip(why)
    work = tmp_path_factory.mktemp("lab-arm64")
    ups = {"x86": ("--kernel", KERNEL_A, "--extra-kernel", KERNEL_B),
           "arm64": ("--arch", "arm64", "--kernel", ARM)}
    hosts: dict[str, Any] = {}
    try:
        for name, extra in ups.items():           # one at a time: 2 shared cores
            t0 = time.monotonic()
            p = cli("lab", "up", "1", *extra, "--workdir", work / name, "--inventory",
                    work / f"{name}.yaml", "--cache", LAB_CACHE, "--boot-timeout", 600, "--json")
            assert p.returncode == 0, p.stderr
            FIGURES[f"lab_up_{name}_s"] = round(time.monotonic() - t0, 1)
            inv = yaml.safe_load((work / f"{name}.yaml").read_text())
            hosts.update(inv["all"]["hosts"])
        mixed = work / "mixed.yaml"
        mixed.write_text(yaml.safe_dump({"all": {"hosts": hosts}}, sort_keys=False))
        yield Lab(work, mixed)
    finally:
        for name in ups:
            if (work / name).exists():
                d = cli("lab", "down", "--workdir", work / name, "--json", timeout=120)
                print(f"\nlab down {name}: rc {d.returncode}")
        print("lab arm64 figures: " + json.dumps(FIGURES, indent=1))


def playbook(lab: Lab, name: str, kernels: dict[str, Path]) -> Path:
    doc = {"name": f"lab arm64 {name}", "hosts": "all",
           "target": {"kernels": {arch: {"path": str(k), "sha256": sha256_file(str(k))}
                                  for arch, k in kernels.items()}},
           "workloads": WORKLOADS,
           "stages": [{"name": "all", "max_parallel": 2}],
           "timeouts": {"ssh_s": 60, "boot_s": 540, "verify_s": 300}}
    p = lab.work / f"playbook-{name}.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def rollout(lab: Lab, pb: Path) -> tuple[subprocess.CompletedProcess, dict]:
    t0 = time.monotonic()
    p = cli("rollout", "--playbook", pb, "--inventory", lab.inventory, "--json",
            "--rollouts-dir", lab.work / "rollouts", "--reports-dir", lab.work / "reports",
            timeout=3600)
    FIGURES.setdefault("rollout_s", {})[pb.stem] = round(time.monotonic() - t0, 1)
    return p, (json.loads(p.stdout) if p.stdout.strip().startswith("{") else {})


def test_a_mixed_rollout_x86_and_arm64(lab: Lab) -> None:
    p, fleet = rollout(lab, playbook(lab, "mixed", {"x86_64": KERNEL_B, "arm64": ARM}))
    assert fleet, p.stderr
    assert {h["name"]: h["arch"] for h in fleet["hosts"]} == {X86: "x86_64", A64: "arm64"}
    rid = fleet["rollout"]["id"]
    for host, to in ((X86, "7.2.13-lab-b"), (A64, "7.2.13")):
        rep = json.loads((lab.work / "reports" / rid / "hosts" / f"{host}.json").read_text())
        a = rep["agent"]
        assert a["result"] == "success", (host, a.get("failure"))
        assert a["kernel"]["to"]["release"] == to
        assert a["kexec_metadata"]["previous_release"] == "7.2.13"
        assert a["kexec_metadata"]["kexec_count"] == 1
        for w in a["workloads"]:
            assert w["verified"] and w["pfns_identical"], (host, w)
            assert w["sha256_after"] == w["sha256_before"], (host, w)
        FIGURES[host] = {"controller_downtime_s": rep["controller"]["downtime_s"],
                         "agent_downtime": a["downtime"]}
    assert p.returncode == 0, p.stderr
    lab.seen["mixed"] = True


def test_b_arm64_abi_mismatch_refused_at_preflight(lab: Lab) -> None:
    if not ARM_V3.is_file():
        pytest.skip(f"{ARM_V3} not found: the arm64 kho-v3 image is not prebuilt (`kho-fleet "
                    "lab build-kernel --arch arm64 --source ...` with KHO_FDT_COMPATIBLE "
                    "kho-v3, ~23 min with gcc-aarch64-linux-gnu)")
    p, fleet = rollout(lab, playbook(lab, "abi", {"x86_64": KERNEL_A, "arm64": ARM_V3}))
    fails = {f["host"]: f for f in fleet["failures"]}
    assert fails[A64]["phase"] == "preflight" and "kho-v3" in fails[A64]["reason"]


def test_c_arm64_dump_inspects_with_4k_pages(lab: Lab) -> None:
    core = lab.work / "arm64.core"
    p = cli("lab", "dump", A64, "--out", core, "--workdir", lab.work / "arm64", "--json")
    assert p.returncode == 0, p.stderr
    head = core.read_bytes()[:64]
    assert head[:4] == b"\x7fELF" and struct.unpack_from("<H", head, 18)[0] == 183  # EM_AARCH64
    t0 = time.monotonic()
    p = cli("inspect", "--memory", core, "--page-size", "4096", "--json")
    FIGURES["inspect_arm64_s"] = round(time.monotonic() - t0, 1)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert "kho-v4" in json.dumps(out)
    os.unlink(core)
