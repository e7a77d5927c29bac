"""Real-kernel test of the Linux kernel backend (agent/kho_agent/kernel/linux.py) on a lab
guest: Debian rootfs + Linux 7.2.13 with KHO/LUO in QEMU (TCG), driven over SSH.

One guest is booted once for the module; the tests run in file order and build on each
other: outgoing kernel (ioctls, pagemap, /dev/mem, debugfs) -> a detached holder preserves an
8 MiB memfd -> kexec (syscall load, `kexec -e`) into 7.2.13-lab-b -> retrieve it there (same
sha256, same PFNs) -> a second kexec lab-b -> lab-b through the fallbacks (kexec_file_load
syscall + reboot(LINUX_REBOOT_CMD_KEXEC)). LinuxKernel runs ON THE GUEST, from a zipapp of
agent/, through small python3 snippets.

The rootfs is cached in REPO/.lab/cache (or $KHO_LAB_CACHE): ~1 min to build the first time.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from labsupport import boot_lab_guest

from kho_fleet.lab.guest import GuestError, LabGuest

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared/lab"
KERNEL_A = SHARED / "bzImage-7.2.13-kho"
KERNEL_B = SHARED / "bzImage-7.2.13-lab-b"
RELEASE_A, RELEASE_B = "7.2.13", "7.2.13-lab-b"
CACHE = Path(os.environ.get("KHO_LAB_CACHE", REPO / ".lab/cache"))
AGENT_PYZ = "/root/kho-agent.pyz"
SESSION, TOKEN = "kho-lab-test", 0x4B484F4C
SIZE = 8 << 20
PAGES = SIZE // 4096

PRELUDE = f"""
import base64, errno, hashlib, json, os, struct, sys, time
sys.path.insert(0, {AGENT_PYZ!r})
from kho_agent.kernel.linux import LinuxKernel
from kho_agent.kernel.base import KernelError, LiveUpdateError
k = LinuxKernel()
def pattern(token, pages):
    return b"".join(struct.pack("<QQQQ", 0x4B484F2D4C4142, token, i, ~i & (2**64 - 1)) * 128
                    for i in range(pages))
def phys_sha(pfns):
    h = hashlib.sha256()
    with k.open_physmem() as mem:
        src = mem.source
        for p in pfns:
            h.update(mem.read(p * 4096, 4096))
    return src, h.hexdigest()
def out(obj):
    print(json.dumps(obj))
"""

# The holder: owns /dev/liveupdate and the session until kexec -e, like the agent's holder.
HOLDER = """
lu = k.open_liveupdate()
s = lu.create_session(NAME)
fd = os.memfd_create("kho-lab", 0)
os.ftruncate(fd, SIZE)
data = pattern(TOKEN, SIZE // 4096)
os.pwrite(fd, data, 0)
s.preserve_fd(fd, TOKEN)
pfns = k.memfd_pfns(fd, SIZE)
res = {"pid": os.getpid(), "sha256": hashlib.sha256(data).hexdigest(), "pfns": pfns,
       "flags": k.page_flags(pfns[:8]), "session": s.get_name()}
with open(STATE + ".tmp", "w") as f:
    json.dump(res, f)
os.rename(STATE + ".tmp", STATE)
while True:
    time.sleep(3600)
"""


def py(guest: LabGuest, body: str, timeout: float = 120.0) -> dict[str, Any]:
    """Run PRELUDE + body with python3 on the guest; the last stdout line is JSON."""
    rc, out, err = guest.run(["python3", "-"], stdin=(PRELUDE + body).encode(), timeout=timeout)
    assert rc == 0, f"guest python failed (rc {rc}):\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


def start_holder(guest: LabGuest, name: str, token: int, state: str) -> dict[str, Any]:
    script = f"NAME, TOKEN, SIZE, STATE = {name!r}, {token}, {SIZE}, {state!r}\n" + HOLDER
    guest.run(["sh", "-c", "cat > /root/holder.py"], stdin=(PRELUDE + script).encode(),
              check=True)
    guest.run(f"rm -f {state}; setsid -f python3 /root/holder.py >/root/holder.log 2>&1 "
              "</dev/null", check=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        rc, out, _ = guest.run(f"cat {state} 2>/dev/null")
        if rc == 0 and out.strip():
            return json.loads(out)
        _, log, _ = guest.run("cat /root/holder.log")
        if "Traceback" in log:
            pytest.fail(f"holder failed on the guest:\n{log[-3000:]}")
        time.sleep(1)
    pytest.fail("holder did not report within 90 s")


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabGuest]:
    g = boot_lab_guest(tmp_path_factory.mktemp("lab-guest"), CACHE, KERNEL_A, [KERNEL_B],
                       REPO, AGENT_PYZ)
    try:
        yield g
    finally:
        g.stop()


@pytest.fixture(scope="module")
def state() -> dict[str, Any]:
    """What earlier tests learnt, for the later ones."""
    return {}


def need(state: dict[str, Any], key: str) -> Any:
    if key not in state:
        pytest.skip(f"needs an earlier step ({key}) that did not pass")
    return state[key]


def test_outgoing_kernel_basics(guest: LabGuest, state: dict[str, Any]) -> None:
    r = py(guest, """
res = {"release": k.release(), "cmdline": k.cmdline(), "page_size": k.page_size(),
       "boot_time": k.boot_time(), "now": time.time(), "mem": k.mem_available(),
       "debugfs": k.debugfs_mounted(), "lu": k.liveupdate_present(),
       "kx": k.kexec_file_load_status(), "loaded": k.kexec_loaded(),
       "state_dir": k.state_dir()}
with k.open_liveupdate() as lu:
    try:
        k.open_liveupdate()
    except LiveUpdateError as e:
        res["second_open"] = [e.errno, str(e)]
    with lu.create_session("probe") as s:
        res["name"] = s.get_name()
        try:
            lu.create_session("probe")
        except LiveUpdateError as e:
            res["dup"] = [e.errno, str(e)]
        try:
            s.finish()                      # FINISH is for incoming sessions only
        except LiveUpdateError as e:
            res["finish_outgoing"] = e.errno
    try:
        lu.retrieve_session("no-such-session")
    except LiveUpdateError as e:
        res["retrieve_missing"] = e.errno
    try:
        lu.create_session("x" * 64)
    except LiveUpdateError as e:
        res["long_name"] = [e.errno, str(e)]
out(res)
""")
    assert r["release"] == RELEASE_A
    assert "liveupdate=on" in r["cmdline"].split() and r["page_size"] == 4096
    assert 0 < r["now"] - r["boot_time"] < 600, r
    assert r["mem"] > 100 << 20 and r["debugfs"] and r["lu"]
    assert r["kx"] == "ok" and r["loaded"] is False
    assert r["state_dir"] == "/var/lib/kho-agent"
    assert r["second_open"][0] == 16 and "exclusive" in r["second_open"][1]   # EBUSY
    assert r["name"] == "probe"
    assert r["dup"][0] == 17 and "CREATE_SESSION" in r["dup"][1]              # EEXIST
    assert r["finish_outgoing"] == 22                                          # EINVAL
    assert r["retrieve_missing"] == 2                                          # ENOENT
    assert r["long_name"][0] == 22 and "at most 63" in r["long_name"][1]
    state["basics"] = True


def test_holder_preserves_memfd(guest: LabGuest, state: dict[str, Any]) -> None:
    h = start_holder(guest, SESSION, TOKEN, "/root/holder.json")
    assert h["session"] == SESSION
    assert len(h["pfns"]) == PAGES and all(h["pfns"]), "memfd_pfns: a page without PFN"
    assert len(set(h["pfns"])) == PAGES
    assert h["flags"] is not None and len(h["flags"]) == 8
    state["holder"] = h

    r = py(guest, f"""
res = {{}}
try:
    k.open_liveupdate()
except LiveUpdateError as e:
    res["busy"] = e.errno
res["phys_source"], res["phys_sha"] = phys_sha({h["pfns"]!r})
fdt = k.read_debugfs("kho/out/fdt")
res["out_fdt"] = base64.b64encode(fdt).decode() if fdt is not None else None
res["ls_out"] = k.list_debugfs("kho/out")
res["ls_subfdts"] = k.list_debugfs("kho/out/sub_fdts")
res["missing"] = k.read_debugfs("kho/no-such-file")
try:
    k.read_debugfs("../../etc/passwd")
except KernelError as e:
    res["escape"] = str(e)
out(res)
""")
    assert r["busy"] == 16, "the holder owns /dev/liveupdate: EBUSY expected"
    # physical memory at the pagemap PFNs holds exactly the memfd's bytes
    assert r["phys_source"] == "/dev/mem"
    assert r["phys_sha"] == h["sha256"]
    fdt = base64.b64decode(r["out_fdt"])
    totalsize = int.from_bytes(fdt[4:8], "big")
    assert fdt[:4] == bytes.fromhex("d00dfeed")
    assert len(fdt) < totalsize, "kho/out/fdt is expected truncated (README finding 3)"
    print(f"\nkho/out/fdt: file {len(fdt)} bytes, header totalsize {totalsize}; "
          f"sub_fdts {r['ls_subfdts']}")
    assert "fdt" in r["ls_out"] and r["missing"] is None and "bad debugfs path" in r["escape"]


def test_qmp_dump_matches_pagemap(guest: LabGuest, state: dict[str, Any],
                                  tmp_path: Path) -> None:
    """QMP dump-guest-memory while the holder runs: the memfd's bytes are at its PFNs, and
    the guest runs on afterwards (resume)."""
    import hashlib

    from kho_agent.physmem import ElfCore

    h = need(state, "holder")
    dump = guest.dump_memory(tmp_path / "guest.elf")
    try:
        with ElfCore(str(dump.path)) as core:
            digest = hashlib.sha256(b"".join(core.read(p * 4096, 4096) for p in h["pfns"]))
        assert digest.hexdigest() == h["sha256"]
    finally:
        dump.path.unlink()
    assert guest.run("true", timeout=30)[0] == 0, "guest did not resume after the dump"
    print(f"\nQMP dump: {dump.size >> 20} MiB in {dump.seconds:.1f}s")


def test_kexec_load_paths(guest: LabGuest, state: dict[str, Any]) -> None:
    need(state, "holder")
    r = py(guest, f"""
res = {{}}
b = "/boot/bzImage-{RELEASE_B}"
kt = LinuxKernel(kexec_tool=None)                 # the syscall fallbacks
res["tool"] = k.kexec_tool
k.kexec_load(b, None, None)                       # kexec -s -l --reuse-cmdline
res["tool_loaded"] = k.kexec_loaded()
k.kexec_unload()
res["tool_unloaded"] = not k.kexec_loaded()
kt.kexec_load(b, None, k.cmdline())               # kexec_file_load(2) via ctypes
res["sys_loaded"] = k.kexec_loaded()
try:
    kt.kexec_load("/nonexistent", None, "")
except KernelError as e:
    res["missing"] = str(e)
try:
    kt.kexec_load("/etc/hostname", None, "")
except KernelError as e:
    res["garbage"] = str(e)
res["still_loaded"] = k.kexec_loaded()           # a failed load keeps the loaded image
out(res)
""")
    assert r["tool"] == "/usr/sbin/kexec"
    assert r["tool_loaded"] and r["tool_unloaded"] and r["sys_loaded"]
    assert "not found: /nonexistent" in r["missing"]
    assert r["garbage"].startswith("kexec_file_load /etc/hostname:"), r["garbage"]
    assert r["still_loaded"]
    print(f"\nkexec_file_load of a non-kernel: {r['garbage']}")
    state["loaded"] = True


def test_kexec_into_b(guest: LabGuest, state: dict[str, Any]) -> None:
    need(state, "loaded")
    old = guest.boot_id()
    r = py(guest, "k.kexec_exec(delay=2.0); out({'returned': time.time()})")
    t0 = time.monotonic()
    assert r["returned"]
    try:
        back = guest.wait_reboot(old, timeout=180)
    except GuestError as e:
        pytest.fail(f"kexec into {RELEASE_B}: {e}")
    print(f"\nkexec {RELEASE_A} -> {RELEASE_B} (kexec -e): SSH back after {back:.1f}s "
          f"({time.monotonic() - t0:.1f}s after kexec_exec returned)")
    exec_from = guest.lines("KHO: exec from:")
    assert exec_from and f"exec from: {RELEASE_A} " in exec_from[-1], exec_from
    state["kexec1"] = back


def test_incoming_kernel_retrieves_memfd(guest: LabGuest, state: dict[str, Any]) -> None:
    need(state, "kexec1")
    h = state["holder"]
    r = py(guest, f"""
res = {{"release": k.release(), "boot_time": k.boot_time(), "now": time.time()}}
fdt = k.read_debugfs("kho/in/fdt")
res["in_fdt"] = base64.b64encode(fdt).decode() if fdt is not None else None
res["out_fdt"] = k.read_debugfs("kho/out/fdt")
res["ls_out"] = k.list_debugfs("kho/out")
res["flags_before"] = k.page_flags({h["pfns"][:8]!r})
with k.open_liveupdate() as lu:
    try:
        lu.retrieve_session("no-such-session")
    except LiveUpdateError as e:
        res["missing"] = e.errno
    s = lu.retrieve_session({SESSION!r})
    res["name"] = s.get_name()
    try:
        s.preserve_fd(0, 1)                    # PRESERVE_FD is for outgoing sessions
    except LiveUpdateError as e:
        res["preserve_incoming"] = e.errno
    try:
        s.retrieve_fd({TOKEN + 1})
    except LiveUpdateError as e:
        res["bad_token"] = e.errno
    fd = s.retrieve_fd({TOKEN})
    res["size"] = os.fstat(fd).st_size
    res["sha256"] = hashlib.sha256(os.pread(fd, res["size"], 0)).hexdigest()
    res["pfns"] = k.memfd_pfns(fd, {SIZE})
    res["phys_source"], res["phys_sha"] = phys_sha(res["pfns"])
    s.finish()
    s.close()
    os.close(fd)
    try:
        lu.retrieve_session({SESSION!r})
    except LiveUpdateError as e:
        res["after_finish"] = e.errno
out(res)
""")
    assert r["release"] == RELEASE_B
    assert 0 < r["now"] - r["boot_time"] < 300
    assert r["missing"] == 2 and r["bad_token"] == 2 and r["preserve_incoming"] == 22
    assert r["name"] == SESSION and r["size"] == SIZE
    assert r["sha256"] == h["sha256"], "memfd content changed across kexec"
    same = sum(a == b for a, b in zip(r["pfns"], h["pfns"]))
    assert r["pfns"] == h["pfns"], f"only {same}/{PAGES} PFNs unchanged across kexec"
    assert r["phys_source"] == "/dev/mem" and r["phys_sha"] == h["sha256"]
    assert r["after_finish"] == 2
    fdt = base64.b64decode(r["in_fdt"])
    assert fdt[:4] == bytes.fromhex("d00dfeed")
    assert len(fdt) == int.from_bytes(fdt[4:8], "big"), "kho/in/fdt should be complete"
    from kho_agent.abi.kho import decode_kho_fdt

    root = decode_kho_fdt(fdt)
    assert root.compatible == "kho-v4" and not root.truncated
    assert {"LUO", "kexec-metadata"} <= {s.name for s in root.subtrees}
    # a kernel booted through KHO never creates debugfs kho/out/fdt (kho_init())
    assert r["out_fdt"] is None and "fdt" not in r["ls_out"], r["ls_out"]
    print(f"\nincoming: kho/in/fdt {len(fdt)} bytes {root.compatible}, subtrees "
          f"{[s.name for s in root.subtrees]}; kho/out {r['ls_out']}; kpageflags of "
          f"preserved pages before retrieval {[hex(f) for f in r['flags_before']]}")
    state["retrieved"] = True


def test_second_kexec_through_syscall_fallbacks(guest: LabGuest, state: dict[str, Any]) -> None:
    """lab-b -> lab-b: kexec_file_load(2) + reboot(LINUX_REBOOT_CMD_KEXEC) without kexec-tools."""
    need(state, "retrieved")
    h = start_holder(guest, SESSION + "-2", TOKEN + 2, "/root/holder2.json")
    assert len(h["pfns"]) == PAGES and all(h["pfns"])
    old = guest.boot_id()
    r = py(guest, f"""
kt = LinuxKernel(kexec_tool=None)
kt.kexec_load("/boot/bzImage-{RELEASE_B}", None, None)   # --reuse-cmdline equivalent
loaded = kt.kexec_loaded()
if loaded:
    kt.kexec_exec(delay=3.0)    # time for this answer to get out under a loaded TCG host
out({{"loaded": loaded}})
""")
    assert r["loaded"]
    try:
        back = guest.wait_reboot(old, timeout=180)
    except GuestError as e:
        pytest.fail(f"second kexec: {e}")
    print(f"\nkexec {RELEASE_B} -> {RELEASE_B} (reboot syscall): SSH back after {back:.1f}s")
    r = py(guest, f"""
with k.open_liveupdate() as lu:
    s = lu.retrieve_session({SESSION + "-2"!r})
    fd = s.retrieve_fd({TOKEN + 2})
    res = {{"release": k.release(), "sha256": hashlib.sha256(os.pread(fd, {SIZE}, 0)).hexdigest(),
            "pfns": k.memfd_pfns(fd, {SIZE})}}
    s.finish()
out(res)
""")
    assert r["release"] == RELEASE_B and r["sha256"] == h["sha256"] and r["pfns"] == h["pfns"]
    exec_from = guest.lines("KHO: exec from:")
    assert f"exec from: {RELEASE_B} " in exec_from[-1], exec_from
