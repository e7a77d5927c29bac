"""Each kernel-selftest playbook (playbooks/selftests/*.yaml) through the real CLI
(`kho-fleet rollout`) on a twin host: the playbook's workloads exactly as shipped, the
target swapped for a twin kernel. Every workload must come back verified with every
memfd-v2 property identical (props_mismatch empty), and the properties each scenario is
about (seals, folio orders, holes, position, many files, many sessions) must be the ones
the playbook asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_rollout import cli, inventory

from kho_agent.workload import load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]
PLAYBOOKS = sorted((REPO / "playbooks/selftests").glob("*.yaml"))
SCENARIOS = {"luo_kexec_simple", "luo_multi_session", "luo_stress_files",
             "luo_stress_sessions", "memfd_seals", "memfd_props"}


def test_one_playbook_per_selftest_scenario() -> None:
    assert {p.stem for p in PLAYBOOKS} == SCENARIOS


def _seals_set(asked: list[str]) -> list[str]:
    """F_GET_SEALS after F_ADD_SEALS of `asked` on a memfd created with MFD_ALLOW_SEALING
    (mode 0777): mm/memfd.c adds the write seals to F_SEAL_EXEC ("SEAL_EXEC implies
    SEAL_WRITE, making W^X from the start")."""
    got = set(asked) | ({"shrink", "grow", "write", "future_write"} if "exec" in asked else set())
    return [n for n in ("seal", "shrink", "grow", "write", "future_write", "exec") if n in got]


def _twin_copy(src: Path, dst: Path) -> dict[str, Any]:
    doc = yaml.safe_load(src.read_text())
    doc["target"] = {"kernel": "twin:7.2.14-twin", "cmdline": "reuse"}
    doc["timeouts"] = {"ssh_s": 15, "boot_s": 60, "verify_s": 300}
    dst.write_text(yaml.safe_dump(doc, sort_keys=False))
    return doc


@pytest.mark.parametrize("path", PLAYBOOKS, ids=[p.stem for p in PLAYBOOKS])
def test_selftest_playbook_on_a_twin(sim: Path, path: Path) -> None:
    doc = _twin_copy(path, sim / "playbook.yaml")
    spec = parse_spec(doc["workloads"], "workloads")
    inv = inventory(sim, {"st1": {}}, kho_sim_ram_mib=256, kho_boot_timeout=60)
    p = cli(sim, "rollout", "--playbook", str(sim / "playbook.yaml"), "--inventory", str(inv),
            "--json", timeout=900)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    fleet = json.loads(p.stdout)
    assert fleet["rollout"]["status"] == "completed"
    (rid,) = [d.name for d in (sim / "reports").iterdir()]
    rep = json.loads((sim / "reports" / rid / "hosts" / "st1.json").read_text())["agent"]
    assert rep["result"] == "success", rep.get("failure")
    ws = {(w["session"], w["token"]): w for w in rep["workloads"]}
    want = {(s.name, m.token): m for s in spec.sessions for m in s.memfds}
    assert set(ws) == set(want)                       # every generated name and token
    for key, w in ws.items():
        m = want[key]
        before, after = w["props_before"], w["props_after"]
        assert w["verified"] and w["props_mismatch"] == [], (key, w)
        assert before["size"] == after["size"] == m.size
        assert before["pos"] == after["pos"] == m.position
        assert before["seals"] == after["seals"]
        if m.seals is not None:                       # exactly the seals asked for
            assert before["seals"] == _seals_set(before["kind"]["seals"])
        else:
            assert before["seals"] == ["seal"]        # no MFD_ALLOW_SEALING: F_SEAL_SEAL
        if m.holes:
            assert before["holes"] == m.holes         # the sparse layout as made
            assert after["holes"] == [] and after["holes_zero"] is True   # memfd-v2 fills
        if m.huge is not None:
            fb, fa = before["folios_by_order"], after["folios_by_order"]
            assert fb == fa and before["shmem_enabled"] == "advise"   # the twin's default
            huge = fb.get("9", 0)
            assert (huge == 0) if m.huge == "never" else (huge == m.size // (2 << 20))
    empty = {s.name for s in spec.sessions if not s.memfds}
    assert set(rep["empty_sessions"]) == empty and rep["sessions_lost"] == {}
    if path.stem == "luo_stress_files":
        assert len(ws) == 500 and {t for _, t in ws} == set(range(500))
    if path.stem == "luo_stress_sessions":
        assert {s for s, _ in ws} == {f"many-test-{i}" for i in range(100)}
        assert empty == {f"many-empty-{i}" for i in range(100)}
    if path.stem == "luo_multi_session":
        assert empty == {"multi-test-empty-1", "multi-test-empty-2"}


def test_playbook_workloads_are_the_agent_spec(tmp_path: Path) -> None:
    """The agent reads the same workloads section as its own spec file (JSON here)."""
    doc = yaml.safe_load((REPO / "playbooks/selftests/luo_stress_sessions.yaml").read_text())
    f = tmp_path / "spec.json"
    f.write_text(json.dumps(doc["workloads"]))
    spec = load_spec(str(f))
    assert len(spec.sessions) == 200 and spec.sessions[99].name == "many-test-99"
    assert spec.sessions[-1].name == "many-empty-99" and spec.sessions[-1].memfds == []
    assert [m.token for m in spec.sessions[0].memfds] == [1]
