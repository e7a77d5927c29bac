"""The kexec method (kho_agent.systemdhost, kho_fleet.sim.twinsystemd): a twin host whose
PID 1 is systemd 262 runs an FD-store "service" (a memfd in its store with
FileDescriptorStorePreserve=yes). Through the real `kho-agent` CLI: preflight refuses
`direct` there; with --allow-fdstore-loss the handover proceeds and the report names the
lost store; `systemd` (systemctl kexec) carries the store, byte for byte, and the agent's
own workloads (their sessions go through PID 1's FD store as luo_session entries).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kho_agent.systemdhost import FdStoreUnit, InitSystem, choose_method
from kho_fleet.inventory import InventoryError, load_inventory
from kho_fleet.playbook import PlaybookError, load_playbook
from kho_fleet.sim.handover import run_agent, workload_spec
from kho_fleet.sim.kernelimage import make_kernel_image
from kho_fleet.sim.twinkernel import TwinHandle, start_twin

PROBE = "probe.service"
PROBE_BYTES = hashlib.sha256(b"probe").digest() * 4096          # 128 KiB

# The FD-store service: one memfd into PID 1's store, then it exits (as a service that
# was stopped would: its store stays with PID 1).
SERVICE = """
import hashlib, os, sys
from kho_agent.kernel.twin import TwinKernel
k = TwinKernel(sys.argv[1])
fd = os.memfd_create("probe")
os.write(fd, hashlib.sha256(b"probe").digest() * 4096)
k.fdstore_push("probe.service", "probe", fd)
"""


@pytest.fixture
def sd_twin(tmp_path: Path) -> Iterator[TwinHandle]:
    """A twin host whose PID 1 is systemd 262, with the probe service's FD store."""
    import tempfile
    d = tempfile.mkdtemp(prefix="twin-", dir="/tmp")
    root = os.path.join(d, "host")
    os.makedirs(os.path.join(root, "etc"))
    Path(root, "etc/twin-init.json").write_text(json.dumps({"name": "systemd",
                                                            "version": 262}))
    h = start_twin(root, boot_delay=0.2, ram_mib=128)
    try:
        _start_probe(h)
        yield h
    finally:
        h.stop()
        import shutil
        shutil.rmtree(d, ignore_errors=True)


def _start_probe(h: TwinHandle) -> None:
    """PID 1 starts the probe service (only a unit's own process may send FDSTORE=1);
    wait until its memfd is in the store."""
    k = h.kernel()
    k.start_unit(PROBE, [sys.executable, "-c", SERVICE, h.root],
                 {"PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(u.unit == PROBE and u.count == 1 for u in k.fdstore_units()):
            return
        time.sleep(0.05)
    log = Path(h.root, "var/log", f"{PROBE}.log")
    raise AssertionError(f"the probe never stored its memfd: "
                         f"{log.read_text() if log.exists() else '(no log)'}")


def _files(tmp_path: Path, root: str) -> tuple[str, str]:
    image = make_kernel_image(str(tmp_path / "bzImage-7.2.14-twin"), "7.2.14-twin")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(workload_spec(4)))
    return image, str(spec)


def _handover(h: TwinHandle, image: str, spec: str, *kexec_args: str) -> dict:
    """Every agent step through the CLI; the verify step's report."""
    boots = h.state()["boot_count"]
    for step, args in (("preflight", ("--kernel", image, "--spec", spec, *kexec_args)),
                       ("stage", ("--kernel", image)), ("preserve", ("--spec", spec)),
                       ("snapshot", ()), ("kexec", ("--yes", *kexec_args))):
        r = run_agent(h.root, step, *args)
        assert r["rc"] == 0, (step, r["stderr"])
    h.wait_ready(30, boot_count=boots + 1)
    r = run_agent(h.root, "verify")
    assert r["json"] is not None, r["stderr"]
    return r["json"]


def _probe_after(h: TwinHandle) -> list[bytes]:
    """What PID 1 gives the probe service when it starts again (LISTEN_FDS)."""
    out = []
    for _name, fd in h.kernel().fdstore_peek(PROBE):
        try:
            out.append(os.pread(fd, os.fstat(fd).st_size, 0))
        finally:
            os.close(fd)
    return out


def test_preflight_refuses_direct_with_an_fdstore_unit(sd_twin: TwinHandle,
                                                       tmp_path: Path) -> None:
    image, spec = _files(tmp_path, sd_twin.root)
    r = run_agent(sd_twin.root, "preflight", "--kernel", image, "--spec", spec,
                  "--kexec-method", "direct")
    assert r["rc"] == 1
    assert "probe.service (1 fd)" in r["stderr"] and "allow_fdstore_loss" in r["stderr"]
    assert len(r["stderr"].splitlines()) == 1
    check = next(c for c in r["json"]["checks"] if c["name"] == "kexec_method")
    assert not check["ok"]
    # auto picks systemd on this host, and says why
    r = run_agent(sd_twin.root, "preflight", "--kernel", image, "--spec", spec)
    assert r["rc"] == 0, r["stderr"]
    km = r["json"]["kexec_method"]
    assert km["method"] == "systemd" and "systemd 262" in km["why"]
    assert [u["unit"] for u in km["fdstores"]] == [PROBE]


def test_direct_with_allow_fdstore_loss_names_the_lost_store(sd_twin: TwinHandle,
                                                             tmp_path: Path) -> None:
    image, spec = _files(tmp_path, sd_twin.root)
    rep = _handover(sd_twin, image, spec, "--kexec-method", "direct", "--allow-fdstore-loss")
    assert rep["result"] == "success", rep["failure"]
    assert rep["kexec_method"] == "direct"
    assert rep["fdstores"] == [{"unit": PROBE, "before": 1, "after": 0, "lost": 1}]
    assert _probe_after(sd_twin) == []


def test_systemd_kexec_carries_the_store_and_the_workloads(sd_twin: TwinHandle,
                                                          tmp_path: Path) -> None:
    image, spec = _files(tmp_path, sd_twin.root)
    rep = _handover(sd_twin, image, spec, "--kexec-method", "systemd")
    assert rep["result"] == "success", rep["failure"]
    assert rep["kexec_method"] == "systemd"
    assert rep["fdstores"] == [{"unit": PROBE, "before": 1, "after": 1, "lost": 0}]
    for w in rep["workloads"]:
        assert w["verified"] and w["pfns_identical"], w
    assert _probe_after(sd_twin) == [PROBE_BYTES]
    assert "Restored" in sd_twin.kernel().dmesg()


def test_choose_method_without_systemd() -> None:
    d = choose_method("systemd", InitSystem("init"), [], False)
    assert not d.ok and "systemd >= 262" in str(d.refused)
    d = choose_method("direct", InitSystem("init"), [FdStoreUnit("x.service", 2, "no")], False)
    assert d.ok      # a store that is not preserved is not lost by kexec -e in a way systemd
    #                  would have avoided


def test_inventory_and_playbook_fields(tmp_path: Path) -> None:
    inv = tmp_path / "inv.yaml"
    inv.write_text("all:\n  hosts:\n    a: {kho_transport: sim, kho_kexec_method: systemd}\n"
                   "    b: {kho_transport: sim}\n")
    hosts = load_inventory(str(inv), check_files=False).hosts
    assert hosts["a"].kexec_method == "systemd" and hosts["b"].kexec_method == "auto"
    inv.write_text("all:\n  hosts:\n    a: {kho_kexec_method: sideways}\n")
    with pytest.raises(InventoryError, match=r"inv.yaml:3: .*kho_kexec_method: must be one of"):
        load_inventory(str(inv), check_files=False)
    pb = tmp_path / "pb.yaml"
    base = "name: t\ntarget: {kernel: 'twin:7.2.14-twin'}\nstages: [{name: all}]\n"
    pb.write_text(base + "kexec_method: direct\nallow_fdstore_loss: true\n")
    p = load_playbook(str(pb))
    assert p.kexec_method == "direct" and p.allow_fdstore_loss is True
    pb.write_text(base + "allow_fdstore_loss: maybe\n")
    with pytest.raises(PlaybookError, match="allow_fdstore_loss: must be true or false"):
        load_playbook(str(pb))


def test_bad_kexec_method_is_one_line_exit_2(tmp_path: Path) -> None:
    inv = tmp_path / "inv.yaml"
    inv.write_text("all:\n  hosts:\n    a: {kho_transport: sim, kho_kexec_method: fast}\n")
    pb = tmp_path / "pb.yaml"
    pb.write_text("name: t\ntarget: {kernel: 'twin:7.2.14-twin'}\nstages: [{name: all}]\n")
    cli = str(Path(sys.executable).parent / "kho-fleet")
    r = subprocess.run([cli, "rollout", "--playbook", str(pb),
                        "--inventory", str(inv), "--dry-run"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "kho_kexec_method" in r.stderr


# `systemd-analyze fdstore` on the sid lab guest (systemd 262.1), 2026-12-03, after a
# `systemctl kexec`: journald's sockets, udevd's inotify fd, and the probe's memfd as LUO
# restored it -- named "/ (deleted)", not "/memfd:probe (deleted)" any more.
SID_JOURNALD = """FDNAME TYPE DEVNO INODE RDEVNO PATH          FLAGS
stored sock 0:9    3382 -      socket:[3382] rw
stored sock 0:9    3205 -      socket:[3205] rw
"""
SID_UDEVD = """FDNAME  TYPE DEVNO INODE RDEVNO PATH               FLAGS
inotify -    0:15     50 -      anon_inode:inotify ro
"""
SID_PROBE_RESTORED = """FDNAME TYPE DEVNO INODE RDEVNO PATH        FLAGS
probe  reg  0:1      10 -      / (deleted) rw
"""


def test_a_memfd_restored_by_luo_still_counts_as_preservable() -> None:
    """The sid lab's direct-method refusal missed the probe's store after one systemctl
    kexec (the restored memfd has no /memfd: name): a direct kexec then lost it."""
    from kho_agent.systemdhost import count_memfds
    assert count_memfds(SID_JOURNALD) == (0, ["stored", "stored"])
    assert count_memfds(SID_UDEVD) == (0, ["inotify"])
    n, names = count_memfds(SID_PROBE_RESTORED)
    assert (n, names) == (1, ["probe"])
    probe = FdStoreUnit("kho-probe.service", 1, "yes", 8, names, memfds=n)
    journald = FdStoreUnit("systemd-journald.service", 2, "yes", 4224, ["stored"] * 2,
                           memfds=count_memfds(SID_JOURNALD)[0])
    d = choose_method("direct", InitSystem("systemd", 262), [journald, probe], False)
    assert not d.ok and "kho-probe.service (1 fd)" in str(d.refused)
    assert "journald" not in str(d.refused)
