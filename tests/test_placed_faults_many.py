"""Placed twin faults in the inventory and several at once; stale-page is an old copy.

Real CLIs as subprocesses: `kho-fleet rollout` on sim hosts whose inventory names placed
faults (kho_sim_faults), `kho-fleet sim handover` with two `--fault` options. The twin
records what it did (last_faults in its state file); the JSON report must name exactly
those pages (offset in the memfd, PFN before and after) and no other. Bad placed faults
are refused before anything starts: one line naming the file and the host, exit 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from twinsupport import image, kexec

from kho_agent.kernel import twinproto as proto
from kho_fleet.sim.twinserver import stale_copy

KHO_FLEET = Path(sys.executable).parent / "kho-fleet"
PS = 4096
WORKLOADS = {"sessions": [
    {"name": "vm-ram", "memfds": [{"token": 0x1001, "size": "3MiB", "seed": 1},
                                  {"token": 0x1002, "size": "1MiB", "seed": 2}]},
    {"name": "cache", "memfds": [{"token": 0x2001, "size": "512KiB", "seed": 3}]}]}


def inventory(tmp: Path, hosts: dict[str, Any]) -> Path:
    base = {"kho_transport": "sim", "kho_boot_timeout": 30, "kho_sim_boot_delay": 0.1,
            "kho_sim_ram_mib": 96}
    p = tmp / "inventory.yaml"
    p.write_text(yaml.safe_dump({"all": {"vars": base, "hosts": hosts}}))
    return p


def playbook(tmp: Path) -> Path:
    doc = {"name": "placed faults", "hosts": "all", "target": {"kernel": "twin:7.2.14-twin"},
           "workloads": WORKLOADS, "stages": [{"name": "all", "hosts": "100%"}],
           "on_failure": "continue", "timeouts": {"ssh_s": 15, "boot_s": 30, "verify_s": 60}}
    p = tmp / "playbook.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def rollout(tmp: Path, inv: Path, pb: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(KHO_FLEET), "rollout", "--playbook", str(pb), "--inventory",
                           str(inv), "--json", "--rollouts-dir", str(tmp / "rollouts"),
                           "--reports-dir", str(tmp / "reports"), "--sim-dir", str(tmp / "sim")],
                          capture_output=True, text=True, timeout=300, cwd=tmp,
                          stdin=subprocess.DEVNULL, env={**os.environ, "KHO_FLEET_DEBUG": ""})


def bad(rep: dict) -> dict[tuple[str, int], list[dict]]:
    """{(session, token): bad_pages} of the workloads with bad pages."""
    return {(w["session"], w["token"]): w["bad_pages"] for w in rep["workloads"]
            if w.get("bad_pages_total")}


def pages(rep: dict) -> set[tuple[str, int, int, int, int]]:
    """Every bad page as (session, token, offset, pfn_before, pfn_after)."""
    return {(s, t, p["offset"], p["pfn_before"], p["pfn_after"])
            for (s, t), ps in bad(rep).items() for p in ps}


def test_rollout_with_placed_faults_from_the_inventory(sim: Path) -> None:
    faults = ["bitflip@vm-ram/0x1001:0x5003", "stale-page@cache/0x2001:0x10010",
              "swap-pages@vm-ram/0x1002:0x1000,0x12345"]
    inv = inventory(sim, {"ok": None, "hit": {"kho_sim_faults": faults}})
    p = rollout(sim, inv, playbook(sim))
    assert p.returncode == 1, p.stderr                 # one host failed, as injected
    (rid,) = os.listdir(sim / "rollouts")
    hosts = sim / "reports" / rid / "hosts"
    clean = json.loads((hosts / "ok.json").read_text())["agent"]
    assert clean["result"] == "success" and not bad(clean)
    rep = json.loads((hosts / "hit.json").read_text())["agent"]
    assert rep["result"] == "failed" and rep["failure"]["phase"] == "verify"
    lf = json.loads((sim / "sim" / "hit" / proto.STATE).read_text())["last_faults"]
    assert sorted(lf) == sorted(faults)
    flip, stale, swap = (lf[f] for f in faults)
    want = {("vm-ram", 0x1001, 0x5000, flip["pfn"], flip["pfn"]),
            ("cache", 0x2001, 0x10000, stale["pfn"], stale["pfn"]),
            ("vm-ram", 0x1002, 0x1000, swap["pfns"][0], swap["pfns"][0]),
            ("vm-ram", 0x1002, 0x12000, swap["pfns"][1], swap["pfns"][1])}
    assert pages(rep) == want
    (fp,) = bad(rep)[("vm-ram", 0x1001)]
    assert (fp["bytes_differing"], fp["bits_differing"]) == (1, 1)
    assert fp["first_diff_hex"].startswith("0x3: ")
    assert all(p["in_snapshot"] is True for ps in bad(rep).values() for p in ps)


def test_two_fault_options_at_once(tmp_path: Path) -> None:
    work = tmp_path / "w"
    faults = ["zero-page@vm-ram/0x1001:0x3000", "bitflip@cache/0x2001:0x7ff"]
    argv = [str(KHO_FLEET), "sim", "handover", "--json", "--workload-mib", "8",
            "--workdir", str(work)]
    for f in faults:
        argv += ["--fault", f]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    rep = json.loads(proc.stdout)
    lf = json.loads((work / "host" / proto.STATE).read_text())["last_faults"]
    assert sorted(lf) == sorted(faults)
    zero, flip = lf[faults[0]], lf[faults[1]]
    assert pages(rep) == {("vm-ram", 0x1001, 0x3000, zero["pfn"], zero["pfn"]),
                          ("cache", 0x2001, 0, flip["pfn"], flip["pfn"])}
    (fp,) = bad(rep)[("cache", 0x2001)]
    assert fp["bits_differing"] == 1 and fp["first_diff_hex"].startswith("0x7ff: ")
    (zp,) = bad(rep)[("vm-ram", 0x1001)]
    assert zp["bytes_differing"] > PS // 2


def test_stale_page_is_an_old_copy_not_zeros(tmp_path: Path) -> None:
    work = tmp_path / "w"
    fault = "stale-page@vm-ram/0x1002:0x2a000"
    proc = subprocess.run([str(KHO_FLEET), "sim", "handover", "--json", "--workload-mib", "8",
                           "--workdir", str(work), "--fault", fault],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    rep = json.loads(proc.stdout)
    done = json.loads((work / "host" / proto.STATE).read_text())["last_faults"][fault]
    assert done["stale"] == "cacheline"    # the sim's workloads are not written after preserve
    assert pages(rep) == {("vm-ram", 0x1002, 0x2a000, done["pfn"], done["pfn"])}
    (p,) = bad(rep)[("vm-ram", 0x1002)]
    off, _, hexbytes = p["first_diff_hex"].partition(": ")
    assert int(off, 16) == 0 and p["bytes_differing"] > PS // 2
    before, after = hexbytes.replace(" ", "").split("->")
    assert before.startswith("0210000000000000" + "2a00000000000000")   # the page's stamp
    assert int(after, 16) != 0 and after != before       # not a zeroed page: old bytes


def test_stale_copy_rules() -> None:
    page = bytes(range(256)) * (PS // 256)
    old, how = stale_copy(page, None)
    assert how == "cacheline" and old != page and any(old) and len(old) == PS
    assert stale_copy(page, page) == (old, how)
    newer = b"\x01" + page[1:]
    assert stale_copy(newer, page) == (page, "preserve")
    same = b"\x07" * PS
    assert stale_copy(same, None)[0] == b"\xf8" * PS
    assert stale_copy(bytes(PS), None)[0] == b"\xff" * PS


# A process that preserves a memfd, then (like a running VM) writes one page again before
# the kexec; it holds everything until the kexec kills it.
WRITER = textwrap.dedent("""
    import json, os, sys, time
    from kho_agent.kernel.twin import TwinKernel
    root, ps = sys.argv[1], int(sys.argv[2])
    k = TwinKernel(root)
    lu = k.open_liveupdate()
    s = lu.create_session("vm")
    fd = os.memfd_create("vm")
    os.write(fd, bytes([1]) * (8 * ps))
    s.preserve_fd(fd, 7)
    os.pwrite(fd, bytes([2]) * ps, 3 * ps)          # written after PRESERVE_FD
    print(json.dumps({"pfns": k.memfd_pfns(fd, 8 * ps)}), flush=True)
    time.sleep(3600)
""")


def test_stale_page_misses_the_writes_after_preserve(twin) -> None:
    """A page written after PRESERVE_FD comes back as PRESERVE_FD copied it; a kexec
    without the fault carries the newer bytes (the freeze copies the file again)."""
    k = twin.kernel()
    w = subprocess.Popen([sys.executable, "-c", WRITER, twin.root, str(PS)],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert w.stdout is not None
        pfns = json.loads(w.stdout.readline())["pfns"]
        k.set_fault("stale-page@vm/7:0x3000")
        kexec(twin, image(twin.root, "7.2.13-next"))
        done = twin.state()["last_faults"]["stale-page@vm/7:0x3000"]
        assert (done["stale"], done["pfn"], done["offset"]) == ("preserve", pfns[3], 0x3000)
        fd = k.open_liveupdate().retrieve_session("vm").retrieve_fd(7)
        got = os.pread(fd, 8 * PS, 0)
        assert got == bytes([1]) * (8 * PS)            # page 3: the copy from before
    finally:
        w.kill()
        w.wait()


@pytest.mark.parametrize("fault, words", [
    ("bitflip@vm-ram/0x1001", "expected bitflip@SESSION/TOKEN:OFFSET"),
    ("swap-pages@vm-ram/0x1002:0x1000", "takes 2 offsets"),
    ("lost-page@vm-ram/0x1001:0", "only bitflip"),
    ("zero-page@vm-ram/0x1001:0x10q", "is not an integer"),
])
def test_bad_placed_fault_in_the_inventory(tmp_path: Path, fault: str, words: str) -> None:
    inv = inventory(tmp_path, {"good": None, "faulty": {"kho_sim_faults": ["bitflip", fault]}})
    p = rollout(tmp_path, inv, playbook(tmp_path))
    lines = p.stderr.splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert str(inv) in lines[0] and "'faulty'" in lines[0] and "kho_sim_faults" in lines[0]
    assert words in lines[0] and "Traceback" not in lines[0]
    assert not (tmp_path / "rollouts").exists() and not (tmp_path / "sim").exists()


@pytest.mark.parametrize("fault, words", [
    ("zero-page@nope/0x1001:0", "no workload nope/0x1001"),
    ("bitflip@cache/0x2001:0x80000", "past the end of cache/0x2001"),
    ("swap-pages@vm-ram/0x1001:0x10,0x20", "same 4096-byte page"),
])
def test_placed_fault_outside_the_playbooks_workloads(tmp_path: Path, fault: str,
                                                       words: str) -> None:
    inv = inventory(tmp_path, {"good": None, "faulty": {"kho_sim_faults": [fault]}})
    p = rollout(tmp_path, inv, playbook(tmp_path))
    lines = p.stderr.splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert str(inv) in lines[0] and "'faulty'" in lines[0] and words in lines[0]
    assert "Traceback" not in lines[0]
    assert not (tmp_path / "rollouts").exists() and not (tmp_path / "sim").exists()


def test_bad_second_fault_option(tmp_path: Path) -> None:
    proc = subprocess.run([str(KHO_FLEET), "sim", "handover", "--json", "--workdir",
                           str(tmp_path / "w"), "--fault", "bitflip",
                           "--fault", "zero-page@vm-ram/0x1001:0x99999999"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--fault" in lines[0]
    assert "past the end" in lines[0] and not (tmp_path / "w").exists()
