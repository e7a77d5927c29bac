"""Restore at boot (agent/kho_agent/bootrestore.py, holderstart.py, kpageflags.py) on a twin
host whose PID 1 is systemd 262, through the real `kho-agent` CLI and real processes:

- the holder runs as kho-agent-holder.service (started by the twin's PID 1), hands its
  sessions to PID 1's FD store before `systemctl kexec`, gets them back in LISTEN_FDS in
  the next kernel, and drops them from the store once FINISHed; a forked holder cannot
  (no $NOTIFY_SOCKET), as on a real systemd host;
- kho-agent-verify.service (the twin's PID 1 starts it at boot) verifies; `verify
  --collect` returns its result (blackout measured on the host), the controller's step
  collects it; without the unit, `--collect` exits 3 and verify runs;
- the early reads: the incoming tree read first (blocks held, seconds after kernel
  start), /proc/kpageflags of every preserved page before retrieval, and which was
  established;
- the kpageflags decoder on this machine's real /proc/kpageflags bytes.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kho_agent.kpageflags import KPF, check_preserved, decode, parse_kpageflags
from kho_fleet.sim.handover import run_agent, workload_spec
from kho_fleet.sim.kernelimage import make_kernel_image
from kho_fleet.sim.twinkernel import TwinHandle, start_twin

HOLDER = "kho-agent-holder.service"
VERIFY_UNIT = "kho-agent-verify.service"


def _twin(at_boot: bool) -> Iterator[TwinHandle]:
    d = tempfile.mkdtemp(prefix="twin-", dir="/tmp")
    root = os.path.join(d, "host")
    os.makedirs(os.path.join(root, "etc"))
    init: dict = {"name": "systemd", "version": 262}
    if at_boot:
        init["at_boot"] = {VERIFY_UNIT: {
            "argv": [sys.executable, "-m", "kho_agent", "verify", "--at-boot", "--json",
                     "--compact"],
            "env": {"PYTHONPATH": os.pathsep.join(sys.path), "KHO_AGENT_TWIN": root}}}
    Path(root, "etc/twin-init.json").write_text(json.dumps(init))
    h = start_twin(root, boot_delay=0.2, ram_mib=128)
    try:
        yield h
    finally:
        h.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def unit_twin() -> Iterator[TwinHandle]:
    """systemd 262 twin whose PID 1 starts kho-agent-verify.service after a kexec."""
    yield from _twin(at_boot=True)


@pytest.fixture
def plain_twin() -> Iterator[TwinHandle]:
    """systemd 262 twin without the verify unit."""
    yield from _twin(at_boot=False)


def _before_kexec(h: TwinHandle, tmp_path: Path, method: str = "systemd",
                  kexec_method: str = "systemd") -> tuple[str, dict]:
    """Every agent step up to the kexec; the last one run (the first that failed)."""
    image = make_kernel_image(str(tmp_path / "bzImage-7.2.14-twin"), "7.2.14-twin")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(workload_spec(4)))
    extra = ("--allow-fdstore-loss",) if method == "direct" else ()
    for step, args in (("preflight", ("--kernel", image, "--spec", str(spec),
                                      "--kexec-method", method, *extra)),
                       ("stage", ("--kernel", image)), ("preserve", ("--spec", str(spec))),
                       ("snapshot", ()),
                       ("kexec", ("--yes", "--kexec-method", kexec_method))):
        r = run_agent(h.root, step, *args)
        if r["rc"] != 0:
            break
    return step, r


def _kexec_and_boot(h: TwinHandle, tmp_path: Path) -> None:
    boots = h.state()["boot_count"]
    step, r = _before_kexec(h, tmp_path)
    assert r["rc"] == 0, (step, r["stderr"])
    h.wait_ready(30, boot_count=boots + 1)


def _check_workloads(rep: dict) -> None:
    assert rep["result"] == "success", rep["failure"]
    assert rep["workloads"]
    for w in rep["workloads"]:
        assert w["verified"] and w["pfns_identical"], w


def test_holder_runs_as_a_unit_and_its_sessions_come_back_through_pid1(
        plain_twin: TwinHandle, tmp_path: Path) -> None:
    h = plain_twin
    _kexec_and_boot(h, tmp_path)
    rep = run_agent(h.root, "verify")["json"]
    _check_workloads(rep)
    log = h.kernel().dmesg()
    # the new kernel's PID 1 started the holder with the stored sessions in LISTEN_FDS
    assert f"Started {HOLDER}" in log and "fds from its store" in log, log
    # FINISHed sessions left the holder unit's store: the next kexec does not carry them
    assert [u for u in h.kernel().fdstore_units() if u.unit == HOLDER and u.count] == []
    # systemd's shutdown on the old kernel: the holder's stop stamp after kexec_exec
    assert rep["downtime"]["systemd_shutdown_s"] is not None
    assert 0 <= rep["downtime"]["systemd_shutdown_s"] < rep["downtime"]["kexec_to_kernel_s"]
    assert rep["boot"]["verified_by"] == "controller" and rep["boot"]["collected"] is False


def test_a_forked_holder_cannot_hand_its_sessions_to_pid1(plain_twin: TwinHandle,
                                                          tmp_path: Path) -> None:
    """What real systemd hosts saw before the holder unit: `no $NOTIFY_SOCKET`."""
    step, r = _before_kexec(plain_twin, tmp_path, method="direct", kexec_method="systemd")
    stderr = r["stderr"]
    assert step == "kexec" and r["rc"] == 1, (step, stderr)
    assert "NOTIFY_SOCKET" in stderr and HOLDER in stderr, stderr
    assert len(stderr.splitlines()) == 1
    assert plain_twin.state()["kexec_count"] == 0            # nothing was kexec'd


def test_boot_unit_verifies_and_the_controller_collects(unit_twin: TwinHandle,
                                                        tmp_path: Path) -> None:
    h = unit_twin
    _kexec_and_boot(h, tmp_path)
    t_back = time.time()
    r = run_agent(h.root, "verify", "--collect")   # waits for the unit if it still runs
    assert r["rc"] == 0, r["stderr"]
    rep = r["json"]
    _check_workloads(rep)
    boot = rep["boot"]
    assert boot["verified_by"] == VERIFY_UNIT and boot["collected"] is True
    # the unit's own log: it ran in this boot and verified
    unit_rep = json.loads(Path(h.root, "var/log", f"{VERIFY_UNIT}.log").read_text())
    assert unit_rep["result"] == "success" and unit_rep["boot"]["collected"] is False
    # blackout: kexec -> restored on the host, by the unit, not when the controller came
    st, dt = rep["stamps"], rep["downtime"]
    assert st["kexec_exec"] < st["kernel_start"] <= st["agent_start"] < st["restored"]
    assert dt["blackout_s"] == dt["restored_s"] == round(st["restored"] - st["kexec_exec"], 6)
    assert st["agent_start"] < t_back + 5
    # the early reads, before retrieval: the tree first, then kpageflags
    tree, kpf = boot["tree"], boot["kpageflags"]
    assert tree["present"] and tree["blocks_total"] == rep["radix"]["snapshot"]["blocks"]
    assert 0 <= tree["read_s_after_kernel_start"] <= kpf["read_s_after_kernel_start"]
    assert tree["read_at"] < kpf["read_at"] < st["restored"]
    # the twin, like the lab kernel, reuses the old tree's node pages in early boot: the
    # tree is gone, the kpageflags check still proves the pages were honoured
    assert tree["blocks_held"] == 0 and not tree["intact"]
    assert [x for x in boot["not_established"] if x.startswith("radix tree: not intact")]
    pages = kpf["workloads"]
    assert pages["honoured"] and pages["pages"] == sum(w["size"] for w in rep["workloads"]) // 4096
    assert pages["no_flags"] == pages["pages"]                 # lab finding 2
    assert [x for x in boot["established"] if x.startswith("kpageflags: all")]
    # the rest of the snapshot (LUO's and KHO's own blobs) is counted, not judged
    assert kpf["snapshot_other"]["pages"] == (rep["radix"]["snapshot"]["pages_by_order"]["0"]
                                              - pages["pages"])
    # a plain `verify` (an older controller) collects too, and the report step keeps it
    again = run_agent(h.root, "verify")["json"]
    assert again["stamps"]["restored"] == st["restored"]
    final = run_agent(h.root, "report")["json"]
    assert final["boot"]["verified_by"] == VERIFY_UNIT


def test_without_the_unit_collect_exits_3_and_verify_runs(plain_twin: TwinHandle,
                                                          tmp_path: Path) -> None:
    h = plain_twin
    _kexec_and_boot(h, tmp_path)
    r = run_agent(h.root, "verify", "--collect")
    assert r["rc"] == 3 and r["json"] is None
    assert len(r["stderr"].splitlines()) == 1 and "nothing to collect" in r["stderr"]
    rep = run_agent(h.root, "verify")["json"]
    _check_workloads(rep)
    assert rep["boot"]["verified_by"] == "controller"
    assert rep["boot"]["kpageflags"]["workloads"]["honoured"]


def test_kpageflags_check_names_pages_handed_out_again() -> None:
    lru = 1 << KPF["LRU"] | 1 << KPF["UPTODATE"]
    c = check_preserved([0x10, 0x11, 0x12], [0, 1 << KPF["BUDDY"], lru])
    assert not c.honoured and (c.buddy, c.lru) == (1, 1)
    assert c.examples == ["pfn 0x11: BUDDY", "pfn 0x12: UPTODATE|LRU"]
    with pytest.raises(ValueError):
        parse_kpageflags(b"\0" * 12)


KPAGEFLAGS = "/proc/kpageflags"


def _readable(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return len(f.read(8)) == 8
    except OSError:
        return False


@pytest.mark.skipif(not _readable(KPAGEFLAGS) or not _readable("/proc/self/pagemap"),
                    reason="/proc/kpageflags or pagemap not readable (needs root)")
def test_kpageflags_decoder_on_this_machines_real_bytes() -> None:
    """A page of a memfd we fill is page cache in use (UPTODATE, not free: the check says
    it is not a preserved page); the first 64 Ki PFNs of this machine include free pages
    (BUDDY)."""
    fd = os.memfd_create("kpf-probe")
    try:
        os.write(fd, b"\x5a" * 4096 * 4)
        with mmap.mmap(fd, 4096 * 4) as m:
            addr = struct.unpack("Q", struct.pack("P", _addr_of(m)))[0]
            with open("/proc/self/pagemap", "rb") as pm:
                pm.seek(addr // 4096 * 8)
                ent = struct.unpack("Q", pm.read(8))[0]
        assert ent >> 63 & 1, "page not present"
        pfn = ent & ((1 << 55) - 1)
        assert pfn, "pagemap gave PFN 0 (no CAP_SYS_ADMIN?)"
        with open(KPAGEFLAGS, "rb") as f:
            f.seek(pfn * 8)
            (flags,) = parse_kpageflags(f.read(8))
            f.seek(0)
            first = parse_kpageflags(f.read(8 << 16))
    finally:
        os.close(fd)
    names = decode(flags)
    assert "UPTODATE" in names and "BUDDY" not in names, names     # seen: +DIRTY|ACTIVE|..
    c = check_preserved([pfn], [flags])
    # on an LRU or not yet (seen both ways on this machine): in use either way
    assert not c.honoured and (c.lru or c.other_bad) and c.buddy == 0 and c.no_flags == 0
    assert any(f >> KPF["BUDDY"] & 1 for f in first)
    assert all(set(decode(f)) <= set(KPF) | {f"BIT{b}" for b in range(64)} for f in first[:64])


def _addr_of(m: mmap.mmap) -> int:
    """The address of an mmap's first byte (touching it faults the page in)."""
    import ctypes
    buf = (ctypes.c_char * len(m)).from_buffer(m)
    try:
        _ = buf[0]
        return ctypes.addressof(buf)
    finally:
        del buf


def test_rollout_collects_the_boot_units_result(sim: Path) -> None:
    """`kho-fleet rollout` (the engine's hoststeps) on two systemd twins with kexec_method
    systemd: t1's PID 1 runs kho-agent-verify.service at boot and the controller collects
    its result; t2 has no such unit and the controller verifies itself."""
    import yaml

    from kho_fleet.rollout import Rollout, RolloutOptions
    for name, unit in (("t1", True), ("t2", False)):
        root = sim / "sim" / name
        (root / "etc").mkdir(parents=True)
        init: dict = {"name": "systemd", "version": 262}
        if unit:
            init["at_boot"] = {VERIFY_UNIT: {
                "argv": [sys.executable, "-m", "kho_agent", "verify", "--at-boot", "--json",
                         "--compact", "--state-dir", str(root / "var/lib/kho-agent/state")],
                "env": {"PYTHONPATH": os.pathsep.join(sys.path), "KHO_AGENT_TWIN": str(root)}}}
        (root / "etc/twin-init.json").write_text(json.dumps(init))
    inv = sim / "inventory.yaml"
    inv.write_text(yaml.safe_dump({"all": {"vars": {
        "kho_transport": "sim", "kho_boot_timeout": 30, "kho_sim_boot_delay": 0.1,
        "kho_sim_ram_mib": 96}, "hosts": {"t1": None, "t2": None}}}))
    pb = sim / "playbook.yaml"
    pb.write_text(yaml.safe_dump({
        "name": "boot restore", "hosts": "all", "target": {"kernel": "twin:7.2.14-twin"},
        "workloads": {"sessions": [{"name": "vm-ram", "memfds": [
            {"token": 0x1001, "size": "2MiB", "seed": 1}]}]},
        "stages": [{"name": "all", "hosts": "all", "max_parallel": 2}],
        "kexec_method": "systemd",
        "timeouts": {"ssh_s": 15, "boot_s": 30, "verify_s": 60}}, sort_keys=False))
    ro = Rollout.start(str(pb), str(inv), RolloutOptions(str(sim / "rollouts"),
                                                         str(sim / "reports"), str(sim / "sim")))
    fleet = ro.run()
    assert fleet["rollout"]["status"] == "completed", fleet
    events = {h: [e.event for e in ro.db.events(h)] for h in ("t1", "t2")}
    assert "verify collected" in events["t1"], events["t1"]
    assert "verify collected" not in events["t2"] and "agent verify" in events["t2"]
    for h, by in (("t1", VERIFY_UNIT), ("t2", "controller")):
        rep = json.loads((sim / "reports" / ro.id / "hosts" / f"{h}.json").read_text())["agent"]
        assert rep["result"] == "success" and rep["kexec_method"] == "systemd", rep["failure"]
        assert rep["boot"]["verified_by"] == by
        assert rep["downtime"]["blackout_s"] == rep["downtime"]["restored_s"]
        assert rep["downtime"]["systemd_shutdown_s"] is not None


def test_boot_unit_does_nothing_after_a_kexec_it_was_not_asked_for(
        plain_twin: TwinHandle, tmp_path: Path) -> None:
    """A plain `systemctl kexec` on a host with the unit installed: `verify --at-boot` exits
    0 at once, retrieves nothing, writes no verify result."""
    r = run_agent(plain_twin.root, "verify", "--at-boot")
    assert r["rc"] == 0 and r["json"]["result"] == "none", r
    assert "no handover in flight" in r["json"]["reason"]
    assert not Path(plain_twin.root, "var/lib/kho-agent/verify.json").exists()


def test_early_reads_before_any_unit_are_reported_beside_the_verify(
        plain_twin: TwinHandle, tmp_path: Path) -> None:
    """`kho-agent early` (what an initramfs hook runs) reads the incoming tree and
    kpageflags only: it retrieves nothing, and the verify of the same boot reports its
    reads in boot.early, earlier than its own."""
    h = plain_twin
    _kexec_and_boot(h, tmp_path)
    r = run_agent(h.root, "early")
    assert r["rc"] == 0, r["stderr"]
    early = r["json"]
    assert early["by"] == "initramfs" and early["tree"]["present"] is True
    assert early["kpageflags"]["workloads"]["honoured"] is True
    assert h.kernel().fdstore_units()                        # nothing retrieved yet
    rep = run_agent(h.root, "verify")["json"]
    _check_workloads(rep)
    boot = rep["boot"]
    assert boot["early"]["by"] == "initramfs"
    assert boot["early"]["tree"]["read_s_after_kernel_start"] \
        <= boot["tree"]["read_s_after_kernel_start"]
    assert boot["early"]["kpageflags"] == early["kpageflags"]
    # an early.json of another boot is not reported
    _kexec_and_boot(h, tmp_path)
    rep2 = run_agent(h.root, "verify")["json"]
    _check_workloads(rep2)
    assert rep2["boot"]["early"] is None
