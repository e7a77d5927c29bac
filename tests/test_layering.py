"""The layering holds: the engines and the agent's lifecycle never name what is below a seam.

Two seams, each chosen once: the kernel (real Linux / twin) under the agent, the host
access (SSH / local / twin / lab) under the controller. Read from the source with `ast`
(every import, at module level or inside functions), so a lazy import counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AGENT = REPO / "agent" / "kho_agent"
CTRL = REPO / "controller" / "kho_fleet"


def imports(path: Path) -> set[str]:
    """Every module `path` imports, resolved to dotted names (relative ones included)."""
    tree = ast.parse(path.read_text(), str(path))
    pkg_parts = list(path.relative_to(path.parents[len(path.relative_to(REPO).parts) - 2])
                     .with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[:len(pkg_parts) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _sim(name: str) -> bool:
    return (".sim" in f".{name}" and name.split(".")[:2] == ["kho_fleet", "sim"]) \
        or "twin" in name or name.endswith(".lab") or ".lab." in name


@pytest.mark.parametrize("path", [CTRL / "rollout.py", CTRL / "lifecycle.py",
                                  CTRL / "statedb.py", CTRL / "fleetreport.py",
                                  CTRL / "hoststeps.py", CTRL / "temporal" / "workflow.py",
                                  CTRL / "temporal" / "activities.py",
                                  CTRL / "temporal" / "client.py"])
def test_the_engine_never_imports_a_host_kind(path: Path) -> None:
    bad = sorted(m for m in imports(path) if _sim(m) or m.endswith("transport.ssh"))
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", [AGENT / "handover.py", AGENT / "preflight.py",
                                  AGENT / "snapshot.py", AGENT / "report.py",
                                  AGENT / "journal.py"])
def test_the_agent_lifecycle_never_imports_a_kernel_kind(path: Path) -> None:
    bad = sorted(m for m in imports(path) if "twin" in m or m.endswith("kernel.linux"))
    assert not bad, f"{path.name} imports {bad}"


def test_the_engine_source_never_names_the_twin() -> None:
    """No `is_twin`, `"sim"` transport or twin env branching above the seam."""
    for path in (CTRL / "rollout.py", CTRL / "hoststeps.py", CTRL / "temporal" / "workflow.py"):
        _no_twin_words(path)


def _no_twin_words(path: Path) -> None:
    text = path.read_text()
    for word in ("is_twin", 'transport == "sim"', "KHO_AGENT_TWIN", "twin_root"):
        assert word not in text, f"{path.name}: {word}"


def _optional_imports(path: Path) -> set[str]:
    """Modules imported inside `try: ... except ImportError` (optional, with a fallback)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError",
                                                               "ModuleNotFoundError")
                for h in node.handlers):
            for sub in node.body:
                for n in ast.walk(sub):
                    if isinstance(n, ast.Import):
                        out.update(a.name for a in n.names)
                    elif isinstance(n, ast.ImportFrom) and n.module:
                        out.add(n.module)
    return out


def test_the_agent_has_no_third_party_imports() -> None:
    """Stdlib only (an optional import with a fallback, such as PyYAML for specs, is allowed)."""
    import sys
    std = set(sys.stdlib_module_names)
    for path in AGENT.rglob("*.py"):
        optional = _optional_imports(path)
        for m in imports(path):
            top = m.split(".")[0]
            assert top in std or top == "kho_agent" or not top or m in optional \
                or m.rsplit(".", 1)[0] in optional, f"{path}: imports {m}"
