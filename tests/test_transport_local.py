"""LocalTransport (this machine, twin hosts) and the shared Transport machinery in base.py:
argv verbatim, env, exit codes, timeouts that kill the process group, put/get, and the
content-addressed upload (upload once, skip, detect corruption)."""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
from pathlib import Path

import pytest

from kho_fleet.transport import (
    CommandFailed,
    CommandTimeout,
    LocalTransport,
    Transport,
    TransportError,
    shell_command,
    transport_for,
)
from kho_fleet.transport.base import REMOTE_SHA256_SCRIPT, sha256_file

TRICKY = [
    "plain",
    "two words",
    "  leading and trailing  ",
    "it's",
    'double "quoted"',
    "$(echo pwned)",
    "`echo pwned`",
    "$HOME ${PATH}",
    "a; echo pwned",
    "a && b || c | d > /tmp/x < /dev/null &",
    "new\nline\n",
    "tab\there",
    "back\\slash\\n",
    "glob * ? [a-z]",
    "ünïcödé ✓ 漢字",
    "-n",
    "--",
    "",
]


def _procs_with(arg: str) -> list:
    """pids whose command line has `arg` as one argument."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if arg.encode() in f.read().split(b"\0"):
                        found.append(int(d))
            except OSError:
                pass
    return found


@pytest.fixture
def t(tmp_path):
    with LocalTransport("twin-1", root=tmp_path / "host") as tr:
        yield tr


def test_tricky_argv_verbatim(t):
    r = t.run(["printf", "%s\n"] + TRICKY)
    assert r.rc == 0 and r.stderr == ""
    assert r.stdout == "".join(a + "\n" for a in TRICKY)


def test_env_merged_and_quoted(t):
    r = t.run(["sh", "-c", 'printf "%s|%s" "$KHO_X" "${PATH:+has-path}"'],
              env={"KHO_X": "$(id) 'q' ;\n"})
    assert r.stdout == "$(id) 'q' ;\n|has-path"


def test_bad_argv_and_env_refused(t):
    with pytest.raises(TypeError):
        t.run("echo hi")  # a shell string is not an argv
    with pytest.raises(ValueError):
        t.run([])
    with pytest.raises(ValueError):
        t.run(["true"], env={"BAD-NAME": "x"})
    with pytest.raises(ValueError):
        t.run(["echo", "nul\0byte"])


def test_shell_command_quotes_everything():
    s = shell_command(["printf", "%s", "$(id)"], {"A": "b c"}, ["sudo", "-n", "--"])
    assert s == "sudo -n -- env 'A=b c' printf %s '$(id)'"


def test_exit_codes_and_check(t):
    assert t.run(["true"]).rc == 0
    assert t.run(["sh", "-c", "exit 42"]).rc == 42
    r = t.run(["no-such-program-kho"])
    assert r.rc == 127 and not r.ok
    with pytest.raises(CommandFailed) as ei:
        t.run(["sh", "-c", "echo first >&2; echo 'last line' >&2; exit 3"], check=True)
    assert ei.value.result.rc == 3
    assert str(ei.value) == "twin-1: run: sh exited 3: last line"


def test_stdin(t):
    assert t.run(["cat"], stdin=b"hello\x00world").stdout == "hello\x00world"


def test_timeout_kills_process_group(t):
    marker = f"30.{random.randrange(10**6):06d}"  # unique: other runs may be sleeping too
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout) as ei:
        t.run(["sh", "-c", f"sleep {marker} & sleep {marker}; wait"], timeout=0.5)
    assert time.monotonic() - t0 < 2.0
    assert "\n" not in str(ei.value) and str(ei.value).startswith("twin-1: run: ")
    time.sleep(0.1)
    assert _procs_with(marker) == []


def test_root_maps_remote_paths(tmp_path, t):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    os.makedirs(t.path("/etc/kho"), exist_ok=True)
    t.put(src, "/etc/kho/file", mode=0o640)
    dst = Path(t.path("/etc/kho/file"))
    assert dst == tmp_path / "host" / "etc" / "kho" / "file"
    assert dst.read_bytes() == b"payload" and (dst.stat().st_mode & 0o777) == 0o640
    assert t.path("/../../etc/passwd") == str(tmp_path / "host" / "etc" / "passwd")
    t.get("/etc/kho/file", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == b"payload"
    with pytest.raises(TransportError) as ei:
        t.get("/nope", tmp_path / "x")
    assert str(ei.value).startswith("twin-1: get: /nope:")
    assert sorted(os.listdir(tmp_path)) == ["back", "host", "src.bin"]  # no temp files left


def test_put_content_addressed_once_skip_and_repair(tmp_path, t):
    src = tmp_path / "kho-agent.pyz"
    src.write_bytes(b"#!/usr/bin/env python3\n" + os.urandom(4096))
    os.chmod(src, 0o755)
    digest = sha256_file(src)
    p1 = t.put_content_addressed(src, "/var/lib/kho/agent")
    assert p1.uploaded and p1.sha256 == digest
    assert p1.path == f"/var/lib/kho/agent/{digest}/kho-agent.pyz" == os.fspath(p1)
    local = Path(t.path(p1.path))
    assert local.read_bytes() == src.read_bytes() and os.access(local, os.X_OK)
    m1 = local.stat().st_mtime_ns
    time.sleep(0.01)
    p2 = t.put_content_addressed(src, "/var/lib/kho/agent")
    assert not p2.uploaded and p2.path == p1.path and local.stat().st_mtime_ns == m1
    local.write_bytes(b"corrupted")
    p3 = t.put_content_addressed(src, "/var/lib/kho/agent")
    assert p3.uploaded and local.read_bytes() == src.read_bytes()
    assert os.listdir(local.parent) == ["kho-agent.pyz"]


def test_remote_sha256_script_and_python_fallback(tmp_path, t):
    f = tmp_path / "odd\nname \\ x"
    f.write_bytes(b"abc")
    want = sha256_file(f)
    r = t.run(["sh", "-c", REMOTE_SHA256_SCRIPT, "sh", str(f)])
    assert r.rc == 0 and r.stdout.split()[0] == want
    # A host without coreutils' sha256sum: only sh and python3 on PATH.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(shutil.which("sh"), bindir / "sh")
    os.symlink(os.path.realpath(sys.executable), bindir / "python3")
    r = t.run([str(bindir / "sh"), "-c", REMOTE_SHA256_SCRIPT, "sh", str(f)],
              env={"PATH": str(bindir)})
    assert r.rc == 0 and r.stdout.strip() == want
    assert t.run(["sh", "-c", REMOTE_SHA256_SCRIPT, "sh", str(tmp_path / "absent")]).rc == 3


def test_generic_content_addressed_over_run(tmp_path):
    """The base-class path (sh/sha256sum/mv over run()) that SSH uses, exercised locally."""

    class RunOnly(LocalTransport):
        remote_sha256 = Transport.remote_sha256
        _mkdirs = Transport._mkdirs
        _rename = Transport._rename

    t = RunOnly("gen")
    src = tmp_path / "blob"
    src.write_bytes(b"x" * 1000)
    d = str(tmp_path / "cas dir; $(x)")
    assert t.put_content_addressed(src, d).uploaded
    p = t.put_content_addressed(src, d)
    assert not p.uploaded and Path(p.path).read_bytes() == b"x" * 1000


def test_transport_for_picks_kind(tmp_path):
    lt = transport_for("twin-7", {"ansible_connection": "local", "kho_root": str(tmp_path)})
    assert isinstance(lt, LocalTransport) and lt.root == str(tmp_path)
    st = transport_for("lab1", {"ansible_host": "10.9.8.7", "ansible_port": 2222,
                                "ansible_user": "ops", "ansible_password": "s3cret-pw"},
                       ssh_config=None, user_known_hosts=None)
    assert (st.kind, st.hostname, st.port, st.user) == ("ssh", "10.9.8.7", 2222, "ops")
    assert "s3cret-pw" not in repr(st)
    with pytest.raises(TransportError):
        transport_for("x", {"ansible_connection": "winrm"})
