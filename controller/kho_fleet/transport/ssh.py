"""SSHTransport: a lab host over SSH, on paramiko.

- Host keys are VERIFIED by default: ~/.ssh/known_hosts (`user_known_hosts`), any
  UserKnownHostsFile from ssh_config, and an optional extra `known_hosts` file. An unknown
  key is refused (HostKeyError naming the host and the key's SHA256 fingerprint). With
  `trust_on_first_use=True` an unknown key is accepted, appended to `known_hosts` (or the
  user file) and logged once as a warning with its fingerprint. A CHANGED key is always
  refused, trust-on-first-use or not.
- ssh_config (default ~/.ssh/config, or a path, or a paramiko.SSHConfig) is honoured for
  HostName, Port, User, IdentityFile, UserKnownHostsFile, ProxyJump (any number of hops,
  each a direct-tcpip channel through the previous hop) and ProxyCommand. Inventory values
  (ansible_host/port/user/...) win over the config, as on the ssh command line.
- Auth: key files (ansible_ssh_private_key_file + IdentityFile), the agent, optionally a
  password. Passwords and passphrases are never logged nor put in error messages, and are
  never sent to jump hosts.
- become: `sudo -n [-u USER] --` in front of every command; env is passed with `env K=V`
  after sudo so sudo's env_reset does not drop it.
- Keepalive at the SSH level plus TCP keepalive and TCP_USER_TIMEOUT on the socket, so a
  host that vanishes (kexec) is noticed; after a drop every call raises HostUnreachable
  at once until `reconnect()`. `wait_for_ssh()` polls until the host answers again.
- A command that outlives its timeout has its process group killed (TERM, then KILL,
  from a second session; the remote shell reports its pid on stderr before exec-ing the
  command, and that line is stripped), its channel is closed, and CommandTimeout raised.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import paramiko
from paramiko.common import cMSG_CHANNEL_REQUEST
from paramiko.message import Message

from kho_agent.atomicfile import atomic_open

from .base import (
    CommandFailed,
    CommandTimeout,
    HostKeyError,
    HostUnreachable,
    PathLike,
    Transport,
    TransportError,
    shell_command,
)

__all__ = ["SSHTransport", "wait_for_ssh", "fingerprint"]

log = logging.getLogger("kho_fleet.transport.ssh")

_DEFAULT_CONFIG = "~/.ssh/config"
_DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
_TOFU_WARNED: set = set()
_TOFU_LOCK = threading.Lock()
_TRUE = {"1", "yes", "true", "on", "y"}
_EOF_GRACE = 2.0  # seconds to wait for output after the exit status
_PID_MARK = b"\x1ekho-pid:"
_PID_PREFIX = "printf '\\036kho-pid:%d\\n' $$ >&2; exec "
_KILL_SCRIPT = (
    'kill -s TERM -- "-$1" 2>/dev/null || kill -s TERM "$1" 2>/dev/null || exit 0\n'
    "sleep 0.3\n"
    'kill -s KILL -- "-$1" 2>/dev/null || kill -s KILL "$1" 2>/dev/null\n'
    "exit 0\n"
)


def _split_pid(err: bytes) -> tuple[Optional[int], bytes]:
    """(pid, rest of stderr) from stderr that starts with the _PID_PREFIX line."""
    if not err.startswith(_PID_MARK):
        return None, err
    line, nl, rest = err[len(_PID_MARK):].partition(b"\n")
    if not nl or not line.isdigit():
        return None, err
    return int(line), rest


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style "SHA256:<base64>" fingerprint of a public key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _truthy(v: object) -> bool:
    return v is True or (isinstance(v, (str, int)) and str(v).strip().lower() in _TRUE)


@dataclass
class _Endpoint:
    """One SSH server to talk to, after ssh_config and inventory overrides."""

    name: str  # what the user called it (alias)
    hostname: str
    port: int
    user: str
    key_files: list[str] = field(default_factory=list)
    proxy_jump: list[str] = field(default_factory=list)
    proxy_command: Optional[str] = None

    @property
    def known_hosts_name(self) -> str:
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


def _parse_jump(spec: str) -> tuple[Optional[str], str, Optional[int]]:
    """"[ssh://][user@]host[:port]" (IPv6 as [addr]:port) -> (user, host, port)."""
    s = spec.strip()
    if s.startswith("ssh://"):
        s = s[len("ssh://"):]
    user = None
    if "@" in s:
        user, s = s.rsplit("@", 1)
    port = None
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif s.count(":") == 1:
        host, p = s.split(":")
        port = int(p)
    else:
        host = s
    if not host:
        raise ValueError(f"bad ProxyJump hop {spec!r}")
    return user, host, port


class _RejectUnknown(paramiko.MissingHostKeyPolicy):
    def __init__(self, owner: SSHTransport, files: Sequence[str]) -> None:
        self.owner, self.files = owner, list(files)

    def missing_host_key(self, client, hostname, key):  # paramiko API
        where = ", ".join(self.files) or "no known_hosts file"
        raise HostKeyError(
            self.owner.host, "connect",
            f"host key for {hostname} is unknown ({key.get_name()} {fingerprint(key)}), "
            f"not in {where}; verify it and add it to known_hosts, or opt in to "
            "trust-on-first-use",
        )


class _TrustOnFirstUse(paramiko.MissingHostKeyPolicy):
    def __init__(self, owner: SSHTransport, save_to: Optional[str]) -> None:
        self.owner, self.save_to = owner, save_to

    def missing_host_key(self, client, hostname, key):
        client.get_host_keys().add(hostname, key.get_name(), key)
        fp = fingerprint(key)
        if self.save_to:
            try:
                d = os.path.dirname(self.save_to)
                if d:
                    os.makedirs(d, mode=0o700, exist_ok=True)
                fd = os.open(self.save_to, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                with os.fdopen(fd, "a") as f:
                    f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
            except OSError as e:
                raise HostKeyError(
                    self.owner.host, "connect",
                    f"cannot save host key to {self.save_to}: {e.strerror}") from None
        with _TOFU_LOCK:
            first = (hostname, fp) not in _TOFU_WARNED
            _TOFU_WARNED.add((hostname, fp))
        if first:
            log.warning("%s: trust-on-first-use: accepted new host key for %s: %s %s%s",
                        self.owner.host, hostname, key.get_name(), fp,
                        f" (saved to {self.save_to})" if self.save_to else "")


class SSHTransport(Transport):
    """One host over SSH. Construct, then `connect()` (or use `with`)::

        t = SSHTransport("lab1", hostname="10.0.0.5", user="root",
                         key_filename="~/.ssh/lab", known_hosts="inventory/known_hosts")
        with t:
            r = t.run(["uname", "-r"], timeout=10, check=True)

    `hostname`, `port`, `user` after construction are the resolved values (config applied).
    """

    kind = "ssh"

    def __init__(
        self,
        host: str,
        *,
        hostname: Optional[str] = None,
        port: Optional[int] = None,
        user: Optional[str] = None,
        key_filename: Union[None, str, Sequence[str]] = None,
        password: Optional[str] = None,
        passphrase: Optional[str] = None,
        allow_agent: bool = True,
        look_for_keys: bool = True,
        become: bool = False,
        become_user: Optional[str] = None,
        ssh_config: Union[None, str, os.PathLike[str], paramiko.SSHConfig] = _DEFAULT_CONFIG,
        known_hosts: Optional[PathLike] = None,
        user_known_hosts: Optional[PathLike] = _DEFAULT_KNOWN_HOSTS,
        trust_on_first_use: bool = False,
        proxy_jump: Optional[str] = None,
        connect_timeout: float = 10.0,
        command_timeout: float = 120.0,
        io_timeout: float = 60.0,
        keepalive: float = 15.0,
        tcp_user_timeout: float = 30.0,
    ) -> None:
        super().__init__(host, command_timeout=command_timeout)
        self.connect_timeout = float(connect_timeout)
        self.io_timeout = float(io_timeout)
        self.keepalive = float(keepalive)
        self.tcp_user_timeout = float(tcp_user_timeout)
        self.allow_agent, self.look_for_keys = bool(allow_agent), bool(look_for_keys)
        self.become, self.become_user = bool(become), become_user
        self.trust_on_first_use = bool(trust_on_first_use)
        self.__password = password
        self.__passphrase = passphrase
        if isinstance(key_filename, (str, os.PathLike)):
            key_filename = [key_filename]
        self._explicit_keys = [os.path.expanduser(os.fspath(k)) for k in key_filename or []]
        self._config = self._load_config(ssh_config)
        # Like `ssh -p PORT -l USER NAME`: the config is looked up by the name we would
        # dial (ansible_host, else the inventory name); its HostName may still rewrite it.
        self._target = self._resolve(hostname or host, port, user, self._explicit_keys,
                                     proxy_jump)
        self._known_files = self._known_hosts_files(known_hosts, user_known_hosts)
        save = known_hosts if known_hosts is not None else user_known_hosts
        self._tofu_file = os.path.expanduser(os.fspath(save)) if save is not None else None
        self._lock = threading.RLock()
        self._sftp_lock = threading.Lock()
        self._client: Optional[paramiko.SSHClient] = None
        self._jumps: list[paramiko.SSHClient] = []
        self._sftp: Optional[paramiko.SFTPClient] = None

    @classmethod
    def from_hostvars(cls, name: str, hostvars: Mapping[str, object], **overrides) -> SSHTransport:
        """Build from Ansible-style inventory host vars:

        ansible_host, ansible_port, ansible_user, ansible_ssh_private_key_file,
        ansible_password / ansible_ssh_pass, ansible_become, ansible_become_user,
        kho_ssh_known_hosts (extra known_hosts file), kho_ssh_trust_on_first_use,
        kho_ssh_proxy_jump. Keyword overrides win."""
        hv = hostvars
        kw: dict = {}
        if hv.get("ansible_host"):
            kw["hostname"] = str(hv["ansible_host"])
        if hv.get("ansible_port"):
            port = hv["ansible_port"]
            if isinstance(port, bool) or not isinstance(port, (int, str)):
                raise ValueError(f"{name}: ansible_port: expected a port number, got {port!r}")
            kw["port"] = int(port)
        if hv.get("ansible_user"):
            kw["user"] = str(hv["ansible_user"])
        if hv.get("ansible_ssh_private_key_file"):
            kw["key_filename"] = str(hv["ansible_ssh_private_key_file"])
        pw = hv.get("ansible_password") or hv.get("ansible_ssh_pass")
        if pw:
            kw["password"] = str(pw)
        if "ansible_become" in hv:
            kw["become"] = _truthy(hv["ansible_become"])
        if hv.get("ansible_become_user"):
            kw["become_user"] = str(hv["ansible_become_user"])
        if hv.get("kho_ssh_known_hosts"):
            kw["known_hosts"] = str(hv["kho_ssh_known_hosts"])
        if "kho_ssh_trust_on_first_use" in hv:
            kw["trust_on_first_use"] = _truthy(hv["kho_ssh_trust_on_first_use"])
        if hv.get("kho_ssh_proxy_jump"):
            kw["proxy_jump"] = str(hv["kho_ssh_proxy_jump"])
        kw.update(overrides)
        return cls(name, **kw)

    def __repr__(self) -> str:
        t = self._target
        return f"<SSHTransport {self.host} {t.user}@{t.hostname}:{t.port}>"

    @property
    def hostname(self) -> str:
        return self._target.hostname

    @property
    def port(self) -> int:
        return self._target.port

    @property
    def user(self) -> str:
        return self._target.user

    @property
    def key_files(self) -> list[str]:
        return list(self._target.key_files)

    @property
    def proxy_jump(self) -> list[str]:
        return list(self._target.proxy_jump)

    # --- configuration --------------------------------------------------------------------

    def _load_config(self, cfg) -> Optional[paramiko.SSHConfig]:
        if cfg is None or isinstance(cfg, paramiko.SSHConfig):
            return cfg
        path = os.path.expanduser(os.fspath(cfg))
        if not os.path.exists(path):
            if os.fspath(cfg) == _DEFAULT_CONFIG:
                return None
            raise TransportError(self.host, "config", f"ssh config {path} does not exist")
        try:
            return paramiko.SSHConfig.from_path(path)
        except (OSError, paramiko.ConfigParseError) as e:
            raise TransportError(self.host, "config", f"{path}: {e}") from None

    def _lookup(self, name: str) -> dict:
        if self._config is None:
            return {}
        try:
            return dict(self._config.lookup(name))
        except Exception as e:  # paramiko raises assorted errors for Match exec etc.
            raise TransportError(self.host, "config",
                                 f"ssh config lookup for {name}: {e}") from None

    def _resolve(self, name, port, user, keys, proxy_jump) -> _Endpoint:
        c = self._lookup(name)
        hostname = c.get("hostname", name)
        try:
            port_i = int(port if port is not None else c.get("port", 22))
        except ValueError:
            raise TransportError(self.host, "config",
                                 f"bad port {port or c.get('port')!r}") from None
        user = user or c.get("user") or getpass.getuser()
        key_files = list(keys) + [os.path.expanduser(k) for k in c.get("identityfile", [])]
        jump = proxy_jump if proxy_jump is not None else c.get("proxyjump")
        hops = [] if not jump or jump.strip().lower() == "none" else \
            [h.strip() for h in jump.split(",") if h.strip()]
        pc = c.get("proxycommand")
        if pc and pc.strip().lower() == "none":
            pc = None
        return _Endpoint(name, hostname, port_i, user, _dedup(key_files), hops, pc)

    def _resolve_hop(self, spec: str) -> _Endpoint:
        try:
            u, h, p = _parse_jump(spec)
        except ValueError as e:
            raise TransportError(self.host, "config", str(e)) from None
        ep = self._resolve(h, p, u, self._explicit_keys, "none")
        ep.proxy_command = None
        return ep

    def _known_hosts_files(self, known_hosts, user_known_hosts) -> list[str]:
        files = []
        if user_known_hosts is not None:
            files.append(os.fspath(user_known_hosts))
        files += self._lookup(self._target.name).get("userknownhostsfile", "").split()
        if known_hosts is not None:
            files.append(os.fspath(known_hosts))
        return _dedup(os.path.expanduser(f) for f in files)

    # --- lifecycle ------------------------------------------------------------------------

    def _connect(self) -> None:
        with self._lock:
            self._close_all()
            chain: list[paramiko.SSHClient] = []
            try:
                via = None
                for spec in self._target.proxy_jump:
                    hop = self._resolve_hop(spec)
                    via = self._ssh(hop, self._open_sock(hop, via), password=None)
                    chain.append(via)
                self._client = self._ssh(self._target, self._open_sock(self._target, via),
                                         password=self.__password)
                self._jumps = chain
            except BaseException:
                for c in reversed(chain):
                    c.close()
                raise
            log.debug("%s: connected to %s@%s:%d%s", self.host, self._target.user,
                      self._target.hostname, self._target.port,
                      f" via {','.join(self._target.proxy_jump)}" if chain else "")

    def _open_sock(self, ep: _Endpoint, via: Optional[paramiko.SSHClient]):
        where = f"{ep.hostname}:{ep.port}"
        if via is not None:
            vt = via.get_transport()
            if vt is None or not vt.is_active():
                raise HostUnreachable(self.host, "connect",
                                      f"{where} via jump host: jump host connection lost")
            try:
                return vt.open_channel("direct-tcpip", (ep.hostname, ep.port), ("127.0.0.1", 0),
                                       timeout=self.connect_timeout)
            except (paramiko.SSHException, EOFError, OSError) as e:
                raise HostUnreachable(self.host, "connect",
                                      f"{where} via jump host: {_why(e)}") from None
        if ep.proxy_command:
            try:
                return paramiko.ProxyCommand(ep.proxy_command)
            except (paramiko.SSHException, OSError) as e:
                raise HostUnreachable(self.host, "connect",
                                      f"ProxyCommand for {where}: {_why(e)}") from None
        try:
            sock = socket.create_connection((ep.hostname, ep.port), timeout=self.connect_timeout)
        except OSError as e:
            raise HostUnreachable(self.host, "connect", f"{where}: {_why(e)}") from None
        self._tune_socket(sock)
        return sock

    def _tune_socket(self, sock: socket.socket) -> None:
        """TCP keepalive + TCP_USER_TIMEOUT: a host that vanished without a FIN (kexec,
        power loss) errors the socket in ~tcp_user_timeout rather than ~15 minutes."""
        opts = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        ka = max(1, int(self.keepalive))
        for name, val in (("TCP_KEEPIDLE", ka), ("TCP_KEEPINTVL", ka), ("TCP_KEEPCNT", 3),
                          ("TCP_USER_TIMEOUT", int(self.tcp_user_timeout * 1000))):
            if hasattr(socket, name) and val > 0:
                opts.append((socket.IPPROTO_TCP, getattr(socket, name), val))
        for level, opt, val in opts:
            try:
                sock.setsockopt(level, opt, val)
            except OSError:
                pass

    def _ssh(self, ep: _Endpoint, sock, password: Optional[str]) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        keys = client.get_host_keys()
        for f in self._known_files:
            if os.path.isfile(f):
                try:
                    keys.load(f)
                except (OSError, paramiko.SSHException) as e:
                    log.warning("%s: cannot read known_hosts %s: %s", self.host, f, _why(e))
        if self.trust_on_first_use:
            client.set_missing_host_key_policy(_TrustOnFirstUse(self, self._tofu_file))
        else:
            client.set_missing_host_key_policy(_RejectUnknown(self, self._known_files))
        ct = self.connect_timeout
        where = f"{ep.user}@{ep.hostname}:{ep.port}"
        try:
            client.connect(
                ep.hostname, ep.port, username=ep.user, password=password,
                # paramiko tries every file of a list (client.py: key_filenames); its stubs
                # say str only
                key_filename=ep.key_files or None,  # type: ignore[arg-type]
                passphrase=self.__passphrase,
                allow_agent=self.allow_agent, look_for_keys=self.look_for_keys, sock=sock,
                timeout=ct, banner_timeout=ct, auth_timeout=ct, channel_timeout=ct,
            )
        except HostKeyError:
            client.close()
            raise
        except paramiko.BadHostKeyException as e:
            client.close()
            raise HostKeyError(
                self.host, "connect",
                f"host key for {ep.known_hosts_name} has CHANGED: server offers "
                f"{e.key.get_name()} {fingerprint(e.key)}, known_hosts has "
                f"{e.expected_key.get_name()} {fingerprint(e.expected_key)}; refusing "
                "(man-in-the-middle, or a reinstalled host: remove the old entry with "
                "ssh-keygen -R)",
            ) from None
        except BaseException as e:
            t = client.get_transport()
            reached_auth = t is not None and t.is_active() and t.host_key is not None
            client.close()
            if isinstance(e, paramiko.AuthenticationException) and \
                    str(e) == "Authentication timeout.":
                # the server never answered (e.g. sshd of a host still booting after kexec,
                # starved of CPU): a slow host, not a rejected key -- retryable
                raise HostUnreachable(self.host, "connect",
                                      f"{where}: no answer to authentication within "
                                      f"{ct:g}s") from None
            rejected = isinstance(e, (paramiko.AuthenticationException,
                                      paramiko.PasswordRequiredException))
            if rejected or (reached_auth
                            and isinstance(e, (paramiko.SSHException, ValueError, OSError))):
                raise TransportError(self.host, "connect",
                                     f"authentication failed for {where}: {_why(e)}") from None
            if isinstance(e, (paramiko.SSHException, EOFError, OSError)):
                raise HostUnreachable(self.host, "connect", f"{where}: {_why(e)}") from None
            raise
        t = client.get_transport()
        if t is not None and self.keepalive > 0:
            t.set_keepalive(max(1, int(self.keepalive)))
        return client

    def _close_all(self) -> None:
        with self._sftp_lock:
            if self._sftp is not None:
                try:
                    self._sftp.close()
                except Exception:
                    pass
                self._sftp = None
        if self._client is not None:
            self._client.close()
            self._client = None
        for c in reversed(self._jumps):
            c.close()
        self._jumps = []

    def close(self) -> None:
        with self._lock:
            self._close_all()

    def is_alive(self) -> bool:
        c = self._client
        t = c.get_transport() if c is not None else None
        return t is not None and t.is_active()

    def _live(self, op: str) -> paramiko.Transport:
        return self._live_client(op)[1]

    def _live_client(self, op: str) -> tuple[paramiko.SSHClient, paramiko.Transport]:
        """The connected client and its active transport (HostUnreachable if it is gone).

        Callers use these references, never re-read self._client: another thread may
        close() the connection (self._client = None) at any moment."""
        if not self._ever_connected:
            self.connect()
        c = self._client
        t = c.get_transport() if c is not None else None
        if c is None or t is None or not t.is_active():
            if c is not None:
                self.close()
            raise HostUnreachable(self.host, op, "connection lost (host down, rebooting or "
                                  "kexec-ing?); reconnect() to retry")
        return c, t

    def _lost_or(self, t: Optional[paramiko.Transport], op: str,
                 e: BaseException) -> TransportError:
        """HostUnreachable if this error means the connection is gone (the transport thread
        may need a moment to notice; no transport at all: gone), else a plain TransportError."""
        gone = t is None or isinstance(e, (EOFError, ConnectionError))
        settle = time.monotonic() + 0.5
        while t is not None and not gone and t.is_active() and time.monotonic() < settle:
            time.sleep(0.02)
        if t is None or gone or not t.is_active():
            self.close()
            return HostUnreachable(self.host, op, f"connection lost: {_why(e)}")
        return TransportError(self.host, op, _why(e))

    # --- commands -------------------------------------------------------------------------

    def _become_prefix(self) -> list[str]:
        if not self.become:
            return []
        if self._target.user == "root" and self.become_user in (None, "root"):
            return []
        return ["sudo", "-n"] + (["-u", self.become_user] if self.become_user else []) + ["--"]

    def _exec(self, argv, env, timeout, stdin) -> tuple[int, bytes, bytes]:
        # The shell reports its pid (= the session's process group: sshd setsid()s it) on
        # stderr, then execs the command, so a timeout can kill the whole group out of band.
        cmd = _PID_PREFIX + shell_command(argv, env, self._become_prefix())
        t = self._live("run")
        deadline = time.monotonic() + timeout
        try:
            chan = t.open_session(timeout=max(0.5, min(timeout, self.connect_timeout)))
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise self._lost_or(t, "run", e) from None
        try:
            rc, out, err = self._exec_on(t, chan, cmd, argv[0], stdin, timeout, deadline)
        finally:
            chan.close()
        _, err = _split_pid(err)
        return rc, out, err

    def _exec_on(self, t, chan, cmd, prog, stdin, timeout, deadline):
        # exec_command waits for the server's reply with no timeout of its own: a server
        # that never replies within the command's timeout is a dead connection.
        watchdog = threading.Timer(max(0.1, deadline - time.monotonic()), t.close)
        watchdog.daemon = True
        watchdog.start()
        try:
            chan.exec_command(cmd)
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise self._lost_or(t, "run", e) from None
        finally:
            watchdog.cancel()
        out, err = bytearray(), bytearray()
        try:
            if stdin:
                chan.settimeout(max(0.1, deadline - time.monotonic()))
                chan.sendall(stdin)
            chan.shutdown_write()
        except socket.timeout:
            self._kill_remote(t, chan, err)
            raise CommandTimeout(self.host, "run", f"{prog}: stdin not consumed within "
                                 f"{timeout:g}s; killed") from None
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise self._lost_or(t, "run", e) from None
        eof_deadline = deadline
        while True:
            done = chan.exit_status_ready()
            eof = chan.eof_received or chan.closed  # before draining: data precedes EOF
            while chan.recv_ready():
                out += chan.recv(1 << 16)
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(1 << 16)
            if done:
                # OpenSSH may send exit-status while output is still in the pipe: read on
                # until EOF, but not forever (a daemonised child can hold stdout open).
                if eof or time.monotonic() >= eof_deadline:
                    break
                eof_deadline = min(eof_deadline, time.monotonic() + _EOF_GRACE)
                time.sleep(0.002)
                continue
            if not t.is_active():
                self.close()
                raise HostUnreachable(self.host, "run", f"connection lost while running {prog}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._kill_remote(t, chan, err)
                raise CommandTimeout(self.host, "run",
                                     f"{prog}: no exit after {timeout:g}s; killed")
            chan.status_event.wait(min(remaining, 0.05))
        if chan.exit_status < 0 and not t.is_active():
            self.close()
            raise HostUnreachable(self.host, "run", f"connection lost while running {prog}")
        return chan.exit_status, bytes(out), bytes(err)  # -1: ended without status (signal)

    def _kill_remote(self, t: paramiko.Transport, chan: paramiko.Channel, err: bytearray) -> None:
        """Kill a timed-out command: TERM then KILL to its process group, from a second
        session (as the become user too); without a pid, fall back to SSH "signal" requests
        (RFC 4254 6.9), which OpenSSH refuses for root logins."""
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(1 << 16)
        pid, _ = _split_pid(bytes(err))
        if pid is not None:
            try:
                k = t.open_session(timeout=max(1.0, min(5.0, self.connect_timeout)))
                try:
                    k.exec_command(shell_command(["sh", "-c", _KILL_SCRIPT, "sh", str(pid)],
                                                 None, self._become_prefix()))
                    k.status_event.wait(5.0)
                finally:
                    k.close()
                return
            except Exception as e:  # the connection may be going away too
                log.debug("%s: kill of remote pid %d failed: %s", self.host, pid, _why(e))
        for sig, wait in (("TERM", 0.3), ("KILL", 0.5)):
            try:
                m = Message()
                m.add_byte(cMSG_CHANNEL_REQUEST)
                m.add_int(chan.remote_chanid)
                m.add_string("signal")
                m.add_boolean(False)
                m.add_string(sig)
                # private API (types-paramiko omits it): paramiko has no public way to send
                # a "signal" channel request
                t._send_user_message(m)  # type: ignore[attr-defined]
            except Exception:
                return
            if chan.status_event.wait(wait):
                return

    # --- files ----------------------------------------------------------------------------

    def _sftp_client(self, op: str) -> tuple[paramiko.SFTPClient, paramiko.Transport]:
        """The SFTP session (opened on first use, reopened when its channel closed) and
        the transport it runs on."""
        c, t = self._live_client(op)
        with self._sftp_lock:
            sftp = self._sftp
            chan = sftp.get_channel() if sftp is not None else None
            if sftp is None or chan is None or chan.closed:
                try:
                    sftp = c.open_sftp()
                except (paramiko.SSHException, EOFError, OSError) as e:
                    raise self._lost_or(t, op, e) from None
                chan = sftp.get_channel()
                if chan is not None:
                    chan.settimeout(self.io_timeout)
                self._sftp = sftp
            return sftp, t

    def _sftp_do(self, op: str, path: str, fn: Callable[[paramiko.SFTPClient], object]):
        sftp, t = self._sftp_client(op)
        try:
            with self._sftp_lock:
                return fn(sftp)
        except (OSError, paramiko.SSHException, EOFError) as e:
            if isinstance(e, socket.timeout) or not t.is_active():
                raise self._lost_or(t, op, e) from None
            raise TransportError(self.host, op, f"{path}: {_why(e)}") from None

    def _put_raw(self, local_path: str, remote_path: str, mode: int) -> None:
        if not self._become_prefix():
            def up(s):
                s.put(local_path, remote_path, confirm=True)
                s.chmod(remote_path, mode)
            self._sftp_do("put", remote_path, up)
            return
        # become: SFTP runs as the login user, so stage in /tmp and copy as root.
        stage = self._tmp_name("/tmp/kho-put")
        self._sftp_do("put", remote_path, lambda s: s.put(local_path, stage, confirm=True))
        self.run(["sh", "-c",
                  'cp -- "$1" "$2" && chmod "$3" -- "$2"; rc=$?; rm -f -- "$1"; exit $rc',
                  "sh", stage, remote_path, f"{mode:o}"], check=True)

    def _rename(self, src: str, dst: str) -> None:
        if self._become_prefix():
            return super()._rename(src, dst)
        self._sftp_do("rename", dst, lambda s: s.posix_rename(src, dst))

    def _remove_quietly(self, remote_path: str) -> None:
        if self._become_prefix():
            return super()._remove_quietly(remote_path)
        try:
            if self.is_alive():
                self._sftp_do("remove", remote_path, lambda s: s.remove(remote_path))
        except TransportError:
            pass

    def get(self, remote_path: str, local_path: PathLike) -> None:
        try:
            with atomic_open(local_path) as f:
                if self._become_prefix():
                    rc, data, err = self._exec(["cat", "--", remote_path], {}, self.io_timeout,
                                               None)
                    if rc != 0:
                        raise TransportError(self.host, "get",
                                             f"{remote_path}: {err.decode('utf-8', 'replace')}")
                    f.write(data)
                else:
                    self._sftp_do("get", remote_path, lambda s: s.getfo(remote_path, f))
        except OSError as e:            # the local side: the temp file could not be made
            raise TransportError(self.host, "get",
                                 f"{os.fspath(local_path)}: {e.strerror or e}") from None


def wait_for_ssh(
    transport_factory: Callable[[], Transport],
    timeout: float,
    interval: float = 1.0,
    *,
    previous_boot_id: Optional[str] = None,
) -> float:
    """Poll until the host answers SSH again (e.g. after kexec); return the seconds it took.

    Each attempt builds a fresh transport with `transport_factory()`, connects, runs
    `true` (or, with `previous_boot_id`, reads boot_id and insists it CHANGED, so the old
    kernel still answering before kexec does not count), and closes it. HostUnreachable and
    a command channel that does not open yet (a host still booting) are retried; host-key,
    auth and config errors are raised at once. Raises
    HostUnreachable after `timeout` seconds::

        bid = t.boot_id()
        t.run([... "kexec" ...])
        took = wait_for_ssh(lambda: SSHTransport.from_hostvars(name, hv), 180,
                            previous_boot_id=bid)
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    last = "no attempt"
    host = "?"
    while True:
        t = transport_factory()
        host = t.host
        remaining = max(0.5, deadline - time.monotonic())
        if hasattr(t, "connect_timeout"):
            t.connect_timeout = min(t.connect_timeout, remaining)
        try:
            t.connect()
            if previous_boot_id is None:
                t.run(["true"], timeout=remaining, check=True)
                return time.monotonic() - t0
            if t.boot_id(timeout=remaining) != previous_boot_id:
                return time.monotonic() - t0
            last = "still running the previous boot"
        except HostUnreachable as e:
            last = e.detail
        except TransportError as e:
            # Connected and authenticated, but no session yet ("Timeout opening channel"):
            # a host still booting (seen on a lab guest under TCG right after a kexec). Keep
            # polling; host-key and connect (auth, config) errors are still raised at once.
            if isinstance(e, (HostKeyError, CommandFailed)) or e.op != "run":
                raise
            last = f"{e.op}: {e.detail}"
        finally:
            t.close()
        if time.monotonic() + interval >= deadline:
            raise HostUnreachable(host, "wait", f"no SSH after {timeout:g}s (last: {last})")
        time.sleep(interval)


def _why(e: BaseException) -> str:
    msg = str(e).strip()
    if isinstance(e, socket.timeout) or (isinstance(e, TimeoutError) and not msg):
        return "timed out"
    if isinstance(e, EOFError) and not msg:
        return "connection closed by the server"
    return msg or type(e).__name__


def _dedup(items) -> list:
    seen, out = set(), []
    for i in items:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out
