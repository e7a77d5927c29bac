"""deploy/prometheus with promtool: the config, the rules, and the rules' unit tests
(deploy/prometheus/tests/*.yml: input series, expected alerts, negative cases). Also that
those unit tests have teeth: a rules file without the new-series branch fails them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROM_DIR = REPO / "deploy" / "prometheus"
RULES = PROM_DIR / "kho-fleet.rules.yml"
RULE_TESTS = sorted((PROM_DIR / "tests").glob("*.yml"))
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (Debian package "
                                "prometheus; scripts/bootstrap.sh installs it as root)")

ALERTS = {  # alert -> the metric it is about (the issue's list, controller and agent side)
    "KhoFleetHandoverFailed": 'kho_fleet_handovers_total{result="failed"}',
    "KhoAgentHandoverFailed": "kho_agent_handover_success == 0",
    "KhoFleetHandoverDowntimeOverBudget": "histogram_quantile(0.95",
    "KhoAgentHandoverDowntimeOverBudget": 'kho_agent_handover_downtime_seconds{span="blackout"}',
    "KhoFleetRolloutHalted": 'kho_fleet_rollout_info{status="halted"}',
    "KhoAgentWorkloadsNotVerified": 'kho_agent_workloads{state="failed"} > 0',
    "KhoFleetWorkloadsNotVerified": 'kho_fleet_workloads_total{result="failed"}',
    "KhoAgentRadixSnapshotMissing": "kho_agent_radix_snapshot_present == 0",
    "KhoFleetRadixSnapshotMissing": "kho_fleet_radix_snapshot_present == 0",
}


def promtool(*args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_config_checks() -> None:
    r = promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_rules_check() -> None:
    r = promtool("check", "rules", RULES.name)
    assert r.returncode == 0, r.stdout + r.stderr


def test_rules_cover_the_issue() -> None:
    doc = yaml.safe_load(RULES.read_text())
    rules = {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}
    for name, needle in ALERTS.items():
        assert name in rules, name
        assert needle in " ".join(rules[name]["expr"].split()), (name, rules[name]["expr"])
    for name, r in rules.items():
        assert r["labels"]["severity"] in ("critical", "warning"), name
        assert {"summary", "description"} <= set(r["annotations"]), name


def test_rule_unit_tests_pass() -> None:
    assert RULE_TESTS, "no promtool rule tests in deploy/prometheus/tests"
    r = promtool("test", "rules", *[str(t.relative_to(PROM_DIR)) for t in RULE_TESTS])
    assert r.returncode == 0, r.stdout + r.stderr
    # every alert is exercised, firing at least once, by the fixtures
    fired: set[str] = set()
    tested: set[str] = set()
    for t in RULE_TESTS:
        for case in yaml.safe_load(t.read_text())["tests"]:
            for a in case.get("alert_rule_test", []):
                tested.add(a["alertname"])
                if a.get("exp_alerts"):
                    fired.add(a["alertname"])
    doc = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r}
    assert fired == alerts, f"alerts never seen firing in a fixture: {sorted(alerts - fired)}"
    assert tested == alerts


def _copy_with(tmp: Path, rules_text: str) -> Path:
    (tmp / "tests").mkdir()
    (tmp / RULES.name).write_text(rules_text)
    for t in RULE_TESTS:
        shutil.copyfile(t, tmp / "tests" / t.name)
    return tmp


def test_rule_unit_tests_catch_a_rule_that_misses_the_first_failure(tmp_path: Path) -> None:
    """With increase() alone, a failed-handover series born at 1 never alerts: the
    fixtures must notice."""
    text = RULES.read_text()
    branch = ('(kho_fleet_handovers_total{result="failed"}\n'
              '                 unless kho_fleet_handovers_total{result="failed"} offset 30m)\n'
              '            or\n')
    assert branch in text
    tmp = _copy_with(tmp_path, text.replace(branch, ""))
    assert promtool("check", "rules", RULES.name, cwd=tmp).returncode == 0
    r = promtool("test", "rules", *[f"tests/{t.name}" for t in RULE_TESTS], cwd=tmp)
    assert r.returncode != 0
    assert "KhoFleetHandoverFailed" in r.stdout + r.stderr


def test_rule_unit_tests_catch_a_wrong_threshold(tmp_path: Path) -> None:
    text = RULES.read_text()
    needle = 'kho_agent_handover_downtime_seconds{span="blackout"} > 30'
    assert needle in text
    tmp = _copy_with(tmp_path, text.replace(needle, needle.replace("> 30", "> 60")))
    r = promtool("test", "rules", *[f"tests/{t.name}" for t in RULE_TESTS], cwd=tmp)
    assert r.returncode != 0 and "KhoAgentHandoverDowntimeOverBudget" in r.stdout + r.stderr


def test_broken_config_and_rules_are_refused(tmp_path: Path) -> None:
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    cfg["scrape_configs"][0]["scrape_interval"] = "fast"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    shutil.copyfile(RULES, tmp_path / RULES.name)
    (tmp_path / "targets").mkdir()
    shutil.copyfile(PROM_DIR / "targets" / "kho-nodes.yml", tmp_path / "targets" / "kho-nodes.yml")
    assert promtool("check", "config", "prometheus.yml", cwd=tmp_path).returncode != 0
    (tmp_path / RULES.name).write_text(RULES.read_text().replace("== 1", "== == 1", 1))
    assert promtool("check", "rules", RULES.name, cwd=tmp_path).returncode != 0
