"""Every lab README finding, reproduced on a digital-twin host through TwinKernel.

Real processes and sockets: the twin is a server process, workloads are subprocesses
that kexec kills, the test process is the "controller" outside the host.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest
from twinsupport import RELEASE, Holder, image, kexec, pattern, sha

from kho_agent.abi import luo as luo_abi
from kho_agent.abi import metadata as md_abi
from kho_agent.abi.fdt import parse_fdt, parse_header
from kho_agent.abi.kho import decode_kho_fdt
from kho_agent.abi.radix import geometry, walk_radix
from kho_agent.inspect import covered
from kho_agent.kernel import KernelError, LiveUpdateError, get_kernel

MIB = 1 << 20
PS = 4096


def test_get_kernel_picks_twin(twin, monkeypatch):
    monkeypatch.setenv("KHO_AGENT_TWIN", twin.root)
    k = get_kernel()
    assert k.kind == "twin" and k.release() == RELEASE
    assert k.page_size() == PS and "liveupdate=on" in k.cmdline()
    assert abs(k.boot_time() - time.time()) < 60 and k.mem_available() > 64 * MIB
    assert k.debugfs_mounted() and k.liveupdate_present() and k.kexec_file_load_supported()
    assert os.path.isdir(k.state_dir()) and not k.kexec_loaded()
    assert k.open_physmem().source == "twin /dev/mem"


def test_finding1_exclusive_open_and_sessions_outlive_device(twin):
    k = twin.kernel()
    lu = k.open_liveupdate()
    with pytest.raises(LiveUpdateError) as e:
        k.open_liveupdate()
    assert e.value.errno == errno.EBUSY
    s = lu.create_session("outlives-device")
    lu.close()
    lu2 = k.open_liveupdate()                     # released: can be opened again
    assert s.get_name() == "outlives-device"      # the session fd is still valid
    with pytest.raises(LiveUpdateError) as e:
        lu2.create_session("outlives-device")
    assert e.value.errno == errno.EEXIST
    lu2.close()


def test_finding3_cold_boot_out_fdt_truncated(twin):
    k = twin.kernel()
    blob = k.read_debugfs("kho/out/fdt")
    assert blob is not None and len(blob) == 233      # the lab's size on x86_64
    assert parse_header(blob).totalsize > len(blob)  # LUO was added after kho_init
    root = decode_kho_fdt(blob, tolerant=True)
    assert root.compatible == "kho-v4" and root.truncated
    assert k.read_debugfs("kho/in/fdt") is None and k.list_debugfs("kho/in") == []
    assert k.list_debugfs("kho/out/sub_fdts") == ["LUO", "kexec-metadata"]
    luo = luo_abi.decode_luo_ser(k.read_debugfs("kho/out/sub_fdts/LUO"))
    assert luo.compatible == "luo-v5" and luo.sessions_pa == 0      # not serialised yet
    md = md_abi.decode_metadata(k.read_debugfs("kho/out/sub_fdts/kexec-metadata"))
    assert (md.previous_release, md.kexec_count) == (RELEASE, 1)
    scratch = k.read_debugfs("kho/out/scratch_phys").decode().split()
    assert len(scratch) == 2 and all(s.startswith("0x") for s in scratch)


def _tree_of(k, fdt_blob: bytes):
    mem = k.open_physmem()
    root = decode_kho_fdt(fdt_blob, tolerant=True)
    return mem, root, walk_radix(mem.read, root.memory_map_root, geometry(PS, root.compatible),
                                 in_ram=mem.contains)


def test_kexec_handover_end_to_end(twin):
    """Findings 2, 3, 4, 5, 8 and the holder's death, in one upgrade."""
    k = twin.kernel()
    spec = {"vm": [[0x1000, 8 * MIB, 1], [0x2000, 3 * PS + 100, 2]], "empty": [[7, 0, 3]]}
    holder = Holder(twin.root, spec)
    pfns = holder.file(0x1000)["pfns"]
    assert len(pfns) == 2048 and len(set(pfns)) == 2048
    # before kexec: every memfd PFN is in the live tree (found via the complete FDT in RAM)
    mem, root, walk = _tree_of(k, k.read_debugfs("kho/out/fdt"))
    assert walk.intact
    ranges = walk.ranges()
    for tok in (0x1000, 0x2000):
        assert all(covered(ranges, p * PS, PS) for p in holder.file(tok)["pfns"])
    old_root = root.memory_map_root
    assert k.page_flags(pfns[:4]) == [0x38] * 4      # UPTODATE|DIRTY|LRU: page cache
    # kexec into the next release: the holder (an old-kernel process) is killed
    kexec(twin, image(twin.root, "7.2.13-lab-b"))
    assert holder.wait() == -9
    assert k.release() == "7.2.13-lab-b"
    log = k.dmesg()
    assert "KHO: found kexec handover data." in log
    assert f"KHO: exec from: {RELEASE} (count 1)" in log
    assert "luo: Retrieved live update data, liveupdate number: 1" in log
    # debugfs on a KHO boot: no out/fdt, complete in/fdt, LUO's in-blob is garbage
    assert k.read_debugfs("kho/out/fdt") is None
    in_fdt = k.read_debugfs("kho/in/fdt")
    assert parse_header(in_fdt).totalsize == len(in_fdt)
    parse_fdt(in_fdt)                                              # strict parse: complete
    in_root = decode_kho_fdt(in_fdt)
    assert in_root.memory_map_root == old_root
    assert not k.read_debugfs("kho/in/sub_fdts/LUO").startswith(b"luo-v5")
    md = md_abi.decode_metadata(k.read_debugfs("kho/in/sub_fdts/kexec-metadata"))
    assert (md.previous_release, md.kexec_count) == (RELEASE, 1)
    md = md_abi.decode_metadata(k.read_debugfs("kho/out/sub_fdts/kexec-metadata"))
    assert (md.previous_release, md.kexec_count) == ("7.2.13-lab-b", 2)
    # finding 4: the incoming tree's node pages were reused (root zeroed)
    mem = k.open_physmem()
    assert mem.read(old_root, PS) == bytes(PS)
    w = walk_radix(mem.read, old_root, geometry(PS, "kho-v4"), in_ram=mem.contains)
    rng = w.ranges()
    assert not w.intact or not any(covered(rng, p * PS, PS) for p in pfns)
    # before retrieval the preserved pages carry no page flags (finding 2)
    assert k.page_flags(pfns[:16]) == [0] * 16
    # retrieve: same bytes, same PFNs page for page
    lu = k.open_liveupdate()
    s = lu.retrieve_session("vm")
    for tok, (_, size, seed) in zip((0x1000, 0x2000), spec["vm"]):
        fd = s.retrieve_fd(tok)
        assert os.fstat(fd).st_size == size
        assert sha(os.pread(fd, size, 0)) == holder.file(tok)["sha256"] == sha(pattern(seed, size))
        assert k.memfd_pfns(fd, size) == holder.file(tok)["pfns"]
        os.close(fd)
    s.finish()
    e = lu.retrieve_session("empty")
    fd = e.retrieve_fd(7)
    assert os.fstat(fd).st_size == 0
    e.finish()


def test_pre_kexec_image_inspect_cli_finds_every_pfn(twin):
    holder = Holder(twin.root, {"vm": [[1, 2 * MIB, 5], [2, 5 * PS, 6]]})
    try:
        res = subprocess.run([sys.executable, "-m", "kho_fleet.cli", "inspect", "--memory",
                              os.path.join(twin.root, "mem.img"), "--json"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout)
        assert report["kho"]["compatible"] == "kho-v4" and report["radix"]["intact"]
        ranges = [tuple(r) for r in _ranges(report["radix"]["blocks"])]
        for tok in (1, 2):
            assert all(covered(ranges, p * PS, PS) for p in holder.file(tok)["pfns"])
        assert {s["name"] for s in report["subtrees"]} == {"LUO", "kexec-metadata"}
        assert report["kexec_metadata"]["previous_release"] == RELEASE
    finally:
        holder.kill()


def _ranges(blocks):
    spans = sorted((p, p + c * (PS << o)) for p, o, c in blocks)
    out = []
    for s, e in spans:
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def test_finding6_close_without_finish_loses_session(twin):
    k = twin.kernel()
    holder = Holder(twin.root, {"a": [[1, 3 * PS, 1], [2, PS, 2]], "b": [[3, PS, 3]]},
                    close_device=True)     # finding 1: the device fd need not stay open
    kexec(twin, image(twin.root, "7.2.13-next"))
    assert holder.wait() == -9
    lu = k.open_liveupdate()
    s = lu.retrieve_session("a")
    with pytest.raises(LiveUpdateError) as e:
        lu.retrieve_session("a")                       # retrieved, fd still open
    assert e.value.errno == errno.EINVAL
    fd = s.retrieve_fd(1)
    s.close()                                          # closed without FINISH
    with pytest.raises(LiveUpdateError) as e:
        lu.retrieve_session("a")
    assert e.value.errno == errno.ENOENT
    assert sha(os.pread(fd, 3 * PS, 0)) == holder.file(1)["sha256"]   # what we took stays
    b = lu.retrieve_session("b")                       # other sessions are unaffected
    assert sha(os.pread(b.retrieve_fd(3), PS, 0)) == holder.file(3)["sha256"]
    b.finish()
    with pytest.raises(LiveUpdateError) as e:
        b.retrieve_fd(3)                               # finished: files belong to userspace
    assert e.value.errno == errno.ENOENT


def test_outgoing_session_closed_before_kexec_is_destroyed(twin):
    k = twin.kernel()
    lu = k.open_liveupdate()
    s = lu.create_session("short-lived")
    fd = os.memfd_create("x")
    os.write(fd, pattern(9, 4 * PS))
    s.preserve_fd(fd, 5)
    pfns = k.memfd_pfns(fd, 4 * PS)
    _, _, walk = _tree_of(k, k.read_debugfs("kho/out/fdt"))
    assert all(covered(walk.ranges(), p * PS, PS) for p in pfns)
    s.close()                                          # release: files unpreserved
    _, _, walk = _tree_of(k, k.read_debugfs("kho/out/fdt"))
    assert not any(covered(walk.ranges(), p * PS, PS) for p in pfns)
    s2 = lu.create_session("short-lived")              # the name is free again
    s2.close()
    lu.close()
    kexec(twin, image(twin.root, "7.2.13-next"))
    with pytest.raises(LiveUpdateError) as e:
        k.open_liveupdate().retrieve_session("short-lived")
    assert e.value.errno == errno.ENOENT


@pytest.mark.parametrize("fmt", ["bzImage", "gz"])
def test_finding7_abi_mismatch_drops_everything(twin, fmt):
    k = twin.kernel()
    holder = Holder(twin.root, {"vm": [[1, 16 * PS, 1]]})
    pfns = holder.file(1)["pfns"]
    kexec(twin, image(twin.root, "7.2.13-abi-kho-v3", kho="kho-v3", fmt=fmt))
    assert holder.wait() == -9
    log = k.dmesg()
    assert "is incompatible with 'kho-v3': 1" in log and "KHO: disabling KHO revival" in log
    assert "KHO: setup: handover FDT (0x" in log and "exec from" not in log
    assert k.list_debugfs("kho/in") == []
    out = k.read_debugfs("kho/out/fdt")                 # boots like a cold boot
    assert decode_kho_fdt(out, tolerant=True).compatible == "kho-v3"
    md = md_abi.decode_metadata(k.read_debugfs("kho/out/sub_fdts/kexec-metadata"))
    assert md.kexec_count == 1
    with pytest.raises(LiveUpdateError) as e:
        k.open_liveupdate().retrieve_session("vm")
    assert e.value.errno == errno.ENOENT
    mem = k.open_physmem()                              # the bytes are gone too
    assert sha(b"".join(mem.read(p * PS, PS) for p in pfns)) != holder.file(1)["sha256"]


def test_kexec_metadata_chain_and_pfn_identity_twice(twin):
    k = twin.kernel()
    holder = Holder(twin.root, {"vm": [[1, 32 * PS, 1]]})
    want = holder.file(1)
    kexec(twin, image(twin.root, "7.2.13-b"))
    lu = k.open_liveupdate()
    fd = lu.retrieve_session("vm").retrieve_fd(1)
    # re-preserve the retrieved memfd for the next kexec: the same folios again
    s = lu.create_session("vm2")
    s.preserve_fd(fd, 1)
    kexec(twin, image(twin.root, "7.2.13-c"))
    assert "KHO: exec from: 7.2.13-b (count 2)" in k.dmesg()
    md = md_abi.decode_metadata(k.read_debugfs("kho/in/sub_fdts/kexec-metadata"))
    assert (md.previous_release, md.kexec_count) == ("7.2.13-b", 2)
    fd2 = k.open_liveupdate().retrieve_session("vm2").retrieve_fd(1)
    assert sha(os.pread(fd2, 32 * PS, 0)) == want["sha256"]
    assert k.memfd_pfns(fd2, 32 * PS) == want["pfns"]
    assert twin.state()["kexec_count"] == 2


def test_errnos_follow_the_kernel(twin):
    k = twin.kernel()
    lu = k.open_liveupdate()
    for bad in ("", "x" * 64):
        with pytest.raises(LiveUpdateError) as e:
            lu.create_session(bad)
        assert e.value.errno == errno.EINVAL
    s = lu.create_session("s")
    fd = os.memfd_create("m")
    os.write(fd, b"hello")
    s.preserve_fd(fd, 1)
    cases = [(lambda: s.preserve_fd(fd, 2), errno.EBUSY),          # same file again
             (lambda: s.preserve_fd(os.memfd_create("n"), 1), errno.EEXIST),
             (lambda: lu.retrieve_session("nope"), errno.ENOENT),
             (lambda: s.retrieve_fd(1), errno.EINVAL),              # outgoing session
             (lambda: s.finish(), errno.EINVAL)]
    with open(__file__, "rb") as f:                                 # not a memfd
        cases.append((lambda: s.preserve_fd(f.fileno(), 3), errno.ENOENT))
        for fn, err in cases:
            with pytest.raises(LiveUpdateError) as e:
                fn()
            assert e.value.errno == err, fn
    lu.close()
    kexec(twin, image(twin.root, "7.2.13-next"))
    lu = k.open_liveupdate()
    s = lu.retrieve_session("s")
    with pytest.raises(LiveUpdateError) as e:
        s.preserve_fd(os.memfd_create("q"), 9)                      # incoming session
    assert e.value.errno == errno.EINVAL
    with pytest.raises(LiveUpdateError) as e:
        s.retrieve_fd(99)
    assert e.value.errno == errno.ENOENT
    assert os.pread(s.retrieve_fd(1), 5, 0) == b"hello"
    assert s.get_name() == "s"


def test_host_is_down_while_booting(twin_root):
    from kho_fleet.sim.twinkernel import start_twin
    h = start_twin(twin_root, boot_delay=0.6, ram_mib=64)
    try:
        k = h.kernel()
        k.kexec_load(image(twin_root, "7.2.13-next"), None, k.cmdline())
        assert k.kexec_loaded()
        k.kexec_exec(delay=0)
        time.sleep(0.2)
        for op in (k.release, k.open_liveupdate, k.open_physmem, lambda: k.read_debugfs("kho")):
            with pytest.raises(KernelError, match="down/booting"):
                op()
        h.wait_ready(10, boot_count=2)
        assert k.release() == "7.2.13-next" and not k.kexec_loaded()
    finally:
        h.stop()


def test_no_liveupdate_without_cmdline_flag(twin):
    k = twin.kernel()
    kexec(twin, image(twin.root, "7.2.13-next"), cmdline="root=/dev/vda kho=on")
    assert not k.liveupdate_present()
    with pytest.raises(LiveUpdateError) as e:
        k.open_liveupdate()
    assert e.value.errno == errno.ENOENT
    assert k.read_debugfs("kho/out/sub_fdts/LUO") is None


def test_64mib_handover_keeps_bytes_and_pfns(twin_root):
    """A 64 MiB memfd through preserve and kexec: same bytes, same PFNs. (Its speed is
    measured in bench/, never asserted here.)"""
    from kho_fleet.sim.twinkernel import start_twin
    h = start_twin(twin_root, boot_delay=0.0, ram_mib=256)
    try:
        k = h.kernel()
        lu = k.open_liveupdate()
        s = lu.create_session("big")
        fd = os.memfd_create("big")
        data = pattern(1, 64 * MIB)
        os.write(fd, data)
        s.preserve_fd(fd, 1)
        pfns = k.memfd_pfns(fd, 64 * MIB)
        lu.close()
        kexec(h, image(twin_root, "7.2.13-next"))
        fd2 = k.open_liveupdate().retrieve_session("big").retrieve_fd(1)
        assert sha(os.pread(fd2, 64 * MIB, 0)) == sha(data)
        assert k.memfd_pfns(fd2, 64 * MIB) == pfns
    finally:
        h.stop()
