"""SSHTransport against REAL OpenSSH sshd servers on loopback (tests/sshd.py): argv
verbatim, env, exit codes, timeouts, host-key policy (reject / trust-on-first-use / changed),
ssh_config, ProxyJump, SFTP and content-addressed uploads, and a server that dies mid-session
(the kexec case) followed by reconnect / wait_for_ssh. Never touches the real ~/.ssh."""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sshd import SSHD, keygen
from test_transport_local import TRICKY, _procs_with

from kho_fleet.transport import (
    CommandFailed,
    CommandTimeout,
    HostKeyError,
    HostUnreachable,
    TransportError,
)
from kho_fleet.transport.base import sha256_file
from kho_fleet.transport.ssh import SSHTransport, wait_for_ssh


def _ssh(lab, **kw) -> SSHTransport:
    return SSHTransport("web1", **lab.transport_kwargs(**kw))


@pytest.fixture(scope="module")
def conn(ssh_lab):
    t = _ssh(ssh_lab)
    t.connect()
    yield t
    t.close()


def test_tricky_argv_verbatim(conn):
    r = conn.run(["printf", "%s\n"] + TRICKY, timeout=10)
    assert (r.rc, r.stderr) == (0, "")
    assert r.stdout == "".join(a + "\n" for a in TRICKY)


def test_env_passing(conn):
    env = {"KHO_A": "$(echo pwned); `id` 'q' \"d\"\nline2 ✓", "KHO_B": ""}
    r = conn.run(["sh", "-c", 'printf "%s|%s|%s" "$KHO_A" "${KHO_B-unset}" "$0"', "zero"],
                 env=env, timeout=10)
    assert r.stdout == env["KHO_A"] + "||zero"


def test_exit_codes_stdin_and_check(conn):
    assert conn.run(["true"]).rc == 0
    assert conn.run(["sh", "-c", "exit 42"]).rc == 42
    assert conn.run(["no-such-program-kho"]).rc == 127
    assert conn.run(["cat"], stdin="dåta\n".encode()).stdout == "dåta\n"
    r = conn.run(["sh", "-c", "echo out; echo err >&2; exit 1"])
    assert (r.rc, r.stdout, r.stderr) == (1, "out\n", "err\n")  # pid line stripped
    with pytest.raises(CommandFailed) as ei:
        conn.run(["sh", "-c", "echo 'no space left' >&2; exit 5"], check=True)
    assert str(ei.value) == "web1: run: sh exited 5: no space left"


def test_timeout_kills_remote_command(conn):
    marker = f"30.{random.randrange(10**6):06d}"  # unique: other runs may be sleeping too
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout) as ei:
        conn.run(["sh", "-c", f"sleep {marker} & sleep {marker}; wait"], timeout=1.0)
    took = time.monotonic() - t0
    assert 1.0 <= took < 3.0, took
    assert "\n" not in str(ei.value) and "no exit after 1s" in str(ei.value)
    deadline = time.monotonic() + 2
    while _procs_with(f"{marker}") and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _procs_with(marker)  # sshd runs on this machine: the processes are ours to see
    assert left == [], [open(f"/proc/{p}/stat").read() for p in left]
    assert conn.run(["echo", "still usable"]).stdout == "still usable\n"


def test_unknown_host_key_rejected_by_default(ssh_lab, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    t = _ssh(ssh_lab, known_hosts=str(empty))
    with pytest.raises(HostKeyError) as ei:
        t.connect()
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("web1: connect: host key for ")
    assert f"[127.0.0.1]:{ssh_lab.target.port}" in msg and "unknown" in msg
    assert "ssh-ed25519 SHA256:" in msg and str(empty) in msg
    assert ei.value.__cause__ is None
    assert empty.read_text() == "" and not t.is_alive()


def test_trust_on_first_use_accepts_persists_and_warns_once(ssh_lab, tmp_path, caplog):
    kh = tmp_path / "sub" / "known_hosts"
    caplog.set_level(logging.WARNING, logger="kho_fleet.transport")
    with _ssh(ssh_lab, known_hosts=str(kh), trust_on_first_use=True) as t:
        assert t.run(["true"]).ok
    assert kh.read_text() == ssh_lab.target.known_hosts_line
    warnings = [r.getMessage() for r in caplog.records if "trust-on-first-use" in r.getMessage()]
    assert len(warnings) == 1 and "SHA256:" in warnings[0] and str(kh) in warnings[0]
    with _ssh(ssh_lab, known_hosts=str(kh), trust_on_first_use=True) as t:  # now known
        assert t.run(["true"]).ok
    with _ssh(ssh_lab, known_hosts=str(kh)) as t:  # and strict mode accepts the saved key
        assert t.run(["true"]).ok
    assert kh.read_text() == ssh_lab.target.known_hosts_line
    assert len([r for r in caplog.records if "trust-on-first-use" in r.getMessage()]) == 1


def test_changed_host_key_rejected_even_with_tofu(ssh_lab, tmp_path):
    other = keygen(tmp_path / "other_host_key")
    pub = " ".join((tmp_path / "other_host_key.pub").read_text().split()[:2])
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{ssh_lab.target.port} {pub}\n")
    for tofu in (False, True):
        with pytest.raises(HostKeyError) as ei:
            _ssh(ssh_lab, known_hosts=str(kh), trust_on_first_use=tofu).connect()
        assert "CHANGED" in str(ei.value) and "\n" not in str(ei.value)
    assert kh.read_text() == f"[127.0.0.1]:{ssh_lab.target.port} {pub}\n"
    assert other.exists()


def _write_config(lab, path: Path, extra: str = "") -> Path:
    path.write_text(
        "Host lab-target\n"
        f"    HostName 127.0.0.1\n    Port {lab.target.port}\n    User {lab.user}\n"
        f"    IdentityFile {lab.client_key}\n"
        "Host lab-jump\n"
        f"    HostName 127.0.0.1\n    Port {lab.jump.port}\n    User {lab.user}\n"
        f"    IdentityFile {lab.client_key}\n"
        "Host lab-behind-jump\n"
        f"    HostName 127.0.0.1\n    Port {lab.target.port}\n    User {lab.user}\n"
        f"    IdentityFile {lab.client_key}\n    ProxyJump lab-jump\n"
        "Host lab-behind-two\n"
        f"    HostName 127.0.0.1\n    Port {lab.target.port}\n"
        f"    IdentityFile {lab.client_key}\n"
        f"    ProxyJump lab-jump,{lab.user}@127.0.0.1:{lab.jump.port}\n"
        "Host 127.0.0.1\n"  # the second hop above, named by address
        f"    IdentityFile {lab.client_key}\n"
        + extra
    )
    return path


def _from_config(lab, alias, cfg, **kw):
    return SSHTransport(alias, ssh_config=str(cfg), known_hosts=str(lab.known_hosts),
                        user_known_hosts=None, allow_agent=False, look_for_keys=False,
                        connect_timeout=5.0, **kw)


def test_ssh_config_hostname_port_user_identityfile(ssh_lab, tmp_path):
    cfg = _write_config(ssh_lab, tmp_path / "config")
    t = _from_config(ssh_lab, "lab-target", cfg)
    assert (t.hostname, t.port, t.user) == ("127.0.0.1", ssh_lab.target.port, ssh_lab.user)
    assert t.key_files == [str(ssh_lab.client_key)] and t.proxy_jump == []
    with t:
        assert t.run(["id", "-un"]).stdout.strip() == ssh_lab.user
    # inventory values win over the config (as on the ssh command line)
    t2 = _from_config(ssh_lab, "lab-target", cfg, port=1, user="someone")
    assert (t2.port, t2.user) == (1, "someone")
    with pytest.raises(TransportError) as ei:
        SSHTransport("x", ssh_config=str(tmp_path / "missing"))
    assert "does not exist" in str(ei.value)


def test_key_filename_list_tries_every_key(ssh_lab, tmp_path):
    """A list of key files reaches paramiko whole (it tries each in turn): the authorized
    key second in the list still logs in; the unauthorized key alone is rejected."""
    stranger = keygen(tmp_path / "id_stranger", "not-authorized")
    with _ssh(ssh_lab, key_filename=[str(stranger), str(ssh_lab.client_key)]) as t:
        assert t.run(["id", "-un"]).stdout.strip() == ssh_lab.user
    with pytest.raises(TransportError, match="authentication failed"):
        _ssh(ssh_lab, key_filename=[str(stranger)]).connect()


def test_proxyjump_one_and_two_hops(ssh_lab, tmp_path):
    cfg = _write_config(ssh_lab, tmp_path / "config")
    before = ssh_lab.jump.log_text().count("Accepted publickey")
    with _from_config(ssh_lab, "lab-behind-jump", cfg) as t:
        assert t.proxy_jump == ["lab-jump"]
        assert t.run(["echo", "via jump"]).stdout == "via jump\n"
        assert type(t._client.get_transport().sock).__name__ == "Channel"
    assert ssh_lab.jump.log_text().count("Accepted publickey") == before + 1
    with _from_config(ssh_lab, "lab-behind-two", cfg) as t:  # jump -> jump -> target
        assert len(t.proxy_jump) == 2
        assert t.run(["echo", "two hops"]).stdout == "two hops\n"
    assert ssh_lab.jump.log_text().count("Accepted publickey") == before + 3
    # the inventory form, without any config
    with _ssh(ssh_lab, proxy_jump=f"{ssh_lab.user}@127.0.0.1:{ssh_lab.jump.port}") as t:
        assert t.run(["true"]).ok
    # a jump host whose key is unknown is refused like any other
    kh = tmp_path / "only_target"
    kh.write_text(ssh_lab.target.known_hosts_line)
    with pytest.raises(HostKeyError) as ei:
        _ssh(ssh_lab, known_hosts=str(kh), proxy_jump=f"127.0.0.1:{ssh_lab.jump.port}").connect()
    assert f"[127.0.0.1]:{ssh_lab.jump.port}" in str(ei.value)


def test_put_and_get_over_sftp(conn, tmp_path):
    src = tmp_path / "src"
    src.write_bytes(os.urandom(300_000))
    remote_dir = tmp_path / "remote dir ✓"
    remote_dir.mkdir()
    dst = remote_dir / "file; $(x)"
    conn.put(src, str(dst), mode=0o600)
    assert dst.read_bytes() == src.read_bytes() and (dst.stat().st_mode & 0o777) == 0o600
    assert os.listdir(remote_dir) == [dst.name]
    conn.get(str(dst), tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == src.read_bytes()
    with pytest.raises(TransportError) as ei:
        conn.get(str(remote_dir / "missing"), tmp_path / "nope")
    assert str(ei.value).startswith("web1: get: ") and not (tmp_path / "nope").exists()


def test_put_content_addressed_once_skip_and_repair(conn, tmp_path):
    src = tmp_path / "kho-agent.pyz"
    src.write_bytes(b"#!/usr/bin/env python3\n" + os.urandom(50_000))
    os.chmod(src, 0o755)
    digest = sha256_file(src)
    cas = tmp_path / "var lib kho"
    p1 = conn.put_content_addressed(src, str(cas))
    assert p1.uploaded and p1.path == f"{cas}/{digest}/kho-agent.pyz"
    remote = Path(p1.path)
    assert remote.read_bytes() == src.read_bytes() and os.access(remote, os.X_OK)
    m1 = remote.stat().st_mtime_ns
    p2 = conn.put_content_addressed(src, str(cas))
    assert not p2.uploaded and remote.stat().st_mtime_ns == m1
    remote.write_bytes(src.read_bytes()[:-1] + b"!")  # altered on the host
    p3 = conn.put_content_addressed(src, str(cas))
    assert p3.uploaded and remote.read_bytes() == src.read_bytes()
    assert os.listdir(remote.parent) == ["kho-agent.pyz"]  # no temp names left behind
    assert conn.remote_sha256(p3.path) == digest and conn.remote_sha256(str(cas / "x")) is None


def test_auth_failures_name_no_secrets(ssh_lab, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    stranger = keygen(tmp_path / "stranger")
    with pytest.raises(TransportError) as ei:
        _ssh(ssh_lab, key_filename=str(stranger), password="hunter2-pw-secret").connect()
    assert not isinstance(ei.value, HostUnreachable)
    assert "authentication failed" in str(ei.value) and "\n" not in str(ei.value)
    locked = keygen(tmp_path / "locked", passphrase="right-phrase-secret")
    with pytest.raises(TransportError) as ei2:
        _ssh(ssh_lab, key_filename=str(locked), passphrase="wrong-phrase-secret").connect()
    for text in (str(ei.value), str(ei2.value), caplog.text):
        for secret in ("hunter2-pw-secret", "right-phrase-secret", "wrong-phrase-secret"):
            assert secret not in text


def test_unreachable_and_silent_servers_fail_fast(ssh_lab):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(HostUnreachable) as ei:
        _ssh(ssh_lab, port=dead_port).connect()
    assert time.monotonic() - t0 < 2 and "refused" in str(ei.value).lower()
    with socket.socket() as silent:  # accepts TCP, never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        t0 = time.monotonic()
        with pytest.raises(HostUnreachable):
            _ssh(ssh_lab, port=silent.getsockname()[1], connect_timeout=1.0).connect()
        assert time.monotonic() - t0 < 4


def test_auth_that_never_answers_is_unreachable_not_rejected(ssh_lab: Any,
                                                             tmp_path: Path) -> None:
    """A server that completes the key exchange but never answers userauth (the sshd of a
    host still booting after kexec, starved of CPU) is a slow host, to be retried."""
    import paramiko
    host_key = paramiko.RSAKey.generate(1024)
    release = threading.Event()

    class Stall(paramiko.ServerInterface):
        def get_allowed_auths(self, username: str) -> str:
            """Offer publickey only."""
            return "publickey"

        def check_auth_publickey(self, username: str, key: Any) -> int:
            """Never answer in time (until the test is done)."""
            release.wait(10)
            return paramiko.AUTH_FAILED

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve() -> None:
        """Accept one client, complete the key exchange, then stall."""
        conn, _ = srv.accept()
        t = paramiko.Transport(conn)
        t.add_server_key(host_key)
        try:
            t.start_server(server=Stall())
            release.wait(10)
        finally:
            t.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(HostUnreachable) as ei:
            _ssh(ssh_lab, port=srv.getsockname()[1], known_hosts=str(tmp_path / "kh"),
                 trust_on_first_use=True, connect_timeout=1.0).connect()
        assert "no answer to authentication" in str(ei.value) and time.monotonic() - t0 < 5
    finally:
        release.set()
        th.join(5)
        srv.close()


@pytest.fixture
def lone_sshd(ssh_lab, tmp_path):
    """An sshd of its own, to kill and restart (same port, same host key)."""
    s = SSHD(tmp_path, ssh_lab.dir / "authorized_keys", "lone").start()
    kh = tmp_path / "known_hosts"
    kh.write_text(s.known_hosts_line)
    yield s, kh
    s.stop()


def test_sshd_killed_mid_session_then_reconnect(ssh_lab, lone_sshd):
    s, kh = lone_sshd
    t = _ssh(ssh_lab, port=s.port, known_hosts=str(kh))
    t.connect()
    assert t.run(["true"]).ok and t.is_alive()
    boot_id = t.boot_id()
    box: dict = {}

    def long_run():
        t0 = time.monotonic()
        try:
            t.run(["sleep", "30.6262"], timeout=20)
        except TransportError as e:
            box["err"], box["took"] = e, time.monotonic() - t0

    th = threading.Thread(target=long_run)
    th.start()
    time.sleep(0.5)
    s.stop()  # the host "kexecs": every sshd process dies, the TCP connection with it
    th.join(5)
    assert isinstance(box.get("err"), HostUnreachable) and box["took"] < 3, box
    t0 = time.monotonic()
    with pytest.raises(HostUnreachable) as ei:
        t.run(["true"])
    assert time.monotonic() - t0 < 1 and "reconnect" in str(ei.value)
    assert not t.is_alive()
    with pytest.raises(HostUnreachable):
        t.reconnect()  # still down
    s.start()
    t.reconnect()  # same port, same host key: strict known_hosts still matches
    r = t.run(["echo", "back"])
    assert r.stdout == "back\n", r
    assert t.boot_id() == boot_id
    t.close()


def test_wait_for_ssh(ssh_lab, lone_sshd):
    s, kh = lone_sshd
    s.stop()
    factory = lambda: _ssh(ssh_lab, port=s.port, known_hosts=str(kh), connect_timeout=1.0)  # noqa: E731
    restarter = threading.Timer(1.0, s.start)
    restarter.start()
    try:
        took = wait_for_ssh(factory, timeout=10, interval=0.2)
    finally:
        restarter.join()
    assert 0.9 <= took < 5
    with factory() as t:
        bid = t.boot_id()
    t0 = time.monotonic()
    with pytest.raises(HostUnreachable) as ei:  # same boot: kexec has not happened yet
        wait_for_ssh(factory, timeout=1.0, interval=0.2, previous_boot_id=bid)
    assert "previous boot" in str(ei.value) and time.monotonic() - t0 < 3
    assert wait_for_ssh(factory, timeout=5, previous_boot_id="not-" + bid) < 5


def test_wait_for_ssh_polls_a_host_that_cannot_open_sessions_yet(ssh_lab, lone_sshd):
    """A host still booting after kexec may accept SSH (key, auth) before it can open a
    session: seen on a lab guest ("Timeout opening channel"). That is polled again, not a
    failure; here sshd refuses every session (MaxSessions 0) until it is restarted normally."""
    s, kh = lone_sshd
    normal = s.config.read_text()
    s.stop()
    s.config.write_text(normal.replace("MaxSessions 100", "MaxSessions 0"))
    s.start()
    factory = lambda: _ssh(ssh_lab, port=s.port, known_hosts=str(kh), connect_timeout=2.0)  # noqa: E731
    with pytest.raises(HostUnreachable) as ei:       # never opens a session: times out
        wait_for_ssh(factory, timeout=2.0, interval=0.2, previous_boot_id="old")
    assert "run:" in str(ei.value), ei.value

    def boot_completes() -> None:
        s.stop()
        s.config.write_text(normal)
        s.start()
    fixer = threading.Timer(1.5, boot_completes)
    fixer.start()
    try:
        took = wait_for_ssh(factory, timeout=20, interval=0.2, previous_boot_id="old")
    finally:
        fixer.join()
    assert took >= 1.0


def test_become_as_root_needs_no_sudo(ssh_lab):
    if ssh_lab.user != "root":
        pytest.skip("needs to run as root")
    with _ssh(ssh_lab, become=True) as t:
        assert t.run(["id", "-u"], env={"K": "v w"}).stdout == "0\n"
