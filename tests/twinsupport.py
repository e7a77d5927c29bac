"""Helpers for the twin tests: start hosts, run agent-like processes on them.

Processes that preserve or retrieve run as real subprocesses (so kexec can kill them);
the test process itself is the twin's "outside" process and is never killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from typing import Optional

from kho_fleet.sim.kernelimage import make_kernel_image
from kho_fleet.sim.twinkernel import TwinHandle, start_twin

BOOT_DELAY = 0.05
RELEASE = "7.2.13-twin"

# A process on the host that preserves memfds and then holds its session fds forever.
HOLDER = textwrap.dedent("""
    import hashlib, json, os, random, sys, time
    from kho_agent.kernel.twin import TwinKernel
    root, spec, close_device = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1"
    k = TwinKernel(root)
    lu = k.open_liveupdate()
    keep, out = [], {"pid": os.getpid(), "files": {}}
    for sname, files in spec.items():
        s = lu.create_session(sname)
        keep.append(s)
        for token, size, seed in files:
            fd = os.memfd_create(f"workload-{token}")
            data = random.Random(seed).randbytes(size)
            os.write(fd, data)
            s.preserve_fd(fd, token)
            keep.append(fd)
            out["files"][str(token)] = {"sha256": hashlib.sha256(data).hexdigest(),
                                        "pfns": k.memfd_pfns(fd, size), "size": size}
    if close_device:
        lu.close()
    print(json.dumps(out), flush=True)
    time.sleep(3600)
""")

# A process that retrieves a session and one token, reports, then waits to FINISH.
RETRIEVER = textwrap.dedent("""
    import hashlib, json, os, sys
    from kho_agent.kernel.twin import TwinKernel
    root, name, token = sys.argv[1], sys.argv[2], int(sys.argv[3])
    k = TwinKernel(root)
    lu = k.open_liveupdate()
    s = lu.retrieve_session(name)
    fd = s.retrieve_fd(token)
    size = os.fstat(fd).st_size
    print(json.dumps({"sha256": hashlib.sha256(os.pread(fd, size, 0)).hexdigest()}), flush=True)
    sys.stdin.readline()
    s.finish()
    print("finished", flush=True)
""")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def image(root: str, release: str, kho: str = "kho-v4", fmt: str = "bzImage") -> str:
    """A staged twin kernel image next to the host root."""
    path = os.path.join(os.path.dirname(root), f"vmlinuz-{release}")
    return make_kernel_image(path, release, kho=kho, fmt=fmt)


class Holder:
    """A subprocess on the twin host holding preserved memfds (see HOLDER)."""

    def __init__(self, root: str, spec: dict, close_device: bool = False) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, root, json.dumps(spec),
                                      "1" if close_device else "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            self.proc.wait(10)
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"holder failed: {err}")
        self.report = json.loads(line)

    def file(self, token: int) -> dict:
        return self.report["files"][str(token)]

    def wait(self, timeout: float = 10) -> Optional[int]:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def kexec(h: TwinHandle, kernel_image: str, cmdline: Optional[str] = None,
          timeout: float = 20) -> dict:
    """kexec_file_load + kexec -e from outside, and wait for the next boot."""
    k = h.kernel()
    boots = h.state()["boot_count"]
    k.kexec_load(kernel_image, None, cmdline if cmdline is not None else k.cmdline())
    k.kexec_exec(delay=0)
    return h.wait_ready(timeout, boot_count=boots + 1)


@contextlib.contextmanager
def running_twin(ram_mib: int = 128, boot_delay: float = BOOT_DELAY) -> Iterator[str]:
    """A twin host started under a short /tmp root (AF_UNIX paths are limited to 107 bytes);
    yields its root, stops it and removes it afterwards."""
    d = tempfile.mkdtemp(prefix="twin-", dir="/tmp")
    root = os.path.join(d, "host")
    h = start_twin(root, boot_delay=boot_delay, ram_mib=ram_mib)
    try:
        yield root
    finally:
        h.stop()
        shutil.rmtree(d, ignore_errors=True)
