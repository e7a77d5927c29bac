"""Fuzzing the controller's input files: mutated inventories and playbooks are either loaded
or refused with ONE line naming the file, never any other exception.

Hypothesis mutates copies of the repo's valid inventory/sim.yaml and playbooks/demo.yaml
(values replaced by other types, huge or odd numbers, keys deleted or added, host names
turned into ranges, random bytes flipped in the YAML text) and calls load_inventory /
load_playbook and Playbook.assign_hosts in-process. The only exceptions allowed are
InventoryError / PlaybookError whose message is one line starting with the file's path.
A few examples also go through the real `kho-fleet preflight` (exit 2, one stderr line);
those are only run for inputs already refused in-process, so no rollout ever starts.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kho_fleet.inventory import HOST_VARS, InventoryError, load_inventory
from kho_fleet.playbook import PlaybookError, load_playbook

REPO = Path(__file__).resolve().parent.parent
KHO_FLEET = Path(sys.executable).parent / "kho-fleet"
INV_TEXT = (REPO / "inventory" / "sim.yaml").read_bytes()
PB_TEXT = (REPO / "playbooks" / "demo.yaml").read_bytes()
BASE_INV = yaml.safe_load(INV_TEXT)
BASE_PB = yaml.safe_load(PB_TEXT)

FUZZ = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ODD_STRINGS = ["", " ", "4K", "64K", "rest", "manual", "all", "!all", "&rack-a", "50%",
               "150%", "0%", "twin:", "twin:7.2 x", "twin:../x", "0x1001", "16MiB",
               "99999999999999999999TiB", "1.5GiB", "a[1:99999999]", "y[1:400]z[1:400]",
               "w[3:1]", "v[1:2", "../../etc", "/etc/passwd/x", "a\x00b", "line\nbreak",
               "~", "yes", "no", "null", "1e9", ".inf", "-.inf", "x" * 5000]
ODD_NUMBERS = [0, -1, 1, 2, 63, 64, 4096, 16384, 65536, 4096.0, 0.5, -0.0, 1e-300, 1e300,
               2 ** 63, 2 ** 64, -(2 ** 64), 10 ** 30, 10 ** 400, float("inf"), float("-inf"),
               float("nan"), True, False]
KNOWN_KEYS = ([v.name for v in HOST_VARS] + ["kho_bogus", "ansible_connection", "hosts",
              "vars", "children", "name", "target", "kernel", "sha256", "stages", "gate",
              "max_parallel", "pause", "timeouts", "boot_s", "workloads", "sessions", "memfds",
              "token", "size", "seed", "adopt", "on_failure", "initrd", "cmdline"])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from(ODD_STRINGS), st.sampled_from(ODD_NUMBERS))
values = st.one_of(scalars, st.lists(scalars, max_size=3),
                   st.dictionaries(st.sampled_from(KNOWN_KEYS), scalars, max_size=3))


def paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (mapping keys, list indices) in `doc`, the root excluded."""
    out: list[tuple] = []
    if isinstance(doc, dict):
        items = list(doc.items())
    elif isinstance(doc, list):
        items = list(enumerate(doc))
    else:
        return out
    for k, v in items:
        out.append(prefix + (k,))
        out.extend(paths(v, prefix + (k,)))
    return out


def get_parent(doc: Any, path: tuple) -> Any:
    for k in path[:-1]:
        doc = doc[k]
    return doc


@st.composite
def mutated(draw: st.DrawFn, base: Any) -> Any:
    """`base` after 1..3 mutations: replace, delete, add a key, wrap, stringify, rename."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        ps = paths(doc)
        if not ps:
            return draw(values)
        path = draw(st.sampled_from(ps))
        parent, key = get_parent(doc, path), path[-1]
        op = draw(st.sampled_from(["replace", "delete", "add", "wrap", "str", "rename"]))
        if op == "replace":
            parent[key] = draw(values)
        elif op == "delete":
            del parent[key]
        elif op == "add" and isinstance(parent[key], dict):
            parent[key][draw(st.sampled_from(KNOWN_KEYS + ODD_STRINGS[:20]))] = draw(values)
        elif op == "wrap":
            parent[key] = [parent[key]]
        elif op == "str":
            parent[key] = str(parent[key])
        elif op == "rename" and isinstance(parent, dict):
            new = draw(st.sampled_from(KNOWN_KEYS + ODD_STRINGS))
            parent[new] = parent.pop(key)
    return doc


@st.composite
def flipped(draw: st.DrawFn, text: bytes) -> bytes:
    """`text` with 1..6 bytes replaced, inserted or deleted."""
    b = bytearray(text)
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(b) - 1))
        op = draw(st.sampled_from(["set", "insert", "delete"]))
        byte = draw(st.one_of(st.integers(0, 255), st.sampled_from(list(b":[]{}&*!|>-#'\"\n 9"))))
        if op == "set":
            b[i] = byte
        elif op == "insert":
            b.insert(i, byte)
        elif len(b) > 1:
            del b[i]
    return bytes(b)


def dump(doc: Any) -> bytes:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).encode()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    (d / "good-inv.yaml").write_bytes(INV_TEXT)
    (d / "good-pb.yaml").write_bytes(PB_TEXT)
    return d


def check(inv: Path, pb: Path) -> bool:
    """Load both and plan; True if accepted, False if refused properly; AssertionError else."""
    try:
        i = load_inventory(str(inv))
    except InventoryError as e:
        assert_one_line(e, inv)
        return False
    try:
        p = load_playbook(str(pb))
    except PlaybookError as e:
        assert_one_line(e, pb)
        return False
    try:
        p.assign_hosts(i)
    except PlaybookError as e:
        assert "\n" not in str(e) and "\r" not in str(e), str(e)
        assert str(e).startswith((f"{pb}:", f"{inv}:")), str(e)
        return False
    return True


def assert_one_line(e: Exception, path: Path) -> None:
    msg = str(e)
    assert msg, type(e)
    assert "\n" not in msg and "\r" not in msg, repr(msg)
    assert msg.startswith((f"{path}:", f"{path} ")), msg


@FUZZ
@given(doc=mutated(BASE_INV))
def test_mutated_inventory_loads_or_is_refused_in_one_line(work: Path, doc: Any) -> None:
    inv = work / "inv.yaml"
    inv.write_bytes(dump(doc))
    check(inv, work / "good-pb.yaml")


@FUZZ
@given(doc=mutated(BASE_PB))
def test_mutated_playbook_loads_or_is_refused_in_one_line(work: Path, doc: Any) -> None:
    pb = work / "pb.yaml"
    pb.write_bytes(dump(doc))
    check(work / "good-inv.yaml", pb)


@FUZZ
@given(inv_bytes=flipped(INV_TEXT), pb_bytes=flipped(PB_TEXT))
def test_byte_flipped_files_load_or_are_refused_in_one_line(work: Path, inv_bytes: bytes,
                                                           pb_bytes: bytes) -> None:
    inv, pb = work / "flip-inv.yaml", work / "flip-pb.yaml"
    inv.write_bytes(inv_bytes)
    pb.write_bytes(pb_bytes)
    check(inv, work / "good-pb.yaml")
    check(work / "good-inv.yaml", pb)


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(which=st.sampled_from(["inv", "pb"]), data=st.data())
def test_cli_contract_for_refused_inputs(tmp_path_factory: pytest.TempPathFactory, which: str,
                                         data: st.DataObject) -> None:
    """The real CLI: exit 2, one stderr line naming the file, nothing created."""
    d = tmp_path_factory.mktemp("cli")
    inv, pb = d / "inv.yaml", d / "pb.yaml"
    inv.write_bytes(INV_TEXT)
    pb.write_bytes(PB_TEXT)
    target = inv if which == "inv" else pb
    base = BASE_INV if which == "inv" else BASE_PB
    target.write_bytes(dump(data.draw(mutated(base))))
    assume(not check(inv, pb))                 # never start a real (valid) preflight here
    before = sorted(os.listdir(d))
    p = subprocess.run([str(KHO_FLEET), "preflight", "--playbook", str(pb), "--inventory",
                        str(inv), "--rollouts-dir", str(d / "r"), "--reports-dir", str(d / "rep"),
                        "--sim-dir", str(d / "s")], capture_output=True, text=True, timeout=120,
                       cwd=d, env={**os.environ, "KHO_FLEET_DEBUG": ""})
    lines = p.stderr.splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr
    assert lines[0].startswith("kho-fleet: error: ") and target.name in lines[0], lines[0]
    assert sorted(os.listdir(d)) == before
