"""Prometheus metrics of one rollout, on a private CollectorRegistry (never the global one).

`METRICS` declares every metric once: it creates them and generates the reference table in
docs/operations.md (`metric_reference_markdown`). Served over HTTP (`serve`) and/or pushed
to a Pushgateway under the grouping key {rollout_id} (`push`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Optional

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    push_to_gateway,
    start_http_server,
)

from .errors import InputError
from .statedb import HOST_STATES, ROLLOUT_STATUSES

__all__ = ["MetricsError", "MetricDoc", "METRICS", "DOWNTIME_BUCKETS", "HANDOVER_RESULTS",
           "RolloutMetrics", "MetricsServer", "metric_reference_markdown", "handover_downtime",
           "preserved_bytes"]

DOWNTIME_BUCKETS: tuple[float, ...] = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
HANDOVER_RESULTS = ("success", "failed", "aborted")


class MetricsError(InputError, RuntimeError):
    """The exporter could not be served or pushed (one line, naming the address)."""


@dataclass(frozen=True)
class MetricDoc:
    """One metric: its exposed name, Prometheus type, label names and help text."""

    name: str
    type: str                      # counter | gauge | histogram
    labels: tuple[str, ...]
    help: str


METRICS: list[MetricDoc] = [
    MetricDoc("kho_fleet_handovers_total", "counter", ("result", "stage"),
              "Handovers finished, by result (success|failed|aborted) and stage."),
    MetricDoc("kho_fleet_handover_downtime_seconds", "histogram", ("stage", "kernel"),
              "Handover downtime: controller-measured (kexec sent -> first SSH after), else "
              "the agent's blackout_s; kernel is the target release."),
    MetricDoc("kho_fleet_preserved_bytes", "gauge", ("host",),
              "Workload bytes that came through the host's last handover (verified memfds)."),
    MetricDoc("kho_fleet_rollout_preserved_bytes_total", "counter", (),
              "Workload bytes preserved across every handover of the rollout."),
    MetricDoc("kho_fleet_radix_tree_intact", "gauge", ("host",),
              "1 if the agent found the incoming KHO radix tree intact after kexec."),
    MetricDoc("kho_fleet_radix_snapshot_present", "gauge", ("host",),
              "1 if the agent took a radix-tree snapshot before kexec."),
    MetricDoc("kho_fleet_rollout_hosts", "gauge", ("state",),
              "Hosts of the rollout in each host state."),
    MetricDoc("kho_fleet_rollout_info", "gauge",
              ("rollout_id", "playbook", "target_release", "status"),
              "The rollout (value 1; one series, its status label is the current status)."),
    MetricDoc("kho_fleet_stage_info", "gauge", ("stage", "index", "status"),
              "Each stage (value 1; one series per stage, with its current status)."),
    MetricDoc("kho_fleet_rollout_stage_progress", "gauge", ("stage",),
              "Fraction (0..1) of the stage's hosts that are done."),
    MetricDoc("kho_fleet_host_info", "gauge", ("host", "stage", "state", "result", "report"),
              "Each host (value 1; one series per host); report is the relative path of its "
              "host report."),
    MetricDoc("kho_fleet_workloads_total", "counter", ("result",),
              "Workloads checked after handovers, by result (verified|failed)."),
]


def metric_reference_markdown() -> str:
    """The metric reference table (Markdown) for docs/operations.md."""
    lines = ["| Metric | Type | Labels | Help |", "| --- | --- | --- | --- |"]
    for m in METRICS:
        labels = ", ".join(f"`{x}`" for x in m.labels) or "—"
        lines.append(f"| `{m.name}` | {m.type} | {labels} | {m.help.replace('|', '&#124;')} |")
    return "\n".join(lines) + "\n"


def _create(doc: MetricDoc, registry: CollectorRegistry) -> Any:
    if doc.type == "counter":
        return Counter(doc.name, doc.help, doc.labels, registry=registry)
    if doc.type == "gauge":
        return Gauge(doc.name, doc.help, doc.labels, registry=registry)
    if doc.type == "histogram":
        return Histogram(doc.name, doc.help, doc.labels, registry=registry,
                         buckets=DOWNTIME_BUCKETS)
    raise ValueError(f"{doc.name}: unknown metric type {doc.type!r}")


def handover_downtime(report: Optional[dict],
                      controller_downtime_s: Optional[float]) -> Optional[float]:
    """The downtime to record: the controller's measurement, else the agent's blackout_s."""
    if controller_downtime_s is not None:
        return float(controller_downtime_s)
    blackout = ((report or {}).get("downtime") or {}).get("blackout_s")
    return None if blackout is None else float(blackout)


def preserved_bytes(report: Optional[dict]) -> int:
    """Bytes of the report's workloads that verified after the handover."""
    return sum(int(w.get("size") or 0) for w in (report or {}).get("workloads") or []
               if w.get("verified"))


class MetricsServer:
    """A running exporter: `.port` (the bound one) and `.shutdown()`."""

    def __init__(self, server: Any, thread: Any, addr: str, port: int) -> None:
        self._server, self._thread, self.addr = server, thread, addr
        self.port = server.server_address[1] if server is not None else port

    def shutdown(self) -> None:
        """Stop serving and release the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class RolloutMetrics:
    """The metrics of one rollout; every method is thread-safe."""

    def __init__(self, rollout_id: str, playbook_name: str, target_release: str) -> None:
        self.rollout_id, self.playbook_name = rollout_id, playbook_name
        self.target_release = target_release
        self.registry = CollectorRegistry()
        self._m = {d.name: _create(d, self.registry) for d in METRICS}
        self._lock = threading.Lock()
        self._info: Optional[tuple[str, ...]] = None
        self._stages: dict[int, tuple[str, ...]] = {}
        self._hosts: dict[str, dict[str, str]] = {}
        self._host_series: dict[str, tuple[str, ...]] = {}
        self._intact: set[str] = set()
        self.update_counts({})
        self.set_status("running")

    def __getitem__(self, name: str) -> Any:
        """The prometheus_client metric object declared in METRICS as `name`."""
        return self._m[name]

    def handover_finished(self, host: str, stage: str, report: dict,
                          controller_downtime_s: Optional[float] = None,
                          report_path: str = "") -> None:
        """Record a host's finished handover from its agent report (handover-report/v1).

        A result other than success|aborted (e.g. the agent's "incomplete") counts as failed.
        """
        result = report.get("result")
        result = result if result in HANDOVER_RESULTS else "failed"
        with self._lock:
            self._m["kho_fleet_handovers_total"].labels(result, stage).inc()
            down = handover_downtime(report, controller_downtime_s)
            if down is not None:
                kernel = self.target_release or (((report.get("kernel") or {}).get("to") or {})
                                                 .get("release") or "")
                self._m["kho_fleet_handover_downtime_seconds"].labels(stage, kernel).observe(down)
            nbytes = preserved_bytes(report)
            self._m["kho_fleet_preserved_bytes"].labels(host).set(nbytes)
            self._m["kho_fleet_rollout_preserved_bytes_total"].inc(nbytes)
            radix = report.get("radix") or {}
            incoming = radix.get("incoming")
            intact = self._m["kho_fleet_radix_tree_intact"]
            if incoming is not None:
                intact.labels(host).set(1 if incoming.get("intact") else 0)
                self._intact.add(host)
            elif host in self._intact:
                intact.remove(host)
                self._intact.discard(host)
            self._m["kho_fleet_radix_snapshot_present"].labels(host).set(
                0 if radix.get("snapshot") is None else 1)
            ws = report.get("workloads") or []
            ok = sum(1 for w in ws if w.get("verified"))
            self._m["kho_fleet_workloads_total"].labels("verified").inc(ok)
            self._m["kho_fleet_workloads_total"].labels("failed").inc(len(ws) - ok)
            self._set_host(host, stage=stage, result=result,
                           **({"report": report_path} if report_path else {}))

    def host_state(self, host: str, stage: str, state: str,
                   report_path: Optional[str] = None) -> None:
        """A host entered `state` (one of statedb.HOST_STATES)."""
        if state not in HOST_STATES:
            raise ValueError(f"unknown host state {state!r}")
        with self._lock:
            self._set_host(host, stage=stage, state=state,
                           **({"report": report_path} if report_path is not None else {}))

    def _set_host(self, host: str, **changes: str) -> None:
        cur = self._hosts.setdefault(host, {"stage": "", "state": "", "result": "", "report": ""})
        cur.update(changes)
        labels = (host, cur["stage"], cur["state"], cur["result"], cur["report"])
        g = self._m["kho_fleet_host_info"]
        old = self._host_series.get(host)
        if old is not None and old != labels:
            g.remove(*old)
        g.labels(*labels).set(1)
        self._host_series[host] = labels

    def set_status(self, status: str) -> None:
        """The rollout's status (statedb.ROLLOUT_STATUSES); keeps exactly one info series."""
        if status not in ROLLOUT_STATUSES:
            raise ValueError(f"unknown rollout status {status!r}")
        labels = (self.rollout_id, self.playbook_name, self.target_release, status)
        g = self._m["kho_fleet_rollout_info"]
        with self._lock:
            if self._info is not None and self._info != labels:
                g.remove(*self._info)
            g.labels(*labels).set(1)
            self._info = labels

    def update_counts(self, counts: dict[str, int]) -> None:
        """Host counts by state, as StateDB.counts() returns them (absent states are 0)."""
        bad = set(counts) - set(HOST_STATES)
        if bad:
            raise ValueError(f"unknown host states {sorted(bad)}")
        g = self._m["kho_fleet_rollout_hosts"]
        with self._lock:
            for s in HOST_STATES:
                g.labels(s).set(counts.get(s, 0))

    def stage_status(self, idx: int, name: str, status: str, progress: float) -> None:
        """Stage `idx` (`name`) is `status`, with `progress` (0..1) of its hosts done."""
        labels = (name, str(idx), status)
        g = self._m["kho_fleet_stage_info"]
        with self._lock:
            old = self._stages.get(idx)
            if old is not None and old != labels:
                g.remove(*old)
            g.labels(*labels).set(1)
            self._stages[idx] = labels
            self._m["kho_fleet_rollout_stage_progress"].labels(name).set(
                min(1.0, max(0.0, float(progress))))

    def serve(self, port: int, addr: str = "127.0.0.1") -> MetricsServer:
        """Serve /metrics on addr:port (0 picks a free port: see `.port`)."""
        try:
            started = start_http_server(port, addr, self.registry)
        except OSError as e:
            raise MetricsError(f"cannot serve metrics on {addr}:{port}: "
                               f"{e.strerror or e}") from None
        if isinstance(started, tuple):          # prometheus-client >= 0.14: (server, thread)
            return MetricsServer(started[0], started[1], addr, port)
        return MetricsServer(None, None, addr, port)   # older: a daemon thread, not stoppable

    def push(self, gateway_url: str, job: str = "kho-fleet", timeout: float = 10.0) -> None:
        """Push every metric to a Pushgateway, grouped by {rollout_id}."""
        try:
            push_to_gateway(gateway_url, job=job, registry=self.registry,
                            grouping_key={"rollout_id": self.rollout_id}, timeout=timeout)
        except Exception as e:       # URLError, HTTPError, OSError, ValueError (bad URL)
            reason = getattr(e, "reason", None) or e
            msg = " ".join(str(reason).split()) or type(e).__name__
            raise MetricsError(f"push to Pushgateway {gateway_url} failed: {msg}") from None

