"""`kho-fleet build-agent`: pack the stdlib-only agent into one zipapp (kho-agent.pyz).

The archive holds only the agent modules `kho_agent.cli` and `kho_agent.__main__` can
import, found by walking their import statements (function-level ones included): the
encoders the digital twin and the tests use (kho_agent.abi.encode) stay out. An import
of the package that names no module, or a third-party import the agent would need on the
host, fails the build (the agent is stdlib-only; an optional import inside
`try: ... except ImportError:` is allowed).

The archive is reproducible (sorted entries, fixed timestamps), so its sha256 names it
in the content-addressed directory on each host.
"""

from __future__ import annotations

import ast
import hashlib
import io
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import kho_agent
from kho_agent.atomicfile import atomic_write

from .errors import Bug

__all__ = ["AgentBuildError", "ENTRY_MODULES", "agent_modules", "build_agent"]

PACKAGE = "kho_agent"
ENTRY_MODULES = (f"{PACKAGE}.cli", f"{PACKAGE}.__main__")
# The zipapp's entry: run the agent from the byte-compiled copy of this very archive when
# `stage` made one (kho_agent.bootcopy: python3 caches no bytecode for a zip), else from
# the archive. KHO_AGENT_NO_COPY=1 runs from the archive (benchmarks).
_MAIN = b"""import os
import sys


def _use_copy():
    import hashlib
    archive = os.path.dirname(os.path.abspath(__file__))
    if os.environ.get("KHO_AGENT_NO_COPY") or not os.path.isfile(archive):
        return
    try:
        with open(archive, "rb") as f:
            name = hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError:
        return
    copy = os.path.join(archive + ".d", name)
    if os.path.isfile(os.path.join(copy, "COMPLETE")):
        sys.path.insert(0, copy)


_use_copy()
from kho_agent.cli import main  # noqa: E402

sys.exit(main())
"""
_EPOCH = (2026, 1, 1, 0, 0, 0)
_IMPORT_ERRORS = frozenset({"ImportError", "ModuleNotFoundError"})


class AgentBuildError(Bug):
    """The agent's own sources import something the zipapp cannot carry (a bug in them)."""


def _package_modules(pkg: Path) -> dict[str, Path]:
    """{dotted name: file} of every module of the package rooted at `pkg`."""
    out = {}
    for path in pkg.rglob("*.py"):
        parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _guarded(handlers: list[ast.ExceptHandler]) -> bool:
    """Whether a try statement's handlers catch ImportError (an optional import)."""
    for h in handlers:
        names = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
        if any(isinstance(n, ast.Name) and n.id in _IMPORT_ERRORS for n in names):
            return True
    return False


def _imports(tree: ast.AST) -> Iterator[tuple[ast.stmt, bool]]:
    """Every import statement anywhere in `tree`, with whether an ImportError handler
    guards it (a plain stack walk: no recursion limit on deep code)."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, guarded = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, guarded
            continue
        if isinstance(node, ast.Try):
            body_guarded = guarded or _guarded(node.handlers)
            stack += [(n, body_guarded) for n in node.body]
            stack += [(n, guarded) for n in (*node.handlers, *node.orelse, *node.finalbody)]
            continue
        stack += [(n, guarded) for n in ast.iter_child_nodes(node)]


def _resolve(node: ast.stmt, module: str, is_pkg: bool,
             modules: dict[str, Path]) -> tuple[list[str], list[str]]:
    """(package modules, other top-level names) that import statement `node` of `module`
    loads. Raises ValueError naming a package module that does not exist."""
    ours: list[str] = []
    other: list[str] = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            (ours if alias.name.split(".")[0] == PACKAGE else other).append(alias.name)
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_pkg else module.split(".")[:-1]
            if node.level - 1 >= len(base):
                raise ValueError(f"relative import beyond the package ({'.' * node.level}"
                                 f"{node.module or ''})")
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                return ours, [target.split(".")[0]]
        ours.append(target)
        # `from pkg import name`: name is a submodule, or something pkg's __init__ defines
        ours += [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
    for name in ours:
        if name not in modules:
            raise ValueError(f"imports {name}, which is not a module of {PACKAGE}")
    return ours, [o.split(".")[0] for o in other]


def agent_modules(pkg: Optional[Path] = None,
                  entries: tuple[str, ...] = ENTRY_MODULES) -> dict[str, Path]:
    """{dotted name: file} of the package modules reachable from `entries` (and every
    package __init__ on the way). AgentBuildError names the file and line of an import
    that cannot be resolved, or of a non-stdlib import outside try/except ImportError."""
    pkg = pkg or Path(kho_agent.__file__).resolve().parent
    modules = _package_modules(pkg)
    stdlib = getattr(sys, "stdlib_module_names", None)   # python >= 3.10
    seen: dict[str, Path] = {}
    todo = list(entries)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in modules:
            raise AgentBuildError(f"agent build: entry module {name} not found in {pkg}")
        path = seen[name] = modules[name]
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]   # parent packages
        where = path.relative_to(pkg.parent)
        try:
            tree = ast.parse(path.read_bytes(), str(where))
        except SyntaxError as e:
            raise AgentBuildError(f"agent build: {where}:{e.lineno}: {e.msg}") from None
        for node, guarded in _imports(tree):
            try:
                ours, other = _resolve(node, name, path.name == "__init__.py", modules)
            except ValueError as e:
                raise AgentBuildError(f"agent build: {where}:{node.lineno}: {e}") from None
            todo += ours
            for top in other:
                if stdlib is not None and top not in stdlib and not guarded:
                    raise AgentBuildError(
                        f"agent build: {where}:{node.lineno}: imports {top}, which is not in "
                        "the standard library (the agent runs on hosts with python3 only)")
    return dict(sorted(seen.items()))


def build_agent(out: str) -> tuple[str, str]:
    """Write the zipapp to `out`; returns (path, sha256)."""
    pkg = Path(kho_agent.__file__).resolve().parent
    files = sorted(p.relative_to(pkg.parent).as_posix() for p in agent_modules(pkg).values())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(zipfile.ZipInfo("__main__.py", _EPOCH), _MAIN)
        for rel in files:
            info = zipfile.ZipInfo(rel, _EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, (pkg.parent / rel).read_bytes())
    data = b"#!/usr/bin/env python3\n" + buf.getvalue()
    atomic_write(out, data, mode=0o755)
    return out, hashlib.sha256(data).hexdigest()
