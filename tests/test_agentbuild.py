"""kho-agent.pyz ships only what the agent runs: the modules kho_agent.cli and
kho_agent.__main__ import (at any depth, function-level imports included), none of the
encoders the twin and the tests use. The archive is byte-reproducible and runs from a
directory outside the repository with nothing but the standard library.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

import kho_agent
from kho_fleet.agentbuild import AgentBuildError, agent_modules, build_agent
from kho_fleet.sim.twinkernel import start_twin

PKG = Path(kho_agent.__file__).resolve().parent


@pytest.fixture(scope="module")
def pyz(tmp_path_factory) -> Path:
    return Path(build_agent(str(tmp_path_factory.mktemp("build") / "kho-agent.pyz"))[0])


def _names(p: Path) -> list[str]:
    with zipfile.ZipFile(p) as z:
        return z.namelist()


def test_zipapp_has_no_encoder_and_keeps_the_twin_backend(pyz):
    names = _names(pyz)
    assert (PKG / "abi/encode/kho.py").is_file()          # the encoders exist in the tree...
    assert not [n for n in names if "/encode/" in n], names   # ...but not in the zipapp
    for must in ("__main__.py", "kho_agent/__main__.py", "kho_agent/cli.py",
                 "kho_agent/kernel/twin.py", "kho_agent/kernel/twinproto.py",
                 "kho_agent/abi/kho.py", "kho_agent/abi/radix.py"):
        assert must in names
    # exactly the reachable modules, each byte-identical to its source
    want = sorted(p.relative_to(PKG.parent).as_posix() for p in agent_modules().values())
    assert sorted(n for n in names if n != "__main__.py") == want
    with zipfile.ZipFile(pyz) as z:
        for n in want:
            assert z.read(n) == (PKG.parent / n).read_bytes(), n


def test_zipapp_is_byte_reproducible_and_executable(pyz, tmp_path):
    again = Path(build_agent(str(tmp_path / "again" / "kho-agent.pyz"))[0])
    assert hashlib.sha256(again.read_bytes()).hexdigest() == \
        hashlib.sha256(pyz.read_bytes()).hexdigest()
    assert stat.S_IMODE(again.stat().st_mode) == 0o755
    assert again.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert os.listdir(again.parent) == ["kho-agent.pyz"]         # no temp file left


def _run(pyz_path: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """python3 -S kho-agent.pyz ARGS from `cwd`: no site-packages (the repo's editable
    install is out of reach), no PYTHONPATH, no twin variable from the test's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "KHO_"))}
    return subprocess.run([sys.executable, "-S", str(pyz_path), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_zipapp_runs_outside_the_repo_against_a_twin(pyz):
    work = Path(tempfile.mkdtemp(prefix="pyz-", dir="/tmp"))     # short: AF_UNIX paths
    try:
        copy = work / "kho-agent.pyz"
        shutil.copyfile(pyz, copy)
        r = _run(copy, "--version", cwd=work)
        assert r.returncode == 0 and r.stdout.strip() == f"kho-agent {kho_agent.__version__}", r
        root = str(work / "host")
        h = start_twin(root, boot_delay=0.05, ram_mib=128)
        try:
            r = _run(copy, "status", "--twin", root, cwd=work)
            assert r.returncode == 0 and "phase new" in r.stdout, r
            # preflight decodes the twin's KHO FDT with the decoders the zipapp carries
            r = _run(copy, "preflight", "--json", "--twin", root, cwd=work)
            assert r.returncode == 0, r
            pre = json.loads(r.stdout)
            assert pre["running"]["kho"] == "kho-v4" and pre["running"]["luo"] == "luo-v5"
        finally:
            h.stop()
        # a bad twin root is still one line and exit 2 from the zipapp
        r = _run(copy, "status", "--twin", str(work / "nohost"), cwd=work)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        # the decoders import from the zipapp; the encoders are not there to import
        probe = ("import sys; sys.path.insert(0, sys.argv[1]); import kho_agent.abi.kho\n"
                 "try:\n    import kho_agent.abi.encode.kho\nexcept ModuleNotFoundError:\n"
                 "    print('no encoder')\n")
        r = subprocess.run([sys.executable, "-S", "-c", probe, str(copy)], cwd=work,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == "no encoder", r
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def pkg_copy(tmp_path) -> Path:
    """A copy of the agent package to break."""
    dst = tmp_path / "kho_agent"
    shutil.copytree(PKG, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _append(path: Path, code: str) -> int:
    """Append `code` to `path`; returns the line number it starts at."""
    text = path.read_text()
    path.write_text(text + code)
    return text.count("\n") + 1


def test_function_level_imports_are_followed(pkg_copy):
    assert "kho_agent.abi.encode.kho" not in agent_modules(pkg_copy)
    _append(pkg_copy / "snapshot.py",
            "\n\ndef _later():\n    from .abi.encode.kho import encode_kho_fdt\n"
            "    return encode_kho_fdt\n")
    mods = agent_modules(pkg_copy)
    # the import inside the function, and what that module imports in turn
    assert {"kho_agent.abi.encode", "kho_agent.abi.encode.kho",
            "kho_agent.abi.encode.fdt"} <= set(mods)


def test_unresolvable_import_fails_the_build_naming_file_and_line(pkg_copy):
    line = _append(pkg_copy / "cli.py", "\n\ndef _broken():\n    from .nosuch import thing\n")
    with pytest.raises(AgentBuildError) as ei:
        agent_modules(pkg_copy)
    msg = str(ei.value)
    assert f"kho_agent/cli.py:{line + 3}" in msg and "kho_agent.nosuch" in msg, msg


@pytest.mark.skipif(not hasattr(sys, "stdlib_module_names"), reason="python < 3.10")
def test_third_party_import_fails_the_build_unless_optional(pkg_copy):
    # workload.py already imports yaml inside try/except ImportError: allowed
    assert "kho_agent.workload" in agent_modules(pkg_copy)
    line = _append(pkg_copy / "report.py", "\nimport yaml\n")
    with pytest.raises(AgentBuildError) as ei:
        agent_modules(pkg_copy)
    assert f"kho_agent/report.py:{line + 1}" in str(ei.value) and "yaml" in str(ei.value)
