"""Workload kinds (issue 14): seals, huge, holes, position, files: N, sessions: N.

The spec parser expands and bounds-checks them (one-line exit-2 errors naming the field,
through the real agent and controller CLIs); memfds are made on this machine's real kernel
and their properties read back (memfdprops); the comparison says exactly what differs
and a difference fails the handover report; and a twin handover through the real agent
processes keeps every property -- including large folios, counted by order, and the
kernel's documented hole filling.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_bad_input_agent import agent_env, assert_one_line_input_error, run_agent
from test_rollout import inventory

from kho_agent.journal import (
    IncomingTree,
    Journal,
    JournalWorkload,
    VerifyResult,
    WorkloadResult,
)
from kho_agent.kernel.linux import LinuxKernel
from kho_agent.memfdprops import (
    KPF_COMPOUND_HEAD,
    KPF_COMPOUND_TAIL,
    compare,
    folios_by_order,
    holes_are_zero,
    read_holes,
    read_props,
)
from kho_agent.report import handover_report
from kho_agent.state import AgentState
from kho_agent.workload import (
    MemfdSpec,
    SpecError,
    create_memfd,
    expected_bytes,
    fill_pattern,
    parse_spec,
)
from kho_fleet.sim.handover import SimResult, drive_handover
from kho_fleet.sim.handover import run_agent as sim_agent
from kho_fleet.sim.kernelimage import make_kernel_image
from kho_fleet.sim.twinkernel import start_twin
from kho_fleet.sim.twinmem import PAGECACHE, PhysMem, page_flags, pmd_order, wants_huge

PS = 4096


def _spec(*sessions: dict) -> dict:
    return {"sessions": list(sessions)}


# --- the spec -----------------------------------------------------------------------------

def test_files_and_sessions_expand_to_concrete_memfds() -> None:
    spec = parse_spec(_spec(
        {"name": "one", "memfds": [{"token": "0x10", "size": "8KiB", "seals": ["write", "seal"],
                                    "huge": "never", "position": "end",
                                    "holes": [[0, 4096]]}]},
        {"name": "many", "sessions": 3, "files": 4, "token_base": 100,
         "file": {"size": 4096, "seed": 7, "holes": {"every": 2048, "length": 1024}}}))
    assert [s.name for s in spec.sessions] == ["one", "many-0", "many-1", "many-2"]
    m = spec.sessions[0].memfds[0]
    assert (m.token, m.size, m.seals, m.huge, m.position, m.holes) == \
        (16, 8192, 0x9, "never", 8192, [[0, 4096]])
    assert m.kind == {"seals": ["seal", "write"], "huge": "never", "holes": [[0, 4096]],
                      "position": 8192}
    for s in spec.sessions[1:]:
        assert [x.token for x in s.memfds] == [100, 101, 102, 103]
        assert [x.seed for x in s.memfds] == [7, 8, 9, 10]
        assert s.memfds[0].holes == [[0, 1024], [2048, 1024]]
    assert spec.sessions[1].memfds[0] is not spec.sessions[2].memfds[0]
    assert parse_spec(spec.to_json()) == spec          # what the holder gets back
    assert spec.total_bytes == 8192 + 3 * 4 * 4096


@pytest.mark.parametrize("bad,field", [
    (_spec({"name": "x", "files": 1001}), "sessions[0].files: must be an integer in 1..1000"),
    (_spec({"name": "x", "files": 0}), "sessions[0].files"),
    (_spec({"name": "x", "files": True}), "sessions[0].files"),
    (_spec({"name": "x", "sessions": 101, "files": 1}), "sessions[0].sessions"),
    (_spec({"name": "x" * 62, "sessions": 10, "files": 1}), "sessions[0].name"),
    (_spec({"name": "x", "file": {"size": 1}}), "sessions[0].files: required"),
    (_spec({"name": "x", "files": 2, "file": {"size": 1, "colour": 1}}),
     "sessions[0].file.colour: unknown key"),
    (_spec({"name": "x", "files": 2, "file": {"size": "lots"}}), "sessions[0].file.size"),
    (_spec({"name": "x", "files": 2, "token_base": -1}), "sessions[0].token_base"),
    (_spec({"name": "x", "files": 3, "token_base": 1, "memfds": [{"token": 2, "size": 1}]}),
     "sessions[0].token_base: generated token 2"),
    (_spec({"name": "x", "sessions": 2}, {"name": "x-1"}), "sessions[1].name"),
    (_spec({"name": "x", "memfds": [{"token": 1, "size": 9, "seals": ["glue"]}]}),
     "sessions[0].memfds[0].seals[0]: unknown seal"),
    (_spec({"name": "x", "memfds": [{"token": 1, "size": 9, "seals": 0x40}]}),
     "sessions[0].memfds[0].seals"),
    (_spec({"name": "x", "memfds": [{"token": 1, "size": 9, "seals": "write"}]}),
     "sessions[0].memfds[0].seals"),
    (_spec({"name": "x", "memfds": [{"token": 1, "size": 9, "huge": "yes"}]}),
     "sessions[0].memfds[0].huge: must be one of always, within_size, never"),
    (_spec({"name": "x", "memfds": [{"token": 1, "size": 9, "holes": [[4, 8]]}]}),
     "sessions[0].memfds[0].holes[0]"),
    (_spec({"name": "x", "memfds": [{"token": 1, "size": 99, "holes": [[0, 8], [4, 8]]}]}),
     "sessions[0].memfds[0].holes[1]"),
    (_spec({"name": "x", "memfds": [{"token": 1, "size": 99, "holes": [[0]]}]}),
     "sessions[0].memfds[0].holes[0]: expected [offset, length]"),
    (_spec({"name": "x", "memfds": [{"token": 1, "size": 99, "holes": {"every": 0}}]}),
     "sessions[0].memfds[0].holes"),
    (_spec({"name": "x", "memfds": [{"token": 1, "size": "1GiB",
                                     "holes": {"every": 4096, "length": 1}}]}),
     "more than 4096 holes"),
    (_spec({"name": "x", "memfds": [{"token": 1, "size": 9, "position": "middle"}]}),
     "sessions[0].memfds[0].position"),
    (_spec({"name": "x", "memfds": [{"token": 1, "adopt": True, "seals": ["seal"]}]}),
     "sessions[0].memfds[0].seals: an adopted memfd"),
    (_spec({"name": "x", "memfds": [{"token": 1, "size": "2TiB"}]}),
     "sessions[0].memfds[0].size"),
    (_spec({"name": "x", "sessions": 100, "files": 1000}), "at most 20000"),
])
def test_bad_kinds_name_the_field(bad: dict, field: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(bad)
    assert field in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("bad,field", [
    (_spec({"name": "x", "files": 5000}), "sessions[0].files"),
    (_spec({"name": "x", "memfds": [{"token": 1, "size": 9, "huge": "yes"}]}),
     "memfds[0].huge"),
    (_spec({"name": "x", "memfds": [{"token": 1, "size": 9, "seals": ["glue"]}]}),
     "memfds[0].seals[0]"),
])
def test_bad_kinds_through_the_agent_cli(tmp_path: Path, bad: dict, field: str) -> None:
    (tmp_path / "spec.json").write_text(json.dumps(bad))
    p = run_agent(["preserve", "--spec", f"{tmp_path}/spec.json", "--twin", f"{tmp_path}/no"],
                  agent_env(), tmp_path)
    assert_one_line_input_error(p, ["spec.json", field])


def test_bad_kinds_through_the_controller_cli(tmp_path: Path) -> None:
    pb = tmp_path / "pb.yaml"
    pb.write_text("name: t\nhosts: all\ntarget: {kernel: 'twin:7.2.14-twin'}\n"
                  "workloads:\n  sessions:\n    - {name: s, files: 2000}\n"
                  "stages: [{name: all}]\n")
    inv = inventory(tmp_path, {"h1": {}})
    p = subprocess.run([sys.executable, "-m", "kho_fleet.cli", "rollout", "--dry-run",
                        "--playbook", str(pb), "--inventory", str(inv),
                        "--rollouts-dir", str(tmp_path / "r"), "--reports-dir",
                        str(tmp_path / "rep"), "--sim-dir", str(tmp_path / "sim")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr
    assert "pb.yaml" in lines[0] and "files" in lines[0] and "1000" in lines[0], lines


# --- memfds on this machine's kernel --------------------------------------------------------

def test_memfd_kinds_on_the_real_kernel() -> None:
    m = MemfdSpec(7, 64 * PS + 100, 3, seals=0x1 | 0x2 | 0x4 | 0x8, huge="never",
                  holes=[[0, 2 * PS], [10 * PS, 5 * PS]], position=12345)
    data = expected_bytes(m, PS)
    assert data[:2 * PS] == bytes(2 * PS) and data[2 * PS:3 * PS] == fill_pattern(
        7, 3, m.size, PS)[2 * PS:3 * PS]
    fd = create_memfd("kinds", m, data)
    try:
        assert hashlib.sha256(os.pread(fd, m.size + 1, 0)).digest() == \
            hashlib.sha256(data).digest()
        holes, cut = read_holes(fd, m.size)
        assert holes == m.holes and not cut
        assert os.lseek(fd, 0, os.SEEK_CUR) == 12345           # read_holes restores f_pos
        assert holes_are_zero(fd, holes) and not holes_are_zero(fd, [[2 * PS, 1]])
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)                            # F_SEAL_WRITE is on
        k = LinuxKernel()
        p = read_props(k, fd, m.size)
        assert p["size"] == m.size and p["pos"] == 12345 and p["holes"] == m.holes
        assert p["seals"] == ["seal", "shrink", "grow", "write"]
        assert p["flags"] & os.O_ACCMODE == os.O_RDWR
    finally:
        os.close(fd)
    plain = create_memfd("plain", MemfdSpec(8, 3 * PS), fill_pattern(8, 8, 3 * PS))
    try:
        seals = fcntl.fcntl(plain, 1034)                      # F_GET_SEALS
        assert seals == 0x1                                   # no MFD_ALLOW_SEALING
        assert read_props(LinuxKernel(), plain, 3 * PS)["holes"] == []
    finally:
        os.close(plain)


def test_folios_by_order_from_pagemap_and_kpageflags() -> None:
    h, t = KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL
    pfns = [100, 101, 102, 103, 7, 0, 512, 513, 600]
    flags = [h, t, t, t, 0, 0, h, t, h]
    assert folios_by_order(pfns, flags) == {"0": 2, "1": 1, "2": 1, "absent": 1}
    # a tail that does not follow its head's PFN starts no folio of its own
    assert folios_by_order([10, 99], [h, t]) == {"0": 2}


def test_compare_names_what_differs() -> None:
    before = {"size": 8192, "pos": 5, "seals": ["seal", "write"], "flags": 0x8002,
              "holes": [[0, 4096]], "folios_by_order": {"0": 2}}
    same = dict(before, holes=[], holes_zero=True)          # memfd-v2 fills holes
    assert compare(before, same) == []
    assert compare(before, dict(same, seals=["seal"])) == [
        "seals: ['seal', 'write'] before, ['seal'] after"]
    assert compare(before, dict(same, pos=0, size=4096))[0].startswith("size: 8192 before")
    assert "folios_by_order" in compare(before, dict(same, folios_by_order={"1": 1}))[0]
    assert compare(before, dict(same, holes=[[4096, 4096]])) == [
        "holes: [4096, 4096] is a hole after, data before"]
    assert compare(before, dict(same, holes_zero=False)) == [
        "holes: a hole of before does not read as zeros after"]
    assert compare(None, same) == [] and compare(before, None) == []


def test_a_property_mismatch_fails_the_report() -> None:
    w = JournalWorkload("s", 1, 4096, "ab" * 32, [[10, 1]],
                        props={"size": 4096, "pos": 0, "seals": ["seal", "write"],
                               "flags": 0x8002, "holes": []})
    r = WorkloadResult("s", 1, sha256="ab" * 32, size=4096, pfn_runs=[[10, 1]],
                       props={"size": 4096, "pos": 0, "seals": ["seal"], "flags": 0x8002,
                              "holes": []})
    v = VerifyResult(incoming=IncomingTree(present=True), journal=Journal("h1", workloads=[w]),
                     results=[r])
    rep = handover_report(v, AgentState())
    assert rep.result == "failed" and rep.failure is not None
    assert rep.failure.reason == ("workload s/0x1: properties differ: seals: "
                                  "['seal', 'write'] before, ['seal'] after")
    (rw,) = rep.workloads
    assert not rw.verified and rw.props_mismatch and rw.props_before == w.props
    back = type(rep).from_json(json.loads(json.dumps(rep.to_json())))
    assert back.workloads[0].props_after == r.props
    # an old report without the fields still loads
    old = rep.to_json()
    for k in ("props_before", "props_after", "props_mismatch"):
        del old["workloads"][0][k]
    assert type(rep).from_json(old).workloads[0].props_mismatch == []


def test_a_lost_empty_session_fails_the_report() -> None:
    v = VerifyResult(incoming=IncomingTree(present=True),
                     journal=Journal("h1", empty_sessions=["e1", "e2"]),
                     sessions_lost={"e2": "session lost: No such file or directory"})
    rep = handover_report(v, AgentState())
    assert rep.result == "failed" and rep.failure is not None
    assert rep.failure.reason == "empty session 'e2': session lost: No such file or directory"
    assert rep.empty_sessions == ["e1", "e2"]


# --- the twin's page cache -----------------------------------------------------------------

@pytest.mark.parametrize("setting,hint,huge", [
    ("advise", "always", True), ("advise", "within_size", True), ("advise", None, False),
    ("advise", "never", False), ("always", None, True), ("always", "never", False),
    ("within_size", None, True), ("never", "always", False), ("deny", "always", False),
    ("force", "never", True),
])
def test_twin_thp_policy(setting: str, hint: str, huge: bool) -> None:
    assert wants_huge(setting, hint) is huge


def test_twin_large_folios_show_in_kpageflags(tmp_path: Path) -> None:
    mem = PhysMem(str(tmp_path / "mem.img"), 16 << 20, PS, seed=1)
    try:
        order = pmd_order(PS)
        assert order == 9
        head = mem.alloc_folio(order)
        assert head is not None and head % 512 == 0 and mem.compound == {head: 9}
        flags = page_flags(mem, [head, head + 1, head + 511])
        assert flags[0] & KPF_COMPOUND_HEAD and flags[1] & KPF_COMPOUND_TAIL
        assert folios_by_order(list(range(head, head + 512)),
                               page_flags(mem, list(range(head, head + 512)))) == {"9": 1}
        assert mem.owner[head + 7] == PAGECACHE
        mem.free(range(head, head + 512))
        assert mem.compound == {}
    finally:
        mem.close()


def test_twin_page_cache_falls_back_to_order_0_without_an_aligned_run(tmp_path: Path) -> None:
    from kho_fleet.sim.twinmem import KERNEL, PageCache
    mem = PhysMem(str(tmp_path / "mem.img"), 8 << 20, PS, seed=2)
    try:
        for slot in range(0, mem.npages, 512):      # one kernel page in every 2 MiB slot
            mem.owner[slot + 100] = KERNEL
        cache = PageCache(mem)
        fd = os.memfd_create("huge")
        try:
            os.ftruncate(fd, 2 << 20)
            cache.set_hint(fd, "always")
            _, ent = cache.get(fd, 512)
            assert ent.orders == {} and len(ent.pfns) == 512 and mem.compound == {}
            mem.owner[:] = bytes(mem.npages)        # RAM defragmented: the next file gets one
            fd2 = os.memfd_create("huge2")
            os.ftruncate(fd2, (2 << 20) + PS)
            cache.set_hint(fd2, "within_size")
            _, ent2 = cache.get(fd2, 513)
            assert ent2.orders == {0: 9} and ent2.folios(513)[1] == (512, ent2.pfns[512], 0)
            os.close(fd2)
        finally:
            os.close(fd)
            cache.clear()
    finally:
        mem.close()


# --- a twin handover through the real agent processes ----------------------------------------

KINDS = _spec(
    {"name": "sealed", "memfds": [
        {"token": 1, "size": "256KiB", "seals": ["seal", "shrink", "grow", "write"],
         "position": 777},
        {"token": 2, "size": "64KiB", "seals": ["future_write", "exec"], "position": "end"}]},
    {"name": "thp", "memfds": [{"token": 3, "size": "5MiB", "huge": "always"},
                               {"token": 4, "size": "4MiB", "huge": "never"}]},
    {"name": "sparse", "memfds": [{"token": 5, "size": "1MiB",
                                   "holes": {"every": "256KiB", "length": "64KiB"}}]},
    {"name": "gen", "sessions": 3, "files": 7, "file": {"size": 8192, "position": 4096}},
    {"name": "empty", "sessions": 2},
)


def _twin_handover(tmp: Path, spec: dict, thp: str = "") -> dict:
    root = tmp / "host"
    img = make_kernel_image(str(tmp / "bzImage-7.2.14-twin"), "7.2.14-twin", kho="kho-v4")
    sp = tmp / "spec.json"
    sp.write_text(json.dumps(spec))
    res = SimResult(report={}, root=str(root))
    with start_twin(str(root), ram_mib=128, release="7.2.13-twin", kho="kho-v4",
                    boot_delay=0.1) as twin:
        if thp:    # root writes the host's THP setting, as on a real host
            (root / "sys/kernel/mm/transparent_hugepage/shmem_enabled").write_text(thp)
        rep = drive_handover(twin, img, str(sp), res, boot_timeout=30)
    assert [s["rc"] for s in res.steps] == [0] * len(res.steps), res.steps
    return rep


def test_twin_handover_keeps_every_property(tmp_path: Path) -> None:
    rep = _twin_handover(tmp_path, KINDS)
    assert rep["result"] == "success", rep["failure"]
    ws = {(w["session"], w["token"]): w for w in rep["workloads"]}
    assert len(ws) == 5 + 21
    for w in ws.values():
        assert w["verified"] and w["props_mismatch"] == []
        for k in ("size", "pos", "seals", "flags"):
            assert w["props_before"][k] == w["props_after"][k]
    s1, s2 = ws[("sealed", 1)], ws[("sealed", 2)]
    assert s1["props_after"]["seals"] == ["seal", "shrink", "grow", "write"]
    assert s1["props_after"]["pos"] == 777
    # mm/memfd.c: "SEAL_EXEC implies SEAL_WRITE" on an executable memfd (mode 0777)
    assert s2["props_after"]["seals"] == ["shrink", "grow", "write", "future_write", "exec"]
    assert s2["props_after"]["pos"] == 64 << 10
    big, small = ws[("thp", 3)], ws[("thp", 4)]
    assert big["props_before"]["folios_by_order"] == {"0": 256, "9": 2} \
        == big["props_after"]["folios_by_order"]
    assert small["props_after"]["folios_by_order"] == {"0": 1024}
    snap = rep["radix"]["snapshot"]       # the radix tree holds the large folios as order 9
    assert snap["pages_by_order"]["9"] == 2 and snap["workload_pfns_missing"] == {}
    sp = ws[("sparse", 5)]
    assert sp["props_before"]["holes"] == [[i << 18, 64 << 10] for i in range(4)]
    assert sp["props_after"]["holes"] == [] and sp["props_after"]["holes_zero"] is True
    assert {s for s, _ in ws} >= {"gen-0", "gen-1", "gen-2"}
    assert rep["empty_sessions"] == ["empty-0", "empty-1"] and rep["sessions_lost"] == {}
    assert all(ws[(f"gen-{i}", t)]["props_after"]["pos"] == 4096
               for i in range(3) for t in range(7))


def test_twin_thp_never_gives_order_0_folios(tmp_path: Path) -> None:
    """The host's shmem_enabled decides (there is no memfd_create flag for THP shmem):
    with `never`, huge: always gets order-0 folios, before and after alike."""
    rep = _twin_handover(tmp_path, _spec(
        {"name": "thp", "memfds": [{"token": 3, "size": "4MiB", "huge": "always"}]}),
        thp="never\n")
    (w,) = rep["workloads"]
    assert w["verified"] and w["props_before"]["shmem_enabled"] == "never"
    assert w["props_before"]["folios_by_order"] == {"0": 1024} \
        == w["props_after"]["folios_by_order"]


def _grab_fd(pid: int, memfd_name: str) -> int:
    """A duplicate of process `pid`'s fd of memfd `memfd_name` (pidfd_getfd: the same open
    file, so its f_pos and seals are the holder's)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"/memfd:{memfd_name} "):
            pidfd = os.pidfd_open(pid)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                got = libc.syscall(438, pidfd, int(fd), 0)      # pidfd_getfd (x86_64)
                if got < 0:
                    pytest.skip(f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
                return int(got)
            finally:
                os.close(pidfd)
    raise AssertionError(f"no memfd {memfd_name!r} in process {pid}")


def test_twin_seal_added_after_preserve_is_lost_and_reported(tmp_path: Path) -> None:
    """memfd-v2 takes the seals at PRESERVE_FD and f_pos again at freeze (kexec). A seal
    and a seek after PRESERVE_FD (through the holder's own open file): the position comes
    through, the seal does not -- and the report fails naming exactly that."""
    if os.uname().machine != "x86_64":
        pytest.skip("pidfd_getfd syscall number is the x86_64 one")
    root = tmp_path / "host"
    img = make_kernel_image(str(tmp_path / "bzImage-7.2.14-twin"), "7.2.14-twin")
    sp = tmp_path / "spec.json"
    sp.write_text(json.dumps(_spec({"name": "late", "memfds": [
        {"token": 1, "size": "64KiB", "seals": []}, {"token": 2, "size": "64KiB"}]})))
    with start_twin(str(root), ram_mib=128, release="7.2.13-twin", boot_delay=0.1) as twin:
        steps: list[tuple[str, tuple[str, ...]]] = [
            ("preflight", ("--kernel", img, "--spec", str(sp))), ("stage", ("--kernel", img)),
            ("preserve", ("--spec", str(sp)))]
        for step, args in steps:
            r = sim_agent(str(root), step, *args)
            assert r["rc"] == 0, r
        pid = int((root / "var/lib/kho-agent/holder.pid").read_text())
        fd = _grab_fd(pid, "kho-late-1")
        try:
            fcntl.fcntl(fd, 1033, 0x4)                           # F_ADD_SEALS F_SEAL_GROW
            os.lseek(fd, 4242, os.SEEK_SET)
        finally:
            os.close(fd)
        for step, args in [("snapshot", ()), ("kexec", ("--yes",))]:
            r = sim_agent(str(root), step, *args)
            assert r["rc"] == 0, r
        twin.wait_ready(30, boot_count=2)
        r = sim_agent(str(root), "verify")
    rep = r["json"]
    assert r["rc"] == 1 and rep["result"] == "failed", r
    ws = {w["token"]: w for w in rep["workloads"]}
    late = ws[1]
    assert late["props_before"]["seals"] == ["grow"] and late["props_after"]["seals"] == []
    assert late["props_before"]["pos"] == late["props_after"]["pos"] == 4242
    assert late["props_mismatch"] == ["seals: ['grow'] before, [] after"]
    assert late["sha256_after"] == late["sha256_before"] and not late["verified"]
    assert ws[2]["verified"] and ws[2]["props_mismatch"] == []
    assert rep["failure"] == {"phase": "verify", "reason": "workload late/0x1: properties "
                              "differ: seals: ['grow'] before, [] after"}
