"""Test fixture: REAL OpenSSH sshd servers on free loopback ports, as the current user.

Each `SSHD` gets its own ed25519 host key, sshd_config, pid file and log in a temp dir and
runs `/usr/sbin/sshd -D -e -f CFG -E LOG`; `stop()` SIGKILLs it AND its per-connection
children (what a host vanishing under kexec looks like to a client: the TCP connection
dies), and `start()` again comes back on the same port with the same host key.

`SSHLab` (the module-scoped `ssh_lab` fixture of conftest.py) is a client key plus two
servers, `target` and `jump` (the jump host, for ProxyJump), and a known_hosts file that knows
both. Tests are skipped, with the reason printed, when sshd or ssh-keygen is missing (Debian:
openssh-server, openssh-client).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

SSHD_BIN = os.environ.get("KHO_TEST_SSHD", "/usr/sbin/sshd")
PRIVSEP_DIR = "/run/sshd"

__all__ = ["SSHD", "SSHLab", "require_openssh", "keygen", "free_port", "descendants"]


def require_openssh() -> None:
    """Skip (printing why) unless sshd and ssh-keygen are installed and usable."""
    missing = [p for p in (SSHD_BIN,) if not os.access(p, os.X_OK)]
    if not shutil.which("ssh-keygen"):
        missing.append("ssh-keygen")
    reason = None
    if missing:
        reason = (f"OpenSSH not installed ({', '.join(missing)} missing; "
                  "apt-get install openssh-server)")
    elif os.geteuid() == 0 and not os.path.isdir(PRIVSEP_DIR):
        try:
            os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)
        except OSError as e:
            reason = f"cannot create sshd privilege-separation dir {PRIVSEP_DIR}: {e.strerror}"
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)


def keygen(path: Path, comment: str = "kho-test", passphrase: str = "") -> Path:
    """ed25519 key pair at path / path.pub."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", comment,
                    "-f", str(path)], check=True, stdin=subprocess.DEVNULL)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """All processes below pid (by /proc ppid), deepest last; sshd's per-connection
    children call setsid(), so killpg would miss them."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, stack = [], [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


class SSHD:
    """One sshd on 127.0.0.1:port accepting `authorized_keys` for the current user."""

    def __init__(self, workdir: Path, authorized_keys: Path, name: str = "sshd",
                 port: Optional[int] = None) -> None:
        self.dir = Path(workdir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = port or free_port()
        self.host_key = keygen(self.dir / "ssh_host_ed25519_key", f"{name}-host")
        self.config = self.dir / "sshd_config"
        self.log = self.dir / "sshd.log"
        self.pidfile = self.dir / "sshd.pid"
        self.authorized_keys = authorized_keys
        self.proc: Optional[subprocess.Popen] = None
        self.config.write_text(
            f"ListenAddress 127.0.0.1\n"
            f"Port {self.port}\n"
            f"HostKey {self.host_key}\n"
            f"AuthorizedKeysFile {authorized_keys}\n"
            f"PidFile {self.pidfile}\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "PermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "AllowTcpForwarding yes\n"
            "UseDNS no\n"
            "PrintMotd no\n"
            "MaxStartups 100\n"
            "MaxSessions 100\n"
            "Subsystem sftp internal-sftp\n"
            "LogLevel VERBOSE\n"
            # Debian's bash sources ~/.bashrc for ssh commands only when SHLVL < 2: keep the
            # test user's interactive setup (pyenv init, ...) out of every command.
            "SetEnv SHLVL=1\n"
        )

    @property
    def host_pubkey(self) -> str:
        """'ssh-ed25519 AAAA...' (no comment)."""
        pub = self.host_key.parent / (self.host_key.name + ".pub")
        return " ".join(pub.read_text().split()[:2])

    @property
    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_pubkey}\n"

    def start(self, timeout: float = 10.0) -> SSHD:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(
            [SSHD_BIN, "-D", "-e", "-f", str(self.config), "-E", str(self.log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited rc {self.proc.returncode}: {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-2.0-"):
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.name} did not answer on port {self.port}: {self.log_tail()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGKILL the listener and every per-connection child (sessions die at once)."""
        if self.proc is None:
            return
        pids = [self.proc.pid] + descendants(self.proc.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(5)

    def log_tail(self, n: int = 15) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class SSHLab:
    dir: Path
    user: str
    client_key: Path
    target: SSHD
    jump: SSHD
    known_hosts: Path  # knows target and jump

    def transport_kwargs(self, **kw) -> dict:
        """SSHTransport kwargs that never touch the real ~/.ssh (no agent, no default keys)."""
        base = dict(hostname="127.0.0.1", port=self.target.port, user=self.user,
                    key_filename=str(self.client_key), known_hosts=str(self.known_hosts),
                    user_known_hosts=None, ssh_config=None, allow_agent=False,
                    look_for_keys=False, connect_timeout=5.0)
        base.update(kw)
        return base
