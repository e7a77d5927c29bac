"""`kho-fleet lab` without QEMU: argument handling, one-line errors, recording a prebuilt
kernel, and the build-kernel pipeline on a fake source tree (a Makefile that plays
defconfig/olddefconfig/bzImage in milliseconds). The real guests are in test_lab_e2e.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from kho_agent.digest import sha256_file
from kho_fleet.lab.kbuild import RECORD, build_steps, missing_options, recorded_kernel
from kho_fleet.sim.kernelimage import make_kernel_image

REPO = Path(__file__).resolve().parents[1]
FRAGMENT = REPO / "deploy/lab/kho-lab.config"


def lab(tmp: Path, *args: str, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """`kho-fleet lab ARGS` with every default directory under `tmp`."""
    cmd = [sys.executable, "-m", "kho_fleet.cli", "lab", *args]
    if args and args[0] in ("up", "build-rootfs", "status", "down", "dump"):
        cmd += ["--kernels", str(tmp / "kernels"), "--cache", str(tmp / "cache"),
                "--workdir", str(tmp / "guests")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp,
                          env={**os.environ, **(env or {})})


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2 and exactly one error line (progress lines aside) containing every needle."""
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("kho-fleet lab: ")]
    assert len(lines) == 1 and lines[0].startswith("kho-fleet"), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_fragment_is_the_shared_recipe() -> None:
    """deploy/lab/kho-lab.config is the lab README's fragment."""
    text = FRAGMENT.read_text()
    for opt in ("CONFIG_KEXEC_HANDOVER=y", "CONFIG_LIVEUPDATE=y", "CONFIG_LIVEUPDATE_MEMFD=y",
                "# CONFIG_STRICT_DEVMEM is not set"):
        assert opt in text.splitlines()
    shared = REPO.parent / "shared/lab/kho-lab.config"
    if shared.is_file():
        assert shared.read_text() == text


@pytest.mark.parametrize("args, needle", [
    ((), "exactly one of --source DIR"),
    (("--source", "x", "--kernel", "y"), "exactly one of --source DIR"),
    (("--kernel", "nope"), "--kernel nope: No such file or directory"),
    (("--source", "nope"), "--source nope: no such directory"),
    (("--kernel", "k", "--jobs", "0"), "--jobs 0"),
])
def test_build_kernel_argument_errors(tmp_path: Path, args: tuple, needle: str) -> None:
    """Bad build-kernel arguments: one line, exit 2."""
    one_line_error(lab(tmp_path, "build-kernel", "--out", str(tmp_path / "k"), *args), needle)


def test_build_kernel_source_without_makefile(tmp_path: Path) -> None:
    """A --source that is not a kernel tree is named as such before anything runs."""
    (tmp_path / "src").mkdir()
    one_line_error(lab(tmp_path, "build-kernel", "--source", "src"),
                   "--source src: no Makefile there: not a Linux source tree")


def test_build_kernel_records_a_prebuilt_image(tmp_path: Path) -> None:
    """--kernel: checked with kimage, copied as bzImage-<release>, recorded for `lab up`."""
    img = make_kernel_image(str(tmp_path / "bzImage-test"), "7.2.99-test")
    proc = lab(tmp_path, "build-kernel", "--kernel", img, "--out", str(tmp_path / "k"), "--json")
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)
    assert rec["path"] == str(tmp_path / "k/bzImage-7.2.99-test")
    assert (rec["release"], rec["kho"], rec["luo"], rec["memfd"]) == (
        "7.2.99-test", "kho-v4", "luo-v5", "memfd-v2")
    assert rec["sha256"] == sha256_file(img) == sha256_file(rec["path"])
    assert recorded_kernel(tmp_path / "k") == rec
    # recording the recorded copy again is a no-op copy, not an error
    proc = lab(tmp_path, "build-kernel", "--kernel", rec["path"], "--out", str(tmp_path / "k"))
    assert proc.returncode == 0 and rec["sha256"] in proc.stdout, proc.stderr


@pytest.mark.parametrize("kind, needle", [
    ("junk", "not an x86 bzImage"),
    ("gz", "not an x86 bzImage (looks like: compressed image)"),
    ("no-kho", "not a KHO kernel (no kho-vN string found"),
])
def test_build_kernel_refuses_what_is_not_a_kho_bzimage(tmp_path: Path, kind: str,
                                                        needle: str) -> None:
    """Junk, a bare gzip payload and a kernel without kho-vN are refused, not recorded."""
    path = tmp_path / "image"
    if kind == "junk":
        path.write_bytes(os.urandom(4096))
    else:
        make_kernel_image(str(path), "7.2.99-test", kho="" if kind == "no-kho" else "kho-v4",
                          fmt="gz" if kind == "gz" else "bzImage")
    one_line_error(lab(tmp_path, "build-kernel", "--kernel", str(path), "--out",
                       str(tmp_path / "k")), needle)
    assert not (tmp_path / "k" / RECORD).exists()


_FAKE_MAKEFILE = """\
# plays the kernel's targets in milliseconds; O= is the build dir
defconfig:
\tmkdir -p $(O) && echo CONFIG_64BIT=y > $(O)/.config && echo defconfig >> $(O)/steps
kvm_guest.config:
\techo CONFIG_HYPERVISOR_GUEST=y >> $(O)/.config && echo kvm_guest.config >> $(O)/steps
olddefconfig:
\techo olddefconfig >> $(O)/steps
\t$(if $(DROP),sed -i '/^$(DROP)=/d' $(O)/.config)
bzImage:
\techo "  CC      arch/x86/boot/compressed/misc.o"
\tmkdir -p $(O)/arch/x86/boot && cp $(IMAGE) $(O)/arch/x86/boot/bzImage
\techo bzImage >> $(O)/steps
"""
_FAKE_MERGE = """\
#!/bin/sh
# merge_config.sh -m -O DIR BASE FRAGMENT: append the fragment (what -m amounts to here)
[ "$1" = -m ] && [ "$2" = -O ] || exit 2
cat "$5" >> "$4" && echo merge_config >> "$3/steps"
"""


def _fake_tree(tmp: Path) -> Path:
    """A "Linux tree" whose Makefile and merge_config.sh play the build in milliseconds."""
    src = tmp / "linux"
    (src / "scripts/kconfig").mkdir(parents=True)
    (src / "Makefile").write_text(_FAKE_MAKEFILE)
    merge = src / "scripts/kconfig/merge_config.sh"
    merge.write_text(_FAKE_MERGE)
    merge.chmod(0o755)
    return src


def test_build_kernel_runs_the_recipe_on_a_source_tree(tmp_path: Path) -> None:
    """--source: the README's five steps in order, with progress on stderr and a log."""
    src = _fake_tree(tmp_path)
    img = make_kernel_image(str(tmp_path / "built"), "7.2.13-built")
    proc = lab(tmp_path, "build-kernel", "--source", str(src), "--out", str(tmp_path / "k"),
               "--jobs", "2", "--json", env={"IMAGE": img})
    assert proc.returncode == 0, proc.stderr
    assert (src / "B/steps").read_text().split() == [
        "defconfig", "kvm_guest.config", "merge_config", "olddefconfig", "bzImage"]
    assert "kho-fleet lab: bzImage: make O=" in proc.stderr and "-j2 bzImage" in proc.stderr
    rec = json.loads(proc.stdout)
    assert rec["release"] == "7.2.13-built" and rec["origin"].startswith(f"built from {src}")
    assert recorded_kernel(tmp_path / "k")["path"] == str(tmp_path / "k/bzImage-7.2.13-built")
    assert "=== olddefconfig" in (src / "B/kho-lab-build.log").read_text()


def test_build_kernel_names_options_olddefconfig_dropped(tmp_path: Path) -> None:
    """A fragment option Kconfig dropped is named before the long bzImage step."""
    src = _fake_tree(tmp_path)
    proc = lab(tmp_path, "build-kernel", "--source", str(src), "--out", str(tmp_path / "k"),
               env={"DROP": "CONFIG_LIVEUPDATE_MEMFD", "IMAGE": "/nonexistent"})
    one_line_error(proc, "did not survive olddefconfig", "CONFIG_LIVEUPDATE_MEMFD=y (got n)")
    assert "bzImage" not in (src / "B/steps").read_text()      # caught before the long step


def test_build_kernel_failing_step_is_named(tmp_path: Path) -> None:
    """A failing make step: its name, exit status and the log path, in one line."""
    src = _fake_tree(tmp_path)
    proc = lab(tmp_path, "build-kernel", "--source", str(src), "--out", str(tmp_path / "k"),
               env={"IMAGE": "/nonexistent"})
    one_line_error(proc, "bzImage failed (exit 2)", "kho-lab-build.log")


def test_missing_options_and_build_steps() -> None:
    """The .config check (=y, =m, strings, not set) and the exact build commands."""
    frag = "CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_D=\"x y\"\n# comment\n"
    assert missing_options("CONFIG_A=y\nCONFIG_B=m\nCONFIG_D=\"x y\"\n", frag) == []
    assert missing_options("CONFIG_A=y\nCONFIG_B=y\nCONFIG_C=y\n", frag) == [
        "CONFIG_B=m (got y)", "CONFIG_C=n (got y)", 'CONFIG_D="x y" (got n)']
    steps = build_steps("/b", "/f.config", jobs=3)
    assert [n for n, _ in steps] == ["defconfig", "kvm_guest.config", "merge_config",
                                     "olddefconfig", "bzImage"]
    assert steps[2][1] == ["scripts/kconfig/merge_config.sh", "-m", "-O", "/b", "/b/.config",
                           "/f.config"]
    assert steps[4][1] == ["make", "O=/b", "-j3", "bzImage"]


def test_up_needs_a_kernel_and_qemu(tmp_path: Path) -> None:
    """`lab up` without a kernel, or without QEMU, says what to install or pass."""
    one_line_error(lab(tmp_path, "up", "2"), "no lab kernel recorded", "--kernel PATH")
    one_line_error(lab(tmp_path, "up", "2", "--kernel", "nope"), "--kernel nope: kernel not found")
    one_line_error(lab(tmp_path, "up", "0", "--kernel", "nope"), "the lab runs 1..16 guests")
    img = make_kernel_image(str(tmp_path / "bz"), "7.2.99-test")
    proc = lab(tmp_path, "up", "1", "--kernel", img, env={"PATH": str(tmp_path / "empty")})
    one_line_error(proc, "qemu-system-x86_64 not found", "qemu-system-x86")
    assert not (tmp_path / "guests").exists()


def test_build_rootfs_needs_a_kernel(tmp_path: Path) -> None:
    """`lab build-rootfs` names a missing kernel."""
    one_line_error(lab(tmp_path, "build-rootfs"), "no lab kernel recorded")
    img = make_kernel_image(str(tmp_path / "bz"), "7.2.99-test")
    one_line_error(lab(tmp_path, "build-rootfs", "--kernel", img, "--extra-kernel", "nope"),
                   "kernel not found: nope")


def test_status_down_dump_without_guests(tmp_path: Path) -> None:
    """No guests: status/down report none; dump names the guest; a bad state file is named."""
    for cmd in ("status", "down"):
        proc = lab(tmp_path, cmd, "--json")
        assert proc.returncode == 0 and json.loads(proc.stdout) == [], proc.stderr
        proc = lab(tmp_path, cmd)
        assert proc.returncode == 0 and "no lab guests in" in proc.stdout, proc.stderr
    one_line_error(lab(tmp_path, "dump", "lab-1", "--out", "x.core"),
                   "no lab guest 'lab-1'", "run `kho-fleet lab up N`")
    (tmp_path / "guests").mkdir()
    (tmp_path / "guests/guests.json").write_text("{not json")
    one_line_error(lab(tmp_path, "status"), "unreadable lab state")
