"""The Linux kernel backend (agent/kho_agent/kernel/linux.py, uapi.py) on THIS machine,
without the lab: uapi layouts against the real header (compiled with gcc), pagemap PFNs of a
memfd, physical memory sources, kexec plumbing with a stand-in kexec(8), and clean errors
where this host's kernel lacks /dev/liveupdate, kexec or debugfs. The same code against a
real KHO/LUO kernel: tests/test_lab_guest.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kho_agent.kernel import get_kernel, uapi
from kho_agent.kernel.base import KernelError, LiveUpdateError
from kho_agent.kernel.linux import LinuxKernel, LinuxLiveUpdate, LinuxSession

REPO = Path(__file__).resolve().parents[1]
KSRC = Path(os.environ.get("KHO_KSRC", REPO.parent / "ksrc/linux"))
HEADER = KSRC / "include/uapi/linux/liveupdate.h"

is_root = os.geteuid() == 0

C_PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include "%s"
#define S(t) printf("\"%%s\": %%zu,\n", #t, sizeof(struct t))
#define O(t, f) printf("\"%%s.%%s\": %%zu,\n", #t, #f, offsetof(struct t, f))
#define I(c) printf("\"%%s\": %%lu,\n", #c, (unsigned long)(c))
int main(void) {
    printf("{\n");
    S(liveupdate_ioctl_create_session); O(liveupdate_ioctl_create_session, fd);
    O(liveupdate_ioctl_create_session, name);
    S(liveupdate_ioctl_retrieve_session); O(liveupdate_ioctl_retrieve_session, fd);
    O(liveupdate_ioctl_retrieve_session, name);
    S(liveupdate_session_preserve_fd); O(liveupdate_session_preserve_fd, fd);
    O(liveupdate_session_preserve_fd, token);
    S(liveupdate_session_retrieve_fd); O(liveupdate_session_retrieve_fd, fd);
    O(liveupdate_session_retrieve_fd, token);
    S(liveupdate_session_finish); O(liveupdate_session_finish, reserved);
    S(liveupdate_session_get_name); O(liveupdate_session_get_name, reserved);
    O(liveupdate_session_get_name, name);
    I(LIVEUPDATE_IOCTL_TYPE); I(LIVEUPDATE_SESSION_NAME_LENGTH);
    I(LIVEUPDATE_IOCTL_CREATE_SESSION); I(LIVEUPDATE_IOCTL_RETRIEVE_SESSION);
    I(LIVEUPDATE_SESSION_PRESERVE_FD); I(LIVEUPDATE_SESSION_RETRIEVE_FD);
    I(LIVEUPDATE_SESSION_FINISH); I(LIVEUPDATE_SESSION_GET_NAME);
    printf("\"end\": 0}\n");
    return 0;
}
"""


@pytest.fixture(scope="module")
def header_values(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not HEADER.is_file():
        pytest.skip(f"kernel header not found: {HEADER}")
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found")
    d = tmp_path_factory.mktemp("uapi")
    (d / "probe.c").write_text(C_PROBE % HEADER)
    res = subprocess.run([gcc, "-o", str(d / "probe"), str(d / "probe.c")],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot compile against {HEADER}: {res.stderr.strip()[-300:]}")
    return json.loads(subprocess.run([str(d / "probe")], capture_output=True, text=True,
                                     check=True).stdout)


def test_uapi_matches_kernel_header(header_values: dict) -> None:
    h = header_values
    assert h["LIVEUPDATE_IOCTL_TYPE"] == uapi.LIVEUPDATE_IOCTL_TYPE
    assert h["LIVEUPDATE_SESSION_NAME_LENGTH"] == uapi.LIVEUPDATE_SESSION_NAME_LENGTH
    for name in ("LIVEUPDATE_IOCTL_CREATE_SESSION", "LIVEUPDATE_IOCTL_RETRIEVE_SESSION",
                 "LIVEUPDATE_SESSION_PRESERVE_FD", "LIVEUPDATE_SESSION_RETRIEVE_FD",
                 "LIVEUPDATE_SESSION_FINISH", "LIVEUPDATE_SESSION_GET_NAME"):
        assert h[name] == getattr(uapi, name), name
        assert uapi.IOCTL_NAMES[h[name]] == name
    sizes = {"liveupdate_ioctl_create_session": uapi.CREATE_SESSION,
             "liveupdate_ioctl_retrieve_session": uapi.RETRIEVE_SESSION,
             "liveupdate_session_preserve_fd": uapi.PRESERVE_FD,
             "liveupdate_session_retrieve_fd": uapi.RETRIEVE_FD,
             "liveupdate_session_finish": uapi.FINISH,
             "liveupdate_session_get_name": uapi.GET_NAME}
    for struct_name, st in sizes.items():
        assert h[struct_name] == st.size, struct_name
    # field offsets: the second field is always at 4, the third (name / token) at 8
    for key, off in h.items():
        if "." in key:
            assert off == {"fd": 4, "reserved": 4, "name": 8, "token": 8}[key.split(".")[1]], key


def test_uapi_packing() -> None:
    buf = uapi.pack_session_arg("db-0")
    assert len(buf) == 72 and buf[:4] == (72).to_bytes(4, sys.byteorder)
    assert bytes(buf[8:13]) == b"db-0\0"
    buf[4:8] = (7).to_bytes(4, sys.byteorder, signed=True)
    assert uapi.unpack_session_fd(buf) == 7
    tok = uapi.pack_fd_token(5, 2**64 - 1)
    assert len(tok) == 16 and uapi.unpack_fd(tok) == 5
    assert uapi.pack_finish() == bytearray((8).to_bytes(4, sys.byteorder) + bytes(4))
    name = uapi.pack_get_name()
    name[8:11] = b"abc"
    assert uapi.unpack_get_name(name) == "abc"
    with pytest.raises(ValueError, match="at most 63"):
        uapi.encode_name("x" * 64)
    assert uapi.encode_name("x" * 63) == b"x" * 63
    for bad in ("", "a\0b"):
        with pytest.raises(ValueError):
            uapi.encode_name(bad)
    with pytest.raises(ValueError):
        uapi.pack_fd_token(1, -1)


def test_identity_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    k = LinuxKernel()
    assert k.kind == "linux" and k.release() == os.uname().release
    assert k.cmdline() == Path("/proc/cmdline").read_text().strip()
    assert k.page_size() == os.sysconf("SC_PAGE_SIZE")
    btime = int(next(ln.split()[1] for ln in Path("/proc/stat").read_text().splitlines()
                     if ln.startswith("btime ")))
    assert abs(k.boot_time() - btime) < 2.0
    assert k.boot_time() <= time.time()
    # the kexec claim's per-boot token: the kernel's boot_id (a UUID), stable in one boot
    assert k.boot_id() == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert k.boot_id() == k.boot_id() and "/" not in k.boot_id()
    assert 0 < k.mem_available() < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.setenv("KHO_AGENT_STATE", str(tmp_path / "state"))
    assert k.state_dir() == str(tmp_path / "state") and (tmp_path / "state").is_dir()
    assert LinuxKernel(state_dir=str(tmp_path / "s2")).state_dir() == str(tmp_path / "s2")
    monkeypatch.delenv("KHO_AGENT_TWIN", raising=False)
    assert isinstance(get_kernel(), LinuxKernel)


def test_missing_proc_files_are_clean_errors(tmp_path: Path) -> None:
    k = LinuxKernel()
    k.proc = str(tmp_path)
    (tmp_path / "meminfo").write_text("MemTotal: 1 kB\n")
    with pytest.raises(KernelError, match="no MemAvailable in"):
        k.mem_available()
    with pytest.raises(KernelError, match=r"cannot read .*/cmdline \(kernel command line\)"):
        k.cmdline()
    assert k.debugfs_mounted() is False


def test_debugfs(tmp_path: Path) -> None:
    k = LinuxKernel()
    if not k.debugfs_mounted():
        assert k.read_debugfs("kho/out/fdt") is None and k.list_debugfs("kho") == []
    root = tmp_path / "debug"
    (root / "kho/out/sub_fdts").mkdir(parents=True)
    (root / "kho/out/fdt").write_bytes(b"\xd0\x0d\xfe\xed" + bytes(300))
    (tmp_path / "mounts").write_text(f"debugfs {root} debugfs rw 0 0\n")
    k.debugfs_root, k.proc = str(root), str(tmp_path)
    assert k.debugfs_mounted()
    assert k.read_debugfs("kho/out/fdt")[:4] == b"\xd0\x0d\xfe\xed"
    assert len(k.read_debugfs("/kho/out/fdt".lstrip("/"))) == 304
    assert k.read_debugfs("kho/in/fdt") is None
    assert k.read_debugfs("kho/out") is None          # a directory is not a file
    assert k.list_debugfs("kho/out") == ["fdt", "sub_fdts"]
    assert k.list_debugfs("kho/in") == []
    for bad in ("../etc/passwd", "/etc/passwd", "kho/../../x"):
        with pytest.raises(KernelError, match="bad debugfs path"):
            k.read_debugfs(bad)


def test_open_liveupdate_without_the_device() -> None:
    k = LinuxKernel()
    if os.path.exists(uapi.LIVEUPDATE_DEVICE):
        pytest.skip("this host has /dev/liveupdate (the lab test covers it)")
    assert k.liveupdate_present() is False
    with pytest.raises(LiveUpdateError) as ei:
        k.open_liveupdate()
    e = ei.value
    assert isinstance(e, OSError) and e.errno == errno.ENOENT and e.op == "open /dev/liveupdate"
    assert "\n" not in str(e) and "liveupdate=on" in str(e)


def test_ioctl_errors_carry_errno_and_op(tmp_path: Path) -> None:
    """Session ioctls on an fd that is not LUO's: ENOTTY, named after the ioctl."""
    fd = os.open("/dev/null", os.O_RDWR)
    lu = LinuxLiveUpdate(fd, "/dev/null")
    with pytest.raises(LiveUpdateError) as ei:
        lu.create_session("db-0")
    assert ei.value.errno == errno.ENOTTY
    assert str(ei.value).startswith("LIVEUPDATE_IOCTL_CREATE_SESSION: ")
    assert "session 'db-0'" in str(ei.value)
    with pytest.raises(LiveUpdateError, match="at most 63") as ei:
        lu.create_session("n" * 80)
    assert ei.value.errno == errno.EINVAL
    s = LinuxSession(os.dup(fd), "db-0", incoming=True)
    for call, op in ((lambda: s.preserve_fd(0, 1), "PRESERVE_FD"),
                     (lambda: s.retrieve_fd(1), "RETRIEVE_FD"),
                     (s.finish, "FINISH"), (s.get_name, "GET_NAME")):
        with pytest.raises(LiveUpdateError, match=f"LIVEUPDATE_SESSION_{op}: ") as ei:
            call()
        assert ei.value.errno == errno.ENOTTY
    s.close()
    s.close()
    with pytest.raises(LiveUpdateError, match="already closed"):
        s.get_name()
    lu.close()
    with pytest.raises(LiveUpdateError, match="already closed"):
        lu.fileno()


def _memfd(size: int) -> int:
    fd = os.memfd_create("kho-test", 0)
    os.ftruncate(fd, size)
    ps = os.sysconf("SC_PAGE_SIZE")
    os.pwrite(fd, b"".join(i.to_bytes(8, "little") * (ps // 8) for i in range(size // ps)), 0)
    return fd


@pytest.mark.skipif(not is_root, reason="real PFNs from /proc/self/pagemap need root")
def test_memfd_pfns_as_root() -> None:
    k = LinuxKernel()
    ps = k.page_size()
    fd = _memfd(256 * ps)
    try:
        pfns = k.memfd_pfns(fd, 256 * ps)
        assert len(pfns) == 256 and all(pfns) and len(set(pfns)) == 256
        assert k.memfd_pfns(fd, 3 * ps + 1)[:4] == pfns[:4]      # partial last page
        assert k.memfd_pfns(fd, 0) == []
        with pytest.raises(KernelError, match="asked for"):
            k.memfd_pfns(fd, 257 * ps)                           # would SIGBUS: refused
        flags = k.page_flags(pfns)
        assert flags is not None and len(flags) == 256
        kpf_nopage = 1 << 20
        assert not any(f & kpf_nopage for f in flags)
        try:
            with k.open_physmem() as mem:                         # bytes at those PFNs
                for i in (0, 1, 255):
                    assert mem.read(pfns[i] * ps, 8) == i.to_bytes(8, "little")
        except KernelError as e:
            assert "/dev/mem" in str(e) and "/proc/kcore" in str(e)
    finally:
        os.close(fd)


@pytest.mark.skipif(not is_root, reason="needs root to drop privileges in a child")
def test_memfd_pfns_unprivileged_is_an_error() -> None:
    code = (
        "import os, sys\n"
        "from kho_agent.kernel.linux import LinuxKernel\n"
        "from kho_agent.kernel.base import KernelError\n"
        "import ctypes, mmap, struct\n"                # everything imported before dropping
        "os.setgid(65534); os.setuid(65534)\n"
        "ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)\n"     # PR_SET_DUMPABLE: own /proc/self again
        "fd = os.memfd_create('t'); os.ftruncate(fd, 8192); os.pwrite(fd, b'x' * 8192, 0)\n"
        "try:\n    print(LinuxKernel().memfd_pfns(fd, 8192))\n"
        "except KernelError as e:\n    print('ERR', e)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO / "agent"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd="/")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ERR ") and "CAP_SYS_ADMIN" in res.stdout, res.stdout


def test_open_physmem_source() -> None:
    k = LinuxKernel()
    try:
        mem = k.open_physmem()
    except KernelError as e:
        msg = str(e)
        assert "\n" not in msg and "/dev/mem" in msg and "/proc/kcore" in msg
        assert not (os.path.exists("/dev/mem") and os.path.exists("/proc/kcore") and is_root)
        return
    with mem:
        assert mem.source in ("/dev/mem", "/proc/kcore")
        if not os.path.exists("/dev/mem"):
            assert mem.source == "/proc/kcore"


def test_kexec_state_on_this_host() -> None:
    k = LinuxKernel()
    loaded = k.kexec_loaded()
    assert isinstance(loaded, bool)
    if os.path.exists("/sys/kernel/kexec_loaded"):
        assert loaded == (Path("/sys/kernel/kexec_loaded").read_text().strip() == "1")
    status = k.kexec_file_load_status()
    assert (status == "ok") == k.kexec_file_load_supported()
    assert "\n" not in status
    if not is_root:
        assert status != "ok"


FAKE_KEXEC = """#!/bin/sh
echo "$@" >> "{log}"
case "$*" in *fail*) echo "kexec_file_load failed: Invalid argument" >&2; exit 1;; esac
exit 0
"""


@pytest.fixture
def fake_kexec(tmp_path: Path) -> tuple:
    log = tmp_path / "argv.log"
    tool = tmp_path / "kexec"
    tool.write_text(FAKE_KEXEC.format(log=log))
    tool.chmod(0o755)
    k = LinuxKernel(state_dir=str(tmp_path / "state"), kexec_tool=str(tool))
    k.kexec_loaded_path = str(tmp_path / "kexec_loaded")
    Path(k.kexec_loaded_path).write_text("0\n")
    return k, log, tmp_path


def test_kexec_load_argv(fake_kexec: tuple) -> None:
    k, log, tmp = fake_kexec
    image, initrd = tmp / "vmlinuz", tmp / "initrd.img"
    image.write_bytes(b"MZ")
    initrd.write_bytes(b"\x1f\x8b")
    k.kexec_load(str(image), str(initrd), None)
    k.kexec_load(str(image), None, "root=/dev/vda kho=on  liveupdate=on")
    k.kexec_unload()
    assert log.read_text().splitlines() == [
        f"-s -l {image} --initrd={initrd} --reuse-cmdline",
        f"-s -l {image} --command-line=root=/dev/vda kho=on  liveupdate=on",
        "-s -u",
    ]
    with pytest.raises(KernelError, match=r"kexec load: kernel image not found: /nope"):
        k.kexec_load("/nope", None, "")
    with pytest.raises(KernelError, match="initrd not found"):
        k.kexec_load(str(image), "/nope", "")
    with pytest.raises(KernelError) as ei:
        k.kexec_load(str(image), None, "fail")
    assert str(ei.value) == (f"kexec -s -l {image} failed: kexec_file_load failed: "
                             "Invalid argument")


def test_kexec_exec_is_detached_and_delayed(fake_kexec: tuple) -> None:
    k, log, tmp = fake_kexec
    with pytest.raises(KernelError, match="no kernel loaded"):
        k.kexec_exec()
    Path(k.kexec_loaded_path).write_text("1\n")
    t0 = time.monotonic()
    k.kexec_exec(delay=3.0)     # long enough that a loaded machine's sync() fits before it
    assert time.monotonic() - t0 < 3.0, "kexec_exec must return before the delay"
    assert not log.exists()
    deadline = time.monotonic() + 10
    while not log.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.read_text().strip() == "-e"
    assert (tmp / "state/kexec-exec.log").exists()


def test_reused_cmdline_drops_boot_loader_words(tmp_path: Path) -> None:
    (tmp_path / "cmdline").write_text("BOOT_IMAGE=/boot/vmlinuz root=/dev/vda crashkernel=256M "
                                      "kho=on\n")
    k = LinuxKernel(kexec_tool=None)
    k.proc = str(tmp_path)
    assert k._reused_cmdline() == "root=/dev/vda kho=on"


def test_kexec_syscall_paths_without_kexec_support() -> None:
    """Without kexec-tools the syscalls are used; on a kernel without them, clean errors."""
    k = LinuxKernel(kexec_tool=None)
    if k.kexec_file_load_supported():
        pytest.skip("this kernel has kexec_file_load (the lab test covers loading)")
    with pytest.raises(KernelError) as ei:
        k.kexec_load(sys.executable, None, "x")    # any file: fails before parsing it
    assert str(ei.value).startswith(f"kexec_file_load {sys.executable}: ")
    with pytest.raises(KernelError, match=r"kexec_file_load\(KEXEC_FILE_UNLOAD\)"):
        k.kexec_unload()
