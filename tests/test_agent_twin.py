"""The agent's handover lifecycle against digital-twin hosts: real agent processes, a real
holder daemon, real memfds and sockets; every fault must end in the right result and phase.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kho_agent.holder import HolderClient
from kho_agent.kernel import LiveUpdateError
from kho_agent.workload import fill_pattern, hash_fd, make_memfd
from kho_fleet.sim.handover import (
    SimResult,
    drive_handover,
    run_agent,
    run_sim_handover,
    workload_spec,
)
from kho_fleet.sim.kernelimage import make_kernel_image
from kho_fleet.sim.twinkernel import start_twin


def _report_files(root: str) -> tuple[dict, dict]:
    state = Path(root) / "var/lib/kho-agent"
    rep = json.loads((state / "report.json").read_text())
    prom = {f.name: f
            for f in text_string_to_metric_families((state / "kho-agent.prom").read_text())}
    return rep, prom


def test_full_handover_on_a_twin(tmp_path: Path) -> None:
    res = run_sim_handover(str(tmp_path), workload_mib=16, boot_delay=0.2)
    rep = res.report
    assert [s["rc"] for s in res.steps] == [0] * len(res.steps), res.steps
    assert rep["result"] == "success" and rep["failure"] is None
    assert rep["kernel"]["from"] == {"release": "7.2.13-twin", "kho_compatible": "kho-v4"}
    assert rep["kernel"]["to"]["release"] == "7.2.14-twin"
    assert rep["kexec_metadata"] == {"version": 1, "previous_release": "7.2.13-twin",
                                     "kexec_count": 1}
    assert len(rep["workloads"]) == 3
    for w in rep["workloads"]:
        assert w["verified"] and w["pfns_identical"] and w["sha256_after"] == w["sha256_before"]
    snap = rep["radix"]["snapshot"]
    assert snap["workload_pfns_missing"] == {} and snap["bytes"] >= 16 << 20
    # Linux 7.2 reuses the old tree's pages after boot: the report must not claim otherwise
    inc = rep["radix"]["incoming"]
    assert inc["intact"] is False and inc["root"] == snap["root"] and inc["errors"]
    d = rep["downtime"]
    parts = d["kexec_to_kernel_s"] + d["kernel_to_agent_s"] + d["agent_to_restored_s"]
    assert all(v > 0 for v in d.values()) and abs(d["blackout_s"] - parts) < 1e-3
    assert rep["journal"] == {"from": "memfd", "error": None}
    assert 0 < rep["agent_kexec_s"] < 5
    on_disk, prom = _report_files(res.root)
    assert on_disk == rep
    assert prom["kho_agent_handover_success"].samples[0].value == 1
    assert prom["kho_agent_radix_tree_intact"].samples[0].value == 0
    assert prom["kho_agent_preserved_bytes"].samples[0].value == 16 << 20


@pytest.mark.parametrize("fault,result,phase,why", [
    ("kexec-load-fails", "failed", "stage", "kexec load failed"),
    ("never-returns", "failed", "boot", "did not come back"),
    ("bitflip", "failed", "verify", "sha256 differs"),
    ("lost-page", "failed", "verify", "RETRIEVE_FD"),
    ("abi-mismatch", "failed", "boot", "did not take the handover"),
    ("abi-mismatch-image", "aborted", "preflight", "kho-v4"),
])
def test_faults_end_in_the_right_phase(tmp_path: Path, fault: str, result: str, phase: str,
                                       why: str) -> None:
    res = run_sim_handover(str(tmp_path), fault=fault, workload_mib=4, boot_delay=0.2,
                           boot_timeout=3.0)
    rep = res.report
    assert rep["result"] == result, rep
    assert rep["failure"]["phase"] == phase and why in rep["failure"]["reason"], rep["failure"]
    if fault == "abi-mismatch-image":
        assert "kho-v3" in rep["failure"]["reason"]
        assert [s["step"] for s in res.steps] == ["preflight", "report"]   # never staged
    if fault == "bitflip":
        bad = [w for w in rep["workloads"] if not w["verified"]]
        assert len(bad) == 1 and bad[0]["pfns_identical"] and bad[0]["sha256_after"]


def test_slow_boot_is_measured(tmp_path: Path) -> None:
    res = run_sim_handover(str(tmp_path), fault="slow-boot", workload_mib=4, boot_delay=0.15)
    rep = res.report
    assert rep["result"] == "success"
    # the kernel's clock starts at kexec; a slow boot is time spent before userspace
    assert rep["downtime"]["kernel_to_agent_s"] >= 1.4      # boot delay x10


def test_agent_killed_before_finish_names_the_lost_workloads(tmp_path: Path) -> None:
    res = run_sim_handover(str(tmp_path), fault="kill-agent-before-finish", workload_mib=4,
                           boot_delay=0.2)
    rep = res.report
    assert rep["result"] == "failed" and rep["failure"]["phase"] == "verify"
    lost = {(w["session"], w["token"]) for w in rep["workloads"] if not w["verified"]}
    assert lost == {("vm-ram", 0x1001), ("vm-ram", 0x1002)}
    assert all("session lost" in w["error"] for w in rep["workloads"] if not w["verified"])
    assert "vm-ram/0x1001" in rep["failure"]["reason"]


def test_holder_fault_knob_exits_after_the_nth_retrieve(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """KHO_AGENT_FAULT=exit-after-retrieve=2 (the lab tests' knob, here on a twin): the
    holder dies right after the journal and the first workload are retrieved; the verify
    retry reports that workload's session lost and the other session verified."""
    monkeypatch.setenv("KHO_AGENT_FAULT", "exit-after-retrieve=2")
    res = run_sim_handover(str(tmp_path), workload_mib=4, boot_delay=0.2)
    rep = res.report
    assert rep["result"] == "failed" and rep["failure"]["phase"] == "verify"
    lost = {(w["session"], w["token"]) for w in rep["workloads"] if not w["verified"]}
    assert lost == {("vm-ram", 0x1001), ("vm-ram", 0x1002)}
    for w in rep["workloads"]:
        if not w["verified"]:
            assert "session lost" in w["error"] and "died mid-retrieval" in w["error"]
    assert rep["journal"]["from"] == "disk"
    log = (Path(res.root) / "var/lib/kho-agent/holder.log").read_text()
    assert "KHO_AGENT_FAULT: exiting after RETRIEVE_FD #2" in log


def test_two_handovers_in_a_row(tmp_path: Path) -> None:
    """After a KHO boot there is no debugfs kho/out/fdt: the second snapshot must find the
    outgoing FDT in memory; kexec-metadata then counts 2."""
    spec = tmp_path / "w.json"
    spec.write_text(json.dumps(workload_spec(4)))
    img1 = make_kernel_image(str(tmp_path / "img1"), "7.2.14-twin")
    img2 = make_kernel_image(str(tmp_path / "img2"), "7.2.15-twin")
    with start_twin(str(tmp_path / "h1"), boot_delay=0.1) as twin:
        first = drive_handover(twin, img1, str(spec), SimResult({}))
        assert first["result"] == "success", first
        assert not (Path(twin.root) / "sys/kernel/debug/kho/out/fdt").exists()
        res = SimResult({})
        second = drive_handover(twin, img2, str(spec), res)
        assert second["result"] == "success", (second, res.steps)
        assert second["kexec_metadata"]["previous_release"] == "7.2.14-twin"
        assert second["kexec_metadata"]["kexec_count"] == 2
        assert second["kernel"]["to"]["release"] == "7.2.15-twin"
        assert second["handover_id"] != first["handover_id"]
        snap = next(s for s in res.steps if s["step"] == "snapshot")["json"]
        assert snap["fdt_source"].startswith("memory scan")


def test_kexec_needs_yes_and_preflight_names_missing_liveupdate(tmp_path: Path) -> None:
    with start_twin(str(tmp_path / "h"), boot_delay=0.1,
                    cmdline="console=ttyS0 kho=on") as twin:
        r = run_agent(twin.root, "kexec")
        assert r["rc"] == 1 and r["stderr"].count("\n") == 0 and "--yes" in r["stderr"]
        assert twin.state()["boot_count"] == 1
        pf = run_agent(twin.root, "preflight")
        assert pf["rc"] == 1
        checks = {c["name"]: c for c in pf["json"]["checks"]}
        assert not checks["liveupdate"]["ok"] and "liveupdate=on" in checks["liveupdate"]["detail"]
        assert checks["kho"]["ok"] and checks["physmem"]["ok"]
        assert "twin" in checks["physmem"]["detail"]


def test_holder_owns_liveupdate_and_adopts_a_workload_memfd(tmp_path: Path) -> None:
    """A real workload hands its memfd to the holder (SCM_RIGHTS), it survives the kexec,
    and the workload claims it back: same bytes, same PFNs."""
    spec = tmp_path / "w.json"
    spec.write_text(json.dumps(
        {"sessions": [{"name": "app", "memfds": [{"token": 9, "adopt": True}]}]}))
    image = make_kernel_image(str(tmp_path / "img"), "7.2.14-twin")
    with start_twin(str(tmp_path / "h"), boot_delay=0.1) as twin:
        root = twin.root
        state = os.path.join(root, "var/lib/kho-agent")
        for step, args in (("stage", ("--kernel", image)), ("preserve", ("--spec", str(spec)))):
            assert run_agent(root, step, *args)["rc"] == 0
        with pytest.raises(LiveUpdateError) as busy:
            twin.kernel().open_liveupdate()
        assert busy.value.errno == 16                       # EBUSY: the holder has it
        data = fill_pattern(9, 9, 3 << 20)
        fd = make_memfd("app-state", data)
        with HolderClient(state) as h:
            rec, _ = h.call("adopt", fds=(fd,), session="app", token=9)
        os.close(fd)
        assert rec["workload"]["sha256"] == hash_fd(make_memfd("x", data))
        for step, args in (("snapshot", ()), ("kexec", ("--yes",))):
            assert run_agent(root, step, *args)["rc"] == 0
        twin.wait_ready(10, boot_count=2)
        ver = run_agent(root, "verify")
        assert ver["rc"] == 0 and ver["json"]["result"] == "success", ver
        again = run_agent(root, "verify")             # e.g. the systemd unit, then the controller
        assert again["rc"] == 0 and again["json"]["result"] == "success", again
        assert again["json"]["workloads"] == ver["json"]["workloads"]
        with HolderClient(state) as h:
            _, fds = h.call("claim", session="app", token=9)
        assert len(fds) == 1
        assert hash_fd(fds[0]) == rec["workload"]["sha256"]
        os.close(fds[0])
        rel = run_agent(root, "release")
        assert rel["rc"] == 0


def test_bad_spec_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(
        {"sessions": [{"name": "x", "memfds": [{"token": 1, "size": "lots"}]}]}))
    proc = subprocess.run([sys.executable, "-m", "kho_agent", "preserve", "--spec", str(bad)],
                          capture_output=True, text=True,
                          env={**os.environ, "KHO_AGENT_TWIN": str(tmp_path / "nohost")})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "memfds[0].size" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_twin_host_is_a_clean_error(tmp_path: Path) -> None:
    r = run_agent(str(tmp_path / "missing"), "snapshot")
    assert r["rc"] != 0 and r["stderr"] and "Traceback" not in r["stderr"]
    assert socket  # keep the import used for readers: the holder speaks AF_UNIX
