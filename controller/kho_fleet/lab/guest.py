"""A real-kernel lab guest: QEMU (TCG) booting a KHO/LUO kernel on a Debian disk, driven
over SSH. The base of the lab tests and of `kho-fleet lab`.

    key = lab_key(cache)                                     # ed25519, made once
    image = build_rootfs(cache, kernel, key.public, extra_kernels=[target])
    with LabGuest(work, kernel, image, key) as g:            # boots, waits for sshd
        rc, out, err = g.run("uname -r")
        g.put("kho-agent.pyz", "/root/kho-agent.pyz")
        boot_id = g.boot_id()
        g.run("... kexec -s -l /boot/bzImage-b --reuse-cmdline; (sleep 0.5; kexec -e) & ...")
        seconds = g.wait_reboot(boot_id)                     # SSH down, then back up

Each guest writes only into its own work dir: a qcow2 overlay on the (read-only, shared)
rootfs image, serial log, QMP socket, known_hosts. Host keys: the first successful SSH
connection records the guest's host key in <work>/known_hosts and every later connection
must present the same key (trust on first use: acceptable for a local lab VM on a loopback
port, not for real hosts). The guest keeps its host key across kexec (same disk).

Timings seen under TCG on 2 cores (tests/test_lab_guest.py): boot to SSH ~13 s, kexec to
SSH back ~12 s (the lab README measured ~30 s and 12-20 s with its own rootfs).
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from kho_agent.atomicfile import atomic_write
from kho_fleet.lab.qemu import DumpResult, QemuConfig, QemuError, QemuVM

from ..errors import KhoFleetError

__all__ = ["LabGuest", "LabKey", "GuestError", "lab_key", "free_port", "GUEST_APPEND"]

# no_timer_check (x86): under TCG on a loaded host the kernel's IO-APIC timer check can miss
# its ticks and panic ("IO-APIC + timer doesn't work!"), seen after a kexec while the machine
# ran a kernel build beside the lab; virtual machines commonly boot with it.
# tsc=reliable (x86): no clocksource watchdog on the TSC. Under TCG at load the watchdog
# judged it unstable 167 s into the seventh boot of one guest and switched to hpet; the
# text patching of that switch oopsed (int3 in ktime_get) and the kernel panicked.
GUEST_APPEND = ("root=/dev/vda rw console=ttyS0 net.ifnames=0 kho=on liveupdate=on "
                "panic=-1 no_timer_check tsc=reliable")
# arm64 guests: qemu-system-aarch64 -M virt -cpu max (TCG; pauth-impdef: QEMU's cheap pointer
# authentication, the architected one costs much under TCG), PL011 console ttyAMA0.
ARM64_APPEND = GUEST_APPEND.replace("console=ttyS0", "console=ttyAMA0").replace(
    " no_timer_check tsc=reliable", "")
_ARCH_QEMU = {"x86_64": ("qemu-system-x86_64", "q35", ()),
              "arm64": ("qemu-system-aarch64", "virt", ("-cpu", "max,pauth-impdef=on"))}
PathLike = Union[str, Path]


class GuestError(KhoFleetError, RuntimeError):
    """The guest did not boot, SSH failed, or a command could not be run."""


@dataclass(frozen=True)
class LabKey:
    """An ed25519 key pair for the lab: `path` (OpenSSH private key) and `public` line."""

    path: Path
    public: str


def lab_key(directory: PathLike, name: str = "lab_ed25519") -> LabKey:
    """The lab's SSH key in `directory`, generated on first use (no passphrase)."""
    d = Path(directory)
    priv, pub = d / name, d / f"{name}.pub"
    if not (priv.is_file() and pub.is_file()):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        d.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
        line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                             serialization.PublicFormat.OpenSSH).decode()
        atomic_write(pub, f"{line} kho-fleet-lab\n".encode(), mode=0o644)
        atomic_write(priv, pem, mode=0o600)     # the private key last: it marks "done"
    return LabKey(priv, pub.read_text().strip())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ssh_banner(port: int, timeout: float = 3.0) -> bool:
    """True if 127.0.0.1:`port` answers with an SSH banner. QEMU's user network accepts
    forwarded connections even while nothing listens in the guest (then closes them), so
    probe with a plain socket first instead of letting paramiko time out noisily."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def _tofu_policy(known_hosts: Path):
    import paramiko

    class _RecordOnce(paramiko.MissingHostKeyPolicy):
        """Record the first host key seen; any other key for this guest is rejected
        (paramiko itself raises BadHostKeyException when a known key changes)."""

        def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                             key: paramiko.PKey) -> None:
            if known_hosts.exists() and known_hosts.stat().st_size > 0:
                raise paramiko.SSHException(
                    f"{hostname}: host key not in {known_hosts} (a different guest?)")
            client.get_host_keys().add(hostname, key.get_name(), key)
            client.save_host_keys(str(known_hosts))

    return _RecordOnce()


class LabGuest:
    """One QEMU guest booted from `kernel` (-kernel) with `image` as /dev/vda (via overlay).

    `start()` (or `with`) boots it and waits for SSH; `stop()` shuts it down.
    """

    def __init__(self, workdir: PathLike, kernel: PathLike, image: PathLike, key: LabKey, *,
                 append: str = GUEST_APPEND, memory_mib: int = 1024, smp: int = 2,
                 accel: str = "tcg", port: Optional[int] = None,
                 extra_args: Sequence[str] = (), new_session: bool = False,
                 arch: str = "x86_64") -> None:
        if arch not in _ARCH_QEMU:
            raise GuestError(f"arch {arch!r}: the lab runs {' or '.join(_ARCH_QEMU)} guests")
        self.arch = arch
        if arch == "arm64" and append == GUEST_APPEND:
            append = ARM64_APPEND
        self.workdir = Path(workdir).resolve()
        self.kernel = Path(kernel).resolve()
        self.image = Path(image).resolve()
        self.key = key
        self.append = append
        self.memory_mib = memory_mib
        self.smp = smp
        self.accel = accel
        self.port = port
        self.extra_args = list(extra_args)
        self.new_session = new_session      # QEMU outlives this process (see release())
        self.vm: Optional[QemuVM] = None
        self.boot_seconds: Optional[float] = None
        self._ssh = None  # paramiko.SSHClient

    # --- lifecycle ------------------------------------------------------------------------
    @property
    def overlay(self) -> Path:
        return self.workdir / "disk.qcow2"

    @property
    def known_hosts(self) -> Path:
        return self.workdir / "known_hosts"

    @property
    def serial_path(self) -> Path:
        return self.workdir / "vm" / "serial.log"

    def _make_overlay(self) -> None:
        if not self.image.is_file():
            raise GuestError(f"rootfs image not found: {self.image}")
        if self.overlay.exists():
            self.overlay.unlink()
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.image), "-F", "raw",
               str(self.overlay)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise GuestError(f"qemu-img create: {e}") from None
        if res.returncode != 0:
            raise GuestError(f"qemu-img create failed: {res.stderr.strip().splitlines()[-1:]}")

    def _config(self, port: int) -> QemuConfig:
        args = [
            "-drive", f"file={self.overlay},if=virtio,format=qcow2,cache=unsafe",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device", "virtio-net-pci,netdev=n0",
            "-device", "virtio-rng-pci",
        ] + self.extra_args
        qemu, machine, cpu = _ARCH_QEMU[self.arch]
        return QemuConfig(kernel=self.kernel, append=self.append, memory_mib=self.memory_mib,
                          smp=self.smp, accel=self.accel, extra_args=list(cpu) + args,
                          qemu=qemu, machine=machine)

    def start(self, timeout: float = 240.0) -> float:
        """Boot and wait for SSH; returns (and sets `boot_seconds`) the seconds it took."""
        if self.vm is not None:
            raise GuestError("guest already started")
        if not self.kernel.is_file():
            raise GuestError(f"kernel not found: {self.kernel}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._make_overlay()
        if self.known_hosts.exists():
            self.known_hosts.unlink()   # a new overlay is a new guest as far as we know
        t0 = time.monotonic()
        for attempt in range(3):        # a free port can be taken before QEMU binds it
            port = self.port or free_port()
            vm = QemuVM(self._config(port), self.workdir / "vm", new_session=self.new_session)
            try:
                vm.start()
            except QemuError as e:
                if self.port is None and "forwarding" in str(e) and attempt < 2:
                    continue
                raise GuestError(f"QEMU did not start: {e}") from None
            self.vm, self.port = vm, port
            break
        try:
            self.wait_ssh(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except GuestError:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - t0
        return self.boot_seconds

    def stop(self) -> None:
        """Close SSH and shut QEMU down (QMP quit, then signals)."""
        self._close_ssh()
        if self.vm is not None:
            self.vm.shutdown()
            self.vm = None

    def release(self) -> Optional[int]:
        """Close SSH and leave QEMU running on its own; returns its pid. The guest is then
        reached by port (SSH) and QMP socket only, e.g. by `kho-fleet lab`."""
        self._close_ssh()
        pid = self.vm.detach() if self.vm is not None else None
        self.vm = None
        return pid

    def __enter__(self) -> LabGuest:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serial_text(self) -> str:
        return self.vm.serial_text() if self.vm is not None else ""

    def serial_tail(self, lines: int = 30) -> str:
        return self.vm.serial_tail(lines) if self.vm is not None else ""

    # --- SSH --------------------------------------------------------------------------------
    def _close_ssh(self) -> None:
        if self._ssh is not None:
            try:
                self._ssh.close()
            finally:
                self._ssh = None

    def _check_alive(self, what: str) -> None:
        if self.vm is None or self.vm.proc is None or self.vm.proc.poll() is not None:
            rc = self.vm.proc.poll() if self.vm is not None and self.vm.proc else None
            raise GuestError(f"QEMU exited (status {rc}) {what}\n--- serial tail ---\n"
                             f"{self.serial_tail()}")
        if "Kernel panic - not syncing" in self.serial_text():
            raise GuestError(f"guest kernel panicked {what}\n--- serial tail ---\n"
                             f"{self.serial_tail()}")

    def _connect(self, timeout: float = 10.0):  # -> paramiko.SSHClient
        import paramiko

        if self.port is None:
            raise GuestError("ssh: the guest was never booted (no forwarded SSH port yet)")
        client = paramiko.SSHClient()
        if not self.known_hosts.exists():
            self.known_hosts.touch(mode=0o600)
        client.load_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(_tofu_policy(self.known_hosts))
        pkey = paramiko.Ed25519Key.from_private_key_file(str(self.key.path))
        client.connect("127.0.0.1", port=self.port, username="root", pkey=pkey,
                       timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                       allow_agent=False, look_for_keys=False)
        return client

    def ssh(self):  # -> paramiko.SSHClient
        """The SSH connection (reconnecting if it dropped)."""
        if self._ssh is not None:
            t = self._ssh.get_transport()
            if t is None or not t.is_active():
                self._close_ssh()
        if self._ssh is None:
            try:
                self._ssh = self._connect()
            except Exception as e:  # paramiko.SSHException, OSError, EOFError
                raise GuestError(f"ssh root@127.0.0.1:{self.port}: {e}") from None
        return self._ssh

    def wait_ssh(self, timeout: float = 240.0) -> float:
        """Wait until SSH logs in; returns the seconds waited."""
        import paramiko

        t0 = time.monotonic()
        last = ""
        while True:
            self._check_alive("while waiting for SSH")
            try:
                self._close_ssh()
                if not _ssh_banner(self.port or 0):
                    raise EOFError("no SSH banner yet")
                self._ssh = self._connect(timeout=10.0)
                return time.monotonic() - t0
            except paramiko.BadHostKeyException as e:
                raise GuestError(f"guest host key changed: {e}") from None
            except (paramiko.SSHException, OSError, EOFError) as e:
                last = str(e) or type(e).__name__
            if time.monotonic() - t0 > timeout:
                raise GuestError(f"no SSH on 127.0.0.1:{self.port} after {timeout:.0f}s "
                                 f"({last})\n--- serial tail ---\n{self.serial_tail()}")
            time.sleep(1.0)

    def run(self, cmd: Union[str, Sequence[str]], *, timeout: float = 120.0,
            stdin: Optional[bytes] = None, check: bool = False) -> tuple[int, str, str]:
        """Run `cmd` (a shell string, or an argv list quoted for the shell) as root.

        Returns (exit status, stdout, stderr); with `check`, a non-zero status raises.
        """
        line = cmd if isinstance(cmd, str) else " ".join(shlex.quote(c) for c in cmd)
        client = self.ssh()
        try:
            chan_in, chan_out, chan_err = client.exec_command(line, timeout=timeout)
            if stdin is not None:
                chan_in.write(stdin)
            chan_in.channel.shutdown_write()
            out = chan_out.read().decode("utf-8", "replace")
            err = chan_err.read().decode("utf-8", "replace")
            rc = chan_out.channel.recv_exit_status()
        except socket.timeout:
            raise GuestError(f"{line[:80]!r}: no answer within {timeout:.0f}s") from None
        except Exception as e:  # paramiko.SSHException, EOFError, OSError
            self._close_ssh()
            raise GuestError(f"{line[:80]!r}: SSH failed: {e}") from None
        if check and rc != 0:
            raise GuestError(f"{line[:80]!r} exited {rc}: {(err or out).strip()[-300:]}")
        return rc, out, err

    def put(self, local: PathLike, remote: str, mode: Optional[int] = None) -> None:
        """Copy a local file to `remote` on the guest (SFTP)."""
        try:
            sftp = self.ssh().open_sftp()
            try:
                sftp.put(str(local), remote)
                if mode is not None:
                    sftp.chmod(remote, mode)
            finally:
                sftp.close()
        except GuestError:
            raise
        except Exception as e:
            raise GuestError(f"put {local} -> {remote}: {e}") from None

    def get(self, remote: str, local: PathLike) -> None:
        """Copy `remote` from the guest to a local file (SFTP)."""
        try:
            sftp = self.ssh().open_sftp()
            try:
                sftp.get(remote, str(local))
            finally:
                sftp.close()
        except GuestError:
            raise
        except Exception as e:
            raise GuestError(f"get {remote} -> {local}: {e}") from None

    # --- kexec and memory -----------------------------------------------------------------
    def boot_id(self, timeout: float = 30.0) -> str:
        """/proc/sys/kernel/random/boot_id: a new value in every kernel, kexec included."""
        return self.run("cat /proc/sys/kernel/random/boot_id", timeout=timeout,
                        check=True)[1].strip()

    def wait_reboot(self, old_boot_id: str, timeout: float = 180.0) -> float:
        """Wait until SSH answers from a kernel whose boot_id is not `old_boot_id` (the guest
        went down and came back, e.g. through kexec). Returns the seconds waited."""
        t0 = time.monotonic()
        self._close_ssh()
        last = ""
        while True:
            self._check_alive("while waiting for the guest to come back")
            try:
                if not _ssh_banner(self.port or 0, timeout=2.0):
                    raise EOFError("no SSH banner")
                self._ssh = self._connect(timeout=5.0)
                if self.boot_id(timeout=10.0) != old_boot_id:
                    return time.monotonic() - t0
                last = "still the old kernel"
            except GuestError as e:
                last = str(e).splitlines()[0]
            except Exception as e:  # paramiko.SSHException, OSError, EOFError
                last = str(e) or type(e).__name__
            self._close_ssh()
            if time.monotonic() - t0 > timeout:
                raise GuestError(f"guest did not come back within {timeout:.0f}s ({last})"
                                 f"\n--- serial tail ---\n{self.serial_tail()}")
            time.sleep(0.5)

    def dump_memory(self, path: PathLike, resume: bool = True) -> DumpResult:
        """QMP dump-guest-memory (ELF, p_paddr = guest physical); the guest runs on after
        unless `resume` is False."""
        if self.vm is None:
            raise GuestError("guest is not running")
        try:
            return self.vm.dump_memory(path, resume=resume)
        except QemuError as e:
            raise GuestError(str(e)) from None

    def lines(self, pattern: str) -> list[str]:
        """Serial console lines containing `pattern`."""
        return [ln for ln in self.serial_text().splitlines() if pattern in ln]
