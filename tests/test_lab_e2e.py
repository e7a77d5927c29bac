"""End to end on the real kernel: `kho-fleet lab up 2` boots two QEMU guests (Linux 7.2.13,
KHO kho-v4, LUO luo-v5) once for the module, and the rollout engine drives them through
real kexec handovers over SSH, pushing the agent zipapp itself.

The tests share the guests and run in file order, each building on the one before:
  a) 7.2.13 -> 7.2.13-lab-b on both guests, two memfd workloads each (64 MiB and 8 MiB,
     in two LUO sessions); `kho-fleet lab dump` of lab-1 taken between snapshot and kexec
     (from the rollout's progress hook) must agree with the agent's snapshot under
     `kho-fleet inspect`;
  b) a second handover in a row, back to 7.2.13: kexec count 2, the same pages again;
  c) a target speaking another KHO ABI (kho-v3) is refused at preflight, nothing kexec'd;
  d) the agent's holder dies between RETRIEVE and FINISH (KHO_AGENT_FAULT through the
     inventory's kho_agent_env): the report names the workload that was lost.
Timings are printed (run with -s); docs/lab.md records what this machine measured.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import yaml
from labsupport import (
    KERNEL_A,
    KERNEL_B,
    KERNEL_V3,
    Coverage,
    kho_fleet_cli,
    lab_guest_skip_reason,
    rootfs_skip_reason,
)
from labsupport import LAB_CACHE as CACHE

from kho_fleet.lab.fleet import LabFleet
from kho_fleet.rollout import Rollout, RolloutOptions

pytestmark = pytest.mark.lab

SHA = {KERNEL_A: "98571422ee7ff2d57d4c209de471e3e5c0d74670dfc43b1722a98d04967b9c85",
       KERNEL_B: "72df4671148f653eafb22f2459dc0f565884b60bb40ed164ee9b56502051b7d3",
       KERNEL_V3: "1d60d0350b6abc73d56f1a0645605743ff54973a8a89c297ae22febfcd368ef0"}
HOSTS = ["lab-1", "lab-2"]
STATE_DIR = "/var/lib/kho-agent/state"          # the inventory's default kho_agent_dir
WORKLOADS = {"sessions": [
    {"name": "vm-ram", "memfds": [{"token": 0x1001, "size": "64MiB", "seed": 1}]},
    {"name": "cache", "memfds": [{"token": 0x2001, "size": "8MiB", "seed": 2}]}]}
WORKLOAD_PAGES = (72 << 20) // 4096
FIGURES: dict[str, Any] = {}                     # printed at the end of the module


def _skip_reason() -> str:
    """Why this module cannot run here ("" if it can)."""
    return (lab_guest_skip_reason([KERNEL_A, KERNEL_B, KERNEL_V3])
            or rootfs_skip_reason(CACHE, KERNEL_A, [KERNEL_B]))


def cli(*args: Any, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return kho_fleet_cli(*args, timeout=timeout)


@dataclass
class Lab:
    """The module's two guests: their workdir, inventory and the fleet that tracks them."""

    work: Path
    inventory: Path
    fleet: LabFleet
    up: dict
    seen: dict[str, Any] = field(default_factory=dict)

    def ssh(self, host: str, cmd: str, timeout: float = 60.0) -> str:
        """stdout of `cmd` run as root on `host` (must exit 0)."""
        g = self.fleet.guest(self.fleet.record(host))
        try:
            return g.run(cmd, timeout=timeout, check=True)[1]
        finally:
            g.stop()

    def boot_ids(self) -> dict[str, str]:
        """Every guest's boot_id (a new one after each kexec)."""
        return {h: self.ssh(h, "cat /proc/sys/kernel/random/boot_id").strip() for h in HOSTS}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """`kho-fleet lab up 2` once for the module; `kho-fleet lab down` at its end."""
    why = _skip_reason()
    if why:
        print(f"\nlab e2e skipped: {why}")
        pytest.skip(why)
    work = tmp_path_factory.mktemp("lab-e2e")
    FIGURES["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
    FIGURES["loadavg_1m"] = {"start": os.getloadavg()[0]}   # other work on the machine
    guests, inv = work / "guests", work / "lab.yaml"
    t0 = time.monotonic()
    proc = cli("lab", "up", "2", "--kernel", KERNEL_A, "--extra-kernel", KERNEL_B,
               "--workdir", guests, "--inventory", inv, "--cache", CACHE, "--json")
    try:
        assert proc.returncode == 0, proc.stderr
        up = json.loads(proc.stdout)
        FIGURES["lab_up_s"] = round(time.monotonic() - t0, 1)
        FIGURES["boot_to_ssh_s"] = {g["name"]: round(g["boot_s"], 1) for g in up["guests"]}
        print(f"\nlab up 2: {FIGURES['lab_up_s']}s (boot to SSH {FIGURES['boot_to_ssh_s']})")
        yield Lab(work, inv, LabFleet(guests), up)
    finally:
        FIGURES["loadavg_1m"]["end"] = os.getloadavg()[0]
        t1 = time.monotonic()
        down = cli("lab", "down", "--workdir", guests, "--json", timeout=120)
        print(f"\nlab down: rc {down.returncode} in {time.monotonic() - t1:.1f}s "
              f"{down.stdout.strip()[:200]}")
        print("lab e2e figures: " + json.dumps(FIGURES, indent=1))


def need(lab: Lab, key: str) -> Any:
    """What an earlier test left in lab.seen; skip when it did not get that far."""
    if key not in lab.seen:
        pytest.skip(f"needs an earlier step ({key}) that did not pass")
    return lab.seen[key]


def write_playbook(lab: Lab, name: str, target: Path) -> Path:
    """A one-stage playbook (both guests in parallel) rolling out `target`, sha256-pinned."""
    doc = {"name": f"lab e2e {name}", "hosts": "all",
           "target": {"kernel": str(target), "sha256": SHA[target], "cmdline": "reuse"},
           "workloads": WORKLOADS,
           "stages": [{"name": "all", "max_parallel": 2,
                       "gate": {"all_workloads_verified": True}}],
           "on_failure": "halt", "timeouts": {"ssh_s": 30, "boot_s": 180, "verify_s": 180}}
    p = lab.work / f"playbook-{name}.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def run_rollout(lab: Lab, name: str, target: Path, inventory: Optional[Path] = None,
                progress: Optional[Callable[[str, str, str], None]] = None
                ) -> tuple[Rollout, dict, dict[str, dict]]:
    """Run a rollout in-process; (rollout, fleet report, per-host written reports)."""
    opts = RolloutOptions(rollouts_dir=str(lab.work / "rollouts"),
                          reports_dir=str(lab.work / "reports"), sim_dir=str(lab.work / "sim"),
                          progress=progress)
    t0 = time.monotonic()
    ro = Rollout.start(str(write_playbook(lab, name, target)), str(inventory or lab.inventory),
                       opts)
    fleet = ro.run()
    FIGURES.setdefault("rollout_s", {})[name] = round(time.monotonic() - t0, 1)
    reports = {}
    for h in ro.db.hosts():
        path = lab.work / "reports" / ro.id / "hosts" / f"{h.name}.json"
        reports[h.name] = json.loads(path.read_text())
    return ro, fleet, reports


def step_times(rep: dict) -> dict[str, float]:
    """Seconds of each agent step, from the controller's events ("agent stage": "rc 0 in 2.1s")."""
    out = {}
    for e in rep["controller"]["events"]:
        if e["event"].startswith("agent ") and " in " in (e["detail"] or ""):
            m = re.match(r"rc -?\d+ in ([0-9.]+)s", e["detail"])
            if m:
                out[e["event"][6:]] = float(m.group(1))
    return out


def check_handover(rep: dict, *, frm: str, to: str, count: int) -> None:
    """A successful real-kernel handover: every workload byte- and page-identical."""
    a = rep["agent"]
    assert a["result"] == "success" and a["failure"] is None, a["failure"]
    assert a["kernel"]["from"]["release"] == frm and a["kernel"]["to"]["release"] == to
    assert a["kexec_metadata"]["previous_release"] == frm
    assert a["kexec_metadata"]["kexec_count"] == count
    assert {(w["session"], w["token"]) for w in a["workloads"]} == {("vm-ram", 0x1001),
                                                                  ("cache", 0x2001)}
    for w in a["workloads"]:
        assert w["verified"] and w["pfns_identical"], w
        assert w["sha256_after"] == w["sha256_before"], w
    snap = a["radix"]["snapshot"]
    assert snap["intact"] and snap["workload_pfns_missing"] == {}, snap
    inc = a["radix"]["incoming"]
    assert inc["root"] == snap["root"]
    assert inc["intact"] is False        # Linux 7.2 reuses the old tree's pages (finding 4)
    d = a["downtime"]
    assert all(v is not None and v > 0 for v in d.values()), d
    assert 0 < rep["controller"]["downtime_s"] < 180


def record_figures(name: str, reports: dict[str, dict]) -> None:
    """Downtime (controller and agent) and agent step times per host, for docs/lab.md."""
    FIGURES[name] = {h: {"controller_downtime_s": round(r["controller"]["downtime_s"], 1),
                         "agent_downtime": r["agent"]["downtime"],
                         "steps_s": step_times(r)} for h, r in reports.items()}
    for h, f in FIGURES[name].items():
        print(f"\n{name} {h}: controller downtime {f['controller_downtime_s']}s, agent "
              f"{f['agent_downtime']}, steps {f['steps_s']}")


def test_lab_up_status_inventory(lab: Lab) -> None:
    """`lab up` wrote a usable inventory and known_hosts; `lab status` sees both guests."""
    from kho_fleet.inventory import load_inventory
    inv = load_inventory(str(lab.inventory))
    assert list(inv.hosts) == HOSTS
    for g in lab.up["guests"]:
        h = inv.hosts[g["name"]]
        assert h.address == "127.0.0.1" and h.port == g["port"] and h.user == "root"
        assert h.key_file == lab.up["key"] and h.boot_timeout == 180
        assert h.ssh_known_hosts == lab.up["known_hosts"] and h.ssh_trust == "known_hosts"
    known = Path(lab.up["known_hosts"]).read_text().splitlines()
    assert sorted(ln.split()[0] for ln in known) == sorted(f"[127.0.0.1]:{g['port']}"
                                                           for g in lab.up["guests"])
    proc = cli("lab", "status", "--workdir", lab.fleet.workdir, "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["name"], r["state"], r["release"]) for r in rows] == [
        ("lab-1", "up", "7.2.13"), ("lab-2", "up", "7.2.13")]
    assert {r["pid"] for r in rows} == {g["pid"] for g in lab.up["guests"]}
    # a second `lab up` on the same workdir is refused while the guests run
    proc = cli("lab", "up", "1", "--kernel", KERNEL_A, "--workdir", lab.fleet.workdir,
               "--inventory", lab.work / "other.yaml", "--cache", CACHE)
    assert proc.returncode == 2 and "already running" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = cli("lab", "dump", "lab-9", "--out", lab.work / "x.core", "--workdir",
               lab.fleet.workdir)
    assert proc.returncode == 2 and "no lab guest 'lab-9'" in proc.stderr
    lab.seen["up"] = True


def test_a_upgrade_with_dump_between_snapshot_and_kexec(lab: Lab) -> None:
    """a) 7.2.13 -> 7.2.13-lab-b on both guests; a memory dump between snapshot and kexec."""
    need(lab, "up")
    before = lab.boot_ids()
    core = lab.work / "lab-1-before-kexec.core"
    caught: dict[str, Any] = {}

    def hook(host: str, state: str, detail: str) -> None:
        """At lab-1's `snapshotted`: its agent records, then `kho-fleet lab dump`."""
        if host != "lab-1" or state != "snapshotted" or caught:
            return
        try:       # runs in lab-1's rollout thread: the host waits here, before kexec
            caught["preserve"] = json.loads(lab.ssh(host, f"cat {STATE_DIR}/preserve.json"))
            caught["snapshot"] = json.loads(lab.ssh(host, f"cat {STATE_DIR}/snapshot.json"))
            proc = cli("lab", "dump", host, "--out", core, "--workdir", lab.fleet.workdir,
                       "--json", timeout=300)
            caught["dump"] = json.loads(proc.stdout) if proc.returncode == 0 else proc.stderr
        except Exception as e:  # reported by the assertions below
            caught["error"] = repr(e)

    ro, fleet, reports = run_rollout(lab, "a", KERNEL_B, progress=hook)
    assert "error" not in caught, caught
    assert fleet["rollout"]["status"] == "completed" and not fleet["failures"], fleet["failures"]
    for h in HOSTS:
        check_handover(reports[h], frm="7.2.13", to="7.2.13-lab-b", count=1)
    after = lab.boot_ids()
    assert all(after[h] != before[h] for h in HOSTS)
    record_figures("a", reports)

    # the dump taken between snapshot and kexec, read by `kho-fleet inspect`
    assert isinstance(caught.get("dump"), dict), caught.get("dump")
    FIGURES["dump_s"] = caught["dump"]["seconds"]
    t0 = time.monotonic()
    proc = cli("inspect", "--memory", core, "--json", timeout=300)
    FIGURES["inspect_s"] = round(time.monotonic() - t0, 1)
    core.unlink()
    assert proc.returncode == 0, proc.stderr
    ins = json.loads(proc.stdout)
    snap = caught["snapshot"]
    a = reports["lab-1"]["agent"]
    assert ins["kho"]["memory_map_root"] == snap["root"] == a["radix"]["snapshot"]["root"]
    assert ins["radix"]["intact"]
    cover = Coverage.from_blocks(ins["radix"]["blocks"])
    pfns = [p + i for w in caught["preserve"]["workloads"] for p, n in w["pfn_runs"]
            for i in range(n)]
    assert len(pfns) == WORKLOAD_PAGES
    assert all(cover.covers(p * 4096) for p in pfns)
    shas = {(w["session"], w["token"]): w["sha256"] for w in caught["preserve"]["workloads"]}
    assert {(w["session"], w["token"]): w["sha256_after"] for w in a["workloads"]} == shas
    print(f"\ndump {caught['dump']['bytes'] >> 20} MiB in {FIGURES['dump_s']}s, inspect "
          f"{FIGURES['inspect_s']}s: root 0x{snap['root']:x}, {len(pfns)} workload pages covered")
    lab.seen["a"] = {h: {(w["session"], w["token"]): w["sha256_after"]
                         for w in reports[h]["agent"]["workloads"]} for h in HOSTS}


def test_b_second_handover_back_to_7_2_13(lab: Lab) -> None:
    """b) the same memfds through a second kexec in a row: count 2, same bytes and pages."""
    shas = need(lab, "a")
    ro, fleet, reports = run_rollout(lab, "b", KERNEL_A)
    assert fleet["rollout"]["status"] == "completed" and not fleet["failures"], fleet["failures"]
    for h in HOSTS:
        check_handover(reports[h], frm="7.2.13-lab-b", to="7.2.13", count=2)
        ws = reports[h]["agent"]["workloads"]
        assert all(w["source"] == "carried" for w in ws)   # the memfds of handover a, again
        assert {(w["session"], w["token"]): w["sha256_after"] for w in ws} == shas[h]
    record_figures("b", reports)
    lab.seen["b"] = True


def test_c_abi_mismatch_refused_at_preflight(lab: Lab) -> None:
    """c) kho-v4 -> kho-v3 is refused before anything is staged; nobody kexecs."""
    need(lab, "b")
    before = lab.boot_ids()
    pb = write_playbook(lab, "c", KERNEL_V3)
    t0 = time.monotonic()
    proc = cli("rollout", "--playbook", pb, "--inventory", lab.inventory, "--json",
               "--rollouts-dir", lab.work / "rollouts", "--reports-dir", lab.work / "reports",
               "--sim-dir", lab.work / "sim")
    FIGURES.setdefault("rollout_s", {})["c"] = round(time.monotonic() - t0, 1)
    assert proc.returncode == 1, proc.stderr
    fleet = json.loads(proc.stdout)
    assert fleet["rollout"]["status"] == "halted"
    assert sorted(f["host"] for f in fleet["failures"]) == HOSTS
    for f in fleet["failures"]:
        assert f["phase"] == "preflight", f
        assert "kho-v4" in f["reason"] and "kho-v3" in f["reason"], f
    assert lab.boot_ids() == before                    # nobody was kexec'd
    print(f"\nc: refused at preflight in {FIGURES['rollout_s']['c']}s: "
          f"{fleet['failures'][0]['reason']}")
    lab.seen["c"] = True


def test_d_agent_killed_between_retrieve_and_finish(lab: Lab) -> None:
    """d) the holder dies after RETRIEVE_FD, before FINISH: the report names the loss."""
    need(lab, "c")
    doc = yaml.safe_load(lab.inventory.read_text())
    host = doc["all"]["hosts"]["lab-1"]
    # journal memfd first (RETRIEVE_FD #1), then vm-ram's memfd (#2): the holder dies with
    # the vm-ram session retrieved but not FINISHed; the retry holder finds it gone
    host["kho_agent_env"] = {"KHO_AGENT_FAULT": "exit-after-retrieve=2"}
    inv = lab.work / "lab-fault.yaml"
    inv.write_text(yaml.safe_dump({"all": {"hosts": {"lab-1": host}}}, sort_keys=False))
    before = lab.boot_ids()["lab-1"]
    ro, fleet, reports = run_rollout(lab, "d", KERNEL_B, inventory=inv)
    assert fleet["rollout"]["status"] == "halted"
    (fail,) = fleet["failures"]
    assert fail["host"] == "lab-1" and fail["phase"] == "verify", fail
    assert "workload vm-ram/0x1001" in fail["reason"] and "cache" not in fail["reason"], fail
    a = reports["lab-1"]["agent"]
    assert a["result"] == "failed"
    assert a["kexec_metadata"]["kexec_count"] == 3
    ws = {w["session"]: w for w in a["workloads"]}
    lost = ws["vm-ram"]
    assert not lost["verified"] and lost["sha256_after"] is None
    assert "session lost" in lost["error"] and "No such file or directory" in lost["error"]
    assert "died mid-retrieval" in lost["error"]
    kept = ws["cache"]
    assert kept["verified"] and kept["pfns_identical"] and kept["error"] is None
    assert kept["sha256_after"] == lab.seen["a"]["lab-1"][("cache", 0x2001)]
    assert a["journal"]["from"] == "disk"              # the first holder FINISHed it, then died
    assert lab.boot_ids()["lab-1"] != before
    log = lab.ssh("lab-1", f"cat {STATE_DIR}/holder.log")
    assert "KHO_AGENT_FAULT: exiting after RETRIEVE_FD #2" in log
    print(f"\nd: {fail['reason']}")
