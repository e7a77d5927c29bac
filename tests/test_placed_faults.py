"""Twin faults with a place: the JSON report names exactly the injected page.

Each fault kind runs through the real CLI (`kho-fleet sim handover --fault ... --json`):
a twin host, the real agent processes, a real kexec of the twin. The twin records what
it did (last_faults in its state file: the PFN it corrupted); the report must name that
page -- offset in the memfd and PFN -- and nothing else. Bad placements are refused
before anything starts: one line, exit 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kho_agent.kernel import twinproto as proto
from kho_fleet.sim.faults import FaultError, Placement, check_placement, parse_fault

KHO_FLEET = Path(sys.executable).parent / "kho-fleet"
PS = 4096
MIB = 8      # the sim's workloads: vm-ram/0x1001 4.5 MiB, vm-ram/0x1002 1.5 MiB, cache/0x2001 2


def sim(tmp_path: Path, fault: str) -> tuple[int, dict, dict, str]:
    """(exit code, report, the twin's last_faults, stderr) of one sim handover."""
    work = tmp_path / "w"
    proc = subprocess.run([str(KHO_FLEET), "sim", "handover", "--json",
                           "--workload-mib", str(MIB), "--workdir", str(work),
                           "--fault", fault],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    rep = json.loads(proc.stdout) if proc.stdout.strip() else {}
    state_path = work / "host" / proto.STATE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    return proc.returncode, rep, state.get("last_faults", {}), proc.stderr


def bad(rep: dict) -> dict[tuple[str, int], list[dict]]:
    return {(w["session"], w["token"]): w["bad_pages"] for w in rep["workloads"]
            if w["bad_pages_total"]}


def test_parse_placed_faults():
    f = parse_fault("bitflip@vm-ram/0x1001:0x5000")
    assert (f.name, f.place) == ("bitflip", Placement("vm-ram", 0x1001, (0x5000,)))
    f = parse_fault("swap-pages@a/b/7:0,8192")        # a session name may hold '/'
    assert f.place == Placement("a/b", 7, (0, 8192))
    assert parse_fault("slow-boot=2").value == 2.0
    assert parse_fault("bitflip").place is None       # bare names keep working
    for text, words in [("lost-page@vm/1:0", "only bitflip"),
                        ("bitflip@vm-ram:0x10", "expected bitflip@SESSION/TOKEN:OFFSET"),
                        ("bitflip@vm/1:zz", "offset 'zz' is not an integer"),
                        ("bitflip@vm/1:-4", "negative"),
                        ("swap-pages@vm/1:0", "takes 2 offsets"),
                        ("zero-page@vm/1:0,4096", "takes 1 offset"),
                        ("bogus", "unknown fault 'bogus'"),
                        ("slow-boot=x", "must be a number")]:
        with pytest.raises(FaultError) as e:
            parse_fault(text)
        assert words in str(e.value) and "\n" not in str(e.value)
    sizes = {("vm", 1): 8 * PS}
    with pytest.raises(FaultError, match="no workload vm/0x2"):
        check_placement(parse_fault("zero-page@vm/2:0"), sizes, PS)
    with pytest.raises(FaultError, match="past the end"):
        check_placement(parse_fault("zero-page@vm/1:0x8000"), sizes, PS)
    with pytest.raises(FaultError, match="same 4096-byte page"):
        check_placement(parse_fault("swap-pages@vm/1:0x10,0x20"), sizes, PS)
    check_placement(parse_fault("swap-pages@vm/1:0,0x7fff"), sizes, PS)


@pytest.mark.parametrize("fault, words", [
    ("zero-page@nope/0x1001:0", "no workload nope/0x1001"),
    ("bitflip@vm-ram/0x1001:0x10000000", "past the end of vm-ram/0x1001"),
    ("swap-pages@vm-ram/0x1001:0x5000", "takes 2 offsets"),
    ("lost-page@vm-ram/0x1001:0", "only bitflip"),
])
def test_bad_placement_is_one_line_exit_2(tmp_path, fault, words):
    rc, rep, _, err = sim(tmp_path, fault)
    assert rc == 2 and not rep
    assert err.count("\n") == 1 and words in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()                 # refused before anything ran


def test_bitflip_names_the_page_and_the_bit(tmp_path):
    rc, rep, lf, _ = sim(tmp_path, "bitflip@vm-ram/0x1001:0x5003")
    assert rc == 1 and rep["failure"]["phase"] == "verify"
    done = lf["bitflip@vm-ram/0x1001:0x5003"]
    assert (done["offset"], done["token"]) == (0x5003, 0x1001)
    assert list(bad(rep)) == [("vm-ram", 0x1001)]
    (page,) = bad(rep)[("vm-ram", 0x1001)]
    assert page["offset"] == 0x5000
    assert page["pfn_before"] == page["pfn_after"] == done["pfn"]
    assert (page["bytes_differing"], page["bits_differing"]) == (1, 1)
    assert page["first_diff_hex"].startswith("0x3: ") and page["in_snapshot"] is True
    assert "offset 0x5000" in rep["failure"]["reason"]


@pytest.mark.parametrize("kind", ["zero-page", "stale-page"])
def test_page_overwritten(tmp_path, kind):
    fault = f"{kind}@cache/0x2001:0x10010"
    rc, rep, lf, _ = sim(tmp_path, fault)
    assert rc == 1
    (page,) = bad(rep)[("cache", 0x2001)]
    assert list(bad(rep)) == [("cache", 0x2001)]
    assert page["offset"] == 0x10000 and page["pfn_before"] == lf[fault]["pfn"]
    assert page["pfn_after"] == page["pfn_before"] and page["in_snapshot"] is True
    assert 0 < page["bytes_differing"] <= PS and page["bits_differing"] > 0


def test_swap_pages_names_both(tmp_path):
    fault = "swap-pages@vm-ram/0x1002:0x1000,0x12345"
    rc, rep, lf, _ = sim(tmp_path, fault)
    assert rc == 1
    pages = bad(rep)[("vm-ram", 0x1002)]
    assert list(bad(rep)) == [("vm-ram", 0x1002)]
    assert [p["offset"] for p in pages] == [0x1000, 0x12000]
    assert [p["pfn_before"] for p in pages] == lf[fault]["pfns"]
    assert all(p["pfn_after"] == p["pfn_before"] and p["bytes_differing"] > 0 for p in pages)


def test_drop_folio_names_the_lost_folio(tmp_path):
    fault = "drop-folio@vm-ram/0x1001:0x2345"
    rc, rep, lf, _ = sim(tmp_path, fault)
    assert rc == 1
    w = next(w for w in rep["workloads"] if w["token"] == 0x1001)
    assert "RETRIEVE_FD" in w["error"]                   # the memfd is gone: EIO
    (page,) = w["bad_pages"]
    assert list(bad(rep)) == [("vm-ram", 0x1001)]
    assert page["offset"] == 0x2000 and page["pfn_before"] == lf[fault]["pfn"]
    assert page["pfn_after"] is None and page["in_snapshot"] is True


def test_bare_bitflip_still_named(tmp_path):
    rc, rep, lf, _ = sim(tmp_path, "bitflip")
    assert rc == 1
    ((key, pages),) = bad(rep).items()
    (page,) = pages
    assert key[1] == lf["bitflip"]["token"] and page["pfn_before"] == lf["bitflip"]["pfn"]
    assert page["bits_differing"] == 1
    assert page["first_diff_hex"].startswith(f"{lf['bitflip']['offset']:#x}: ")


def test_clean_handover_has_no_bad_pages_and_a_timeline(tmp_path):
    work = tmp_path / "w"
    proc = subprocess.run([str(KHO_FLEET), "sim", "handover", "--json",
                           "--workload-mib", "4", "--workdir", str(work)],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    rep = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stderr
    assert all(w["bad_pages_total"] == 0 and w["sha256_after"] == w["sha256_before"]
               and w.get("sha256_from") == "chunks" for w in rep["workloads"])
    st = rep["stamps"]
    order = ["preflight", "stage", "preserve", "snapshot", "kexec", "kexec_exec",
             "kernel_start", "agent_start", "restored", "verified"]
    assert [k for k in order if k in st] == order
    assert [st[k] for k in order] == sorted(st[k] for k in order)
    d = rep["downtime"]
    assert 0 < d["restored_s"] <= d["verified_s"]
    assert d["restored_s"] == pytest.approx(st["restored"] - st["kexec_exec"], abs=1e-3)
    assert os.path.isdir(work)


CLAIMER = r"""
import sys, time
from kho_agent.holder import HolderClient, HolderError
from kho_agent.workload import hash_fd
state = sys.argv[1]
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        with HolderClient(state, timeout=5) as h:
            _, fds = h.call("claim", session="app", token=9)
        print(time.time(), hash_fd(fds[0]))
        break
    except (OSError, HolderError):
        time.sleep(0.005)
"""


def test_adopted_released_before_verify_and_named_by_page_crcs(tmp_path):
    """An adopted memfd (no seed: per-page crcs in the journal) with one page zeroed across
    the kexec; `verify --release-before-verify` lets the waiting workload claim it before
    the bytes are checked; the report still names the page (from the holder's own dup)."""
    from kho_agent.holder import HolderClient
    from kho_agent.workload import fill_pattern, make_memfd
    from kho_fleet.sim.handover import agent_env, run_agent
    from kho_fleet.sim.kernelimage import make_kernel_image
    from kho_fleet.sim.twinkernel import start_twin

    spec = tmp_path / "w.json"
    spec.write_text(json.dumps(
        {"sessions": [{"name": "app", "memfds": [{"token": 9, "adopt": True}]}]}))
    image = make_kernel_image(str(tmp_path / "img"), "7.2.14-twin")
    fault = "zero-page@app/9:0x201000"
    with start_twin(str(tmp_path / "h"), boot_delay=0.1) as twin:
        root = twin.root
        state = os.path.join(root, "var/lib/kho-agent")
        for step, args in (("stage", ("--kernel", image)), ("preserve", ("--spec", str(spec)))):
            assert run_agent(root, step, *args)["rc"] == 0
        fd = make_memfd("app-state", fill_pattern(9, 9, 3 << 20))
        with HolderClient(state) as h:
            rec, _ = h.call("adopt", fds=(fd,), session="app", token=9)
        os.close(fd)
        assert rec["workload"]["page_crcs"] and rec["workload"].get("seed") is None
        twin.kernel().set_fault(fault)
        for step, args in (("snapshot", ()), ("kexec", ("--yes",))):
            assert run_agent(root, step, *args)["rc"] == 0
        twin.wait_ready(10, boot_count=2)
        claimer = subprocess.Popen([sys.executable, "-c", CLAIMER, state], text=True,
                                   stdout=subprocess.PIPE, env=agent_env(root))
        ver = run_agent(root, "verify", "--release-before-verify")
        out, _ = claimer.communicate(timeout=60)
        done = twin.state()["last_faults"][fault]
    assert ver["rc"] == 1, ver
    rep = ver["json"]
    (w,) = rep["workloads"]
    (page,) = w["bad_pages"]
    assert page["offset"] == 0x201000 and page["pfn_before"] == done["pfn"]
    assert page["pfn_after"] == done["pfn"] and page["bytes_differing"] is None
    st = rep["stamps"]
    assert st["restored"] <= st["released"] <= st["verified"]
    assert rep["downtime"]["restored_s"] <= rep["downtime"]["verified_s"]
    t_claim, sha = out.split()
    assert sha != w["sha256_before"]                  # the workload got the zeroed page too
    assert float(t_claim) >= st["restored"]
