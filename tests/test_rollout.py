"""`kho-fleet rollout` end to end: twin hosts (locally, and behind real sshd servers), real
agent processes, the SQLite state, gates, failure policies, resume after a SIGKILL, metrics
scraped over HTTP. Each test builds its own inventory and playbook in a temp dir.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kho_fleet.metrics import RolloutMetrics
from kho_fleet.rollout import Rollout, RolloutOptions
from kho_fleet.sim.twinkernel import start_twin
from kho_fleet.statedb import StateDB

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = {"sessions": [{"name": "vm-ram", "memfds": [
    {"token": 0x1001, "size": "3MiB", "seed": 1}, {"token": 0x1002, "size": "1MiB", "seed": 2}]}]}


def inventory(tmp: Path, hosts: dict[str, dict], **common: Any) -> Path:
    base = {"kho_transport": "sim", "kho_boot_timeout": 20, "kho_sim_boot_delay": 0.1,
            "kho_sim_ram_mib": 96}
    base.update(common)
    p = tmp / "inventory.yaml"
    p.write_text(yaml.safe_dump({"all": {"vars": base, "hosts": hosts}}))
    return p


def playbook(tmp: Path, stages: list[dict], on_failure: str = "halt", **extra: Any) -> Path:
    doc = {"name": "test rollout", "hosts": "all", "target": {"kernel": "twin:7.2.14-twin"},
           "workloads": WORKLOADS, "stages": stages, "on_failure": on_failure,
           "timeouts": {"ssh_s": 15, "boot_s": 20, "verify_s": 60}}
    doc.update(extra)
    p = tmp / "playbook.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def cli(tmp: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kho_fleet.cli", *args,
                           "--rollouts-dir", str(tmp / "rollouts"),
                           "--reports-dir", str(tmp / "reports"), "--sim-dir", str(tmp / "sim")],
                          capture_output=True, text=True, timeout=timeout, cwd=tmp)


def rollout_with_sitecustomize(tmp: Path, code: str, inv: Path,
                                pb: Path) -> subprocess.CompletedProcess:
    """`kho-fleet rollout` (real process) with `code` as a sitecustomize on its PYTHONPATH:
    a fault placed at an exact moment (the agent processes it starts inherit it too)."""
    site = tmp / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(code)
    return subprocess.run(
        [sys.executable, "-m", "kho_fleet.cli", "rollout", "--playbook", str(pb),
         "--inventory", str(inv), "--rollouts-dir", str(tmp / "rollouts"),
         "--reports-dir", str(tmp / "reports"), "--sim-dir", str(tmp / "sim")],
        capture_output=True, text=True, timeout=300, cwd=tmp,
        env={**os.environ, "PYTHONPATH": str(site)})


def twin_state(tmp: Path, host: str) -> dict:
    """The twin state file of sim host `host` (under tmp/sim)."""
    return json.loads((tmp / "sim" / host / "twin.state").read_text())


def _one_rollout(tmp: Path) -> StateDB:
    (rid,) = os.listdir(tmp / "rollouts")
    return StateDB.open(str(tmp / "rollouts" / rid))


def test_rollout_on_twins_with_metrics_and_reports(sim: Path) -> None:
    inv = inventory(sim, {"t1": None, "t2": None, "t3": {"kho_sim_faults": ["bitflip"]}})
    pb = playbook(sim, [{"name": "canary", "hosts": 1},
                        {"name": "rest", "hosts": "rest", "max_parallel": 2,
                         "gate": {"min_success_ratio": 0.5, "all_workloads_verified": False}}])
    opts = RolloutOptions(str(sim / "rollouts"), str(sim / "reports"), str(sim / "sim"))
    ro = Rollout.start(str(pb), str(inv), opts)
    ro.metrics = RolloutMetrics(ro.id, "test", "7.2.14-twin")
    server = ro.metrics.serve(0)
    scraped: list[str] = []

    def scrape() -> None:
        while not done.is_set():
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics") as r:
                scraped.append(r.read().decode())
            time.sleep(0.2)
    done = threading.Event()
    th = threading.Thread(target=scrape)
    th.start()
    try:
        fleet = ro.run()
    finally:
        done.set()
        th.join()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics") as r:
            final = r.read().decode()
    finally:
        server.shutdown()
    assert fleet["rollout"]["status"] == "completed"
    states = {h.name: h.state for h in ro.db.hosts()}
    assert states == {"t1": "reported", "t2": "reported", "t3": "failed"}
    assert [f["host"] for f in fleet["failures"]] == ["t3"]
    assert "sha256 differs" in fleet["failures"][0]["reason"]
    for h in ("t1", "t2", "t3"):
        st = twin_state(sim, h)
        assert st["boot_count"] == 2 and st["release"] == "7.2.14-twin"
        rep = json.loads((sim / "reports" / ro.id / "hosts" / f"{h}.json").read_text())
        assert rep["agent"]["host"] == h and rep["controller"]["downtime_s"] > 0
    for f in ("fleet.json", "fleet.md", "fleet.html"):
        assert (sim / "reports" / ro.id / f).stat().st_size > 500
    fams = {f.name: f for f in text_string_to_metric_families(final)}
    totals = {(s.labels["result"], s.labels["stage"]): s.value
              for s in fams["kho_fleet_handovers"].samples if s.name.endswith("_total") and s.value}
    assert totals == {("success", "canary"): 1, ("success", "rest"): 1, ("failed", "rest"): 1}
    hist = [s for s in fams["kho_fleet_handover_downtime_seconds"].samples
            if s.name.endswith("_count")]
    assert sum(s.value for s in hist) == 3
    info = fams["kho_fleet_rollout_info"].samples
    assert len(info) == 1 and info[0].labels["status"] == "completed"
    hosts = {s.labels["state"]: s.value for s in fams["kho_fleet_rollout_hosts"].samples}
    assert hosts["reported"] == 2 and hosts["failed"] == 1
    # scraped while running: some host was seen mid-handover
    assert any('state="kexec_sent"} 1.0' in t or 'state="preserved"} 1.0' in t for t in scraped)


def test_gate_failure_halts_and_spares_later_stages(sim: Path) -> None:
    inv = inventory(sim, {"c1": {"kho_sim_faults": ["bitflip"]}, "r1": None, "r2": None})
    pb = playbook(sim, [{"name": "canary", "hosts": 1}, {"name": "rest", "hosts": "rest"}])
    p = cli(sim, "rollout", "--playbook", str(pb), "--inventory", str(inv), "--json")
    assert p.returncode == 1, p.stderr
    fleet = json.loads(p.stdout)
    assert fleet["rollout"]["status"] == "halted"
    reason = fleet["rollout"]["reason"]
    assert "stage canary" in reason and "gate failed" in reason
    db = _one_rollout(sim)
    assert [s.status for s in db.stages()] == ["failed", "pending"]
    assert ({h.name: h.state for h in db.hosts()}
            == {"c1": "failed", "r1": "pending", "r2": "pending"})
    assert not (sim / "sim" / "r1").exists()          # never even powered on, never kexec'd
    st = cli(sim, "status", "--json")
    assert json.loads(st.stdout)["rollout"]["status"] == "halted"


def test_abi_mismatch_refused_at_preflight(sim: Path) -> None:
    inv = inventory(sim, {"old": {"kho_sim_kho": "kho-v3"}})
    pb = playbook(sim, [{"name": "all", "hosts": "rest"}])
    p = cli(sim, "rollout", "--playbook", str(pb), "--inventory", str(inv), "--json")
    fleet = json.loads(p.stdout)
    (f,) = fleet["failures"]
    assert f["phase"] == "preflight" and "kho-v3" in f["reason"] and "kho-v4" in f["reason"]
    old = twin_state(sim, "old")
    assert old["boot_count"] == 1 and old["kexec_loaded"] in (0, False)


def test_never_returns_fails_after_the_boot_timeout(sim: Path) -> None:
    inv = inventory(sim, {"gone": {"kho_sim_faults": ["never-returns"], "kho_boot_timeout": 2}})
    pb = playbook(sim, [{"name": "all", "hosts": "rest"}])
    p = cli(sim, "rollout", "--playbook", str(pb), "--inventory", str(inv), "--json")
    (f,) = json.loads(p.stdout)["failures"]
    assert f["phase"] == "boot" and "did not come back within 2s" in f["reason"]


def test_controller_killed_mid_rollout_resumes_without_a_second_kexec(sim: Path) -> None:
    hosts = {f"h{i}": {"kho_sim_boot_delay": 1.5} for i in range(1, 4)}
    inv = inventory(sim, hosts)
    pb = playbook(sim, [{"name": "all", "hosts": "rest", "max_parallel": 3}])
    proc = subprocess.Popen([sys.executable, "-m", "kho_fleet.cli", "rollout", "--playbook",
                             str(pb), "--inventory", str(inv), "--json",
                             "--rollouts-dir", str(sim / "rollouts"), "--reports-dir",
                             str(sim / "reports"), "--sim-dir", str(sim / "sim")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=sim)
    killed_in: Optional[set] = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (sim / "rollouts").exists() and os.listdir(sim / "rollouts"):
            try:
                states = {h.state for h in _one_rollout(sim).hosts()}
            except Exception:  # the DB may be mid-creation
                states = set()
            if states & {"kexec_requested", "kexec_sent"}:
                proc.send_signal(signal.SIGKILL)
                killed_in = states
                break
        time.sleep(0.02)
    proc.wait()
    assert killed_in is not None, "the controller finished before it could be killed"
    rid = _one_rollout(sim).rollout().id
    p = cli(sim, "rollout", "--resume", rid, "--json")
    assert p.returncode == 0, (killed_in, json.loads(p.stdout).get("failures") if p.stdout
                               else None, p.stderr[-2000:])
    assert json.loads(p.stdout)["rollout"]["status"] == "completed"
    for h in hosts:
        boots = twin_state(sim, h)["boot_count"]
        assert boots == 2, f"{h} was kexec'd {boots - 1} times"
    assert {h.state for h in _one_rollout(sim).hosts()} == {"reported"}
    events = [e.event for e in _one_rollout(sim).events()]
    assert "resumed" in events


def test_rollback_hands_hosts_back(sim: Path) -> None:
    inv = inventory(sim, {"a": None, "b": {"kho_sim_faults": ["bitflip"]}})
    pb = playbook(sim, [{"name": "canary", "hosts": 1}, {"name": "rest", "hosts": "rest"}],
                  on_failure="rollback")
    p = cli(sim, "rollout", "--playbook", str(pb), "--inventory", str(inv), "--json")
    fleet = json.loads(p.stdout)
    assert fleet["rollout"]["status"] == "rolled_back", fleet["rollout"]
    a = twin_state(sim, "a")
    assert a["release"] == "7.2.13-twin" and a["boot_count"] == 3      # there and back again
    assert twin_state(sim, "b")["release"] == "7.2.14-twin"                    # failed: left alone


def test_dry_run_and_abort(sim: Path) -> None:
    inv = inventory(sim, {"d1": None, "d2": None})
    pb = playbook(sim, [{"name": "all", "hosts": "rest", "max_parallel": 2}])
    p = cli(sim, "preflight", "--playbook", str(pb), "--inventory", str(inv), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["rollout"]["status"] == "completed"
    for h in ("d1", "d2"):
        st = twin_state(sim, h)
        assert st["boot_count"] == 1 and not st["kexec_loaded"], (h, st)
    # abort: a started rollout that was aborted kexecs nothing
    opts = RolloutOptions(str(sim / "rollouts2"), str(sim / "reports"), str(sim / "sim"))
    ro = Rollout.start(str(pb), str(inv), opts)
    a = subprocess.run([sys.executable, "-m", "kho_fleet.cli", "abort", ro.id, "--rollouts-dir",
                        str(sim / "rollouts2")], capture_output=True, text=True)
    assert a.returncode == 0, a.stderr
    fleet = ro.run()
    assert fleet["rollout"]["status"] == "aborted"
    assert all(twin_state(sim, h)["boot_count"] == 1 for h in ("d1", "d2"))


@pytest.mark.parametrize("what,content,needle", [
    ("playbook", ("name: x\nhosts: all\ntarget: {kernel: twin:1}\nstages:\n"
                  "  - {name: a, hosts: 1, max_paralel: 2}\n"),
     "playbook.yaml:5: stages[0].max_paralel"),
    ("playbook", "name: [unclosed\n", "playbook.yaml:2:1: YAML syntax error"),
    ("inventory", "all:\n  hosts:\n    h1: {kho_page_size: 8192}\n", "inventory.yaml:3"),
])
def test_bad_inputs_are_one_line(sim: Path, what: str, content: str, needle: str) -> None:
    inv = inventory(sim, {"h1": None})
    pb = playbook(sim, [{"name": "all", "hosts": "rest"}])
    (inv if what == "inventory" else pb).write_text(content)
    p = cli(sim, "rollout", "--playbook", str(pb), "--inventory", str(inv))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and needle in p.stderr, p.stderr
    p = cli(sim, "rollout", "--resume", "no-such-id")
    assert p.returncode == 2 and "no rollout 'no-such-id'" in p.stderr


# --- over real OpenSSH ---------------------------------------------------------------------

@pytest.fixture()
def ssh_twins(tmp_path: Path):
    """Two twin hosts, each behind its own real sshd on loopback."""
    from sshd import SSHD, keygen, require_openssh
    require_openssh()
    key = keygen(tmp_path / "id_ed25519")
    auth = tmp_path / "authorized_keys"
    auth.write_text((tmp_path / "id_ed25519.pub").read_text())
    servers, twins = {}, {}
    try:
        for name in ("s1", "s2"):
            servers[name] = SSHD(tmp_path, auth, f"sshd-{name}").start()
            twins[name] = start_twin(str(tmp_path / "twins" / name), boot_delay=0.5, ram_mib=96)
        kh = tmp_path / "known_hosts"
        kh.write_text("".join(s.known_hosts_line for s in servers.values()))
        hosts = {n: {"ansible_host": "127.0.0.1", "ansible_port": s.port,
                     "ansible_ssh_private_key_file": str(key), "kho_ssh_known_hosts": str(kh),
                     "kho_twin_root": str(tmp_path / "twins" / n),
                     "kho_agent_dir": str(tmp_path / "agents" / n), "kho_python": sys.executable}
                 for n, s in servers.items()}
        yield tmp_path, hosts, servers, twins
    finally:
        for t in twins.values():
            t.stop()
        for s in servers.values():
            s.stop()


def test_rollout_over_ssh_with_a_connection_dropped_during_kexec(ssh_twins) -> None:
    tmp, hosts, servers, twins = ssh_twins
    inv = inventory(tmp, hosts, kho_transport="ssh")
    pb = playbook(tmp, [{"name": "all", "hosts": "rest", "max_parallel": 2}])
    opts = RolloutOptions(str(tmp / "rollouts"), str(tmp / "reports"), str(tmp / "sim"))
    ro = Rollout.start(str(pb), str(inv), opts)
    dropped = threading.Event()

    def drop_when_down() -> None:
        # s2 vanishes under the controller while it kexecs: its sshd and every session
        # die the moment the twin goes down, and come back (same port, same key) later
        while twins["s2"].state().get("state") == "up":
            time.sleep(0.01)
        servers["s2"].stop()
        dropped.set()
        time.sleep(1.5)
        servers["s2"].start()

    def hook(host: str, state: str, detail: str = "") -> None:
        if host == "s2" and state == "kexec_requested":
            threading.Thread(target=drop_when_down, daemon=True).start()
    ro.opts.progress = hook
    fleet = ro.run()
    assert dropped.is_set()
    assert fleet["rollout"]["status"] == "completed", fleet
    assert {h.name: h.state for h in ro.db.hosts()} == {"s1": "reported", "s2": "reported"}
    for t in twins.values():
        assert t.state()["boot_count"] == 2 and t.state()["release"] == "7.2.14-twin"
    assert "sshd-s2" in str(servers["s2"].dir) and "Accepted publickey" in servers["s2"].log_text()
    assert ro.db.host("s2").downtime_s >= 1.5        # back only once sshd answered again
    s1 = json.loads((tmp / "reports" / ro.id / "hosts" / "s1.json").read_text())
    assert s1["agent"]["result"] == "success" and s1["controller"]["downtime_s"] > 0.4


def test_unknown_host_key_is_refused(ssh_twins) -> None:
    tmp, hosts, servers, twins = ssh_twins
    (tmp / "known_hosts").write_text("")                  # nobody is known
    inv = inventory(tmp, hosts, kho_transport="ssh")
    pb = playbook(tmp, [{"name": "all", "hosts": "rest", "max_parallel": 2}])
    p = cli(tmp, "rollout", "--playbook", str(pb), "--inventory", str(inv), "--json")
    fleet = json.loads(p.stdout)
    assert len(fleet["failures"]) == 2
    assert all("host key" in f["reason"].lower() for f in fleet["failures"]), fleet["failures"]
    assert all(t.state()["boot_count"] == 1 for t in twins.values())
