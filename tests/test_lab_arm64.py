"""arm64 on the real-kernel lab: one arm64 guest (qemu-system-aarch64 -M virt -cpu max, TCG)
and one x86 guest in rollouts whose playbook names a kernel per architecture, and the
arm64 build of `kho-fleet lab build-kernel`.

Skipped, with the reason, when qemu-system-aarch64, the kernels or the arm64 root
filesystem are absent. The arm64 root filesystem is not built here: its debootstrap second
stage runs inside a first guest boot (~17 min under TCG), so build it once with
`kho-fleet lab build-rootfs --arch arm64 --kernel ../shared/lab/arm64/Image-7.2.13-kho`
(the same --cache as KHO_LAB_CACHE). Guests are shared by the module and always put down.

The arm64 upgrade target (release 7.2.13-lab-b) and ABI-mismatch image (7.2.13-abi-kho-v3)
are not prebuilt: they are found in ../shared/lab/arm64/ or in the lab's kernel store
(.lab/kernels, `find_kernel(store, release, arch="arm64")`), where
`kho-fleet lab build-kernel --arch arm64 --source linux-source-7.2 --build-dir B
--localversion=-lab-b --keep-default` (then the same with `--localversion=-abi-kho-v3
--kho-compatible kho-v3`) records them; see docs/lab.md for how long that takes.
KHO_LAB_KERNELS names another store (docs/lab.md: the run with stand-in images).

- a) the mixed rollout: the x86 guest 7.2.13 -> 7.2.13-lab-b, the arm64 guest 7.2.13 ->
  the arm64 7.2.13-lab-b (a real release change; into 7.2.13 itself, said on stdout, while
  that image is absent); workloads verified byte- and page-identical on both, kexec-metadata
  on both, the fleet report's arch column; `kho-fleet lab dump` of the arm64 guest taken
  between its snapshot and its kexec (the host waits in the rollout's progress hook);
- b) the ABI-mismatch images (x86 and arm64 `…-abi-kho-v3`) refused at preflight on both;
- c) that arm64 dump (ELF EM_AARCH64) read by `kho-fleet inspect --memory`: the root of
  the outgoing radix tree is the agent's snapshot root, the tree is intact and covers every
  PFN of the workloads, whose bytes came back unchanged;
- d) the same handover on 16 KiB and 64 KiB arm64 kernels, where ../shared/lab/arm64 has
  them (it has only 4 KiB ones: skipped with the reason);
- without a guest: the arm64 build steps, the derived DEBUG_INFO_NONE, the KHO_FDT_COMPATIBLE
  patch and its undoing, through the real CLI on a fake source tree.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml
from labsupport import (
    KERNEL_A,
    KERNEL_B,
    LAB_CACHE,
    REPO,
    SHARED_LAB,
    Coverage,
    kho_fleet_cli,
    lab_guest_skip_reason,
    rootfs_skip_reason,
)

from kho_agent.digest import sha256_file
from kho_agent.kimage import inspect_kernel_image
from kho_fleet.lab.fleet import LabFleet
from kho_fleet.lab.kbuild import (
    build_steps,
    derived_settings,
    find_kernel,
    patch_define,
    recorded_kernel,
)
from kho_fleet.rollout import Rollout, RolloutOptions
from kho_fleet.sim.kernelimage import make_kernel_image

pytestmark = pytest.mark.lab

STORE = Path(os.environ.get("KHO_LAB_KERNELS", REPO / ".lab/kernels"))
ARM = SHARED_LAB / "arm64/Image-7.2.13-kho"
KERNEL_V3 = SHARED_LAB / "bzImage-7.2.13-abi-kho-v3"
X86, A64 = "lab-1", "lab-arm64-1"
STATE_DIR = "/var/lib/kho-agent/state"          # the inventory's default kho_agent_dir
WORKLOADS = {"sessions": [{"name": "vm-ram", "memfds": [{"token": 0x1001, "size": "16MiB",
                                                          "seed": 11}]},
                          {"name": "cache", "memfds": [{"token": 0x2001, "size": "4MiB",
                                                         "seed": 12}]}]}
WORKLOAD_PAGES = (20 << 20) // 4096
FIGURES: dict[str, Any] = {}


def arm64_kernel(release: str) -> Optional[Path]:
    """../shared/lab/arm64/Image-<release>, else the arm64 kernel of that release recorded
    in the lab's kernel store."""
    shared = SHARED_LAB / f"arm64/Image-{release}"
    return shared if shared.is_file() else find_kernel(STORE, release, arch="arm64")


def _absent(release: str, how: str) -> str:
    return (f"arm64 {release} image not found in {SHARED_LAB / 'arm64'} nor in the kernel "
            f"store {STORE}: build it with `kho-fleet lab build-kernel --arch arm64 --source "
            f"linux-source-7.2 --keep-default {how}` (gcc-aarch64-linux-gnu)")


ARM_B = arm64_kernel("7.2.13-lab-b")
ARM_V3 = arm64_kernel("7.2.13-abi-kho-v3")


def arm64_rootfs_skip_reason(kernel: Path = ARM) -> str:
    """Why arm64 guests on `kernel` cannot run here ("" if they can)."""
    from kho_fleet.lab.guest import lab_key
    from kho_fleet.lab.rootfs import cached_rootfs
    if shutil.which("qemu-system-aarch64") is None:
        return "qemu-system-aarch64 not found (Debian package qemu-system-arm)"
    if not kernel.is_file():
        return f"arm64 lab kernel not found: {kernel}"
    if cached_rootfs(LAB_CACHE, kernel, lab_key(LAB_CACHE).public, arch="arm64") is None:
        return (f"no cached arm64 rootfs in {LAB_CACHE}: build it once with `kho-fleet lab "
                f"build-rootfs --arch arm64 --kernel {kernel} --cache {LAB_CACHE}` (~17 min: "
                "the debootstrap second stage runs in an arm64 guest under TCG)")
    return ""


def cli(*args: Any, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return kho_fleet_cli(*args, timeout=timeout)


@dataclass
class Lab:
    work: Path
    inventory: Path
    seen: dict[str, Any] = field(default_factory=dict)

    def ssh(self, host: str, cmd: str, timeout: float = 120.0) -> str:
        """stdout of `cmd` run as root on lab guest `host` (must exit 0)."""
        fleet = LabFleet(self.work / ("arm64" if "arm64" in host else "x86"))
        g = fleet.guest(fleet.record(host))
        try:
            return g.run(cmd, timeout=timeout, check=True)[1]
        finally:
            g.stop()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """`lab up 1` (x86) and `lab up 1 --arch arm64`, one inventory; both put down at the end."""
    why = (lab_guest_skip_reason([KERNEL_A, KERNEL_B]) or arm64_rootfs_skip_reason()
           or rootfs_skip_reason(LAB_CACHE, KERNEL_A, [KERNEL_B]))
    if why:
        print(f"\nlab arm64 skipped: {why}")
        pytest.skip(why)
    work = tmp_path_factory.mktemp("lab-arm64")
    FIGURES["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    FIGURES["loadavg_1m"] = {"start": os.getloadavg()[0]}
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
            FIGURES[f"boot_to_ssh_{name}_s"] = [round(g["boot_s"], 1)
                                                for g in json.loads(p.stdout)["guests"]]
            inv = yaml.safe_load((work / f"{name}.yaml").read_text())
            hosts.update(inv["all"]["hosts"])
        # an x86 guest sharing 2 cores with a TCG arm64 one (and a loaded machine) can take
        # longer than its own 180 s to come back: give it the arm64 guest's boot timeout
        for h in hosts.values():
            h["kho_boot_timeout"] = max(int(h.get("kho_boot_timeout", 0)), 540)
        mixed = work / "mixed.yaml"
        mixed.write_text(yaml.safe_dump({"all": {"hosts": hosts}}, sort_keys=False))
        yield Lab(work, mixed)
    finally:
        FIGURES["loadavg_1m"]["end"] = os.getloadavg()[0]
        for name in ups:
            if (work / name).exists():
                d = cli("lab", "down", "--workdir", work / name, "--json", timeout=120)
                print(f"\nlab down {name}: rc {d.returncode}")
        print("lab arm64 figures: " + json.dumps(FIGURES, indent=1))


def need(lab: Lab, key: str) -> Any:
    """What an earlier test left in lab.seen; skip when it did not get that far."""
    if key not in lab.seen:
        pytest.skip(f"needs an earlier step ({key}) that did not pass")
    return lab.seen[key]


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


def rollout(lab: Lab, pb: Path, progress: Any = None) -> tuple[dict, dict[str, dict]]:
    """Run a rollout in-process (so a progress hook can hold a host between steps);
    (fleet report, per-host written reports)."""
    opts = RolloutOptions(rollouts_dir=str(lab.work / "rollouts"),
                          reports_dir=str(lab.work / "reports"), sim_dir=str(lab.work / "sim"),
                          progress=progress)
    t0 = time.monotonic()
    ro = Rollout.start(str(pb), str(lab.inventory), opts)
    fleet = ro.run()
    FIGURES.setdefault("rollout_s", {})[pb.stem] = round(time.monotonic() - t0, 1)
    reports = {}
    for h in ro.db.hosts():
        path = lab.work / "reports" / ro.id / "hosts" / f"{h.name}.json"
        if path.is_file():
            reports[h.name] = json.loads(path.read_text())
    return fleet, reports


def test_a_mixed_rollout_x86_and_arm64(lab: Lab) -> None:
    arm_to = ARM_B or ARM
    if ARM_B is None:
        print(f"\nno arm64 upgrade target, the arm64 guest hands over into 7.2.13 itself: "
              f"{_absent('7.2.13-lab-b', '--localversion=-lab-b')}")
    to = {X86: "7.2.13-lab-b", A64: inspect_kernel_image(str(arm_to)).release}
    core = lab.work / "arm64-before-kexec.core"
    caught: dict[str, Any] = {}

    def hook(host: str, state: str, detail: str) -> None:
        """At the arm64 host's `snapshotted`: its agent's records, then `lab dump`."""
        if host != A64 or state != "snapshotted" or caught:
            return
        try:       # runs in the arm64 host's rollout thread: it waits here, before kexec
            caught["preserve"] = json.loads(lab.ssh(host, f"cat {STATE_DIR}/preserve.json"))
            caught["snapshot"] = json.loads(lab.ssh(host, f"cat {STATE_DIR}/snapshot.json"))
            p = cli("lab", "dump", host, "--out", core, "--workdir", lab.work / "arm64",
                    "--json", timeout=600)
            caught["dump"] = json.loads(p.stdout) if p.returncode == 0 else p.stderr
        except Exception as e:  # reported by the assertions below
            caught["error"] = repr(e)

    fleet, reports = rollout(lab, playbook(lab, "mixed", {"x86_64": KERNEL_B, "arm64": arm_to}),
                             progress=hook)
    assert "error" not in caught, caught
    assert {h["name"]: h["arch"] for h in fleet["hosts"]} == {X86: "x86_64", A64: "arm64"}
    for host in (X86, A64):
        a = reports[host]["agent"]
        assert a["result"] == "success", (host, a.get("failure"))
        assert a["kernel"]["from"]["release"] == "7.2.13"
        assert a["kernel"]["to"]["release"] == to[host]
        assert a["kexec_metadata"]["previous_release"] == "7.2.13"
        assert a["kexec_metadata"]["kexec_count"] == 1
        assert {(w["session"], w["token"]) for w in a["workloads"]} == {("vm-ram", 0x1001),
                                                                      ("cache", 0x2001)}
        for w in a["workloads"]:
            assert w["verified"] and w["pfns_identical"], (host, w)
            assert w["sha256_after"] == w["sha256_before"], (host, w)
        assert lab.ssh(host, "uname -r").strip() == to[host]     # the new kernel runs
        FIGURES[host] = {"to": to[host],
                         "controller_downtime_s": reports[host]["controller"]["downtime_s"],
                         "agent_downtime": a["downtime"]}
    assert fleet["rollout"]["status"] == "completed" and not fleet["failures"], fleet["failures"]
    lab.seen["mixed"] = True
    if isinstance(caught.get("dump"), dict):
        FIGURES["dump_arm64_s"] = caught["dump"]["seconds"]
        lab.seen["dump"] = (core, caught, reports[A64]["agent"])
    else:
        print(f"\narm64 dump between snapshot and kexec failed: {caught.get('dump')}")


def test_b_abi_mismatch_refused_at_preflight(lab: Lab) -> None:
    need(lab, "mixed")
    if ARM_V3 is None:
        why = _absent("7.2.13-abi-kho-v3", "--localversion=-abi-kho-v3 --kho-compatible kho-v3")
        print(f"\n{why}")
        pytest.skip(why)
    if not KERNEL_V3.is_file():
        pytest.skip(f"{KERNEL_V3} not found")
    assert inspect_kernel_image(str(ARM_V3)).kho == "kho-v3"
    fleet, _ = rollout(lab, playbook(lab, "abi", {"x86_64": KERNEL_V3, "arm64": ARM_V3}))
    fails = {f["host"]: f for f in fleet["failures"]}
    for host in (X86, A64):
        assert fails[host]["phase"] == "preflight", fails
        assert "kho-v3" in fails[host]["reason"], fails[host]
    # nothing was kexec'd: both still run the kernels of handover a
    assert lab.ssh(A64, "cat /proc/sys/kernel/random/boot_id") and \
        lab.ssh(X86, "uname -r").strip() == "7.2.13-lab-b"


def test_c_arm64_dump_between_snapshot_and_kexec(lab: Lab) -> None:
    core, caught, agent = need(lab, "dump")
    head = core.read_bytes()[:64]
    assert head[:4] == b"\x7fELF" and struct.unpack_from("<H", head, 18)[0] == 183  # EM_AARCH64
    t0 = time.monotonic()
    p = cli("inspect", "--memory", core, "--page-size", "4096", "--json")
    FIGURES["inspect_arm64_s"] = round(time.monotonic() - t0, 1)
    core.unlink()
    assert p.returncode == 0, p.stderr
    ins = json.loads(p.stdout)
    snap = caught["snapshot"]
    assert ins["kho"]["memory_map_root"] == snap["root"] == agent["radix"]["snapshot"]["root"]
    assert ins["radix"]["intact"]
    cover = Coverage.from_blocks(ins["radix"]["blocks"])
    pfns = [p + i for w in caught["preserve"]["workloads"] for p, n in w["pfn_runs"]
            for i in range(n)]
    assert len(pfns) == WORKLOAD_PAGES
    assert all(cover.covers(pfn * 4096) for pfn in pfns)
    shas = {(w["session"], w["token"]): w["sha256"] for w in caught["preserve"]["workloads"]}
    assert {(w["session"], w["token"]): w["sha256_after"] for w in agent["workloads"]} == shas
    print(f"\narm64 dump {caught['dump']['bytes'] >> 20} MiB in {caught['dump']['seconds']}s, "
          f"inspect {FIGURES['inspect_arm64_s']}s: root 0x{snap['root']:x}, {len(pfns)} "
          "workload pages covered")


def _kernels_of_page_size(page_size: int) -> list[Path]:
    """arm64 images in ../shared/lab/arm64 whose header says `page_size`."""
    out = []
    for path in sorted((SHARED_LAB / "arm64").glob("*Image*")):
        try:
            info = inspect_kernel_image(str(path))
        except OSError:
            continue
        if info.arch == "arm64" and info.page_size == page_size and info.kho:
            out.append(path)
    return out


@pytest.mark.parametrize("page_size", [16384, 65536])
def test_d_handover_on_16k_and_64k_kernels(tmp_path: Path, page_size: int) -> None:
    """One arm64 guest on a 16 KiB / 64 KiB kernel, a live update into the same kernel:
    workloads byte- and page-identical (its own guest: pages differ from the module's)."""
    kernels = _kernels_of_page_size(page_size)
    if not kernels:
        have = sorted(f"{p.name} ({inspect_kernel_image(str(p)).page_size} B pages)"
                      for p in (SHARED_LAB / "arm64").glob("*Image*")) or ["nothing"]
        why = (f"no arm64 kernel with {page_size >> 10} KiB pages in {SHARED_LAB / 'arm64'} "
               f"(it has: {', '.join(have)})")
        print(f"\n{why}")
        pytest.skip(why)
    kernel = kernels[0]
    why = arm64_rootfs_skip_reason(ARM)     # the arm64 tree; this kernel's image is made
    if why:
        pytest.skip(why)
    work, inv = tmp_path / "guests", tmp_path / "inv.yaml"
    p = cli("lab", "up", "1", "--arch", "arm64", "--kernel", kernel, "--workdir", work,
            "--inventory", inv, "--cache", LAB_CACHE, "--boot-timeout", 600, "--json")
    try:
        assert p.returncode == 0, p.stderr
        lab = Lab(tmp_path, inv)
        fleet, reports = rollout(lab, playbook(lab, f"{page_size}", {"arm64": kernel}))
        assert fleet["rollout"]["status"] == "completed", fleet["failures"]
        a = reports[A64]["agent"]
        assert a["result"] == "success", a.get("failure")
        for w in a["workloads"]:
            assert w["verified"] and w["pfns_identical"], w
            assert w["sha256_after"] == w["sha256_before"], w
    finally:
        cli("lab", "down", "--workdir", work, "--json", timeout=120)


# --- `kho-fleet lab build-kernel --arch arm64`, no guest ------------------------------------

def test_arm64_build_steps() -> None:
    """The cross build's make lines, and the upgrade target's LOCALVERSION on the image step."""
    steps = build_steps("/b", "/f.config", jobs=2, arch="arm64", localversion="-lab-b")
    cross = ["ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-"]
    assert [n for n, _ in steps] == ["defconfig", "virt.config", "merge_config",
                                     "olddefconfig", "Image"]
    assert steps[0][1] == ["make", *cross, "O=/b", "defconfig"]
    assert steps[1][1] == ["make", *cross, "O=/b", "virt.config"]
    assert steps[4][1] == ["make", *cross, "O=/b", "-j2", "LOCALVERSION=-lab-b", "Image"]
    assert build_steps("/b", "/f.config")[4][1] == ["make", "O=/b", "-j3", "bzImage"]


def test_derived_settings_and_patch_define() -> None:
    """`# CONFIG_DEBUG_INFO is not set` that olddefconfig dropped becomes the debug-info
    choice's none entry; other drops derive nothing. The define patch is exact."""
    assert derived_settings(["CONFIG_DEBUG_INFO=n (got y)"]) == ["CONFIG_DEBUG_INFO_NONE=y"]
    assert derived_settings(["CONFIG_LIVEUPDATE=y (got n)"]) == []
    head = '#ifndef X\n#define KHO_FDT_COMPATIBLE "kho-v4"\n#define KHO_OTHER "kho-v4"\n'
    assert patch_define(head, "KHO_FDT_COMPATIBLE", "kho-v3") == head.replace(
        '"kho-v4"\n#define KHO_OTHER', '"kho-v3"\n#define KHO_OTHER')
    with pytest.raises(ValueError, match="0 lines"):
        patch_define(head, "KHO_NONE", "x")


_FAKE_MAKEFILE = """\
# plays the kernel's arm64 targets in milliseconds; O= is the build dir
defconfig:
\tmkdir -p $(O) && echo "CONFIG_64BIT=y $(ARCH) $(CROSS_COMPILE)" > $(O)/.config
\techo CONFIG_DEBUG_INFO=y >> $(O)/.config && echo defconfig >> $(O)/steps
virt.config:
\techo virt.config >> $(O)/steps
olddefconfig:
\techo olddefconfig >> $(O)/steps
\tif grep -q DEBUG_INFO_NONE=y $(O)/.config; then sed -i '/^CONFIG_DEBUG_INFO=y/d' $(O)/.config; \\
\telse sed -i '/^# CONFIG_DEBUG_INFO is not set/d' $(O)/.config; fi
Image:
\tgrep KHO_FDT_COMPATIBLE include/linux/kho/abi/kexec_handover.h >> $(O)/seen
\techo "LOCALVERSION=$(LOCALVERSION)" >> $(O)/seen
\tmkdir -p $(O)/arch/arm64/boot && cp $(IMAGE) $(O)/arch/arm64/boot/Image
\techo Image >> $(O)/steps
\t$(if $(FAIL),false)
"""
_FAKE_MERGE = """\
#!/bin/sh
[ "$1" = -m ] && [ "$2" = -O ] || exit 2
cat "$5" >> "$4" && echo "merge_config $(basename $5)" >> "$3/steps"
"""
_HEADER = '/* KHO ABI */\n#define KHO_FDT_COMPATIBLE "kho-v4"\n'


def _fake_arm64_tree(tmp: Path) -> tuple[Path, dict[str, str]]:
    """A "Linux tree" playing the arm64 build, and an environment with a fake cross gcc."""
    src = tmp / "linux"
    (src / "scripts/kconfig").mkdir(parents=True)
    (src / "include/linux/kho/abi").mkdir(parents=True)
    (src / "include/linux/kho/abi/kexec_handover.h").write_text(_HEADER)
    (src / "Makefile").write_text(_FAKE_MAKEFILE)
    merge = src / "scripts/kconfig/merge_config.sh"
    merge.write_text(_FAKE_MERGE)
    merge.chmod(0o755)
    gcc = tmp / "bin/aarch64-linux-gnu-gcc"
    gcc.parent.mkdir()
    gcc.write_text("#!/bin/sh\nexit 0\n")
    gcc.chmod(0o755)
    return src, {"PATH": f"{gcc.parent}:{os.environ['PATH']}"}


def _build(tmp: Path, src: Path, env: dict[str, str], *args: Any) -> subprocess.CompletedProcess:
    frag = tmp / "frag.config"
    frag.write_text("CONFIG_KEXEC_HANDOVER=y\n# CONFIG_DEBUG_INFO is not set\n")
    return subprocess.run([sys.executable, "-m", "kho_fleet.cli", "lab", "build-kernel",
                           "--arch", "arm64", "--source", str(src), "--fragment", str(frag),
                           "--build-dir", str(tmp / "B"), "--out", str(tmp / "store"),
                           "--json", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


def test_build_kernel_arm64_variants_on_a_fake_tree(tmp_path: Path) -> None:
    """--arch arm64 on a source tree: ARCH/CROSS_COMPILE reach make, the dropped
    DEBUG_INFO setting is repaired, --localversion reaches the Image step, the store keeps
    x86 and arm64 kernels apart, and --kho-compatible changes the header for the Image step
    only (put back after the build, and after a failing one)."""
    src, env = _fake_arm64_tree(tmp_path)
    header = src / "include/linux/kho/abi/kexec_handover.h"
    b, store = tmp_path / "B", tmp_path / "store"
    env["IMAGE"] = make_kernel_image(str(tmp_path / "b.img"), "7.2.13-lab-b", fmt="Image")
    p = _build(tmp_path, src, env, "--localversion=-lab-b", "--keep-default")
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["release"] == "7.2.13-lab-b" and rec["arch"] == "arm64" and rec["page_size"] == 4096
    assert (b / "steps").read_text().split("\n")[:-1] == [
        "defconfig", "virt.config", "merge_config frag.config", "olddefconfig",
        "merge_config kho-lab-derived.config", "olddefconfig", "Image"]
    assert "arm64 aarch64-linux-gnu-" in (b / ".config").read_text()
    assert (b / "seen").read_text() == ('#define KHO_FDT_COMPATIBLE "kho-v4"\n'
                                        "LOCALVERSION=-lab-b\n")
    assert find_kernel(store, "7.2.13-lab-b", arch="arm64") == store / "Image-7.2.13-lab-b"
    assert find_kernel(store, "7.2.13-lab-b") is None           # not an x86 kernel
    assert recorded_kernel(store, "arm64") is None             # --keep-default

    env["IMAGE"] = make_kernel_image(str(tmp_path / "v3.img"), "7.2.13-abi-kho-v3",
                                     kho="kho-v3", fmt="Image")
    p = _build(tmp_path, src, env, "--localversion=-abi-kho-v3", "--kho-compatible", "kho-v3")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["kho"] == "kho-v3"
    assert (b / "seen").read_text().splitlines()[-2:] == [
        '#define KHO_FDT_COMPATIBLE "kho-v3"', "LOCALVERSION=-abi-kho-v3"]
    assert header.read_text() == _HEADER                         # put back
    default = recorded_kernel(store, "arm64")
    assert default is not None and default["release"] == "7.2.13-abi-kho-v3"
    assert find_kernel(store, "7.2.13-lab-b", arch="arm64") is not None   # both kept

    p = _build(tmp_path, src, {**env, "FAIL": "1"}, "--kho-compatible", "kho-v3")
    errors = [ln for ln in p.stderr.splitlines() if not ln.startswith("kho-fleet lab: ")]
    assert p.returncode == 2 and len(errors) == 1 and "Image failed (exit 2)" in errors[0], \
        p.stderr                                                 # progress lines, one error
    assert header.read_text() == _HEADER                         # put back after a failure
    assert not (b / "kho-lab-source-patch.json").exists()


def test_build_kernel_arm64_bad_arguments(tmp_path: Path) -> None:
    """One line, exit 2: a bad --localversion / --kho-compatible, variants of a prebuilt
    --kernel, an x86 kernel recorded as --arch arm64, a missing cross compiler."""
    src, env = _fake_arm64_tree(tmp_path)
    cases = [
        (("--localversion=-a b",), "--localversion '-a b'"),
        (("--kho-compatible", "v3"), "want kho-vN"),
    ]
    for args, msg in cases:
        p = _build(tmp_path, src, env, *args)
        assert p.returncode == 2 and msg in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    only_make = tmp_path / "only-make"
    only_make.mkdir()
    (only_make / "make").symlink_to(shutil.which("make") or "/usr/bin/make")
    p = _build(tmp_path, src, {"PATH": str(only_make)})
    assert p.returncode == 2 and "needs the Debian package gcc-aarch64-linux-gnu" in p.stderr, \
        p.stderr
    x86 = make_kernel_image(str(tmp_path / "bz"), "7.2.99-test", x86_64=True)
    for args, msg in [(("--kernel", x86, "--arch", "arm64"), "not an arm64 Image"),
                      (("--kernel", x86, "--localversion=-x"), "need --source DIR")]:
        p = kho_fleet_cli("lab", "build-kernel", *args, "--out", tmp_path / "s")
        assert p.returncode == 2 and msg in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
