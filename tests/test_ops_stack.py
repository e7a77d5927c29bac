"""The operations kit against the real tools, end to end.

One module-wide stack on loopback: a real Prometheus (config generated from
deploy/prometheus/prometheus.yml, rules from kho-fleet.rules.yml, 1 s scrape and evaluation),
one real node_exporter per twin host (textfile collector), a real Pushgateway, and a
simulated rollout on twin hosts run in-process with its exporter scraped while it runs.
After the rollout each host's textfile is written by the exact command line of
deploy/systemd/kho-agent-report.service. Then: the HTTP API's figures, the alerts that
fire (and those that must not), every query of the Grafana dashboard, the Pushgateway path.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import yaml
from test_ops_grafana import DASHBOARD, dashboard_targets, substitute, variables
from test_ops_systemd import exec_start, read_unit

from kho_fleet.agentbuild import build_agent
from kho_fleet.inventory import load_inventory
from kho_fleet.metrics import RolloutMetrics
from kho_fleet.rollout import Rollout, RolloutOptions
from kho_fleet.sim.fleet import fleet_down

REPO = Path(__file__).resolve().parents[1]
PROM_DIR = REPO / "deploy" / "prometheus"
SCRAPE_S = 1
TARGET = "7.2.14-twin"
HOSTS = ("t1", "t2", "t3", "t4")          # t3's workload gets a bit flipped across kexec
FAILED = "t3"
LIVE_STATES = "preflight|staged|preserved|snapshotted|kexec_requested|kexec_sent|down|up|verified"

PROMETHEUS = shutil.which("prometheus")
NODE_EXPORTER = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
PUSHGATEWAY = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
_missing = [n for n, p in (("prometheus", PROMETHEUS), ("prometheus-node-exporter", NODE_EXPORTER),
                           ("prometheus-pushgateway", PUSHGATEWAY)) if p is None]
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"needs {', '.join(_missing)} "
                                "(Debian packages; scripts/bootstrap.sh installs them as root)")


# -- small helpers ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, fn: Callable[[], Any], timeout: float = 30.0, every: float = 0.2) -> Any:
    """fn() until it returns something truthy; fails naming `what` and the last value."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except (OSError, ValueError, KeyError) as e:      # not up yet / not there yet
            last = e
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


class Proc:
    """A started server process, its log in a file; stop() terminates it (then kills)."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name, self.log = name, log
        self._f = open(log, "wb")
        self.p = subprocess.Popen(argv, stdout=self._f, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)

    def check(self) -> None:
        if self.p.poll() is not None:
            raise AssertionError(f"{self.name} exited ({self.p.returncode}): "
                                 + self.log.read_text(errors="replace")[-2000:])

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self._f.close()


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


@dataclass
class Stack:
    tmp: Path
    prom: str                                   # http://127.0.0.1:PORT
    ro: Any
    fleet: dict
    t_start: float
    t_end: float
    server: Any                                 # the rollout's MetricsServer
    exporter: str                               # 127.0.0.1:PORT of the rollout exporter
    pushgateway: str
    procs: dict[str, Proc] = field(default_factory=dict)

    def api(self, path: str, method: str = "POST", **params: Any) -> Any:
        """Call the HTTP API (queries by POST, so long expressions fit); returns `data`,
        fails on errors."""
        body = urllib.parse.urlencode(params).encode() if method == "POST" else None
        req = urllib.request.Request(self.prom + path, data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                doc = json.loads(r.read())
        except urllib.error.HTTPError as e:
            doc = json.loads(e.read() or b"{}")
        assert doc.get("status") == "success", f"{path} {params}: {doc}"
        return doc["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def value(self, expr: str) -> Optional[float]:
        """The single value of an instant query (None when there is no result)."""
        res = self.query(expr)
        assert len(res) <= 1, f"{expr}: more than one series: {res}"
        return float(res[0]["value"][1]) if res else None

    def query_range(self, expr: str, step: float = SCRAPE_S) -> list[dict]:
        """From just before the rollout to now (the last step exactly now)."""
        end = time.time()
        start = end - math.ceil((end - self.t_start + 2) / step) * step
        data = self.api("/api/v1/query_range", query=expr, start=start, end=end, step=step)
        assert data["resultType"] == "matrix", data
        return data["result"]

    def alerts(self) -> list[dict]:
        return self.api("/api/v1/alerts", "GET")["alerts"]


def _inventory(tmp: Path) -> Path:
    hosts: dict[str, Any] = {h: None for h in HOSTS}
    hosts[FAILED] = {"kho_sim_faults": ["bitflip"]}
    p = tmp / "inventory.yaml"
    p.write_text(yaml.safe_dump({"all": {"vars": {
        "kho_transport": "sim", "kho_boot_timeout": 20, "kho_sim_boot_delay": 0.3,
        "kho_sim_ram_mib": 96}, "hosts": hosts}}))
    return p


def _playbook(tmp: Path) -> Path:
    doc = {"name": "ops kit", "hosts": "all", "target": {"kernel": f"twin:{TARGET}"},
           "workloads": {"sessions": [{"name": "vm-ram", "memfds": [
               {"token": 0x1001, "size": "3MiB", "seed": 1},
               {"token": 0x1002, "size": "1MiB", "seed": 2}]}]},
           "stages": [{"name": "canary", "hosts": 1},
                      {"name": "rest", "hosts": "rest", "max_parallel": 1,
                       "gate": {"min_success_ratio": 0.5, "all_workloads_verified": False}}],
           "on_failure": "halt", "timeouts": {"ssh_s": 15, "boot_s": 20, "verify_s": 60}}
    p = tmp / "playbook.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def prometheus_config(tmp: Path, exporter: str, pushgateway: str, nodes: list[str]) -> Path:
    """deploy/prometheus/prometheus.yml with loopback targets and a 1 s scrape/evaluation."""
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval=f"{SCRAPE_S}s", evaluation_interval=f"{SCRAPE_S}s")
    cfg["rule_files"] = [str(PROM_DIR / f) for f in cfg["rule_files"]]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == {"kho-fleet", "kho-fleet-pushgateway", "node"}, sorted(jobs)
    jobs["kho-fleet"]["static_configs"] = [{"targets": [exporter]}]
    jobs["kho-fleet-pushgateway"]["static_configs"] = [{"targets": [pushgateway]}]
    for j in jobs.values():
        j["scrape_interval"] = f"{SCRAPE_S}s"
    sd = tmp / "kho-nodes.yml"
    sd.write_text(yaml.safe_dump([{"targets": nodes, "labels": {"fleet": "test"}}]))
    (fsd,) = jobs["node"]["file_sd_configs"]
    fsd["files"] = [str(sd)]
    out = tmp / "prometheus.yml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def write_agent_textfile(twin_root: Path, textfile_dir: Path,
                         pyz: Path) -> subprocess.CompletedProcess:
    """Run kho-agent-report.service's ExecStart on a twin host: the unit's own argv, with
    host paths moved under the twin's root and the textfile dir to `textfile_dir`."""
    argv = exec_start(read_unit("kho-agent-report.service"))
    agent_dir = "/var/lib/kho-agent"
    dest = twin_root / agent_dir.lstrip("/") / "kho-agent.pyz"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pyz, dest)
    mapped = []
    for i, a in enumerate(argv):
        if i == 0:
            mapped.append(a if os.access(a, os.X_OK) else sys.executable)
        elif a == "/var/lib/prometheus/node-exporter":
            mapped.append(str(textfile_dir))
        elif a.startswith(agent_dir + "/"):
            mapped.append(str(twin_root / a.lstrip("/")))
        else:
            assert not a.startswith("/"), f"kho-agent-report.service: unexpected host path {a}"
            mapped.append(a)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["KHO_AGENT_TWIN"] = str(twin_root)
    return subprocess.run(mapped, capture_output=True, text=True, timeout=60, env=env)


# -- the stack -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("ops-stack")
    inv, pb = _inventory(tmp), _playbook(tmp)
    opts = RolloutOptions(str(tmp / "rollouts"), str(tmp / "reports"), str(tmp / "sim"))
    ro = Rollout.start(str(pb), str(inv), opts)
    ro.metrics = RolloutMetrics(ro.id, "ops kit", TARGET)
    server = ro.metrics.serve(0)
    procs: dict[str, Proc] = {}
    try:
        nodes = []
        for h in HOSTS:
            port = free_port()
            (tmp / "textfile" / h).mkdir(parents=True)
            procs[f"node-{h}"] = Proc(f"node_exporter ({h})", [
                NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}",
                "--collector.disable-defaults", "--collector.textfile",
                f"--collector.textfile.directory={tmp / 'textfile' / h}"], tmp / f"node-{h}.log")
            nodes.append(f"127.0.0.1:{port}")
        pg = f"127.0.0.1:{free_port()}"
        procs["pushgateway"] = Proc("pushgateway", [PUSHGATEWAY, f"--web.listen-address={pg}",
                                                    "--persistence.file="],     # Debian: a file
                                    tmp / "pushgateway.log")
        exporter = f"127.0.0.1:{server.port}"
        cfg = prometheus_config(tmp, exporter, pg, nodes)
        prom_port = free_port()
        procs["prometheus"] = Proc("prometheus", [
            PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            tmp / "prometheus.log")
        prom = f"http://127.0.0.1:{prom_port}"
        st = Stack(tmp, prom, ro, {}, 0.0, 0.0, server, exporter, pg, procs)

        def ready() -> bool:
            for p in procs.values():
                p.check()
            return http_get(prom + "/-/ready").startswith(b"Prometheus")
        wait_until("Prometheus ready", ready, 20)
        wait_until("every target up", lambda: st.value(
            'count(up{job=~"kho-fleet|kho-fleet-pushgateway|node"} == 1)') == len(HOSTS) + 2, 20)

        st.t_start = time.time()
        st.fleet = ro.run()                      # scraped every second while it runs
        st.t_end = time.time()

        pyz = Path(build_agent(str(tmp / "kho-agent.pyz"))[0])
        for h in HOSTS:
            r = write_agent_textfile(tmp / "sim" / h, tmp / "textfile" / h, pyz)
            assert r.returncode == 0, f"{h}: kho-agent report: {r.stderr}"
        final = {"sum(kho_fleet_handovers_total)": len(HOSTS),
                 "count(kho_agent_handover_info)": len(HOSTS),
                 'count(kho_fleet_rollout_info{status="completed"})': 1}

        def arrived() -> bool:
            seen = {q: st.value(q) for q in final}
            if seen != final:
                raise ValueError(seen, [r["metric"] for r in st.query("kho_fleet_rollout_info")])
            return True
        wait_until("the final rollout figures and every agent's textfile in Prometheus",
                   arrived, 20)
        yield st
    finally:
        for p in procs.values():
            p.stop()
        server.shutdown()
        fleet_down(load_inventory(str(inv)), str(tmp / "sim"))


# -- tests -----------------------------------------------------------------------------------

def test_prometheus_scraped_the_rollout_while_it_ran(stack: Stack) -> None:
    assert stack.fleet["rollout"]["status"] == "completed"
    assert [f["host"] for f in stack.fleet["failures"]] == [FAILED]
    # the counters, as Prometheus stored them
    assert stack.value("sum(kho_fleet_handovers_total)") == 4
    by = {(r["metric"]["result"], r["metric"]["stage"]): float(r["value"][1]) for r in
          stack.query("sum by (result, stage) (kho_fleet_handovers_total) > 0")}
    assert by == {("success", "canary"): 1, ("success", "rest"): 2, ("failed", "rest"): 1}
    assert stack.value('sum(kho_fleet_workloads_total{result="failed"})') == 1
    total = stack.value("sum(kho_fleet_rollout_preserved_bytes_total)")
    assert total == stack.value("sum(kho_fleet_preserved_bytes)")      # one handover per host
    assert 3 * 4 * 2**20 < total < 4 * 4 * 2**20                       # t3 lost one memfd
    # the downtime histogram: 4 observations, real quantiles (twin handovers take ~1 s)
    assert stack.value("sum(kho_fleet_handover_downtime_seconds_count)") == 4
    p95_all = stack.value("histogram_quantile(0.95, sum by (le) "
                          "(kho_fleet_handover_downtime_seconds_bucket))")
    assert p95_all is not None and 0 < p95_all <= 5
    # rate over the rollout: the rest stage's later handovers were seen as increments
    p95_rate = stack.value("histogram_quantile(0.95, sum by (le) "
                           "(rate(kho_fleet_handover_downtime_seconds_bucket[5m])))")
    assert p95_rate is not None and not math.isnan(p95_rate) and 0 < p95_rate <= 5
    mean = stack.value("sum(kho_fleet_handover_downtime_seconds_sum) "
                       "/ sum(kho_fleet_handover_downtime_seconds_count)")
    assert mean is not None and 0 < mean <= 5
    # the figures changed while scraped: 1, 2, 3, 4 handovers at successive scrapes
    (series,) = stack.query_range("sum(kho_fleet_handovers_total)")
    seen = [float(v) for _, v in series["values"]]
    assert seen == sorted(seen) and {1.0, 4.0} <= set(seen) and len(set(seen)) >= 3, seen
    # and hosts were caught mid-handover
    mid = stack.value(f'count(count_over_time(kho_fleet_host_info{{state=~"{LIVE_STATES}"}}[10m]))')
    assert mid is not None and mid >= 2
    # stage progress and host table at the end
    prog = {r["metric"]["stage"]: float(r["value"][1])
            for r in stack.query("kho_fleet_rollout_stage_progress")}
    assert prog == {"canary": 1.0, "rest": 1.0}
    hosts = {r["metric"]["host"]: r["metric"] for r in stack.query("kho_fleet_host_info")}
    assert {h: (m["state"], m["result"]) for h, m in hosts.items()} == {
        "t1": ("reported", "success"), "t2": ("reported", "success"),
        "t3": ("failed", "failed"), "t4": ("reported", "success")}


def test_agent_textfiles_reach_prometheus_through_node_exporter(stack: Stack) -> None:
    info = {r["metric"]["host"]: r["metric"] for r in stack.query("kho_agent_handover_info")}
    assert {h: m["result"] for h, m in info.items()} == {
        "t1": "success", "t2": "success", "t3": "failed", "t4": "success"}
    assert all(m["to"] == TARGET and m["job"] == "node" for m in info.values())
    assert stack.value(f'kho_agent_handover_success{{host="{FAILED}"}}') == 0
    assert stack.value(f'kho_agent_workloads{{host="{FAILED}", state="failed"}}') == 1
    blackout = stack.query('kho_agent_handover_downtime_seconds{span="blackout"}')
    assert len(blackout) == 4 and all(0 < float(r["value"][1]) < 30 for r in blackout)
    assert stack.value("sum(node_textfile_scrape_error)") == 0


def test_alerts_fire_for_the_failed_host_and_only_for_it(stack: Stack) -> None:
    def firing() -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for a in stack.alerts():
            if a["state"] == "firing":
                out.setdefault(a["labels"]["alertname"], []).append(a["labels"])
        return out
    want = {"KhoFleetHandoverFailed", "KhoFleetWorkloadsNotVerified", "KhoAgentHandoverFailed",
            "KhoAgentWorkloadsNotVerified"}
    got = wait_until(f"alerts {sorted(want)} firing", lambda: (f := firing()) and
                     want <= set(f) and f, 20)
    assert [a["stage"] for a in got["KhoFleetHandoverFailed"]] == ["rest"]
    assert [a["host"] for a in got["KhoAgentHandoverFailed"]] == [FAILED]
    assert [a["host"] for a in got["KhoAgentWorkloadsNotVerified"]] == [FAILED]
    # negative: nothing over the downtime budget, no halt, every snapshot taken
    for quiet in ("KhoFleetRolloutHalted", "KhoFleetHandoverDowntimeOverBudget",
                  "KhoAgentHandoverDowntimeOverBudget", "KhoFleetRadixSnapshotMissing",
                  "KhoAgentRadixSnapshotMissing", "KhoAgentTextfileUnreadable"):
        assert quiet not in got, (quiet, got[quiet])
    # every alert about a host names the failed one
    for name, labels in got.items():
        assert all(lab.get("host", FAILED) == FAILED for lab in labels), (name, labels)
    rules = {r["name"]: r for g in stack.api("/api/v1/rules", "GET")["groups"] for r in g["rules"]}
    assert all(r["health"] == "ok" for r in rules.values()), {
        n: r.get("lastError") for n, r in rules.items() if r["health"] != "ok"}


def test_every_dashboard_query_parses_and_returns_data(stack: Stack) -> None:
    values = variables(DASHBOARD, lambda expr: stack.query(expr))
    assert values["job"] == ["kho-fleet"] and values["rollout"] == [stack.ro.id]
    assert values["stage"] == ["canary", "rest"] and values["host"] == list(HOSTS)
    rng = f"{int(time.time() - stack.t_start) + 5}s"
    builtins = {"__rate_interval": f"{4 * SCRAPE_S}s", "__interval": f"{SCRAPE_S}s",
                "__range": rng}
    empty = []
    checked = 0
    for panel, target in dashboard_targets(DASHBOARD):
        expr = substitute(target["expr"], values, builtins)
        where = f"panel {panel['id']} {panel['title']!r} {target['refId']}: {expr}"
        if target.get("instant"):
            res = stack.query(expr)
            vals = [r["value"][1] for r in res]
        else:       # a time-series panel: Grafana asks for a range
            res = stack.query_range(expr)
            vals = [v for r in res for _, v in r["values"]]
        if not [v for v in vals if v.lower() not in ("nan", "+inf", "-inf")]:
            empty.append(where)
        checked += 1
    assert checked >= 20
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_pushgateway_keeps_the_final_figures_after_the_exporter_stops(stack: Stack) -> None:
    # what `kho-fleet rollout --pushgateway URL` does at the end, then the exporter goes away
    stack.ro.metrics.push(f"http://{stack.pushgateway}")
    stack.server.shutdown()
    wait_until("the exporter seen down", lambda: stack.value('up{job="kho-fleet"}') == 0, 15)
    info = wait_until("the pushed rollout in Prometheus", lambda: stack.query(
        f'kho_fleet_rollout_info{{rollout_id="{stack.ro.id}", job="kho-fleet", instance=""}}'), 15)
    assert [m["metric"]["status"] for m in info] == ["completed"]
    # honor_labels: the pushed series keep job="kho-fleet" and gain rollout_id; the stale
    # live series no longer count, so the sums are not doubled
    wait_until("only the pushed series left", lambda: stack.value(
        'count(kho_fleet_handovers_total{rollout_id=""})') is None, 15)
    assert stack.value("sum(kho_fleet_handovers_total)") == 4
    assert stack.value(f'sum(kho_fleet_handovers_total{{rollout_id="{stack.ro.id}"}})') == 4
