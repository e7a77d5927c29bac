"""The real agent (kho-agent.pyz, LinuxKernel) through a whole handover on the real kernel:
Linux 7.2.13 (kho-v4) in QEMU -> 7.2.13-lab-b, two memfds (8 MiB and 64 MiB).

Tests run in file order on one guest and build on each other: preflight (and the ABI
refusal of bzImage-7.2.13-abi-kho-v3) -> stage -> preserve -> snapshot (+ a QMP dump that
`kho-fleet inspect` must agree with) -> kexec --yes -> verify -> report.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from labsupport import KERNEL_A, KERNEL_B, KERNEL_V3, REPO, Coverage, boot_lab_guest, guest_agent
from labsupport import LAB_CACHE as CACHE

from kho_fleet.lab.guest import LabGuest

pytestmark = pytest.mark.lab
PYZ = "/root/kho-agent.pyz"
SPEC = {"sessions": [{"name": "vm-ram", "memfds": [{"token": 0x1001, "size": "64MiB", "seed": 1}]},
                     {"name": "cache", "memfds": [{"token": 0x2001, "size": "8MiB", "seed": 2}]}]}


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabGuest]:
    if not KERNEL_V3.is_file():
        pytest.skip(f"lab kernel not found: {KERNEL_V3}")
    g = boot_lab_guest(tmp_path_factory.mktemp("lab-agent"), CACHE, KERNEL_A, [KERNEL_B],
                       REPO, PYZ)
    try:
        g.put(KERNEL_B, "/root/bzImage-lab-b")
        g.put(KERNEL_V3, "/root/bzImage-abi-kho-v3")
        g.run(["sh", "-c", "cat > /root/spec.json"], stdin=json.dumps(SPEC).encode(), check=True)
        yield g
    finally:
        g.stop()


@pytest.fixture(scope="module")
def seen() -> dict[str, Any]:
    return {}


def agent(g: LabGuest, *args: str, timeout: float = 300.0) -> tuple[int, Any, str]:
    return guest_agent(g, PYZ, *args, timeout=timeout)


def need(seen: dict[str, Any], key: str) -> Any:
    if key not in seen:
        pytest.skip(f"needs an earlier step ({key}) that did not pass")
    return seen[key]


def test_preflight_and_abi_refusal(guest: LabGuest, seen: dict[str, Any]) -> None:
    rc, res, err = agent(guest, "preflight", "--kernel", "/root/bzImage-lab-b",
                         "--spec", "/root/spec.json")
    assert rc == 0, (err, res)
    checks = {c["name"]: c for c in res["checks"]}
    # every blocking check passes; the lab kernel has neither /proc/config.gz nor a lockdown
    # file, so its signed-kexec policy is unknown: a non-blocking check, and said so
    assert all(c["ok"] or not c["blocking"] for c in checks.values()), checks
    assert checks["kexec_sig"]["ok"] or any("signed-kexec" in n for n in res["not_checked"])
    assert "/dev/mem" in checks["physmem"]["detail"]         # no STRICT_DEVMEM in the lab kernel
    assert res["running"]["kho"] == "kho-v4" and res["target"]["release"] == "7.2.13-lab-b"
    rc, res, err = agent(guest, "preflight", "--kernel", "/root/bzImage-abi-kho-v3")
    assert rc == 1
    abi = next(c for c in res["checks"] if c["name"] == "abi")
    assert not abi["ok"] and "kho-v4" in abi["detail"] and "kho-v3" in abi["detail"]
    seen["preflight"] = True


def test_stage_preserve_snapshot(guest: LabGuest, seen: dict[str, Any], tmp_path: Path) -> None:
    need(seen, "preflight")
    rc, staged, err = agent(guest, "stage", "--kernel", "/root/bzImage-lab-b")
    assert rc == 0 and staged["kexec_loaded"], err
    rc, pres, err = agent(guest, "preserve", "--spec", "/root/spec.json")
    assert rc == 0, err
    assert {(w["session"], w["token"]) for w in pres["workloads"]} == {("vm-ram", 0x1001),
                                                                      ("cache", 0x2001)}
    rc, snap, err = agent(guest, "snapshot")
    assert rc == 0, err
    assert snap["intact"] and snap["workload_pfns_missing"] == {}, snap
    assert "truncated" in snap["fdt_source"]                # debugfs kho/out/fdt (finding 3)
    # `kho-fleet inspect` on a dump of the same moment agrees with the agent's snapshot
    dump = tmp_path / "before-kexec.core"
    guest.dump_memory(dump, resume=True)
    proc = subprocess.run([sys.executable, "-m", "kho_fleet.cli", "inspect", "--memory",
                           str(dump), "--json"], capture_output=True, text=True, timeout=300)
    dump.unlink()
    assert proc.returncode == 0, proc.stderr
    ins = json.loads(proc.stdout)
    assert ins["kho"]["memory_map_root"] == snap["root"]
    assert ins["radix"]["intact"]
    cover = Coverage.from_blocks(ins["radix"]["blocks"])
    pfns = [p + i for w in pres["workloads"] for p, n in w["pfn_runs"] for i in range(n)]
    assert len(pfns) == (72 << 20) // 4096
    assert all(cover.covers(p * 4096) for p in pfns)
    seen["pres"] = pres


def test_kexec_verify_report(guest: LabGuest, seen: dict[str, Any]) -> None:
    pres = need(seen, "pres")
    old = guest.boot_id()
    rc, _, err = agent(guest, "kexec")
    assert rc == 1 and "--yes" in err                      # never without the flag
    rc, k, err = agent(guest, "kexec", "--yes")
    assert rc == 0 and k["agent_kexec_s"] < 0.5, err
    t0 = time.monotonic()
    waited = guest.wait_reboot(old)
    rc, rep, err = agent(guest, "verify")
    assert rc == 0, (err, rep)
    print(f"\nreal kexec: SSH back after {waited:.1f}s; downtime {rep['downtime']}")
    assert rep["result"] == "success" and rep["failure"] is None
    assert rep["kernel"]["from"] == {"release": "7.2.13", "kho_compatible": "kho-v4"}
    assert rep["kernel"]["to"]["release"] == "7.2.13-lab-b"
    assert rep["kexec_metadata"]["previous_release"] == "7.2.13"
    assert rep["kexec_metadata"]["kexec_count"] == 1
    before = {(w["session"], w["token"]): w for w in pres["workloads"]}
    for w in rep["workloads"]:
        assert w["verified"] and w["pfns_identical"], w
        assert w["sha256_after"] == before[(w["session"], w["token"])]["sha256"]
    inc = rep["radix"]["incoming"]
    assert inc["root"] == rep["radix"]["snapshot"]["root"]
    assert inc["intact"] is False            # finding 4: the old tree's pages were reused
    d = rep["downtime"]
    assert all(v is not None and v > 0 for v in d.values()), d
    assert d["blackout_s"] < time.monotonic() - t0 + 60
    rc, rep2, err = agent(guest, "report", "--textfile-dir", "/var/lib/node_exporter")
    assert rc == 0 and rep2["result"] == "success", err
    rc, prom, _ = guest.run("cat /var/lib/node_exporter/kho-agent.prom")
    assert rc == 0 and 'kho_agent_handover_success{' in prom
