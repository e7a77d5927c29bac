"""A digital-twin host: one server process that behaves like a Linux 7.2 KHO/LUO kernel.

    python -m kho_fleet.sim.twinkernel --root DIR [--ram-mib 256] [--page-size 4096]
        [--release 7.2.13-twin] [--kho kho-v4] [--cmdline ...] [--boot-delay SECONDS]
        [--fault NAME[=SECONDS] ...] [--seed N] [--outside-pid PID ...] [--exit-with PID]

or `start_twin(root, **config) -> TwinHandle` from Python. Starting a twin on a root is a
power-on: RAM (mem.img) starts zeroed and the kernel cold-boots. Host root layout:

    mem.img                    physical RAM (physical address 0 = offset 0): a symlink to
                               the server's memfd (/proc/PID/fd/N), gone at power-off.
                               [0, 1 MiB) firmware and [16, 24) MiB kernel image are
                               reserved; the KHO scratch areas (debugfs scratch_phys /
                               scratch_len) never hold preserved data
    dev/liveupdate             socket emulating /dev/liveupdate (exclusive open); absent
                               unless the kernel has KHO + LUO and kho=on liveupdate=on
    twin.sock                  control socket: pagemap, kpageflags, kexec, faults, status
    twin.state                 JSON: state (booting/up/down/off), pid, release, kho,
                               boot_count, kexec_count, kexec_loaded, faults, last_faults
    twin.log                   the server's own log
    dmesg                      kernel log of the current boot ("KHO: exec from: ..." etc.)
    proc/cmdline, proc/sys/kernel/osrelease, proc/btime (epoch seconds of the boot),
    proc/meminfo (MemTotal/MemFree/MemAvailable), proc/pagesize
    sys/kernel/kexec_loaded    "0" / "1"
    sys/kernel/debug/kho/out/{fdt,scratch_phys,scratch_len,sub_fdts/NAME}
    sys/kernel/debug/kho/in/{fdt,sub_fdts/NAME}   (after a KHO boot only)
                               out/fdt exists on a cold boot only and is truncated: its
                               size was fixed before LUO added its subtree (lab finding 3)
    boot/vmlinuz-RELEASE       the running kernel's image (a twin image when none given)
    var/lib/kho-agent/         the agent's state directory (the host's disk: kept)

Sockets speak kho_agent.kernel.twinproto. kexec_exec kills the old kernel's processes:
every peer that connected to dev/liveupdate or twin.sock (SO_PEERCRED) and every process
holding a twin fd or a memfd the twin knows (found in /proc/*/fd) -- except --outside-pid
processes (start_twin() passes its caller: the "controller", not a process on the host).
Faults (persist until cleared; names in faults.py): kexec-load-fails, never-returns, slow-boot
(boot delay x10, or slow-boot=SECONDS), bitflip (one preserved memfd data page gets one
bit flipped at kexec), lost-page (one memfd data page is dropped from the radix tree just
before kexec: the next kernel cannot restore it, RETRIEVE_FD fails with EIO as
kho_restore_folio() does), abi-mismatch (the booted kernel speaks another kho-vN),
kill-agent-before-finish[=N] (the process holding /dev/liveupdate is killed right after
the N-th RETRIEVE_FD of a boot, default the first).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from kho_agent.kernel import twinproto as proto

from .faults import TWIN_FAULTS
from .twinserver import TwinConfig, TwinError, TwinServer, parse_fault

if TYPE_CHECKING:
    from kho_agent.kernel.twin import TwinKernel

__all__ = ["TwinConfig", "TwinHandle", "TwinError", "start_twin", "main"]


# --- library API ----------------------------------------------------------------------------
@dataclass
class TwinHandle:
    """A running twin host process."""

    root: str
    proc: subprocess.Popen
    _errfile: Any = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def state(self) -> dict:
        """The twin's state file (state "off" when the process is gone)."""
        try:
            with open(os.path.join(self.root, proto.STATE)) as f:
                st = json.load(f)
        except (OSError, ValueError):
            st = {"state": "off"}
        if self.proc.poll() is not None:
            st["state"] = "off"
        return st

    def _error(self) -> str:
        if self._errfile is None:
            return ""
        self._errfile.seek(0)
        lines = [ln for ln in self._errfile.read().decode(errors="replace").splitlines() if ln]
        return lines[-1] if lines else ""

    def wait_ready(self, timeout: float = 30.0, boot_count: Optional[int] = None) -> dict:
        """Wait until the host is up (and, if given, has booted `boot_count` times)."""
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise TwinError(self._error() or f"twin exited with status {self.proc.returncode}")
            st = self.state()
            if (st.get("state") == "up" and st.get("pid") == self.pid
                    and (boot_count is None or st.get("boot_count", 0) >= boot_count)):
                return st
            if time.monotonic() > end:
                raise TwinError(f"twin host {self.root} not up after {timeout:g} s "
                                f"(state: {st.get('state')})")
            time.sleep(0.02)

    def kernel(self) -> TwinKernel:
        """A TwinKernel for this host."""
        from kho_agent.kernel.twin import TwinKernel
        return TwinKernel(self.root)

    def stop(self, timeout: float = 10.0) -> None:
        """Power off: SIGTERM, then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._errfile is not None:
            self._errfile.close()
            self._errfile = None

    def __enter__(self) -> TwinHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _argv(cfg: TwinConfig) -> list[str]:
    argv = ["--root", os.path.abspath(cfg.root), "--ram-mib", str(cfg.ram_mib),
            "--page-size", str(cfg.page_size), "--release", cfg.release, "--kho", cfg.kho,
            "--cmdline", cfg.cmdline, "--boot-delay", str(cfg.boot_delay),
            "--seed", str(cfg.seed)]
    for name, val in cfg.faults.items():
        argv += ["--fault", name if val is None else f"{name}={val}"]
    for pid in cfg.outside_pids:
        argv += ["--outside-pid", str(pid)]
    if cfg.exit_with:
        argv += ["--exit-with", str(cfg.exit_with)]
    return argv


def start_twin(root: str, *, wait: bool = True, timeout: float = 30.0,
               faults: Sequence[str] = (), **config: Any) -> TwinHandle:
    """Start (power on) a twin host on `root`; config keys are TwinConfig fields.

    The caller is an outside process (never killed by kexec) and the twin powers off
    when it exits. Raises TwinError with the twin's one-line error if it fails to start.
    """
    parsed = dict(parse_fault(f) for f in faults)
    cfg = TwinConfig(root, faults=parsed, **config)
    if not cfg.outside_pids:
        cfg.outside_pids = [os.getpid()]
    if cfg.exit_with is None:
        cfg.exit_with = os.getpid()
    cfg.check()
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import kho_agent
    agent = os.path.dirname(os.path.dirname(os.path.abspath(kho_agent.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([here, agent] + [p for p in
                                         env.get("PYTHONPATH", "").split(os.pathsep) if p])
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "kho_fleet.sim.twinkernel", *_argv(cfg)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                            env=env, start_new_session=True)
    handle = TwinHandle(os.path.abspath(root), proc, err)
    if wait:
        try:
            handle.wait_ready(timeout)
        except BaseException:
            handle.stop()
            raise
    return handle


# --- CLI --------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise TwinError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m kho_fleet.sim.twinkernel",
                description="Run a digital-twin KHO/LUO host on a root directory.")
    d = TwinConfig("")
    p.add_argument("--root", required=True)
    p.add_argument("--ram-mib", type=int, default=d.ram_mib)
    p.add_argument("--page-size", type=int, default=d.page_size)
    p.add_argument("--release", default=d.release)
    p.add_argument("--kho", default=d.kho)
    p.add_argument("--cmdline", default=d.cmdline)
    p.add_argument("--boot-delay", type=float, default=d.boot_delay)
    p.add_argument("--fault", action="append", default=[], metavar="NAME[=SECONDS]",
                   help="one of: " + ", ".join(TWIN_FAULTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outside-pid", type=int, action="append", default=[])
    p.add_argument("--exit-with", type=int, default=None)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        a = _parser().parse_args(argv)
        cfg = TwinConfig(a.root, a.ram_mib, a.page_size, a.release, a.kho, a.cmdline,
                         a.boot_delay, dict(parse_fault(f) for f in a.fault), a.seed,
                         a.outside_pid, a.exit_with)
        cfg.check()
        logging.basicConfig(filename=os.path.join(os.path.abspath(cfg.root), "twin.log"),
                            level=logging.INFO,
                            format="%(asctime)s twin[%(process)d] %(message)s")
        prof = os.environ.get("KHO_TWIN_PROFILE")     # a directory: cProfile the server
        if prof:                                       # (bench/twin_handover.py --profile)
            import cProfile
            pr = cProfile.Profile()
            try:
                return pr.runcall(TwinServer(cfg).run)
            finally:
                pr.dump_stats(os.path.join(prof, f"twin-{os.getpid()}.prof"))
        return TwinServer(cfg).run()
    except TwinError as e:
        print(f"twinkernel: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
