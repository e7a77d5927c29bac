"""Real-kernel test of `kho-fleet inspect`: boot the lab kernel in QEMU (TCG) with a static
/init that preserves two memfds through /dev/liveupdate, dump guest memory over QMP, and check
that inspect finds every memfd page in KHO's preserved-memory radix tree.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from labsupport import FDT_MAGIC, PAGE_SIZE, Coverage, ElfCore, root_u64_props

from kho_agent.abi.fdt import parse_header
from kho_fleet.lab.initramfs import build_init_initramfs
from kho_fleet.lab.probe import (
    ERROR_MARKER,
    READY_MARKER,
    ProbeError,
    ProbeReport,
    compile_probe,
    page_word,
    parse_probe_output,
)
from kho_fleet.lab.qemu import QemuConfig, QemuError, QemuVM, find_qemu

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[1]
KERNEL = REPO.parent / "shared/lab/bzImage-7.2.13-kho"
KERNEL_RELEASE = "7.2.13"
PROBE_SRC = REPO / "deploy/lab/kho-probe.c"
BOOT_TIMEOUT = 180.0
CLI_TIMEOUT = 120.0


@dataclass
class LabGuest:
    """What the booted guest reported, and its memory dump (deleted at teardown)."""

    dump: Path
    report: ProbeReport
    workdir: Path
    boot_seconds: float
    dump_seconds: float


def _static_gcc_works(tmp: Path) -> tuple[bool, str]:
    gcc = shutil.which("gcc")
    if gcc is None:
        return False, "gcc not found"
    src = tmp / "static-check.c"
    src.write_text("int main(void) { return 0; }\n")
    res = subprocess.run(
        [gcc, "-static", "-o", str(tmp / "static-check"), str(src)], capture_output=True, text=True
    )
    return res.returncode == 0, (res.stderr or res.stdout).strip()[-500:]


@pytest.fixture(scope="module")
def lab_guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabGuest]:
    if not KERNEL.is_file():
        pytest.skip(f"lab kernel not found: {KERNEL}")
    if find_qemu() is None:
        pytest.skip("qemu-system-x86_64 not found on PATH")
    work = tmp_path_factory.mktemp("kho-lab")
    ok, why = _static_gcc_works(work)
    if not ok:
        pytest.skip(f"cannot link static binaries with gcc (libc6-dev missing?): {why}")
    try:
        init = compile_probe(PROBE_SRC, work / "init")
    except ProbeError as exc:
        pytest.fail(f"building {PROBE_SRC.name} failed: {exc}")
    initrd = build_init_initramfs(init, work / "initramfs.cpio")

    vm = QemuVM(QemuConfig(kernel=KERNEL, initrd=initrd), work / "vm")
    dump = work / "memory.elf"
    try:
        t0 = time.monotonic()
        try:
            vm.start()
            vm.wait_for_serial(
                READY_MARKER,
                timeout=BOOT_TIMEOUT,
                fail_patterns=("Kernel panic - not syncing", ERROR_MARKER),
            )
            boot_s = time.monotonic() - t0
            report = parse_probe_output(vm.serial_text())
            result = vm.dump_memory(dump)
        except (QemuError, ProbeError) as exc:
            pytest.fail(f"lab guest failed: {exc}\n(serial log: {vm.serial_path})")
        vm.shutdown()
        print(
            f"\nlab guest: READY after {boot_s:.1f}s, dump {result.size >> 20} MiB "
            f"in {result.seconds:.1f}s, memfd pages "
            + ", ".join(f"0x{m.token:x}: {m.pages} in {len(m.ranges)} runs" for m in report.memfds)
        )
        yield LabGuest(dump, report, work, boot_s, result.seconds)
    finally:
        vm.kill()
        if dump.exists():
            dump.unlink()


def run_inspect(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    src_paths = [str(REPO / "controller"), str(REPO / "agent")]
    env["PYTHONPATH"] = os.pathsep.join(src_paths + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run(
        [sys.executable, "-m", "kho_fleet.cli", "inspect", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=env,
    )


def _json_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, f"inspect exited {proc.returncode}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    try:
        return json.loads(proc.stdout)
    except ValueError as exc:
        raise AssertionError(f"inspect --json printed non-JSON: {proc.stdout[:500]!r}") from exc


@pytest.fixture(scope="module")
def inspect_run(lab_guest: LabGuest) -> subprocess.CompletedProcess[str]:
    """`inspect --memory DUMP --json`, run once for the module."""
    return run_inspect("--memory", str(lab_guest.dump), "--json")


def test_dump_holds_memfd_pages(lab_guest: LabGuest) -> None:
    """Harness self-check: the dump has the pattern the probe wrote, at the pagemap PFNs."""
    core = ElfCore(lab_guest.dump)
    try:
        for mf in lab_guest.report.memfds:
            pfns = mf.pfns()
            assert len(pfns) == mf.pages == -(-mf.size // PAGE_SIZE)
            for idx, pfn in enumerate(pfns):
                page = core.read(pfn * PAGE_SIZE, PAGE_SIZE)
                for word in (0, 511):
                    got = int.from_bytes(page[word * 8 : word * 8 + 8], "little")
                    assert got == page_word(mf.token, idx, word), (
                        f"memfd 0x{mf.token:x} page {idx} (pfn 0x{pfn:x}) word {word}"
                    )
    finally:
        core.close()


def test_inspect_finds_every_memfd_pfn(
    lab_guest: LabGuest, inspect_run: subprocess.CompletedProcess[str]
) -> None:
    inspected = _json_of(inspect_run)
    kho = inspected["kho"]
    assert kho["compatible"] == "kho-v4"
    assert kho["page_size"] == PAGE_SIZE
    assert kho["depth"] == 6
    assert kho["memory_map_root"] > 0

    radix = inspected["radix"]
    assert radix["intact"] is True, radix["errors"]
    assert radix["errors"] == []
    assert radix["nodes"] > 0

    cover = Coverage.from_blocks(radix["blocks"])
    missing: list[str] = []
    total_pages = 0
    for mf in lab_guest.report.memfds:
        pfns = mf.pfns()
        total_pages += len(pfns)
        missing += [f"0x{mf.token:x}:0x{p:x}" for p in pfns if not cover.covers(p * PAGE_SIZE)]
    assert not missing, (
        f"{len(missing)} of {total_pages} memfd PFNs not in the radix tree: {missing[:20]}"
    )
    assert radix["preserved_bytes"] >= total_pages * PAGE_SIZE

    names = {s["name"] for s in inspected["subtrees"]}
    assert {"kexec-metadata", "LUO"} <= names, names
    for s in inspected["subtrees"]:
        assert s["phys"] > 0 and s["size"] > 0, s

    # Cold boot: kho_out_kexec_metadata() records this kernel's release and
    # kexec_count = kho_in.kexec_count (0 on cold boot) + 1.
    meta = inspected["kexec_metadata"]
    assert meta is not None
    assert meta["version"] == 1
    assert meta["previous_release"] == KERNEL_RELEASE == lab_guest.report.release
    assert meta["kexec_count"] == 1


def test_inspect_with_truncated_debugfs_fdt(
    lab_guest: LabGuest, inspect_run: subprocess.CompletedProcess[str], tmp_path: Path
) -> None:
    """debugfs kho/out/fdt is truncated (lab finding 3): inspect must use the full FDT in memory."""
    inspected = _json_of(inspect_run)
    fdt = lab_guest.report.outfdt
    hdr = parse_header(fdt)
    assert hdr.magic == FDT_MAGIC
    truncated = hdr.totalsize > len(fdt)
    if truncated:
        # As in the lab: the file stops before the end of the blob, inside or before strings.
        assert hdr.off_dt_strings + hdr.size_dt_strings > len(fdt)
    else:
        libfdt = pytest.importorskip("libfdt")
        parsed = libfdt.Fdt(fdt)
        assert parsed.getprop(0, "compatible").as_str() == "kho-v4"
    print(f"\ndebugfs kho/out/fdt: {len(fdt)} bytes, header totalsize {hdr.totalsize}")

    # The truncated blob still carries the root's u64 properties (preserved-memory-map first).
    root_values = {v for _, v in root_u64_props(fdt)}
    assert inspected["kho"]["memory_map_root"] in root_values

    fdt_file = tmp_path / "kho-out-fdt.bin"
    fdt_file.write_bytes(fdt)
    out = _json_of(run_inspect("--memory", str(lab_guest.dump), "--fdt", str(fdt_file), "--json"))
    assert out["kho"]["compatible"] == "kho-v4"
    assert out["kho"]["memory_map_root"] == inspected["kho"]["memory_map_root"]
    assert out["radix"]["intact"] is True, out["radix"]["errors"]
    source = str(out["kho"]["root_fdt_source"])
    if truncated:
        assert source != "file", "a truncated --fdt was used as is instead of the copy in memory"
        assert any(w in source.lower() for w in ("memory", "recover", "found")), source


def test_inspect_rejects_garbage(tmp_path: Path) -> None:
    junk = tmp_path / "garbage.raw"
    junk.write_bytes(random.Random(0x6B686F).randbytes(1 << 20))
    proc = run_inspect("--memory", str(junk), "--json")
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"want one stderr line, got {lines!r}"


def test_real_root_fdt_matches_pylibfdt(
    lab_guest: LabGuest, inspect_run: subprocess.CompletedProcess[str]
) -> None:
    """Cross-check our FDT decoding of the real kernel's root FDT against libfdt itself."""
    libfdt = pytest.importorskip("libfdt", reason="pylibfdt not installed")
    inspected = _json_of(inspect_run)
    phys = inspected["kho"]["root_fdt_phys"]
    assert phys, inspected["kho"]
    core = ElfCore(lab_guest.dump)
    try:
        size = parse_header(core.read(phys, 40)).totalsize
        blob = core.read(phys, size)
    finally:
        core.close()
    fdt = libfdt.Fdt(blob)
    assert fdt.getprop(0, "compatible").as_str() == inspected["kho"]["compatible"]
    mmap_root = int.from_bytes(bytes(fdt.getprop(0, "preserved-memory-map")), "little")
    assert mmap_root == inspected["kho"]["memory_map_root"]
    theirs = {}
    node = fdt.first_subnode(0, quiet=[libfdt.NOTFOUND])
    while node >= 0:
        data = int.from_bytes(bytes(fdt.getprop(node, "preserved-data")), "little")
        size = int.from_bytes(bytes(fdt.getprop(node, "blob-size")), "little")
        theirs[fdt.get_name(node)] = (data, size)
        node = fdt.next_subnode(node, quiet=[libfdt.NOTFOUND])
    ours = {s["name"]: (s["phys"], s["size"]) for s in inspected["subtrees"]}
    assert ours == theirs
