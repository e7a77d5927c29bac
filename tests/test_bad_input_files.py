"""Bad inventories and playbooks through the real `kho-fleet` CLI: refused up front, one line.

Every case mutates a copy of the repo's valid inventory/sim.yaml or playbooks/demo.yaml in
tmp_path and runs the installed `kho-fleet rollout`, `kho-fleet preflight` (and, for
inventory cases, `kho-fleet sim up`) as subprocesses. Each must exit 2 with exactly one
line on stderr naming the file (and the field or host), no traceback, no `internal error`,
and leave the disk as it was: no rollouts/reports/sim directory, every file byte-identical.

A valid rollout would boot twins, so none is ever run here: before the CLI runs, the same
inputs are loaded in-process and must already be refused (if a regression made them valid,
the case fails there instead of starting a rollout).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from diskstate import snapshot

from kho_fleet.inventory import InventoryError, load_inventory
from kho_fleet.playbook import PlaybookError, load_playbook

REPO = Path(__file__).resolve().parent.parent
KHO_FLEET = Path(sys.executable).parent / "kho-fleet"
BASE_INV = yaml.safe_load((REPO / "inventory" / "sim.yaml").read_text())
BASE_PB = yaml.safe_load((REPO / "playbooks" / "demo.yaml").read_text())

Mut = Callable[[Any, Path], Any]      # (a deep copy of the base document, tmp dir) -> document


# --- mutations ---------------------------------------------------------------------------

def all_vars(**kv: Any) -> Mut:
    def m(d: dict, tmp: Path) -> dict:
        d["all"]["vars"].update(kv)
        return d
    return m


def host_vars(host: str, **kv: Any) -> Mut:
    def m(d: dict, tmp: Path) -> dict:
        found = [g for g in d["all"]["children"].values() if host in g["hosts"]]
        assert found, f"no host {host!r} in the base inventory: the mutation would do nothing"
        for g in found:
            g["hosts"][host] = {**(g["hosts"][host] or {}), **kv}
        return d
    return m


def rack_b_hosts(*names: str) -> Mut:
    def m(d: dict, tmp: Path) -> dict:
        for n in names:
            d["all"]["children"]["rack-b"]["hosts"][n] = None
        return d
    return m


def pb_set(path: tuple, value: Any) -> Mut:
    def m(d: dict, tmp: Path) -> dict:
        cur = d
        for k in path[:-1]:
            cur = cur[k]
        cur[path[-1]] = value
        return d
    return m


def raw(text: str | bytes) -> Mut:
    """Replace the whole file (bytes are written as they are)."""
    return lambda d, tmp: text


def ssh_host_with(**kv: Any) -> Mut:
    """twin-a1 becomes an ssh host with extra vars (paths may use {tmp})."""
    def m(d: dict, tmp: Path) -> dict:
        vals = {k: (v.format(tmp=tmp) if isinstance(v, str) else v) for k, v in kv.items()}
        return host_vars("twin-a1", kho_transport="ssh", **vals)(d, tmp)
    return m


def twin_root_under_file(d: dict, tmp: Path) -> dict:
    (tmp / "blocker").write_text("a regular file, not a directory\n")
    return host_vars("twin-b1", kho_twin_root="blocker/twins/b1")(d, tmp)


def key_is_directory(d: dict, tmp: Path) -> dict:
    (tmp / "keys").mkdir()
    return ssh_host_with(ansible_ssh_private_key_file="keys")(d, tmp)


def alias_bomb(d: dict, tmp: Path) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 7):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def inventory_too_big(d: dict, tmp: Path) -> dict:
    d["all"]["children"]["rack-a"]["hosts"] = {"n[1:99999]": None}
    return d


def thousand_stages(d: dict, tmp: Path) -> dict:
    d["stages"] = [{"name": f"s{i}", "hosts": 1} for i in range(1001)] + [{"name": "rest"}]
    return d


def many_sessions(d: dict, tmp: Path) -> dict:
    d["workloads"]["sessions"] = [{"name": f"s{i}"} for i in range(300)]
    return d


def children_cycle(d: dict, tmp: Path) -> dict:
    d["all"]["children"]["rack-a"]["children"] = {"rack-b": None}
    d["all"]["children"]["rack-b"]["children"] = {"rack-a": None}
    return d


def missing_kernel(d: dict, tmp: Path) -> dict:
    d["target"] = {"kernel": "images/bzImage-missing", "sha256": "ab" * 32}
    return d


def memfd(**kv: Any) -> Mut:
    def m(d: dict, tmp: Path) -> dict:
        d["workloads"]["sessions"][0]["memfds"][0].update(kv)
        return d
    return m


def stage(i: int, **kv: Any) -> Mut:
    def m(d: dict, tmp: Path) -> dict:
        d["stages"][i].update(kv)
        return d
    return m


# --- the table: (id, file mutated, mutation, what the one stderr line must contain) --------
# `file` is "inv" or "pb"; `needles` are regexes the line must match (besides the file name).

CASES: list[tuple[str, str, Mut, list[str]]] = [
    # types
    ("type-page-size-float", "inv", all_vars(kho_page_size=4096.0),
     [r"inv\.yaml:\d+: group 'all': kho_page_size: must be one of"]),
    ("type-page-size-bool", "inv", host_vars("twin-a2", kho_page_size=True),
     [r"inv\.yaml:\d+: host 'twin-a2': kho_page_size"]),
    ("type-ram-float", "inv", all_vars(kho_sim_ram_mib=96.5), [(r"kho_sim_ram_mib: must be an "
                                                                r"integer in 64\.\.65536")]),
    ("type-port-float", "inv", host_vars("twin-b1", ansible_port=22.0),
     [r"host 'twin-b1': ansible_port: must be a port number"]),
    ("type-boot-timeout-word", "inv", all_vars(kho_boot_timeout="soon"),
     [r"kho_boot_timeout: must be a positive number of seconds"]),
    ("type-faults-mapping", "inv", host_vars("twin-b2", kho_sim_faults={"bitflip": 1}),
     [r"host 'twin-b2': kho_sim_faults: must be a list"]),
    ("type-max-parallel-float", "pb", stage(1, max_parallel=3.0),
     [r"pb\.yaml:\d+: stages\[1\]\.max_parallel: must be a positive integer"]),
    ("type-stage-count-float", "pb", stage(0, hosts=1.5), [r"stages\[0\]\.hosts: must be"]),
    ("type-memfd-size-float", "pb", memfd(size=4096.5),
     [r"workloads\.sessions\[0\]\.memfds\[0\]\.size: not a size"]),
    ("type-memfd-adopt-word", "pb", memfd(adopt="no way"),
     [r"memfds\[0\]\.adopt: must be true or false"]),
    ("type-verified-word", "pb", stage(0, gate={"all_workloads_verified": "maybe"}),
     [r"stages\[0\]\.gate\.all_workloads_verified: must be true or false"]),
    # ranges
    ("range-boot-timeout-negative", "inv", all_vars(kho_boot_timeout=-5),
     [(r"group 'all': kho_boot_timeout: must be a positive number of seconds, got -5 "
       r"\(range: > 0 and at most 604800\)")]),
    ("range-boot-timeout-huge", "inv", all_vars(kho_boot_timeout=1.0e9),
     [r"kho_boot_timeout: .*at most 604800"]),
    ("range-boot-delay-zero", "inv", host_vars("twin-a3", kho_sim_boot_delay=0),
     [r"host 'twin-a3': kho_sim_boot_delay: .*at most 3600"]),
    ("range-ram-small", "inv", all_vars(kho_sim_ram_mib=16), [r"kho_sim_ram_mib: .*64\.\.65536"]),
    ("range-ssh-timeout-negative", "pb", pb_set(("timeouts", "ssh_s"), -1),
     [r"pb\.yaml:\d+: timeouts\.ssh_s: must be a positive number of seconds, got -1"]),
    ("range-boot-timeout-inf", "pb", pb_set(("timeouts", "boot_s"), float("inf")),
     [r"timeouts\.boot_s: .*at most 604800"]),
    ("range-pause-huge", "pb", stage(0, pause=1.0e12), [r"stages\[0\]\.pause: .*at most 604800"]),
    ("range-ratio", "pb", stage(2, gate={"min_success_ratio": 1.5}),
     [r"stages\[2\]\.gate\.min_success_ratio: must be a number in 0\.\.1"]),
    ("range-seed-negative", "pb", memfd(seed=-1), [r"memfds\[0\]\.seed: must be an integer"]),
    ("range-fault-unknown", "inv", host_vars("twin-b2", kho_sim_faults=["bitflp"]),
     [r"host 'twin-b2': kho_sim_faults: unknown fault 'bitflp' \(did you mean 'bitflip'\?\)"]),
    # existence
    ("exists-ssh-key-missing", "inv", ssh_host_with(ansible_ssh_private_key_file="keys/nope"),
     [(r"inv\.yaml:\d+: host 'twin-a1': ansible_ssh_private_key_file: .*keys/nope: "
       r"no such file")]),
    ("exists-ssh-key-is-dir", "inv", key_is_directory,
     [r"host 'twin-a1': ansible_ssh_private_key_file: .*: not a regular file"]),
    ("exists-known-hosts-missing", "inv", ssh_host_with(kho_ssh_known_hosts="{tmp}/kh"),
     [r"host 'twin-a1': kho_ssh_known_hosts: .*/kh: no such file"]),
    ("exists-twin-root-under-file", "inv", twin_root_under_file,
     [(r"host 'twin-b1': kho_twin_root: .*blocker/twins/b1: cannot be created: a parent of "
       r"it is not a directory")]),
    ("exists-kernel-file-missing", "pb", missing_kernel,
     [r"pb\.yaml:\d+: target\.kernel: .*bzImage-missing: No such file"]),
    ("exists-twin-root-too-long", "inv", host_vars("twin-a4", kho_twin_root="t" * 120),
     [(r"host 'twin-a4': kho_twin_root: .*: too long: the twin's socket dev/liveupdate under "
       r"it would be \d+ characters, AF_UNIX allows at most 107")]),
    ("exists-inventory-missing", "inv", raw(""), [r"nothing-here\.yaml: No such file"]),
    # bounds
    ("bound-range-huge", "inv", rack_b_hosts("twin-c[1:99999999]"),
     [r"inv\.yaml:\d+: host 'twin-c\[1:99999999\]': .*at most 100000 hosts per range"]),
    ("bound-range-product", "inv", rack_b_hosts("n[1:1000]x[1:1000]"),
     [r"host 'n\[1:1000\]x\[1:1000\]': .*at most 100000 hosts"]),
    ("bound-inventory-total", "inv", inventory_too_big,
     [r"inv\.yaml:\d+: host 'twin-b2': at most 100000 hosts per inventory"]),
    ("bound-yaml-alias-bomb", "inv", alias_bomb, [r"too many values \(at most \d+"]),
    ("bound-huge-integer", "inv", raw("all:\n  vars: {kho_sim_ram_mib: " + "9" * 5000
                                      + "}\n  hosts: {h1: }\n"),
     [r"inv\.yaml:2: all\.vars\.kho_sim_ram_mib: bad value"]),
    ("bound-stage-count", "pb", stage(0, hosts=100001),
     [r"stages\[0\]\.hosts: .*at most 100000 hosts"]),
    ("bound-max-parallel", "pb", stage(2, max_parallel=5000),
     [r"stages\[2\]\.max_parallel: .*at most 1024"]),
    ("bound-stages", "pb", thousand_stages, [r"pb\.yaml:\d+: stages: 1002 stages: at most 1000"]),
    ("bound-sessions", "pb", many_sessions, [r"workloads\.sessions: 300 sessions: at most 256"]),
    ("bound-memfd-size", "pb", memfd(size="2TiB"),
     [r"memfds\[0\]\.size: \d+ bytes: at most \d+ bytes \(1 TiB\) per memfd"]),
    ("bound-workload-bigger-than-twin-ram", "pb", memfd(size="300MiB"),
     [(r"pb\.yaml:\d+: workloads: \d+ bytes do not fit in sim host 'twin-a1''s RAM "
       r"\(kho_sim_ram_mib: 256")]),
    # structure
    ("structure-shared-twin-root", "inv", all_vars(kho_twin_root="twins/shared"),
     [(r"inv\.yaml:\d+: group 'all': kho_twin_root: .*twins/shared: also the twin root of "
       r"host 'twin-a1' \(host 'twin-a2'\)")]),
    ("structure-stage-too-big", "pb", stage(1, hosts=30),
     [(r"pb\.yaml:\d+: stage 'batch': hosts: asks for 30 hosts, but only 7 of the play's 8 "
       r"hosts .* are left")]),
    ("structure-stage-percent-too-big", "pb", stage(1, hosts="100%"),
     [r"stage 'batch': hosts: asks for 100% of the play's 8 hosts = 8 hosts, but only 7"]),
    ("structure-twin-with-pin", "pb", pb_set(("target", "sha256"), "ab" * 32),
     [r"pb\.yaml:\d+: target\.sha256: a twin kernel \(twin:7\.2\.14-twin\) is generated"]),
    ("structure-children-cycle", "inv", children_cycle, [r"is its own descendant"]),
    ("structure-pb-list", "pb", raw("- name: x\n"), [r"pb\.yaml:1: expected a mapping"]),
    ("structure-pb-unknown-key", "pb", pb_set(("stagez",), []), [r"stagez: unknown key"]),
    ("structure-inv-not-utf8", "inv", raw(b"all:\n  hosts: {\xff\xfe: }\n"), [r"not UTF-8"]),
    ("structure-inv-empty", "inv", raw(""), [r"inv\.yaml:1: expected a mapping of groups"]),
    ("structure-cmdline-nul", "pb", raw("name: x\ntarget: {kernel: 'twin:7.2', cmdline: "
                                        "\"a\\x00b\"}\nstages: [{name: s}]\n"),
     [r"pb\.yaml:2: target\.cmdline: must be 'reuse' or a kernel command line"]),
]


# --- running ------------------------------------------------------------------------------

def write_doc(path: Path, doc: Any) -> None:
    if isinstance(doc, bytes):
        path.write_bytes(doc)
    elif isinstance(doc, str):
        path.write_text(doc)
    else:
        path.write_text(yaml.safe_dump(doc, sort_keys=False))


def refused_in_process(inv: Path, pb: Path) -> None:
    """The guard: these inputs must not make a valid rollout (never start one here)."""
    with pytest.raises((InventoryError, PlaybookError)):
        i = load_inventory(str(inv))
        p = load_playbook(str(pb))
        p.assign_hosts(i)
        p.target.check_files()


def run(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(KHO_FLEET), *args, "--rollouts-dir", str(tmp / "rollouts"),
                           "--reports-dir", str(tmp / "reports"), "--sim-dir", str(tmp / "sim")],
                          capture_output=True, text=True, timeout=120, cwd=tmp,
                          env={**os.environ, "KHO_FLEET_DEBUG": ""})


def check_one_line(p: subprocess.CompletedProcess, fname: str, needles: list[str],
                   what: str) -> None:
    lines = p.stderr.splitlines()
    assert p.returncode == 2, f"{what}: rc {p.returncode}: {p.stderr}"
    assert len(lines) == 1, f"{what}: stderr is not one line: {p.stderr!r}"
    line = lines[0]
    assert "Traceback" not in line and "internal error" not in line, line
    assert line.startswith("kho-fleet: error: "), line
    assert fname in line, f"{what}: the line does not name {fname}: {line}"
    for n in needles:
        assert re.search(n, line), f"{what}: {n!r} not in {line!r}"


def test_at_least_25_cases_in_every_class() -> None:
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)
    for cls in ("type", "range", "exists", "bound", "structure"):
        assert sum(c[0].startswith(cls + "-") for c in CASES) >= 3, cls


@pytest.mark.parametrize("case_id, which, mutate, needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_one_line_and_nothing_changes(
        tmp_path: Path, case_id: str, which: str, mutate: Mut, needles: list[str]) -> None:
    inv, pb = tmp_path / "inv.yaml", tmp_path / "pb.yaml"
    write_doc(inv, BASE_INV)
    write_doc(pb, BASE_PB)
    target = inv if which == "inv" else pb
    write_doc(target, mutate(copy.deepcopy(BASE_INV if which == "inv" else BASE_PB), tmp_path))
    if case_id == "exists-inventory-missing":
        inv = tmp_path / "nothing-here.yaml"
    fname = inv.name if which == "inv" else pb.name
    refused_in_process(inv, pb)
    before = snapshot(tmp_path)
    commands = [("rollout", "--playbook", str(pb), "--inventory", str(inv)),
                ("preflight", "--playbook", str(pb), "--inventory", str(inv))]
    if which == "inv":
        commands.append(("sim", "up", "--inventory", str(inv)))
    for cmd in commands:
        p = run(tmp_path, *cmd)
        check_one_line(p, fname, needles, " ".join(cmd[:2]))
        for d in ("rollouts", "reports", "sim"):
            assert not (tmp_path / d).exists(), f"{cmd[0]} created {d}/"
        assert snapshot(tmp_path) == before, f"{cmd[0]} changed files under {tmp_path}"


def test_usable_files_are_accepted_and_nothing_is_created(tmp_path: Path) -> None:
    """The existence checks refuse only what cannot work: a readable key, a known_hosts file
    that tofu will create, a twin root that does not exist yet all load (and stay absent)."""
    (tmp_path / "id_ed25519").write_text("not really a key, but a readable file\n")
    doc = copy.deepcopy(BASE_INV)
    doc["all"]["children"]["rack-a"]["hosts"]["twin-a1"] = {
        "kho_transport": "ssh", "ansible_ssh_private_key_file": "id_ed25519",
        "kho_ssh_trust": "tofu", "kho_ssh_known_hosts": "ssh/new/known_hosts"}
    doc["all"]["children"]["rack-b"]["hosts"]["twin-b1"] = {"kho_twin_root": "twins/deep/b1"}
    inv = tmp_path / "inv.yaml"
    write_doc(inv, doc)
    before = snapshot(tmp_path)
    i = load_inventory(str(inv))
    assert i.hosts["twin-a1"].key_file == str(tmp_path / "id_ed25519")
    assert i.hosts["twin-b1"].twin_root == str(tmp_path / "twins" / "deep" / "b1")
    assert snapshot(tmp_path) == before
    # the same inventory with strict host keys needs the known_hosts file to exist
    doc["all"]["children"]["rack-a"]["hosts"]["twin-a1"]["kho_ssh_trust"] = "known_hosts"
    write_doc(inv, doc)
    with pytest.raises(InventoryError, match=r"inv\.yaml:\d+: host 'twin-a1': "
                                             r"kho_ssh_known_hosts: .*: no such file"):
        load_inventory(str(inv))
