"""Each twin fault knob, by its observable effect; and bad input to the twin."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

import pytest
from twinsupport import BOOT_DELAY, RETRIEVER, Holder, image, kexec, sha

from kho_agent.kernel import KernelError, LiveUpdateError
from kho_fleet.sim.twinkernel import TwinError, start_twin

PS = 4096


def test_kexec_load_fails(twin):
    k = twin.kernel()
    k.set_fault("kexec-load-fails")
    with pytest.raises(KernelError, match="kexec-load-fails"):
        k.kexec_load(image(twin.root, "7.2.13-next"), None, k.cmdline())
    assert not k.kexec_loaded()
    k.set_fault("kexec-load-fails", clear=True)
    k.kexec_load(image(twin.root, "7.2.13-next"), None, k.cmdline())
    assert k.kexec_loaded()


def test_kexec_load_rejects_bad_images(twin):
    k = twin.kernel()
    with pytest.raises(KernelError, match="No such file"):
        k.kexec_load(os.path.join(twin.root, "missing"), None, "")
    junk = os.path.join(os.path.dirname(twin.root), "junk")
    with open(junk, "wb") as f:
        f.write(b"\0" * 8192)
    with pytest.raises(KernelError, match="not a bootable kernel image"):
        k.kexec_load(junk, None, "")
    with pytest.raises(KernelError, match="no kernel loaded"):
        k.kexec_exec()


def test_never_returns(twin):
    k = twin.kernel()
    holder = Holder(twin.root, {"vm": [[1, PS, 1]]})
    k.set_fault("never-returns")
    k.kexec_load(image(twin.root, "7.2.13-next"), None, k.cmdline())
    k.kexec_exec(delay=0)
    assert holder.wait() == -9
    time.sleep(20 * BOOT_DELAY)
    assert twin.state()["state"] == "down"
    with pytest.raises(KernelError, match="down/booting"):
        k.release()
    with pytest.raises(TwinError, match="not up"):
        twin.wait_ready(0.3, boot_count=2)


def test_slow_boot(twin_root):
    h = start_twin(twin_root, boot_delay=0.05, ram_mib=64, faults=["slow-boot=0.8"])
    try:
        t = time.monotonic()
        kexec(h, image(twin_root, "7.2.13-next"))
        assert time.monotonic() - t >= 0.8
    finally:
        h.stop()
    h = start_twin(twin_root, boot_delay=0.05, ram_mib=64, faults=["slow-boot"])
    try:
        t = time.monotonic()
        kexec(h, image(twin_root, "7.2.13-next"))
        assert time.monotonic() - t >= 0.5                     # 10 x boot delay
    finally:
        h.stop()


def test_bitflip(twin):
    k = twin.kernel()
    holder = Holder(twin.root, {"vm": [[1, 64 * PS, 1]]})
    k.set_fault("bitflip")
    kexec(twin, image(twin.root, "7.2.13-next"))
    flip = twin.state()["last_faults"]["bitflip"]
    fd = k.open_liveupdate().retrieve_session("vm").retrieve_fd(1)
    got = os.pread(fd, 64 * PS, 0)
    want = holder.file(1)
    assert sha(got) != want["sha256"]
    assert k.memfd_pfns(fd, 64 * PS) == want["pfns"]             # same pages, one bit off
    index = want["pfns"].index(flip["pfn"])
    pos = index * PS + flip["offset"]
    fixed = bytearray(got)
    fixed[pos] ^= 1 << flip["bit"]
    assert sha(bytes(fixed)) == want["sha256"]


def test_lost_page(twin):
    k = twin.kernel()
    Holder(twin.root, {"vm": [[1, 8 * PS, 1], [2, 8 * PS, 2]]})
    k.set_fault("lost-page")
    kexec(twin, image(twin.root, "7.2.13-next"))
    lost = twin.state()["last_faults"]["lost-page"]
    s = k.open_liveupdate().retrieve_session("vm")
    for _ in range(2):                                 # a failed retrieve stays failed
        with pytest.raises(LiveUpdateError) as e:
            s.retrieve_fd(lost["token"])
        assert e.value.errno == errno.EIO
    assert f"Unable to restore folio at physical address: {lost['pfn'] * PS:x}" in k.dmesg()
    other = 2 if lost["token"] == 1 else 1
    assert os.fstat(s.retrieve_fd(other)).st_size == 8 * PS


def test_abi_mismatch_fault(twin):
    k = twin.kernel()
    Holder(twin.root, {"vm": [[1, PS, 1]]})
    k.set_fault("abi-mismatch")
    kexec(twin, image(twin.root, "7.2.13-next", kho="kho-v4"))
    assert "is incompatible with 'kho-v3': 1" in k.dmesg()
    assert twin.state()["kho"] == "kho-v3"
    with pytest.raises(LiveUpdateError) as e:
        k.open_liveupdate().retrieve_session("vm")
    assert e.value.errno == errno.ENOENT


def test_kill_agent_before_finish(twin):
    k = twin.kernel()
    holder = Holder(twin.root, {"vm": [[1, 4 * PS, 1], [2, PS, 2]]})
    k.set_fault("kill-agent-before-finish")
    kexec(twin, image(twin.root, "7.2.13-next"))
    agent = subprocess.Popen([sys.executable, "-c", RETRIEVER, twin.root, "vm", "1"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert agent.wait(10) == -9                    # killed right after RETRIEVE_FD
    finally:
        agent.kill()
    assert twin.state()["last_faults"]["kill-agent-before-finish"]["pids"] == [agent.pid]
    with pytest.raises(LiveUpdateError) as e:
        k.open_liveupdate().retrieve_session("vm")    # the session died with it
    assert e.value.errno == errno.ENOENT
    holder.kill()


def test_unknown_fault_is_refused(twin, twin_root):
    with pytest.raises(KernelError, match="unknown fault 'gremlins'"):
        twin.kernel().set_fault("gremlins")
    with pytest.raises(TwinError, match="unknown fault"):
        start_twin(twin_root + "2", faults=["gremlins"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kho_fleet.sim.twinkernel", *args],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("args,msg", [
    (["--root", "/etc/hostname"], "not a directory"),
    (["--root", "/proc/twin-root"], "--root /proc/twin-root"),
    (["--root", "/tmp/" + "x" * 100], "too long"),
    (["--root", "/tmp/kho-twin-never-created", "--fault", "gremlins"], "unknown fault 'gremlins'"),
    (["--root", "/tmp/kho-twin-never-created", "--ram-mib", "8"], "at least 64 MiB"),
    (["--root", "/tmp/kho-twin-never-created", "--kho", "kho-v9"], "--kho"),
    (["--ram-mib", "64"], "--root"),
])
def test_cli_bad_input_one_line_error(args, msg):
    res = _cli(*args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and lines[0].startswith("twinkernel: error:")


def test_second_twin_on_same_root_is_refused(twin):
    res = _cli("--root", twin.root)
    assert res.returncode == 2 and "another twin host is running" in res.stderr
    assert twin.state()["state"] == "up"


def test_power_off_kills_the_hosts_processes(twin_root):
    h = start_twin(twin_root, boot_delay=BOOT_DELAY, ram_mib=64)
    holder = Holder(twin_root, {"vm": [[1, PS, 1]]})
    h.stop()
    assert holder.wait() == -9
    assert h.state()["state"] == "off"
    assert not os.path.exists(os.path.join(twin_root, "dev/liveupdate"))


def test_kexec_load_without_cmdline_reuses_the_running_one(twin):
    """Kernel.kexec_load(cmdline=None) reuses the running command line (what `--cmdline
    reuse` asks for); TwinKernel once declared cmdline: str, hiding that None reaches it."""
    k = twin.kernel()
    first = k.cmdline()
    kexec(twin, image(twin.root, "7.2.14-twin"), cmdline=first + " extra=1")
    assert k.cmdline() == first + " extra=1"          # an explicit line is taken verbatim
    boots = twin.state()["boot_count"]
    k.kexec_load(image(twin.root, "7.2.15-twin"), None, None)
    k.kexec_exec(delay=0)
    twin.wait_ready(20, boot_count=boots + 1)
    assert k.cmdline() == first + " extra=1"          # None: the running line again
    assert k.release() == "7.2.15-twin"
