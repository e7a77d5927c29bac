"""Run qemu-system-x86_64 for the lab: boot a kernel + initramfs, watch the serial log,
dump guest memory over QMP (ELF, PT_LOAD p_paddr = guest physical) and shut down cleanly.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from re import Pattern
from typing import IO, Callable, Optional, Union

from kho_fleet.lab.qmp import QMPClient, QMPError

from ..errors import KhoFleetError

DEFAULT_APPEND = ("console=ttyS0 kho=on liveupdate=on panic=-1 no_timer_check tsc=reliable "
                  "rdinit=/init")
# Serial lines that mean the guest will never reach the marker.
DEFAULT_FAIL_PATTERNS = ("Kernel panic - not syncing",)


class QemuError(KhoFleetError, RuntimeError):
    """QEMU failed to start, exited early, timed out, or a QMP operation failed."""


def find_qemu(name: str = "qemu-system-x86_64") -> Optional[str]:
    """Path of the QEMU binary, or None when it is not installed."""
    return shutil.which(name)


def dump_guest_memory(qmp: QMPClient, path: Union[str, Path], *, timeout: float = 300.0,
                      resume: bool = False,
                      alive: Optional[Callable[[], bool]] = None) -> DumpResult:
    """Stop the guest behind `qmp` and write an ELF core of its physical memory (paging
    off, PT_LOAD p_paddr = guest physical) to `path`; QMP `cont` after it if `resume`.

    Uses `detach` and waits for DUMP_COMPLETED (polling `query-dump` as a fallback);
    `alive()` (if given) says whether QEMU still runs, to fail fast when it died.
    """
    out = Path(path).resolve()
    if out.exists():
        out.unlink()
    t0 = time.monotonic()
    try:
        qmp.execute("stop")
        qmp.execute(
            "dump-guest-memory",
            {"paging": False, "protocol": f"file:{out}", "detach": True},
            timeout=timeout,
        )
        deadline = t0 + timeout
        while True:
            try:
                left = max(0.1, deadline - time.monotonic())
                ev = qmp.wait_event("DUMP_COMPLETED", timeout=min(2.0, left))
                if "error" in ev.data:
                    raise QemuError(f"dump-guest-memory failed: {ev.data['error']}")
                break
            except QMPError:
                if alive is not None and not alive():
                    raise QemuError("QEMU exited during the dump") from None
                status = qmp.execute("query-dump")
                if status.get("status") == "completed":
                    break
                if status.get("status") == "failed":
                    raise QemuError(f"dump-guest-memory failed: {status}") from None
                if time.monotonic() >= deadline:
                    raise QemuError(
                        f"dump-guest-memory timed out after {timeout:.0f}s: {status}") from None
        if resume:
            qmp.execute("cont")
    except QMPError as exc:
        raise QemuError(f"memory dump failed: {exc}") from exc
    return DumpResult(out, out.stat().st_size, time.monotonic() - t0)


@dataclass
class QemuConfig:
    """What to boot and how; `accel` is "tcg" by default (KVM is not reliable in the lab)."""

    kernel: Path
    initrd: Optional[Path] = None
    append: str = DEFAULT_APPEND
    memory_mib: int = 1024
    smp: int = 1
    machine: str = "q35"
    accel: str = "tcg"
    qemu: str = "qemu-system-x86_64"
    extra_args: list[str] = field(default_factory=list)


@dataclass
class DumpResult:
    """A finished dump-guest-memory: its path, size in bytes and wall time in seconds."""

    path: Path
    size: int
    seconds: float


@dataclass
class QemuVM:
    """One QEMU process; its serial log, QMP socket and stderr live in `workdir`."""

    config: QemuConfig
    workdir: Path
    qmp_socket: Optional[Path] = None
    proc: Optional[subprocess.Popen[bytes]] = None
    qmp: Optional[QMPClient] = None
    started_at: float = 0.0
    new_session: bool = False  # QEMU in its own session: it outlives us (see detach())
    _sock_dir: Optional[Path] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.qmp_socket is None:
            self.qmp_socket = self.workdir / "qmp.sock"
            if len(str(self.qmp_socket)) > 100:  # sun_path holds 108 bytes
                self._sock_dir = Path(tempfile.mkdtemp(prefix="kho-qmp-"))
                self.qmp_socket = self._sock_dir / "qmp.sock"

    @property
    def serial_path(self) -> Path:
        return self.workdir / "serial.log"

    @property
    def qmp_path(self) -> Path:
        assert self.qmp_socket is not None
        return self.qmp_socket

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "qemu.stderr"

    def command(self) -> list[str]:
        c = self.config
        cmd = [
            c.qemu,
            "-machine", f"{c.machine},accel={c.accel}",
            "-smp", str(c.smp),
            "-m", str(c.memory_mib),
            "-kernel", str(c.kernel),
            "-append", c.append,
            "-serial", f"file:{self.serial_path}",
            "-display", "none",
            "-monitor", "none",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-nodefaults",
            "-no-reboot",
        ]
        if c.initrd is not None:
            cmd += ["-initrd", str(c.initrd)]
        return cmd + list(c.extra_args)

    def start(self, qmp_timeout: float = 20.0) -> None:
        """Launch QEMU and connect QMP; raises QemuError (with stderr) if either fails."""
        if self.proc is not None:
            raise QemuError("QEMU already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for p in (self.serial_path, self.qmp_path):
            if p.exists() or p.is_symlink():
                p.unlink()
        self.serial_path.touch()
        err: IO[bytes] = open(self.stderr_path, "wb")
        try:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                start_new_session=self.new_session,
            )
        except OSError as exc:
            raise QemuError(f"cannot run {self.config.qemu}: {exc}") from exc
        finally:
            err.close()
        client = QMPClient(self.qmp_path)
        deadline = time.monotonic() + qmp_timeout
        while True:
            try:
                client.connect(timeout=1.0)
                break
            except QMPError as exc:
                if self.proc.poll() is not None:
                    raise QemuError(self._describe_exit("QEMU exited at startup")) from exc
                if time.monotonic() >= deadline:
                    self.kill()
                    raise QemuError(f"QMP did not come up: {exc}\n{self._stderr_text()}") from exc
        self.qmp = client

    def serial_text(self) -> str:
        try:
            return self.serial_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def serial_tail(self, lines: int = 40) -> str:
        return "\n".join(self.serial_text().splitlines()[-lines:])

    def wait_for_serial(
        self,
        marker: Union[str, Pattern[str]],
        timeout: float = 180.0,
        fail_patterns: Sequence[Union[str, Pattern[str]]] = DEFAULT_FAIL_PATTERNS,
        poll: float = 0.2,
    ) -> str:
        """Wait until a serial line matches `marker` (substring or regex); return that line.

        Raises QemuError with the serial tail on timeout, on QEMU exiting, or when a line
        matches one of `fail_patterns`.
        """
        want = re.compile(re.escape(marker)) if isinstance(marker, str) else marker
        shown = marker if isinstance(marker, str) else marker.pattern
        fails = [re.compile(re.escape(p)) if isinstance(p, str) else p for p in fail_patterns]
        deadline = time.monotonic() + timeout
        while True:
            text = self.serial_text()
            for line in text.splitlines():
                for f in fails:
                    if f.search(line):
                        raise QemuError(
                            f"guest failed ({line.strip()!r}) while waiting for {shown!r}"
                            f"\n--- serial tail ---\n{self.serial_tail()}"
                        )
                if want.search(line):
                    return line
            if self.proc is None or self.proc.poll() is not None:
                raise QemuError(self._describe_exit(f"QEMU exited before {shown!r}"))
            if time.monotonic() >= deadline:
                raise QemuError(
                    f"timed out after {timeout:.0f}s waiting for {shown!r} on the serial "
                    f"console\n--- serial tail ---\n{self.serial_tail()}"
                )
            time.sleep(poll)

    def dump_memory(
        self, path: Union[str, Path], timeout: float = 300.0, resume: bool = False
    ) -> DumpResult:
        """Stop the guest and write an ELF core of its physical memory (paging off) to `path`.

        Uses `detach` and waits for DUMP_COMPLETED (polling `query-dump` as a fallback).
        The guest stays stopped unless `resume` (then QMP `cont` after the dump).
        """
        qmp = self._require_qmp()

        def alive() -> bool:
            """QEMU is still running."""
            return self.proc is not None and self.proc.poll() is None

        try:
            return dump_guest_memory(qmp, path, timeout=timeout, resume=resume, alive=alive)
        except QemuError as exc:
            if not alive():
                raise QemuError(self._describe_exit("QEMU exited during the dump")) from exc
            raise

    def detach(self) -> Optional[int]:
        """Let QEMU run on without this object: close QMP (the socket stays for the next
        client) and forget the process. Returns its pid (None: never started)."""
        pid = self.proc.pid if self.proc is not None else None
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        self.proc = None
        self._sock_dir = None   # the socket lives on with QEMU
        return pid

    def shutdown(self, timeout: float = 10.0) -> Optional[int]:
        """QMP `quit`, then SIGTERM, then SIGKILL; return QEMU's exit status (None: never ran)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None and self.qmp is not None:
            try:
                self.qmp.execute("quit", timeout=min(timeout, 5.0))
            except QMPError:
                pass  # QEMU closes the socket as it quits; fall through to waiting
        try:
            rc: Optional[int] = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = self.kill()
        self._cleanup()
        return rc

    def kill(self) -> Optional[int]:
        """Terminate QEMU without asking (SIGTERM, then SIGKILL)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
                try:
                    os.kill(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._cleanup()
        return self.proc.poll()

    def _cleanup(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None

    def __enter__(self) -> QemuVM:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _require_qmp(self) -> QMPClient:
        if self.qmp is None or self.proc is None or self.proc.poll() is not None:
            raise QemuError(self._describe_exit("QEMU is not running"))
        return self.qmp

    def _stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace").strip()
        except FileNotFoundError:
            return ""

    def _describe_exit(self, what: str) -> str:
        rc = self.proc.poll() if self.proc is not None else None
        return (
            f"{what} (exit status {rc})\n--- qemu stderr ---\n{self._stderr_text()}"
            f"\n--- serial tail ---\n{self.serial_tail()}"
        )
