"""End to end on the sid lab (systemd 262.1, Linux 7.2.13 kho-v4 -> 7.2.13-lab-b): the
`systemd` kexec method with the holder as kho-agent-holder.service and the boot-time
verify unit, next to a probe service of this test's own that keeps an 8 MiB memfd in its
FD store with FileDescriptorStorePreserve=yes.

Tests run in file order on two guests (`kho-fleet lab up 2 --suite sid`), each with the
probe:
  a) one rollout with kexec_method: systemd over both: on each, the agent's workloads
     verified (bytes and PFNs) by kho-agent-verify.service at boot and collected by the
     controller, the probe's memfd back with identical bytes, the blackout measured from
     the boot unit, a kexec (kexec count +1), not a cold boot;
  b) kexec_method: direct on one guest (lab-1): preflight refuses, naming
     kho-probe.service; with allow_fdstore_loss: true the rollout proceeds and the report
     names the lost store.

Skips with the reason when the lab kernels, QEMU or a cached sid rootfs are absent
(`kho-fleet lab build-rootfs --suite sid --cache DIR`; KHO_LAB_SID_CACHE names DIR,
default the lab cache). KHO_LAB_WORK: where the guests and reports go (default a tmp dir).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml
from labsupport import KERNEL_A, KERNEL_B, LAB_CACHE, REPO, kho_fleet_cli, lab_guest_skip_reason

from kho_fleet.lab.fleet import LabFleet
from kho_fleet.rollout import Rollout, RolloutOptions

pytestmark = pytest.mark.lab

CACHE = Path(os.environ.get("KHO_LAB_SID_CACHE", LAB_CACHE))
HOSTS = ("lab-1", "lab-2")
HOST = HOSTS[0]                              # test b's guest
PROBE = "kho-probe.service"
PYZ = "/var/lib/kho-agent/kho-agent.pyz"     # where deploy/systemd's units run the agent
WORKLOADS = {"sessions": [
    {"name": "vm-ram", "memfds": [{"token": 0x1001, "size": "16MiB", "seed": 1}]},
    {"name": "cache", "memfds": [{"token": 0x2001, "size": "4MiB", "seed": 2}]}]}
FIGURES: dict[str, Any] = {}
BOOT_TIMEOUT_S = 1500

# The probe: a Type=notify service that keeps an 8 MiB memfd in PID 1's FD store. Started
# with it in LISTEN_FDS (after a systemctl kexec) it records what came back; otherwise it
# makes the memfd and stores it. /run/kho-probe.json says which, with the sha256.
PROBE_PY = r'''
import array, hashlib, json, os, socket, time
data = hashlib.sha256(b"kho-probe").digest() * (8 << 15)
def notify(msg, fds=()):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    p = os.environ["NOTIFY_SOCKET"]
    s.connect("\0" + p[1:] if p.startswith("@") else p)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    s.sendmsg([msg.encode()], anc)
got = {}
if os.environ.get("LISTEN_PID") == str(os.getpid()):
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for i in range(int(os.environ.get("LISTEN_FDS", "0"))):
        fd = 3 + i
        got[names[i] if i < len(names) else str(i)] = hashlib.sha256(
            os.pread(fd, os.fstat(fd).st_size, 0)).hexdigest()
if "probe" in got:
    out = {"mode": "back", "sha256": got["probe"], "t": time.time()}
else:
    fd = os.memfd_create("probe")
    os.write(fd, data)
    notify("FDSTORE=1\nFDNAME=probe", [fd])
    out = {"mode": "new", "sha256": hashlib.sha256(data).hexdigest(), "t": time.time()}
out["want"] = hashlib.sha256(data).hexdigest()
with open("/run/kho-probe.json", "w") as f:
    json.dump(out, f)
notify("READY=1")
while True:
    time.sleep(3600)
'''
PROBE_UNIT = """[Unit]
Description=kho-fleet test probe: an 8 MiB memfd in the FD store (issue 11)
# a workload: after the handover is verified (the verify counts the FD stores first)
Wants=kho-workloads.target
After=kho-workloads.target

[Service]
Type=notify
NotifyAccess=all
FileDescriptorStoreMax=8
FileDescriptorStorePreserve=yes
ExecStart=/usr/bin/python3 /root/kho-probe.py

[Install]
WantedBy=multi-user.target
"""


def _sid_image() -> Optional[Path]:
    from kho_fleet.lab.guest import lab_key
    from kho_fleet.lab.rootfs import RootfsError, cached_rootfs
    if not (CACHE / "lab_ed25519").is_file():
        return None
    try:
        return cached_rootfs(CACHE, KERNEL_A, lab_key(CACHE).public, extra_kernels=[KERNEL_B],
                             suite="sid", mirror="http://deb.debian.org/debian")
    except RootfsError:
        return None


def _skip_reason() -> str:
    why = lab_guest_skip_reason([KERNEL_A, KERNEL_B])
    if why:
        return why
    if _sid_image() is None:
        return (f"no cached sid lab rootfs in {CACHE} (kho-fleet lab build-rootfs --suite sid "
                "--cache DIR, then KHO_LAB_SID_CACHE=DIR)")
    return ""


@dataclass
class Lab:
    work: Path
    inventory: Path
    fleet: LabFleet
    seen: dict[str, Any] = field(default_factory=dict)

    def ssh(self, cmd: str, timeout: float = 120.0, stdin: Optional[bytes] = None,
            host: str = HOST) -> str:
        g = self.fleet.guest(self.fleet.record(host))
        try:
            return g.run(cmd, timeout=timeout, check=True, stdin=stdin)[1]
        finally:
            g.stop()

    def probe(self, host: str = HOST) -> dict:
        return json.loads(self.ssh("cat /run/kho-probe.json", host=host))

    def boot_id(self, host: str = HOST) -> str:
        return self.ssh("cat /proc/sys/kernel/random/boot_id", host=host).strip()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    why = _skip_reason()
    if why:
        print(f"\nlab systemd skipped: {why}")
        pytest.skip(why)
    base = os.environ.get("KHO_LAB_WORK")
    work = (Path(base) / time.strftime("systemd-%H%M%S") if base
            else tmp_path_factory.mktemp("lab-systemd"))
    work.mkdir(parents=True, exist_ok=True)
    FIGURES["loadavg_1m"] = {"start": os.getloadavg()[0]}
    guests, inv = work / "guests", work / "lab.yaml"
    t0 = time.monotonic()
    proc = kho_fleet_cli("lab", "up", str(len(HOSTS)), "--suite", "sid", "--kernel", KERNEL_A,
                         "--extra-kernel", KERNEL_B, "--workdir", guests, "--inventory", inv,
                         "--cache", CACHE, "--boot-timeout", "600", "--json", timeout=900)
    try:
        assert proc.returncode == 0, proc.stderr
        FIGURES["lab_up_s"] = round(time.monotonic() - t0, 1)
        # a sid guest under TCG on a loaded 2-core machine took > 10 min from kexec to SSH
        # (2026-12-03): the inventory's boot timeout (lab up writes 180 s) wins over the
        # playbook's, so raise it here
        doc = yaml.safe_load(inv.read_text())
        for host in HOSTS:
            doc["all"]["hosts"][host]["kho_boot_timeout"] = BOOT_TIMEOUT_S
        inv.write_text(yaml.safe_dump(doc, sort_keys=False))
        lab = Lab(work, inv, LabFleet(guests))
        for host in HOSTS:
            _install(lab, host)
        yield lab
    finally:
        FIGURES["loadavg_1m"]["end"] = os.getloadavg()[0]
        down = kho_fleet_cli("lab", "down", "--workdir", guests, "--json", timeout=180)
        print(f"\nlab down: rc {down.returncode}; figures: {json.dumps(FIGURES)}")


def _install(lab: Lab, host: str) -> None:
    """The probe service, deploy/systemd's units and the agent where they run it."""
    from kho_fleet.agentbuild import build_agent
    pyz, _ = build_agent(str(lab.work / "kho-agent.pyz"))
    lab.ssh("mkdir -p /var/lib/kho-agent/state", host=host)
    lab.ssh(f"cat > {PYZ}", stdin=Path(pyz).read_bytes(), host=host)
    lab.ssh("cat > /root/kho-probe.py", stdin=PROBE_PY.encode(), host=host)
    lab.ssh(f"cat > /etc/systemd/system/{PROBE}", stdin=PROBE_UNIT.encode(), host=host)
    for unit in sorted((REPO / "deploy/systemd").iterdir()):
        lab.ssh(f"cat > /etc/systemd/system/{unit.name}", stdin=unit.read_bytes(), host=host)
    lab.ssh(f"systemctl daemon-reload && systemctl enable {PROBE} kho-workloads.target "
            f"kho-agent-verify.service && systemctl start {PROBE}", host=host)
    p = lab.probe(host)
    assert p["mode"] == "new" and p["sha256"] == p["want"], p


def _playbook(lab: Lab, name: str, hosts: str, **extra: Any) -> Path:
    doc = {"name": f"lab systemd {name}", "hosts": hosts,
           "target": {"kernel": str(KERNEL_B), "cmdline": "reuse",
                      "sha256": hashlib.sha256(KERNEL_B.read_bytes()).hexdigest()},
           "workloads": WORKLOADS,
           "stages": [{"name": "all", "gate": {"all_workloads_verified": True}}],
           "on_failure": "halt",
           "timeouts": {"ssh_s": 60, "boot_s": BOOT_TIMEOUT_S, "verify_s": 900},
           **extra}
    p = lab.work / f"playbook-{name}.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def _rollout(lab: Lab, name: str, hosts: tuple[str, ...] = (HOST,),
             **extra: Any) -> tuple[Rollout, dict, dict[str, Optional[dict]]]:
    """One rollout over `hosts`; the fleet report and each host's agent report (None:
    the host wrote none)."""
    opts = RolloutOptions(rollouts_dir=str(lab.work / "rollouts"),
                          reports_dir=str(lab.work / "reports"), sim_dir=str(lab.work / "sim"))
    t0 = time.monotonic()
    ro = Rollout.start(str(_playbook(lab, name, ",".join(hosts), **extra)),
                       str(lab.inventory), opts)
    fleet = ro.run()
    FIGURES.setdefault("rollout_s", {})[name] = round(time.monotonic() - t0, 1)
    reps: dict[str, Optional[dict]] = {}
    for host in hosts:
        path = lab.work / "reports" / ro.id / "hosts" / f"{host}.json"
        reps[host] = json.loads(path.read_text())["agent"] if path.exists() else None
    return ro, fleet, reps


def test_a_systemd_method_restores_at_boot_and_keeps_the_probe(lab: Lab) -> None:
    boots0 = {h: lab.boot_id(h) for h in HOSTS}
    ro, fleet, reps = _rollout(lab, "a", HOSTS, kexec_method="systemd")
    assert fleet["rollout"]["status"] == "completed", fleet
    for host in HOSTS:
        rep = reps[host]
        assert rep is not None and rep["result"] == "success", (host, rep and rep["failure"])
        assert rep["kexec_method"] == "systemd"
        for w in rep["workloads"]:
            assert w["verified"] and w["pfns_identical"], (host, w)
        # a kexec into 7.2.13-lab-b, not a cold boot
        assert rep["kernel"]["to"]["release"] == "7.2.13-lab-b"
        assert (rep["kexec_metadata"] or {}).get("kexec_count", 0) >= 1
        assert lab.boot_id(host) != boots0[host]
        # the probe's memfd came back through PID 1's FD store, byte for byte
        p = lab.probe(host)
        assert p["mode"] == "back" and p["sha256"] == p["want"], (host, p)
        assert {"unit": PROBE, "before": 1, "after": 1, "lost": 0} in rep["fdstores"]
        # verified by the boot unit, collected by the controller; blackout from the unit
        events = [e.event for e in ro.db.events(host)]
        assert "verify collected" in events, (host, events)
        boot = rep["boot"]
        assert boot["verified_by"] == "kho-agent-verify.service", (host, boot)
        dt = rep["downtime"]
        assert dt["blackout_s"] == dt["restored_s"] and dt["blackout_s"] > 0
        # the boot unit ran the agent that staged, from its byte-compiled copy
        # (kho_agent.bootcopy): the drop-in stage wrote, and the copy's .pyc files
        dropin = lab.ssh("cat /etc/systemd/system/kho-agent-verify.service.d/"
                         "50-kho-agent-paths.conf", host=host)
        (copy,) = [ln.split("PYTHONPATH=", 1)[1].rstrip('"') for ln in dropin.splitlines()
                   if "PYTHONPATH=" in ln]
        assert "/store/" in copy and ".pyz.d/" in copy, dropin
        assert lab.ssh(f"ls {copy}/COMPLETE {copy}/kho_agent/__pycache__/cli.*.pyc",
                       host=host).count("\n") == 2
        FIGURES.setdefault("a", {})[host] = {
            "downtime": dt, "tree": boot["tree"],
            "kpageflags": boot["kpageflags"].get("workloads"),
            "established": boot["established"], "not_established": boot["not_established"]}
    print(f"\na: {json.dumps(FIGURES['a'])}")
    lab.seen["a"] = True


def test_b_direct_refused_then_allowed_with_fdstore_loss(lab: Lab) -> None:
    if "a" not in lab.seen:
        pytest.skip("needs test a")
    boot0 = lab.boot_id()
    _, fleet, _ = _rollout(lab, "b-refused", kexec_method="direct")
    assert fleet["rollout"]["status"] == "halted", fleet
    (failure,) = fleet["failures"]
    assert failure["phase"] == "preflight" and PROBE in failure["reason"], failure
    assert lab.boot_id() == boot0                    # nothing was kexec'd
    _, fleet, reps = _rollout(lab, "b-allowed", kexec_method="direct", allow_fdstore_loss=True)
    assert fleet["rollout"]["status"] == "completed", fleet
    rep = reps[HOST]
    assert rep is not None and rep["result"] == "success" and rep["kexec_method"] == "direct"
    lost = [u for u in rep["fdstores"] if u["unit"] == PROBE]
    assert lost == [{"unit": PROBE, "before": 1, "after": 0, "lost": 1}], rep["fdstores"]
    p = lab.probe()
    assert p["mode"] == "new"          # started again with nothing in LISTEN_FDS
