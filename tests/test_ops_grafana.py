"""deploy/grafana/kho-fleet.json: structure, variables, metric names, and every PromQL
expression parsed by promtool. (test_ops_stack.py runs every query against a real
Prometheus after a simulated rollout and requires data; it uses the helpers here.)
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
import yaml

from kho_fleet.metrics import METRICS

REPO = Path(__file__).resolve().parents[1]
DASHBOARD_PATH = REPO / "deploy" / "grafana" / "kho-fleet.json"
DASHBOARD: dict = json.loads(DASHBOARD_PATH.read_text())
DS = {"type": "prometheus", "uid": "${datasource}"}
BUILTINS = ("__rate_interval", "__interval", "__range")
PANEL_TYPES = {"row", "stat", "table", "timeseries", "bargauge", "gauge", "barchart"}
_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def dashboard_targets(dash: dict) -> Iterator[tuple[dict, dict]]:
    """(panel, target) for every query target, rows' nested panels included."""
    for p in dash["panels"]:
        for q in [p] + p.get("panels", []):
            for t in q.get("targets", []):
                yield q, t


def _label_values(query: str) -> tuple[str, str]:
    m = re.fullmatch(r"\s*label_values\(\s*(?:(.+),\s*)?(\w+)\s*\)\s*", query)
    assert m, f"not a label_values() query: {query!r}"
    return m.group(1) or "", m.group(2)


def variables(dash: dict, query: Callable[[str], list[dict]]) -> dict[str, list[str]]:
    """Every template variable's values, as Grafana would resolve them (in order), with
    label_values(selector, label) queries run through `query` (an instant query)."""
    values: dict[str, list[str]] = {}
    for v in dash["templating"]["list"]:
        if v["type"] == "datasource":
            continue
        if v["type"] in ("textbox", "constant"):
            values[v["name"]] = [v["query"]]
            continue
        assert v["type"] == "query", v
        selector, label = _label_values(v["query"]["query"])
        selector = substitute(selector, values, {}) if selector else f'{{{label}!=""}}'
        found = sorted({r["metric"][label] for r in query(selector) if r["metric"].get(label)})
        values[v["name"]] = found
    return values


def substitute(expr: str, values: dict[str, list[str]], builtins: dict[str, str]) -> str:
    """`expr` with Grafana's variables replaced: multi-value as (a|b), like Grafana does."""
    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name in builtins:
            return builtins[name]
        if name not in values:
            raise KeyError(f"undefined variable ${name} in {expr!r}")
        vals = values[name]
        assert vals, f"variable ${name} has no values"
        return vals[0] if len(vals) == 1 else "(" + "|".join(vals) + ")"
    out = _VAR.sub(one, expr)
    assert "$" not in out, out
    return out


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(kho_(?:fleet|agent)_[a-z_]+)\b", expr))


def _known_metrics() -> set[str]:
    spec = importlib.util.spec_from_file_location(
        "metric_reference", REPO / "deploy" / "prometheus" / "metric_reference.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    names = {n for n, *_ in mod.agent_metrics()}
    for m in METRICS:
        names |= ({m.name + s for s in ("_bucket", "_sum", "_count")}
                  if m.type == "histogram" else {m.name})
    return names


def test_dashboard_structure() -> None:
    d = DASHBOARD
    assert d["uid"] == "kho-fleet" and d["title"] and d["schemaVersion"] >= 36
    assert isinstance(d["panels"], list) and d["time"]["from"].startswith("now-")
    ids, boxes = [], []
    for p in d["panels"] + [q for row in d["panels"] for q in row.get("panels", [])]:
        assert p["type"] in PANEL_TYPES, p["type"]
        assert isinstance(p["id"], int) and p["id"] > 0
        ids.append(p["id"])
        g = p["gridPos"]
        assert set(g) == {"x", "y", "w", "h"} and all(isinstance(g[k], int) for k in g), p
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] >= 1 and g["h"] >= 1
        assert g["x"] + g["w"] <= 24, f"panel {p['id']} wider than the grid"
        boxes.append((p["id"], g))
        if p["type"] == "row":
            assert not p.get("targets")
            continue
        assert p["title"] and p["datasource"] == DS, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS and t["expr"].strip(), (p["title"], t)
    assert len(set(ids)) == len(ids), f"duplicate panel ids: {sorted(ids)}"
    for i, (a, ga) in enumerate(boxes):          # no two panels overlap
        for b, gb in boxes[i + 1:]:
            apart = (ga["x"] + ga["w"] <= gb["x"] or gb["x"] + gb["w"] <= ga["x"]
                     or ga["y"] + ga["h"] <= gb["y"] or gb["y"] + gb["h"] <= ga["y"])
            assert apart, f"panels {a} and {b} overlap"


def test_variables_are_defined_and_used() -> None:
    tvars = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    ds = tvars["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    used: set[str] = set()
    texts = [t["expr"] for _, t in dashboard_targets(DASHBOARD)]
    texts += [v["query"]["query"] for v in tvars.values() if v["type"] == "query"]
    links = [lk["url"] for _, p in _panels_with_links() for lk in p]
    for text in texts + links:
        for m in _VAR.finditer(text):
            used.add(m.group(1) or m.group(2) or m.group(3))
    for v in tvars.values():
        if v["type"] == "query":
            assert v["datasource"] == DS, v["name"]
            _label_values(v["query"]["query"])
            assert v["definition"] == v["query"]["query"]
    undefined = used - set(tvars) - set(BUILTINS) - {"__value", "__data"}
    assert not undefined, f"undefined variables: {sorted(undefined)}"
    unused = set(tvars) - used - {"datasource"}
    assert not unused, f"variables nothing uses: {sorted(unused)}"


def _panels_with_links() -> Iterator[tuple[dict, list[dict]]]:
    for p in DASHBOARD["panels"]:
        for o in p.get("fieldConfig", {}).get("overrides", []):
            for prop in o["properties"]:
                if prop["id"] == "links":
                    yield p, prop["value"]


def test_the_panels_the_issue_asks_for() -> None:
    exprs = {p["title"]: [t["expr"] for t in p["targets"]]
             for p in DASHBOARD["panels"] if p["type"] != "row"}
    joined = "\n".join(e for es in exprs.values() for e in es)
    assert "kho_fleet_rollout_stage_progress" in joined and "kho_fleet_stage_info" in joined
    (ratio,) = exprs["Handover success ratio"]
    assert 'result="success"' in ratio and "/" in ratio
    for q in ("0.5", "0.95"):
        assert re.search(rf"histogram_quantile\({q}, sum by \(le, stage, kernel\)", joined), q
    assert "kho_fleet_preserved_bytes" in joined
    assert "kho_fleet_rollout_preserved_bytes_total" in joined
    # the per-host table links each row's report path label to the report
    (hosts,) = [p for p in DASHBOARD["panels"] if p["title"] == "Hosts" and p["type"] != "row"]
    assert hosts["type"] == "table" and "kho_fleet_host_info" in hosts["targets"][0]["expr"]
    renamed = next(t["options"]["renameByName"] for t in hosts["transformations"]
                   if t["id"] == "organize")
    (link_panel, links), = list(_panels_with_links())
    assert link_panel is hosts
    (override,) = [o for o in hosts["fieldConfig"]["overrides"]
                   if any(pr["id"] == "links" for pr in o["properties"])]
    assert override["matcher"] == {"id": "byName", "options": renamed["report"]}
    assert links[0]["url"].endswith("/${__value.raw}") and "${reports_url}" in links[0]["url"]


def test_every_metric_name_exists_in_the_code() -> None:
    known = _known_metrics()
    used: set[str] = set()
    for _, t in dashboard_targets(DASHBOARD):
        used |= _metric_names(t["expr"])
    for v in DASHBOARD["templating"]["list"]:
        if v["type"] == "query":
            used |= _metric_names(v["query"]["query"])
    assert used and not used - known, f"not exposed by kho-fleet/kho-agent: {sorted(used - known)}"
    rules = (REPO / "deploy" / "prometheus" / "kho-fleet.rules.yml").read_text()
    unknown = _metric_names(rules) - known
    assert not unknown, f"rules use metrics nobody exposes: {sorted(unknown)}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian prometheus)")
def test_every_expression_parses_with_promtool(tmp_path: Path) -> None:
    """Each query (variables substituted) as a recording rule: promtool parses them all."""
    values = {v["name"]: ["x"] for v in DASHBOARD["templating"]["list"]}
    builtins = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
    rules = []
    for i, (p, t) in enumerate(dashboard_targets(DASHBOARD)):
        rules.append({"record": f"dashboard:panel{p['id']}:{t['refId']}_{i}",
                      "expr": substitute(t["expr"], values, builtins)})
    f = tmp_path / "dashboard.rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", str(f)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules)} rules found" in r.stdout
    # and promtool does reject a broken one
    rules[0]["expr"] = "sum(" + rules[0]["expr"]
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", str(f)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0
