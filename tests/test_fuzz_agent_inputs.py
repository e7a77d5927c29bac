"""Fuzzing the agent's input files: mutated state.json and workload specs.

hypothesis mutates a valid agent state file and a valid workload spec (byte flips,
truncation, type swaps of one field, deleted fields) and runs the agent on each. The
contract is the project's bad-input rule: exit 0, or exit 1/2 with exactly one line on
stderr -- never a traceback, never "internal error". Most examples call kho_agent.cli
main() in-process (fast); one test runs the same mutations through real subprocesses.
Specs are run through `preflight --spec` on a real twin host (preflight only reads the
host), so a spec that passes validation also meets real code.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twinsupport import running_twin

from kho_agent.cli import main

STATE = {"handover_id": "0123456789ab", "phase": "snapshot",
         "history": [{"phase": "preflight", "t": 1.5}, {"phase": "stage", "t": 2.5}],
         "failure": {"phase": "stage", "reason": "kexec load failed"}, "aborted": False,
         "staged": {"kernel": "/boot/vmlinuz", "sha256": "ab" * 32, "initrd": None,
                    "cmdline": "ro", "target": {"release": "7.2.14"},
                    "running": {"release": "7.2.13", "kho": "kho-v4"}, "kexec_loaded": True},
         "preflight": {"ok": True, "checks": [{"name": "kho", "ok": True, "detail": "on",
                                               "blocking": True}]}}
STATE_PATHS = [(), ("handover_id",), ("phase",), ("history",), ("history", 0),
               ("history", 0, "phase"), ("history", 1, "t"), ("failure",),
               ("failure", "phase"), ("failure", "reason"), ("aborted",), ("staged",),
               ("staged", "target"), ("staged", "running"), ("staged", "kernel"),
               ("preflight",), ("preflight", "checks"), ("preflight", "checks", 0),
               ("preflight", "checks", 0, "ok"), ("preflight", "checks", 0, "detail")]

SPEC = {"sessions": [{"name": "vm-ram", "memfds": [{"token": 4097, "size": "2MiB", "seed": 1},
                                                   {"token": "0x1002", "adopt": True}]},
                     {"name": "cache", "memfds": [{"token": 1, "size": 4096}]}]}
SPEC_PATHS = [(), ("sessions",), ("sessions", 0), ("sessions", 0, "name"),
              ("sessions", 0, "memfds"), ("sessions", 0, "memfds", 0),
              ("sessions", 0, "memfds", 0, "token"), ("sessions", 0, "memfds", 0, "size"),
              ("sessions", 0, "memfds", 0, "seed"), ("sessions", 0, "memfds", 1, "adopt"),
              ("sessions", 1, "memfds", 0, "token")]

JUNK = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=1 << 63),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                 st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _set(obj: Any, path: tuple[Any, ...], value: Any, delete: bool = False) -> Any:
    """`obj` with the field at `path` replaced by `value` (or deleted)."""
    if not path:
        return value
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        parent.pop(path[-1], None)
    else:
        parent[path[-1]] = value
    return obj


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any], paths: list[tuple[Any, ...]]) -> bytes:
    """The JSON of `base`, mutated once: a byte flip, a truncation, a type swap or a
    deleted field (sometimes two mutations)."""
    obj = copy.deepcopy(base)
    kind = draw(st.sampled_from(["flip", "truncate", "swap", "delete", "swap+flip"]))
    if kind in ("swap", "delete", "swap+flip"):
        path = draw(st.sampled_from(paths))
        obj = _set(obj, path, draw(JUNK), delete=kind == "delete")
    data = bytearray(json.dumps(obj).encode())
    if kind in ("flip", "swap+flip") and data:
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
    if kind == "truncate":
        data = data[:draw(st.integers(0, max(0, len(data) - 1)))]
    return bytes(data)


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def assert_contract(rc: int, err: str, what: bytes) -> None:
    assert "Traceback" not in err and "internal error" not in err, (err, what)
    if rc == 0:
        return
    assert rc in (1, 2), (rc, err, what)
    assert len(err.splitlines()) == 1 and err.startswith("kho-agent: "), (err, what)


@pytest.fixture(autouse=True)
def _no_twin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KHO_AGENT_TWIN", raising=False)
    monkeypatch.delenv("KHO_FLEET_DEBUG", raising=False)


@pytest.fixture(scope="module")
def scratch() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="kho-fuzz-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _state_dir(scratch: str, data: bytes) -> str:
    d = tempfile.mkdtemp(dir=scratch)
    with open(os.path.join(d, "state.json"), "wb") as f:
        f.write(data)
    return d


def test_the_unmutated_inputs_are_accepted(scratch: str) -> None:
    d = _state_dir(scratch, json.dumps(STATE).encode())
    rc, out, err = run_main(["status", "--json", "--state-dir", d])
    assert rc == 0 and json.loads(out)["phase"] == "snapshot", err
    from kho_agent.workload import parse_spec
    assert parse_spec(SPEC).total_bytes == (2 << 20) + 4096


@SETTINGS
@given(data=mutated(STATE, STATE_PATHS), command=st.sampled_from(["status", "report"]))
def test_mutated_state_file(scratch: str, data: bytes, command: str) -> None:
    """status and report (which only read the host's name) on a mutated state.json."""
    d = _state_dir(scratch, data)
    rc, out, err = run_main([command, "--json", "--state-dir", d])
    assert_contract(rc, err, data)
    if rc == 0:
        json.loads(out)
    else:
        assert rc == 2 and "state.json" in err, (err, data)   # only the file can be wrong
        with open(os.path.join(d, "state.json"), "rb") as f:
            assert f.read() == data                           # and it is left as it was


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated(STATE, STATE_PATHS))
def test_mutated_state_file_subprocess(scratch: str, data: bytes) -> None:
    """The same contract through the real CLI process (stderr as the user sees it)."""
    d = _state_dir(scratch, data)
    env = {k: v for k, v in os.environ.items() if k not in ("KHO_AGENT_TWIN", "KHO_FLEET_DEBUG")}
    proc = subprocess.run([sys.executable, "-m", "kho_agent", "status", "--state-dir", d],
                          capture_output=True, text=True, env=env, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert_contract(proc.returncode, proc.stderr, data)


@pytest.fixture(scope="module")
def twin_root() -> Iterator[str]:
    """A running twin host's root (128 MiB RAM, short boot delay); stopped after."""
    with running_twin() as root:
        yield root


@SETTINGS
@given(data=mutated(SPEC, SPEC_PATHS), yaml_name=st.booleans())
def test_mutated_workload_spec(scratch: str, twin_root: str, data: bytes,
                               yaml_name: bool) -> None:
    """`preflight --spec` on a twin host with a mutated spec (JSON or a .yaml name: the
    agent falls back to YAML when PyYAML is there)."""
    d = tempfile.mkdtemp(dir=scratch)
    spec = os.path.join(d, "spec.yaml" if yaml_name else "spec.json")
    with open(spec, "wb") as f:
        f.write(data)
    rc, out, err = run_main(["preflight", "--spec", spec, "--twin", twin_root,
                             "--state-dir", os.path.join(d, "state")])
    assert_contract(rc, err, data)
    if rc == 2:
        assert spec in err, (err, data)                # the spec is the only bad input
