"""A real version upgrade onto a production-like kernel, and back (issue 12).

`kho-fleet lab up 1` boots one QEMU guest (TCG) on the lab's 7.2.13 kernel with the
7.3.4-prod kernel in /boot (../shared/lab/kho-prod.config: STRICT_DEVMEM, no KHO debugfs,
no test producers), once for the module; the tests run in file order on it:
  a) 7.2.13 -> 7.3.4-prod, two memfd workloads (64 MiB + 8 MiB, two LUO sessions): bytes
     and PFNs identical, kexec-metadata previous_release "7.2.13" count 1, the incoming FDT
     found through setup_data (the prod kernel has no kho/in/fdt);
  b) 7.3.4-prod -> 7.2.13: the snapshot must come from /proc/kcore (/dev/mem refuses RAM
     there), the incoming FDT from setup_data, and the report names both; preflight's
     capabilities say so too. `kho-fleet lab dump` of the prod guest taken between
     snapshot and kexec, read by `kho-fleet inspect`, agrees with the agent's snapshot.
The prod kernel is looked for in ../shared/lab first, then the lab's kernel store
(`kho-fleet lab build-kernel --kernel bzImage-7.3.4-prod --keep-default` records it);
without it the module skips with the reason. Figures are printed (-s); docs/lab.md keeps them.

The `build-kernel --fragment` tests at the end need no guest: argument handling, the make
steps, and (when linux-source-7.3 is unpacked here) a real configure-only run of the prod
fragment into a scratch build directory -- seconds, not the 20+ min of bzImage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml
from labsupport import (
    KERNEL_A,
    REPO,
    SHARED_LAB,
    Coverage,
    kho_fleet_cli,
    lab_guest_skip_reason,
    rootfs_skip_reason,
)
from labsupport import LAB_CACHE as CACHE

from kho_agent.digest import sha256_file
from kho_fleet.lab.fleet import LabFleet
from kho_fleet.lab.kbuild import build_steps, find_kernel
from kho_fleet.rollout import Rollout, RolloutOptions

PROD_RELEASE = "7.3.4-prod"
PROD_SHA = "e2cb938d282ff2c0ec45e469822b201a61df70b9378403dc9b762b3b1dfc5019"
SHA_A = "98571422ee7ff2d57d4c209de471e3e5c0d74670dfc43b1722a98d04967b9c85"
PROD_FRAGMENT = SHARED_LAB / "kho-prod.config"
LINUX_73 = Path(os.environ.get("KHO_LINUX_73", REPO.parent / "src/linux-source-7.3"))
STATE_DIR = "/var/lib/kho-agent/state"
WORKLOADS = {"sessions": [
    {"name": "vm-ram", "memfds": [{"token": 0x1001, "size": "64MiB", "seed": 1}]},
    {"name": "cache", "memfds": [{"token": 0x2001, "size": "8MiB", "seed": 2}]}]}
WORKLOAD_PAGES = (72 << 20) // 4096
FIGURES: dict[str, Any] = {}


def prod_kernel() -> Optional[Path]:
    """../shared/lab/bzImage-7.3.4-prod, else the one recorded in the lab's kernel store."""
    shared = SHARED_LAB / f"bzImage-{PROD_RELEASE}"
    if shared.is_file():
        return shared
    return find_kernel(REPO / ".lab/kernels", PROD_RELEASE)


def cli(*args: Any, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return kho_fleet_cli(*args, timeout=timeout)


@dataclass
class Lab:
    work: Path
    inventory: Path
    fleet: LabFleet
    prod: Path
    seen: dict[str, Any] = field(default_factory=dict)

    def ssh(self, cmd: str, timeout: float = 60.0) -> str:
        g = self.fleet.guest(self.fleet.record("lab-1"))
        try:
            return g.run(cmd, timeout=timeout, check=True)[1]
        finally:
            g.stop()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    prod = prod_kernel()
    if prod is None:
        why = (f"7.3.4-prod kernel not found: neither {SHARED_LAB}/bzImage-{PROD_RELEASE} nor "
               f"one recorded in {REPO}/.lab/kernels (build it: kho-fleet lab build-kernel "
               f"--source linux-source-7.3 --fragment {PROD_FRAGMENT} --keep-default)")
    else:
        why = (lab_guest_skip_reason([KERNEL_A, prod])
               or rootfs_skip_reason(CACHE, KERNEL_A, [prod]))
    if why:
        print(f"\nlab prod skipped: {why}")
        pytest.skip(why)
    assert prod is not None
    assert sha256_file(str(prod)) == PROD_SHA, f"{prod}: not the 7.3.4-prod kernel of the docs"
    work = tmp_path_factory.mktemp("lab-prod")
    FIGURES["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
    FIGURES["loadavg_1m"] = {"start": os.getloadavg()[0]}
    guests, inv = work / "guests", work / "lab.yaml"
    t0 = time.monotonic()
    proc = cli("lab", "up", "1", "--kernel", KERNEL_A, "--extra-kernel", prod,
               "--workdir", guests, "--inventory", inv, "--cache", CACHE, "--json")
    try:
        assert proc.returncode == 0, proc.stderr
        up = json.loads(proc.stdout)
        FIGURES["boot_to_ssh_s"] = round(up["guests"][0]["boot_s"], 1)
        FIGURES["lab_up_s"] = round(time.monotonic() - t0, 1)
        yield Lab(work, inv, LabFleet(guests), prod)
    finally:
        FIGURES["loadavg_1m"]["end"] = os.getloadavg()[0]
        down = cli("lab", "down", "--workdir", guests, "--json", timeout=120)
        print(f"\nlab down: rc {down.returncode}")
        print("lab prod figures: " + json.dumps(FIGURES, indent=1))


def need(lab: Lab, key: str) -> Any:
    if key not in lab.seen:
        pytest.skip(f"needs an earlier step ({key}) that did not pass")
    return lab.seen[key]


def run_rollout(lab: Lab, name: str, target: Path, sha: str, progress: Any = None
                ) -> tuple[dict, dict]:
    """One rollout of `target` (sha256-pinned) on lab-1; (fleet report, host report)."""
    doc = {"name": f"lab prod {name}", "hosts": "all",
           "target": {"kernel": str(target), "sha256": sha, "cmdline": "reuse"},
           "workloads": WORKLOADS,
           "stages": [{"name": "all", "gate": {"all_workloads_verified": True}}],
           "on_failure": "halt", "timeouts": {"ssh_s": 30, "boot_s": 240, "verify_s": 240}}
    pb = lab.work / f"playbook-{name}.yaml"
    pb.write_text(yaml.safe_dump(doc, sort_keys=False))
    opts = RolloutOptions(rollouts_dir=str(lab.work / "rollouts"),
                          reports_dir=str(lab.work / "reports"), sim_dir=str(lab.work / "sim"),
                          progress=progress)
    t0 = time.monotonic()
    ro = Rollout.start(str(pb), str(lab.inventory), opts)
    fleet = ro.run()
    FIGURES.setdefault("rollout_s", {})[name] = round(time.monotonic() - t0, 1)
    rep = json.loads((lab.work / "reports" / ro.id / "hosts" / "lab-1.json").read_text())
    return fleet, rep


def check_handover(rep: dict, *, frm: str, to: str, count: int) -> dict:
    """Every workload byte- and page-identical; the kernels and kexec-metadata as asked."""
    a = rep["agent"]
    assert a["result"] == "success" and a["failure"] is None, a["failure"]
    assert a["kernel"]["from"]["release"] == frm and a["kernel"]["to"]["release"] == to
    md = a["kexec_metadata"]
    assert md["previous_release"] == frm and md["kexec_count"] == count, md
    assert {(w["session"], w["token"]) for w in a["workloads"]} == {("vm-ram", 0x1001),
                                                                  ("cache", 0x2001)}
    for w in a["workloads"]:
        assert w["verified"] and w["pfns_identical"], w
        assert w["sha256_after"] == w["sha256_before"], w
    snap = a["radix"]["snapshot"]
    assert snap["intact"] and snap["workload_pfns_missing"] == {}, snap
    inc = a["radix"]["incoming"]
    assert inc["root"] == snap["root"] and inc["intact"] is False
    assert inc["fdt_source"].startswith("setup_data /sys/kernel/boot_params/setup_data/"), inc
    return a


def record(name: str, rep: dict) -> None:
    a = rep["agent"]
    FIGURES[name] = {"controller_downtime_s": round(rep["controller"]["downtime_s"], 1),
                     "agent_downtime": a["downtime"],
                     "snapshot_memory": a["radix"]["snapshot"]["memory"],
                     "incoming_fdt_source": a["radix"]["incoming"]["fdt_source"],
                     "capabilities": a.get("capabilities"), "not_checked": a.get("not_checked"),
                     "steps_s": {e["event"][6:]: e["detail"] for e in rep["controller"]["events"]
                                 if e["event"].startswith("agent ")}}
    print(f"\n{name}: " + json.dumps(FIGURES[name], indent=1))


@pytest.mark.lab
def test_a_upgrade_7_2_13_to_prod(lab: Lab) -> None:
    """a) onto the production-like kernel: no KHO debugfs there, setup_data is read."""
    fleet, rep = run_rollout(lab, "a", lab.prod, PROD_SHA)
    assert fleet["rollout"]["status"] == "completed" and not fleet["failures"], fleet["failures"]
    a = check_handover(rep, frm="7.2.13", to=PROD_RELEASE, count=1)
    assert a["capabilities"]["kho_debugfs"] is True and a["capabilities"]["devmem_ram"] is True
    assert a["radix"]["snapshot"]["memory"] == "/dev/mem"
    assert lab.ssh("uname -r").strip() == PROD_RELEASE
    record("a", rep)
    lab.seen["a"] = {(w["session"], w["token"]): w["sha256_after"] for w in a["workloads"]}


@pytest.mark.lab
def test_b_back_to_7_2_13_snapshot_from_kcore_with_dump(lab: Lab) -> None:
    """b) off the prod kernel: the snapshot through /proc/kcore; a dump between snapshot and
    kexec agrees with it under `kho-fleet inspect`."""
    shas = need(lab, "a")
    core = lab.work / "prod-before-kexec.core"
    caught: dict[str, Any] = {}

    def hook(host: str, state: str, detail: str) -> None:
        if state != "snapshotted" or caught:
            return
        try:     # lab-1 waits here, before kexec
            caught["preserve"] = json.loads(lab.ssh(f"cat {STATE_DIR}/preserve.json"))
            caught["snapshot"] = json.loads(lab.ssh(f"cat {STATE_DIR}/snapshot.json"))
            proc = cli("lab", "dump", host, "--out", core, "--workdir", lab.fleet.workdir,
                       "--json", timeout=300)
            caught["dump"] = json.loads(proc.stdout) if proc.returncode == 0 else proc.stderr
        except Exception as e:  # reported by the assertions below
            caught["error"] = repr(e)

    fleet, rep = run_rollout(lab, "b", KERNEL_A, SHA_A, progress=hook)
    assert "error" not in caught, caught
    assert fleet["rollout"]["status"] == "completed" and not fleet["failures"], fleet["failures"]
    a = check_handover(rep, frm=PROD_RELEASE, to="7.2.13", count=2)
    assert all(w["source"] == "carried" for w in a["workloads"])
    assert {(w["session"], w["token"]): w["sha256_after"] for w in a["workloads"]} == shas
    # the report names both sources, and the prod kernel's capabilities as they are
    assert a["radix"]["snapshot"]["memory"] == "/proc/kcore"
    assert a["capabilities"] == {"kho_debugfs": False, "devmem_ram": False, "kcore": True,
                                 "lockdown": None, "kexec_sig_required": None}
    assert not [n for n in a["not_checked"] if n.startswith("radix snapshot skipped")]
    assert [n for n in a["not_checked"] if n.startswith("signed-kexec policy not known")]
    snap = caught["snapshot"]
    assert snap["memory"] == "/proc/kcore" and snap["fdt_source"].startswith("memory scan")
    record("b", rep)

    assert isinstance(caught.get("dump"), dict), caught.get("dump")
    FIGURES["dump_s"] = caught["dump"]["seconds"]
    t0 = time.monotonic()
    proc = cli("inspect", "--memory", core, "--json", timeout=300)
    FIGURES["inspect_s"] = round(time.monotonic() - t0, 1)
    core.unlink()
    assert proc.returncode == 0, proc.stderr
    ins = json.loads(proc.stdout)
    assert ins["kho"]["memory_map_root"] == snap["root"] == a["radix"]["snapshot"]["root"]
    assert ins["radix"]["intact"]
    assert ins["radix"]["nodes"] == snap["nodes"] and ins["radix"]["blocks"] == snap["blocks"]
    cover = Coverage.from_blocks(ins["radix"]["blocks"])
    pfns = [p + i for w in caught["preserve"]["workloads"] for p, n in w["pfn_runs"]
            for i in range(n)]
    assert len(pfns) == WORKLOAD_PAGES
    assert all(cover.covers(p * 4096) for p in pfns)
    assert ins["kexec_metadata"]["previous_release"] == PROD_RELEASE


# --- kho-fleet lab build-kernel --fragment (no guest) -----------------------------------------

def test_build_steps_merge_the_fragment(tmp_path: Path) -> None:
    steps = build_steps(tmp_path / "B", PROD_FRAGMENT, jobs=2)
    assert [s for s, _ in steps] == ["defconfig", "kvm_guest.config", "merge_config",
                                     "olddefconfig", "bzImage"]
    assert steps[2][1] == ["scripts/kconfig/merge_config.sh", "-m", "-O", str(tmp_path / "B"),
                           f"{tmp_path / 'B'}/.config", str(PROD_FRAGMENT)]
    assert steps[4][1] == ["make", f"O={tmp_path / 'B'}", "-j2", "bzImage"]


def test_build_kernel_arguments(tmp_path: Path) -> None:
    """Bad arguments: one line, exit 2, before anything runs."""
    src = tmp_path / "linux"
    (src / "scripts/kconfig").mkdir(parents=True)
    (src / "Makefile").write_text("all:\n")
    (src / "scripts/kconfig/merge_config.sh").write_text("")
    cases = [
        (("--source", src, "--fragment", tmp_path / "nope.config"), "config fragment not found"),
        (("--source", src, "--fragment", src / "Makefile"), "no CONFIG_ settings"),
        (("--kernel", KERNEL_A, "--configure-only"), "--configure-only needs --source"),
        (("--source", src, "--kernel", KERNEL_A), "exactly one of --source"),
    ]
    for args, msg in cases:
        proc = cli("lab", "build-kernel", *args, "--out", tmp_path / "store", timeout=120)
        assert proc.returncode == 2, (args, proc.stderr)
        assert msg in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_record_prod_kernel_keeps_the_default(tmp_path: Path) -> None:
    """`--kernel PROD --keep-default` lists it in the store without changing what `up`
    boots; find_kernel finds either by release."""
    prod = prod_kernel()
    if prod is None or not KERNEL_A.is_file():
        pytest.skip("the 7.2.13 and 7.3.4-prod kernels are not both here")
    store = tmp_path / "store"
    proc = cli("lab", "build-kernel", "--kernel", KERNEL_A, "--out", store, "--json")
    assert proc.returncode == 0, proc.stderr
    proc = cli("lab", "build-kernel", "--kernel", prod, "--out", store, "--keep-default",
               "--json")
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)
    assert rec["release"] == PROD_RELEASE and rec["sha256"] == PROD_SHA
    assert rec["kho"] == "kho-v4" and rec["luo"] == "luo-v5" and rec["memfd"] == "memfd-v2"
    assert json.loads((store / "lab-kernel.json").read_text())["release"] == "7.2.13"
    assert find_kernel(store, PROD_RELEASE) == store / f"bzImage-{PROD_RELEASE}"
    assert find_kernel(store, "7.2.13") == store / "bzImage-7.2.13"
    assert find_kernel(store, "9.9") is None


def test_configure_only_with_the_prod_fragment(tmp_path: Path) -> None:
    """The real make steps on linux-source-7.3 up to olddefconfig, into a scratch build
    dir: every setting of kho-prod.config survives (STRICT_DEVMEM, no KHO debugfs)."""
    if not (LINUX_73 / "Makefile").is_file():
        pytest.skip(f"linux-source-7.3 not unpacked at {LINUX_73}")
    if not PROD_FRAGMENT.is_file() or shutil.which("make") is None or shutil.which("gcc") is None:
        pytest.skip("needs ../shared/lab/kho-prod.config, make and gcc")
    b = tmp_path / "B"
    proc = cli("lab", "build-kernel", "--source", LINUX_73, "--fragment", PROD_FRAGMENT,
               "--build-dir", b, "--configure-only", "--out", tmp_path / "store", "--json",
               timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["config"] == str(b / ".config") and out["options"] > 5
    config = (b / ".config").read_text()
    for line in ("CONFIG_STRICT_DEVMEM=y", "CONFIG_IO_STRICT_DEVMEM=y",
                 "CONFIG_KEXEC_HANDOVER=y", "# CONFIG_KEXEC_HANDOVER_DEBUGFS is not set",
                 'CONFIG_LOCALVERSION="-prod"'):
        assert line in config.splitlines(), line
    assert not (b / "arch/x86/boot/bzImage").exists() and not (tmp_path / "store").exists()
