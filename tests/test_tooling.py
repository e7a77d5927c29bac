"""The project's habits, checked: dependencies earn their place, the agent stays stdlib-only,
and the linters (ruff, mypy) configured in pyproject.toml pass.

The whole-tree ruff/mypy runs are marked `lint` and deselected by default (pyproject's
addopts has `-m "not lint"`) until the tree is clean; run them with `pytest -m lint` or
`make lint`. The kernel-ABI decoders (kho_agent.abi), which are clean already, are checked
unconditionally so they stay that way.
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = REPO / "pyproject.toml"
AGENT = REPO / "agent" / "kho_agent"
CONTROLLER = REPO / "controller" / "kho_fleet"
DEPS_DOC = REPO / "docs" / "dependencies.md"

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")


def dist_name(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement string.

    >>> dist_name("prometheus_client>=0.20; python_version >= '3.9'")
    'prometheus-client'
    >>> dist_name("PyYAML[libyaml] >= 6.0")
    'pyyaml'
    """
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not m:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def import_names(dist: str) -> set[str]:
    """Top-level import names the installed distribution `dist` provides (from its RECORD),
    falling back to the distribution name with dashes as underscores."""
    names = {mod for mod, dists in packages_distributions().items()
             if any(dist_name(d) == dist for d in dists) and not mod.startswith("_")}
    return names or {dist.replace("-", "_")}


def _handles_import_error(node: ast.Try) -> bool:
    for h in node.handlers:
        types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
        if any(isinstance(t, ast.Name) and t.id in ("ImportError", "ModuleNotFoundError")
               for t in types):
            return True
    return False


def imports(tree: ast.AST) -> Iterator[tuple[str, int, bool]]:
    """(top-level module, line, guarded) for every absolute import anywhere in `tree`
    (module level or inside functions); guarded = inside a try that catches ImportError.

    >>> src = "import os.path\\ntry:\\n    import yaml\\nexcept ImportError:\\n    pass\\n"
    >>> sorted(imports(ast.parse(src)))
    [('os', 1, False), ('yaml', 3, True)]
    """
    def walk(node: ast.AST, guarded: bool) -> Iterator[tuple[str, int, bool]]:
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name.split(".")[0], node.lineno, guarded
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.lineno, guarded
        if isinstance(node, ast.Try) and _handles_import_error(node):
            for stmt in node.body:
                yield from walk(stmt, True)
            rest: list[ast.AST] = [*node.handlers, *node.orelse, *node.finalbody]
            for other in rest:
                yield from walk(other, guarded)
            return
        for child in ast.iter_child_nodes(node):
            yield from walk(child, guarded)

    yield from walk(tree, False)


def imported_modules(package_dir: Path) -> dict[str, list[str]]:
    """Top-level module -> ["file:line", ...] for every absolute import under package_dir."""
    found: dict[str, list[str]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for mod, line, _ in imports(tree):
            found.setdefault(mod, []).append(f"{path.relative_to(REPO)}:{line}")
    return found


def declared(pyproject: Path = PYPROJECT) -> tuple[list[str], dict[str, list[str]]]:
    """(runtime dependency names, {extra: dependency names}) from pyproject.toml."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    runtime = [dist_name(r) for r in project.get("dependencies", [])]
    extras = {k: [dist_name(r) for r in v]
              for k, v in project.get("optional-dependencies", {}).items()}
    return runtime, extras


def unused_runtime_dependencies(pyproject: Path = PYPROJECT) -> list[str]:
    """Runtime dependencies that no module under controller/kho_fleet imports."""
    used = imported_modules(CONTROLLER)
    runtime, _ = declared(pyproject)
    return [d for d in runtime if not import_names(d) & used.keys()]


def test_every_runtime_dependency_is_imported_by_the_controller() -> None:
    assert unused_runtime_dependencies() == [], (
        "declared in pyproject.toml [project] dependencies but imported by no module under "
        "controller/kho_fleet: drop them or say in docs/dependencies.md why they stay")


def test_the_dependency_check_catches_an_unused_dependency(tmp_path: Path) -> None:
    """The check above can fail: a pyproject that declares fabric (never imported) is caught."""
    fake = tmp_path / "pyproject.toml"
    fake.write_text('[project]\nname = "x"\ndependencies = ["paramiko>=3.4", "fabric>=3.2"]\n')
    assert unused_runtime_dependencies(fake) == ["fabric"]


def test_every_declared_dependency_is_documented() -> None:
    runtime, extras = declared()
    doc = DEPS_DOC.read_text(encoding="utf-8").lower()
    names = runtime + [d for ds in extras.values() for d in ds]
    missing = [d for d in names if f"`{d}`" not in doc]
    assert missing == [], f"not described in {DEPS_DOC.relative_to(REPO)}: {missing}"


def test_agent_imports_only_the_standard_library() -> None:
    """kho_agent ships to hosts as a zipapp that runs on a bare python3: any third-party
    import must be optional (inside `try: ... except ImportError`)."""
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for path in sorted(AGENT.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for mod, line, guarded in imports(tree):
            if mod not in stdlib and mod != "kho_agent" and not guarded:
                bad.append(f"{path.relative_to(REPO)}:{line}: import {mod}")
    assert bad == [], "the agent must stay stdlib-only:\n" + "\n".join(bad)


IMPORT_ALL = r"""
import importlib, logging, pkgutil, signal, sys, threading
import kho_agent, kho_fleet
before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
failed = []
for pkg in (kho_agent, kho_fleet):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if m.name.rsplit(".", 1)[-1] == "__main__":
            continue
        try:
            importlib.import_module(m.name)
        except BaseException as e:
            failed.append(f"{m.name}: {type(e).__name__}: {e}")
problems = failed + [f"thread left running: {t.name}" for t in threading.enumerate()
                     if t is not threading.main_thread()]
problems += [f"signal handler for {s!r} changed" for s, h in before.items()
             if signal.getsignal(s) != h]
if logging.getLogger().handlers:
    problems.append(f"root logger configured: {logging.getLogger().handlers}")
print("\n".join(problems), file=sys.stderr)
sys.exit(1 if problems else 0)
"""


def test_importing_every_module_has_no_side_effects(tmp_path: Path) -> None:
    """--doctest-modules imports every module of both packages: each must import cleanly
    (no missing optional dependency at import time) and do nothing when imported — no
    output, no files, no threads, no signal handlers, no logging configuration."""
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stdout, proc.stderr.strip()) == (0, "", "")
    assert [p.name for p in tmp_path.iterdir()] == ["home"]
    assert list(home.iterdir()) == []


def _python39() -> str | None:
    """A working Python 3.9 interpreter (PATH, then pyenv's versions), or None."""
    found = [shutil.which("python3.9")]
    found += sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.9*/bin/python3.9")))
    for exe in found:
        if exe and subprocess.run([exe, "-c", "import sys; assert sys.version_info[:2] == (3, 9)"],
                                  capture_output=True).returncode == 0:
            return exe
    return None


def test_agent_imports_on_python39(tmp_path: Path) -> None:
    """The agent promises Python >= 3.9 on the hosts, and mypy >= 2 cannot check for 3.9 any
    more (ruff's py39 target catches syntax only): import every agent module under a real 3.9."""
    exe = _python39()
    if exe is None:
        pytest.skip("no Python 3.9 interpreter here (python3.9 on PATH or under ~/.pyenv)")
    script = IMPORT_ALL.replace("import kho_agent, kho_fleet", "import kho_agent") \
                       .replace("(kho_agent, kho_fleet)", "(kho_agent,)")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(AGENT.parent),
           "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([exe, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stderr.strip()) == (0, "")


def _tool(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m module args` from this venv in the repository root."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed in {sys.prefix} (pip install -e '.[test]')")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900)


def _report(proc: subprocess.CompletedProcess[str]) -> str:
    out = (proc.stdout + proc.stderr).strip().splitlines()
    return "\n".join(out[-60:])


def test_abi_decoders_pass_ruff() -> None:
    proc = _tool("ruff", "check", "--no-cache", "agent/kho_agent/abi")
    assert proc.returncode == 0, _report(proc)


def test_abi_decoders_pass_mypy_strict() -> None:
    # --follow-imports=silent: errors in modules abi imports (kho_agent.errors) are the
    # whole-tree run's business, not this one's.
    proc = _tool("mypy", "--follow-imports=silent", "--no-warn-unused-configs",
                 "-p", "kho_agent.abi")
    assert proc.returncode == 0, _report(proc)


@pytest.mark.lint
def test_ruff_passes_on_the_tree() -> None:
    proc = _tool("ruff", "check", "--no-cache", ".")
    assert proc.returncode == 0, _report(proc)


@pytest.mark.lint
def test_mypy_passes_on_the_tree() -> None:
    proc = _tool("mypy")
    assert proc.returncode == 0, _report(proc)
