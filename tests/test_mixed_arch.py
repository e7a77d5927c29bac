"""Mixed-architecture fleets through the real `kho-fleet` CLI, on twin hosts.

A playbook names one kernel per architecture (`target.kernels`); each host gets the kernel of
its inventory `kho_arch`, a compressed arm64 image (Image.gz, EFI zboot vmlinuz) arrives on the
host as the raw Image that arm64 kexec_file_load takes (the playbook pins the file it names,
the agent checks the unpacked file's sha256), and a host whose architecture has no kernel, or
whose kernel is for another architecture or page size, is refused with one line before any
rollout state exists. The kernel images are the twin's (kho_fleet.sim.kernelimage), whose
headers kho_agent.kimage reads as it reads real ones.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kho_fleet.playbook import PlaybookError, load_playbook
from kho_fleet.sim.kernelimage import make_kernel_image

WORKLOADS = {"sessions": [{"name": "vm-ram", "memfds": [{"token": 0x1001, "size": "1MiB",
                                                          "seed": 7}]}]}
X86, ARM = "7.2.14-x86", "7.2.14-arm"


def sha(path: Any) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def inventory(tmp: Path, hosts: dict[str, Any]) -> Path:
    base = {"kho_transport": "sim", "kho_boot_timeout": 20, "kho_sim_boot_delay": 0.1,
            "kho_sim_ram_mib": 64}
    p = tmp / "inventory.yaml"
    p.write_text(yaml.safe_dump({"all": {"vars": base, "hosts": hosts}}))
    return p


def playbook(tmp: Path, target: dict) -> Path:
    doc = {"name": "mixed", "hosts": "all", "target": target, "workloads": WORKLOADS,
           "stages": [{"name": "all", "hosts": "rest", "max_parallel": 4}],
           "timeouts": {"ssh_s": 15, "boot_s": 20, "verify_s": 60}}
    p = tmp / "playbook.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kho_fleet.cli", *args,
                           "--rollouts-dir", str(tmp / "rollouts"),
                           "--reports-dir", str(tmp / "reports"), "--sim-dir", str(tmp / "sim")],
                          capture_output=True, text=True, timeout=300, cwd=tmp)


def rollout(tmp: Path, pb: Path, inv: Path) -> subprocess.CompletedProcess:
    return cli(tmp, "rollout", "--playbook", str(pb), "--inventory", str(inv), "--json")


def refused(p: subprocess.CompletedProcess, tmp: Path, *needles: str) -> str:
    """The run exited 2 with one line on stderr holding every needle, and left no rollout."""
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    assert not (tmp / "rollouts").exists() or not os.listdir(tmp / "rollouts")
    return err


def images(tmp: Path, arm_fmt: str, page_size: int = 4096) -> tuple[Path, Path, Path]:
    """(x86 bzImage, arm64 image in `arm_fmt`, the raw arm64 Image it holds)."""
    bz = Path(make_kernel_image(str(tmp / "bzImage"), X86, fmt="bzImage", x86_64=True))
    raw = Path(make_kernel_image(str(tmp / "Image.raw"), ARM, fmt="Image", page_size=page_size))
    arm = Path(make_kernel_image(str(tmp / f"arm.{arm_fmt}"), ARM, fmt=arm_fmt,
                                 page_size=page_size))
    return bz, arm, raw


@pytest.mark.parametrize("arm_fmt", ["Image.gz", "zboot", "Image"])
def test_mixed_fleet_stages_each_host_its_architecture_s_kernel(sim: Path, arm_fmt: str) -> None:
    bz, arm, raw = images(sim, arm_fmt)
    inv = inventory(sim, {"x1": None, "a1": {"kho_arch": "arm64"}, "x2": None,
                          "a2": {"kho_arch": "aarch64"}})
    pb = playbook(sim, {"kernels": {"x86_64": {"path": str(bz), "sha256": sha(bz)},
                                    "arm64": {"path": arm.name, "sha256": sha(arm)}}})
    p = rollout(sim, pb, inv)
    assert p.returncode == 0, p.stderr
    fleet = json.loads(p.stdout)
    assert fleet["rollout"]["status"] == "completed" and not fleet["failures"]
    arch = {h["name"]: h["arch"] for h in fleet["hosts"]}
    assert arch == {"x1": "x86_64", "x2": "x86_64", "a1": "arm64", "a2": "arm64"}
    rid = fleet["rollout"]["id"]
    md = (sim / "reports" / rid / "fleet.md").read_text()
    assert "| arch |" in md and "| arm64 |" in md and "| x86_64 |" in md
    for name, h in {h["name"]: h for h in fleet["hosts"]}.items():
        rep = json.loads((sim / "reports" / rid / "hosts" / f"{name}.json").read_text())["agent"]
        to = rep["kernel"]["to"]
        want_release, want_sha = (ARM, sha(raw)) if name.startswith("a") else (X86, sha(bz))
        assert h["kernel"]["to"] == want_release and to["sha256"] == want_sha, (name, to)
        staged = Path(to["image"]).read_bytes()       # what the host loaded (a sim host: here)
        assert hashlib.sha256(staged).hexdigest() == want_sha
        if name.startswith("a"):
            assert staged[0x38:0x3C] == b"ARM\x64"    # the raw Image kexec_file_load takes
        assert all(w["verified"] for w in rep["workloads"])
    manifest = json.loads((sim / "rollouts" / rid / "artifacts" / "kernels.json").read_text())
    assert manifest["arm64"]["source_sha256"] == sha(arm)
    assert manifest["arm64"]["sha256"] == sha(raw)
    assert manifest["arm64"]["unpacked_from"] == {"Image.gz": "compressed", "zboot": "EFI zboot",
                                                  "Image": None}[arm_fmt]


def test_twin_kernels_per_architecture(sim: Path) -> None:
    inv = inventory(sim, {"x1": None, "a1": {"kho_arch": "arm64", "kho_page_size": 16384}})
    pb = playbook(sim, {"kernels": {"x86_64": {"path": "twin:7.2.14-twin"},
                                    "arm64": {"path": "twin:7.2.14-twin-arm"}}})
    p = rollout(sim, pb, inv)
    assert p.returncode == 0, p.stderr
    fleet = json.loads(p.stdout)
    to = {h["name"]: h["kernel"]["to"] for h in fleet["hosts"]}
    assert to == {"x1": "7.2.14-twin", "a1": "7.2.14-twin-arm"}
    art = sim / "rollouts" / fleet["rollout"]["id"] / "artifacts"
    assert (art / "Image-7.2.14-twin-arm").read_bytes()[0x38:0x3C] == b"ARM\x64"


def test_host_whose_architecture_has_no_kernel_is_refused(sim: Path) -> None:
    bz, _, _ = images(sim, "Image")
    inv = inventory(sim, {"x1": None, "arm-7": {"kho_arch": "arm64"}})
    pb = playbook(sim, {"kernels": {"x86_64": {"path": str(bz), "sha256": sha(bz)}}})
    err = refused(rollout(sim, pb, inv), sim, "host 'arm-7'", "kho_arch: arm64",
                  "no arm64 kernel", "target.kernels")
    assert err.startswith(f"kho-fleet: error: {pb}:")
    # a play that leaves the arm64 host out is fine (dry run: preflight only)
    doc = yaml.safe_load(pb.read_text())
    doc["hosts"] = "x1"
    pb.write_text(yaml.safe_dump(doc))
    p = cli(sim, "rollout", "--playbook", str(pb), "--inventory", str(inv), "--json",
            "--dry-run")
    assert p.returncode == 0, p.stderr


def test_single_kernel_for_another_architecture_is_refused(sim: Path) -> None:
    bz, _, _ = images(sim, "Image")
    inv = inventory(sim, {"x1": None, "a1": {"kho_arch": "arm64"}})
    pb = playbook(sim, {"kernel": str(bz), "sha256": sha(bz)})
    refused(rollout(sim, pb, inv), sim, "target.kernel:", "x86_64 kernel", "host 'a1'",
            "kho_arch: arm64")


def test_image_under_the_wrong_architecture_key_is_refused(sim: Path) -> None:
    bz, arm, _ = images(sim, "Image.gz")
    inv = inventory(sim, {"a1": {"kho_arch": "arm64"}})
    pb = playbook(sim, {"kernels": {"arm64": {"path": str(bz), "sha256": sha(bz)}}})
    refused(rollout(sim, pb, inv), sim, "target.kernels.arm64.path", "x86_64 kernel",
            "not arm64")


def test_page_size_of_the_image_must_be_the_host_s(sim: Path) -> None:
    _, arm, _ = images(sim, "zboot", page_size=16384)
    inv = inventory(sim, {"a1": {"kho_arch": "arm64"}})                 # 4096 by default
    pb = playbook(sim, {"kernels": {"arm64": {"path": str(arm), "sha256": sha(arm)}}})
    refused(rollout(sim, pb, inv), sim, "16384-byte pages", "host 'a1'", "kho_page_size: 4096")


def test_pin_is_of_the_file_the_playbook_names(sim: Path) -> None:
    _, arm, raw = images(sim, "Image.gz")
    inv = inventory(sim, {"a1": {"kho_arch": "arm64"}})
    pb = playbook(sim, {"kernels": {"arm64": {"path": str(arm), "sha256": sha(raw)}}})
    refused(rollout(sim, pb, inv), sim, "target.kernels.arm64.sha256", f"has sha256 {sha(arm)}")


def test_corrupt_compressed_image_is_refused(sim: Path) -> None:
    _, arm, _ = images(sim, "Image.gz")
    data = arm.read_bytes()
    arm.write_bytes(data[: len(data) // 2])                           # truncated gzip
    inv = inventory(sim, {"a1": {"kho_arch": "arm64"}})
    pb = playbook(sim, {"kernels": {"arm64": {"path": str(arm), "sha256": sha(arm)}}})
    refused(rollout(sim, pb, inv), sim, "target.kernels.arm64.path", str(arm),
            "did not decompress")
    not_arm = sim / "vmlinux.gz"                                      # gzip, but not an Image
    not_arm.write_bytes(gzip.compress(b"\0" * 4096 + b"Linux version 7.2.14 (x) #1 SMP\n"))
    pb = playbook(sim, {"kernels": {"arm64": {"path": str(not_arm), "sha256": sha(not_arm)}}})
    refused(rollout(sim, pb, inv), sim, "target.kernels.arm64.path", "not an arm64 Image")


@pytest.mark.parametrize("target,needle", [
    ({"kernel": "twin:7.2.14", "kernels": {"arm64": {"path": "twin:7.2.14"}}},
     "target.kernel: give it inside each target.kernels entry"),
    ({"kernels": {"sparc": {"path": "twin:7.2.14"}}}, "target.kernels.sparc: unknown architecture"),
    ({"kernels": {"arm64": {"sha256": "0" * 64}}}, "target.kernels.arm64.path: required"),
    ({"kernels": {"arm64": {"path": "Image"}}}, "target.kernels.arm64.sha256: required"),
    ({"kernels": {"arm64": {"path": "twin:7.2", "kernel": "x"}}},
     "target.kernels.arm64.kernel: unknown key"),
    ({"kernels": {"arm64": {"path": "twin:7.2"}, "aarch64": {"path": "twin:7.2"}}},
     "arm64 is named twice"),
    ({"kernels": []}, "target.kernels: must be a mapping of architectures"),
])
def test_playbook_kernels_errors_name_the_field(tmp_path: Path, target: dict, needle: str) -> None:
    pb = playbook(tmp_path, target)
    with pytest.raises(PlaybookError) as e:
        load_playbook(str(pb))
    assert needle in str(e.value) and str(e.value).startswith(f"{pb}:"), str(e.value)


def test_playbook_kernels_form(tmp_path: Path) -> None:
    pb = load_playbook(str(playbook(tmp_path, {
        "cmdline": "console=ttyAMA0", "kernels": {
            "amd64": {"path": "bz", "sha256": "a" * 64},
            "aarch64": {"path": "Image.gz", "sha256": "B" * 64, "cmdline": "reuse"}}})))
    assert list(pb.kernels) == ["x86_64", "arm64"] and pb.target is pb.kernels["x86_64"]
    x, a = pb.target_for("x86_64"), pb.target_for("arm64")
    assert x is not None and a is not None
    assert (x.kernel, x.cmdline, x.arch) == (str(tmp_path / "bz"), "console=ttyAMA0", "x86_64")
    assert (a.sha256, a.cmdline, a.field_name("sha256")) == ("b" * 64, None,
                                                              "target.kernels.arm64.sha256")
    single = load_playbook(str(playbook(tmp_path, {"kernel": "twin:7.2.14"})))
    assert single.kernels == {} and single.target_for("arm64") is single.target
