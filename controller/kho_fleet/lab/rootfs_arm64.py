"""The arm64 lab guests' Debian tree, built on an x86 machine that cannot run arm64 binaries.

There is no binfmt_misc/qemu-user here, so `debootstrap` cannot chroot into an arm64 tree.
The tree is made in three steps, all without mounting anything:
1. `debootstrap --foreign --arch=arm64` on this machine: downloads and unpacks the packages
   (~20 s);
2. the second stage inside a first guest boot: the foreign tree becomes an ext4 image
   (`mkfs.ext4 -d`) that qemu-system-aarch64 (`-M virt -cpu max`, TCG) boots with
   `init=/kho-stage2`, a shell script that mounts /proc, /sys and /dev, runs
   `/debootstrap/debootstrap --second-stage` (dpkg configures every package: the slow part,
   ~17 min under TCG on a shared 2-core machine), prints `KHO-STAGE2-DONE rc=N` on the serial
   console and exits, so the kernel panics and QEMU (-no-reboot, panic=-1) exits;
3. `debugfs -R "rdump / DIR"` copies the finished tree back out of the image (~7 s); device
   nodes are not copied (the guest's devtmpfs provides /dev).
rootfs.py then configures and caches the tree like the x86 one (keyed by content, with the
arch in the key) and builds the per-key images from it with `mkfs.ext4 -d`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

__all__ = ["STAGE2_SCRIPT", "STAGE2_DONE", "foreign_debootstrap", "second_stage",
           "tree_from_image", "stage2_result"]

QEMU = "qemu-system-aarch64"
STAGE2_DONE = re.compile(r"KHO-STAGE2-DONE rc=(\d+)")
STAGE2_SCRIPT = """#!/bin/sh
# kho-fleet lab: finish `debootstrap --foreign` inside the arm64 guest's first boot (PID 1)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "kho-stage2: start"
/debootstrap/debootstrap --second-stage
rc=$?
echo "kho-stage2: second stage rc=$rc"
sync
echo "KHO-STAGE2-DONE rc=$rc"
mount -o remount,ro / 2>/dev/null
sync
echo o > /proc/sysrq-trigger 2>/dev/null
sleep 5
"""
STAGE2_APPEND = "root=/dev/vda rw console=ttyAMA0 init=/kho-stage2 panic=-1"

Run = Callable[[str, list, float], None]     # rootfs._run(step, argv, timeout)


def foreign_debootstrap(run: Run, debootstrap: str, tmp: Path, suite: str, mirror: str,
                        packages: Sequence[str]) -> None:
    """Step 1: the packages of an arm64 `suite` unpacked into `tmp` (not configured)."""
    env_run = run
    env_run(f"debootstrap --foreign --arch=arm64 {suite} from {mirror}",
            [debootstrap, "--foreign", "--arch=arm64", "--variant=minbase",
             "--include=" + ",".join(packages), suite, str(tmp), mirror], 1800)


def stage2_result(serial: str) -> Optional[int]:
    """The second stage's exit status from the serial log (None: it never finished)."""
    m = STAGE2_DONE.search(serial)
    return int(m.group(1)) if m else None


def second_stage(run: Run, mkfs: str, tree: Path, kernel: Path, work: Path, *,
                 timeout: float = 3600.0, memory_mib: int = 1024, smp: int = 2) -> Path:
    """Step 2: boot `kernel` on an image of the foreign `tree` with init=/kho-stage2; the
    finished image (RuntimeError with the serial log's tail if the stage failed)."""
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise RuntimeError(f"{QEMU} not found: install the Debian package qemu-system-arm")
    script = tree / "kho-stage2"
    script.write_text(STAGE2_SCRIPT)
    os.chmod(script, 0o755)
    work.mkdir(parents=True, exist_ok=True)
    image, serial = work / "stage2.img", work / "stage2.serial"
    for p in (image, serial):
        if p.exists():
            p.unlink()
    with open(image, "wb") as f:
        f.truncate(2 << 30)
    run("mkfs.ext4 -d (foreign tree)", [mkfs, "-q", "-F", "-L", "kho-lab", "-d", str(tree),
                                        str(image)], 900)
    argv = [qemu, "-M", "virt", "-cpu", "max,pauth-impdef=on", "-smp", str(smp),
            "-m", str(memory_mib), "-kernel", str(kernel), "-append", STAGE2_APPEND,
            "-drive", f"file={image},if=virtio,format=raw", "-display", "none",
            "-monitor", "none", "-serial", f"file:{serial}", "-nic", "none", "-no-reboot"]
    t0 = time.monotonic()
    try:
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"second stage in the arm64 guest: no end after {timeout:.0f}s "
                           f"(serial log {serial})") from None
    text = serial.read_text(errors="replace") if serial.exists() else ""
    rc = stage2_result(text)
    if rc != 0:
        tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or ["(empty)"]
        raise RuntimeError(f"second stage in the arm64 guest "
                           f"{'did not finish' if rc is None else f'exited {rc}'} after "
                           f"{time.monotonic() - t0:.0f}s: {tail[0]} (serial log {serial})")
    return image


def tree_from_image(run: Run, debugfs: str, image: Path, out: Path) -> None:
    """Step 3: copy the finished tree out of `image` into `out` (a new directory)."""
    out.mkdir(parents=True)
    run("debugfs rdump", [debugfs, "-R", f"rdump / {out}", str(image)], 900)
    stage = out / "kho-stage2"
    if stage.exists():
        stage.unlink()
    if not (out / "usr/bin/python3").exists() and not (out / "usr/bin/python3").is_symlink():
        raise RuntimeError(f"debugfs rdump of {image}: no usr/bin/python3 in the copied tree")
