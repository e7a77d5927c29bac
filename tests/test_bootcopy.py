"""The agent's byte-compiled copy (kho_agent.bootcopy, issue 11): `stage` unpacks the zipapp
it runs from into `<pyz>.d/<id>/` with .pyc files, the zipapp runs from a complete copy of
the same archive, child agents (holder, boot unit) get it on PYTHONPATH, and bad archives
or places leave the agent running from the zipapp, with one line saying why.

Real zipapps built by kho_fleet.agentbuild, run by this python in subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kho_agent import bootcopy
from kho_fleet.agentbuild import build_agent

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def pyz(tmp_path: Path) -> Path:
    out = tmp_path / "store" / "kho-agent.pyz"
    out.parent.mkdir()
    build_agent(str(out))
    return out


def run_pyz(pyz: Path, *args: str, env: dict[str, str] | None = None,
            verbose: bool = False) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KHO_AGENT_TWIN")}
    e.update(env or {})
    return subprocess.run([sys.executable, *(["-v"] if verbose else []), str(pyz), *args],
                          capture_output=True, text=True, timeout=120, env=e)


def ensure_in_child(pyz: Path) -> tuple[str | None, str]:
    """bootcopy.ensure() as a zipapp's own process runs it (the archive it was imported from)."""
    code = ("import sys, json; from kho_agent import bootcopy; "
            "print(json.dumps(bootcopy.ensure()))")
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                       timeout=120, env={"PYTHONPATH": str(pyz), "PATH": os.environ["PATH"]})
    assert r.returncode == 0, r.stderr
    copy, line = json.loads(r.stdout)
    return copy, line


def test_ensure_unpacks_and_compiles_every_module_once(pyz: Path) -> None:
    copy, line = ensure_in_child(pyz)
    assert copy is not None and "unpacked and byte-compiled" in line, line
    d = Path(copy)
    assert d.parent == Path(f"{pyz}.d") and d.name == bootcopy.build_id(str(pyz))
    assert (d / bootcopy.COMPLETE).is_file()
    with zipfile.ZipFile(pyz) as z:
        modules = [n for n in z.namelist() if n.endswith(".py")]
    assert len(modules) > 30
    tag = sys.implementation.cache_tag
    for name in modules:
        src = d / name
        assert src.read_bytes() == zipfile.ZipFile(pyz).read(name), name
        pyc = src.parent / "__pycache__" / f"{src.stem}.{tag}.pyc"
        assert pyc.is_file(), pyc
    again, line2 = ensure_in_child(pyz)
    assert again == copy and "already there" in line2


def test_the_zipapp_runs_from_its_complete_copy_only(pyz: Path, tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    before = run_pyz(pyz, "status", "--state-dir", state, "--json", verbose=True)
    assert before.returncode == 0, before.stderr
    assert f"{pyz}.d" not in before.stderr          # no copy yet: from the archive
    copy, _ = ensure_in_child(pyz)
    assert copy is not None
    after = run_pyz(pyz, "status", "--state-dir", state, "--json", verbose=True)
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout).keys() == json.loads(before.stdout).keys()
    # the agent's modules are loaded from the copy's .pyc files, none from the archive
    assert f"code object from '{copy}/kho_agent/__pycache__/cli." in after.stderr
    assert "kho_agent/cli.py' from zip" not in after.stderr
    # an incomplete copy is not used, nor one when KHO_AGENT_NO_COPY is set
    for env in ({"KHO_AGENT_NO_COPY": "1"}, {}):
        if not env:
            os.unlink(os.path.join(copy, bootcopy.COMPLETE))
        r = run_pyz(pyz, "status", "--state-dir", state, "--json", env=env, verbose=True)
        assert r.returncode == 0 and copy not in r.stderr, env


def test_a_rebuilt_archive_gets_its_own_copy_and_old_ones_are_pruned(pyz: Path) -> None:
    made = []
    for i in range(bootcopy.KEEP + 2):
        with zipfile.ZipFile(pyz, "a") as z:          # a different archive each round
            z.writestr(f"extra-{i}.txt", b"x")
        copy, _ = ensure_in_child(pyz)
        assert copy is not None and copy not in made
        os.utime(os.path.join(copy, bootcopy.COMPLETE), (1000 + i, 1000 + i))
        made.append(copy)
    left = sorted(p for p in os.listdir(f"{pyz}.d"))
    assert len(left) == bootcopy.KEEP
    assert os.path.basename(made[-1]) in left and os.path.basename(made[0]) not in left


def test_code_root_for_child_agents(pyz: Path) -> None:
    code = "from kho_agent import bootcopy; print(bootcopy.code_root())"
    env = {"PYTHONPATH": str(pyz), "PATH": os.environ["PATH"]}
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.stdout.strip() == str(pyz)            # no copy: the archive itself
    copy, _ = ensure_in_child(pyz)
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.stdout.strip() == copy
    # from a source tree: the directory holding the package
    assert bootcopy.code_root() == str(REPO / "agent")
    assert bootcopy.ensure()[0] is None


def test_bad_archives_and_places_leave_no_copy(tmp_path: Path, pyz: Path) -> None:
    evil = tmp_path / "evil.pyz"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("__main__.py", b"")
        z.writestr("../escape.py", b"x = 1\n")
    copy, line = bootcopy.ensure(str(evil))
    assert copy is None and "'../escape.py' is not a relative path" in line, line
    assert not (tmp_path / "escape.py").exists()
    assert os.listdir(f"{evil}.d") == []               # the half copy is gone
    broken = tmp_path / "broken.pyz"
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr("kho_agent/__init__.py", b"def (:\n")
    copy, line = bootcopy.ensure(str(broken))
    assert copy is None and "no byte-compiled copy" in line and "\n" not in line, line
    junk = tmp_path / "junk.pyz"
    junk.write_bytes(os.urandom(4096))
    copy, line = bootcopy.ensure(str(junk))
    assert copy is None and "junk.pyz" in line, line
    blocked = tmp_path / "blocked" / "kho-agent.pyz"
    blocked.parent.mkdir()
    blocked.write_bytes(pyz.read_bytes())
    Path(f"{blocked}.d").write_text("a file where the copies go\n")
    copy, line = bootcopy.ensure(str(blocked))
    assert copy is None and "kho-agent.pyz" in line, line
    # and the zipapp still runs from the archive
    r = run_pyz(blocked, "--version")
    assert r.returncode == 0 and r.stdout.startswith("kho-agent "), r.stderr
