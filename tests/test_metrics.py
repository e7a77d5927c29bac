"""Rollout metrics: scraped over HTTP from the exporter, and pushed to a real Pushgateway."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from kho_fleet.metrics import (
    DOWNTIME_BUCKETS,
    METRICS,
    MetricsError,
    RolloutMetrics,
    metric_reference_markdown,
)
from kho_fleet.statedb import HOST_STATES

TARGET = "7.2.1-kho"


def report(result: str, *, blackout=None, sizes=(), failed_sizes=(), intact=True,
           snapshot=True) -> dict:
    ws = [{"session": "vm", "token": i, "size": n, "verified": True} for i, n in enumerate(sizes)]
    ws += [{"session": "vm", "token": 100 + i, "size": n, "verified": False}
           for i, n in enumerate(failed_sizes)]
    return {"schema": "kho-fleet/handover-report/v1", "result": result,
            "kernel": {"from": {"release": "7.2.0"}, "to": {"release": TARGET}},
            "radix": {"snapshot": {"root": 1} if snapshot else None,
                      "incoming": {"intact": intact} if intact is not None else None},
            "workloads": ws, "downtime": {"blackout_s": blackout}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict:
    """{family name: family} from a /metrics endpoint."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fams: dict, family: str, sample: str = None, **labels: str) -> list:
    return [s for s in fams[family].samples if s.name == (sample or family)
            and all(s.labels.get(k) == v for k, v in labels.items())]


def value(fams: dict, family: str, sample: str = None, **labels: str) -> float:
    (s,) = samples(fams, family, sample, **labels)
    return s.value


@pytest.fixture
def served():
    m = RolloutMetrics("r-42", "demo", TARGET)
    srv = m.serve(0)
    try:
        yield m, f"http://127.0.0.1:{srv.port}/metrics"
    finally:
        srv.shutdown()


def test_exporter_serves_every_metric(served) -> None:
    m, url = served
    m.handover_finished("a1", "canary", report("success", sizes=(4096, 8192)), 3.2,
                        report_path="hosts/a1.json")
    m.handover_finished("a2", "canary", report("success", blackout=0.7, sizes=(1000,)), None)
    m.handover_finished("b1", "rest", report("failed", blackout=700.0, sizes=(10,),
                                             failed_sizes=(20, 30), intact=False), None)
    m.handover_finished("b2", "rest", report("aborted", intact=None, snapshot=False), None)
    m.handover_finished("b3", "rest", report("incomplete", intact=None), 1.5)
    fams = scrape(url)

    c = "kho_fleet_handovers"
    assert fams[c].type == "counter"
    assert value(fams, c, c + "_total", result="success", stage="canary") == 2
    assert value(fams, c, c + "_total", result="failed", stage="rest") == 2   # incomplete too
    assert value(fams, c, c + "_total", result="aborted", stage="rest") == 1

    h = "kho_fleet_handover_downtime_seconds"
    assert fams[h].type == "histogram"
    can = {float(s.labels["le"]): s.value
           for s in samples(fams, h, h + "_bucket", stage="canary", kernel=TARGET)}
    assert sorted(can) == [*map(float, DOWNTIME_BUCKETS), float("inf")]
    assert (can[0.5], can[1.0], can[2.0], can[5.0], can[float("inf")]) == (0, 1, 1, 2, 2)
    assert value(fams, h, h + "_sum", stage="canary", kernel=TARGET) == pytest.approx(3.9)
    assert value(fams, h, h + "_count", stage="canary", kernel=TARGET) == 2
    rest = {float(s.labels["le"]): s.value for s in samples(fams, h, h + "_bucket", stage="rest")}
    assert (rest[1.0], rest[2.0], rest[600.0], rest[float("inf")]) == (0, 1, 1, 2)
    assert value(fams, h, h + "_count", stage="rest") == 2      # the aborted one had no downtime

    assert value(fams, "kho_fleet_preserved_bytes", host="a1") == 12288
    assert value(fams, "kho_fleet_preserved_bytes", host="b1") == 10     # verified bytes only
    total = "kho_fleet_rollout_preserved_bytes"
    assert value(fams, total, total + "_total") == 12288 + 1000 + 10
    assert value(fams, "kho_fleet_radix_tree_intact", host="a1") == 1
    assert value(fams, "kho_fleet_radix_tree_intact", host="b1") == 0
    assert not samples(fams, "kho_fleet_radix_tree_intact", host="b2")
    assert value(fams, "kho_fleet_radix_snapshot_present", host="a1") == 1
    assert value(fams, "kho_fleet_radix_snapshot_present", host="b2") == 0
    w = "kho_fleet_workloads"
    assert value(fams, w, w + "_total", result="verified") == 4
    assert value(fams, w, w + "_total", result="failed") == 2


def test_info_series_are_replaced_not_added(served) -> None:
    m, url = served
    for st in ("halted", "running", "completed"):
        m.set_status(st)
    m.stage_status(0, "canary", "running", 0.5)
    m.stage_status(0, "canary", "passed", 1.0)
    m.stage_status(1, "rest", "running", 0.25)
    m.host_state("a1", "canary", "preflight")
    m.host_state("a1", "canary", "kexec_sent")
    m.handover_finished("a1", "canary", report("success"), 2.0, report_path="hosts/a1.json")
    m.host_state("a1", "canary", "reported")
    m.host_state("b1", "rest", "failed")
    counts = dict.fromkeys(HOST_STATES, 0)
    counts.update(reported=1, failed=1, pending=3)
    m.update_counts(counts)
    fams = scrape(url)

    (info,) = fams["kho_fleet_rollout_info"].samples
    assert info.labels == {"rollout_id": "r-42", "playbook": "demo", "target_release": TARGET,
                           "status": "completed"} and info.value == 1
    assert sorted((s.labels["index"], s.labels["stage"], s.labels["status"])
                  for s in fams["kho_fleet_stage_info"].samples) == [
        ("0", "canary", "passed"), ("1", "rest", "running")]
    assert value(fams, "kho_fleet_rollout_stage_progress", stage="canary") == 1.0
    assert value(fams, "kho_fleet_rollout_stage_progress", stage="rest") == 0.25
    hosts = {s.labels["host"]: s.labels for s in fams["kho_fleet_host_info"].samples}
    assert len(fams["kho_fleet_host_info"].samples) == 2
    assert hosts["a1"] == {"host": "a1", "stage": "canary", "state": "reported",
                           "result": "success", "report": "hosts/a1.json"}
    assert hosts["b1"]["state"] == "failed" and hosts["b1"]["report"] == ""
    got = {s.labels["state"]: s.value for s in fams["kho_fleet_rollout_hosts"].samples}
    assert got == {**dict.fromkeys(HOST_STATES, 0.0), "reported": 1, "failed": 1, "pending": 3}
    with pytest.raises(ValueError, match="unknown rollout status"):
        m.set_status("done")
    with pytest.raises(ValueError, match="unknown host states"):
        m.update_counts({"rebooting": 1})


def test_declared_metrics_match_exposed_and_docs(served) -> None:
    m, url = served
    m.handover_finished("a1", "canary", report("success", blackout=1.0), None, "hosts/a1.json")
    m.host_state("a1", "canary", "reported")
    m.stage_status(0, "canary", "passed", 1.0)
    fams = scrape(url)
    exposed = {}
    for f in fams.values():
        if f.name.endswith("_created"):       # prometheus-client's per-counter timestamps
            continue
        labels = {k for s in f.samples for k in s.labels} - {"le"}
        exposed[f.name] = (f.type, labels)
    declared = {}
    for d in METRICS:
        fam = d.name[:-len("_total")] if d.type == "counter" else d.name
        declared[fam] = (d.type, set(d.labels))
    assert exposed == declared
    table = metric_reference_markdown()
    assert table.startswith("| Metric | Type | Labels | Help |")
    assert all(f"`{d.name}`" in table for d in METRICS)
    assert len(table.strip().splitlines()) == len(METRICS) + 2
    # a private registry: nothing leaks into the process-global one
    assert REGISTRY.get_sample_value("kho_fleet_handovers_total",
                                     {"result": "success", "stage": "canary"}) is None


def test_serve_on_a_busy_port_is_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(MetricsError) as ei:
            RolloutMetrics("r", "p", TARGET).serve(port)
    assert f"127.0.0.1:{port}" in str(ei.value) and "\n" not in str(ei.value)


def test_push_to_a_closed_port_is_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(MetricsError) as ei:
        RolloutMetrics("r", "p", TARGET).push(url, timeout=5)
    msg = str(ei.value)
    assert url in msg and "\n" not in msg and "refused" in msg.lower()


@pytest.fixture
def pushgateway(tmp_path):
    binary = shutil.which("prometheus-pushgateway")
    if binary is None:
        pytest.skip("prometheus-pushgateway not installed (Debian package prometheus-pushgateway; "
                    "scripts/bootstrap.sh installs it as root)")
    port = free_port()
    log = open(tmp_path / "pushgateway.log", "w")
    proc = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}",
                             "--persistence.file="], cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(url + "/-/ready", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail("pushgateway did not start: "
                                + (tmp_path / "pushgateway.log").read_text()[-2000:])
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_push_to_a_real_pushgateway(pushgateway) -> None:
    m = RolloutMetrics("r-push-1", "demo", TARGET)
    m.handover_finished("a1", "canary", report("success", sizes=(4096,)), 2.5)
    m.set_status("completed")
    m.push(pushgateway)
    fams = scrape(pushgateway + "/metrics")
    group = {"job": "kho-fleet", "rollout_id": "r-push-1"}
    c = "kho_fleet_handovers"
    assert value(fams, c, c + "_total", result="success", stage="canary", **group) == 1
    h = "kho_fleet_handover_downtime_seconds"
    assert value(fams, h, h + "_count", stage="canary", **group) == 1
    (info,) = samples(fams, "kho_fleet_rollout_info", **group)
    assert info.labels["status"] == "completed"
    assert value(fams, "kho_fleet_preserved_bytes", host="a1", **group) == 4096
    # a second rollout is its own group; pushing again replaces a group (PUT), never adds
    RolloutMetrics("r-push-2", "demo", TARGET).push(pushgateway)
    m.push(pushgateway)
    fams = scrape(pushgateway + "/metrics")
    assert len(samples(fams, "kho_fleet_rollout_info", **group)) == 1
    assert {s.labels["rollout_id"] for s in fams["kho_fleet_rollout_info"].samples} == {
        "r-push-1", "r-push-2"}
