"""Playbooks: fields and defaults, stage host selection, file:line: field errors, samples."""

from __future__ import annotations

import hashlib
import os
import textwrap

import pytest

from kho_fleet.inventory import load_inventory
from kho_fleet.playbook import Gate, PlaybookError, Timeouts, load_playbook

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GOOD = """\
name: test
target:
  kernel: twin:7.2.14-twin
stages:
  - name: canary
    hosts: 1
  - name: rest
"""

INVENTORY = """\
all:
  vars: {kho_transport: sim}
  children:
    rack-a:
      hosts:
        a[1:4]:
    rack-b:
      hosts:
        b[1:4]:
    odd:
      hosts: {a1: , a3: , b1: , b3: }
"""


def write(tmp_path, text: str, name: str = "pb.yaml") -> str:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))
    return str(p)


def fails(tmp_path, text: str, prefix: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(PlaybookError) as ei:
        load_playbook(path)
    msg = str(ei.value)
    assert msg.startswith(f"{path}:{prefix}"), msg
    assert "\n" not in msg
    return msg


def test_minimal_defaults(tmp_path) -> None:
    pb = load_playbook(write(tmp_path, GOOD))
    assert pb.name == "test" and pb.hosts == "all" and pb.on_failure == "halt"
    assert pb.target.is_twin and pb.target.twin_release == "7.2.14-twin"
    assert pb.target.sha256 is None and pb.target.cmdline is None
    assert pb.workloads.sessions == [] and pb.timeouts == Timeouts()
    canary, rest = pb.stages
    assert (canary.select, canary.value, canary.max_parallel, canary.pause) == ("count", 1, 1, 0.0)
    assert canary.gate == Gate(1.0, None, True, None)
    assert (rest.select, rest.value) == ("rest", None)
    assert pb.sha256 == hashlib.sha256(GOOD.encode()).hexdigest()
    pb.target.check_files()                      # twin kernels have no file to check


def test_full_playbook_and_relative_paths(tmp_path) -> None:
    kernel = tmp_path / "images" / "bzImage"
    kernel.parent.mkdir()
    kernel.write_bytes(b"kernel")
    (tmp_path / "images" / "initrd").write_bytes(b"initrd")
    ksha = hashlib.sha256(b"kernel").hexdigest()
    isha = hashlib.sha256(b"initrd").hexdigest()
    path = write(tmp_path, f"""\
        name: full
        hosts: rack-a,rack-b
        target:
          kernel: ../images/bzImage
          sha256: {ksha.upper()}
          initrd: ../images/initrd
          initrd_sha256: {isha}
          cmdline: console=ttyS0 quiet
        workloads:
          sessions:
            - name: vm-ram
              memfds:
                - {{token: 0x1001, size: 64MiB, seed: 3}}
                - {{token: 4098, adopt: true}}
        stages:
          - name: canary
            hosts: 25%
            max_parallel: 2
            gate: {{min_success_ratio: 0.5, max_downtime_p95_s: 12.5,
                    all_workloads_verified: false, max_failed_hosts: 0}}
            pause: manual
          - {{name: last, hosts: rest, pause: 30}}
        on_failure: rollback
        timeouts: {{ssh_s: 5, boot_s: 60.5, verify_s: 10}}
        """, "playbooks/full.yaml")
    pb = load_playbook(path)
    t = pb.target
    assert t.kernel == str(kernel) and t.sha256 == ksha
    assert t.initrd == str(tmp_path / "images" / "initrd") and t.initrd_sha256 == isha
    assert t.cmdline == "console=ttyS0 quiet" and not t.is_twin
    t.check_files()
    m = pb.workloads.sessions[0].memfds
    assert (m[0].token, m[0].size, m[0].seed) == (0x1001, 64 << 20, 3) and m[1].adopt
    s0, s1 = pb.stages
    assert (s0.select, s0.value, s0.max_parallel, s0.pause) == ("percent", 25.0, 2, "manual")
    assert s0.gate == Gate(0.5, 12.5, False, 0)
    assert s1.pause == 30.0 and pb.on_failure == "rollback"
    assert pb.timeouts == Timeouts(5.0, 60.5, 10.0)

    kernel.write_bytes(b"other kernel")
    with pytest.raises(PlaybookError, match=rf"^{path}:5: target.sha256: .* has sha256 "):
        t.check_files()
    kernel.unlink()
    with pytest.raises(PlaybookError, match=rf"^{path}:4: target.kernel: .*No such file"):
        t.check_files()


# --- stage selection ---------------------------------------------------------------------

def plan(tmp_path, stages: str, hosts: str = "all") -> list[list[str]]:
    inv = load_inventory(write(tmp_path, INVENTORY, "inv.yaml"))
    body = textwrap.indent(textwrap.dedent(stages), "  ")
    pb = load_playbook(write(tmp_path, f"name: p\nhosts: {hosts}\ntarget: {{kernel: twin:1}}\n"
                                       f"stages:\n{body}"))
    return pb.assign_hosts(inv)


def test_select_count_then_rest(tmp_path) -> None:
    assert plan(tmp_path, """\
        - {name: canary, hosts: 1}
        - {name: batch, hosts: 3, max_parallel: 3}
        - {name: rest, max_parallel: 4}
        """) == [["a1"], ["a2", "a3", "a4"], ["b1", "b2", "b3", "b4"]]


def test_select_percent_of_whole_play_ceil_at_least_one(tmp_path) -> None:
    assert plan(tmp_path, """\
        - {name: a, hosts: 10%}
        - {name: b, hosts: 25%}
        - {name: c, hosts: "12.5%"}
        - {name: d, hosts: 30%}
        - {name: e, hosts: rest}
        """) == [["a1"], ["a2", "a3"], ["a4"], ["b1", "b2", "b3"], ["b4"]]
    assert plan(tmp_path, "- {name: x, hosts: 1%}\n", hosts="rack-a") == [["a1"]]


def test_select_group_takes_only_remaining_hosts(tmp_path) -> None:
    assert plan(tmp_path, """\
        - {name: odd, hosts: odd}
        - {name: a, hosts: rack-a}
        - {name: b-and-a, hosts: "rack-b,rack-a"}
        """) == [["a1", "a3", "b1", "b3"], ["a2", "a4"], ["b2", "b4"]]


def test_select_overlap_and_empty_stage(tmp_path) -> None:
    assert plan(tmp_path, """\
        - {name: a, hosts: rack-a}
        - {name: again, hosts: rack-a}
        - {name: big, hosts: 4}
        - {name: nothing-left}
        """) == [["a1", "a2", "a3", "a4"], [], ["b1", "b2", "b3", "b4"], []]
    # a count (or percentage) asking for more hosts than are left is refused, not capped
    with pytest.raises(PlaybookError, match=r"pb.yaml:6: stage 'big': hosts: asks for 100 "
                                            r"hosts, but only 4 of the play's 8 hosts"):
        plan(tmp_path, "- {name: a, hosts: rack-a}\n- {name: big, hosts: 100}\n")


def test_select_within_play_pattern_and_unstaged_hosts_left_alone(tmp_path) -> None:
    assert plan(tmp_path, """\
        - {name: a, hosts: 50%}
        - {name: b, hosts: odd}
        """, hosts="rack-b") == [["b1", "b2"], ["b3"]]


def test_select_errors(tmp_path) -> None:
    with pytest.raises(PlaybookError,
                       match=r"pb.yaml:6: stage 'x': hosts: .*inv.yaml: host pattern "
                             r"'rack-c': no host or group named 'rack-c' "
                             r"\(did you mean 'rack-[ab]'\?\)"):
        plan(tmp_path, "- {name: a, hosts: 1}\n- {name: x, hosts: rack-c}\n")
    with pytest.raises(PlaybookError, match=r"pb.yaml:2: hosts: 'rack-a,&rack-b' matches no host"):
        plan(tmp_path, "- {name: a}\n", hosts="rack-a,&rack-b")
    inv = load_inventory(write(tmp_path, "all:\n  hosts: {real: }\n", "ssh.yaml"))
    pb = load_playbook(write(tmp_path, GOOD))
    with pytest.raises(PlaybookError, match=r"pb.yaml:3: target.kernel: twin:7.2.14-twin is a "
                                            r"twin image, but host 'real' has kho_transport: ssh"):
        pb.assign_hosts(inv)


# --- errors ------------------------------------------------------------------------------

STAGES = "stages:\n  - name: canary\n    hosts: 1\n"
HEAD = "name: t\ntarget: {kernel: twin:7.2}\n"


@pytest.mark.parametrize("text, prefix", [
    (("name: t\ntarget: {kernel: twin:7.2}\nstages:\n  - name: a\n    hosts: 1\n"
      "  - name: b\n    hosts: 2\n    max_parallel: two\n"),
     "8: stages[1].max_parallel: must be a positive integer, got 'two'"),
    ("nmae: t\n", "1: nmae: unknown key (did you mean 'name'?)"),
    ("# just a comment\n", "1: name: required"),
    ("- 1\n", "1: expected a mapping, got a list"),
    ("name: t\n" + STAGES, "1: target: required"),
    (HEAD, "1: stages: required"),
    (HEAD + "stages: []\n", "3: stages: must be a non-empty list"),
    (HEAD + STAGES + "    max_paralel: 2\n",
     "6: stages[0].max_paralel: unknown key (did you mean 'max_parallel'?)"),
    (HEAD + STAGES + "    max_parallel: 0\n",
     "6: stages[0].max_parallel: must be a positive integer"),
    (HEAD + STAGES + "    gate: {min_sucess_ratio: 1}\n",
     "6: stages[0].gate.min_sucess_ratio: unknown key (did you mean 'min_success_ratio'?)"),
    (HEAD + STAGES + "    gate: {min_success_ratio: 1.5}\n",
     "6: stages[0].gate.min_success_ratio: must be a number in 0..1, got 1.5"),
    (HEAD + STAGES + "    gate: {max_downtime_p95_s: fast}\n",
     "6: stages[0].gate.max_downtime_p95_s: must be a positive number of seconds, got 'fast'"),
    (HEAD + STAGES + "    gate: {all_workloads_verified: 1}\n",
     "6: stages[0].gate.all_workloads_verified: must be true or false, got 1"),
    (HEAD + STAGES + "    gate: {max_failed_hosts: -1}\n",
     "6: stages[0].gate.max_failed_hosts: must be a non-negative integer, got -1"),
    (HEAD + STAGES + "    gate: strict\n", "6: stages[0].gate: expected a mapping, got 'strict'"),
    (HEAD + STAGES + "    pause: later\n",
     "6: stages[0].pause: must be seconds (>= 0) or 'manual', got 'later'"),
    (HEAD + STAGES + "  - {name: canary}\n", "6: stages[1].name: 'canary' is also stages[0].name"),
    (HEAD + "stages:\n  - {name: a}\n  - {name: b}\n",
     "4: stages[0].hosts: required (only the last stage may omit it or say 'rest')"),
    (HEAD + "stages:\n  - {name: a, hosts: rest}\n  - {name: b}\n",
     "4: stages[0].hosts: 'rest' is only allowed in the last stage"),
    (HEAD + "stages:\n  - {name: a, hosts: 0}\n",
     "4: stages[0].hosts: must be a positive host count"),
    (HEAD + "stages:\n  - {name: a, hosts: 150%}\n",
     "4: stages[0].hosts: a percentage must be in (0, 100], got '150%'"),
    (HEAD + "stages:\n  - {name: a, hosts: 0%}\n", "4: stages[0].hosts: a percentage must be in"),
    (HEAD + "stages:\n  - {name: a, hosts: [1]}\n", "4: stages[0].hosts: must be a host count"),
    (HEAD + "stages:\n  - {hosts: 1}\n", "4: stages[0].name: required"),
    (HEAD + STAGES + "on_failure: panic\n",
     "6: on_failure: must be one of halt, continue, rollback, got 'panic'"),
    (HEAD + STAGES + "timeouts: {boot_s: -5}\n",
     "6: timeouts.boot_s: must be a positive number of seconds, got -5"),
    (HEAD + STAGES + "timeouts: {boot: 5}\n",
     "6: timeouts.boot: unknown key (did you mean 'boot_s'?)"),
    (HEAD + STAGES + "hosts: [a]\n", "6: hosts: must be an inventory pattern"),
    ("name: t\ntarget:\n  kernel: vmlinuz\n" + STAGES,
     "2: target.sha256: required for a kernel file"),
    ("name: t\ntarget:\n  kernel: vmlinuz\n  sha256: abc\n" + STAGES,
     "4: target.sha256: must be 64 hex digits (a sha256), got 'abc'"),
    ("name: t\ntarget:\n  kernel: twin:7.2 x\n" + STAGES,
     "3: target.kernel: twin:<release> needs a kernel release"),
    ("name: t\ntarget:\n  kernel: twin:7.2\n  initrd_sha256: " + "0" * 64 + "\n" + STAGES,
     "4: target.initrd_sha256: given without target.initrd"),
    ("name: t\ntarget:\n  kernel: twin:7.2\n  cmdline: ''\n" + STAGES,
     "4: target.cmdline: must be 'reuse' or a kernel command line"),
    ("name: t\ntarget:\n  kernl: twin:7.2\n" + STAGES,
     "3: target.kernl: unknown key (did you mean 'kernel'?)"),
    ("name: t\ntarget: twin:7.2\n" + STAGES, "2: target: expected a mapping, got 'twin:7.2'"),
    (HEAD + STAGES + "workloads:\n  sessions:\n    - name: vm\n      memfds:\n"
     "        - {token: 1, size: 4MiB}\n        - {token: 2, size: lots}\n",
     "11: workloads.sessions[0].memfds[1].size: not a size: 'lots'"),
    (HEAD + STAGES + "workloads:\n  sessions:\n    - name: vm\n      memfds:\n"
     "        - {token: 1, size: 4MiB}\n        - {token: 1, size: 4MiB}\n",
     "11: workloads.sessions[0].memfds[1].token: 1 used twice in session 'vm'"),
    (HEAD + STAGES + "workloads:\n  sessions:\n    - name: vm\n      memfds:\n"
     "        - {token: 1, szie: 4MiB}\n",
     "10: workloads.sessions[0].memfds[0].szie: unknown key (did you mean 'size'?)"),
    (HEAD + STAGES + "workloads:\n  sessions:\n    - name: kho-agent\n",
     "8: workloads.sessions[0].name: 'kho-agent' is reserved"),
    (HEAD + STAGES + "workloads:\n  sessions:\n    - name: vm\n      memfds:\n"
     "        - {size: 1}\n",
     "10: workloads.sessions[0].memfds[0].token: required"),
    (HEAD + STAGES + "workloads:\n  sessions:\n    - name: vm\n      memfds:\n"
     "        - {token: 1}\n",
     "10: workloads.sessions[0].memfds[0].size: must be > 0"),
    (HEAD + STAGES + "workloads: {sessions: vm}\n", "6: workloads.sessions: expected a list"),
    (HEAD + STAGES + "name: again\n", "6: name: duplicate key (first on line 1)"),
    (HEAD + "stages:\n  - name: a\n   hosts: 1\n", "5:4: YAML syntax error:"),
    (HEAD + "stages: [\n", "4:1: YAML syntax error:"),
])
def test_errors_name_file_line_field(tmp_path, text: str, prefix: str) -> None:
    fails(tmp_path, text, prefix)


# --- the sample playbooks ----------------------------------------------------------------

def test_demo_playbook_on_sim_inventory() -> None:
    pb = load_playbook(os.path.join(REPO, "playbooks", "demo.yaml"))
    inv = load_inventory(os.path.join(REPO, "inventory", "sim.yaml"))
    assert pb.target.kernel == "twin:7.2.14-twin" and pb.on_failure == "continue"
    sizes = [m.size for s in pb.workloads.sessions for m in s.memfds]
    assert len(pb.workloads.sessions) == 1 and sizes == [16 << 20, 4 << 20]
    assert [s.max_parallel for s in pb.stages] == [1, 3, 4]
    assert pb.assign_hosts(inv) == [["twin-a1"], ["twin-a2", "twin-a3", "twin-a4"],
                                    ["twin-b1", "twin-b2", "twin-b3", "twin-b4"]]


def test_lab_upgrade_playbook() -> None:
    pb = load_playbook(os.path.join(REPO, "playbooks", "lab-upgrade.yaml"))
    want = os.path.normpath(os.path.join(REPO, "..", "shared", "lab", "bzImage-7.2.13-lab-b"))
    assert pb.target.kernel == want
    assert pb.target.sha256 == "72df4671148f653eafb22f2459dc0f565884b60bb40ed164ee9b56502051b7d3"
    memfds = [m for s in pb.workloads.sessions for m in s.memfds]
    assert len(memfds) == 2 and max(m.size for m in memfds) >= 64 << 20
    if os.path.exists(want):
        pb.target.check_files()
    lab = load_inventory(os.path.join(REPO, "inventory", "lab.yaml"))
    with pytest.raises(PlaybookError, match="lab-upgrade.yaml:7: hosts: 'all' matches no host"):
        pb.assign_hosts(lab)
