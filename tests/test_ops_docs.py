"""docs/operations.md against the code: the generated metric reference (controller METRICS
and the agent's kho_agent_* textfile metrics), the alerts and the deploy files it names.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import yaml

from kho_fleet.metrics import METRICS

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "operations.md"
GEN = REPO / "deploy" / "prometheus" / "metric_reference.py"
REGEN = ".venv/bin/python deploy/prometheus/metric_reference.py --write"


def _gen():
    spec = importlib.util.spec_from_file_location("metric_reference", GEN)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _table_rows(block: str) -> dict[str, tuple[str, tuple[str, ...], str]]:
    rows = {}
    for line in block.splitlines():
        m = re.match(r"\| `(kho_\w+)` \| (\w+) \| (.*?) \| (.*) \|$", line)
        if m:
            labels = tuple(re.findall(r"`(\w+)`", m.group(3)))
            rows[m.group(1)] = (m.group(2), labels, m.group(4).replace("&#124;", "|"))
    return rows


def test_metric_reference_matches_the_code() -> None:
    gen = _gen()
    text = DOC.read_text()
    assert gen.current_block(text) == gen.reference_block(), (
        f"docs/operations.md: the metric reference disagrees with the code; run `{REGEN}`")


def test_metric_reference_rows_are_the_code_metrics() -> None:
    """Independently of the generator's formatting: each row is one metric, as declared."""
    gen = _gen()
    rows = _table_rows(gen.current_block(DOC.read_text()))
    want = {m.name: (m.type, m.labels, m.help) for m in METRICS}
    want.update({n: (t, labs, h) for n, t, labs, h in gen.agent_metrics()})
    assert rows == want


def test_every_agent_metric_is_documented() -> None:
    """prom_text() may skip a metric when a report lacks data: the generator's full report
    must still expose every kho_agent_* name that report.py can write."""
    source = (REPO / "agent" / "kho_agent" / "report.py").read_text()
    in_source = set(re.findall(r"\b(kho_agent_[a-z_]+)\b", source))
    assert {n for n, *_ in _gen().agent_metrics()} == in_source


def test_regeneration_command() -> None:
    gen = _gen()
    text = DOC.read_text()
    stale = text.replace("| `kho_fleet_rollout_hosts` |", "| `kho_fleet_rollout_hostz` |")
    assert stale != text and gen.updated(stale) == text
    r = subprocess.run([sys.executable, str(GEN), "--check"], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr


def test_doc_names_every_alert_and_deploy_file() -> None:
    text = DOC.read_text()
    rules = yaml.safe_load((REPO / "deploy/prometheus/kho-fleet.rules.yml").read_text())
    for g in rules["groups"]:
        for r in g["rules"]:
            if "alert" in r:
                assert f"`{r['alert']}`" in text, r["alert"]
    for f in sorted((REPO / "deploy" / "systemd").iterdir()):
        assert f"`{f.name}`" in text, f.name
    for f in ("deploy/prometheus/prometheus.yml", "deploy/prometheus/kho-fleet.rules.yml",
              "deploy/prometheus/targets/kho-nodes.yml", "deploy/grafana/kho-fleet.json"):
        assert f in text and (REPO / f).exists(), f
